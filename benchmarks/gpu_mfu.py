"""GPU training speed and MFU: `clipline train` against `open_clip_train`, ViT-B/32 at 224 px, bf16 autocast,
SDPA attention, torch.compile, synthetic data, one GPU, same batch, in one run (issue 7's target: >= 40% MFU on
an H100, about 9,000 samples/s).

    python benchmarks/gpu_mfu.py                       # on a GPU machine: ours and the peer, batch 256, 60 steps
    python benchmarks/gpu_mfu.py --batch 512 --steps 100 --peak-tflops 989
    .venv/bin/python benchmarks/gpu_mfu.py --smoke     # on a CPU: the tiny demo model, to check the script runs

MFU = samples/s x model FLOPs per training sample / the device's peak dense bf16 FLOP/s; beside it the same
rate divided by the bf16 matrix-product rate the script measures first on the device (an 8192^3 product on random
data: ~790 TFLOP/s on an H200 here, against its datasheet's ~990), the ceiling a training step can reach. The FLOPs per sample are
counted, not estimated: torch.utils.flop_counter.FlopCounterMode over one forward + backward of the model on the
CPU (matmuls, convolutions and SDPA attention; element-wise work is not counted, as is usual for MFU), divided by
the batch. The peak comes from the device's name (H100 SXM/H200 989 TFLOP/s, H100 PCIe 756, H100 NVL 835, A100
312, L40S 362, RTX 4090 165) or --peak-tflops.

The same input path for both: one random batch made once and kept on the device, fed again every step, so both
numbers are the model's training speed alone. Ours: `train.data=synthetic` (a uint8 batch on the device,
normalised there each step, as the trainer does on a GPU). open_clip_train: its own main() and train loop, with
`open_clip_train.main.get_data` replaced by a loader that yields one normalised float batch already on the device
(PEER_RESIDENT below); its `--dataset-type synthetic` would instead run PIL preprocessing in DataLoader workers for
every sample, which measures its input pipeline, not the model (benchmarks/input_pipeline.py does that).
samples/s is the median over logging windows after the first two (torch.compile warm-up). Both write no checkpoint before
the end and log every 10 steps.

On the GPU machine open_clip_torch (and webdataset <= 0.2.86 for open_clip_train's imports) may be missing: carry
their wheels and put them on PYTHONPATH, as benchmarks/README.md says.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _bench import machine, peer_env, write_result  # noqa: E402

PEER_RESIDENT = r'''
import sys, torch
import open_clip_train.main as m
from open_clip_train.data import DataInfo

SIZE, CONTEXT = int(sys.argv.pop(1)), int(sys.argv.pop(1))


class Resident:
    def __init__(self, args):
        device = torch.device(args.device)
        g = torch.Generator().manual_seed(args.seed)
        self.images = torch.randn(args.batch_size, 3, SIZE, SIZE, generator=g).to(device)
        self.texts = torch.randint(1, 49407, (args.batch_size, CONTEXT), generator=g).to(device)
        self.num_batches = args.train_num_samples // args.batch_size
        self.num_samples = self.num_batches * args.batch_size

    def __len__(self):
        return self.num_batches

    def __iter__(self):
        return ((self.images, self.texts) for _ in range(self.num_batches))


m.get_data = lambda args, *a, **k: {"train": DataInfo(dataloader=Resident(args))}
m.main(sys.argv[1:])
'''

PEAK_TFLOPS = [("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
               ("A100", 312.0), ("L40S", 362.0), ("RTX 4090", 165.2)]


def peak_tflops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_TFLOPS if k in device_name), None)


def matmul_ceiling_tflops(n: int = 8192, warmup: int = 3, timed: int = 10) -> float:
    """The bf16 matrix-product rate this device reaches: an n x n x n product on random data, the mean of
    ``timed`` products after ``warmup`` (on an H200 here: ~790 TFLOP/s, against the datasheet's ~990)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(warmup):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(timed):
        a @ b
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / timed
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / seconds / 1e12


def flops_per_sample(model_name: str, batch: int = 4) -> float:
    """Forward + backward FLOPs of one training sample, counted on the CPU in fp32."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from clipline.config import ModelConfig
    from clipline.models import create_model

    model = create_model(ModelConfig(name=model_name), device="cpu").model
    size = model.visual.preprocess_cfg["size"]
    size = size[-2:] if isinstance(size, (list, tuple)) else (size, size)
    images = torch.randn(batch, 3, *size)
    texts = torch.randint(0, 1000, (batch, model.context_length))
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(image=images, text=texts)
        (out["image_features"].sum() + out["text_features"].sum()).backward()
    return counter.get_total_flops() / batch


def input_shape(model_name: str) -> tuple[int, int]:
    """(image side, text context length) of the model."""
    from clipline.config import ModelConfig
    from clipline.models import create_model

    model = create_model(ModelConfig(name=model_name), device="cpu").model
    size = model.visual.preprocess_cfg["size"]
    return int(size[-1] if isinstance(size, (list, tuple)) else size), int(model.context_length)


def median_after_warmup(rates: list[float]) -> float:
    kept = rates[2:] if len(rates) > 3 else rates[-1:]
    return statistics.median(kept)


def run_ours(args, work: Path) -> float:
    out = work / "ours"
    cmd = [sys.executable, "-m", "clipline", "train", str(REPO / "configs/demo.yaml"), f"run.output_dir={out}",
           f"model.name={args.model}", "train.data=synthetic", f"train.global_batch_size={args.batch}",
           f"train.steps={args.steps}", "train.log_every=10", f"train.save_every={args.steps}",
           f"train.precision={args.precision}", f"train.compile={str(args.compile).lower()}", "train.warmup_steps=5",
           "train.resume=never", f"train.device={args.device}", "eval.datasets=[]"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"clipline train failed:\n{result.stderr[-3000:]}")
    lines = [json.loads(x) for x in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    return median_after_warmup([m["samples_per_s"] for m in lines])


_PEER_RATE = re.compile(r"Batch \(t\): ([0-9.]+)")


def run_peer(args, work: Path, python: str, shape: tuple[int, int]) -> float:
    model = args.model
    if model.endswith(".json"):  # the smoke model: open_clip_train takes a local-dir folder
        folder = work / "peer-model"
        folder.mkdir(exist_ok=True)
        (folder / "open_clip_config.json").write_text(json.dumps(
            {"model_cfg": json.loads((REPO / model).read_text()), "preprocess_cfg": {}}))
        model = f"local-dir:{folder}"
    precision = {"bf16": "amp_bf16", "fp32": "fp32"}[args.precision]
    cmd = [python, "-c", PEER_RESIDENT, *map(str, shape), "--dataset-type", "synthetic", "--train-num-samples",
           str(args.steps * args.batch), "--model", model, "--batch-size", str(args.batch), "--epochs", "1",
           "--workers", str(args.workers), "--precision", precision, "--lr", "5e-4", "--warmup", "5",
           "--log-every-n-steps", "10", "--logs", str(work / "peer"), "--name", "peer", "--save-frequency", "0",
           "--zeroshot-frequency", "0", "--val-frequency", "0", "--report-to", "", "--seed", "0"]
    if args.compile:
        cmd.append("--torchcompile")
    if args.device == "cpu":
        cmd.append("--no-set-device-rank")
    result = subprocess.run(cmd, cwd=work, capture_output=True, text=True,
                            env={**peer_env(), **({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {})})
    if result.returncode != 0:
        raise RuntimeError(f"open_clip_train failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    times = [float(m.group(1)) for m in _PEER_RATE.finditer(result.stdout + result.stderr)]
    return median_after_warmup([args.batch / t for t in times])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--workers", type=int, default=8, help="open_clip_train's DataLoader workers")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--peer-python", default=None, help="python with open_clip_train (default: this one; "
                        "webdataset 0.2.86 is put first on its PYTHONPATH when needed)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny demo model, 20 steps of 32, no compile")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.smoke:
        args.model, args.batch, args.steps, args.device = "configs/models/clipline-tiny-rn.json", 32, 40, "cpu"
        args.compile, args.workers = False, 1
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run this on a GPU machine, or pass --smoke to check the script on a CPU",
              file=sys.stderr)
        return 2
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    peak = args.peak_tflops or (peak_tflops(device_name) if args.device == "cuda" else None)
    ceiling = matmul_ceiling_tflops() if args.device == "cuda" else None
    if ceiling:
        print(f"{device_name}: bf16 8192^3 matmul on random data {ceiling:.0f} TFLOP/s (datasheet peak: "
              f"{f'{peak:.0f}' if peak else 'unknown'})", flush=True)
    flops = flops_per_sample(args.model)
    peer_python = args.peer_python or sys.executable
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        rows["clipline train"] = run_ours(args, Path(tmp))
        if not args.skip_peer:
            rows["open_clip_train"] = run_peer(args, Path(tmp), peer_python, input_shape(args.model))
    result = {"benchmark": "gpu_mfu", "machine": machine(), "input": "one batch resident on the device, both",
              "device": device_name, "model": args.model, "batch": args.batch,
              "steps": args.steps, "precision": args.precision, "compile": args.compile,
              "train_flops_per_sample": flops, "peak_tflops": peak, "matmul_ceiling_tflops": ceiling,
              "torch": torch.__version__, "rows": {}}
    print(f"\n{device_name}, {args.model}, batch {args.batch}, {args.precision}, compile={args.compile}; "
          f"{flops / 1e9:.2f} GFLOP per training sample\n\n"
          f"| trainer | samples/s | MFU of the datasheet peak | of the measured matmul rate |\n|---|---:|---:|---:|")

    def share(rate, tflops):
        return rate * flops / (tflops * 1e12) if tflops else None

    for name, rate in rows.items():
        mfu, of_ceiling = share(rate, peak), share(rate, ceiling)
        result["rows"][name] = {"samples_per_s": rate, "mfu": mfu, "of_matmul_ceiling": of_ceiling}
        print(f"| {name} | {rate:,.0f} | {f'{mfu:.1%}' if mfu is not None else 'n/a (no peak known)'} | "
              f"{f'{of_ceiling:.1%}' if of_ceiling is not None else 'n/a'} |")
    if len(rows) == 2:
        result["ratio"] = rows["clipline train"] / rows["open_clip_train"]
        print(f"\nratio (ours / peer): {result['ratio']:.2f}x")
    out = Path(args.out or REPO / "benchmarks/results" / f"gpu_mfu{'_smoke' if args.smoke else ''}.json")
    write_result(out, result)
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
