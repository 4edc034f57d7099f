"""Demo data that needs no download: procedural scenes, served over HTTP on 127.0.0.1, built into shards by the
same `clipline prep` path a web-scale URL list takes (img2dataset included).

The held-out split is generated first; training scenes whose caption also appears in it are re-drawn, so no
held-out image or caption is ever seen in training.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from clipline.config import Config
from data_prep.demo_scenes import all_captions, write_demo_split
from data_prep.prep import render_report, run_prep
from data_prep.serve import LocalImageServer, write_url_list


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
        with LocalImageServer(parquet.parent) as server:
            urls = write_url_list(parquet, server, source / f"{split}_urls.parquet")
            prep_cfg = dataclasses.replace(cfg.prep, url_list=str(urls), output_dir=output_dir,
                                           allow_private_networks=True)
            start = time.perf_counter()
            manifest = run_prep(prep_cfg)
            served_from = server.base_url
        print(f"\n{split} split, served from {served_from} ({time.perf_counter() - start:.1f}s):\n"
              + render_report(manifest), flush=True)
    return 0
