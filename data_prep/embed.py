"""Image and text embeddings for the curation filters (semantic dedup, cluster filter), cached per shard.

The model is any checkpoint eval can load (a clipline checkpoint or run folder, an open_clip folder,
``ARCH:WEIGHTS_FILE``, a Hugging Face CLIP folder), or ``thumbnail:N``: the image itself at N x N, mean-removed and
normalised, a model-free embedding that only near-pixel copies are close in (smoke runs and tests).

Each shard's embeddings are written beside the staged shards as ``NNNNN.img.npy`` (float16, L2-normalised rows,
in the shard's sample order), ``NNNNN.txt.npy`` when captions were embedded, and ``NNNNN.json`` (the keys, the
shard's sha256 and the model's identity: the checkpoint it resolves to, its files' sizes and times): a later run
whose shard and model are the same reuses them.
"""

from __future__ import annotations

import io
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from clipline.errors import UsageError
from clipline.io import atomic_write, atomic_write_json

THUMBNAIL = "thumbnail:"


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class ThumbnailEmbedder:
    """The image at side x side in RGB, minus its mean, as a unit vector: no model, no text tower."""

    has_text = False

    def __init__(self, side: int):
        self.side = side

    def images(self, images: list[bytes]) -> np.ndarray:
        rows = []
        for data in images:
            with Image.open(io.BytesIO(data)) as img:
                pixels = np.asarray(img.convert("RGB").resize((self.side, self.side), Image.Resampling.BILINEAR),
                                    dtype=np.float32).ravel()
            rows.append(pixels - pixels.mean())
        return _normalise(np.stack(rows)) if rows else np.zeros((0, 3 * self.side ** 2), np.float32)

    def texts(self, texts: list[str]) -> np.ndarray:
        raise UsageError(f"prep.filters.embed_model={THUMBNAIL}{self.side} has no text encoder: the cluster filter "
                         f"and semdedup_use_text need a CLIP checkpoint")


class ModelEmbedder:
    """A CLIP model as eval loads it: encode_image / encode_text, normalised, in fp32."""

    has_text = True

    def __init__(self, spec: str, device: str = "cpu", batch_size: int = 64):
        import torch

        from eval.checkpoints import _expand, load_model

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.batch_size = batch_size
        try:
            ckpt = _expand(spec, all_steps=False)[0]
        except UsageError as e:
            raise UsageError(f"prep.filters.embed_model: {e}") from None
        bundle = load_model(ckpt, self.device)
        self.model, self.preprocess, self.tokenizer = bundle.model, bundle.preprocess_val, bundle.tokenizer

    def _batches(self, items: list, encode) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(items), self.batch_size):
                out.append(encode(items[i:i + self.batch_size]).float().cpu().numpy())
        return _normalise(np.concatenate(out)) if out else np.zeros((0, 0), np.float32)

    def images(self, images: list[bytes]) -> np.ndarray:
        import torch

        def encode(chunk):
            pixels = torch.stack([self.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in chunk])
            return self.model.encode_image(pixels.to(self.device))
        return self._batches(images, encode)

    def texts(self, texts: list[str]) -> np.ndarray:
        return self._batches(texts, lambda chunk: self.model.encode_text(self.tokenizer(chunk).to(self.device)))


@lru_cache(maxsize=2)
def embedder(spec: str, device: str = "cpu", batch_size: int = 64):
    """One embedder per process and model (each worker loads the model once)."""
    if spec.startswith(THUMBNAIL):
        side = spec[len(THUMBNAIL):]
        if not side.isdigit() or not 2 <= int(side) <= 256:
            raise UsageError(f"prep.filters.embed_model {spec!r}: write thumbnail:N with N in 2..256 (e.g. "
                             f"thumbnail:16)")
        return ThumbnailEmbedder(int(side))
    return ModelEmbedder(spec, device, batch_size)


def check_model(spec: str) -> None:
    """Fail before any work when the model names nothing on disk."""
    if spec.startswith(THUMBNAIL):
        embedder(spec)
        return
    from eval.checkpoints import _expand

    try:
        _expand(spec, all_steps=False)
    except UsageError as e:
        raise UsageError(f"prep.filters.embed_model: {e}") from None


def _save(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append .npy to the temporary name
        np.save(f, array, allow_pickle=False)


def model_identity(spec: str) -> str:
    """What the cached embeddings were made with: the checkpoint the spec resolves to (a run folder's newest one)
    and the size and modification time of its files, so new weights under the same name are not mistaken for the
    old ones."""
    if spec.startswith(THUMBNAIL):
        return spec
    from eval.checkpoints import _expand

    ckpt = _expand(spec, all_steps=False)[0]
    path = Path(ckpt.path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stamp = [(str(p.relative_to(path)) if path.is_dir() else p.name, p.stat().st_size, p.stat().st_mtime_ns)
             for p in files]
    return json.dumps([ckpt.label, stamp])


def cache_paths(cache: Path, shard: str) -> tuple[Path, Path, Path]:
    stem = Path(shard).name.split(".")[0]
    return cache / f"{stem}.img.npy", cache / f"{stem}.txt.npy", cache / f"{stem}.json"


def shard_embeddings(shard: str, sha256: str, cache: Path, spec: str, identity: str, device: str, batch_size: int,
                     with_text: bool) -> tuple[list[str], int]:
    """Embed one shard's images (and captions) unless its cached embeddings match; returns (keys, rows embedded
    now: 0 when reused)."""
    from collections import Counter

    from data_prep.reshard import image_of
    from clipline.shards import iter_keyed_samples

    img_path, txt_path, meta_path = cache_paths(Path(cache), shard)
    try:
        meta = json.loads(meta_path.read_text())
        if (meta["sha256"] == sha256 and meta["model"] == identity and img_path.is_file()
                and (not with_text or txt_path.is_file())):
            return meta["keys"], 0
    except (OSError, ValueError, KeyError):
        pass
    samples = list(iter_keyed_samples(shard, Counter()))  # file order: the order the filters kept them
    keys = [k for k, _ in samples]
    model = embedder(spec, device, batch_size)
    img = model.images([image_of(s) for _, s in samples]).astype(np.float16)
    atomic_write(img_path, lambda p: _save(p, img))
    if with_text:
        txt = model.texts([s["txt"].decode("utf-8", "replace") for _, s in samples]).astype(np.float16)
        atomic_write(txt_path, lambda p: _save(p, txt))
    atomic_write_json(meta_path, {"keys": keys, "sha256": sha256, "model": identity})
    return keys, len(keys)


def load_embeddings(shard: str, cache: Path, with_text: bool, rows: np.ndarray | None = None) -> np.ndarray:
    """One shard's cached rows (all, or ``rows``) as unit float32 vectors: the image embedding, or with_text the
    normalised sum of the image and caption embeddings. Memory-mapped: only the rows asked for are read."""
    img_path, txt_path, _ = cache_paths(cache, shard)
    pick = (lambda a: a) if rows is None else (lambda a: a[rows])
    x = np.asarray(pick(np.load(img_path, mmap_mode="r")), np.float32)
    if with_text:
        x = x + np.asarray(pick(np.load(txt_path, mmap_mode="r")), np.float32)
    return _normalise(x)
