"""img2dataset, run with the safeguards it lacks, without forking it.

img2dataset 1.47.0 builds its ``Downloader`` and ``LoggerProcess`` by name inside ``img2dataset.main.download``;
for the length of one call this module swaps those names for subclasses defined here. The subclasses are
ordinary importable classes, so they survive the trip to spawned worker processes and Spark executors, where:

- ``GuardedDownloader`` fetches every image with :func:`data_prep.fetch.fetch` (deadline, connect-time address
  guard, byte cap, image bytes over Content-Type, robots.txt, no retry of 404s, decompression-bomb check) instead of img2dataset's
  bare ``urlopen``;
- both exit when the process that started them dies (after a ``kill -9`` of ``clipline prep`` a worker left
  running would keep writing shards that the resumed run writes too).

Around the call: a distributor or output format that cannot run is an error before anything starts (img2dataset
exits 0 having written nothing), a shard that did not finish is an error after (so an incomplete build never
looks complete), Ctrl-C is an error rather than img2dataset's exit code 0, and ``mode="overwrite"`` is done here
(img2dataset's own ``incremental_mode="overwrite"`` deletes its scratch folder and then crashes).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from clipline.errors import UsageError
from clipline.io import atomic_write_json
from data_prep.dedup import phash_bytes
from data_prep.fetch import FetchPolicy, fetch  # sets NO_ALBUMENTATIONS_UPDATE before img2dataset is imported
from data_prep.reshard import phash_file

import img2dataset.downloader as _i2d_downloader  # noqa: E402,I001
from img2dataset.logger import LoggerProcess  # noqa: E402

# The module, not the function: img2dataset/__init__.py rebinds the name `img2dataset.main` to main().
_i2d_main = importlib.import_module("img2dataset.main")

DISTRIBUTORS = {"multiprocessing": None, "pyspark": "pyspark", "ray": "ray"}
"""Distributor -> the module it needs."""
OUTPUT_FORMATS = {"webdataset": "webdataset", "parquet": None, "files": None, "tfrecord": "tensorflow",
                  "dummy": None}
"""img2dataset output format -> the module it needs."""


class DownloadIncomplete(UsageError):
    """img2dataset returned without finishing every shard."""


def check_backends(distributor: str, output_format: str) -> None:
    """Refuse a distributor or output format img2dataset would silently skip (it exits 0 having written nothing)."""
    for kind, name, table in (("distributor", distributor, DISTRIBUTORS), ("output format", output_format,
                                                                            OUTPUT_FORMATS)):
        if name not in table:
            raise UsageError(f"unknown img2dataset {kind} {name!r}; choose one of {sorted(table)}")
        module = table[name]
        if module and importlib.util.find_spec(module) is None:
            raise UsageError(f"img2dataset {kind} {name!r} needs the {module!r} package, which is not installed "
                             f"(pip install {module}), or choose another {kind}")


# ------------------------------------------------------------------------------------------------------------
# Worker-side pieces: they run inside img2dataset's worker processes.

_watching_parent = False


def exit_with_parent(poll_s: float = 0.5) -> None:
    """Exit this process as soon as the process that started it is gone (it was killed, not stopped)."""
    global _watching_parent
    if _watching_parent:
        return
    _watching_parent = True
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _fetch_for_img2dataset(row, timeout, retries, user_agent_token, disallowed_header_directives, *,
                           policy: FetchPolicy, notes: Counter):
    # The signature of img2dataset.downloader.download_image_with_retry; its own arguments are in `policy`.
    key, url = row
    data, error = fetch(url, policy, notes=notes)
    return key, (io.BytesIO(data) if data is not None else None), error


FETCH_NOTES = "fetch_notes/{shard_id:05d}.json"
"""Per downloaded shard, in a folder of its own (img2dataset's logger reads every *.json beside its stats): counts
img2dataset has no place for (images whose Content-Type disagrees with their bytes). Written just before the
shard's _stats.json, so a finished shard has it."""


def read_fetch_notes(folder: str | Path, shard_id: int) -> Counter:
    try:
        return Counter(json.loads((Path(folder) / FETCH_NOTES.format(shard_id=shard_id)).read_text()))
    except (OSError, ValueError):
        return Counter()


def _stats_after_notes(write_stats, notes: Counter):
    def wrapper(output_folder, shard_id, *args, **kwargs):
        atomic_write_json(Path(output_folder) / FETCH_NOTES.format(shard_id=shard_id), dict(notes))
        return write_stats(output_folder, shard_id, *args, **kwargs)
    return wrapper


@contextlib.contextmanager
def _replaced(module, name: str, value):
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


class PhashingWriter:
    """img2dataset's sample writer for one shard, plus the pHash of each image it writes (data_prep.dedup's, on the
    bytes written), saved to ``_phash/NNNNN.json`` when the shard closes, before its _stats.json. img2dataset calls
    write() from its worker's main thread only."""

    def __init__(self, writer_class, shard_id, output_folder, *args, **kwargs):
        self._inner = writer_class(shard_id, output_folder, *args, **kwargs)
        self._path = phash_file(Path(output_folder) / f"{shard_id:05d}.tar")
        self._hashes: dict[str, str] = {}

    def write(self, img_str, key, caption, meta):
        if img_str is not None:
            size = (meta.get("width"), meta.get("height"))  # of the image img2dataset encoded
            value = phash_bytes(img_str, size if all(isinstance(v, int) and v > 0 for v in size) else None)
            if value is not None:
                self._hashes[key] = f"{value:016x}"
        self._inner.write(img_str, key, caption, meta)

    def close(self):
        self._inner.close()
        atomic_write_json(self._path, self._hashes)


class GuardedDownloader(_i2d_downloader.Downloader):
    """img2dataset's Downloader, fetching with :func:`data_prep.fetch.fetch` under ``policy``; with ``phash``, its
    writer also saves each image's pHash for the filters (:class:`PhashingWriter`)."""

    def __init__(self, *, policy: FetchPolicy, phash: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.policy = policy
        if phash:
            self.sample_writer_class = partial(PhashingWriter, self.sample_writer_class)

    def download_shard(self, row):
        exit_with_parent()
        # A side file left by an earlier, unfinished download of this shard (maybe without pHashes) must not
        # outlive it: it is written again when the shard closes.
        phash_file(Path(self.output_folder) / f"{row[0]:05d}.tar").unlink(missing_ok=True)
        # One shard at a time per worker process, so swapping module-level functions for its length is safe.
        notes: Counter = Counter()
        fetch_one = partial(_fetch_for_img2dataset, policy=self.policy, notes=notes)
        with _replaced(_i2d_downloader, "download_image_with_retry", fetch_one), \
                _replaced(_i2d_downloader, "write_stats", _stats_after_notes(_i2d_downloader.write_stats, notes)):
            return super().download_shard(row)


class GuardedLoggerProcess(LoggerProcess):
    """img2dataset's progress logger, which otherwise outlives a killed parent forever."""

    def run(self):
        exit_with_parent()
        return super().run()


# ------------------------------------------------------------------------------------------------------------
# Driver side


@dataclass
class DownloadRequest:
    url_list: str
    """The cleaned list, a parquet file with columns url, caption and the extra ones."""
    output_folder: str
    rows: int
    extra_columns: list[str]
    policy: FetchPolicy
    image_size: int = 256
    resize_mode: str = "center_crop"
    encode_format: str = "jpg"
    encode_quality: int = 95
    samples_per_shard: int = 10000
    processes: int = 2
    threads: int = 32
    distributor: str = "multiprocessing"
    spark_master: str = ""
    output_format: str = "webdataset"
    max_shard_retry: int = 1
    phash: bool = False
    """Save each image's pHash beside its shard (the near-dedup and decontamination filters need it)."""


def expected_shards(rows: int, samples_per_shard: int) -> list[int]:
    return list(range(math.ceil(rows / samples_per_shard)))


def finished_shards(folder: str | Path) -> set[int]:
    """Shard ids img2dataset finished: it writes NNNNN_stats.json last."""
    return {int(p.name.split("_", 1)[0]) for p in Path(folder).glob("[0-9]*_stats.json")}


@contextlib.contextmanager
def spark_session(master: str, processes: int):
    """The active Spark session, or a local one that works on a machine without a resolvable hostname."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    if SparkSession.getActiveSession() is not None:
        yield
        return
    master = master or f"local[{processes}]"
    builder = SparkSession.builder.master(master).appName("clipline-prep").config("spark.ui.enabled", "false")
    if master.startswith("local"):
        builder = (builder.config("spark.driver.bindAddress", "127.0.0.1").config("spark.driver.host", "127.0.0.1")
                   .config("spark.driver.memory", "2g"))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    try:
        yield
    finally:
        spark.stop()


@contextlib.contextmanager
def _sigint_restored():
    # img2dataset installs a SIGINT handler that exits with status 0; put the caller's back afterwards.
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_download(req: DownloadRequest) -> set[int]:
    """Run img2dataset (incremental: finished shards are skipped) and return the finished shard ids."""
    check_backends(req.distributor, req.output_format)
    factory = partial(GuardedDownloader, policy=req.policy, phash=req.phash)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_replaced(_i2d_main, "Downloader", factory))
        stack.enter_context(_replaced(_i2d_main, "LoggerProcess", GuardedLoggerProcess))
        stack.enter_context(_sigint_restored())
        if req.distributor == "pyspark":
            stack.enter_context(spark_session(req.spark_master, req.processes))
        try:
            _i2d_main.download(
                url_list=req.url_list, input_format="parquet", url_col="url", caption_col="caption",
                save_additional_columns=req.extra_columns or None, output_folder=req.output_folder,
                output_format=req.output_format, image_size=req.image_size, resize_mode=req.resize_mode,
                encode_format=req.encode_format, encode_quality=req.encode_quality,
                number_sample_per_shard=req.samples_per_shard, processes_count=req.processes,
                thread_count=req.threads, timeout=int(math.ceil(req.policy.timeout)), retries=0,
                extract_exif=False, compute_hash="sha256", distributor=req.distributor,
                incremental_mode="incremental", max_shard_retry=req.max_shard_retry, enable_wandb=False,
                user_agent_token=req.policy.user_agent_token,
                disallowed_header_directives=sorted(req.policy.disallowed_header_directives),
            )
        except SystemExit as e:  # img2dataset's SIGINT handler
            raise DownloadIncomplete(f"download interrupted (exit {e.code}); re-run the same command to resume")
    done = finished_shards(req.output_folder)
    missing = [i for i in expected_shards(req.rows, req.samples_per_shard) if i not in done]
    if missing:
        raise DownloadIncomplete(
            f"img2dataset returned without finishing {len(missing)} of {len(expected_shards(req.rows, req.samples_per_shard))} "
            f"shards (ids {missing[:10]}{'...' if len(missing) > 10 else ''}); its messages above say why. "
            f"Re-run the same command to retry them: finished shards are kept")
    return done
