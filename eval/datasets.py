"""Eval datasets read from disk: webdataset shards with a label in each sample's .json, or captions in .txt."""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from dataclasses import dataclass

from PIL import Image

from clipline.config import EvalDatasetConfig
from clipline.errors import UsageError
from clipline.shards import iter_tar_samples, list_shards

log = logging.getLogger(__name__)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class EvalSamples:
    images: list[Image.Image]
    labels: list[int]
    """Classification: class index per image."""
    captions: list[list[str]]
    """Retrieval: the captions of each image (one per line of its .txt)."""
    skipped: Counter


def _decode(sample: dict[str, bytes]) -> Image.Image:
    data = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
    if data is None:
        raise ValueError("no image in sample")
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def load_samples(ds: EvalDatasetConfig) -> EvalSamples:
    try:
        shards = list_shards(ds.path)
    except FileNotFoundError as e:
        raise UsageError(f"eval dataset {ds.name!r}: {e}") from None
    index = {str(value): i for i, value in enumerate(ds.label_values or ds.classnames)}
    out = EvalSamples([], [], [], Counter())
    for shard in shards:
        for sample in iter_tar_samples(shard, out.skipped):
            try:
                image = _decode(sample)
            except Exception as e:  # PIL raises many types
                out.skipped["unreadable_image"] += 1
                log.warning("eval dataset %s: skipping an unreadable image (%s)", ds.name, e)
                continue
            if ds.task == "zeroshot_classification":
                meta = json.loads(sample.get("json", b"{}") or b"{}")
                label = meta.get(ds.label_field)
                if str(label) not in index:
                    out.skipped["unknown_label"] += 1
                    continue
                out.labels.append(index[str(label)])
            else:
                lines = [ln.strip() for ln in sample.get("txt", b"").decode("utf-8", "replace").splitlines()]
                lines = [ln for ln in lines if ln]
                if not lines:
                    out.skipped["no_caption"] += 1
                    continue
                out.captions.append(lines)
            out.images.append(image)
    if not out.images:
        raise UsageError(f"eval dataset {ds.name!r} at {ds.path} has no usable samples (skipped: {dict(out.skipped)})"
                         + (f"; check that label_field {ds.label_field!r} holds one of the classnames"
                            if ds.task == "zeroshot_classification" else ""))
    return out
