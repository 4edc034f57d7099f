"""Build throughput of `clipline prep` against plain img2dataset, same list, same server, same run.

    python benchmarks/prep_throughput.py [--images 5000] [--rounds 2] [--out benchmarks/results/prep_throughput.json]

Generates N demo scenes once (cached under --data), serves them from one loopback server, and times, alternately
(A B B A ...: load drift on a shared machine then cancels out), plain ``img2dataset.download`` and
``clipline prep`` (validation, safeguarded fetch, default filters, manifest, report and plots). Both resize to the
same size with the same processes and threads and write webdataset shards. images/s = images written / wall
time of the whole call. The ratio is ours / img2dataset's; filtering should cost at most 10% (ratio >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def _plain_img2dataset(urls: Path, out: Path, a: argparse.Namespace) -> int:
    from img2dataset import download

    download(url_list=str(urls), input_format="parquet", url_col="url", caption_col="caption",
             output_folder=str(out), output_format="webdataset", image_size=a.image_size, resize_mode="center_crop",
             encode_quality=a.quality, number_sample_per_shard=a.per_shard, processes_count=a.processes,
             thread_count=a.threads, timeout=10, extract_exif=False, enable_wandb=False)
    return sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))


def _clipline_prep(urls: Path, out: Path, a: argparse.Namespace) -> int:
    from clipline.config import PrepConfig
    from data_prep.prep import run_prep

    cfg = PrepConfig(url_list=str(urls), output_dir=str(out), image_size=a.image_size, encode_quality=a.quality,
                     samples_per_shard=a.per_shard, processes=a.processes, threads=a.threads, timeout=10,
                     allow_private_networks=True)
    return run_prep(cfg).total_samples


def _data(a: argparse.Namespace) -> Path:
    from data_prep.demo_scenes import write_demo_split

    folder = Path(a.data) / f"scenes_{a.images}_{a.source_size}px"
    return write_demo_split(folder, n=a.images, seed=7, image_size=a.source_size)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--source-size", type=int, default=256, help="side of the served images")
    p.add_argument("--image-size", type=int, default=128, help="side both tools resize to")
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2, help="each round runs both tools once, order alternating")
    scratch = Path(tempfile.gettempdir()) / "clipline_prep_bench"
    p.add_argument("--data", default=str(scratch / "data"), help="generated scenes (kept for later runs)")
    p.add_argument("--work", default=str(scratch / "work"), help="shards written by both tools")
    p.add_argument("--out", default="benchmarks/results/prep_throughput.json")
    a = p.parse_args()

    from data_prep.serve import LocalImageServer, write_url_list

    split = _data(a)
    runs: dict[str, list[dict]] = {"img2dataset": [], "clipline prep": []}
    tools = {"img2dataset": _plain_img2dataset, "clipline prep": _clipline_prep}
    with LocalImageServer(split.parent) as server:
        urls = write_url_list(split, server, Path(a.work) / "urls.parquet")
        for r in range(a.rounds):
            order = list(tools) if r % 2 == 0 else list(tools)[::-1]
            for name in order:
                out = Path(a.work) / name.replace(" ", "_")
                shutil.rmtree(out, ignore_errors=True)
                start = time.perf_counter()
                written = tools[name](urls, out, a)
                seconds = time.perf_counter() - start
                runs[name].append({"round": r, "images": written, "seconds": round(seconds, 2),
                                   "images_per_s": round(written / seconds, 1)})
                print(f"round {r} {name:14s} {written} images in {seconds:6.1f}s = {written / seconds:6.1f}/s",
                      flush=True)
    rate = {name: statistics.mean(x["images_per_s"] for x in rs) for name, rs in runs.items()}
    ratio = rate["clipline prep"] / rate["img2dataset"]
    result = {"images": a.images, "source_size": a.source_size, "image_size": a.image_size,
              "processes": a.processes, "threads": a.threads, "rounds": a.rounds, "runs": runs,
              "mean_images_per_s": {k: round(v, 1) for k, v in rate.items()}, "ratio": round(ratio, 3),
              "target": ">= 0.9", "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                               "load_avg_at_end": os.getloadavg()}}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print("\n| tool | mean images/s | runs (images/s) |\n|---|---:|---|")
    for name, rs in runs.items():
        print(f"| {name} | {rate[name]:.1f} | {', '.join(str(x['images_per_s']) for x in rs)} |")
    print(f"\nratio clipline prep / img2dataset = {ratio:.3f} (target >= 0.9); written to {a.out}")


if __name__ == "__main__":
    main()
