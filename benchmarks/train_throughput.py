"""Training throughput: `clipline train` against `open_clip_train`, same shards, model, batch, precision, loader
workers and machine, in one run, as a ratio (issue 4's target: >= 1.2x on CPU).

    .venv/bin/python benchmarks/train_throughput.py [--rounds 3] [--steps 60] [--peer-threads 0 1]

Defaults: a tiny ViT (benchmarks/models/tiny-vit-96.json: 4 layers, width 192, 96 px, patch 16; text 2 layers,
width 128), global batch 128, fp32, one DataLoader worker each, on 3,072 photo-like 160 px JPEGs written once
under benchmarks/.cache/ (or --shards FOLDER, e.g. runs/demo/shards/train with --model
configs/models/clipline-tiny-rn.json).

How it is timed, the same way for both:
- samples/s of wall-clock time over the steps after the first --skip-steps (10) of each run: start-up, the first
  batches and the first optimizer steps are left out of both. clipline's windows are its metrics.jsonl records
  (steps 1-10, 11-20, ...); open_clip_train's are its log lines ("Batch (t)", the mean time per step since the
  previous line, data wait included: steps 1, 2-11, 12-21, ...), so the first window kept is steps 11-20 for
  clipline and 12-21 for open_clip_train. A run's rate = samples / seconds summed over its kept windows.
- Each run is a fresh process; within a round the trainers alternate which runs first (A B, B A, ...).
- Threads: clipline runs at each of --our-threads (0: its default, every core of its share);
  open_clip_train has no thread option and runs at each of --peer-threads (0: torch's default, one per core; N:
  OMP_NUM_THREADS=N). Each trainer's figure is its best setting's median; every setting is in the JSON.
- Load: beside each run the JSON has os.getloadavg() before and after and the cores other processes kept busy
  meanwhile (busy time in /proc/stat less the run's own CPU time). A run where other processes used more than a
  quarter of a core on average is flagged `loaded` and left out of the medians (benchmarks/_bench.py).

open_clip_train 3.3.0 crashes with webdataset > 0.2.86 (its issue #935): when the installed one is newer,
webdataset 0.2.86 goes into benchmarks/.cache/peer-webdataset, first on the peer's PYTHONPATH (_bench.peer_env).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _bench import (alternating, loaded_note, machine, measured, peer_env, quiet_median,  # noqa: E402
                    round_record, write_result)

DEFAULT_MODEL = REPO / "benchmarks" / "models" / "tiny-vit-96.json"


def our_command(shards: Path, out: Path, args, threads: int) -> list[str]:
    return [sys.executable, "-m", "clipline", "train", str(REPO / "configs/demo.yaml"), f"run.output_dir={out}",
            f"model.name={args.model}", f"train.data={shards}", f"train.steps={args.steps}",
            f"train.global_batch_size={args.batch}", f"train.log_every={args.log_every}",
            f"train.save_every={args.steps}", f"train.workers={args.workers}", f"train.threads={threads}",
            f"train.precision={args.precision}", "train.warmup_steps=5", "train.resume=never", "eval.datasets=[]"]


def our_windows(out: Path) -> list[tuple[int, int, float]]:
    """(first step, last step, seconds) of each logging window in clipline's metrics.jsonl."""
    windows, last = [], 0
    for line in (out / "train" / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        samples = m["samples_seen"] - (windows and windows[-1][3] or 0)
        windows.append((last + 1, m["step"], samples / m["samples_per_s"], m["samples_seen"]))
        last = m["step"]
    return [w[:3] for w in windows]


def peer_model_dir(work: Path, model_json: Path) -> Path:
    folder = work / "peer-model"
    folder.mkdir(exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": json.loads(model_json.read_text()),
                                                              "preprocess_cfg": {}}))
    return folder


def peer_command(shards: Path, out: Path, model_dir: Path, args) -> list[str]:
    tars = sorted(p.name[:-4] for p in shards.glob("*.tar"))
    precision = {"fp32": "fp32", "bf16": "amp_bf16"}[args.precision]
    return [sys.executable, "-m", "open_clip_train.main", "--train-data", f"{shards}/{{{tars[0]}..{tars[-1]}}}.tar",
            "--dataset-type", "webdataset", "--train-num-samples", str(args.steps * args.batch),
            "--model", f"local-dir:{model_dir}", "--batch-size", str(args.batch), "--epochs", "1",
            "--workers", str(args.workers), "--lr", "2e-3", "--warmup", "5", "--precision", precision,
            "--log-every-n-steps", str(args.log_every), "--logs", str(out), "--name", "peer",
            "--save-frequency", "0", "--zeroshot-frequency", "0", "--val-frequency", "0", "--report-to", "",
            "--seed", "0"]


_PEER_LINE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+ .*?Batch \(t\): ([0-9.]+)")


def peer_windows(log: str, batch: int) -> list[tuple[int, int, float]]:
    """(first step, last step, seconds) of each of open_clip_train's log lines (its mean step time x steps)."""
    windows, last = [], 0
    for m in _PEER_LINE.finditer(log):
        step = int(m.group(1)) // batch
        windows.append((last + 1, step, (step - last) * float(m.group(2))))
        last = step
    return windows


def rate_after(windows: list[tuple[int, int, float]], skip: int, batch: int) -> float | None:
    kept = [w for w in windows if w[0] > skip]
    steps = sum(w[1] - w[0] + 1 for w in kept)
    seconds = sum(w[2] for w in kept)
    return steps * batch / seconds if seconds > 0 else None


def run_one(trainer: str, threads: int, shards: Path, work: Path, args) -> tuple[dict, float | None]:
    out = work / trainer
    shutil.rmtree(out, ignore_errors=True)
    if trainer == "clipline":
        run = measured(our_command(shards, out, args, threads), cwd=REPO)
        windows = our_windows(out)
    else:
        env = peer_env()
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        else:
            env.pop("OMP_NUM_THREADS", None)
        run = measured(peer_command(shards, out, peer_model_dir(work, Path(args.model)), args), cwd=work, env=env)
        windows = peer_windows(run["stdout"] + run["stderr"], args.batch)
    return run, rate_after(windows, args.skip_steps, args.batch)


def default_shards(n: int) -> Path:
    from input_pipeline import build_shards

    return build_shards("square-160", n)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default=None, help="a shard folder (default: generated, cached)")
    parser.add_argument("--images", type=int, default=3072, help="size of the generated shard set")
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="an open_clip model JSON")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip-steps", type=int, default=10, help="warm-up steps left out, both trainers")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers, both trainers")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--our-threads", type=int, nargs="+", default=[0], help="0: clipline's default")
    parser.add_argument("--peer-threads", type=int, nargs="+", default=[0, 1], help="0: torch's default")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/train_throughput.json"))
    args = parser.parse_args()
    if args.steps <= args.skip_steps + args.log_every:
        parser.error(f"--steps must exceed --skip-steps + --log-every ({args.skip_steps + args.log_every}) so that "
                     "a timed window is left")
    shards = Path(args.shards).resolve() if args.shards else default_shards(args.images)
    if not (shards / "sizes.json").is_file():
        print(f"no shards at {shards} (no sizes.json): pass a shard folder, or leave --shards out", file=sys.stderr)
        return 2
    args.model = str(Path(args.model).resolve())
    settings = [("clipline", t) for t in args.our_threads] + [("open_clip_train", t) for t in args.peer_threads]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for trainer, threads in alternating(settings, r):
                run, rate = run_one(trainer, threads, shards, Path(tmp), args)
                rows.append(round_record(run, round=r + 1, trainer=trainer, threads=threads, samples_per_s=rate))
                print(f"round {r + 1}: {trainer:15s} threads={threads} {rate:6.1f} samples/s (other cores busy "
                      f"{run['other_cores']:.2f}, load {run['load_average_before'][0]:.2f}"
                      f"{', LOADED' if run['loaded'] else ''})", flush=True)
    summary = {}
    for trainer, threads in settings:
        median, used, all_loaded = quiet_median(
            [x for x in rows if x["trainer"] == trainer and x["threads"] == threads], "samples_per_s")
        summary[f"{trainer}@{threads}"] = {"trainer": trainer, "threads": threads, "samples_per_s": median,
                                           "rounds_used": used, "all_rounds_loaded": all_loaded}
    best = {name: max((s for s in summary.values() if s["trainer"] == name), key=lambda s: s["samples_per_s"] or 0)
            for name in ("clipline", "open_clip_train")}
    result = {"benchmark": "train_throughput", "machine": machine(), "model": Path(args.model).name,
              "shards": str(shards), "batch": args.batch, "steps": args.steps, "skip_steps": args.skip_steps,
              "precision": args.precision, "workers": args.workers, "rounds": rows, "by_setting": summary,
              "best": best, "ratio": best["clipline"]["samples_per_s"] / best["open_clip_train"]["samples_per_s"],
              "per_round_ratios": [
                  a["samples_per_s"] / b["samples_per_s"] for a, b in zip(
                      [x for x in rows if (x["trainer"], x["threads"]) == ("clipline", best["clipline"]["threads"])],
                      [x for x in rows if (x["trainer"], x["threads"]) == ("open_clip_train",
                                                                           best["open_clip_train"]["threads"])])]}
    write_result(args.out, result)
    print("\n| trainer | threads (0: default) | samples/s, median | rounds |\n|---|---:|---:|---|")
    for s in summary.values():
        per = ", ".join(f"{x['samples_per_s']:.0f}{'*' if x['loaded'] else ''}" for x in rows
                        if (x["trainer"], x["threads"]) == (s["trainer"], s["threads"]))
        print(f"| {s['trainer']} | {s['threads']} | {s['samples_per_s']:.0f} | {per} |")
    print(f"\nratio, each at its best setting: {result['ratio']:.2f}x; per round: "
          f"{', '.join(f'{x:.2f}' for x in result['per_round_ratios'])}{loaded_note(rows)} "
          f"(* = loaded round)\n-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
