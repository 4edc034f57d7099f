"""The on-disk shard contract between data_prep and its readers (training, eval).

A shard folder holds ``NNNNN.tar`` webdataset shards (``KEY.jpg`` + ``KEY.txt`` + ``KEY.json`` per sample),
``sizes.json`` (shard file name -> sample count, as open_clip's trainer reads it) and ``manifest.json``
(:class:`ShardManifest`: shards, counts, totals and the config that built them).
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import braceexpand

from clipline.io import atomic_write_json

log = logging.getLogger(__name__)

SIZES_FILE = "sizes.json"
MANIFEST_FILE = "manifest.json"


@dataclass
class ShardManifest:
    shards: list[str]
    """Shard file names, relative to the folder."""
    sizes: dict[str, int]
    """Samples per shard."""
    total_samples: int
    source: str = ""
    """The URL list the shards were built from."""
    stats: dict = field(default_factory=dict)
    """Counts of what was downloaded, failed and filtered, by reason."""
    config: dict = field(default_factory=dict)

    def write(self, folder: str | Path) -> None:
        atomic_write_json(Path(folder) / MANIFEST_FILE, asdict(self))

    @classmethod
    def read(cls, folder: str | Path) -> "ShardManifest":
        return cls(**json.loads((Path(folder) / MANIFEST_FILE).read_text()))


def write_sizes(folder: str | Path, sizes: dict[str, int]) -> None:
    atomic_write_json(Path(folder) / SIZES_FILE, dict(sorted(sizes.items())))


def list_shards(spec: str) -> list[str]:
    """Shard paths from a folder (every ``*.tar`` in it) or a brace pattern like ``dir/{00000..00009}.tar``."""
    p = Path(spec)
    if p.is_dir():
        shards = sorted(str(s) for s in p.glob("*.tar"))
        if not shards:
            raise FileNotFoundError(f"no .tar shards in {p}: run `clipline prep` first or point at a shard folder")
        return shards
    shards = list(braceexpand.braceexpand(spec))
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(shards)} shards in {spec!r} do not exist, e.g. {missing[0]}")
    return shards


def dataset_size(shards: list[str]) -> int | None:
    """Total samples from the sizes.json beside the shards, or None where there is none."""
    folders = {str(Path(s).parent) for s in shards}
    sizes: dict[str, int] = {}
    for folder in folders:
        path = Path(folder) / SIZES_FILE
        if not path.is_file():
            return None
        sizes.update({str(Path(folder) / k): v for k, v in json.loads(path.read_text()).items()})
    try:
        return sum(sizes[s] for s in shards)
    except KeyError:
        return None


def iter_tar_samples(path: str, skipped: Counter) -> Iterator[dict[str, bytes]]:
    """Group the members of one tar into samples by key (file name up to the first dot), reading bytes only.

    Nothing is extracted to disk, so member names (absolute, ``..``) can never write outside any folder.
    """
    current_key, sample = None, {}
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name.rsplit("/", 1)[-1]
                key, dot, ext = name.partition(".")
                if not dot or not key:
                    continue
                if key != current_key and sample:
                    yield sample
                    sample = {}
                current_key = key
                f = tar.extractfile(member)
                sample[ext.lower()] = f.read() if f is not None else b""
    except (tarfile.TarError, OSError, EOFError) as e:
        skipped["unreadable_shard"] += 1
        log.warning("skipping the rest of shard %s: %s", path, e)
    if sample:
        yield sample
