"""`clipline prep`: URL + caption list -> webdataset shards, sizes.json, manifest.json and a readable report.

img2dataset does the downloading; this module validates the list first (so bad input fails before any output
exists), refuses non-public addresses unless allowed, and turns img2dataset's per-shard files into the
shard contract of :mod:`clipline.shards`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from clipline.config import Config, PrepConfig
from clipline.errors import UsageError
from clipline.io import atomic_write, atomic_write_json, atomic_write_text
from clipline.shards import ShardManifest, write_sizes
from data_prep.address_guard import refusal_reason
from data_prep.url_list import clean_rows, read_url_list

DOWNLOAD_DIR = "_download"
"""img2dataset's working folder inside the output folder: per-shard status parquet and stats, the cleaned URL list.
Complete shards are moved from it to the output folder, so readers only ever see finished tars."""
INPUT_FILE = "urls.parquet"
INPUT_HASH = "urls.sha256"


def main(cfg: Config) -> int:
    manifest = run_prep(cfg.prep)
    print(render_report(manifest), flush=True)
    return 0


def _guard_addresses(df: pd.DataFrame, url_col: str) -> tuple[pd.DataFrame, Counter]:
    cache: dict[str, str | None] = {}
    reasons = df[url_col].map(lambda u: refusal_reason(u, cache))
    refused = Counter(r for r in reasons if r is not None)
    return df[reasons.isna()].reset_index(drop=True), refused


def prepare_input(cfg: PrepConfig) -> tuple[pd.DataFrame, dict[str, int]]:
    """Read, validate and clean the URL list; nothing is written."""
    df = read_url_list(cfg.url_list, cfg.url_col, cfg.caption_col)
    rows_in = len(df)
    df, dropped = clean_rows(df, cfg.url_col, cfg.caption_col)
    if not cfg.allow_private_networks:
        df, refused = _guard_addresses(df, cfg.url_col)
        dropped.update({f"refused_{k}": v for k, v in refused.items()})
    if len(df) == 0:
        raise UsageError(f"no usable rows in {cfg.url_list}: all {rows_in} were dropped ({dropped}); "
                         f"check the URL and caption columns"
                         + ("" if cfg.allow_private_networks else
                            " (URLs on loopback/private networks need prep.allow_private_networks=true)"))
    return df, {"rows_in": rows_in, **{f"dropped_{k}": v for k, v in dropped.items()}}


def _extra_columns(cfg: PrepConfig, df: pd.DataFrame) -> list[str]:
    if cfg.extra_columns is None:
        return [c for c in df.columns if c not in (cfg.url_col, cfg.caption_col)]
    missing = [c for c in cfg.extra_columns if c not in df.columns]
    if missing:
        raise UsageError(f"prep.extra_columns names columns the URL list lacks: {missing}; it has {list(df.columns)}")
    return list(cfg.extra_columns)


def run_prep(cfg: PrepConfig) -> ShardManifest:
    df, input_stats = prepare_input(cfg)
    extra = _extra_columns(cfg, df)
    out = Path(cfg.output_dir)
    work = out / DOWNLOAD_DIR
    digest = hashlib.sha256(pd.util.hash_pandas_object(df[[cfg.url_col, cfg.caption_col]], index=True)
                            .values.tobytes()).hexdigest()
    if (work / INPUT_HASH).is_file() and (work / INPUT_HASH).read_text().strip() != digest:
        raise UsageError(f"{out} holds shards built from another URL list: pick a new prep.output_dir, or delete "
                         f"{out} to rebuild it (re-running with the same list resumes instead)")
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(work / INPUT_HASH, digest + "\n")
    input_path = atomic_write(work / INPUT_FILE, lambda p: df.to_parquet(p, index=False))
    _download(cfg, str(input_path), str(work), extra)
    return _collect(cfg, out, work, input_stats)


def _download(cfg: PrepConfig, input_path: str, work: str, extra: list[str]) -> None:
    # albumentations (imported by img2dataset) otherwise checks for updates over the network in every process.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset import download

    download(
        url_list=input_path, input_format="parquet", url_col=cfg.url_col, caption_col=cfg.caption_col,
        save_additional_columns=extra or None, output_folder=work, output_format="webdataset",
        image_size=cfg.image_size, resize_mode=cfg.resize_mode, encode_format=cfg.encode_format,
        encode_quality=cfg.encode_quality, number_sample_per_shard=cfg.samples_per_shard,
        processes_count=cfg.processes, thread_count=cfg.threads, timeout=cfg.timeout, retries=cfg.retries,
        min_image_size=cfg.min_image_size, user_agent_token=cfg.user_agent_token,
        disallowed_header_directives=cfg.disallowed_header_directives, distributor="multiprocessing",
        incremental_mode="incremental", enable_wandb=False,
    )


def _collect(cfg: PrepConfig, out: Path, work: Path, input_stats: dict) -> ShardManifest:
    """Move finished shards into place and write sizes.json, manifest.json, stats.json and report.md."""
    sizes: dict[str, int] = {}
    status: Counter = Counter()
    errors: Counter = Counter()
    # A shard is finished once img2dataset wrote its stats file; a tar without one is a crash's leftover.
    for stats_path in sorted(work.glob("[0-9]*_stats.json")):
        shard = stats_path.name[: -len("_stats.json")]
        stats = json.loads(stats_path.read_text())
        if (work / f"{shard}.tar").is_file():
            os.replace(work / f"{shard}.tar", out / f"{shard}.tar")
        if stats.get("successes", 0) > 0 and (out / f"{shard}.tar").is_file():
            sizes[f"{shard}.tar"] = int(stats["successes"])
        status.update({"success": stats.get("successes", 0), "failed_to_download": stats.get("failed_to_download", 0),
                       "failed_to_resize": stats.get("failed_to_resize", 0)})
        errors.update(stats.get("status_dict", {}))
    # Shards that came out empty are removed, so readers never open a tar with no samples.
    for tar in out.glob("[0-9]*.tar"):
        if tar.name not in sizes:
            tar.unlink()
    shutil.rmtree(work / "_tmp", ignore_errors=True)
    if not sizes:
        raise UsageError(f"prep wrote no samples to {out}: every download failed ({dict(errors.most_common(5))}); "
                         f"check that the URLs are reachable")
    errors.pop("success", None)
    stats = {**input_stats, **dict(status), "failure_reasons": dict(errors.most_common(20))}
    manifest = ShardManifest(shards=sorted(sizes), sizes=sizes, total_samples=sum(sizes.values()),
                             source=str(cfg.url_list), stats=stats, config=asdict(cfg))
    write_sizes(out, sizes)
    atomic_write_json(out / "stats.json", stats)
    manifest.write(out)
    atomic_write_text(out / "report.md", render_report(manifest))
    return manifest


def render_report(m: ShardManifest) -> str:
    s = m.stats
    lines = [f"# Shards built from {m.source}", "",
             f"{m.total_samples} samples in {len(m.shards)} shards.", "",
             "| step | count |", "|---|---:|", f"| rows in the URL list | {s.get('rows_in', 0)} |"]
    lines += [f"| dropped before download: {k[len('dropped_'):].replace('_', ' ')} | {v} |"
              for k, v in s.items() if k.startswith("dropped_")]
    lines += [f"| downloaded and written | {s.get('success', 0)} |",
              f"| failed to download | {s.get('failed_to_download', 0)} |",
              f"| failed to decode/resize | {s.get('failed_to_resize', 0)} |"]
    if s.get("failure_reasons"):
        lines += ["", "Failure reasons (most common first):", ""]
        lines += [f"- {reason}: {n}" for reason, n in s["failure_reasons"].items()]
    return "\n".join(lines) + "\n"
