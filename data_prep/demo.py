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
    source = Path(d.source_dir)
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
        stamp = Path(output_dir) / DEMO_STAMP
        if stamp.is_file() and stamp.read_text().strip() == digest and (Path(output_dir) / MANIFEST_FILE).is_file():
            print(f"{split} shards in {output_dir} are up to date", flush=True)
            continue
        if Path(output_dir).exists() and any(Path(output_dir).iterdir()) and not stamp.is_file():
            raise UsageError(f"{output_dir} exists and was not made by `clipline demo`; point the demo elsewhere "
                             f"(run.output_dir=...) rather than overwrite it")
        shutil.rmtree(output_dir, ignore_errors=True)  # the demo's own shards, from other demo settings
        with LocalImageServer(parquet.parent) as server:
            urls = write_url_list(parquet, server, source / f"{split}_urls.parquet")
            prep_cfg = dataclasses.replace(cfg.prep, url_list=str(urls), output_dir=output_dir,
                                           allow_private_networks=True)
            start = time.perf_counter()
            manifest = run_prep(prep_cfg)
            served_from = server.base_url
        atomic_write_text(stamp, digest + "\n")
        print(f"\n{split} split, served from {served_from} ({time.perf_counter() - start:.1f}s):\n"
              + render_report(manifest), flush=True)
    return 0
