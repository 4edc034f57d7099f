"""`clipline prep` with the URL list in a bucket and the shards written to a bucket (moto's S3 server on 127.0.0.1,
signatures checked), against the loopback image server of the prep tests: the same samples as a local build,
exactly once after a kill -9, `--verify` where the shards lie, and no credential in anything written or printed."""

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

from conftest import REPO, make_samples, run_cli
from prep_server import MisbehavingServer

BUCKET = "clipline-prep"
N, PER_SHARD = 36, 6


def _s3(server):
    import s3fs

    return s3fs.S3FileSystem(key=server.key, secret=server.secret, endpoint_url=server.endpoint)


def storage_args(server, tmp: Path) -> list[str]:
    # Credentials in the config on purpose: they must not reach the bucket, the staging folder or the console.
    return [f"storage.endpoint_url={server.endpoint}", f"storage.options={{key: {server.key}, secret: {server.secret}}}",
            f"storage.cache_dir={tmp / 'cache'}"]


def prep_args(url_list: str, out: str, *extra: str) -> list[str]:
    return ["prep", f"prep.url_list={url_list}", f"prep.output_dir={out}", "prep.image_size=32",
            f"prep.samples_per_shard={PER_SHARD}", "prep.processes=1", "prep.threads=2",
            "prep.allowed_networks=[127.0.0.1/32]", *extra]


def tar_digests(files: dict[str, bytes]) -> dict[str, str]:
    return {n: hashlib.sha256(b).hexdigest() for n, b in files.items() if n.endswith(".tar")}


def sample_keys_and_bytes(files: dict[str, bytes]) -> list[tuple[str, str]]:
    """(member name, sha256 of its bytes) of every member of every shard, in shard order."""
    import io

    out = []
    for n in sorted(files):
        if n.endswith(".tar"):
            with tarfile.open(fileobj=io.BytesIO(files[n])) as tar:
                out += [(m.name, hashlib.sha256(tar.extractfile(m).read()).hexdigest()) for m in tar.getmembers()]
    return out


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def bucket_files(fs, prefix: str) -> dict[str, bytes]:
    fs.invalidate_cache()
    return {p.rsplit("/", 1)[-1]: fs.cat_file(p) for p in fs.ls(f"{BUCKET}/{prefix}", detail=False)
            if fs.isfile(p)}


@pytest.fixture(scope="module")
def lists(s3_server, tmp_path_factory):
    """The image server, a URL list split over two files in the bucket, and one uninterrupted local build."""
    tmp = tmp_path_factory.mktemp("storage_prep")
    samples = make_samples(N, seed=91, image_size=32)
    images = {f"s{i}.jpg": s["jpg"] for i, s in enumerate(samples)}
    with MisbehavingServer(images, slow_s=0.1) as server:
        rows = pd.DataFrame({"url": [server.url(f"slow/s{i}.jpg") for i in range(N)] + [server.url("404/gone.jpg")],
                             "caption": [s["txt"] for s in samples] + ["a picture that is gone"]})
        fs = _s3(s3_server)
        fs.mkdir(BUCKET)
        for part, frame in enumerate((rows[:20], rows[20:])):
            frame.to_parquet(tmp / f"part{part}.parquet")
            fs.put_file(str(tmp / f"part{part}.parquet"), f"{BUCKET}/lists/part{part}.parquet")
        local_list = tmp / "urls.parquet"
        rows.to_parquet(local_list)
        local = run_cli(*prep_args(str(local_list), str(tmp / "local")), *storage_args(s3_server, tmp), timeout=300)
        assert local.returncode == 0, local.stderr[-3000:]
        yield tmp, fs, s3_server


def test_prep_from_a_bucket_list_into_a_bucket_equals_the_local_build(lists):
    tmp, fs, server = lists
    result = run_cli(*prep_args(f"s3://{BUCKET}/lists/", f"s3://{BUCKET}/shards/ref"), *storage_args(server, tmp),
                     timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    there, here = bucket_files(fs, "shards/ref"), local_files(tmp / "local")
    assert tar_digests(there) == tar_digests(here) and len(tar_digests(here)) == N // PER_SHARD
    assert sample_keys_and_bytes(there) == sample_keys_and_bytes(here)
    assert json.loads(there["sizes.json"]) == json.loads(here["sizes.json"])
    manifest = json.loads(there["manifest.json"])
    assert manifest["checksums"] == json.loads(here["manifest.json"])["checksums"]
    assert manifest["source"] == f"s3://{BUCKET}/lists/" and "report.md" in there and "stats.json" in there
    # the finished download shards are mirrored for a resume elsewhere, each with its done-marker
    download = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{BUCKET}/shards/ref/_download", detail=False)}
    assert {f"{i:05d}_stats.json" for i in range(N // PER_SHARD + 1)} <= download
    # no credential anywhere: console, bucket objects, the local staging folder
    texts = [result.stdout, result.stderr] + [b.decode("latin-1") for b in there.values()]
    texts += [p.read_bytes().decode("latin-1") for p in (tmp / "cache").rglob("*") if p.is_file()]
    assert not [t[:80] for t in texts if server.secret in t or server.key in t]
    # a second run is a no-op, even with the staging folder gone (the bucket's manifest is of this build)
    import shutil

    shutil.rmtree(tmp / "cache" / "prep")
    again = run_cli(*prep_args(f"s3://{BUCKET}/lists/", f"s3://{BUCKET}/shards/ref"), *storage_args(server, tmp),
                    timeout=300)
    assert again.returncode == 0 and "is up to date" in again.stdout, again.stderr[-3000:]


def test_verify_a_bucket_folder_then_a_corrupted_object_fails(lists):
    tmp, fs, server = lists
    fs.invalidate_cache()
    if not fs.exists(f"{BUCKET}/shards/ref/manifest.json"):
        pytest.skip("needs the bucket build of test_prep_from_a_bucket_list_into_a_bucket_equals_the_local_build")
    fs.cp(f"{BUCKET}/shards/ref/", f"{BUCKET}/shards/copy/", recursive=True)
    ok = run_cli("prep", "--verify", f"s3://{BUCKET}/shards/copy", *storage_args(server, tmp)[:2], timeout=120)
    assert ok.returncode == 0 and f"{N} samples" in ok.stdout, ok.stdout + ok.stderr[-2000:]
    data = bytearray(fs.cat_file(f"{BUCKET}/shards/copy/00002.tar"))
    data[700] ^= 0xFF  # same size, one byte other
    fs.pipe_file(f"{BUCKET}/shards/copy/00002.tar", bytes(data))
    bad = run_cli("prep", "--verify", f"s3://{BUCKET}/shards/copy", *storage_args(server, tmp)[:2], timeout=120)
    assert bad.returncode == 1 and "00002.tar: sha256" in bad.stdout, bad.stdout + bad.stderr[-2000:]
    assert server.secret not in bad.stdout + bad.stderr


def _popen(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "clipline", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.slow
@pytest.mark.fault
def test_kill_9_mid_build_into_a_bucket_then_rerun_on_a_fresh_machine_is_exact(lists, fault_row):
    """Killed after some download shards reached the bucket; resumed with the staging folder gone (another
    machine): every sample exactly once, shards byte-identical to the uninterrupted local build."""
    tmp, fs, server = lists
    out = f"s3://{BUCKET}/shards/killed"
    args = prep_args(f"s3://{BUCKET}/lists/", out, *storage_args(server, tmp / "k"))
    proc = _popen(args)
    try:
        deadline = time.monotonic() + 120
        while True:
            fs.invalidate_cache()
            done = [p for p in fs.glob(f"{BUCKET}/shards/killed/_download/*_stats.json")]
            if len(done) >= 2:
                break
            assert proc.poll() is None, "the build finished before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(1.0)  # img2dataset's workers notice their parent is gone and exit (data_prep/downloader.py)
    fs.invalidate_cache()
    assert not fs.exists(f"{BUCKET}/shards/killed/manifest.json")
    import shutil

    shutil.rmtree(tmp / "k" / "cache" / "prep")  # the machine is gone: only the bucket remains
    resumed = run_cli(*args, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "finished download shards copied back" in resumed.stdout
    there, here = bucket_files(fs, "shards/killed"), local_files(tmp / "local")
    assert tar_digests(there) == tar_digests(here)
    members = sample_keys_and_bytes(there)
    jpgs = [m for m, _ in members if m.endswith(".jpg")]
    assert len(jpgs) == len(set(jpgs)) == N and members == sample_keys_and_bytes(here)
    stats = json.loads(there["stats.json"])
    assert stats["funnel"] == json.loads(here["stats.json"])["funnel"]
    fault_row(area="data prep", fault="clipline prep into an S3 bucket killed with SIGKILL mid-download, resumed on "
                                      "a machine without its staging folder",
              happened="the finished download shards mirrored to the bucket were copied back; the rest downloaded; "
                       "shards and manifest published, manifest last",
              lost=f"0: shards byte-identical to an uninterrupted build, {N} samples each once")


def _numbers(path: Path) -> list:
    records = json.loads(path.read_text())
    records = records["results"] if isinstance(records, dict) else records
    return sorted((r.get("dataset"), r.get("metric"), r.get("value")) for r in records)


@pytest.mark.slow
def test_demo_with_its_run_root_in_a_bucket_gives_the_local_numbers(s3_server, local_demo_run, tmp_path):
    """configs/test-tiny.yaml's demo twice: in a local folder, and with run.output_dir in the bucket: URL lists,
    training and held-out shards, run folder, checkpoints, eval results and demo_summary.json all there (eval
    reading the checkpoint and the held-out shards from the bucket). Same numbers as the local run."""
    fs = _s3(s3_server)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    demo = ["demo", str(REPO / "configs" / "demo.yaml"), str(REPO / "configs" / "test-tiny.yaml")]
    local_out, _ = local_demo_run  # the same demo in a local folder (conftest, shared with test_pipeline.py)
    root = f"s3://{BUCKET}/demo"
    there = run_cli(*demo, f"run.output_dir={root}", *storage_args(s3_server, tmp_path), timeout=600)
    assert there.returncode == 0, there.stdout[-2000:] + there.stderr[-3000:]
    fs.invalidate_cache()
    assert fs.isfile(f"{BUCKET}/demo/demo_source/train_urls.parquet")
    assert fs.isfile(f"{BUCKET}/demo/shards/train/manifest.json")
    assert fs.isfile(f"{BUCKET}/demo/train/checkpoints/step_00000008/COMPLETE")
    assert fs.isfile(f"{BUCKET}/demo/shards/eval/manifest.json")
    bucket_results = tmp_path / "bucket_results.json"
    fs.get_file(f"{BUCKET}/demo/eval/results.json", str(bucket_results))
    assert _numbers(bucket_results) == _numbers(local_out / "eval" / "results.json")
    summary = json.loads(fs.cat_file(f"{BUCKET}/demo/eval/demo_summary.json"))
    assert summary["metrics"] == json.loads((local_out / "eval" / "demo_summary.json").read_text())["metrics"]
    assert f"results: {root}/eval/results.md" in there.stdout
    written = [fs.cat_file(p).decode("latin-1") for p in fs.find(f"{BUCKET}/demo/eval")]
    assert not [t[:80] for t in written + [there.stdout, there.stderr]
                if s3_server.secret in t or s3_server.key in t]
