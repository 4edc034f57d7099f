"""Step checkpoint folders: written atomically, counted only with their completion marker.

Layout of one checkpoint (it is also a valid open_clip ``local-dir:`` model folder)::

    checkpoints/step_00000200/
        open_clip_config.json        model_cfg + preprocess_cfg
        open_clip_model.safetensors  model weights, plain open_clip parameter names
        train_state.pt               optimizer, scaler, counters, RNG and data position (weights_only-loadable)
        config.yaml                  the resolved run config
        COMPLETE                     written last; a folder without it is ignored
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Callable

from clipline import storage
from clipline.errors import UsageError
from clipline.io import fsync_dir

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(root: str | Path, step: int, writers: dict[str, Callable[[Path], None]]) -> Path | str:
    """Write every file into a hidden temp folder, mark it complete, then rename it into place. A remote ``root``
    (s3://...): the folder is written in a local staging folder (storage.cache_dir), then uploaded file by file with
    the marker last, so an upload cut short leaves a folder without it, which never counts."""
    if storage.is_remote(root):
        return _upload_checkpoint(root, step, writers)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, write in writers.items():
            write(tmp / name)
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())
        (tmp / MARKER).write_text(f"{step}\n")
        fsync_dir(tmp)
        _move_into_place(tmp, final)
    except BaseException as e:
        full = isinstance(e, Exception) and _out_of_space(e, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise DiskFullError(_disk_full_message(root, step)) from e
        raise
    return final


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename a complete temp folder to its step folder; the same step saved again (e.g. after a resume) replaces
    the old folder whole."""
    if final.exists():
        stale = final.parent / f".stale-{final.name}-{os.getpid()}"
        os.replace(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(final.parent)


class DiskFullError(UsageError):
    """A checkpoint could not be written because its filesystem is full; the previous checkpoints are intact."""


_LOW_SPACE = 1 << 20


def _out_of_space(error: Exception, folder: Path) -> bool:
    # torch.save reports a full disk only as "[enforce fail at inline_container.cc] unexpected pos ...", so the
    # free space left at the moment of failure decides when the error carries no errno.
    if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(error):
        return True
    try:
        return shutil.disk_usage(folder).free < _LOW_SPACE
    except OSError:
        return False


def _disk_full_message(root: Path, step: int) -> str:
    usage = shutil.disk_usage(root)
    latest = latest_checkpoint(root)
    kept = (f"the previous checkpoint {latest} is intact; once there is room, the same command resumes from it"
            if latest is not None else "no earlier checkpoint exists, so a rerun starts from step 0")
    return (f"no space left on the device holding {root} (ENOSPC) while writing the checkpoint of step {step} "
            f"({usage.free / 2**20:.0f} MiB free of {usage.total / 2**20:.0f} MiB once its partial files were "
            f"removed): free space there or point train.output_dir at a disk with room; {kept}")


def _upload_checkpoint(root: str, step: int, writers: dict[str, Callable[[Path], None]]) -> str:
    staging = storage.local_cache("staging", root)
    local = save_checkpoint(staging, step, writers)
    final = str(storage.join(root, step_dir_name(step)))
    try:
        storage.remove(final)  # the same step saved again (e.g. after a resume): its old marker must go first
        storage.put_folder(local, final, last=(MARKER,))
    finally:
        shutil.rmtree(local, ignore_errors=True)
    return final


def list_checkpoints(root: str | Path) -> list[tuple[int, Path | str]]:
    """Complete checkpoints under ``root`` (a folder or a bucket prefix), oldest step first (by step number,
    never by file time)."""
    if storage.is_remote(root):
        found = []
        for child in storage.listdir(root):
            m = _STEP_DIR.match(storage.name(child))
            if m and storage.exists(storage.join(child, MARKER)):
                found.append((int(m.group(1)), child))
        return sorted(found)
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and (child / MARKER).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | str | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def prune_checkpoints(root: str | Path, keep_last: int) -> list[Path | str]:
    found = list_checkpoints(root)
    removed = [path for _, path in found[:-keep_last]] if keep_last > 0 else []
    for path in removed:
        storage.remove(path)
    if storage.is_remote(root):
        # Uploads cut short (no marker) older than the newest complete checkpoint will never complete.
        newest = found[-1][0] if found else -1
        for child in storage.listdir(root):
            m = _STEP_DIR.match(storage.name(child))
            if m and int(m.group(1)) < newest and not storage.exists(storage.join(child, MARKER)):
                storage.remove(child)
        return removed
    # Temp folders left by a process killed mid-write are garbage once a newer checkpoint exists.
    for child in Path(root).glob(".tmp-step_*"):
        shutil.rmtree(child, ignore_errors=True)
    return removed


def resolve_checkpoint(path: str | Path) -> Path | str:
    """Accept a checkpoint folder, a ``checkpoints/`` folder, or a training run folder; return one checkpoint
    (a location of the same kind: a remote one stays remote, see :func:`fetch_checkpoint`)."""
    if storage.is_remote(path):
        return _resolve_remote(str(path))
    p = Path(path)
    if p.is_file():
        raise UsageError(_file_is_no_checkpoint(p))
    if (p / MARKER).is_file():
        return p
    for candidate in (p / "checkpoints", p):
        latest = latest_checkpoint(candidate)
        if latest is not None:
            return latest
    if _STEP_DIR.match(p.name) and p.is_dir():
        raise FileNotFoundError(f"checkpoint {p} is incomplete (no {MARKER} marker): it was interrupted while "
                                f"being written; use an earlier step")
    raise FileNotFoundError(f"no complete checkpoint found at {p}: pass a checkpoint folder (step_NNNNNNNN) or a "
                            f"training run folder that has checkpoints/")


def _resolve_remote(path: str) -> str:
    storage.check_reachable(storage.parent(path) if _STEP_DIR.match(storage.name(path)) else path, "checkpoint at")
    if storage.exists(storage.join(path, MARKER)):
        return path
    for candidate in (storage.join(path, "checkpoints"), path):
        latest = latest_checkpoint(candidate)
        if latest is not None:
            return str(latest)
    if _STEP_DIR.match(storage.name(path)) and storage.listdir(path):
        raise FileNotFoundError(f"checkpoint {storage.redact(path)} is incomplete (no {MARKER} marker): its upload "
                                f"was interrupted; use an earlier step")
    raise FileNotFoundError(f"no complete checkpoint found at {storage.redact(path)}: pass a checkpoint folder "
                            f"(step_NNNNNNNN) or a training run folder that has checkpoints/")


def fetch_checkpoint(path: str | Path) -> Path:
    """A local folder holding checkpoint ``path``: itself when local; for a remote one, a copy downloaded into
    storage.cache_dir/checkpoints (reused when already complete there), the marker last."""
    if not storage.is_remote(path):
        return Path(path)
    local = storage.local_cache("checkpoints", path)
    if (local / MARKER).is_file():
        return local
    shutil.rmtree(local, ignore_errors=True)
    tmp = local.with_name(f".tmp-{local.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    storage.get_folder(path, tmp)
    if not (tmp / MARKER).is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        raise FileNotFoundError(f"checkpoint {storage.redact(path)} has no {MARKER} marker: it is incomplete")
    os.replace(tmp, local)
    return local


def _file_is_no_checkpoint(path: Path) -> str:
    problem = weights_file_problem(path)
    if problem:
        return f"cannot resume from {path}: it is a file, and truncated or corrupt ({problem})"
    saved = None
    if path.suffix in (".pt", ".pth"):
        try:  # mmap: only the keys are needed, not gigabytes of optimizer state
            import torch

            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001  (any file torch cannot read is simply not an open_clip checkpoint)
            saved = None
    if isinstance(saved, dict) and "state_dict" in saved and ("epoch" in saved or "optimizer" in saved):
        name = saved.get("name", "")
        return (f"cannot resume from {path}: it is an open_clip_train checkpoint (epoch {saved.get('epoch', '?')}"
                f"{', ' + name if name else ''}), and an open_clip run cannot be resumed exactly (it stores no data "
                f"position); to start from its weights, set model.pretrained={path}"
                f"{f' (with model.name={name})' if name else ''} and leave train.resume at auto")
    return (f"cannot resume from {path}: it is a file; resume takes a clipline checkpoint folder (step_NNNNNNNN) or a "
            f"training run folder; to start from a weights file, set model.pretrained={path}")


WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def weights_file_problem(path: str | Path) -> str | None:
    """Why a weights file cannot be whole (cut short, or not a weights file at all), found from its header and
    size without loading it; None when it looks whole. Checks safetensors files and torch.save's zip format;
    legacy pickle files cannot be checked this cheaply."""
    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        if p.suffix == ".safetensors":
            if len(head) < 8:
                return f"{size} bytes, shorter than a safetensors header"
            n = int.from_bytes(head, "little")
            if 8 + n > size:
                return f"its header announces {n} bytes of metadata, the file has {size} bytes"
            try:
                meta = json.loads(f.read(n))
                end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
            except (ValueError, KeyError, TypeError, AttributeError, IndexError):
                return "its safetensors header is not valid"
            if 8 + n + end > size:
                return f"{size} bytes where its header describes {8 + n + end}"
            return None
    if head.startswith(b"PK"):  # torch.save's zip: cut short, it loses the central directory at its end
        try:
            with zipfile.ZipFile(p):
                return None
        except (zipfile.BadZipFile, OSError) as e:
            return f"a zip archive (torch.save's format) that cannot be opened: {e}"
    if not head:
        return "the file is empty"
    if p.suffix in (".pt", ".pth", ".bin") and not head.startswith(b"\x80"):  # nor a pickle either
        return f"neither torch.save's zip nor pickle format (it starts with {head[:8]!r})"
    return None


def check_weights_file(path: str | Path, what: str = "weights file") -> None:
    """Raise a UsageError naming ``path`` when it is truncated or corrupt (see weights_file_problem)."""
    problem = weights_file_problem(path)
    if problem:
        raise UsageError(f"{what} {path} is truncated or corrupt ({problem}); copy or download it again")


SHARDS = "sharded"
"""The torch.distributed.checkpoint folder inside a checkpoint written under train.parallel=fsdp: model and
optimizer state, one file per rank plus DCP's .metadata, which resharding reads to load at another world size."""


def save_sharded_checkpoint(root: str | Path, step: int, state: dict, writers: dict[str, Callable[[Path], None]],
                            rank: int) -> Path:
    """A checkpoint whose model and optimizer ``state`` (DTensors) every rank writes its own shards of.

    Collective: every rank calls it. All ranks write their shards (torch.distributed.checkpoint) into one hidden
    temp folder, which returns once every shard and DCP's metadata are on disk; then rank 0 writes ``writers``
    (the rank-independent files), fsyncs, writes the COMPLETE marker last and renames the folder into place.
    A process killed anywhere before the rename leaves only a temp folder, which resume ignores."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-sharded"  # one name for every rank: the pid differs per rank
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    try:
        dcp.save(state, checkpoint_id=str(tmp / SHARDS))
        dist.barrier()
        if rank == 0:
            for dirpath, _, files in os.walk(tmp / SHARDS):
                for name in files:
                    with open(Path(dirpath) / name, "rb+") as f:
                        os.fsync(f.fileno())
            for name, write in writers.items():
                write(tmp / name)
                with open(tmp / name, "rb+") as f:
                    os.fsync(f.fileno())
            (tmp / MARKER).write_text(f"{step}\n")
            fsync_dir(tmp / SHARDS)
            fsync_dir(tmp)
            _move_into_place(tmp, final)
    except BaseException as e:
        full = rank == 0 and isinstance(e, Exception) and _out_of_space(e, tmp)
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise DiskFullError(_disk_full_message(root, step)) from e
        raise
    dist.barrier()
    return final


def is_sharded_checkpoint(path: str | Path) -> bool:
    return (Path(path) / SHARDS / ".metadata").is_file()
