"""The contrastive family on the demo data at a small batch: plain CLIP, + MoCo queue, + ALBEF momentum
distillation, + SLIP, each option alone on top of plain CLIP, same steps, seed, batch and schedule; then
`clipline eval` on each final checkpoint.

    .venv/bin/python benchmarks/contrastive_family.py [--steps 600] [--batch 32] [--out runs/family]

Needs the demo's shards (`make demo` or `clipline demo configs/demo.yaml` writes runs/demo/shards/{train,eval}).
Each variant trains with `clipline train configs/demo.yaml configs/family/<variant>.yaml ...` into
OUT/<variant>/train and is evaluated into OUT/<variant>/eval; a finished variant is not retrained on a second run
(--fresh starts over). Prints a markdown table of zero-shot colour/shape top-1, retrieval R@1/R@5 both ways and
training samples/s (median over logging windows, the first left out), and writes
benchmarks/results/contrastive_family.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from clipline.io import atomic_write_text  # noqa: E402

VARIANTS = {
    "clip": [],
    "queue": ["configs/family/queue.yaml"],
    "distill": ["configs/family/distill.yaml"],
    "slip": ["configs/family/slip.yaml"],
}
COLUMNS = [("demo-colour", "top1", "colour top-1"), ("demo-shape", "top1", "shape top-1"),
           ("demo-retrieval", "text_to_image_R@1", "t->i R@1"), ("demo-retrieval", "image_to_text_R@1", "i->t R@1"),
           ("demo-retrieval", "text_to_image_R@5", "t->i R@5"), ("demo-retrieval", "image_to_text_R@5", "i->t R@5")]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per variant")
    p.add_argument("--batch", type=int, default=32, help="global batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (the demo's 2e-3 at batch 128, "
                                                          "scaled by the square root of the batch ratio)")
    p.add_argument("--shards", default="runs/demo/shards/train", help="training shards")
    p.add_argument("--eval-shards", default="runs/demo/shards/eval", help="held-out shards for the eval suite")
    p.add_argument("--out", default="runs/family", help="one folder per variant goes here")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--fresh", action="store_true", help="delete earlier runs of these variants first")
    p.add_argument("--results", default=str(REPO / "benchmarks/results/contrastive_family.json"))
    return p.parse_args()


def clipline(*args: str) -> None:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-m", "clipline", *args], cwd=REPO, env=env, capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise SystemExit(f"clipline {' '.join(args[:3])} ... failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")


def run_variant(name: str, args: argparse.Namespace) -> dict:
    folder = Path(args.out) / name
    if args.fresh:
        shutil.rmtree(folder, ignore_errors=True)
    configs = ["configs/demo.yaml", *VARIANTS[name]]
    common = [f"demo.eval_output_dir={args.eval_shards}", f"eval.checkpoint={folder}/train",
              f"eval.output_dir={folder}/eval"]
    train = [f"train.data={args.shards}", f"train.output_dir={folder}/train", f"train.steps={args.steps}",
             f"train.global_batch_size={args.batch}", f"train.lr={args.lr}", f"train.save_every={args.steps}",
             "train.log_every=50", "run.seed=0"]
    print(f"{name}: training {args.steps} steps of batch {args.batch} ...", flush=True)
    start = time.perf_counter()
    clipline("train", *configs, *common, *train)
    train_seconds = time.perf_counter() - start
    print(f"{name}: evaluating ...", flush=True)
    clipline("eval", *configs, *common)
    records = json.loads((folder / "eval" / "results.json").read_text())
    metrics = {f"{r['dataset']}/{r['metric']}": r["value"] for r in records if "value" in r}
    windows = [json.loads(x)["samples_per_s"] for x in (folder / "train" / "metrics.jsonl").read_text().splitlines()]
    return {"configs": configs, "overrides": common + train, "metrics": metrics,
            "samples_per_s": statistics.median(windows[1:] or windows), "train_seconds": train_seconds}


def table(results: dict) -> str:
    head = "| variant | " + " | ".join(c[2] for c in COLUMNS) + " | samples/s |"
    lines = [head, "|---|" + "---:|" * (len(COLUMNS) + 1)]
    for name, r in results.items():
        values = [f"{100 * r['metrics'].get(f'{d}/{m}', float('nan')):.1f}" for d, m, _ in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(values) + f" | {r['samples_per_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    for path in (args.shards, args.eval_shards):
        if not (REPO / path / "sizes.json").is_file() and not (Path(path) / "sizes.json").is_file():
            raise SystemExit(f"{path} holds no shards: run `make demo` (or `clipline demo configs/demo.yaml`) first")
    results = {name: run_variant(name, args) for name in args.variants}
    print(table(results))
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
              "settings": {k: v for k, v in vars(args).items() if k not in ("fresh", "results")},
              "variants": results, "table": table(results)}
    atomic_write_text(Path(args.results), json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
