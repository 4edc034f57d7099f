"""`accelerate launch` with the shipped configs/accelerate/ files starts clipline's trainer on CPU (gloo): two
processes on one machine, and two machines on loopback. Both form one world of 2 and train the same model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_cli

DEMO = str(REPO / "configs" / "demo.yaml")
TINY = str(REPO / "configs" / "test-tiny.yaml")
SINGLE_NODE = str(REPO / "configs" / "accelerate" / "single-node.yaml")
MULTI_NODE = str(REPO / "configs" / "accelerate" / "multi-node.yaml")
ACCELERATE_CLI = "accelerate.commands.accelerate_cli"
STEPS = 4
pytestmark = pytest.mark.slow
# No GPU may be seen, or accelerate's MULTI_GPU launch would try to put a process on it.
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(out: Path, shards: Path) -> list[str]:
    return ["-m", "clipline", "train", DEMO, TINY, f"run.output_dir={out}", f"train.data={shards}",
            f"train.steps={STEPS}", f"train.save_every={STEPS}", "train.precision=fp32",
            # The default thread count follows the processes per machine (1 each here on one machine, 2 on each of
            # two): pin it, since bitwise equality needs the same float reduction order.
            "train.threads=1"]


def final_checkpoint(out: Path) -> Path:
    return out / "train" / "checkpoints" / f"step_{STEPS:08d}"


def assert_world_of_two(out: Path) -> None:
    state = torch.load(final_checkpoint(out) / "train_state.pt", weights_only=True)
    assert state["world_size"] == 2 and state["step"] == STEPS
    assert len(state["data"]) == 2  # both ranks' stream positions, for an exact resume


@pytest.fixture(scope="module")
def single_node_run(tmp_path_factory, tiny_shards):
    out = tmp_path_factory.mktemp("accelerate") / "single"
    result = run_cli("launch", "--config_file", SINGLE_NODE, "--num_processes", "2",
                     "--main_process_port", str(free_port()), *train_args(out, tiny_shards),
                     module=ACCELERATE_CLI, env=CPU_ONLY, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return out, result


def test_single_node_two_processes(single_node_run):
    out, result = single_node_run
    assert "(2 x" in result.stdout  # the global batch split over 2 ranks
    assert_world_of_two(out)


def test_two_machines_on_loopback_match_one_machine(single_node_run, tmp_path, tiny_shards):
    """Machine ranks 0 and 1 meet at 127.0.0.1 with the multi-node config; one process each makes the same
    world of 2 as the single-node run, so the weights must come out identical."""
    out, port = tmp_path / "multi", free_port()
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", **CPU_ONLY}
    machines = [subprocess.Popen(
        [sys.executable, "-m", ACCELERATE_CLI, "launch", "--config_file", MULTI_NODE, "--num_machines", "2",
         "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
         "--main_process_port", str(port), *train_args(out, tiny_shards)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    try:
        logs = [m.communicate(timeout=300)[0] for m in machines]
    finally:
        for m in machines:
            if m.poll() is None:
                m.kill()
    assert [m.returncode for m in machines] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert "(2 x" in logs[0]
    assert_world_of_two(out)
    single, multi = (load_file(str(final_checkpoint(o) / "open_clip_model.safetensors"))
                     for o in (single_node_run[0], out))
    assert all(torch.equal(single[k], multi[k]) for k in single)
