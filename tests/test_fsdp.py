"""train.parallel=fsdp on CPU with gloo: the same losses and weights as DDP, sharded checkpoints that resume
bitwise after SIGKILL and reshard to another world size, `clipline export`, and the options it refuses.

The runs are shared: one spawn per world size trains every configuration it needs in the same processes (torch
and open_clip are imported once), and the tests read what they left on disk."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from clipline.config import load_config
from clipline.dist import DistEnv, cleanup_distributed
from clipline.errors import UsageError
from training.trainer import Trainer

from conftest import REPO, TINY_VIT, run_cli

DEMO = str(REPO / "configs" / "demo.yaml")
TINY = str(REPO / "configs" / "test-tiny.yaml")
STEPS = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(out: Path, shards: Path, vit_json: str, *extra: str) -> list[str]:
    # One thread per rank everywhere, so a run in a spawned worker and one under torchrun add in the same order.
    return [f"run.output_dir={out}", f"train.data={shards}", f"model.name={vit_json}", "train.precision=fp32",
            f"train.steps={STEPS}", "train.save_every=10", "train.log_every=1", "train.threads=1",
            "train.workers=0", "train.keep_last=5", *extra]


def resumed_state(trainer: Trainer) -> dict:
    """What a trainer holds right after resuming: counters, whole weights and whole optimizer state (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from clipline import fsdp

    optim = get_optimizer_state_dict(trainer.net, trainer.optimizer,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"step": trainer.step, "samples_seen": trainer.samples_seen,
            "weights": fsdp.full_weights(trainer.net, trainer.model), "adam_steps": [
                float(s["step"]) for s in optim["state"].values()] if optim else []}


def _train_worker(rank: int, world: int, init_file: str, runs: list[list[str]]) -> None:
    """Train each run in turn; a run whose last item is 'capture=PATH' first saves resumed_state there."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for run in runs:
            capture = run[-1][len("capture="):] if run[-1].startswith("capture=") else None
            run = run[:-1] if capture else run
            trainer = Trainer(load_config([DEMO, TINY], run), DistEnv(rank, world, rank, torch.device("cpu")))
            if capture:
                state = resumed_state(trainer)
                if rank == 0:
                    torch.save(state, capture)
            trainer.train()
    finally:
        dist.destroy_process_group()


def spawn_train(world: int, init_file: Path, runs: list[list[str]]) -> None:
    mp.spawn(_train_worker, args=(world, str(init_file), runs), nprocs=world, join=True)


def losses(out: Path) -> list[tuple[int, int, float]]:
    lines = (out / "train" / "metrics.jsonl").read_text().splitlines()
    return [(m["step"], m["samples_seen"], m["loss"]) for m in map(json.loads, lines)]


def checkpoint(out: Path, step: int) -> Path:
    return out / "train" / "checkpoints" / f"step_{step:08d}"


def weights(out: Path, step: int = STEPS) -> dict:
    return load_file(str(checkpoint(out, step) / "open_clip_model.safetensors"))


# Pairs of runs that must agree: (name, world size, extra overrides). Accumulation with SigLIP and clipping at
# world size 2, the tiled gathered loss and parameters kept gathered between forward and backward at world size 4.
PAIRS = [("plain", 2, []),
         ("accum", 2, ["train.accum_steps=2", "train.loss=siglip", "train.grad_clip=0.5"]),
         ("tiled", 4, ["train.loss_impl=tiled", "train.fsdp_reshard_after_forward=false"])]
RESUMED = 12  # the world-size-4 run's step-10 checkpoint resumed at another world size, trained to this step


@pytest.fixture(scope="module")
def vit_json(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("model") / "tiny-vit-fsdp.json"
    path.write_text(json.dumps(TINY_VIT))
    return str(path)


def resume_run(out: Path, shards: Path, vit_json: str, capture: Path) -> list[str]:
    return overrides(out, shards, vit_json, "train.parallel=fsdp", *PAIRS[2][2], f"train.steps={RESUMED}",
                     f"train.resume={checkpoint(out.parent / 'tiled-fsdp', 10)}", f"capture={capture}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_shards, vit_json) -> Path:
    """Every pair of PAIRS trained under ddp and fsdp, each world size in one spawn (world size 4 first: the
    world-size-2 spawn also resumes its step-10 checkpoint)."""
    root = tmp_path_factory.mktemp("fsdp-runs")
    for world in (4, 2):
        jobs = [overrides(root / f"{name}-{parallel}", tiny_shards, vit_json, f"train.parallel={parallel}", *extra)
                for name, w, extra in PAIRS if w == world for parallel in ("ddp", "fsdp")]
        if world == 2:
            jobs.append(resume_run(root / "resumed-2", tiny_shards, vit_json, root / "resumed-2.pt"))
        spawn_train(world, root / f"init-{world}", jobs)
    return root


def key_bias_rows(name: str, tensor: torch.Tensor) -> slice | None:
    """The attention key bias inside an in_proj_bias ([q, k, v]): softmax over keys ignores it, so its exact
    gradient is 0 and what it gets is rounding noise, which AdamW's normalisation scales up to ~1e-5 updates that
    differ with the reduction order; every other entry must match tightly."""
    if not name.endswith("in_proj_bias"):
        return None
    width = tensor.shape[0] // 3
    return slice(width, 2 * width)


@pytest.mark.parametrize("name", [name for name, _, _ in PAIRS])
def test_fsdp_gives_ddp_losses_and_weights(runs, name):
    ddp, sharded = runs / f"{name}-ddp", runs / f"{name}-fsdp"
    got, expected = losses(sharded), losses(ddp)
    assert [s[:2] for s in got] == [s[:2] for s in expected] and len(got) == STEPS
    assert [s[2] for s in got] == pytest.approx([s[2] for s in expected], rel=1e-5)
    assert expected[-1][2] < expected[0][2]  # it trained
    a, b = weights(ddp), weights(sharded)
    assert a.keys() == b.keys()
    for k in a:
        noise = key_bias_rows(k, a[k])
        if noise is not None:
            torch.testing.assert_close(b[k][noise], a[k][noise], rtol=0, atol=1e-4, msg=k)
            keep = torch.ones(a[k].shape[0], dtype=torch.bool)
            keep[noise] = False
            a[k], b[k] = a[k][keep], b[k][keep]
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    state = torch.load(checkpoint(sharded, STEPS) / "train_state.pt", weights_only=True)
    assert state["parallel"] == "fsdp" and "optimizer" not in state  # the optimizer is in the shards
    assert (checkpoint(sharded, STEPS) / "sharded" / ".metadata").is_file()


def test_sigkill_between_checkpoints_then_resume_is_bitwise_exact(runs, tmp_path, tiny_shards, vit_json):
    import subprocess
    import sys

    out = tmp_path / "killed"
    args = ["--standalone", "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "clipline", "train",
            DEMO, TINY, *overrides(out, tiny_shards, vit_json, "train.parallel=fsdp")]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 240
    while not (out / "train/metrics.jsonl").is_file() or "\"step\": 12," not in (out / "train/metrics.jsonl").read_text():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.02)  # until step 12 is logged: past the step-10 checkpoint, before step 20's
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert sorted(c.name for c in (out / "train/checkpoints").glob("step_*")) == ["step_00000010"]
    resumed = run_cli(*args, module="torch.distributed.run")
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]
    a, b = weights(runs / "plain-fsdp"), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(out) == losses(runs / "plain-fsdp")


def check_resumed(out: Path, captured: Path, source: Path) -> None:
    state = torch.load(captured, weights_only=True)
    assert (state["step"], state["samples_seen"]) == (10, 10 * 32)
    saved = weights(source, 10)  # the world-size-4 run's whole weights at step 10
    assert state["weights"].keys() == saved.keys()
    assert all(torch.equal(state["weights"][k], saved[k]) for k in saved)
    assert state["adam_steps"] and set(state["adam_steps"]) == {10.0}
    # The curve goes on from step 10 with the same counters. The data order restarts (another world size), so the
    # next losses are near the uninterrupted run's, not equal to them.
    got, before = losses(out), {s: l for s, _, l in losses(source)}
    assert [s[:2] for s in got] == [(11, 11 * 32), (12, 12 * 32)]
    assert all(abs(l - before[s]) < 0.1 * before[s] for s, _, l in got)


def test_a_world_size_4_checkpoint_resumes_at_2(runs):
    check_resumed(runs / "resumed-2", runs / "resumed-2.pt", runs / "tiled-fsdp")


def test_a_world_size_4_checkpoint_resumes_at_1(runs, tiny_shards, vit_json):
    out = runs / "resumed-1"
    run = resume_run(out, tiny_shards, vit_json, runs / "resumed-1.pt")
    try:  # in this process: the trainer makes a 1-process group for fully_shard
        trainer = Trainer(load_config([DEMO, TINY], run[:-1]), DistEnv(0, 1, 0, torch.device("cpu")))
        torch.save(resumed_state(trainer), runs / "resumed-1.pt")
        trainer.train()
    finally:
        cleanup_distributed()
    check_resumed(out, runs / "resumed-1.pt", runs / "tiled-fsdp")


def test_export_loads_in_open_clip_with_the_trainers_features(runs, tmp_path):
    import open_clip

    from clipline.cli import main as cli_main

    ckpt = checkpoint(runs / "tiled-fsdp", STEPS)
    (tmp_path / "shards-only").mkdir()
    assert cli_main(["export", str(runs / "tiled-fsdp" / "train"), str(tmp_path / "from-shards")]) == 0
    assert cli_main(["export", str(checkpoint(runs / "plain-ddp", STEPS)), str(tmp_path / "from-ddp")]) == 0
    exported = load_file(str(tmp_path / "from-shards" / "open_clip_model.safetensors"))
    consolidated = weights(runs / "tiled-fsdp")  # gathered by the trainer at the same step
    assert exported.keys() == consolidated.keys()
    assert all(torch.equal(exported[k], consolidated[k]) for k in consolidated)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for folder, expected in ((tmp_path / "from-shards", consolidated), (tmp_path / "from-ddp",
                                                                         weights(runs / "plain-ddp"))):
        model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
        reference, _, _ = open_clip.create_model_and_transforms(f"local-dir:{ckpt}")
        reference.load_state_dict(expected)
        model.eval(), reference.eval()
        with torch.no_grad():
            torch.testing.assert_close(model.encode_image(images), reference.encode_image(images), rtol=0, atol=0)


@pytest.mark.parametrize("option, expected", [
    ("train.queue_size=64", "train.queue_size / train.distill_alpha does not compose with train.parallel=fsdp"),
    ("train.distill_alpha=0.4", "train.queue_size / train.distill_alpha does not compose"),
    ("model.lora_text=true", "model.lora_image / model.lora_text does not compose"),
    ("train.eval_every=5", "train.eval_every does not compose"),
])
def test_options_that_do_not_compose_are_refused_at_start(tmp_path, tiny_shards, vit_json, option, expected):
    cfg = load_config([DEMO, TINY], overrides(tmp_path, tiny_shards, vit_json, "train.parallel=fsdp", option))
    with pytest.raises(UsageError, match=expected.replace(".", r"\.").replace("/", "/")):
        Trainer(cfg, DistEnv(0, 1, 0, torch.device("cpu")))
    assert not dist.is_initialized()  # refused before any process group or model was made
