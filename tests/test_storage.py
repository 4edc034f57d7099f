"""Shards, checkpoints and run folders on object storage: a loopback S3 server (moto, signatures checked), Debian's
nginx for https-style shards, and a fault proxy (tests below) that drops connections mid-shard or plays a server
that is down. Training from the bucket must equal training from the same local shards, step for step.

The runs go through the real CLI in this process (``clipline.cli.main``), except the one killed with SIGKILL; one
local reference run is shared by every test that compares weights."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clipline import storage
from clipline.cli import main as clipline
from clipline.config import StorageConfig
from training.trainer import Trainer

from conftest import REPO, TEST_CONFIG, TINY_VIT, free_port, require_or_skip, wait_for_port

DEMO, TINY = str(REPO / "configs" / "demo.yaml"), str(TEST_CONFIG)
BUCKET = "clipline-test"
WEIGHTS = "open_clip_model.safetensors"


# -- servers ----------------------------------------------------------------------------------------------------

class FaultProxy:
    """A TCP proxy to 127.0.0.1:upstream. ``cut_after``: a connection is reset after that many response bytes (over
    its keep-alive requests, so mostly in the middle of a later one), ``max_cuts`` times in all (``cuts`` counts
    them); ``down``: every connection is reset, as by a server that is gone (``refused`` counts those tried)."""

    def __init__(self, upstream: int, cut_after: int | None = None, max_cuts: int = 0):
        self.upstream, self.cut_after, self.max_cuts, self.down = upstream, cut_after, max_cuts, False
        self.refused = self.cuts = 0
        self.live: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.down:
                with self.lock:
                    self.refused += 1
                self._reset(client)
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    @staticmethod
    def _reset(sock: socket.socket) -> None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # close with RST
            sock.shutdown(socket.SHUT_RDWR)  # wakes a recv blocked on it in the other pump thread
        except OSError:
            pass
        try:
            sock.close()
        except OSError:
            pass

    def set_down(self, down: bool) -> None:
        self.down = down
        if down:
            with self.lock:
                for s in list(self.live):
                    self._reset(s)

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
        except OSError:
            self._reset(client)
            return
        with self.lock:
            self.live |= {client, upstream}
        threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
        self._pump(upstream, client, self.cut_after is not None)

    def _take_cut(self) -> bool:
        with self.lock:
            if self.cuts >= self.max_cuts:
                return False
            self.cuts += 1
            return True

    def _pump(self, src: socket.socket, dst: socket.socket, cuttable: bool) -> None:
        sent, was_cut = 0, False
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if cuttable and sent + len(data) > self.cut_after and self._take_cut():
                    dst.sendall(data[:self.cut_after - sent])
                    was_cut = True
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        with self.lock:
            for s in (src, dst):
                self._reset(s) if was_cut else _close(s)
                self.live.discard(s)

    def close(self) -> None:
        self.set_down(True)
        self.server.close()


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def _s3(server):
    import s3fs

    return s3fs.S3FileSystem(key=server.key, secret=server.secret, endpoint_url=server.endpoint,
                             skip_instance_cache=True)


@pytest.fixture(scope="module")
def bucket(s3_server, tiny_shards):
    """The tiny shards (and sizes.json) uploaded to s3://clipline-test/train/."""
    fs = _s3(s3_server)
    fs.mkdir(BUCKET)
    fs.put(str(tiny_shards) + "/", f"{BUCKET}/train/", recursive=True)
    return s3_server


def _install_nginx() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else None)
    if found:
        return found
    require_or_skip(os.geteuid() == 0 and bool(shutil.which("apt-get")),
                    "nginx is not installed, and installing it needs root and apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "nginx"]):
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        require_or_skip(result.returncode == 0, f"{' '.join(cmd)} failed: {result.stderr[-500:]}")
    return shutil.which("nginx") or "/usr/sbin/nginx"


@pytest.fixture(scope="module")
def web_shards(tmp_path_factory, tiny_shards):
    """nginx on 127.0.0.1 serving the tiny shards under /train/, behind a proxy that resets the first 4 connections
    after 20000 response bytes each: in the second or third 10 KiB read-ahead request. Yields (proxy, base URL)."""
    nginx = _install_nginx()
    prefix = tmp_path_factory.mktemp("nginx")
    root = prefix / "www"
    shutil.copytree(tiny_shards, root / "train")
    port = free_port()
    temp = "".join(f"{k}_temp_path {prefix}/{k};\n" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    # As root, nginx's workers would run as nobody, who may not read pytest's private temp folders.
    user = "user root;\n" if os.geteuid() == 0 else ""
    (prefix / "nginx.conf").write_text(
        user + f"daemon off; pid {prefix}/nginx.pid; error_log {prefix}/error.log; worker_processes 1;\n"
        f"events {{ worker_connections 64; }}\n"
        f"http {{ access_log off; {temp} server {{ listen 127.0.0.1:{port}; root {root}; }} }}\n")
    proc = subprocess.Popen([nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port(port, proc, "nginx")
        proxy = FaultProxy(port, cut_after=20000, max_cuts=4)
        yield proxy, f"http://127.0.0.1:{proxy.port}"
        proxy.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# -- helpers ----------------------------------------------------------------------------------------------------

def storage_args(server, tmp: Path, endpoint: str | None = None) -> list[str]:
    # Credentials in the config on purpose: they must not leak into anything written or printed.
    return [f"storage.endpoint_url={endpoint or server.endpoint}",
            f"storage.options={{key: {server.key}, secret: {server.secret}}}", f"storage.cache_dir={tmp / 'cache'}",
            "storage.read_ahead_mib=0.01", "storage.retry_wait_s=0.25", "storage.retries=5"]


def train_args(tmp: Path, data: str, output: str, *extra: str) -> list[str]:
    """8 steps of 16 samples (128 of the 192: no epoch boundary) of a 1-layer ViT in fp32 (bf16 autocast would be
    emulated, and slow, on CPUs without native bf16), a checkpoint every 2 steps, the last 2 kept."""
    model = tmp / "tiny-vit.json"
    if not model.is_file():
        model.write_text(json.dumps(TINY_VIT))
    return ["train", DEMO, TINY, f"run.output_dir={tmp}", f"train.data={data}", f"train.output_dir={output}",
            f"model.name={model}", "train.precision=fp32", "train.global_batch_size=16", "train.save_every=2",
            "train.keep_last=2", *extra]


def cli(*args: str) -> tuple[int, str, str]:
    """`clipline ARGS` in this process: (exit code, stdout, stderr), log records on stderr as the CLI prints them."""
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.WARNING)
    root, level = logging.getLogger(), logging.getLogger().level
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = clipline(list(args))
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return code, out.getvalue(), err.getvalue()


def after_step(monkeypatch, step: int, action) -> None:
    """Run ``action()`` once, right after the trainer's optimizer step number ``step``."""
    original = Trainer.train_step

    def train_step(self, micro):
        loss = original(self, micro)
        if self.step + 1 == step:  # self.step counts the steps done before this one
            action()
        return loss

    monkeypatch.setattr(Trainer, "train_step", train_step)


def popen(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "clipline", *args], cwd=REPO, text=True,
                            env={**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1",
                                 "CLIPLINE_LOG": "WARNING"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def losses(lines: str) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in map(json.loads, filter(str.strip, lines.splitlines()))]


def weights(folder: Path) -> dict:
    return load_file(str(folder / WEIGHTS))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, bucket, tiny_shards):
    """The same 8 steps trained twice: from the local shards into a local folder (the reference every other run is
    compared with), and from the bucket (prefix listing, sizes.json there) into the bucket, recording the order in
    which files were uploaded."""
    tmp = tmp_path_factory.mktemp("runs")
    code, _, err = cli(*train_args(tmp, str(tiny_shards), str(tmp / "local")))
    assert code == 0, err[-3000:]
    uploads, put_file = [], storage.put_file

    def recording_put_file(local, location):
        uploads.append(str(location))
        put_file(local, location)

    storage.put_file = recording_put_file
    try:
        remote = cli(*train_args(tmp, f"s3://{BUCKET}/train", f"s3://{BUCKET}/runs/ref"), *storage_args(bucket, tmp))
    finally:
        storage.put_file = put_file
    assert remote[0] == 0, remote[2][-3000:]
    return tmp, remote, uploads


def reference(runs) -> Path:
    return runs[0] / "local"


# -- the tests --------------------------------------------------------------------------------------------------

def test_training_from_the_bucket_equals_training_from_local_shards(runs, bucket):
    tmp, (_, stdout, _), uploads = runs
    fs = _s3(bucket)
    assert "192 samples" in stdout  # sizes.json read beside the shards in the bucket
    here = losses((reference(runs) / "metrics.jsonl").read_text())
    there = losses(fs.cat_file(f"{BUCKET}/runs/ref/metrics.jsonl").decode())  # the run folder synced up
    assert len(here) == 4 and here == there
    # keep-last-2 pruned in the bucket; the checkpoints there are complete and hold the same weights
    steps = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{BUCKET}/runs/ref/checkpoints", refresh=True))
    assert steps == ["step_00000006", "step_00000008"]
    fs.get(f"{BUCKET}/runs/ref/checkpoints/step_00000008/", str(tmp / "ref8"), recursive=True)
    assert (tmp / "ref8" / "COMPLETE").is_file()
    assert same_weights(weights(tmp / "ref8"), weights(reference(runs) / "checkpoints" / "step_00000008"))
    # each checkpoint's completion marker went up after every other file of it: an upload cut short never counts
    for step in (2, 4, 6, 8):
        folder = f"s3://{BUCKET}/runs/ref/checkpoints/step_{step:08d}/"
        files = [u for u in uploads if u.startswith(folder)]
        assert len(files) >= 4 and files[-1] == folder + "COMPLETE", files


def test_no_secret_in_outputs_run_folder_or_checkpoints(runs, bucket):
    tmp, (_, stdout, stderr), _ = runs
    fs = _s3(bucket)
    texts = [stdout, stderr]
    texts += [p.read_bytes().decode("latin-1") for p in (tmp / "cache").rglob("*") if p.is_file()]
    texts += [fs.cat_file(p).decode("latin-1") for p in fs.find(f"{BUCKET}/runs/ref")]
    assert len(texts) > 8 and any("endpoint_url" in t for t in texts)  # the saved configs are among them
    assert not [t[:80] for t in texts if bucket.secret in t]


def test_sigkill_with_shards_and_checkpoints_in_the_bucket_then_resume_is_bitwise_identical(runs, bucket):
    tmp = runs[0]
    fs = _s3(bucket)
    out = f"s3://{BUCKET}/runs/killed"
    args = train_args(tmp, f"s3://{BUCKET}/train", out, *storage_args(bucket, tmp / "k"))
    proc = popen(args)
    try:
        deadline = time.monotonic() + 180
        while not fs.exists(f"{BUCKET}/runs/killed/checkpoints/step_00000002/COMPLETE"):
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
            fs.invalidate_cache()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    code, stdout, stderr = cli(*args)
    assert code == 0, stderr[-3000:]
    resumed = re.search(rf"resumed from {out}/checkpoints/step_\d+ at step (\d+)", stdout)
    assert resumed and 2 <= int(resumed[1]) < 8, stdout[-3000:]  # killed mid-run, resumed from the bucket
    fs.get(f"{BUCKET}/runs/killed/checkpoints/step_00000008/", str(tmp / "k8"), recursive=True)
    assert same_weights(weights(tmp / "k8"), weights(reference(runs) / "checkpoints" / "step_00000008"))


def test_s3_outage_mid_epoch_is_retried_and_nothing_is_skipped(runs, bucket, monkeypatch):
    tmp = runs[0]
    proxy = FaultProxy(bucket.port)
    restored: list[float] = []

    def back_up():
        proxy.set_down(False)
        restored.append(time.monotonic())

    up = threading.Timer(2.5, back_up)

    def outage():  # after step 2 of 8: the next reads find the server gone for 2.5 s
        proxy.set_down(True)
        up.start()

    after_step(monkeypatch, 2, outage)
    out = tmp / "outage"
    try:
        code, _, stderr = cli(*train_args(tmp, f"s3://{BUCKET}/train", str(out),
                                          *storage_args(bucket, tmp / "o", f"http://127.0.0.1:{proxy.port}")))
    finally:
        up.cancel()
        proxy.close()
    assert code == 0, stderr[-3000:]
    # reads were tried while the server was gone (s3fs's own retries or ours, "retry N/5", rode it out) ...
    assert restored and proxy.refused >= 1, (proxy.refused, stderr[-3000:])
    # ... and nothing was skipped: every sample was read, in order, as from local disk
    assert "skipping" not in stderr
    metrics = [json.loads(m) for m in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 8 and metrics[-1]["skipped_samples"] == 0
    assert losses((out / "metrics.jsonl").read_text()) == losses((reference(runs) / "metrics.jsonl").read_text())
    assert same_weights(weights(out / "checkpoints" / "step_00000008"),
                        weights(reference(runs) / "checkpoints" / "step_00000008"))


def test_a_shard_deleted_from_the_bucket_mid_run_is_skipped_and_counted(runs, bucket, tiny_shards, monkeypatch):
    tmp = runs[0]
    fs = _s3(bucket)
    fs.put(str(tiny_shards) + "/", f"{BUCKET}/victim/", recursive=True)
    opened, open_read = [], storage.open_read

    def recording_open_read(location, *a, **kw):
        opened.append(location)
        return open_read(location, *a, **kw)

    monkeypatch.setattr(storage, "open_read", recording_open_read)
    deleted = []

    def delete_an_unread_shard():  # after step 1 (16 + 64 in the shuffle buffer read) two of four shards were opened
        unread = sorted({f"s3://{BUCKET}/victim/{i:05d}.tar" for i in range(4)} - set(opened))
        deleted.append(unread[-1])
        fs.rm(unread[-1])

    after_step(monkeypatch, 1, delete_an_unread_shard)
    out = tmp / "deleted"
    code, _, stderr = cli(*train_args(tmp, f"s3://{BUCKET}/victim", str(out), "train.save_every=8",
                                      *storage_args(bucket, tmp / "d")))
    assert code == 0, stderr[-3000:]
    assert deleted and deleted[0] in opened  # the trainer went on to read the shard deleted after it started
    assert "retry" not in stderr  # a missing object is not retried: it will not come back
    skips = [ln for ln in stderr.splitlines() if "skipping the rest of shard" in ln]
    assert skips and all(deleted[0] in ln for ln in skips), stderr[-3000:]
    metrics = [json.loads(m) for m in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 8 and metrics[-1]["skipped_samples"] == len(skips)  # once per pass over it


def test_wrong_bucket_or_credentials_fail_at_start_in_one_line(runs, bucket, tmp_path):
    for data, args, expect, hint in (
            ("s3://no-such-bucket-x/train", storage_args(bucket, tmp_path), "s3://no-such-bucket-x",
             "check the bucket"),
            (f"s3://{BUCKET}/train", [f"storage.endpoint_url={bucket.endpoint}",
                                     f"storage.options={{key: {bucket.key}, secret: WRONG-secret-123}}"],
             f"s3://{BUCKET}/train", "check the credentials")):
        code, stdout, stderr = cli(*train_args(tmp_path, data, str(tmp_path / "out")), *args)
        assert code == 2, stderr[-2000:]
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and expect in lines[0] and hint in lines[0], stderr[-2000:]
        assert "WRONG-secret-123" not in stderr + stdout and bucket.secret not in stderr + stdout
        assert not (tmp_path / "out").exists()  # failed before anything was written


def test_https_shards_through_dropped_connections_read_every_sample_once(runs, web_shards):
    tmp = runs[0]
    proxy, base = web_shards
    out = tmp / "web"
    code, _, stderr = cli(*train_args(tmp, base + "/train/{00000..00003}.tar", str(out),
                                      "storage.read_ahead_mib=0.01", "storage.retry_wait_s=0.1"))
    assert code == 0, stderr[-3000:]
    assert proxy.cuts >= 1  # responses were really cut short mid-shard ...
    resumed_at = [int(b) for b in re.findall(r"\.tar at byte (\d+) failed .*; retry 1/", stderr)]
    assert any(resumed_at) and "skipping" not in stderr, stderr  # ... our reader reopened them at their byte ...
    # ... and the run saw the same samples in the same order as from local disk: the same losses and weights
    assert losses((out / "metrics.jsonl").read_text()) == losses((reference(runs) / "metrics.jsonl").read_text())
    assert same_weights(weights(out / "checkpoints" / "step_00000008"),
                        weights(reference(runs) / "checkpoints" / "step_00000008"))


def test_eval_of_a_run_folder_in_the_bucket(runs, bucket, eval_shards):
    tmp = runs[0]
    results = {}
    for name, checkpoint in (("bucket", f"s3://{BUCKET}/runs/ref"), ("local", str(reference(runs)))):
        code, _, stderr = cli("eval", DEMO, TINY, f"run.output_dir={tmp}", f"demo.eval_output_dir={eval_shards}",
                              f"eval.checkpoint={checkpoint}", f"eval.output_dir={tmp / ('eval-' + name)}",
                              "eval.precision=fp32",
                              *storage_args(bucket, tmp / "e"))
        assert code == 0, stderr[-3000:]
        records = json.loads((tmp / f"eval-{name}" / "results.json").read_text())
        results[name] = [(r["dataset"], r["metric"], r["value"], r["step"]) for r in records]
    assert results["bucket"] and results["bucket"] == results["local"]


# -- the pieces, without servers ------------------------------------------------------------------------------

def test_credentials_are_scrubbed_from_error_texts():
    cfg = StorageConfig(options={"key": "AKIDEXAMPLE", "secret": "s3cr3t-value",
                                 "client_kwargs": {"token": "tok-1234"}})
    text = storage.scrub("GET https://user:pa55@host/x failed for s3cr3t-value with tok-1234", cfg)
    assert "pa55" not in text and "s3cr3t-value" not in text and "tok-1234" not in text and "https://***@host" in text
    assert storage.redact_options(cfg.options) == {"client_kwargs": {}}


def test_a_reader_rides_out_a_server_down_as_it_opens_and_a_cut_mid_object(s3_server, web_shards, tiny_shards):
    # (s3_server installs s3fs when missing, and with it aiohttp, which fsspec's http:// filesystem needs)
    proxy = FaultProxy(web_shards[0].upstream, cut_after=15000, max_cuts=2)  # the first 10 KiB block, then a cut
    proxy.set_down(True)
    failed_at: list[int] = []

    def sleep(wait: float) -> None:  # the backoff: the server is back by its end
        failed_at.append(reader.offset)
        proxy.set_down(False)

    cfg = StorageConfig(read_ahead_mib=0.01, retry_wait_s=0.1)
    try:
        with storage.RetryingReader(f"http://127.0.0.1:{proxy.port}/train/00001.tar", cfg, sleep=sleep) as reader:
            data = b"".join(iter(lambda: reader.read(2000), b""))
    finally:
        proxy.close()
    assert proxy.refused >= 1 and proxy.cuts == 2 and reader.retried == 3
    assert failed_at[0] == 0 and 0 < failed_at[1] < failed_at[2]  # down as it opened, then cut twice mid-object
    assert data == (tiny_shards / "00001.tar").read_bytes()  # reopened at the byte where each failure stopped it


def test_only_errors_that_may_pass_are_retried(s3_server):  # (which installs s3fs, aiohttp and botocore)
    import aiohttp
    from botocore.exceptions import ClientError

    def web(status: int) -> Exception:
        return aiohttp.ClientResponseError(None, (), status=status)

    def s3(status: int, code: str) -> Exception:
        try:
            raise ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")
        except ClientError as e:
            try:
                raise OSError(code) from e  # as s3fs translates an error code it has no exception for
            except OSError as wrapped:
                return wrapped

    def unreachable() -> Exception:
        try:
            raise FileNotFoundError("http://host/a.tar") from ConnectionResetError(104, "reset")  # fsspec's http
        except FileNotFoundError as e:
            return e

    again = [web(500), web(503), web(429), web(408), s3(503, "SlowDown"), s3(500, "InternalError"),
             ConnectionResetError(104, "reset"), TimeoutError(), unreachable(),
             aiohttp.ClientPayloadError("Response payload is not completed")]
    never = [web(403), web(404), web(416), s3(416, "InvalidRange"), s3(400, "BadRequest"), PermissionError("denied"),
             FileNotFoundError("gone")]
    assert [storage.transient(e) for e in again] == [True] * len(again)
    assert [storage.transient(e) for e in never] == [False] * len(never)
