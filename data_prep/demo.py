"""Demo data that needs no download: procedural scenes, served over HTTP on 127.0.0.1, built into shards by the
same `clipline prep` path a web-scale URL list takes (img2dataset included).

The held-out split is generated first; training scenes whose caption also appears in it are re-drawn, so no
held-out image or caption is ever seen in training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import time
from pathlib import Path

from clipline import storage
from clipline.config import Config
from clipline.errors import UsageError
from clipline.io import atomic_write_text
from clipline.shards import MANIFEST_FILE
from data_prep.demo_scenes import all_captions, write_demo_split
from data_prep.prep import render_report, run_prep
from data_prep.serve import LocalImageServer, write_url_list

DEMO_STAMP = "demo_source.sha256"


def main(cfg: Config) -> int:
    d = cfg.demo
    # Scenes are served over HTTP from a local folder; with run.output_dir in a bucket they are generated in the
    # storage cache and only the URL lists go to the bucket, where `clipline prep` reads them.
    source = storage.local_cache("demo_source", d.source_dir) if storage.is_remote(d.source_dir) else \
        Path(d.source_dir)
    start = time.perf_counter()
    eval_split = write_demo_split(source / "eval", n=d.num_eval, seed=d.seed + 1, image_size=d.image_size,
                                  captions_per_image=d.captions_per_eval_image)
    train_split = write_demo_split(source / "train", n=d.num_train, seed=d.seed, image_size=d.image_size,
                                   exclude_captions=all_captions(eval_split))
    print(f"generated {d.num_train} training and {d.num_eval} held-out scenes in {source} "
          f"({time.perf_counter() - start:.1f}s)", flush=True)
    for split, parquet, output_dir in (("train", train_split, cfg.prep.output_dir),
                                       ("eval", eval_split, d.eval_output_dir)):
        # The served URLs change with the server's port, so "same data" is judged on the generated split.
        digest = hashlib.sha256(parquet.read_bytes()).hexdigest()
        stamp = storage.join(output_dir, DEMO_STAMP)
        made = storage.isfile(stamp)
        if made and storage.read_text(stamp).strip() == digest and storage.isfile(storage.join(output_dir,
                                                                                                MANIFEST_FILE)):
            print(f"{split} shards in {output_dir} are up to date", flush=True)
            continue
        if storage.listdir(output_dir) and not made:
            raise UsageError(f"{output_dir} exists and was not made by `clipline demo`; point the demo elsewhere "
                             f"(run.output_dir=...) rather than overwrite it")
        if storage.is_remote(output_dir):  # the demo's own shards, from other demo settings
            storage.remove(output_dir)
            shutil.rmtree(storage.local_cache("prep", output_dir), ignore_errors=True)
        else:
            shutil.rmtree(output_dir, ignore_errors=True)
        with LocalImageServer(parquet.parent) as server:
            urls: str | Path = write_url_list(parquet, server, source / f"{split}_urls.parquet")
            if storage.is_remote(d.source_dir):
                storage.put_file(urls, storage.join(d.source_dir, urls.name))
                urls = storage.join(d.source_dir, urls.name)
            prep_cfg = dataclasses.replace(cfg.prep, url_list=str(urls), output_dir=output_dir,
                                           allow_private_networks=True)
            start = time.perf_counter()
            manifest = run_prep(prep_cfg)
            served_from = server.base_url
        if storage.is_remote(stamp):
            storage.write_text(stamp, digest + "\n")
        else:
            atomic_write_text(stamp, digest + "\n")
        print(f"\n{split} split, served from {served_from} ({time.perf_counter() - start:.1f}s):\n"
              + render_report(manifest), flush=True)
    return 0
