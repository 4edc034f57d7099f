"""`clipline prep` into a bucket (``prep.output_dir=s3://...``, gs://, ...).

The build runs in a local staging folder, ``storage.cache_dir/prep/<the output location>``, exactly as a local
build does (img2dataset's incremental download, the filters, re-sharding, checksums, report), and its results are
published to the bucket:

- each download shard img2dataset finishes is mirrored to ``{output_dir}/_download/`` as it finishes, its
  ``NNNNN_stats.json`` (img2dataset's "done" marker) last; a build resumed on a machine that lost the staging
  folder first copies the finished download shards back from there, so no finished shard is downloaded twice and
  none is half-kept (a shard counts only with its stats object, which is put after its tar and parquet);
- at the end the shards, ``sizes.json``, ``stats.json``, ``report.md`` and its plots are put one object each (an
  S3 PUT is all or nothing), and ``manifest.json`` last: a bucket folder with a manifest is complete. The old
  manifest is deleted before the first changed shard is put, so it never vouches for other bytes.

img2dataset could write to the bucket itself (its writer opens ``output_folder`` through fsspec), but only with
the storage options of each library's environment, never the config's ``storage:`` section, and the filters and
the exactly-once resume read its shards as local files while it writes them.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

from clipline import storage
from clipline.shards import MANIFEST_FILE, ShardManifest

DOWNLOAD_DIR = "_download"
FETCH_NOTES_DIR = "fetch_notes"
PHASH_DIR = "_phash"
"""Beside img2dataset's shards in prep's download folder: ``_phash/NNNNN.json``, the pHash of every image of shard
NNNNN (key -> 16 hex digits), computed by the download processes while the image's bytes are at hand
(data_prep.downloader.PhashingWriter), so that the filter pass does not decode each image again
(data_prep.reshard.phash_file names the file)."""
BUILD_FILES = ("[0-9]*.tar", "sizes.json", "stats.json", "report.md", "report_*.png")
"""Top-level objects of a build in the bucket (besides manifest.json and _download/)."""
_NOT_PUBLISHED = ("_*", ".*", "*.tmp", "demo_source.sha256")
"""Staging-folder names that stay local: scratch (``_download`` is mirrored on its own), lock and temp files."""


def is_remote(output_dir: str) -> bool:
    return storage.is_remote(output_dir)


def staging_folder(output_dir: str) -> Path:
    """The local folder a build into ``output_dir`` runs in: the folder itself, or for a bucket its staging cache."""
    if not storage.is_remote(output_dir):
        return Path(output_dir)
    return storage.local_cache("prep", output_dir)


def check_writable(output_dir: str) -> None:
    """A wrong bucket, endpoint or credentials fail before the list is read or anything downloads."""
    storage.check_reachable(storage.root_of(output_dir), "prep.output_dir")


# -- the download mirror ----------------------------------------------------------------------------------------

def mirror_download(work: Path, output_dir: str, shard_id: int) -> None:
    """Put one finished download shard into ``{output_dir}/_download``, its stats object last."""
    remote = storage.join(output_dir, DOWNLOAD_DIR)
    name = f"{shard_id:05d}"
    for f in (work / f"{name}.tar", work / f"{name}.parquet", work / FETCH_NOTES_DIR / f"{name}.json",
              work / PHASH_DIR / f"{name}.json"):
        if f.is_file():
            storage.put_file(f, storage.join(remote, *f.relative_to(work).parts))
    storage.put_file(work / f"{name}_stats.json", storage.join(remote, f"{name}_stats.json"))


def mirror_file(local: Path, output_dir: str) -> None:
    storage.put_file(local, storage.join(output_dir, DOWNLOAD_DIR, local.name))


def restore_downloads(output_dir: str, work: Path, names: tuple[str, ...]) -> int:
    """Copy the download shards finished in the bucket but not in ``work`` back into it (stats last), and the
    files ``names`` (the list fingerprint) where ``work`` lacks them; returns the number of shards restored."""
    remote = storage.join(output_dir, DOWNLOAD_DIR)
    entries = {storage.name(e) for e in storage.listdir(remote)}
    for n in names:
        if n in entries and not (work / n).is_file():
            storage.get_file(storage.join(remote, n), work / n)
    side = {folder: {storage.name(e) for e in storage.listdir(storage.join(remote, folder))}
            for folder in (FETCH_NOTES_DIR, PHASH_DIR)}
    restored = 0
    for stats in sorted(e for e in entries if fnmatch.fnmatch(e, "[0-9]*_stats.json")):
        name = stats.split("_", 1)[0]
        if (work / stats).is_file():
            continue
        for part in (f"{name}.tar", f"{name}.parquet"):
            if part in entries:
                storage.get_file(storage.join(remote, part), work / part)
        for folder, names_there in side.items():
            if f"{name}.json" in names_there:
                storage.get_file(storage.join(remote, folder, f"{name}.json"), work / folder / f"{name}.json")
        storage.get_file(storage.join(remote, stats), work / stats)
        restored += 1
    return restored


def drop_downloaded_tars(output_dir: str) -> None:
    """prep.keep_downloads=false: the unfiltered tars go from the bucket too (their stats and parquet stay)."""
    for e in storage.listdir(storage.join(output_dir, DOWNLOAD_DIR)):
        if fnmatch.fnmatch(storage.name(e), "[0-9]*.tar"):
            storage.remove(e)


# -- the build's results ----------------------------------------------------------------------------------------

def clear(output_dir: str) -> None:
    """prep.mode=overwrite: delete what `clipline prep` writes under ``output_dir`` (manifest first), nothing else."""
    storage.remove(storage.join(output_dir, MANIFEST_FILE))
    storage.remove(storage.join(output_dir, DOWNLOAD_DIR))
    for e in storage.listdir(output_dir):
        if any(fnmatch.fnmatch(storage.name(e), p) for p in BUILD_FILES):
            storage.remove(e)


def up_to_date(output_dir: str, build_key: str) -> ShardManifest | None:
    """The bucket's manifest when it is of this build (same list and settings) and lists only shards there."""
    try:
        manifest = ShardManifest.read(output_dir)
    except (OSError, ValueError, TypeError):
        return None
    if manifest.stats.get("build_key") != build_key:
        return None
    there = {storage.name(e) for e in storage.listdir(output_dir)}
    return manifest if all(s in there for s in manifest.shards) else None


def publish(out: Path, output_dir: str) -> int:
    """Put the staged build ``out`` into ``output_dir``, manifest.json last; returns the objects put (0 when the
    bucket already holds this very manifest and its shards)."""
    manifest = (out / MANIFEST_FILE).read_bytes()
    try:
        same = storage.read_bytes(storage.join(output_dir, MANIFEST_FILE)) == manifest
    except FileNotFoundError:
        same = False
    shards = json.loads(manifest)["shards"]
    there = {storage.name(e) for e in storage.listdir(output_dir)}
    if same and all(s in there for s in shards):
        return 0
    storage.remove(storage.join(output_dir, MANIFEST_FILE))  # from here the bucket's shards change
    files = sorted(p for p in out.iterdir() if p.is_file() and p.name != MANIFEST_FILE
                   and not any(fnmatch.fnmatch(p.name, pat) for pat in _NOT_PUBLISHED))
    for f in files:
        storage.put_file(f, storage.join(output_dir, f.name))
    stale = [n for n in there if fnmatch.fnmatch(n, "[0-9]*.tar") and n not in shards]
    for n in stale:  # an earlier build's extra shards, which a prefix listing would otherwise train on
        storage.remove(storage.join(output_dir, n))
    storage.put_file(out / MANIFEST_FILE, storage.join(output_dir, MANIFEST_FILE))
    return len(files) + 1
