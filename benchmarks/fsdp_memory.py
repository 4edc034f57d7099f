"""Parameter + gradient + AdamW-state bytes each rank holds under DDP and FSDP (train.parallel), measured.

    python benchmarks/fsdp_memory.py                          # ViT-B-16, world sizes 1 2 4, ddp and fsdp
    python benchmarks/fsdp_memory.py --worlds 1 2 --model ViT-B-32

For each (parallel, world size) it spawns that many CPU ranks (gloo), builds the open_clip architecture with random
weights (no download), wraps it as the trainer does (DDP, or clipline.fsdp.shard_model), runs one forward, backward
and AdamW step on a batch of one sample per rank, then counts on rank 0 the bytes of the storage behind every
parameter, gradient and optimizer-state tensor this rank holds (each storage once; a DTensor counts its local
shard, padding included). Not counted: activations, and DDP's gradient buckets (one more gradient-sized buffer per
rank under DDP). Writes benchmarks/results/fsdp_memory.json and prints a table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import REPO, machine, write_result  # noqa: E402


def storage_bytes(tensors, seen: set) -> int:
    """Bytes of the storages behind ``tensors`` not counted yet (a DTensor: its local shard's storage)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if isinstance(t, DTensor) else t
        storage = local.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def _worker(rank: int, world: int, init_file: str, model_name: str, parallel: str, out: dict) -> None:
    import open_clip

    from clipline import fsdp
    from training.loss import contrastive_loss

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = open_clip.create_model(model_name, output_dict=True)
        if parallel == "fsdp":
            net = fsdp.shard_model(model, "fp32", log=lambda *a: None)
        else:
            net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        size = model.visual.image_size
        size = size if isinstance(size, (list, tuple)) else (size, size)
        images = torch.randn(1, 3, *size)
        texts = torch.randint(0, 1000, (1, model.context_length))
        output = net(image=images, text=texts)
        loss = contrastive_loss(output["image_features"], output["text_features"], model.logit_scale)
        loss.backward()
        if parallel == "fsdp":
            fsdp.average_replicated_grads(model, world)
        optimizer.step()
        seen: set = set()
        params = list(model.parameters())
        row = {"params": storage_bytes(params, seen), "grads": storage_bytes([p.grad for p in params], seen),
               "optimizer": storage_bytes([v for s in optimizer.state.values() for v in s.values()
                                           if isinstance(v, torch.Tensor)], seen),
               "n_params": sum(p.numel() for p in open_clip.create_model(model_name).parameters())
               if rank == 0 else 0}
        gathered = [None] * world
        dist.all_gather_object(gathered, row)
        if rank == 0:
            out["rows"] = gathered
    finally:
        dist.destroy_process_group()


def measure(model_name: str, parallel: str, world: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = mp.Manager().dict()
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), model_name, parallel, out), nprocs=world,
                 join=True)
        rows = out["rows"]
    per_rank = [r["params"] + r["grads"] + r["optimizer"] for r in rows]
    return {"parallel": parallel, "world_size": world, "n_params": rows[0]["n_params"],
            "rank0": {k: rows[0][k] for k in ("params", "grads", "optimizer")},
            "total_bytes_per_rank": per_rank, "max_bytes_per_rank": max(per_rank)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ViT-B-16", help="open_clip architecture (random init)")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--parallel", nargs="+", default=["ddp", "fsdp"], choices=["ddp", "fsdp"])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "fsdp_memory.json"))
    args = parser.parse_args()
    rows = [measure(args.model, parallel, world) for parallel in args.parallel for world in args.worlds]
    mib = 2 ** 20
    print(f"{args.model} ({rows[0]['n_params'] / 1e6:.1f} M parameters), fp32, AdamW, after one step; MiB per rank")
    print(f"{'parallel':<9}{'world':>6}{'params':>10}{'grads':>10}{'optimizer':>11}{'total':>10}{'vs ddp@1':>10}")
    base = next((r["max_bytes_per_rank"] for r in rows if r["parallel"] == "ddp" and r["world_size"] == 1), None)
    for r in rows:
        c = r["rank0"]
        ratio = f"{r['max_bytes_per_rank'] / base:.3f}" if base else "-"
        print(f"{r['parallel']:<9}{r['world_size']:>6}{c['params'] / mib:>10.1f}{c['grads'] / mib:>10.1f}"
              f"{c['optimizer'] / mib:>11.1f}{r['max_bytes_per_rank'] / mib:>10.1f}{ratio:>10}")
    path = write_result(args.out, {"benchmark": "fsdp_memory", "model": args.model, "machine": machine(),
                                   "command": "python benchmarks/fsdp_memory.py " + " ".join(sys.argv[1:]),
                                   "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
