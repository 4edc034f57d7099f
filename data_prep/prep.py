"""`clipline prep`: URL + caption list -> clean, deduplicated, decontaminated webdataset shards, with the funnel
that accounts for every row (listed -> downloaded -> after each filter -> written) and a report.

The build, in order:

1. read and validate the list (nothing is written before it passes), drop rows that cannot become samples and
   repeated URLs, apply the caption filters and the pre-download address check: all before any download;
2. download with img2dataset under :mod:`data_prep.downloader`'s safeguards into ``{output_dir}/_download``
   (incremental: the same command resumes);
3. meanwhile, as img2dataset finishes each shard (taken in order, samples in key order), apply the image
   filters (size, aspect ratio, exact and near duplicates, decontamination, CLIP score) and write the survivors
   into ``{output_dir}/NNNNN.tar``;
4. write ``sizes.json``, ``manifest.json``, ``stats.json``, ``report.md`` and its plots.

``prep.input_shards`` runs steps 3-4 (with the caption filters) on an existing shard folder instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import itertools
import json
import shutil
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pandas as pd

from clipline.config import Config, PrepConfig
from clipline.storage import parent as storage_parent
from clipline.storage import redact
from clipline.errors import UsageError
from clipline.io import atomic_write, atomic_write_json, atomic_write_text
from clipline.shards import MANIFEST_FILE, SIZES_FILE, ShardManifest, list_shards, write_sizes
from data_prep import curate as curation
from data_prep import remote
from data_prep.address_guard import parse_networks, refusal_reason
from data_prep.filters import Funnel, LanguageJob, SampleFilters, caption_keep_mask, caption_text, top_removed
from data_prep.report import render_report, write_plots
from data_prep.url_list import CAPTIONLESS, ListReport, read_url_list, validate_rows

# data_prep.fetch, .downloader and .reshard are imported where they are used: fetch imports img2dataset, which
# imports torch (seconds), and a bad list must be refused before that.

DOWNLOAD_DIR = "_download"
"""img2dataset's working folder inside the output folder: its unfiltered shards, per-shard status parquet and
stats, and the cleaned URL list."""
INPUT_FILE = "urls.parquet"
INPUT_HASH = "urls.sha256"
LOCK_FILE = ".prep.lock"
STATS_FILE = "stats.json"
REPORT_FILE = "report.md"
_EXECUTION_ONLY = ("processes", "threads", "distributor", "spark_master", "mode", "keep_downloads", "output_dir",
                   "url_list", "per_host_connections", "per_host_rate", "max_retry_after")
"""Config fields that change how a build runs, not what it produces."""

__all__ = ["main", "run_prep", "prepare_input", "render_report", "DOWNLOAD_DIR"]


def log(message: str) -> None:
    print(message, flush=True)


def main(cfg: Config) -> int:
    manifest = run_prep(cfg.prep)
    log(render_report(manifest))
    return 0


# ------------------------------------------------------------------------------------------------------------
# Step 1: the list


def _guard_addresses(df: pd.DataFrame, cfg: PrepConfig) -> pd.Series:
    allowed = parse_networks(cfg.allowed_networks)
    cache: dict[str, str | None] = {}
    # No DNS here: a serial lookup per host does not scale to web lists, and each connection is checked anyway.
    return df["url"].map(lambda u: refusal_reason(u, cache, allowed, resolve=False))


RESERVED_COLUMNS = {"key", "caption", "url", "width", "height", "original_width", "original_height", "status",
                    "error_message", "exif", "md5", "sha256", "sha512"}
"""Names img2dataset writes into each sample's .json itself (its arguments_validator refuses them as extras)."""


def _extra_columns(cfg: PrepConfig, df: pd.DataFrame) -> list[str]:
    reserved = RESERVED_COLUMNS
    if cfg.extra_columns is None:
        return [c for c in df.columns if c not in (cfg.url_col, cfg.caption_col) and c not in reserved]
    missing = [c for c in cfg.extra_columns if c not in df.columns]
    if missing:
        raise UsageError(f"prep.extra_columns names columns the URL list lacks: {missing}; it has {list(df.columns)}")
    taken = sorted(set(cfg.extra_columns) & reserved)
    if taken:
        raise UsageError(f"prep.extra_columns {taken} collide with names img2dataset writes into each sample's "
                         f".json ({sorted(reserved)}); rename those columns in the list")
    return list(cfg.extra_columns)


def prepare_input(cfg: PrepConfig, funnel: Funnel | None = None,
                  removed_captions: dict[str, Counter] | None = None,
                  before_filters=None) -> tuple[pd.DataFrame, ListReport]:
    """Read, validate and clean the URL list, apply the caption filters and the address check; nothing is written.

    Returns the rows to download, with columns ``url``, ``caption`` and the extra columns; ``attrs[CAPTIONLESS]``
    is set for a list without captions (bare-URL .txt), on which no caption filter runs. The captions the filters
    removed are counted per reason into ``removed_captions``. ``before_filters()`` runs once the list has passed
    validation, before the caption filters.
    """
    funnel = funnel if funnel is not None else Funnel()
    df = read_url_list(cfg.url_list, cfg.url_col, cfg.caption_col)
    captionless = bool(df.attrs.get(CAPTIONLESS))
    funnel.start("listed", len(df))
    df, report = validate_rows(df, cfg.url_col, cfg.caption_col)
    funnel.record("list validation", report.dropped)
    extra = _extra_columns(cfg, df)
    df = df[[cfg.url_col, cfg.caption_col, *extra]].rename(columns={cfg.url_col: "url", cfg.caption_col: "caption"})
    # Language identification (the one slow caption filter) starts now, in other processes, and is collected
    # after before_filters() (prep's imports of img2dataset and torch, seconds).
    languages = (LanguageJob(caption_text(df["caption"]), cfg.processes)
                 if cfg.filters.languages and not captionless else None)
    try:
        if before_filters is not None:
            before_filters()
        if captionless:
            funnel.record("caption filters (none: the list has no captions)", {})
        else:
            keep = caption_keep_mask(df["caption"], cfg.filters, funnel, removed_captions=removed_captions,
                                     languages=languages)
            df = df[keep.to_numpy()].reset_index(drop=True)
    finally:
        if languages is not None:
            languages.close()
    if not cfg.allow_private_networks and len(df):
        reasons = _guard_addresses(df, cfg)
        funnel.record("address check", {f"refused_{k}": v for k, v in Counter(reasons.dropna()).items()})
        df = df[reasons.isna().to_numpy()].reset_index(drop=True)
    df.attrs[CAPTIONLESS] = captionless
    if len(df) == 0:
        removed = {k: v for s in funnel.stages for k, v in s.removed.items()}
        raise UsageError(f"no usable rows in {cfg.url_list}: all {report.rows_in} were dropped ({removed}); "
                         f"check the URL and caption columns and prep.filters"
                         + ("" if cfg.allow_private_networks else
                            " (URLs on loopback/private networks need prep.allow_private_networks=true or "
                            "prep.allowed_networks)"))
    return df, report


_DOWNLOAD_SHAPING = ("image_size", "resize_mode", "encode_format", "encode_quality", "samples_per_shard",
                     "max_image_bytes", "max_image_pixels", "accepted_content_types", "check_content_type",
                     "user_agent_token", "disallowed_header_directives", "respect_robots_txt",
                     "allow_private_networks", "allowed_networks")
"""Settings that shape what img2dataset writes into ``_download`` (the image filters do not: they run on it, and
a change of them re-filters the kept downloads)."""


def _list_digest(df: pd.DataFrame, cfg: PrepConfig) -> str:
    """Fingerprint of the downloads: every column carried into the samples (names, order and values, the caption
    filters' verdict included, as the rows they left) and the settings that shape the downloaded samples."""
    values = pd.util.hash_pandas_object(df.astype(str), index=True).values.tobytes()
    settings = {k: getattr(cfg, k) for k in _DOWNLOAD_SHAPING}
    header = json.dumps([list(df.columns), settings, bool(df.attrs.get(CAPTIONLESS))], sort_keys=True, default=str)
    return hashlib.sha256(header.encode() + values).hexdigest()


def build_key(cfg: PrepConfig, list_digest: str) -> str:
    """Identifies what a build produces: the list to download plus every setting that shapes the output."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in _EXECUTION_ONLY}
    return hashlib.sha256(json.dumps([list_digest, settings], sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------------------
# The output folder: one build at a time, overwrite, up-to-date check


@contextlib.contextmanager
def build_lock(out: Path):
    """Refuse a second `clipline prep` on the same folder; the kernel drops the lock if the process dies."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_FILE, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"another `clipline prep` is writing to {out}; wait for it or pick another "
                             f"prep.output_dir") from None
        yield


def clear_build(out: Path) -> None:
    """Delete what `clipline prep` writes in ``out`` (and nothing else)."""
    shutil.rmtree(out / DOWNLOAD_DIR, ignore_errors=True)
    for pattern in ("[0-9]*.tar", ".[0-9]*.tar.tmp", SIZES_FILE, MANIFEST_FILE, STATS_FILE, REPORT_FILE,
                    "report_*.png"):
        for p in out.glob(pattern):
            p.unlink()


def _up_to_date(out: Path, key: str) -> ShardManifest | None:
    try:
        manifest = ShardManifest.read(out)
    except (OSError, ValueError, TypeError):
        return None
    if manifest.stats.get("build_key") == key and all((out / s).is_file() for s in manifest.shards):
        return manifest
    return None


# ------------------------------------------------------------------------------------------------------------
# Step 2: download


def fetch_policy(cfg: PrepConfig):
    from data_prep.fetch import FetchPolicy

    return FetchPolicy(
        timeout=float(cfg.timeout), deadline=cfg.deadline, retries=cfg.retries, max_bytes=cfg.max_image_bytes,
        max_pixels=cfg.max_image_pixels, user_agent_token=cfg.user_agent_token,
        disallowed_header_directives=frozenset(d.strip().lower() for d in cfg.disallowed_header_directives),
        respect_robots_txt=cfg.respect_robots_txt, allow_private_networks=cfg.allow_private_networks,
        allowed_networks=tuple(cfg.allowed_networks), accepted_content_types=tuple(cfg.accepted_content_types),
        check_content_type=cfg.check_content_type, per_host_connections=cfg.per_host_connections,
        per_host_rate=cfg.per_host_rate, max_retry_after=cfg.max_retry_after)


def _download(cfg: PrepConfig, work: Path, df: pd.DataFrame, phash: bool = False) -> None:
    from data_prep.downloader import DownloadRequest, run_download

    input_path = atomic_write(work / INPUT_FILE, lambda p: df.to_parquet(p, index=False))
    run_download(DownloadRequest(
        url_list=str(input_path), output_folder=str(work), rows=len(df),
        extra_columns=[c for c in df.columns if c not in ("url", "caption")], policy=fetch_policy(cfg),
        image_size=cfg.image_size, resize_mode=cfg.resize_mode, encode_format=cfg.encode_format,
        encode_quality=cfg.encode_quality, samples_per_shard=cfg.samples_per_shard, processes=cfg.processes,
        threads=cfg.threads, distributor=cfg.distributor, spark_master=cfg.spark_master, phash=phash))


def download_outcomes(work: Path) -> tuple[Counter, Counter, Counter, Counter]:
    """img2dataset's status counts, failure reasons and raw failure messages over every finished shard, and the
    fetch notes (images whose Content-Type disagrees with their bytes)."""
    from data_prep.downloader import finished_shards, read_fetch_notes
    from data_prep.fetch import failure_reason

    status, reasons, messages, notes = Counter(), Counter(), Counter(), Counter()
    for shard_id in sorted(finished_shards(work)):
        notes.update(read_fetch_notes(work, shard_id))
        table = pd.read_parquet(work / f"{shard_id:05d}.parquet", columns=["status", "error_message"])
        status.update(table["status"].fillna("failed_to_download"))
        failed = table[table["status"] != "success"]
        messages.update(failed["error_message"].fillna("unknown"))
        reasons.update(failed["error_message"].map(failure_reason))
    return status, reasons, messages, notes


# ------------------------------------------------------------------------------------------------------------
# Step 3: filters over shards


def _sample_meta(row) -> dict:
    from data_prep.reshard import phash_hex

    meta = {}
    if getattr(row, "phash", None) is not None and phash_hex(row.phash):
        meta["phash"] = phash_hex(row.phash)
    score = getattr(row, "clip_score", None)
    if score is not None and not np.isnan(score):
        meta["clip_score"] = round(float(score), 6)
    return meta


@dataclass
class Filtered:
    sizes: dict[str, int]
    """Output shard -> samples."""
    kept: pd.DataFrame
    """Features of the written samples (caption, original size, hashes, scores)."""
    read: int
    stages: dict[str, Counter]
    """Filter stage -> removed by reason, in the order the stages ran."""
    checksums: dict[str, dict]
    """Output shard -> {"bytes", "sha256"}."""


def filter_and_write(filters: SampleFilters, cfg: PrepConfig, shards: Iterable[str], n_shards: int, out: Path,
                     stats: dict) -> Filtered:
    """Filter the samples of ``shards`` (in order) and write the survivors to ``out`` as they come. Only a CLIP
    top fraction waits for every score, then re-reads the shards to write."""
    from data_prep.reshard import (FEATURE_COLUMNS, ShardWriter, image_of, output_files, progress, read_shard,
                                   remove_stale, write_kept)

    out.mkdir(parents=True, exist_ok=True)
    # From here the folder's shards change: a manifest left from an earlier build must not vouch for them.
    for name in (MANIFEST_FILE, SIZES_FILE):
        (out / name).unlink(missing_ok=True)
    remove_stale(out)
    writer = ShardWriter(out, cfg.samples_per_shard)
    skipped: Counter = Counter()
    kept_parts, read = [], 0
    # The bar starts with the first shard: while img2dataset downloads, shards arrive as it finishes them, and its
    # start-up lines, printed by another process, would otherwise run into the bar's line.
    shards = iter(shards)
    first = next(shards, None)
    for shard in progress(itertools.chain([first], shards) if first is not None else [], n_shards, "filtering"):
        start = time.perf_counter()
        features, samples = read_shard(shard, filters.needs_phash, skipped)
        read += len(features)
        keys = features["key"].tolist()
        keep = filters.apply(features, lambda rows: [image_of(samples[keys[i]]) for i in rows])
        kept = features[keep]
        if not filters.deferred:
            for row in kept.itertuples(index=False):
                writer.write(row.key, output_files(samples[row.key], _sample_meta(row)))
        kept_parts.append(kept)
        stats["timings"]["filter_and_write"] = stats["timings"].get("filter_and_write", 0) + time.perf_counter() - start
    kept = pd.concat(kept_parts, ignore_index=True) if kept_parts else pd.DataFrame(columns=FEATURE_COLUMNS)
    if filters.deferred:
        kept = kept[filters.apply_deferred(kept["clip_score"].to_numpy())]
        write_kept(kept, writer, skipped, _sample_meta)
    if skipped:
        stats["skipped_while_reading"] = dict(skipped)
    sizes = writer.close()
    return Filtered(sizes, kept, read, filters.removed, writer.checksums)


def _record(funnel: Funnel, result: Filtered, caption_filters: bool) -> None:
    if caption_filters:
        funnel.start("read from shards", result.read)
    for stage, removed in result.stages.items():
        funnel.record(stage, dict(removed))
    funnel.record("written", {})


class ConcurrentFilter(threading.Thread):
    """Filters and writes each downloaded shard, in order, as soon as img2dataset finishes it: the parent process
    is idle while its workers download, and the last shards download on fewer cores than the first, so the filter
    pass costs little wall time on top of the download."""

    POLL_S = 0.1

    def __init__(self, filters, cfg: PrepConfig, work: Path, n_shards: int, out: Path, stats: dict,
                 on_download=None):
        super().__init__(name="prep-filter", daemon=True)
        self.filters, self.cfg, self.work, self.n_shards, self.out, self.stats = filters, cfg, work, n_shards, out, stats
        self.on_download = on_download
        """Called with each finished download shard's id before it is filtered (the mirror to a bucket)."""
        self.download_done = threading.Event()
        self.result: Filtered | None = None
        self.error: BaseException | None = None

    def _finished_shards(self) -> Iterator[str]:
        for shard_id in range(self.n_shards):
            name = f"{shard_id:05d}"
            while not (self.work / f"{name}_stats.json").is_file():
                if self.download_done.wait(self.POLL_S) and not (self.work / f"{name}_stats.json").is_file():
                    raise _DownloadStopped()
            if self.on_download is not None:
                self.on_download(shard_id)
            yield str(self.work / f"{name}.tar")

    def run(self) -> None:
        try:
            self.result = filter_and_write(self.filters, self.cfg, self._finished_shards(), self.n_shards, self.out,
                                           self.stats)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread, which raises it
            self.error = e

    def wait(self) -> Filtered:
        """The result, once the download has finished every shard (run_download raised otherwise)."""
        self.download_done.set()
        self.join()
        if self.error is not None:
            raise self.error
        return self.result

    def stop(self) -> None:
        self.download_done.set()
        self.join()


class _DownloadStopped(Exception):
    """The download ended without this shard; the main thread reports why."""


# ------------------------------------------------------------------------------------------------------------
# Step 4: manifest, stats, report


def _finish(cfg: PrepConfig, out: Path, result: Filtered, funnel: Funnel, stats: dict, source: str) -> ShardManifest:
    sizes, kept = result.sizes, result.kept
    stats["funnel"] = funnel.to_list()
    words = kept["caption"].str.split().str.len().to_numpy() if len(kept) else np.zeros(0)
    stats["plots"] = write_plots(out, stats["funnel"], words, kept["width"].to_numpy(), kept["height"].to_numpy())
    if not sizes:
        atomic_write_json(out / STATS_FILE, stats)
        raise UsageError(f"prep wrote no samples to {out}: the funnel is {[(s['stage'], s['count']) for s in stats['funnel']]}"
                         f"; see {out / STATS_FILE} for the reasons (failures: "
                         f"{dict(Counter(stats.get('failure_reasons', {})).most_common(5))})")
    manifest = ShardManifest(shards=sorted(sizes), sizes=sizes, total_samples=sum(sizes.values()), source=source,
                             stats=stats, checksums=result.checksums,
                             config={**asdict(cfg), "url_list": redact(cfg.url_list),
                                     "output_dir": redact(cfg.output_dir)})
    write_sizes(out, sizes)
    atomic_write_json(out / STATS_FILE, stats)
    manifest.write(out)
    atomic_write_text(out / REPORT_FILE, render_report(manifest))
    return manifest


def _legacy_counts(report: ListReport, status: Counter, messages: Counter) -> dict:
    """The download counts in img2dataset's terms (success / failed_to_download / failed_to_resize)."""
    return {"rows_in": report.rows_in, **{f"dropped_{k}": v for k, v in report.dropped.items()},
            "success": status.get("success", 0), "failed_to_download": status.get("failed_to_download", 0),
            "failed_to_resize": status.get("failed_to_resize", 0),
            "failure_reasons": dict(messages.most_common(20))}


def _check_downloads_kept(work: Path, out: Path) -> None:
    """Before anything in ``out`` is replaced: re-filtering needs the unfiltered shards of finished downloads."""
    from data_prep.downloader import finished_shards

    gone = [f"{i:05d}.tar" for i in sorted(finished_shards(work)) if not (work / f"{i:05d}.tar").is_file()]
    if gone:
        raise UsageError(f"the downloaded shards ({', '.join(gone[:3])}...) were deleted (prep.keep_downloads=false) "
                         f"and the filters changed: filter the built shards instead (prep.input_shards={out} with "
                         f"another prep.output_dir), or rebuild with prep.mode=overwrite")


def check_filter_inputs(cfg: PrepConfig) -> None:
    """Files the filters need must exist before hours of downloading, not after."""
    f = cfg.filters
    for folder in f.decontaminate:
        if not Path(folder).exists():
            raise UsageError(f"prep.filters.decontaminate: {folder} does not exist (give a folder of webdataset "
                             f"shards or of image files)")
    if f.clip_model and not (Path(f.clip_model).exists() or f.clip_pretrained):
        raise UsageError(f"prep.filters.clip_model {f.clip_model!r} is neither a checkpoint folder nor a model "
                         f"file, and prep.filters.clip_pretrained is empty: give the weights to score with")
    if f.clip_pretrained and not Path(f.clip_pretrained).is_file():
        raise UsageError(f"prep.filters.clip_pretrained: weights file not found: {f.clip_pretrained}")
    curation.check_inputs(f)


def run_prep(cfg: PrepConfig) -> ShardManifest:
    check_filter_inputs(cfg)
    if cfg.input_shards:
        return filter_existing(cfg)
    funnel, removed_captions = Funnel(), {}
    start = time.perf_counter()
    bucket = cfg.output_dir if remote.is_remote(cfg.output_dir) else ""
    if bucket:
        remote.check_writable(bucket)
    # img2dataset and torch (seconds) are imported once the list is valid (a bad list is refused first) and while
    # the language identification runs, before the caption filters need it.
    df, report = prepare_input(cfg, funnel, removed_captions,
                               before_filters=lambda: importlib.import_module("data_prep.downloader"))
    log(f"URL list {redact(cfg.url_list)}: {report.rows_in} rows, {len(df)} to download"
        + "".join(f"\n  dropped, {line}" for line in report.lines()))
    out = remote.staging_folder(cfg.output_dir)  # a bucket's build runs in a local folder, then is published
    work = out / DOWNLOAD_DIR
    digest = _list_digest(df, cfg)
    key = build_key(cfg, digest)
    with build_lock(out):
        if cfg.mode == "overwrite":
            clear_build(out)
            if bucket:
                remote.clear(bucket)
        elif bucket and (done := remote.up_to_date(bucket, key)) is not None and _up_to_date(out, key) is None:
            log(f"{redact(bucket)} is up to date ({done.total_samples} samples)")
            return done
        elif bucket and (restored := remote.restore_downloads(bucket, work, (INPUT_HASH,))):
            log(f"resuming from {redact(bucket)}: {restored} finished download shards copied back")
        if cfg.mode != "overwrite" and (work / INPUT_HASH).is_file() and \
                (work / INPUT_HASH).read_text().strip() != digest:
            raise UsageError(f"{out} holds shards downloaded from another URL list (other rows, columns or caption "
                             f"filters) or with other download settings (image size, resize, encoding, fetch "
                             f"policy): pick a new prep.output_dir, or set prep.mode=overwrite to rebuild it "
                             f"(re-running with the same list and settings resumes instead)")
        done = _up_to_date(out, key)
        if done is not None:
            if bucket and remote.publish(out, bucket):
                log(f"published the staged build {out} to {redact(bucket)}")
            log(f"{redact(cfg.output_dir)} is up to date ({done.total_samples} samples)")
            return done
        _check_downloads_kept(work, out)
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_text(work / INPUT_HASH, digest + "\n")
        if bucket:
            remote.mirror_file(work / INPUT_HASH, bucket)
        stats = {"list_issues": report.issues, "build_key": key, "captionless": bool(df.attrs.get(CAPTIONLESS)),
                 "removed_captions": top_removed(removed_captions),
                 "timings": {"validate": time.perf_counter() - start}}
        start = time.perf_counter()
        n_shards = -(-len(df) // cfg.samples_per_shard)
        staged = curation.staging_dir(cfg, out)
        mirror = (lambda shard_id: remote.mirror_download(work, bucket, shard_id)) if bucket else None
        filters = SampleFilters(cfg, caption_filters=False, stats=stats)
        filtering = ConcurrentFilter(filters, cfg, work, n_shards, staged, stats, on_download=mirror)
        with curation.held_session(cfg):  # pyspark: one Spark session for the download and the curation pass
            filtering.start()
            try:
                _download(cfg, work, df, phash=filters.needs_phash)
            except BaseException:
                filtering.stop()  # the download's error is the one to report
                raise
            result = curation.curate(cfg, filtering.wait(), staged, out, stats)
        stats["timings"]["download_and_filter"] = time.perf_counter() - start
        status, reasons, messages, notes = download_outcomes(work)
        funnel.record("download", dict(reasons))
        _record(funnel, result, caption_filters=False)
        stats.update(_legacy_counts(report, status, messages))
        stats["written"] = funnel.count
        stats["content_type_not_image"] = notes.get("content_type_not_image", 0)
        stats["politeness"] = {k: notes.get(k, 0) for k in ("throttled", "retry_after", "retry_after_too_long")}
        log(f"downloaded {status.get('success', 0)} of {len(df)}, wrote {len(result.kept)}")
        manifest = _finish(cfg, out, result, funnel, stats, source=redact(cfg.url_list))
        if bucket:
            remote.publish(out, bucket)
            log(f"published {len(manifest.shards)} shards and manifest.json to {redact(bucket)}")
        if not cfg.keep_downloads:
            for tar in work.glob("[0-9]*.tar"):
                tar.unlink()
            if bucket:
                remote.drop_downloaded_tars(bucket)
        return manifest


def filter_existing(cfg: PrepConfig) -> ShardManifest:
    """Filter an existing shard folder (``prep.input_shards``) and re-shard the survivors into output_dir."""
    try:
        shards = list_shards(cfg.input_shards)
    except FileNotFoundError as e:
        raise UsageError(f"prep.input_shards: {e}") from None
    out = remote.staging_folder(cfg.output_dir)
    if cfg.output_dir.rstrip("/") == str(storage_parent(shards[0])).rstrip("/") or \
            out.resolve() == Path(shards[0]).parent.resolve():
        raise UsageError(f"prep.output_dir must differ from prep.input_shards ({out}): the survivors are written "
                         f"as new shards while the old ones are read")
    funnel, stats = Funnel(), {"input_shards": cfg.input_shards, "timings": {}}
    with build_lock(out):
        clear_build(out)
        log(f"filtering {len(shards)} shards from {cfg.input_shards} into {out}")
        filters = SampleFilters(cfg, caption_filters=True, stats=stats)
        staged = curation.staging_dir(cfg, out)
        result = curation.curate(cfg, filter_and_write(filters, cfg, shards, len(shards), staged, stats), staged,
                                 out, stats)
        _record(funnel, result, caption_filters=True)
        stats["removed_captions"] = top_removed(filters.removed_captions)
        manifest = _finish(cfg, out, result, funnel, stats, source=redact(cfg.input_shards))
        if remote.is_remote(cfg.output_dir):
            remote.publish(out, cfg.output_dir)
            log(f"published {len(manifest.shards)} shards and manifest.json to {redact(cfg.output_dir)}")
        return manifest
