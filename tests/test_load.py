"""Load: memory stays flat and counts stay exact when the pipeline runs long.

- `clipline prep` over 20,000 URLs on a loopback server, 10% of them failing in five ways (404, 500, truncated
  body, not an image, slower than the per-image deadline): the run completes, success and per-reason failure
  counts equal what the list was built with, and the resident memory of the prep process tree does not grow
  from the first half of the run to the second.
- `clipline train` for 480 steps of batch 16 (40 epochs of the tiny shards): the resident memory of the trainer
  and its data worker does not grow from the first quarter of the steps to the last.

Memory is read from outside, every 0.5 s: VmRSS in /proc/PID/status of the process and all its descendants.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from conftest import REPO, TINY_MODEL
from prep_server import MisbehavingServer

pytestmark = pytest.mark.fault

MIB = 2**20
N_URLS = 20_000
FAILURES = {"404/x{i}": "http_404", "500/x{i}": "http_500", "truncated/{name}": "truncated",
            "corrupt/x{i}": "not_an_image", "slow/{name}": "deadline_exceeded"}
"""Route -> the reason prep must count; each gets 2% of the URLs (10% in all)."""
DEADLINE_S, SLOW_S = 3.0, 8.0
"""A good image takes milliseconds even on a loaded machine; a slow one answers long after the deadline."""


# -- memory of a process tree --------------------------------------------------------------------------------

def children_of() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # the process ended while we looked
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss(root: int) -> tuple[int, int]:
    """(resident bytes, processes) of ``root`` and every descendant."""
    tree, todo, total, count = children_of(), [root], 0, 0
    while todo:
        pid = todo.pop()
        total += rss_bytes(pid)
        count += 1
        todo += tree.get(pid, [])
    return total, count


class RssSampler(threading.Thread):
    """Samples (seconds since start, tree RSS, processes, progress()) every ``interval`` seconds."""

    def __init__(self, pid: int, progress=lambda: 0, interval: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.progress, self.interval = pid, progress, interval
        self.samples: list[tuple[float, int, int, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while not self.done.wait(self.interval):
            rss, count = tree_rss(self.pid)
            if rss:
                self.samples.append((time.monotonic() - start, rss, count, self.progress()))

    def stop(self) -> list[tuple[float, int, int, int]]:
        self.done.set()
        self.join()
        return self.samples


def run_sampled(cmd: list[str], progress=lambda: 0, timeout: float = 600) -> tuple[subprocess.CompletedProcess, list]:
    """Run ``cmd`` from the repository while sampling its process tree's memory."""
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    sampler = RssSampler(proc.pid, progress)
    sampler.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        samples = sampler.stop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), samples


# -- prep over 20,000 URLs -----------------------------------------------------------------------------------

def tiny_jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (i % 256, (i // 256) % 256, 90)).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def url_list(server: MisbehavingServer, images: list[str], path: Path) -> dict[str, int]:
    """N_URLS rows, 2% per failure route, in a seeded shuffle; returns the count each reason must reach."""
    per_failure = N_URLS // 50
    rows, expected = [], {"success": 0}
    for i in range(N_URLS):
        kind = i // per_failure
        route = list(FAILURES)[kind] if kind < len(FAILURES) else "img/{name}"
        reason = FAILURES.get(route, "success")
        rows.append((server.url(route.format(i=i, name=images[i % len(images)])), f"a tiny tile number {i} of many"))
        expected[reason] = expected.get(reason, 0) + 1
    random.Random(0).shuffle(rows)
    pd.DataFrame(rows, columns=["url", "caption"]).to_parquet(path)
    return expected


def halves(samples: list, key=lambda s: s[0]) -> tuple[int, int]:
    """(max RSS over the first half of the run, max over the second half), halves by ``key``."""
    middle = key(samples[-1]) / 2
    first = [s[1] for s in samples if key(s) <= middle]
    second = [s[1] for s in samples if key(s) > middle]
    assert first and second, "too few memory samples to compare the halves"
    return max(first), max(second)


def test_prep_of_20000_urls_with_10_percent_failing_has_exact_counts_and_flat_memory(tmp_path, fault_row):
    names = [f"t{i}.jpg" for i in range(N_URLS)]
    images = {name: tiny_jpeg(i) for i, name in enumerate(names)}
    out = tmp_path / "shards"
    with MisbehavingServer(images, robots=None, slow_s=SLOW_S) as server:
        expected = url_list(server, names, tmp_path / "urls.parquet")
        started = time.monotonic()
        result, samples = run_sampled([
            sys.executable, "-m", "clipline", "prep", f"prep.url_list={tmp_path / 'urls.parquet'}",
            f"prep.output_dir={out}", "prep.image_size=32", "prep.samples_per_shard=2000", "prep.processes=2",
            "prep.threads=32", "prep.timeout=5", f"prep.deadline={DEADLINE_S}", "prep.retries=0",
            "prep.allowed_networks=[127.0.0.1/32]", "prep.respect_robots_txt=false",
            "prep.filters.exact_dedup=false"])
        seconds = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    stats = json.loads((out / "stats.json").read_text())
    download = next(s for s in stats["funnel"] if s["stage"] == "download")
    counted = {"success": stats["success"], **download["removed"]}
    assert counted == expected
    assert json.loads((out / "manifest.json").read_text())["total_samples"] == expected["success"]

    first, second = halves(samples)
    # Bound: 64 MiB over the first half's peak. The tree (prep, 2 download processes, img2dataset's logger, the
    # resource tracker: ~2.7 GiB) reaches its plateau within the first quarter of the run and then moved by less
    # than 20 MiB when this was written (the filter keeps each kept sample's features for the report, by design).
    # A leak of 7 KiB per URL over the ~10,000 URLs of the second half would exceed it.
    bound = 64 * MIB
    assert second <= first + bound, f"RSS grew from {first / MIB:.0f} to {second / MIB:.0f} MiB"
    failed = {k: v for k, v in counted.items() if k != "success"}
    fault_row(area="load", fault=f"prep of {N_URLS:,} loopback URLs, 10% failing (404, 500, truncated, not an image, "
                                 f"slower than the {DEADLINE_S:g} s deadline)",
              happened=f"finished in {seconds:.0f} s: {counted['success']:,} downloaded, failures by reason {failed} "
                       f"= the list's; process tree ({max(s[2] for s in samples)} processes) RSS peak "
                       f"{first / MIB:.0f} MiB in the first half, {second / MIB:.0f} MiB in the second "
                       f"(bound +{bound / MIB:.0f} MiB), {len(samples)} samples",
              lost=f"0: {sum(counted.values()):,} of {N_URLS:,} URLs accounted for")


# -- a long training run -------------------------------------------------------------------------------------

TRAIN_STEPS = 480


def test_long_training_run_keeps_memory_flat(tmp_path, tiny_shards, fault_row):
    metrics = tmp_path / "train" / "metrics.jsonl"

    def step() -> int:
        try:
            lines = metrics.read_text().splitlines()
            return json.loads(lines[-1])["step"] if lines else 0
        except (OSError, ValueError):  # a line being written
            return 0

    started = time.monotonic()
    result, samples = run_sampled([
        sys.executable, "-m", "clipline", "train", str(REPO / "configs/demo.yaml"),
        str(REPO / "configs/test-tiny.yaml"), f"run.output_dir={tmp_path}", f"train.data={tiny_shards}",
        f"model.name={TINY_MODEL}", f"train.steps={TRAIN_STEPS}", f"train.save_every={TRAIN_STEPS}",
        "train.log_every=10", "train.workers=1", "train.global_batch_size=16",
        "train.precision=fp32"], progress=step)  # memory is measured, not precision: the same on every CPU
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    logged = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert logged[-1]["step"] == TRAIN_STEPS

    quarter = TRAIN_STEPS // 4
    first = [s[1] for s in samples if 0 < s[3] <= quarter]
    last = [s[1] for s in samples if s[3] > TRAIN_STEPS - quarter and s[3] < TRAIN_STEPS]
    assert len(first) >= 3 and len(last) >= 3, f"too few samples: {len(first)} and {len(last)}"
    # Bound: 32 MiB over the first quarter's peak. The trainer and its worker hold ~0.5 GiB that only allocator
    # noise moves once training runs; a leak of 100 KiB per step (one kept batch of 16 small images, or a
    # retained graph) would add ~35 MiB over the 360 steps between the quarters.
    bound = 32 * MIB
    assert max(last) <= max(first) + bound, f"RSS grew from {max(first) / MIB:.0f} to {max(last) / MIB:.0f} MiB"
    epochs = TRAIN_STEPS * 16 / 192
    fault_row(area="load", fault=f"a long training run: {TRAIN_STEPS} steps, {epochs:.0f} epochs of the tiny shards",
              happened=f"finished in {seconds:.0f} s; trainer + worker RSS peak {max(first) / MIB:.0f} MiB over steps "
                       f"1-{quarter}, {max(last) / MIB:.0f} MiB over steps {TRAIN_STEPS - quarter + 1}-{TRAIN_STEPS} "
                       f"(bound +{bound / MIB:.0f} MiB), {len(samples)} samples",
              lost=f"0 steps: {logged[-1]['step']} of {TRAIN_STEPS} done")
