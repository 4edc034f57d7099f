"""Build throughput of `clipline prep` with the filters users keep on, against plain img2dataset, same list, same
server, same resize, same processes and threads, in one run; and where clipline prep's CPU time goes, per stage.

    .venv/bin/python benchmarks/prep_throughput.py [--images 5000] [--rounds 3]

Data: --images photo-like JPEGs (benchmarks/input_pipeline.picture: colour fields, hard-edged shapes and sensor
noise, so they compress and decode like photos), each side drawn from 300..700 px, quality 90, generated
deterministically once under --data; about 3% of the list points at a second copy of an earlier image (exact
duplicates for the dedup stage to find). Captions are 5-15 English words. They are served from one loopback server.

Both tools resize to 256 px, center crop, quality 90, 2 processes x 32 threads (--image-size, --processes,
--threads). clipline prep runs with the filters users keep on: its caption filters (length, word count,
boilerplate), languages=[en] (language identification of every caption), exact dedup (sha256) and near dedup
within Hamming distance 4 of the 64-bit pHash (--near-dedup-distance), plus its manifest, report and plots.

Timing: each run is a fresh process; within a round the tools alternate which runs first (A B, B A, ...).
images/s = images of the list / seconds of the tool's call inside that process (the figure compared: clipline
drops some rows before downloading and some images after, so it writes fewer); images written per second beside it.
Two ratios: of the two tools' median rates, and the median of the per-round ratios (each round's runs are back to
back, so their ratio cancels the drift of a shared machine's speed between rounds). Beside each run the JSON has the
load around it (benchmarks/_bench.py; rounds where other processes kept more than a quarter of a core busy are
flagged `loaded` and left out of the medians and the per-round ratios).

Per-stage CPU time of clipline prep (thread CPU time, time.thread_time, summed around each stage's function in the
measured process, so the figures are CPU seconds whatever the machine's load):
  download, decode, resize   CPU of img2dataset's worker processes (the children's rusage); the pHash of each
                             image is computed there too (data_prep.downloader.PhashingWriter)
  language id                py3langid on the URL list's captions (model load included): in processes of its own
                             (data_prep.filters.LanguageJob, forked before img2dataset is imported), which report
                             their CPU; it is taken out of the children's rusage above
  pHash                      data_prep.reshard.phash_bytes in the parent: only images without a hash from the
                             download (none in this benchmark, so the stage is absent from its table)
  dedup index                data_prep.dedup.HammingIndex (near-duplicate search and inserts) + the sha256 set
  writing                    data_prep.reshard.ShardWriter (the filtered shards)
  the rest                   everything else in the parent (list validation, reading shards, manifest, report)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from _bench import alternating, loaded_note, machine, measured, quiet_median, round_record, write_result  # noqa: E402

TOOLS = ("img2dataset", "clipline prep")
DUPLICATE_FRACTION = 0.03


def build_data(folder: Path, n: int) -> Path:
    """``n`` photo-like JPEGs of 300..700 px a side plus ``list.parquet`` (path, caption); reused when present."""
    import numpy as np
    import pandas as pd

    from input_pipeline import WORDS, picture

    listing = folder / "list.parquet"
    if listing.is_file():
        return listing
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng, words = np.random.default_rng(0), random.Random(0)
    rows = []
    for i in range(n):
        path = f"images/{i:07d}.jpg"
        if i > 10 and words.random() < DUPLICATE_FRACTION:  # a second copy of an earlier image
            (folder / path).write_bytes((folder / rows[words.randrange(len(rows))]["path"]).read_bytes())
        else:
            (folder / path).write_bytes(picture(rng, int(rng.integers(300, 701)), int(rng.integers(300, 701))))
        rows.append({"path": path, "caption": " ".join(words.choices(WORDS, k=words.randint(5, 15)))})
    tmp = listing.with_name(".list.parquet.tmp")
    pd.DataFrame(rows).to_parquet(tmp, index=False)
    os.replace(tmp, listing)
    size = sum(p.stat().st_size for p in (folder / "images").iterdir())
    print(f"built {n} JPEGs in {folder} ({size / n / 1024:.0f} KiB each on average)", flush=True)
    return listing


def url_list(listing: Path, base_url: str, out: Path) -> Path:
    import pandas as pd

    frame = pd.read_parquet(listing)
    frame["url"] = [f"{base_url}/{p}" for p in frame["path"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    frame[["url", "caption"]].to_parquet(out, index=False)
    return out


# --- the measured calls, each in a fresh process (--child) -----------------------------------------------------


class StageClock:
    """Thread CPU seconds spent inside wrapped functions, by stage."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.forked: dict[str, float] = {}
        """CPU seconds of child processes a stage ran in (also in the children's rusage)."""
        self._depth = 0

    def wrap(self, owner, name: str, stage: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            if self._depth:  # nested inside another timed stage: counted there
                return original(*args, **kwargs)
            self._depth += 1
            t0 = time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.thread_time() - t0

        setattr(owner, name, timed)


def plain_img2dataset(urls: Path, out: Path, a: dict) -> int:
    from img2dataset import download

    download(url_list=str(urls), input_format="parquet", url_col="url", caption_col="caption",
             output_folder=str(out), output_format="webdataset", image_size=a["image_size"],
             resize_mode="center_crop", encode_quality=a["quality"], number_sample_per_shard=a["per_shard"],
             processes_count=a["processes"], thread_count=a["threads"], timeout=10, extract_exif=False,
             enable_wandb=False)
    return sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))


def clipline_prep(urls: Path, out: Path, a: dict, clock: StageClock) -> int:
    import data_prep.filters
    import data_prep.reshard
    from clipline.config import PrepConfig, PrepFilterConfig
    from data_prep.dedup import HammingIndex
    from data_prep.prep import run_prep

    clock.wrap(data_prep.filters, "detect_languages", "language id")  # where fork is unavailable
    collect = data_prep.filters.LanguageJob.result

    def result(job):
        out = collect(job)
        clock.forked["language id"] = clock.forked.get("language id", 0.0) + job.cpu_seconds
        job.cpu_seconds = 0.0
        return out

    data_prep.filters.LanguageJob.result = result
    clock.wrap(data_prep.reshard, "phash_bytes", "pHash")
    clock.wrap(HammingIndex, "contains_near", "dedup index")
    clock.wrap(HammingIndex, "add", "dedup index")
    clock.wrap(data_prep.filters.SampleFilters, "_first_seen", "dedup index")
    clock.wrap(data_prep.reshard.ShardWriter, "write", "writing")
    clock.wrap(data_prep.reshard.ShardWriter, "close", "writing")
    filters = PrepFilterConfig(languages=["en"], exact_dedup=True, near_dedup_distance=a["near_dedup_distance"])
    cfg = PrepConfig(url_list=str(urls), output_dir=str(out), image_size=a["image_size"],
                     encode_quality=a["quality"], samples_per_shard=a["per_shard"], processes=a["processes"],
                     threads=a["threads"], timeout=10, allow_private_networks=True, filters=filters)
    return run_prep(cfg).total_samples


def child(task: dict) -> None:
    urls, out = Path(task["urls"]), Path(task["out"])
    shutil.rmtree(out, ignore_errors=True)
    clock = StageClock()
    self0, t0 = time.process_time(), time.perf_counter()
    if task["tool"] == "img2dataset":
        written = plain_img2dataset(urls, out, task)
    else:
        written = clipline_prep(urls, out, task, clock)
    seconds, parent_cpu = time.perf_counter() - t0, time.process_time() - self0
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    stages = {"download, decode, resize": kids.ru_utime + kids.ru_stime - sum(clock.forked.values()),
              **clock.seconds}
    for stage, cpu in clock.forked.items():
        stages[stage] = stages.get(stage, 0.0) + cpu
    stages["the rest (parent)"] = max(0.0, parent_cpu - sum(clock.seconds.values()))
    print(json.dumps({"written": written, "seconds": seconds, "stages_cpu_s": stages}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--image-size", type=int, default=256, help="side both tools resize (center crop) to")
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=32)
    p.add_argument("--near-dedup-distance", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3, help="each round runs both tools once, order alternating")
    scratch = Path(tempfile.gettempdir()) / "clipline_prep_bench"
    p.add_argument("--data", default=str(REPO / "benchmarks" / ".cache"), help="generated images (kept)")
    p.add_argument("--work", default=str(scratch / "work"), help="shards written by both tools")
    p.add_argument("--out", default=str(REPO / "benchmarks/results/prep_throughput.json"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(json.loads(a.child))
        return 0

    from data_prep.serve import LocalImageServer

    data = Path(a.data) / f"prep-photos-{a.images}"
    listing = build_data(data, a.images)
    settings = {"image_size": a.image_size, "quality": a.quality, "per_shard": a.per_shard,
                "processes": a.processes, "threads": a.threads, "near_dedup_distance": a.near_dedup_distance}
    rows = []
    with LocalImageServer(data) as server:
        host, port = server.server_address
        urls = url_list(listing, f"http://{host}:{port}", Path(a.work) / "urls.parquet")
        for r in range(a.rounds):
            for tool in alternating(list(TOOLS), r):
                task = {**settings, "tool": tool, "urls": str(urls), "out": str(Path(a.work) / tool.replace(" ", "_"))}
                run = measured([sys.executable, __file__, "--child", json.dumps(task)], cwd=REPO)
                got = json.loads(run["stdout"].strip().splitlines()[-1])
                rate = a.images / got["seconds"]
                rows.append(round_record(run, round=r + 1, tool=tool, images=got["written"],
                                         tool_seconds=round(got["seconds"], 2), images_per_s=round(rate, 1),
                                         written_per_s=round(got["written"] / got["seconds"], 1),
                                         stages_cpu_s={k: round(v, 3) for k, v in got["stages_cpu_s"].items()}))
                print(f"round {r + 1} {tool:14s} {a.images} listed, {got['written']} written in {got['seconds']:6.1f} s "
                      f"= {rate:6.1f} listed images/s "
                      f"(other cores busy {run['other_cores']:.2f}{', LOADED' if run['loaded'] else ''})", flush=True)
    summary = {}
    for tool in TOOLS:
        median, used, all_loaded = quiet_median([x for x in rows if x["tool"] == tool], "images_per_s")
        summary[tool] = {"images_per_s": median, "rounds_used": used, "all_rounds_loaded": all_loaded}
    ours = [x for x in rows if x["tool"] == "clipline prep"]
    stages = {}
    for x in ours:
        for stage, cpu in x["stages_cpu_s"].items():
            stages.setdefault(stage, []).append(cpu * 1e3 / max(1, x["images"]))
    import statistics

    # Each round's two runs are back to back: their ratio cancels the machine's drift between rounds (on a shared
    # VM a tool's own rate can move 20% from one round to the next with no other process busy).
    paired = []
    for r in range(1, a.rounds + 1):
        pair = {x["tool"]: x for x in rows if x["round"] == r and not x["loaded"]}
        if len(pair) == 2:
            paired.append(round(pair["clipline prep"]["images_per_s"] / pair["img2dataset"]["images_per_s"], 3))
    per_image = {stage: round(statistics.median(v), 3) for stage, v in stages.items()}
    result = {"benchmark": "prep_throughput", "machine": machine(), "images": a.images, "settings": settings,
              "filters": {"caption filters": "defaults", "languages": ["en"], "exact_dedup": True,
                          "near_dedup_distance": a.near_dedup_distance},
              "rounds": rows, "summary": summary,
              "ratio": summary["clipline prep"]["images_per_s"] / summary["img2dataset"]["images_per_s"],
              "paired_ratios": paired, "median_paired_ratio": statistics.median(paired) if paired else None,
              "clipline_cpu_ms_per_written_image_by_stage": per_image}
    write_result(a.out, result)
    print("\n| tool | listed images/s, median | rounds |\n|---|---:|---|")
    for tool in TOOLS:
        per = ", ".join(f"{x['images_per_s']}{'*' if x['loaded'] else ''}" for x in rows if x["tool"] == tool)
        print(f"| {tool} | {summary[tool]['images_per_s']:.1f} | {per} |")
    print(f"\nratio clipline prep / img2dataset = {result['ratio']:.3f}{loaded_note(rows)} (* = loaded round)")
    if paired:
        print(f"per round (the two runs back to back): {', '.join(f'{x:.3f}' for x in paired)}; "
              f"median {result['median_paired_ratio']:.3f}")
    print("\nclipline prep, CPU ms per written image, by stage (median over rounds):")
    for stage, ms in per_image.items():
        print(f"  {stage:28s} {ms:8.3f}")
    print(f"-> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
