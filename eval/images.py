"""Images of an eval split, read lazily: a file path, a member of a tar shard, raw bytes or an index into a
map-style dataset. Decoding and preprocessing run in DataLoader workers, so every core is busy on CPU."""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from clipline.dist import available_cores, threads_beside

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TarMember:
    """An image stored inside an uncompressed tar: read with one seek, no tar parsing in the workers."""

    shard: str
    offset: int
    size: int
    name: str

    def __str__(self) -> str:
        return f"{self.shard}:{self.name}"


ImageRef = Any
"""str (a file path), TarMember, bytes, a PIL image, or int (an index into ImageDataset.indexed)."""


def open_image(ref: ImageRef, indexed: Any = None) -> Image.Image:
    if isinstance(ref, TarMember):
        with open(ref.shard, "rb") as f:
            f.seek(ref.offset)
            data = f.read(ref.size)
        return _decode(data)
    if isinstance(ref, bytes):
        return _decode(ref)
    if isinstance(ref, Image.Image):
        return ref.convert("RGB")
    if isinstance(ref, int):
        image = indexed[ref][0]
        return (image if isinstance(image, Image.Image) else Image.fromarray(image)).convert("RGB")
    with Image.open(ref) as im:
        return im.convert("RGB")


def _decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


class ImageDataset(torch.utils.data.Dataset):
    """(index, preprocessed tensor), or (index, None) for an image that cannot be read: one bad file must not
    stop an evaluation, and the caller drops it from the metrics."""

    def __init__(self, refs: Sequence[ImageRef], transform: Callable, indexed: Any = None):
        self.refs, self.transform, self.indexed = refs, transform, indexed

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int):
        try:
            return i, self.transform(open_image(self.refs[i], self.indexed))
        except Exception as e:  # PIL and the transforms raise many types
            log.warning("skipping unreadable image %s: %s", self.refs[i], e)
            return i, None


def collate_images(batch):
    ok = [(i, x) for i, x in batch if x is not None]
    bad = [i for i, x in batch if x is None]
    if not ok:
        return torch.empty(0, dtype=torch.long), None, bad
    return torch.tensor([i for i, _ in ok]), torch.stack([x for _, x in ok]), bad


def resolve_workers(workers: int, n_images: int, batch_size: int, device_type: str = "cpu") -> int:
    """-1: on a GPU one decoding process per core; on the CPU half the cores, the other half running the model.
    A single batch is decoded in-process (no start-up cost)."""
    if workers < 0:
        cores = available_cores()
        workers = cores if device_type == "cuda" else max(1, cores // 2)
    return 0 if n_images <= batch_size else min(workers, -(-n_images // batch_size))


@contextlib.contextmanager
def model_threads(device_type: str, n_workers: int):
    """On the CPU, run the model on the cores the decoding workers leave free (clipline.dist.threads_beside)."""
    if device_type != "cpu" or n_workers == 0:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(min(before, threads_beside(n_workers)))
    try:
        yield
    finally:
        torch.set_num_threads(before)
