"""Fixtures built at test time: tiny shards of demo scenes, a tiny model config, a CLI runner."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from data_prep.demo_scenes import captions_for_scene, render_scene, sample_scene

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = REPO / "configs" / "models" / "clipline-tiny-rn.json"
TEST_CONFIG = REPO / "configs" / "test-tiny.yaml"

os.environ.setdefault("WANDB_MODE", "disabled")

# The fault table: the `fault` marker, the `fault_row` fixture and --reliability-table (tests/reliability.py).
pytest_plugins = ["reliability"]


def write_shard(path: Path, samples: list[dict]) -> None:
    """A webdataset tar: KEY.jpg + KEY.txt + KEY.json per sample (the layout `clipline prep` writes)."""
    with tarfile.open(path, "w") as tar:
        for s in samples:
            for ext, data in (("jpg", s["jpg"]), ("txt", s["txt"].encode()), ("json", json.dumps(s["json"]).encode())):
                info = tarfile.TarInfo(f"{s['key']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def make_samples(n: int, seed: int, captions_per_image: int = 1, image_size: int = 32) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        scene = sample_scene(rng)
        buf = io.BytesIO()
        render_scene(scene, rng, image_size).save(buf, format="JPEG", quality=90)
        caps = captions_for_scene(scene, rng, captions_per_image)
        out.append({"key": f"{seed:03d}{i:06d}", "jpg": buf.getvalue(), "txt": "\n".join(caps),
                    "json": scene.attributes()})
    return out


def make_shard_folder(folder: Path, n_shards: int, per_shard: int, seed: int = 0, **kwargs) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    samples = make_samples(n_shards * per_shard, seed, **kwargs)
    sizes = {}
    for s in range(n_shards):
        write_shard(folder / f"{s:05d}.tar", samples[s * per_shard:(s + 1) * per_shard])
        sizes[f"{s:05d}.tar"] = per_shard
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return folder


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """4 shards x 48 samples of 32 px scenes."""
    return make_shard_folder(tmp_path_factory.mktemp("shards") / "train", n_shards=4, per_shard=48, seed=1)


@pytest.fixture(scope="session")
def eval_shards(tmp_path_factory) -> Path:
    """One shard of 60 held-out scenes with 2 captions each."""
    return make_shard_folder(tmp_path_factory.mktemp("shards") / "eval", n_shards=1, per_shard=60, seed=2,
                             captions_per_image=2)


# A ViT with no batch norm (micro-batches and whole batches see the same statistics) and both towers' attention
# and MLP layers: the trainer and contrastive-family tests build it.
TINY_VIT = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def batches_for(trainer, samples: list[dict], size: int, normalized: bool = False) -> list:
    """Batches of ``samples``, ``size`` at a time, through the trainer's own image pipeline (by default the fast
    one: a random resized crop decoded to uint8 pixels). Each sample's crop is drawn from a generator seeded by its
    key, so the same sample gets the same pixels in any batch split or on any rank. The images stay uint8, as
    shipped to a GPU and normalised inside the step; ``normalized=True`` gives the float batches the CPU data
    workers hand over (normalised in the worker)."""
    from training.data import Batch

    decode = trainer._decoder()
    out = []
    for i in range(0, len(samples), size):
        chunk = samples[i:i + size]
        images = torch.stack([decode(s["jpg"], random.Random(f"batches_for-{s['key']}")) for s in chunk])
        if normalized:
            images = trainer.normalize(images)
        out.append(Batch(images, trainer.bundle.tokenizer([s["txt"] for s in chunk]), 0, 0))
    return out


@pytest.fixture(scope="session")
def local_demo_run(tmp_path_factory):
    """`clipline demo` with configs/test-tiny.yaml in a local folder, once per session: tests/test_pipeline.py checks
    its artifacts, tests/test_storage_prep.py compares the same demo run in a bucket against its numbers."""
    out = tmp_path_factory.mktemp("demo")
    result = run_cli("demo", str(REPO / "configs" / "demo.yaml"), str(REPO / "configs" / "test-tiny.yaml"),
                     f"run.output_dir={out}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


def require_or_skip(ok: bool, reason: str) -> None:
    """Skip when a prerequisite is missing, except under CI (``CI=true``), where `make test` is meant to have
    installed it: there a missing prerequisite fails the test instead of hiding it as a skip."""
    if ok:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and a prerequisite is missing: {reason}", pytrace=False)
    pytest.skip(reason)


def run_cli(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: int = 600,
            module: str = "clipline") -> subprocess.CompletedProcess:
    """Run the real CLI in a fresh interpreter, as a user would."""
    full_env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


# -- a loopback S3 server (tests/test_storage.py) ---------------------------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    import socket
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            assert proc.poll() is None, f"{what} exited with {proc.returncode}"
            assert time.monotonic() < deadline, f"{what} did not listen on 127.0.0.1:{port} in {timeout} s"
            time.sleep(0.1)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 with signatures checked: one IAM user whose key pair is returned (the first
    three requests, unauthenticated, create it). Installs moto[server] and s3fs when missing."""
    from types import SimpleNamespace

    try:
        import moto  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError:
        result = subprocess.run([sys.executable, "-m", "pip", "install", "moto[server]", "s3fs"], capture_output=True,
                                text=True, timeout=600)
        require_or_skip(result.returncode == 0, f"pip could not install moto[server] s3fs: {result.stderr[-500:]}")
    import boto3

    port = free_port()
    server = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"})
    try:
        wait_for_port(port, proc, "moto_server")
        endpoint = f"http://127.0.0.1:{port}"
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                           aws_secret_access_key="setup")
        iam.create_user(UserName="clipline")
        key = iam.create_access_key(UserName="clipline")["AccessKey"]
        iam.put_user_policy(UserName="clipline", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        yield SimpleNamespace(endpoint=endpoint, port=port, key=key["AccessKeyId"], secret=key["SecretAccessKey"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
