"""An interrupted build (`kill -9` of `clipline prep` mid-download) resumes with the same command and ends equal,
byte for byte, to a build that never stopped: every reachable sample exactly once, no half-written shard kept."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, make_samples
from prep_server import MisbehavingServer

N, PER_SHARD = 48, 6


def _command(url_list: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "clipline", "prep", f"prep.url_list={url_list}", f"prep.output_dir={out}",
            "prep.image_size=32", f"prep.samples_per_shard={PER_SHARD}", "prep.processes=1", "prep.threads=2",
            "prep.allowed_networks=[127.0.0.1/32]", "prep.filters.near_dedup_distance=2"]


def _run(url_list: Path, out: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(_command(url_list, out), cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _tar_digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


def _urls(out: Path) -> list[str]:
    urls = []
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            urls += [json.loads(tar.extractfile(m).read())["url"] for m in tar.getmembers()
                     if m.name.endswith(".json")]
    return urls


@pytest.mark.slow
@pytest.mark.fault
def test_kill_9_then_same_command_equals_an_uninterrupted_build(tmp_path, fault_row):
    samples = make_samples(N, seed=77, image_size=32)
    images = {f"s{i}.jpg": s["jpg"] for i, s in enumerate(samples)}
    with MisbehavingServer(images, slow_s=0.15) as server:
        reachable = [server.url(f"slow/s{i}.jpg") for i in range(N)]
        rows = reachable + [server.url("404/gone.jpg")]
        url_list = tmp_path / "urls.parquet"
        pd.DataFrame({"url": rows, "caption": [s["txt"] for s in samples] + ["a picture that is gone"]}
                     ).to_parquet(url_list)

        whole = tmp_path / "whole"
        _run(url_list, whole)

        resumed = tmp_path / "resumed"
        proc = subprocess.Popen(_command(url_list, resumed), cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while len(list((resumed / "_download").glob("*_stats.json"))) < 2:
                assert proc.poll() is None, "the build finished before it could be interrupted"
                assert time.monotonic() < deadline
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)  # the main process only, as the OOM killer or a node failure would
            proc.wait()
            done_at_kill = len(list((resumed / "_download").glob("*_stats.json")))
            assert 2 <= done_at_kill < N // PER_SHARD + 1  # 9 shards: 8 full ones and the 404 row's
            # Its worker and logger processes notice and exit, rather than keep writing shards.
            stop = time.monotonic() + 10
            while _group_alive(proc.pid) and time.monotonic() < stop:
                time.sleep(0.1)
            assert not _group_alive(proc.pid), "orphaned img2dataset processes kept running after kill -9"
        finally:
            if _group_alive(proc.pid):
                os.killpg(proc.pid, signal.SIGKILL)
        assert not (resumed / "manifest.json").exists()
        _run(url_list, resumed)

    assert json.loads((resumed / "sizes.json").read_text()) == json.loads((whole / "sizes.json").read_text())
    assert _tar_digests(resumed) == _tar_digests(whole)
    urls = _urls(resumed)
    assert sorted(urls) == sorted(reachable) and len(urls) == len(set(urls)) == N
    funnel = json.loads((resumed / "stats.json").read_text())["funnel"]
    assert funnel == json.loads((whole / "stats.json").read_text())["funnel"]
    assert not list(resumed.glob(".*.tmp"))
    download = resumed / "_download"
    assert {p.name[:5] for p in download.glob("*.tar")} == {p.name[:5] for p in download.glob("*_stats.json")}
    fault_row(area="data prep", fault="clipline prep killed with SIGKILL mid-download",
              happened=f"killed after {done_at_kill} of {N // PER_SHARD + 1} download shards; its worker processes "
                       f"exited; the same command resumed and finished",
              lost=f"0: {len(_tar_digests(resumed))} shards byte-identical to an uninterrupted build, {len(urls)} of "
                   f"{N} reachable samples, each once")
