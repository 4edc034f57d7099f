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
