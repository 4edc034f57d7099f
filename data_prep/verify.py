"""`clipline prep --verify FOLDER`: check a built shard folder against its manifest.json.

Every shard the manifest lists must exist with the byte size and sha256 recorded when it was written. Files are
read through one function, ``open_file(location) -> binary file``: a local file, or for a bucket prefix
``clipline.storage.open_read`` (streamed with retries, never downloaded whole), so a folder in a bucket is checked
where it lies.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import IO, Callable

from clipline.shards import MANIFEST_FILE

_BLOCK = 1 << 20

OpenFile = Callable[[str], IO[bytes]]


def open_local(location: str) -> IO[bytes]:
    return open(location, "rb")


def _join(folder: str, name: str) -> str:
    return f"{folder.rstrip('/')}/{name}"


@dataclass
class Verification:
    folder: str
    problems: list[str] = field(default_factory=list)
    """One line per problem: what is wrong with which file."""
    shards: int = 0
    samples: int = 0
    bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.ok:
            return (f"{self.folder}: {self.shards} shards, {self.samples} samples, {self.bytes} bytes: every shard "
                    f"matches {MANIFEST_FILE} (size and sha256)")
        return f"{self.folder}: {len(self.problems)} problem(s) against {MANIFEST_FILE}"


def _digest(stream: IO[bytes]) -> tuple[int, str]:
    h, n = hashlib.sha256(), 0
    while block := stream.read(_BLOCK):
        h.update(block)
        n += len(block)
    return n, h.hexdigest()


def verify_folder(folder: str, open_file: OpenFile = open_local) -> Verification:
    """Check every shard ``folder``'s manifest lists: present, same byte size, same sha256."""
    result = Verification(folder)
    try:
        with open_file(_join(folder, MANIFEST_FILE)) as f:
            manifest = json.loads(f.read())
    except FileNotFoundError:
        result.problems.append(f"no {MANIFEST_FILE} in {folder}: not a folder built by `clipline prep` (or the "
                               f"build did not finish)")
        return result
    except (OSError, ValueError) as e:
        result.problems.append(f"{MANIFEST_FILE} in {folder} cannot be read: {type(e).__name__}: {e}")
        return result
    checksums = manifest.get("checksums") or {}
    shards = manifest.get("shards") or []
    unchecked = [s for s in shards if s not in checksums]
    if unchecked:
        result.problems.append(f"{MANIFEST_FILE} has no checksum for {len(unchecked)} shard(s) (e.g. {unchecked[0]}): "
                               f"it was written before checksums were recorded; rebuild with prep.mode=overwrite")
    sizes = manifest.get("sizes") or {}
    for name in shards:
        if name not in checksums:
            continue
        expected = checksums[name]
        try:
            with open_file(_join(folder, name)) as f:
                size, digest = _digest(f)
        except FileNotFoundError:
            result.problems.append(f"{name}: missing (the manifest lists it)")
            continue
        except OSError as e:
            result.problems.append(f"{name}: cannot be read: {type(e).__name__}: {e}")
            continue
        if size != expected["bytes"]:
            result.problems.append(f"{name}: {size} bytes, the manifest says {expected['bytes']} (truncated or "
                                   f"replaced)")
        elif digest != expected["sha256"]:
            result.problems.append(f"{name}: sha256 {digest[:16]}... differs from the manifest's "
                                   f"{expected['sha256'][:16]}... (same size, other bytes: corrupted)")
        else:
            result.shards += 1
            result.samples += int(sizes.get(name, 0))
            result.bytes += size
    return result


def main(args: list[str], open_file: OpenFile | None = None) -> int:
    """``clipline prep --verify FOLDER [CONFIG.yaml ...] [storage.key=value ...]``: one line per problem and exit
    1, or a summary and exit 0. FOLDER may be a bucket prefix (s3://..., gs://...); the config's storage section
    (endpoint, profile, options) reaches it, else each library's environment (AWS_*)."""
    from clipline import storage
    from clipline.errors import UsageError

    if not args or args[0].startswith("-") or "=" in args[0]:
        raise UsageError("usage: clipline prep --verify FOLDER [CONFIG.yaml ...] [storage.key=value ...] (a folder "
                         "or bucket prefix written by `clipline prep`)")
    folder, rest = args[0], args[1:]
    if rest:
        from clipline.cli import split_args
        from clipline.config import load_config

        storage.configure(load_config(*split_args("prep", rest)).storage)
    if open_file is None:
        open_file = storage.open_read if storage.is_remote(folder) else open_local
    if storage.is_remote(folder):
        storage.check_reachable(folder, "the shard folder")
    result = verify_folder(folder, open_file)
    for line in result.problems:
        print(storage.scrub(line), flush=True)
    print(storage.scrub(result.summary()), flush=True)
    return 0 if result.ok else 1
