"""Eval throughput: `clipline eval` against CLIP_benchmark 1.6.2, same model, same files, same machine, in one
run, as a ratio (issue 5's target: >= 1.0).

    .venv/bin/python benchmarks/eval_throughput.py [--images 2000] [--image-size 256] [--rounds 3]

The data: demo scenes (data_prep.demo_scenes) rendered at --image-size and stored as JPEG in CLIP_benchmark's
webdataset layout (SPLIT/N.tar with .jpg + .cls, classnames.txt, templates), which both tools read. The model:
a random open_clip model (default the demo's tiny ResNet) saved as a local-dir folder, which both load.

Two scenarios, both zero-shot classification:
  single  one dataset (colour, 8 classes): each tool reads, decodes and encodes every image once.
  suite   six datasets over the same images (colour, shape, size, position, count, background), the demo's
          suite. CLIP_benchmark needs one webdataset copy per label set and encodes the images six times;
          clipline reads its own shard layout (every label in each sample's .json) and encodes them once.

Both run in this process (CLIP_benchmark through its CLI entry point, with --no_amp, the same batch size and the
same number of loader workers), alternating, so machine noise hits both alike; images/s = images evaluated /
wall-clock seconds of the whole command (model load included), median over rounds. CLIP_benchmark 1.6.2 crashes
in accuracy() with numpy >= 2 (its issue #147): its accuracy() is replaced by the same count using .item().
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

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


def run_clip_benchmark(root: Path, model: Path, attrs: list[str], args) -> float:
    from clip_benchmark import cli
    from clip_benchmark.metrics import zeroshot_classification

    zeroshot_classification.accuracy = _accuracy_shim
    argv = ["clip_benchmark", "eval", "--dataset", *[f"wds/{a}" for a in attrs],
            "--dataset_root", str(root / "wds" / "{dataset}"), "--task", "zeroshot_classification",
            "--model", f"local-dir:{model}", "--pretrained", "", "--no_amp", "--batch_size", str(args.batch_size),
            "--num_workers", str(args.workers), "--output", str(root / "cb_{dataset}.json"), "--quiet"]
    saved, sys.argv = sys.argv, argv
    try:
        start = time.perf_counter()
        cli.main()
        return time.perf_counter() - start
    finally:
        sys.argv = saved


def run_clipline(root: Path, model: Path, attrs: list[str], scenario: str, args) -> float:
    if scenario == "single":  # the very files CLIP_benchmark reads
        datasets = [{"name": a, "path": str(root / "wds" / a)} for a in attrs]
    else:  # clipline's own layout: one copy of the images, every label in the .json
        datasets = [{"name": a, "path": str(root / "shards"), "label_field": a, "classnames": ATTRIBUTES[a],
                     "templates": TEMPLATES} for a in attrs]
    suite = {"eval": {"checkpoint": str(model), "output_dir": str(root / "ours"), "batch_size": args.batch_size,
                      "workers": args.workers, "precision": "fp32", "progress": False, "datasets": datasets}}
    path = root / "suite.json"
    path.write_text(json.dumps(suite))  # JSON is YAML
    start = time.perf_counter()
    records = run_suite(load_config([str(path)]).eval)
    seconds = time.perf_counter() - start
    errors = [r["error"] for r in records if r.get("error")]
    if errors:
        raise SystemExit(f"clipline eval failed: {errors[0]}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=256, help="side of the stored JPEGs")
    parser.add_argument("--model", default=str(REPO / "configs" / "models" / "clipline-tiny-rn.json"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=available_cores(), help="loader workers, both tools")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scenarios", nargs="+", default=["single", "suite"], choices=["single", "suite"])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "eval_throughput.json"))
    args = parser.parse_args()

    os.environ.setdefault("TQDM_DISABLE", "1")
    with tempfile.TemporaryDirectory(prefix="eval-throughput-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        build_data(root, args.images, args.image_size, n_shards=max(4, args.workers))
        model = build_model(root / "model", Path(args.model))
        print(f"data: {args.images} JPEGs of {args.image_size} px ({time.perf_counter() - start:.0f} s to build); "
              f"model {Path(args.model).name}; batch {args.batch_size}; {args.workers} workers; "
              f"{available_cores()} cores", flush=True)
        result = {"benchmark": "eval_throughput", "images": args.images, "image_size": args.image_size,
                  "model": Path(args.model).name, "batch_size": args.batch_size, "workers": args.workers,
                  "cpu_count": available_cores(), "device": "cuda" if torch.cuda.is_available() else "cpu",
                  "scenarios": {}}
        for scenario in args.scenarios:
            attrs = ["colour"] if scenario == "single" else list(ATTRIBUTES)
            evaluated = args.images * len(attrs)
            run_clipline(root, model, attrs[:1], "single", args)  # warm-up: imports, file cache
            run_clip_benchmark(root, model, attrs[:1], args)
            ours, theirs = [], []
            for r in range(args.rounds):
                theirs.append(evaluated / run_clip_benchmark(root, model, attrs, args))
                ours.append(evaluated / run_clipline(root, model, attrs, scenario, args))
                print(f"{scenario} round {r + 1}: clipline {ours[-1]:.0f} images/s, CLIP_benchmark "
                      f"{theirs[-1]:.0f} images/s", flush=True)
            result["scenarios"][scenario] = {
                "datasets": attrs, "images_evaluated": evaluated,
                "ours_images_per_s": statistics.median(ours), "clip_benchmark_images_per_s": statistics.median(theirs),
                "ratio": statistics.median(ours) / statistics.median(theirs), "ours_rounds": ours,
                "clip_benchmark_rounds": theirs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("\n| scenario | clipline (images/s) | CLIP_benchmark (images/s) | ratio |\n|---|---:|---:|---:|")
    for scenario, s in result["scenarios"].items():
        print(f"| {scenario} | {s['ours_images_per_s']:.0f} | {s['clip_benchmark_images_per_s']:.0f} | "
              f"{s['ratio']:.2f} |")
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
