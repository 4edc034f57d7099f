"""Reading shards sample by sample with their features, and writing kept samples into new shards.

Samples are always handled in key order, whatever order a downloader finished them in, so that the same inputs
and filters give the same shards byte for byte (an interrupted build that resumes equals one that never stopped).
Every output shard is written to a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from PIL import Image

from clipline.io import fsync_dir
from clipline.shards import iter_keyed_samples
from data_prep.dedup import phash_bytes
from data_prep.remote import PHASH_DIR

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
FEATURE_COLUMNS = ["shard", "key", "caption", "width", "height", "sha256", "phash"]


def progress(iterable, total: int | None, desc: str, unit: str = "shard"):
    """A progress bar on stderr when it is a terminal; plain iteration otherwise (logs stay readable)."""
    if not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, file=sys.stderr)


def image_of(sample: dict[str, bytes]) -> bytes | None:
    return next((sample[e] for e in IMAGE_EXTS if e in sample), None)


def _meta(sample: dict[str, bytes]) -> dict:
    try:
        meta = json.loads(sample.get("json", b"{}"))
        return meta if isinstance(meta, dict) else {}
    except ValueError:
        return {}


def _size(meta: dict, image: bytes) -> tuple[int, int]:
    w, h = meta.get("original_width"), meta.get("original_height")
    if isinstance(w, int) and isinstance(h, int):
        return w, h
    try:
        with Image.open(io.BytesIO(image)) as img:
            return img.size
    except Exception:  # noqa: BLE001
        return 0, 0




def phash_file(shard: str | Path) -> Path:
    shard = Path(shard)
    return shard.parent / PHASH_DIR / (shard.name.split(".", 1)[0] + ".json")


def read_phashes(shard: str) -> dict[str, int]:
    """The pHashes the download computed for ``shard`` (empty if it has none: older downloads, other folders)."""
    if "://" in str(shard):
        return {}
    try:
        return {k: int(v, 16) for k, v in json.loads(phash_file(shard).read_text()).items()}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def read_shard(path: str, with_phash: bool, skipped: Counter) -> tuple[pd.DataFrame, dict[str, dict[str, bytes]]]:
    """One shard's complete samples (image + caption) in key order: their features, and their files by key. The
    pHash comes from the download's side file where it has one (the same function on the same bytes)."""
    rows, samples = [], {}
    known = read_phashes(path) if with_phash else {}
    for key, sample in sorted(iter_keyed_samples(path, skipped), key=lambda kv: kv[0]):
        image = image_of(sample)
        if image is None or "txt" not in sample:
            skipped["incomplete_sample"] += 1
            continue
        meta = _meta(sample)
        width, height = _size(meta, image)
        digest = meta.get("sha256") or hashlib.sha256(image).hexdigest()
        rows.append((path, key, sample["txt"].decode("utf-8", "replace"), width, height, digest,
                     (known[key] if key in known else phash_bytes(image)) if with_phash else None))
        samples[key] = sample
    return pd.DataFrame(rows, columns=FEATURE_COLUMNS), samples


def output_files(files: dict[str, bytes], extra_meta: dict) -> dict[str, bytes]:
    """The image, caption and .json (with ``extra_meta`` merged in) of one sample, as written to the output."""
    image_ext = next(e for e in IMAGE_EXTS if e in files)
    if not extra_meta and "json" in files:
        return {image_ext: files[image_ext], "txt": files["txt"], "json": files["json"]}
    meta = _meta(files)
    meta.update(extra_meta)
    return {image_ext: files[image_ext], "txt": files["txt"],
            "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode()}


def _octal(value: int, width: int) -> bytes:
    return f"{value:0{width - 1}o}".encode() + b"\0"


def ustar_header(name: str, size: int) -> bytes:
    """A ustar header with fixed metadata (mode 0444, uid/gid 0, mtime 0): the same sample, the same bytes.

    Built by hand: tarfile's header code was most of the time spent writing shards."""
    encoded = name.encode("utf-8")
    if len(encoded) > 100:  # a long name needs a pax record: rare, so tarfile's slower code is fine
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, 0, 0o444
        return info.tobuf(format=tarfile.PAX_FORMAT)
    header = bytearray(512)
    header[0:len(encoded)] = encoded
    header[100:108] = _octal(0o444, 8)
    header[108:116] = _octal(0, 8)
    header[116:124] = _octal(0, 8)
    header[124:136] = _octal(size, 12)
    header[136:148] = _octal(0, 12)
    header[148:156] = b" " * 8  # the checksum is computed with its own field as spaces
    header[156:157] = b"0"
    header[257:265] = b"ustar\x0000"
    header[148:156] = f"{sum(header):06o}".encode() + b"\0 "
    return bytes(header)


@dataclass
class ShardWriter:
    """Writes samples into NNNNN.tar shards of ``per_shard`` samples, each renamed into place when complete."""

    folder: Path
    per_shard: int

    def __post_init__(self):
        self.sizes: dict[str, int] = {}
        self.checksums: dict[str, dict] = {}
        """Shard -> {"bytes": file size, "sha256": hex digest of the file}, computed while writing."""
        self._file = None
        self._count = 0

    def _open(self) -> None:
        self._name = f"{len(self.sizes):05d}.tar"
        self._tmp = self.folder / f".{self._name}.tmp"
        self._file = open(self._tmp, "wb", buffering=1 << 20)
        self._hash = hashlib.sha256()
        self._bytes = 0
        self._count = 0

    def _put(self, data: bytes) -> None:
        self._file.write(data)
        self._hash.update(data)
        self._bytes += len(data)

    def write(self, key: str, files: dict[str, bytes]) -> None:
        if self._file is None:
            self._open()
        for ext, data in files.items():
            self._put(ustar_header(f"{key}.{ext}", len(data)))
            self._put(data)
            self._put(bytes(-len(data) % 512))
        self._count += 1
        if self._count >= self.per_shard:
            self._close_current()

    def _close_current(self) -> None:
        if self._file is None:
            return
        self._put(bytes(1024))  # two zero blocks end a tar
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.folder / self._name)
        self.sizes[self._name] = self._count
        self.checksums[self._name] = {"bytes": self._bytes, "sha256": self._hash.hexdigest()}
        self._file = None

    def close(self) -> dict[str, int]:
        self._close_current()
        fsync_dir(self.folder)
        return self.sizes


def remove_stale(folder: Path) -> None:
    """Delete the shards of an earlier build, and temporary shards left by a killed run."""
    for tmp in folder.glob(".[0-9]*.tar.tmp"):
        tmp.unlink(missing_ok=True)
    for tar in folder.glob("[0-9]*.tar"):
        tar.unlink()


def write_kept(kept: pd.DataFrame, writer: ShardWriter, skipped: Counter,
               extra_meta: Callable[[object], dict]) -> None:
    """Copy the samples in ``kept`` (columns shard, key, ...) into ``writer`` in (shard, key) order, re-reading
    their shards: the path for filters that must see every sample before deciding (a CLIP top fraction)."""
    groups = kept.groupby("shard", sort=True)
    for shard, rows in progress(groups, groups.ngroups, "writing"):
        wanted = {r.key: r for r in rows.itertuples(index=False)}
        samples = {k: s for k, s in iter_keyed_samples(shard, skipped) if k in wanted}
        for key in sorted(samples):
            writer.write(key, output_files(samples[key], extra_meta(wanted[key])))


def phash_hex(value) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return f"{int(value):016x}"
