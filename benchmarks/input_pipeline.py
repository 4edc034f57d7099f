"""Input pipeline: samples/s per core from tar shards to model-ready batches, clipline's training stream against
OpenCLIP's webdataset pipeline (open_clip_train.data.get_wds_dataset, the code its trainer runs), on the same
shards, in one run, as a ratio (issue 7's target: >= 1.5).

    .venv/bin/python benchmarks/input_pipeline.py [--preset both] [--images 3072] [--batches 20] [--rounds 3]

"Model-ready" means what the model's forward takes: normalised float (B, 3, 224, 224) images and (B, 77) token
ids. OpenCLIP's workers produce that directly (PIL decode, RandomResizedCrop(224, scale=(0.9, 1)), ToTensor,
Normalize). clipline's workers produce uint8 crops and the trainer normalises where the model runs; on a CPU that
is the same process, so here the normalisation runs on the CPU inside the timed loop, charged to clipline.

The column "estimate, normalising on a GPU" is not a measurement: it removes clipline's normalisation CPU time
(measured inside the loop) from clipline's figure, as if the normalisation ran on a GPU, and leaves OpenCLIP's as
measured (its workers normalise either way; no matching adjustment is made for it). Read it as an upper estimate.

With --workers N (default: 0 and 1; 1 is what train.workers=-1 resolves to on a CPU) each pipeline also runs the
way its trainer feeds a CPU model: N DataLoader workers, clipline's worker normalising (as the trainer does on a
CPU), OpenCLIP's workers running its transform. Those runs are compared by wall-clock samples/s (the workers' CPU
is not in the main process's CPU time).

Per core: each pipeline runs in a process of its own with no DataLoader workers and one torch thread, so it
decodes, crops, tokenises and batches on exactly one core. Throughput = samples of --batches full batches of 128
/ CPU seconds of the process (time.process_time), after two warm-up batches (shuffle buffers filling, first
imports); wall-clock samples/s are reported beside it. CPU time is the per-core cost itself and is what stays
put on a shared machine, where other processes stretch wall-clock time by 2-3x. The two alternate which runs
first (A B, B A, ...), --rounds times, each run a fresh process, and the median counts; os.getloadavg() before
each run is kept beside it in the JSON, with the machine (benchmarks/_bench.py).

Presets (JPEG quality 90, procedurally drawn pictures whose JPEG sizes are close to photos'):
  img2dataset-256   256 x 256, what img2dataset writes by default (resize 256, center crop)
  datacomp-512      longest side 512, keep-ratio, aspect 3:4 to 16:9 (DataComp's and many LAION copies' layout)
Shards are built once under benchmarks/.cache/ (reused when present). The peer runs with webdataset 0.2.86 first
on its PYTHONPATH when the installed one is newer (benchmarks/_bench.peer_env, as open_clip_train needs).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

CACHE = REPO / "benchmarks" / ".cache"
BATCH = 128
WORDS = ("a photo of the red dog sitting on grass near a small house under blue sky with clouds at sunset "
         "two people walking along beach city street night lights bowl fruit table wooden kitchen").split()

PEER_CODE = r"""
import json, sys, time, argparse
import torch
torch.set_num_threads(1)
import open_clip
from open_clip_train.data import get_wds_dataset
p = json.loads(sys.argv[1])
args = argparse.Namespace(train_data=p["pattern"], train_num_samples=10**7, batch_size=p["batch"], workers=p["workers"],
                          world_size=1, seed=0, dataset_resampled=False, train_data_upsampling_factors=None)
preprocess = open_clip.image_transform(224, is_train=True)
tokenizer = open_clip.get_tokenizer("ViT-B-32")
loader = get_wds_dataset(args, preprocess, is_train=True, tokenizer=tokenizer).dataloader
it = iter(loader)
for _ in range(2):
    images, texts = next(it)
t0, c0 = time.perf_counter(), time.process_time()
for _ in range(p["batches"]):
    images, texts = next(it)
seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
assert images.shape == (p["batch"], 3, 224, 224) and images.dtype == torch.float32, images.shape
n = p["batches"] * p["batch"]
print(json.dumps({"samples_per_cpu_s": n / cpu, "samples_per_s": n / seconds}))
"""

OURS_CODE = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
import open_clip
from clipline.shards import list_shards
from training.augment import CropSpec, Normalizer, RandomCropDecoder
from training.data import ShardStream, make_loader
p = json.loads(sys.argv[1])
tokenizer = open_clip.get_tokenizer("ViT-B-32")
normalize = Normalizer(None, None, torch.device("cpu"))
# With workers, as the trainer on a CPU: the worker normalises (batch_transform), the main process only receives.
stream = ShardStream(list_shards(p["folder"]), batch_size=p["batch"], rank=0, world_size=1, seed=0,
                     shuffle_buffer=2000, decode=RandomCropDecoder(CropSpec(224)), tokenizer=tokenizer, n_streams=1,
                     batch_transform=normalize if p["workers"] else None)
it = iter(make_loader(stream, workers=p["workers"]))
for _ in range(2):
    images = normalize(next(it).images)
t0, c0, norm_cpu = time.perf_counter(), time.process_time(), 0.0
for _ in range(p["batches"]):
    batch = next(it)
    n0 = time.process_time()
    images, texts = normalize(batch.images), batch.texts
    norm_cpu += time.process_time() - n0
seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
assert images.shape == (p["batch"], 3, 224, 224) and images.dtype == torch.float32, images.shape
n = p["batches"] * p["batch"]
# clipline's workers ignore SIGTERM (they must outlive a Slurm signal to the process group), so a worker left
# running at exit would be terminate()d to no effect and joined forever: stop them first.
getattr(it, "_shutdown_workers", lambda: None)()
print(json.dumps({"samples_per_cpu_s": n / cpu, "samples_per_s": n / seconds,
                  "samples_per_cpu_s_gpu_normalize": n / (cpu - norm_cpu)}))
"""


def picture(rng: np.random.Generator, width: int, height: int) -> bytes:
    """Smooth colour fields, a few hard-edged shapes and sensor-like noise: JPEG sizes like photos' (~0.5-1.5
    bits per pixel at quality 90), not like flat synthetic images that decode unrealistically fast."""
    from PIL import Image, ImageDraw

    small = rng.integers(0, 256, size=(max(2, height // 64), max(2, width // 64), 3), dtype=np.uint8)
    im = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(8, width // 2)), y0 + int(rng.integers(8, height // 2))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    pixels = np.asarray(im, dtype=np.int16) + rng.normal(0, 6, size=(height, width, 3)).astype(np.int16)
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def image_size(preset: str, rng: np.random.Generator) -> tuple[int, int]:
    if preset == "img2dataset-256":
        return 256, 256
    if preset == "square-160":  # train_throughput.py's small-model shards
        return 160, 160
    aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(16 / 9))))
    return (512, round(512 / aspect)) if aspect >= 1 else (round(512 * aspect), 512)


def build_shards(preset: str, n_images: int, n_shards: int = 8) -> Path:
    folder = CACHE / f"input-{preset}-{n_images}"
    if (folder / "sizes.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = random.Random(0)
    per_shard = -(-n_images // n_shards)
    sizes, bytes_total = {}, 0
    for s in range(n_shards):
        name = f"{s:05d}.tar"
        tmp = folder / f".{name}.tmp"
        count = 0
        with tarfile.open(tmp, "w") as tar:
            for i in range(s * per_shard, min(n_images, (s + 1) * per_shard)):
                jpg = picture(rng, *image_size(preset, rng))
                txt = " ".join(words.choices(WORDS, k=words.randint(5, 15))).encode()
                for ext, data in (("jpg", jpg), ("txt", txt)):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                bytes_total += len(jpg)
                count += 1
        os.replace(tmp, folder / name)
        sizes[name] = count
    (folder / "sizes.json").write_text(json.dumps(sizes))
    print(f"built {n_images} {preset} images in {folder} ({bytes_total / n_images / 1024:.0f} KiB per JPEG)",
          flush=True)
    return folder


def run(code: str, params: dict, env: dict) -> dict:
    env = {**env, "OMP_NUM_THREADS": "1"}
    load = [round(x, 2) for x in os.getloadavg()]
    result = subprocess.run([sys.executable, "-c", code, json.dumps(params)], capture_output=True, text=True,
                            env=env, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"pipeline failed:\n{result.stderr[-3000:]}")
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "load_average_before": load}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["img2dataset-256", "datacomp-512", "both"], default="both")
    parser.add_argument("--images", type=int, default=3072)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1],
                        help="DataLoader workers per run (0: all in one process, per-CPU-second figures)")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/input_pipeline.json"))
    args = parser.parse_args()
    from _bench import machine, peer_env, write_result

    envs = {"clipline": {**os.environ, "PYTHONPATH": str(REPO)}, "open_clip": peer_env()}
    codes = {"clipline": OURS_CODE, "open_clip": PEER_CODE}
    presets = ["img2dataset-256", "datacomp-512"] if args.preset == "both" else [args.preset]
    results = {"benchmark": "input_pipeline", "machine": machine(), "batch": BATCH, "batches": args.batches,
               "rounds": args.rounds, "presets": {}}
    for preset in presets:
        folder = build_shards(preset, args.images)
        tars = sorted(p.name[:-4] for p in folder.glob("*.tar"))
        for workers in args.workers:
            params = {"folder": str(folder), "pattern": f"{folder}/{{{tars[0]}..{tars[-1]}}}.tar", "batch": BATCH,
                      "batches": args.batches, "workers": workers}
            got = {"clipline": [], "open_clip": []}
            for r in range(args.rounds):
                for name in (list(got) if r % 2 == 0 else list(got)[::-1]):
                    got[name].append({"round": r + 1, **run(codes[name], params, envs[name])})
                print(f"{preset}, {workers} workers, round {r + 1}: clipline {got['clipline'][-1]['samples_per_s']:.0f}"
                      f", open_clip webdataset {got['open_clip'][-1]['samples_per_s']:.0f} samples/s wall-clock; per "
                      f"CPU-second of the main process {got['clipline'][-1]['samples_per_cpu_s']:.0f} vs "
                      f"{got['open_clip'][-1]['samples_per_cpu_s']:.0f}", flush=True)
            ours, theirs = got["clipline"], got["open_clip"]
            row = {"workers": workers, "ours_rounds": ours, "peer_rounds": theirs}
            for key in ("samples_per_cpu_s", "samples_per_s"):
                row[f"ours_{key}"] = statistics.median(x[key] for x in ours)
                row[f"peer_{key}"] = statistics.median(x[key] for x in theirs)
                row[f"ratio_{key}"] = row[f"ours_{key}"] / row[f"peer_{key}"]
            # With workers, the main process's CPU time leaves the decoding out: wall-clock is the comparison.
            row["ratio"] = row["ratio_samples_per_cpu_s"] if workers == 0 else row["ratio_samples_per_s"]
            if workers == 0:
                row["estimate_ours_samples_per_cpu_s_gpu_normalize"] = statistics.median(
                    x["samples_per_cpu_s_gpu_normalize"] for x in ours)
                row["estimate_ratio_gpu_normalize"] = (row["estimate_ours_samples_per_cpu_s_gpu_normalize"]
                                                       / row["peer_samples_per_cpu_s"])
            results["presets"][f"{preset}, {workers} workers"] = row
    write_result(args.out, results)
    print("\n| images, workers | clipline | open_clip webdataset | ratio | wall-clock ratio | "
          "estimate, normalising on a GPU (not measured) |\n|---|---:|---:|---:|---:|---:|")
    for name, row in results["presets"].items():
        unit = "per CPU-s" if row["workers"] == 0 else "per s"
        key = "samples_per_cpu_s" if row["workers"] == 0 else "samples_per_s"
        est = f"{row['estimate_ratio_gpu_normalize']:.2f}x" if "estimate_ratio_gpu_normalize" in row else "-"
        print(f"| {name} | {row[f'ours_{key}']:.0f} {unit} | {row[f'peer_{key}']:.0f} {unit} | {row['ratio']:.2f}x | "
              f"{row['ratio_samples_per_s']:.2f}x | {est} |")
    print(f"\n-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
