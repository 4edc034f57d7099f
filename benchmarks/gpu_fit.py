"""The largest model and per-GPU batch that fit under DDP and FSDP, with and without activation checkpointing, and
the training samples/s of each (GPU only).

    torchrun --nproc_per_node 8 benchmarks/gpu_fit.py                     # all GPUs of one machine
    torchrun --nproc_per_node 1 benchmarks/gpu_fit.py --models ViT-L-14   # one GPU, one model

For each model (ViT-L/14, ViT-H/14, ViT-bigG/14, random init, no download), parallel mode (ddp, fsdp) and
activation checkpointing (off, on), the per-GPU batch doubles from --start-batch until a step runs out of memory;
the largest batch that fit then trains --steps timed steps (bf16 autocast, bf16 FSDP params with fp32 reduction,
AdamW) and its samples/s over all ranks is recorded. Writes benchmarks/results/gpu_fit_<device>.json and prints a
table naming the device. On a machine without CUDA it exits with a message and code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import REPO, machine, write_result  # noqa: E402

MODELS = ["ViT-L-14", "ViT-H-14", "ViT-bigG-14"]


def build(name: str, parallel: str, checkpointing: bool, device: torch.device):
    import open_clip

    from clipline import fsdp

    torch.manual_seed(0)
    model = open_clip.create_model(name, output_dict=True, device="cpu" if parallel == "fsdp" else device)
    model.set_grad_checkpointing(checkpointing)
    if parallel == "fsdp":
        model.to(device)
        net = fsdp.shard_model(model, "bf16", log=lambda *a: None)
    else:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index]) \
            if dist.get_world_size() > 1 else model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    return model, net, optimizer


def step(model, net, optimizer, batch: int, device: torch.device, parallel: str) -> None:
    from clipline import fsdp
    from training.loss import contrastive_loss

    size = model.visual.image_size
    size = size if isinstance(size, (list, tuple)) else (size, size)
    images = torch.randn(batch, 3, *size, device=device)
    texts = torch.randint(0, 1000, (batch, model.context_length), device=device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = net(image=images, text=texts)
        loss = contrastive_loss(out["image_features"].float(), out["text_features"].float(), model.logit_scale)
    loss.backward()
    if parallel == "fsdp":
        fsdp.average_replicated_grads(model, dist.get_world_size())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def fits(model, net, optimizer, batch, device, parallel) -> bool:
    """One step at ``batch``, agreed over ranks (every rank must take the same branch)."""
    ok = torch.ones(1, device=device)
    try:
        step(model, net, optimizer, batch, device, parallel)
        torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        ok.zero_()
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def measure(name, parallel, checkpointing, device, args) -> dict:
    row = {"model": name, "parallel": parallel, "activation_checkpointing": checkpointing}
    try:
        model, net, optimizer = build(name, parallel, checkpointing, device)
    except torch.OutOfMemoryError:
        return {**row, "fits": False, "batch_per_gpu": 0}
    best, batch = 0, args.start_batch
    while batch <= args.max_batch and fits(model, net, optimizer, batch, device, parallel):
        best, batch = batch, batch * 2
    row.update(fits=best > 0, batch_per_gpu=best)
    if best:
        torch.cuda.reset_peak_memory_stats(device)
        step(model, net, optimizer, best, device, parallel)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            step(model, net, optimizer, best, device, parallel)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        row.update(samples_per_s=best * dist.get_world_size() * args.steps / elapsed,
                   peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2 ** 30)
    del model, net, optimizer
    torch.cuda.empty_cache()
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--start-batch", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu_fit.py measures GPU memory and needs CUDA; no CUDA device here "
              "(run it on a GPU machine under torchrun)", file=sys.stderr)
        return 2
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29512")
        dist.init_process_group("nccl", rank=int(os.environ.get("RANK", 0)),
                                world_size=int(os.environ.get("WORLD_SIZE", 1)))
    rows = [measure(name, parallel, ckpt, device, args) for name in args.models for parallel in ("ddp", "fsdp")
            for ckpt in (False, True)]
    if dist.get_rank() == 0:
        gpu = torch.cuda.get_device_name(device)
        print(f"{gpu} x {dist.get_world_size()}: largest per-GPU batch (doubling from {args.start_batch}) and "
              f"samples/s over all GPUs, bf16")
        print(f"{'model':<13}{'parallel':<9}{'act.ckpt':<9}{'batch/GPU':>10}{'samples/s':>11}{'peak GiB':>10}")
        for r in rows:
            print(f"{r['model']:<13}{r['parallel']:<9}{str(r['activation_checkpointing']):<9}"
                  f"{r['batch_per_gpu'] if r['fits'] else 'OOM':>10}{r.get('samples_per_s', 0):>11.1f}"
                  f"{r.get('peak_memory_gib', 0):>10.1f}")
        slug = gpu.lower().replace(" ", "_")
        write_result(REPO / "benchmarks" / "results" / f"gpu_fit_{slug}.json",
                     {"benchmark": "gpu_fit", "device": gpu, "world_size": dist.get_world_size(),
                      "machine": machine(), "command": "torchrun ... benchmarks/gpu_fit.py " + " ".join(sys.argv[1:]),
                      "rows": rows})
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
