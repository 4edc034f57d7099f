"""Perceptual hashes and Hamming-distance search, for near-duplicate removal and eval decontamination.

pHash (Zauner 2010, the definition of the imagehash package but for the downscaling filter): the image in greyscale
area-averaged to 32 x 32, its 2-D DCT-II, the 8 x 8 lowest frequencies, one bit per coefficient: above their median
or not. Re-encoding, resizing and small colour changes move few bits; different images differ in about half of them.
imagehash downscales with Lanczos from the full-size image; an area average can be taken from a JPEG decoded at 1/2,
1/4 or 1/8 scale (libjpeg's scaled decode gives each pixel its block's mean), which makes the hash about 2x cheaper
per downloaded image and stays within half a bit of the Lanczos hash on average (docs/prep.md has the measurement).

:class:`HammingIndex` finds stored hashes within distance d of a query by multi-index hashing: split the 64 bits
into d + 1 blocks; two hashes within distance d agree exactly on at least one block (pigeonhole), so only the
hashes sharing a block with the query are compared.
"""

from __future__ import annotations

import functools
import io
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np
from PIL import Image

from clipline.errors import UsageError
from clipline.shards import iter_tar_samples, list_shards

HASH_SIDE = 32
LOW_FREQ = 8
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT = _dct_matrix(HASH_SIDE)[:LOW_FREQ]  # only the rows of the low frequencies are ever needed


@functools.lru_cache(maxsize=256)
def _low_rows(decoded: int, full: int, scale: int) -> np.ndarray:
    """The 8 low DCT-II rows composed with an area average: ``full`` source pixels in 32 equal bins, read from
    ``decoded`` pixels of which pixel j is the mean of source pixels [scale * j, min(scale * (j + 1), full)) (a JPEG
    decoded at 1/scale: its last pixel may cover fewer than ``scale``)."""
    if decoded != -(-full // scale):  # not the layout a scaled decode gives: spread the pixels evenly
        edges = np.arange(decoded + 1) * (full / decoded)
    else:
        edges = np.minimum(np.arange(decoded + 1) * scale, full).astype(np.float64)
    bins = np.arange(HASH_SIDE + 1) * (full / HASH_SIDE)
    overlap = np.clip(np.minimum(bins[1:, None], edges[None, 1:]) - np.maximum(bins[:-1, None], edges[None, :-1]),
                      0, None)
    return _DCT @ (overlap / overlap.sum(axis=1, keepdims=True))


def _bits(grey: np.ndarray, height: int, width: int, scale: int = 1) -> int:
    """The hash of a greyscale image of ``height`` x ``width`` pixels, given decoded at 1/scale as ``grey``."""
    low = (_low_rows(grey.shape[0], height, scale) @ grey.astype(np.float64)
           @ _low_rows(grey.shape[1], width, scale).T).ravel()  # the 8 x 8 lowest frequencies of the 2-D DCT-II
    ranked = np.sort(low)
    half = low.size // 2  # 32 of 64: the median is the mean of the two middle values
    bits = low > (ranked[half - 1] + ranked[half]) / 2  # above their median (np.median, without its overhead per image)
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def phash_image(img: Image.Image) -> int:
    """The 64-bit perceptual hash of a PIL image."""
    grey = np.asarray(img.convert("L"), dtype=np.uint8)
    return _bits(grey, *grey.shape)


# Greyscale, pixels as stored (EXIF orientation ignored, as PIL and img2dataset's resizer do); a JPEG decoded at
# 1/8, 1/4 or 1/2 scale, the coarsest that still leaves at least 32 pixels a side (libjpeg's scaled decode gives
# each output pixel the mean of its block, which is what the area average needs).
_FLAGS = cv2.IMREAD_IGNORE_ORIENTATION
_JPEG_MAGIC = b"\xff\xd8\xff"
_JPEG_SCALES = ((8, cv2.IMREAD_REDUCED_GRAYSCALE_8), (4, cv2.IMREAD_REDUCED_GRAYSCALE_4),
                (2, cv2.IMREAD_REDUCED_GRAYSCALE_2))


def _hash_encoded(data: bytes, width: int, height: int, jpeg: bool, img: Image.Image | None = None) -> int | None:
    scale, flag = 1, cv2.IMREAD_GRAYSCALE
    if jpeg:
        scale, flag = next(((s, f) for s, f in _JPEG_SCALES if min(width, height) >= HASH_SIDE * s), (scale, flag))
    # Other formats decode at full size: OpenCV's reduced modes would subsample them, not average.
    grey = cv2.imdecode(np.frombuffer(data, np.uint8), flag | _FLAGS)
    if grey is None or grey.ndim != 2 or not grey.size:  # a format or variant OpenCV does not read
        if img is None:
            return None
        grey, scale = np.asarray(img.convert("L"), dtype=np.uint8), 1
    return _bits(grey, height, width, scale)


def phash_bytes(data: bytes, size: tuple[int, int] | None = None) -> int | None:
    """pHash of encoded image bytes, or None if they do not decode. ``size``: (width, height) of a JPEG whose size
    the caller knows (the download's own output), so its header is not parsed a second time."""
    try:
        if size is not None and data[:3] == _JPEG_MAGIC:
            value = _hash_encoded(data, int(size[0]), int(size[1]), jpeg=True)
            if value is not None:
                return value
        with Image.open(io.BytesIO(data)) as img:  # the header only; refuses decompression bombs
            width, height = img.size
            return _hash_encoded(data, width, height, img.format == "JPEG", img)
    except Exception:  # noqa: BLE001 - a sample that does not decode has no hash; it is counted, not fatal
        return None


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


class HammingIndex:
    """64-bit hashes searchable for any stored hash within ``max_distance``."""

    def __init__(self, max_distance: int):
        if not 0 <= max_distance <= 16:
            raise ValueError("max_distance must be in 0..16")
        self.max_distance = max_distance
        blocks = max_distance + 1
        edges = np.linspace(0, 64, blocks + 1).astype(int)
        self._blocks = [(int(lo), (1 << int(hi - lo)) - 1) for lo, hi in zip(edges[:-1], edges[1:])]
        self._tables: list[dict[int, list[int]]] = [defaultdict(list) for _ in self._blocks]
        self.size = 0

    def _keys(self, h: int) -> Iterator[tuple[dict, int]]:
        for table, (shift, mask) in zip(self._tables, self._blocks):
            yield table, (h >> shift) & mask

    def add(self, h: int) -> None:
        for table, key in self._keys(h):
            table[key].append(h)
        self.size += 1

    def nearest_within(self, h: int) -> int | None:
        """Distance to the closest stored hash if it is within max_distance, else None."""
        best = None
        for table, key in self._keys(h):
            for other in table.get(key, ()):
                d = (h ^ other).bit_count()
                if d <= self.max_distance and (best is None or d < best):
                    best = d
                    if d == 0:
                        return 0
        return best

    def contains_near(self, h: int) -> bool:
        return self.nearest_within(h) is not None


def first_occurrences(hashes: Iterable[int | None], max_distance: int) -> np.ndarray:
    """True for each hash with no earlier kept hash within max_distance (None: kept, it cannot be compared)."""
    index = HammingIndex(max_distance)
    keep = []
    for h in hashes:
        if h is None:
            keep.append(True)
        elif index.contains_near(h):
            keep.append(False)
        else:
            index.add(h)
            keep.append(True)
    return np.array(keep, dtype=bool)


def _images_in_folder(folder: Path) -> Iterator[bytes]:
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            yield path.read_bytes()


def _images_in_shards(folder: str) -> Iterator[bytes]:
    from collections import Counter

    skipped: Counter = Counter()
    for shard in list_shards(folder):
        for sample in iter_tar_samples(shard, skipped):
            data = next((sample[k] for k in _IMAGE_KEYS if k in sample), None)
            if data is not None:
                yield data


def eval_hash_index(folders: list[str], max_distance: int) -> tuple[HammingIndex, dict[str, int]]:
    """An index of every image in the eval datasets (shard folders or image folders), and images per folder."""
    index = HammingIndex(max_distance)
    counts = {}
    for folder in folders:
        p = Path(folder)
        if not p.exists():
            raise UsageError(f"prep.filters.decontaminate: {p} does not exist (give a folder of webdataset shards "
                             f"or of image files)")
        images = _images_in_shards(folder) if (p.is_dir() and any(p.glob("*.tar"))) else _images_in_folder(p)
        n = 0
        for data in images:
            h = phash_bytes(data)
            if h is not None:
                index.add(h)
                n += 1
        if n == 0:
            raise UsageError(f"prep.filters.decontaminate: no readable images in {p}")
        counts[str(p)] = n
    return index, counts
