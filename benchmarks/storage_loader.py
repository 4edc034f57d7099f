"""Loader throughput from object storage: samples/s of the same shards read from a loopback S3 server (moto, started
here) and from local disk, in one run, alternating rounds, as a ratio (issue 15's target: >= 0.9 on loopback);
and the same figure for OpenCLIP's webdataset pipeline (open_clip_train.data.get_wds_dataset) reading the bucket
through a ``pipe:`` command, as its users stream LAION from S3.

    .venv/bin/python benchmarks/storage_loader.py [--preset img2dataset-256] [--images 3072] [--batches 20]
        [--rounds 3] [--workers N]

clipline: ShardStream + training.data.make_loader with the trainer's worker count (train.workers=-1 resolved by
training.trainer.resolve_workers for this machine's device: 1 on a CPU), the worker normalising as on a CPU, reading
``s3://bucket/shards`` through clipline.storage (read-ahead block cache, retries) or the local folder.
OpenCLIP: its own loader with the same worker count, ``pipe:python -c "<s3fs cat of the object to stdout>"`` per
shard (the aws CLI is not installed here; s3fs is what clipline reads with too) against the local brace pattern.
Wall-clock samples/s over --batches batches of 128 after two warm-up batches; each run a fresh process, pipelines
and sources alternating (A B C D, D C B A, ...); medians of the rounds not flagged as loaded
(benchmarks/_bench.py). moto is an in-process Python server, so the loopback figure is a floor for a real
object store's per-stream throughput, not a ceiling.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from input_pipeline import BATCH, PEER_CODE, build_shards  # noqa: E402

BUCKET = "clipline-bench"
KEY, SECRET = "bench", "bench-secret"  # moto accepts any key pair unless told to check them

OURS_CODE = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
import open_clip
from clipline import storage
from clipline.config import StorageConfig
from clipline.shards import list_shards
from training.augment import CropSpec, Normalizer, RandomCropDecoder
from training.data import ShardStream, make_loader
p = json.loads(sys.argv[1])
storage.configure(StorageConfig(endpoint_url=p["endpoint"], options={"key": p["key"], "secret": p["secret"]}))
tokenizer = open_clip.get_tokenizer("ViT-B-32")
normalize = Normalizer(None, None, torch.device("cpu"))
stream = ShardStream(list_shards(p["source"]), batch_size=p["batch"], rank=0, world_size=1, seed=0,
                     shuffle_buffer=2000, decode=RandomCropDecoder(CropSpec(224)), tokenizer=tokenizer,
                     n_streams=max(1, p["workers"]), batch_transform=normalize if p["workers"] else None)
it = iter(make_loader(stream, workers=p["workers"]))
for _ in range(2):
    next(it)
t0 = time.perf_counter()
for _ in range(p["batches"]):
    batch = next(it)
seconds = time.perf_counter() - t0
n = p["batches"] * p["batch"]
getattr(it, "_shutdown_workers", lambda: None)()  # clipline's workers ignore SIGTERM (see input_pipeline.py)
print(json.dumps({"samples_per_s": n / seconds}))
"""

CAT = ("import s3fs,sys,shutil; fs=s3fs.S3FileSystem(key='{key}',secret='{secret}',endpoint_url='{endpoint}'); "
       "f=fs.open(sys.argv[1],'rb',block_size=4<<20); shutil.copyfileobj(f,sys.stdout.buffer,1<<20)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("moto_server did not start (pip install 'moto[server]' s3fs)") from None
            time.sleep(0.1)


def upload(folder: Path, endpoint: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(key=KEY, secret=SECRET, endpoint_url=endpoint)
    fs.mkdir(BUCKET)
    fs.put(str(folder) + "/", f"{BUCKET}/shards/", recursive=True)


def trainer_workers() -> int:
    import torch

    from clipline.dist import DistEnv
    from training.trainer import resolve_workers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return resolve_workers(-1, DistEnv(rank=0, world_size=1, local_rank=0, device=device))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["img2dataset-256", "datacomp-512"], default="img2dataset-256")
    parser.add_argument("--images", type=int, default=3072)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: the trainer's, "
                        "train.workers=-1 resolved for this machine)")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/storage_loader.json"))
    args = parser.parse_args()
    from _bench import alternating, loaded_note, machine, measured, peer_env, quiet_median, round_record, write_result

    workers = trainer_workers() if args.workers is None else args.workers
    folder = build_shards(args.preset, args.images)
    tars = sorted(p.name[:-4] for p in folder.glob("*.tar"))
    brace = f"{{{tars[0]}..{tars[-1]}}}.tar"
    moto, endpoint = start_moto()
    try:
        upload(folder, endpoint)
        cat = CAT.format(key=KEY, secret=SECRET, endpoint=endpoint)
        base = {"batch": BATCH, "batches": args.batches, "workers": workers, "endpoint": endpoint, "key": KEY,
                "secret": SECRET}
        runs = {
            ("clipline", "local"): (OURS_CODE, {**base, "source": str(folder)}),
            ("clipline", "s3"): (OURS_CODE, {**base, "source": f"s3://{BUCKET}/shards"}),
            ("open_clip", "local"): (PEER_CODE, {**base, "pattern": f"{folder}/{brace}"}),
            ("open_clip", "s3"): (PEER_CODE, {**base, "pattern": f'pipe:{sys.executable} -c "{cat}" '
                                                                 f"{BUCKET}/shards/{brace}"}),
        }
        envs = {"clipline": {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                "open_clip": {**peer_env(), "OMP_NUM_THREADS": "1"}}
        rows: dict[tuple[str, str], list[dict]] = {k: [] for k in runs}
        for r in range(args.rounds):
            for name in alternating(list(runs), r):
                code, params = runs[name]
                run = measured([sys.executable, "-c", code, json.dumps(params)], env=envs[name[0]], cwd=REPO)
                value = json.loads(run["stdout"].strip().splitlines()[-1])["samples_per_s"]
                rows[name].append(round_record(run, round=r + 1, samples_per_s=round(value, 1)))
            print(f"round {r + 1}: " + ", ".join(f"{a} {b} {rows[(a, b)][-1]['samples_per_s']:.0f}" for a, b in runs)
                  + " samples/s", flush=True)
    finally:
        moto.terminate()
        moto.wait(timeout=30)
    results = {"benchmark": "storage_loader", "machine": machine(), "preset": args.preset, "images": args.images,
               "batch": BATCH, "batches": args.batches, "rounds": args.rounds, "workers": workers, "pipelines": {}}
    print("\n| pipeline | local disk samples/s | loopback S3 samples/s | S3 / local |\n|---|---:|---:|---:|")
    for pipeline in ("clipline", "open_clip"):
        local, _, _ = quiet_median(rows[(pipeline, "local")], "samples_per_s")
        s3, _, _ = quiet_median(rows[(pipeline, "s3")], "samples_per_s")
        ratio = s3 / local if local and s3 else None
        results["pipelines"][pipeline] = {"local_samples_per_s": local, "s3_samples_per_s": s3, "ratio": ratio,
                                          "local_rounds": rows[(pipeline, "local")],
                                          "s3_rounds": rows[(pipeline, "s3")]}
        note = loaded_note(rows[(pipeline, "local")] + rows[(pipeline, "s3")])
        print(f"| {pipeline}{' (webdataset, pipe:)' if pipeline == 'open_clip' else ''} | {local:.0f} | {s3:.0f} | "
              f"{ratio:.2f}x{note} |")
    path = write_result(args.out, results)
    print(f"\n{path} (target: clipline S3 / local >= 0.9 on loopback; {workers} loader worker(s))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
