"""The on-disk shard contract between data_prep and its readers (training, eval).

A shard folder holds ``NNNNN.tar`` webdataset shards (``KEY.jpg`` + ``KEY.txt`` + ``KEY.json`` per sample),
``sizes.json`` (shard file name -> sample count, as open_clip's trainer reads it) and ``manifest.json``
(:class:`ShardManifest`: shards, counts, totals and the config that built them).
"""

from __future__ import annotations

import json
import logging
import re
import tarfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from clipline import storage
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
    checksums: dict[str, dict] = field(default_factory=dict)
    """Shard -> {"bytes": file size, "sha256": hex digest}; `clipline prep --verify FOLDER` checks them."""

    def write(self, folder: str | Path) -> None:
        """Into a local folder or a bucket prefix, atomically (temp file + rename, or one whole-object put)."""
        _write_json(storage.join(folder, MANIFEST_FILE), asdict(self))

    @classmethod
    def read(cls, folder: str | Path) -> "ShardManifest":
        manifest = cls(**json.loads(storage.read_text(storage.join(folder, MANIFEST_FILE))))
        for shard in manifest.shards:  # data never gets to run a shell command
            storage.check_not_pipe(shard, f"{storage.redact(folder)}/{MANIFEST_FILE}")
        return manifest


def _write_json(location: str | Path, obj) -> None:
    if storage.is_remote(location):
        storage.write_text(location, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    else:
        atomic_write_json(location, obj)


def write_sizes(folder: str | Path, sizes: dict[str, int]) -> None:
    _write_json(storage.join(folder, SIZES_FILE), dict(sorted(sizes.items())))


def list_shards(spec: str) -> list[str]:
    """Shard locations from a folder (every ``*.tar`` in it), a brace pattern like ``dir/{00000..00009}.tar``, or a
    brace pattern of folders like ``shards/part-{0..7}`` (the output of a prep job array). Any of them may be a
    URL (``s3://bucket/laion/{00000..09999}.tar``, a bucket prefix, https://...) or a ``pipe:CMD`` spec, which is
    taken as written (it runs a shell command: accept it only from the user's own config)."""
    if storage.is_pipe(spec):
        return list(storage.expand(spec))
    expanded = storage.expand(spec)
    if any(storage.is_remote(item) for item in expanded):
        return _list_remote_shards(spec, expanded)
    shards: list[str] = []
    missing: list[str] = []
    for item in expanded:
        p = storage.local_path(item)
        if p.is_dir():
            found = sorted(str(s) for s in p.glob("*.tar"))
            if not found:
                raise FileNotFoundError(f"no .tar shards in {p}: run `clipline prep` first or point at a shard "
                                        f"folder")
            shards += found
        elif p.is_file():
            shards.append(str(p))
        else:
            missing.append(item)
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(expanded)} shard paths in {spec!r} do not exist, e.g. "
                                f"{missing[0]}")
    return shards


def _list_remote_shards(spec: str, expanded: list[str]) -> list[str]:
    """Remote shards: a pattern of .tar names is trusted as is (listing 40,000 objects one by one would take
    minutes; a missing one is skipped and counted when read); anything else is a prefix, listed."""
    first = expanded[0]
    # A web server may not list folders: check the first shard itself there, the bucket prefix elsewhere.
    web = storage.protocol(first) in ("http", "https")
    storage.check_reachable(first if web or not first.endswith(_SHARD_SUFFIXES) else storage.parent(first),
                            "shards at")
    if all(item.endswith(_SHARD_SUFFIXES) for item in expanded):
        if not web and not storage.exists(first):
            raise FileNotFoundError(f"shard {storage.redact(first)} (the first of {storage.redact(spec)!r}) does not "
                                    f"exist: check the bucket, the prefix and the brace pattern")
        return expanded
    shards = []
    for item in expanded:
        found = storage.glob_suffix(item, _SHARD_SUFFIXES)
        if not found:
            raise FileNotFoundError(f"no .tar shards under {storage.redact(item)}: run `clipline prep` first or point "
                                    f"at a shard folder")
        shards += found
    return shards


_SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def dataset_size(shards: list[str]) -> int | None:
    """Total samples from the sizes.json beside the shards (local or remote), or None where there is none."""
    if any(storage.is_pipe(s) for s in shards):
        return None
    folders = {str(storage.parent(s)) for s in shards}
    sizes: dict[str, int] = {}
    for folder in folders:
        path = storage.join(folder, SIZES_FILE)
        try:
            if not storage.is_remote(folder) and not Path(path).is_file():
                return None
            counts = json.loads(storage.read_text(path))
        except (OSError, ValueError) as e:
            if storage.is_remote(folder):
                log.info("no readable %s: %s", storage.redact(path), storage.scrub(str(e)))
            return None
        sizes.update({str(storage.join(folder, k)): v for k, v in counts.items()})
    try:
        return sum(sizes[str(storage.join(storage.parent(s), storage.name(s)))] for s in shards)
    except KeyError:
        return None


class TarFormatError(ValueError):
    """A tar shard that is truncated or corrupt."""


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes over 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax_path(data: bytes) -> str | None:
    # Records are "LENGTH key=value\n"; only the path matters here.
    pos, path = 0, None
    while pos < len(data):
        length = int(data[pos:data.index(b" ", pos)])
        key, _, value = data[data.index(b" ", pos) + 1:pos + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8", "replace")
        pos += length
    return path


def unsafe_member_name(name: str) -> bool:
    """An absolute name or one with a '..' component: a tar member that could point outside any folder."""
    return name.startswith(("/", "\\")) or (".." in name and ".." in re.split(r"[/\\]", name))


_LINK_KINDS, _SPECIAL_KINDS = (b"1", b"2"), (b"3", b"4", b"6")


def iter_tar_members(f, skipped: Counter | None = None) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file in an uncompressed tar stream, checksums verified. Hard and symbolic
    links and device or fifo members are never followed; ``skipped`` counts them.

    A small reader of our own: the shards are plain ustar/pax tars, and parsing the headers directly is several
    times faster than the tarfile module, which was the largest cost of the input pipeline.
    """
    long_name = None
    while True:
        header = f.read(512)
        if len(header) == 0 or header == bytes(512):
            return
        if len(header) < 512:
            raise TarFormatError("truncated tar header")
        if _octal(header[148:156]) != sum(header[:148]) + 256 + sum(header[156:]):
            raise TarFormatError("tar header checksum mismatch")
        size, kind = _octal(header[124:136]), header[156:157]
        data = f.read(size)
        if len(data) < size:
            raise TarFormatError("truncated tar member")
        f.read(-size % 512)
        if kind in (b"x", b"L"):
            long_name = _pax_path(data) if kind == b"x" else data.rstrip(b"\0").decode("utf-8", "replace")
            continue
        if kind in (b"0", b"\0", b"7"):
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            if header[257:262] == b"ustar" and header[345:346] != b"\0":
                name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
            yield long_name or name, data
        elif skipped is not None and kind in _LINK_KINDS + _SPECIAL_KINDS:
            skipped["link_member" if kind in _LINK_KINDS else "special_member"] += 1
        long_name = None


def _members(path: str, skipped: Counter) -> Iterator[tuple[str, bytes]]:
    if path.endswith((".tar.gz", ".tgz", ".tar.xz", ".tar.bz2")):  # compressed shards: the slower general reader
        with storage.open_read(path) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for member in tar:
                f = tar.extractfile(member) if member.isfile() else None
                if f is not None:
                    yield member.name, f.read()
                elif member.issym() or member.islnk():
                    skipped["link_member"] += 1
                elif member.isdev() or member.isfifo():
                    skipped["special_member"] += 1
        return
    with storage.open_read(path) as f:  # a local file, a remote object (retried, resumed) or a pipe: command
        yield from iter_tar_members(f, skipped)


def iter_keyed_samples(path: str, skipped: Counter) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of one tar, grouping files by key (name up to the first dot).

    Nothing is extracted to disk; members with an absolute or ``..`` name, links and devices are skipped and
    counted, so no name that points outside a folder reaches a writer. A shard that is truncated or corrupt yields
    the samples before the damage, and is counted in ``skipped``.
    """
    current_key, sample = None, {}
    try:
        for member_name, data in _members(path, skipped):
            if unsafe_member_name(member_name):
                skipped["unsafe_member_name"] += 1
                log.warning("skipping tar member %r of %s: an absolute or '..' name", member_name, path)
                continue
            name = member_name.rsplit("/", 1)[-1]
            key, dot, ext = name.partition(".")
            if not dot or not key:
                continue
            if key != current_key and sample:
                yield current_key, sample
                sample = {}
            current_key = key
            sample[ext.lower()] = data
    except (TarFormatError, tarfile.TarError, OSError, EOFError, ValueError) as e:
        skipped["unreadable_shard"] += 1
        log.warning("skipping the rest of shard %s: %s", storage.redact(path), storage.scrub(str(e)))
        sample = {}  # the sample being read when the damage was found may be missing files
    if sample:
        yield current_key, sample


def iter_tar_samples(path: str, skipped: Counter) -> Iterator[dict[str, bytes]]:
    """The samples of one tar as {extension: bytes}, in file order (see iter_keyed_samples)."""
    for _, sample in iter_keyed_samples(path, skipped):
        yield sample
