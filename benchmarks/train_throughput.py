"""Training throughput: `clipline train` against `open_clip_train`, same shards, model, batch, precision, machine,
in one run, as a ratio (issue 4's target: >= 1.2x on CPU).

    .venv/bin/python benchmarks/train_throughput.py [--shards runs/demo/shards/train] [--steps 60] [--rounds 2]

open_clip_train crashes with webdataset 0.2.111 (its issue #935) and pins webdataset <= 0.2.86, so it runs from a
small venv of its own (benchmarks/.peer-venv) that reuses this project's packages through a .pth file and
installs only webdataset 0.2.86 on top. Throughput is measured the same way for both: samples per second of
wall-clock time over each logging window, the first window (start-up, first batches) left out, median over
windows and rounds. The two trainers alternate, so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEER_VENV = REPO / "benchmarks" / ".peer-venv"
MODEL_JSON = REPO / "configs" / "models" / "clipline-tiny-rn.json"


def peer_python() -> str:
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        # Our packages (torch, open_clip, ...) are visible after the peer venv's own site-packages, so the
        # webdataset installed here shadows ours.
        Path(site, "clipline_parent.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "webdataset==0.2.86"],
                       check=True)
    return str(python)


def window_rates_ours(run_dir: Path) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    return [m["samples_per_s"] for m in lines[1:]]


def run_ours(shards: Path, work: Path, args) -> list[float]:
    out = work / "ours"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "clipline", "train", str(REPO / "configs/demo.yaml"), f"run.output_dir={out}",
           f"train.data={shards}", f"train.steps={args.steps}", f"train.global_batch_size={args.batch}",
           f"train.log_every={args.log_every}", f"train.save_every={args.steps}", f"train.workers={args.workers}",
           f"train.precision={args.precision}", f"train.warmup_steps=5", "train.resume=never"]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, text=True)
    return window_rates_ours(out)


_PEER_LINE = re.compile(r"Batch \(t\): ([0-9.]+)")


def run_peer(shards: Path, work: Path, args) -> list[float]:
    out = work / "peer"
    shutil.rmtree(out, ignore_errors=True)
    model_dir = work / "peer-model"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": json.loads(MODEL_JSON.read_text()),
                                                                  "preprocess_cfg": {}}))
    tars = sorted(p.name for p in shards.glob("*.tar"))
    pattern = f"{shards}/{{{tars[0][:-4]}..{tars[-1][:-4]}}}.tar"
    precision = {"fp32": "fp32", "bf16": "amp_bf16"}[args.precision]
    cmd = [peer_python(), "-m", "open_clip_train.main", "--train-data", pattern, "--dataset-type", "webdataset",
           "--train-num-samples", str(args.steps * args.batch), "--model", f"local-dir:{model_dir}",
           "--batch-size", str(args.batch), "--epochs", "1", "--workers", str(args.workers), "--lr", "2e-3",
           "--warmup", "5", "--precision", precision, "--log-every-n-steps", str(args.log_every),
           "--logs", str(out), "--name", "peer", "--save-frequency", "0", "--zeroshot-frequency", "0",
           "--val-frequency", "0", "--report-to", "", "--seed", "0"]
    result = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"open_clip_train failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    batch_times = [float(m.group(1)) for m in _PEER_LINE.finditer(result.stdout + result.stderr)]
    # Its "Batch (t)" is the mean wall-clock time per iteration (data wait included) over the logging window.
    return [args.batch / t for t in batch_times[1:]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default=str(REPO / "runs/demo/shards/train"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/train_throughput.json"))
    args = parser.parse_args()
    shards = Path(args.shards).resolve()
    if not (shards / "sizes.json").is_file():
        print(f"no shards at {shards}: run `make demo` first (or pass --shards)", file=sys.stderr)
        return 2
    ours, peer = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            ours += run_ours(shards, Path(tmp), args)
            peer += run_peer(shards, Path(tmp), args)
            print(f"round {r + 1}: ours {statistics.median(ours):.0f} samples/s, "
                  f"open_clip_train {statistics.median(peer):.0f} samples/s", flush=True)
    result = {"benchmark": "train_throughput", "model": MODEL_JSON.name, "batch": args.batch, "steps": args.steps,
              "precision": args.precision, "workers": args.workers, "cpu_count": os.cpu_count(),
              "ours_samples_per_s": statistics.median(ours), "peer_samples_per_s": statistics.median(peer),
              "ours_windows": ours, "peer_windows": peer}
    result["ratio"] = result["ours_samples_per_s"] / result["peer_samples_per_s"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n| trainer | samples/s |\n|---|---:|\n| clipline train | {result['ours_samples_per_s']:.0f} |\n"
          f"| open_clip_train | {result['peer_samples_per_s']:.0f} |\n\nratio (ours / peer): {result['ratio']:.2f}x"
          f"  -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
