"""Where a training step's time goes: `clipline train` against `open_clip_train`, sampled by py-spy.

    .venv/bin/python benchmarks/step_profile.py [--steps 60] [--rounds 1]

The same runs as benchmarks/train_throughput.py (its commands, shards and model: tiny ViT at 96 px, global batch
128, fp32, one loader worker, each trainer at its best thread count there: 2 threads here, torch's default) are
started under `py-spy record --threads --idle` (100 samples/s, the main thread's Python stacks, waiting included).
Every sample of the training loop (stacks inside clipline's `Trainer.train` or open_clip_train's
`train_one_epoch`) is put in one phase by the frames on its stack:

  data wait    the DataLoader's __next__ (the batch was not ready)
  to device    uint8 -> float and normalisation of the batch (clipline does it in the step; open_clip_train's
               workers hand over normalised float tensors and it copies them to the device)
  forward      the model's forward (encoders), without the loss
  loss         the contrastive loss's forward
  backward     autograd's backward (both towers and the loss)
  optimizer    optimizer.step, zero_grad, gradient clipping and scaler
  logging      metrics, logging, progress, checkpoints
  other        anything else in the loop

Phases are shares of the loop's samples; with the rate from the run's own log they become milliseconds per
step. The first steps (start-up, warm-up) are inside the loop too, for both trainers alike. Writes
benchmarks/results/step_profile.json and prints one table.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _bench import machine, peer_env, write_result  # noqa: E402
from train_throughput import (DEFAULT_MODEL, default_shards, our_command, our_windows, peer_command,  # noqa: E402
                              peer_model_dir, peer_windows, rate_after)

PHASES = ["data wait", "to device", "forward", "loss", "backward", "optimizer", "logging", "other"]
LOOP = {"clipline": ("Trainer.train", "training/trainer.py"), "open_clip_train": ("train_one_epoch", "open_clip_train/train.py")}


def phase(frames: list[str], trainer: str) -> str | None:
    """The phase of one sampled stack (outermost frame first), or None when it is outside the training loop."""
    name, path = LOOP[trainer]
    inside = [i for i, f in enumerate(frames) if f.split(" (")[0] == name and path in f]
    if not inside:
        return None
    rest = frames[inside[0] + 1:]
    text = ";".join(rest)
    if "dataloader.py" in text and "__next__" in text:
        return "data wait"
    if any(k in text for k in ("_tensor.py:", "autograd/__init__.py", "autograd/graph.py")) and "backward" in text:
        return "backward"
    if "torch/optim/" in text or "clip_grad" in text or "zero_grad" in text or "grad_scaler" in text:
        return "optimizer"
    if "open_clip/loss.py" in text or "training/loss.py" in text:
        return "loss"
    if "Normalizer" in text or "normalize" in text or (trainer == "open_clip_train" and ".to (" in text):
        return "to device"
    if "open_clip/model.py" in text or "open_clip/transformer.py" in text or "torch/nn/modules" in text:
        return "forward"
    if any(k in text for k in ("log", "print", "write", "save", "metrics", "Progress", "json")):
        return "logging"
    return "other"


def main_thread(raw: str) -> list[tuple[list[str], int]]:
    """The stacks of the thread with most samples inside any Python frame of the run (py-spy --threads raw)."""
    by_thread = collections.defaultdict(list)
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        by_thread[frames[0]].append((frames[1:], int(count)))
    return max(by_thread.values(), key=lambda rows: sum(c for _, c in rows)) if by_thread else []


def profile(trainer: str, shards: Path, work: Path, args) -> dict:
    out = work / trainer
    shutil.rmtree(out, ignore_errors=True)
    raw = work / f"{trainer}.raw"
    if trainer == "clipline":
        cmd, env, cwd = our_command(shards, out, args, 0), dict(os.environ), REPO
    else:
        cmd, env, cwd = peer_command(shards, out, peer_model_dir(work, Path(args.model)), args), peer_env(), work
        env.pop("OMP_NUM_THREADS", None)
    spy = [str(Path(sys.executable).parent / "py-spy"), "record", "--threads", "--idle", "-r", str(args.rate),
           "--format", "raw", "-o", str(raw), "--"]
    done = subprocess.run(spy + cmd, env=env, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{trainer} under py-spy failed ({done.returncode}):\n{done.stderr[-3000:]}")
    counts = collections.Counter()
    for frames, n in main_thread(raw.read_text()):
        p = phase(frames, trainer)
        if p is not None:
            counts[p] += n
    windows = our_windows(out) if trainer == "clipline" else peer_windows(done.stdout + done.stderr, args.batch)
    rate = rate_after(windows, args.skip_steps, args.batch)
    total = sum(counts.values())
    share = {p: counts[p] / total for p in PHASES}
    step_ms = 1000 * args.batch / rate
    return {"trainer": trainer, "samples_per_s_after_warmup": rate, "loop_samples": total,
            "share": share, "ms_per_step": {p: share[p] * step_ms for p in PHASES}, "step_ms": step_ms}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3072)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip-steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/step_profile.json"))
    parser.add_argument("--keep", default=None, help="keep the runs and py-spy's raw stacks in this folder")
    args = parser.parse_args()
    if not (Path(sys.executable).parent / "py-spy").exists():
        print("py-spy is not installed in this venv: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    args.model = str(Path(args.model).resolve())
    shards = default_shards(args.images)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for trainer in ("clipline", "open_clip_train"):
            runs.append(profile(trainer, shards, work, args))
            print(f"{trainer}: {runs[-1]['samples_per_s_after_warmup']:.1f} samples/s", flush=True)
    result = {"benchmark": "step_profile", "machine": machine(), "model": Path(args.model).name,
              "batch": args.batch, "steps": args.steps, "precision": args.precision, "workers": args.workers,
              "runs": runs}
    write_result(args.out, result)
    print("\n| phase | " + " | ".join(f"{r['trainer']} ms/step (share)" for r in runs) + " |")
    print("|---|" + "---:|" * len(runs))
    for p in PHASES:
        print(f"| {p} | " + " | ".join(f"{r['ms_per_step'][p]:.0f} ({100 * r['share'][p]:.0f}%)" for r in runs) + " |")
    print("| step | " + " | ".join(f"{r['step_ms']:.0f}" for r in runs) + f" |\n-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
