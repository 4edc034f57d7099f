"""Eval datasets in a bucket (s3://, gs://, https://...): copied into a local mirror under
storage.cache_dir/eval-data/ and evaluated from there, as every layout of eval.datasets reads files at offsets.
The mirror is reused while the remote objects are unchanged (same names, sizes and ETags): a second eval lists the
location and downloads nothing; a changed or new object is downloaded again, a deleted one removed locally.

What is copied: a folder (prefix) whole, without a clipline shard folder's _download/ and _curate/ staging; a
brace pattern's files (or folders); a single file, and for a .csv/.tsv the images it names relative to its folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Callable

from clipline import storage
from clipline.config import EvalDatasetConfig
from clipline.errors import UsageError
from clipline.io import atomic_write_json

log = logging.getLogger(__name__)

LISTING = ".remote_listing.json"
"""In each mirror: {relative name: [size, etag]} of the objects it was copied from, written after the copy."""
STAGING = ("_download", "_curate")
"""Top-level folders of a clipline shard folder that eval never reads."""
PATH_FIELDS = ("path", "train_path", "val_path")
FILE_FIELDS = ("annotation_file", "classnames_file", "templates_file")


def is_remote_dataset(ds: EvalDatasetConfig) -> bool:
    return any(storage.is_remote(getattr(ds, f)) for f in PATH_FIELDS + FILE_FIELDS if getattr(ds, f))


def localize(ds: EvalDatasetConfig, memo: dict | None = None) -> EvalDatasetConfig:
    """``ds`` with every remote location replaced by its local mirror (copied or refreshed now); ``memo``
    (location -> local path) spares a second listing of a location within one suite."""
    memo = {} if memo is None else memo
    what = f"eval dataset {ds.name!r}"
    changes = {}
    for field in PATH_FIELDS + FILE_FIELDS:
        location = getattr(ds, field)
        if not location or not storage.is_remote(location):
            continue
        key = (location, ds.image_field if field in PATH_FIELDS else "")
        if key not in memo:
            memo[key] = (_data(location, ds, what) if field in PATH_FIELDS else
                         str(_files(storage.parent(location), storage.local_cache("eval-data", location),
                                    lambda k, n=storage.name(location): k == n, what) / storage.name(location)))
        changes[field] = memo[key]
    return dataclasses.replace(ds, **changes) if changes else ds


def _data(location: str, ds: EvalDatasetConfig, what: str) -> str:
    local = storage.local_cache("eval-data", location)
    if "{" in location:  # a brace pattern: the named files (or folders) under the prefix before the first brace
        cut = location.rfind("/", 0, location.index("{"))
        prefix, pattern = location[:cut], location[cut + 1:]
        items = [item[cut + 1:].rstrip("/") for item in storage.expand(location)]
        _files(prefix, local, lambda k: any(k == i or k.startswith(i + "/") for i in items), what)
        return str(local / pattern)
    storage.check_reachable(location, f"{what} at")
    if storage.isfile(location):
        name = storage.name(location)
        wanted = {name}
        if name.lower().endswith((".csv", ".tsv")):  # and the images it names relative to its folder
            wanted |= _csv_images(location, ds, what)
        _files(storage.parent(location), local, lambda k: k in wanted, what)
        return str(local / name)
    _files(location, local, lambda k: k.split("/", 1)[0] not in STAGING, what)
    return str(local)


def _csv_images(location: str, ds: EvalDatasetConfig, what: str) -> set[str]:
    from eval.datasets import read_table

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / storage.name(location)
        storage.get_file(location, copy)
        columns, rows = read_table(copy, f"{what} ({storage.redact(location)})")
    if ds.image_field not in columns:
        return set()  # the scan names the missing column
    col = columns.index(ds.image_field)
    return {row[col].strip("/") for row in rows if row[col] and not Path(row[col]).is_absolute()}


def _listing(location: str, what: str) -> dict[str, list]:
    """{relative name: [size, etag]} of every object under ``location``."""
    try:
        fs, path = storage.filesystem(location)
        fs.invalidate_cache()
        root = path.rstrip("/")
        found = fs.find(root, detail=True)
    except storage.StorageError:
        raise
    except Exception as e:  # noqa: BLE001  (each backend has its own error types)
        raise storage.StorageError(f"cannot list {what} at {storage._describe(location, e)}") from None
    out = {}
    for obj, info in found.items():
        if info.get("type") == "directory":
            continue
        rel = obj[len(root):].lstrip("/")
        if rel and not any(part in ("", ".", "..") for part in rel.split("/")):
            out[rel] = [info.get("size"), str(info.get("ETag") or info.get("etag") or info.get("md5Hash") or "")]
    return out


def _files(location: str, local: Path, wanted: Callable[[str], bool], what: str) -> Path:
    """Mirror the objects under ``location`` whose relative names pass ``wanted`` into ``local``."""
    remote = {k: v for k, v in _listing(location, what).items() if wanted(k)}
    if not remote:
        raise UsageError(f"{what}: {storage.redact(location)} holds no files to evaluate (or does not exist); set "
                         f"path to the dataset's folder or file in the bucket")
    stamp = local / LISTING
    try:
        have = json.loads(stamp.read_text()) if stamp.is_file() else {}
    except (OSError, json.JSONDecodeError):
        have = {}
    todo = [k for k, v in remote.items() if have.get(k) != v or not (local / k).is_file()
            or (v[0] is not None and (local / k).stat().st_size != v[0])]
    if todo:
        stamp.unlink(missing_ok=True)  # a mirror interrupted mid-copy is never taken for a complete one
        for k in todo:
            storage.get_file(storage.join(location, *k.split("/")), local / k)
    stale = [p for p in local.rglob("*") if p.is_file() and p != stamp
             and p.relative_to(local).as_posix() not in remote]
    for p in stale:  # objects deleted (or no longer wanted) since the last copy
        p.unlink()
    atomic_write_json(stamp, remote)
    if todo or stale:
        print(f"[eval] {what}: copied {len(todo)} of {len(remote)} files from {storage.redact(location)} to {local}"
              + (f", removed {len(stale)} stale" if stale else ""), file=sys.stderr, flush=True)
    else:
        log.info("%s: local copy of %s is up to date (%d files)", what, storage.redact(location), len(remote))
    return local


# -- results in a bucket ------------------------------------------------------------------------------------------

def results_folder(output_dir: str) -> Path:
    """Where results are written before upload: the output_dir itself, or a local mirror of a bucket one."""
    return storage.local_cache("eval", output_dir) if storage.is_remote(output_dir) else Path(output_dir)


def upload_results(local: Path, output_dir: str, files: list[Path], last: str = "results.json") -> list[str]:
    """Upload the files written this run (not whatever else the mirror holds), ``last`` after the others: a
    reader that finds a new results.json finds the tables and plots of the same run beside it."""
    files = sorted(files, key=lambda p: p.name == last)
    out = []
    for f in files:
        target = storage.join(output_dir, *f.relative_to(local).parts)
        storage.put_file(f, target)
        out.append(str(target))
    return out
