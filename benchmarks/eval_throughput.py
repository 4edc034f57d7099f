"""Eval throughput: `clipline eval` against CLIP_benchmark 1.6.2, same model, same files, same machine, in one
run, as a ratio (issue 5's target: >= 1.0).

    .venv/bin/python benchmarks/eval_throughput.py [--images 2000] [--rounds 3] [--threads 1 0]

The data: demo scenes (data_prep.demo_scenes) rendered at --image-size and stored as JPEG in CLIP_benchmark's
webdataset layout (SPLIT/N.tar with .jpg + .cls, classnames.txt, templates), which both tools read. The model:
a random open_clip model (default the demo's tiny ResNet) saved as a local-dir folder, which both load.

Two scenarios, both zero-shot classification:
  single  one dataset (colour, 8 classes): each tool reads, decodes and encodes every image once.
  suite   six datasets over the same images (colour, shape, size, position, count, background), the demo's
          suite. CLIP_benchmark needs one webdataset copy per label set and encodes the images six times;
          clipline reads its own shard layout (every label in each sample's .json) and encodes them once.
          The suite ratio is therefore split in two: `design` = 6 (images encoded by CLIP_benchmark / by
          clipline) and `speed` = the ratio of images encoded per second; suite ratio = design x speed.

How it is timed. Every measured run is a fresh process (`--child`), so no tool inherits the other's warm caches,
threads or imported modules; a warm-up run of each tool comes first (file cache, compiled bytecode) and is not
counted. Each tool runs at each of --threads (torch intra-op threads; 0 = the tool's own default: torch's, i.e.
one per core, for CLIP_benchmark; clipline's policy, the cores its decoding workers leave free), with the same
batch size and loader workers (--workers, default clipline's eval default: half the cores). Within a round the
tools alternate which runs first (A B, B A, ...). images/s = images evaluated / seconds of the tool's whole
command inside the child (model load included; interpreter start-up and the import of open_clip, which both tools
load their models with, not); the whole process's images/s (everything a user waits for) is recorded beside it. Every round is kept in the JSON with the
load around it (benchmarks/_bench.py: os.getloadavg before and after, and the cores other processes used); rounds
where other processes used more than a quarter of a core are flagged `loaded` and left out of the medians. Each
tool's figure is the median at its best thread count (the best median); the ratio at matched threads is beside it.
CLIP_benchmark runs with --no_amp; it crashes in accuracy() with numpy >= 2 (its issue #147), so its accuracy() is
replaced by the same count using .item().
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _bench import alternating, loaded_note, machine, measured, quiet_median, round_record, write_result  # noqa: E402

from clipline.config import load_config  # noqa: E402
from data_prep.demo_scenes import render_scene, sample_scene  # noqa: E402
from eval.images import available_cores  # noqa: E402
from eval.suite import run_suite  # noqa: E402

ATTRIBUTES = {"colour": ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"],
              "shape": ["circle", "square", "triangle", "star", "cross", "diamond", "heart", "ring"],
              "size": ["small", "large"], "position": ["left", "right", "top", "bottom", "center"],
              "count": ["1", "2", "3"], "background": ["grey", "sand", "striped", "dotted", "checkered"]}
TEMPLATES = ["a photo of a {c}.", "a {c} thing."]


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def build_data(root: Path, n: int, image_size: int, n_shards: int) -> dict:
    """The same JPEGs as CLIP_benchmark webdataset copies (one per attribute) and as one clipline shard folder."""
    rng = random.Random(0)
    samples = []
    for i in range(n):
        scene = sample_scene(rng)
        buf = io.BytesIO()
        render_scene(scene, rng, image_size).save(buf, format="JPEG", quality=90)
        samples.append((f"{i:07d}", buf.getvalue(), scene.attributes()))
    per = -(-n // n_shards)
    for attr, classes in ATTRIBUTES.items():
        for s in range(n_shards):
            members = []
            for key, jpg, attrs in samples[s * per:(s + 1) * per]:
                members += [(f"{key}.jpg", jpg), (f"{key}.cls", str(classes.index(str(attrs[attr]))).encode())]
            _tar(root / "wds" / attr / "test" / f"{s}.tar", members)
        (root / "wds" / attr / "test" / "nshards.txt").write_text(f"{n_shards}\n")
        (root / "wds" / attr / "classnames.txt").write_text("\n".join(classes) + "\n")
        (root / "wds" / attr / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    for s in range(n_shards):
        members = []
        for key, jpg, attrs in samples[s * per:(s + 1) * per]:
            members += [(f"{key}.jpg", jpg), (f"{key}.json", json.dumps(attrs).encode())]
        _tar(root / "shards" / f"{s:05d}.tar", members)
    return {"root": root}


def build_model(folder: Path, model_json: Path) -> Path:
    import open_clip
    from safetensors.torch import save_file

    open_clip.add_model_config(model_json)
    torch.manual_seed(0)
    model = open_clip.create_model(model_json.stem)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": open_clip.get_model_config(model_json.stem),
        "preprocess_cfg": dict(model.visual.preprocess_cfg)}))
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    return folder


def _accuracy_shim(output, target, topk=(1,)):
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum(0).item() / len(target) for k in topk]


def run_clip_benchmark(root: Path, model: Path, attrs: list[str], batch_size: int, workers: int) -> float:
    from clip_benchmark import cli
    from clip_benchmark.metrics import zeroshot_classification

    zeroshot_classification.accuracy = _accuracy_shim
    argv = ["clip_benchmark", "eval", "--dataset", *[f"wds/{a}" for a in attrs],
            "--dataset_root", str(root / "wds" / "{dataset}"), "--task", "zeroshot_classification",
            "--model", f"local-dir:{model}", "--pretrained", "", "--no_amp", "--batch_size", str(batch_size),
            "--num_workers", str(workers), "--output", str(root / "cb_{dataset}.json"), "--quiet"]
    saved, sys.argv = sys.argv, argv
    try:
        start = time.perf_counter()
        cli.main()
        return time.perf_counter() - start
    finally:
        sys.argv = saved


def run_clipline(root: Path, model: Path, attrs: list[str], scenario: str, batch_size: int, workers: int) -> float:
    if scenario == "single":  # the very files CLIP_benchmark reads
        datasets = [{"name": a, "path": str(root / "wds" / a)} for a in attrs]
    else:  # clipline's own layout: one copy of the images, every label in the .json
        datasets = [{"name": a, "path": str(root / "shards"), "label_field": a, "classnames": ATTRIBUTES[a],
                     "templates": TEMPLATES} for a in attrs]
    out = root / f"ours-{os.getpid()}"
    suite = {"eval": {"checkpoint": str(model), "output_dir": str(out), "batch_size": batch_size,
                      "workers": workers, "precision": "fp32", "progress": False, "datasets": datasets}}
    path = out.with_suffix(".json")
    path.write_text(json.dumps(suite))  # JSON is YAML
    start = time.perf_counter()
    records = run_suite(load_config([str(path)]).eval)
    seconds = time.perf_counter() - start
    errors = [r["error"] for r in records if r.get("error")]
    if errors:
        raise SystemExit(f"clipline eval failed: {errors[0]}")
    return seconds


def child(task: dict) -> None:
    """One measured run in this fresh process; prints {"seconds", "threads"} as its last line.

    Both tools load their models with open_clip, which takes seconds to import (transformers, torch._dynamo):
    it is imported here, before either tool's clock starts. CLIP_benchmark imports it with its own module (before
    its clock) and clipline only when it loads the model (inside its clock), which charged clipline alone ~3 s per
    run until this import was added. The whole process, imports and interpreter included, is timed beside it."""
    import open_clip  # noqa: F401 - the shared import, outside both clocks

    if task["threads"]:
        torch.set_num_threads(task["threads"])
    root, model = Path(task["root"]), Path(task["model"])
    if task["tool"] == "clipline":
        seconds = run_clipline(root, model, task["attrs"], task["scenario"], task["batch_size"], task["workers"])
    else:
        seconds = run_clip_benchmark(root, model, task["attrs"], task["batch_size"], task["workers"])
    print(json.dumps({"seconds": seconds, "threads": torch.get_num_threads()}))


def run_child(task: dict) -> tuple[float, dict]:
    run = measured([sys.executable, __file__, "--child", json.dumps(task)], cwd=REPO,
                   env={**os.environ, "TQDM_DISABLE": "1"})
    return json.loads(run["stdout"].strip().splitlines()[-1])["seconds"], run


TOOLS = ("clipline", "CLIP_benchmark")


def summarise(rows: list[dict], threads: list[int], n_datasets: int) -> dict:
    """Per tool and thread setting: the median images/s; each tool at its best setting; the ratios."""
    out: dict = {"by_threads": {}, "best": {}}
    for tool in TOOLS:
        for t in threads:
            mine = [r for r in rows if r["tool"] == tool and r["threads"] == t]
            median, used, all_loaded = quiet_median(mine, "images_per_s")
            process, _, _ = quiet_median([r for r in mine if "process_images_per_s" in r], "process_images_per_s")
            out["by_threads"][f"{tool}@{t}"] = {"images_per_s": median, "rounds_used": used,
                                                "all_rounds_loaded": all_loaded, "process_images_per_s": process}
        best = max(threads, key=lambda t: out["by_threads"][f"{tool}@{t}"]["images_per_s"] or 0.0)
        out["best"][tool] = {"threads": best, **out["by_threads"][f"{tool}@{best}"]}
    ours, theirs = out["best"]["clipline"]["images_per_s"], out["best"]["CLIP_benchmark"]["images_per_s"]
    out["ratio_best_vs_best"] = ours / theirs
    out["process_ratio_best_vs_best"] = (out["best"]["clipline"]["process_images_per_s"]
                                         / out["best"]["CLIP_benchmark"]["process_images_per_s"])
    out["ratio_at_matched_threads"] = {
        str(t): out["by_threads"][f"clipline@{t}"]["images_per_s"] / out["by_threads"][f"CLIP_benchmark@{t}"][
            "images_per_s"] for t in threads}
    if n_datasets > 1:  # clipline encodes each image once, CLIP_benchmark once per dataset
        out["design_factor"] = n_datasets
        out["speed_ratio_per_encoded_image"] = out["ratio_best_vs_best"] / n_datasets
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=256, help="side of the stored JPEGs")
    parser.add_argument("--model", default=str(REPO / "configs" / "models" / "clipline-tiny-rn.json"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=max(1, available_cores() // 2),
                        help="loader workers, both tools (default: clipline's eval default, half the cores)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 0],
                        help="torch threads to measure each tool at; 0 = the tool's own default")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scenarios", nargs="+", default=["single", "suite"], choices=["single", "suite"])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "eval_throughput.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return 0

    with tempfile.TemporaryDirectory(prefix="eval-throughput-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        build_data(root, args.images, args.image_size, n_shards=max(4, args.workers))
        model = build_model(root / "model", Path(args.model))
        print(f"data: {args.images} JPEGs of {args.image_size} px ({time.perf_counter() - start:.0f} s to build); "
              f"model {Path(args.model).name}; batch {args.batch_size}; {args.workers} workers; "
              f"threads {args.threads} (0: each tool's default); {available_cores()} cores", flush=True)
        result = {"benchmark": "eval_throughput", "machine": machine(), "images": args.images,
                  "image_size": args.image_size, "model": Path(args.model).name, "batch_size": args.batch_size,
                  "workers": args.workers, "threads_measured": args.threads, "rounds": args.rounds,
                  "device": "cuda" if torch.cuda.is_available() else "cpu", "scenarios": {}}
        for scenario in args.scenarios:
            attrs = ["colour"] if scenario == "single" else list(ATTRIBUTES)
            evaluated = args.images * len(attrs)
            base = {"root": str(root), "model": str(model), "scenario": scenario, "batch_size": args.batch_size,
                    "workers": args.workers}
            for tool in TOOLS:  # warm-up, not counted: file cache, bytecode
                run_child({**base, "tool": tool, "attrs": attrs[:1], "threads": 0})
            rows = []
            for r in range(args.rounds):
                for tool in alternating(list(TOOLS), r):
                    for t in (args.threads if r % 2 == 0 else args.threads[::-1]):
                        seconds, run = run_child({**base, "tool": tool, "attrs": attrs, "threads": t})
                        rows.append(round_record(run, round=r + 1, tool=tool, threads=t, tool_seconds=seconds,
                                                 images_per_s=evaluated / seconds,
                                                 process_images_per_s=evaluated / run["seconds"],
                                                 encoded_images_per_s=args.images * (
                                                     len(attrs) if tool == "CLIP_benchmark" else 1) / seconds))
                        print(f"{scenario} round {r + 1}: {tool:14s} threads={t} {evaluated / seconds:7.1f} "
                              f"images/s; whole process {evaluated / run['seconds']:7.1f} (other cores busy {run['other_cores']:.2f}, load {run['load_average_before'][0]:.2f}"
                              f"{', LOADED' if run['loaded'] else ''})", flush=True)
            result["scenarios"][scenario] = {"datasets": attrs, "images_evaluated": evaluated, "rounds": rows,
                                             **summarise(rows, args.threads, len(attrs))}
    write_result(args.out, result)
    print("\n| scenario | clipline images/s (threads) | CLIP_benchmark images/s (threads) | ratio, each at its best | "
          "ratio at matched threads | design x speed | whole-process ratio |\n|---|---:|---:|---:|---|---|---:|")
    for scenario, s in result["scenarios"].items():
        ours, theirs = s["best"]["clipline"], s["best"]["CLIP_benchmark"]
        matched = ", ".join(f"{t}: {v:.2f}" for t, v in s["ratio_at_matched_threads"].items())
        split = (f"{s['design_factor']} x {s['speed_ratio_per_encoded_image']:.2f}" if "design_factor" in s
                 else "-")
        print(f"| {scenario} | {ours['images_per_s']:.0f} ({ours['threads']}) | {theirs['images_per_s']:.0f} "
              f"({theirs['threads']}) | {s['ratio_best_vs_best']:.2f} | {matched} | {split} | "
              f"{s['process_ratio_best_vs_best']:.2f} |"
              f"{loaded_note(s['rounds'])}")
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
