"""`clipline export RUN_OR_CHECKPOINT OUT`: a checkpoint's consolidated weights as an open_clip model folder.

OUT gets ``open_clip_config.json`` and ``open_clip_model.safetensors`` under plain open_clip parameter names (plus
a Hugging Face text tower's config and tokenizer files where the checkpoint has them), so
``open_clip.create_model_and_transforms('local-dir:OUT')``, ``clipline eval`` and CLIP_benchmark load it. The source
is a sharded checkpoint (train.parallel=fsdp; its shards are read in this one process, at any world size they were
written with, and the optimizer state is never loaded) or a DDP checkpoint (its weights file is copied).
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import torch

from clipline.checkpoint import SHARDS, is_sharded_checkpoint, resolve_checkpoint
from clipline.errors import UsageError

WEIGHTS = "open_clip_model.safetensors"
TRAINING_ONLY = {"train_state.pt", "config.yaml", "COMPLETE", WEIGHTS, SHARDS}
"""What a checkpoint holds that an open_clip folder does not; every other file (open_clip_config.json, a Hugging
Face tower's config.json and tokenizer files) is copied as it is."""


def weights_from_shards(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model's whole tensors from a DCP checkpoint's shards, read without a process group; the optimizer's
    entries are not read."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(checkpoint / SHARDS))
    entries = reader.read_metadata().state_dict_metadata
    # Under SLIP the sharded module is the model with its SimCLR head (model.model.*, model.head.*).
    prefix = "model.model." if any(k.startswith("model.head.") for k in entries) else "model."
    net_state = {k[len("model."):]: torch.empty(m.size, dtype=m.properties.dtype) for k, m in entries.items()
                 if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    if not net_state:
        raise UsageError(f"{checkpoint / SHARDS} holds no model tensors: not a clipline sharded checkpoint")
    dcp.load({"model": net_state}, storage_reader=reader, no_dist=True)
    inner = prefix[len("model."):]  # "" or SLIP's "model."
    return {k[len(inner):]: v.contiguous() for k, v in net_state.items()}


def export_checkpoint(source: str | Path, out: str | Path) -> Path:
    """Write the open_clip folder of ``source`` (a checkpoint, checkpoints/ or run folder; its newest complete
    checkpoint) to ``out``, atomically: a temp folder renamed into place once whole."""
    from safetensors.torch import load_file, save_file

    from clipline.io import fsync_dir

    checkpoint = resolve_checkpoint(source)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} already exists and is not an empty folder: choose a new output folder")
    if is_sharded_checkpoint(checkpoint):
        weights = weights_from_shards(checkpoint)
    elif (checkpoint / WEIGHTS).is_file():
        weights = load_file(str(checkpoint / WEIGHTS))
    else:
        raise UsageError(f"{checkpoint} has neither shards ({SHARDS}/) nor {WEIGHTS}: nothing to export")
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for item in checkpoint.iterdir():
            if item.name not in TRAINING_ONLY and item.is_file():
                shutil.copy2(item, tmp / item.name)
        save_file(weights, str(tmp / WEIGHTS))
        fsync_dir(tmp)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return checkpoint


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="clipline export", description="Write a checkpoint's consolidated weights as an open_clip model folder "
        "(open_clip_config.json + open_clip_model.safetensors, plain open_clip names), loadable with "
        "open_clip.create_model_and_transforms('local-dir:OUT') and clipline eval. Reads sharded (train.parallel="
        "fsdp) and DDP checkpoints.")
    parser.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                        help="a checkpoint folder (step_NNNNNNNN), a checkpoints/ folder or a training run folder "
                             "(its newest complete checkpoint)")
    parser.add_argument("out", metavar="OUT", help="the folder to write; must not exist or be empty")
    args = parser.parse_args(argv)
    checkpoint = export_checkpoint(args.source, args.out)
    print(f"exported {checkpoint} -> {args.out}")
    return 0
