"""The trainer: accumulation equals one big batch, SIGKILL + resume is bitwise exact, multi-node launch, LiT, HF text
towers, in-loop eval."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from clipline.config import load_config
from clipline.dist import DistEnv
from training.trainer import EXIT_PREEMPTED, Trainer, lr_at

from conftest import REPO, TINY_VIT, batches_for, make_samples, run_cli

DEMO = str(REPO / "configs" / "demo.yaml")
TINY = str(REPO / "configs" / "test-tiny.yaml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vit_json(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("model") / "tiny-vit-test.json"
    path.write_text(json.dumps(TINY_VIT))
    return str(path)


def make_trainer(tmp_path, shards, vit_json, *overrides, env=None) -> Trainer:
    cfg = load_config([DEMO, TINY], [f"run.output_dir={tmp_path}", f"train.data={shards}", f"model.name={vit_json}",
                                     "train.precision=fp32", "train.resume=never", *overrides])
    return Trainer(cfg, env or DistEnv(0, 1, 0, torch.device("cpu")))


def grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss, impl", [("clip", "plain"), ("siglip", "plain"), ("clip", "tiled"),
                                        ("siglip", "tiled")])
def test_accumulation_equals_one_big_batch(tmp_path, tiny_shards, vit_json, loss, impl):
    samples = make_samples(32, seed=11)
    whole = make_trainer(tmp_path / "a", tiny_shards, vit_json, f"train.loss={loss}", "train.loss_impl=plain")
    accum = make_trainer(tmp_path / "b", tiny_shards, vit_json, f"train.loss={loss}", "train.accum_steps=4",
                         f"train.loss_impl={impl}")
    assert accum.micro_batch == 8
    loss_whole = whole.forward_backward(batches_for(whole, samples, 32))
    loss_accum = accum.forward_backward(batches_for(accum, samples, 8))
    assert float(loss_accum) == pytest.approx(float(loss_whole), rel=1e-5)
    g_whole, g_accum = grads(whole.model), grads(accum.model)
    assert g_whole.keys() == g_accum.keys() and "logit_scale" in g_whole
    for name in g_whole:
        torch.testing.assert_close(g_accum[name], g_whole[name], rtol=1e-4, atol=1e-6, msg=name)


def _accum_worker(rank, world, init_file, shards, vit_json, out_dir, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        trainer = make_trainer(Path(out_dir) / str(rank), shards, vit_json, "train.accum_steps=2",
                               env=DistEnv(rank, world, rank, torch.device("cpu")))
        samples = make_samples(32, seed=11)[rank * 16:(rank + 1) * 16]
        trainer.forward_backward(batches_for(trainer, samples, 8))
        results[rank] = grads(trainer.model)
    finally:
        dist.destroy_process_group()


def test_accumulation_across_two_ranks_equals_one_process(tmp_path, tiny_shards, vit_json):
    whole = make_trainer(tmp_path / "w", tiny_shards, vit_json)
    whole.forward_backward(batches_for(whole, make_samples(32, seed=11), 32))
    results = mp.Manager().dict()
    mp.spawn(_accum_worker, args=(2, str(tmp_path / "init"), str(tiny_shards), vit_json, str(tmp_path), results),
             nprocs=2, join=True)
    expected = grads(whole.model)
    for rank in (0, 1):
        for name, g in results[rank].items():
            torch.testing.assert_close(g, expected[name], rtol=1e-4, atol=1e-6, msg=f"rank {rank} {name}")


def _train_args(out: Path, shards: Path, *extra: str) -> list[str]:
    return ["train", DEMO, TINY, f"run.output_dir={out}", f"train.data={shards}", "train.steps=10",
            "train.save_every=4", "train.log_every=1", "train.workers=1", "train.keep_last=5", *extra]


def _weights(out: Path, step: int) -> dict:
    return load_file(str(out / "train" / "checkpoints" / f"step_{step:08d}" / "open_clip_model.safetensors"))


def _metric_lines(out: Path) -> list[dict]:
    path = out / "train" / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def _popen(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "clipline", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(m["step"] >= step for m in _metric_lines(out)):
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.02)
    raise AssertionError(f"step {step} never logged")


@pytest.mark.fault
def test_sigkill_between_checkpoints_then_resume_is_bitwise_exact(tmp_path, tiny_shards, fault_row):
    straight = run_cli(*_train_args(tmp_path / "a", tiny_shards))
    assert straight.returncode == 0, straight.stderr[-3000:]

    proc = _popen(_train_args(tmp_path / "b", tiny_shards))
    _wait_for_step(proc, tmp_path / "b", 5)  # past the step-4 checkpoint, before step 8's
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [c.name for c in (tmp_path / "b/train/checkpoints").glob("step_*")] == ["step_00000004"]
    resumed = run_cli(*_train_args(tmp_path / "b", tiny_shards))
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]

    a, b = _weights(tmp_path / "a", 10), _weights(tmp_path / "b", 10)
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda out: [(m["step"], m["loss"]) for m in _metric_lines(out)]
    assert losses(tmp_path / "a") == losses(tmp_path / "b") and len(losses(tmp_path / "b")) == 10
    fault_row(area="training", fault="SIGKILL between checkpoints (mid-step)",
              happened=f"process group killed (exit {proc.returncode}) once step 5 was logged, checkpoint step 4 on "
                       f"disk; resumed at " + next(ln for ln in resumed.stdout.splitlines()
                                                   if "resumed from" in ln).rsplit(" at ", 1)[1],
              lost=f"only the steps after the checkpoint, redone: {sum(torch.equal(a[k], b[k]) for k in a)}/{len(a)} "
                   f"weight tensors bitwise equal and {len(losses(tmp_path / 'b'))} per-step losses identical to an "
                   f"uninterrupted run")


@pytest.mark.fault
def test_sigterm_checkpoints_and_exits_for_requeue(tmp_path, tiny_shards, fault_row):
    proc = _popen(_train_args(tmp_path, tiny_shards, "train.save_every=100", "train.steps=400"))
    _wait_for_step(proc, tmp_path, 2)
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, output[-2000:]
    stopped = [c for c in (tmp_path / "train/checkpoints").glob("step_*")]
    assert len(stopped) == 1 and "stopped by signal" in output
    step = int(stopped[0].name.split("_")[1])
    logged = [m["step"] for m in _metric_lines(tmp_path)]
    # 0 steps lost: every step finished before the signal was logged (log_every=1) and is in the checkpoint.
    assert 2 <= step < 400 and logged == list(range(1, step + 1)), (step, logged)
    resumed = run_cli(*_train_args(tmp_path, tiny_shards, "train.save_every=100", f"train.steps={step + 1}"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {step}" in next(ln for ln in resumed.stdout.splitlines() if "resumed from" in ln)
    after = _metric_lines(tmp_path)
    assert [(m["step"], m["samples_seen"]) for m in after[step:]] == [(step + 1, (step + 1) * 32)]
    fault_row(area="training", fault="SIGTERM mid-run (preemption)",
              happened=f"finished the step, wrote a checkpoint at step {step} and exited {proc.returncode} "
                       f"(EX_TEMPFAIL, for a requeue); the next run resumed at step {step}",
              lost=f"0 steps: the last logged step is {max(logged)}, the checkpoint's is {step}, and the resumed "
                   f"run's first step is {after[step]['step']}")


def test_two_nodes_via_torchrun_on_loopback(tmp_path, tiny_shards):
    port = str(free_port())
    env = {**os.environ, "WANDB_MODE": "disabled"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
         "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port, "-m", "clipline",
         *_train_args(tmp_path, tiny_shards, "train.steps=4", "train.workers=0")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    state = torch.load(tmp_path / "train/checkpoints/step_00000004/train_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["data"]) == 2


def test_lit_locks_the_image_tower(tmp_path, tiny_shards, vit_json):
    trainer = make_trainer(tmp_path, tiny_shards, vit_json, "model.lock_image=true")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train_step(batches_for(trainer, make_samples(16, seed=3), 16))
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before if n.startswith("visual."))
    assert not torch.equal(before["text_projection"], after["text_projection"])


def test_fine_tune_from_a_checkpoint_folder(tmp_path, tiny_shards, vit_json):
    first = make_trainer(tmp_path / "a", tiny_shards, vit_json)
    first.train_step(batches_for(first, make_samples(16, seed=3), 16))
    first.save()
    ckpt = next((tmp_path / "a/train/checkpoints").glob("step_*"))
    tuned = make_trainer(tmp_path / "b", tiny_shards, vit_json, f"model.pretrained={ckpt}")
    assert torch.equal(tuned.model.text_projection, first.model.text_projection)


def test_hf_text_tower_from_a_local_folder(tmp_path, tiny_shards):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    hf_dir = tmp_path / "tiny-bert"
    words = sorted({w for s in make_samples(64, seed=4) for w in s["txt"].lower().replace(",", " ").split()})
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(hf_dir)
    BertModel(BertConfig(vocab_size=5 + len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(hf_dir)
    model_json = tmp_path / "vit-bert-test.json"
    model_json.write_text(json.dumps({"embed_dim": 32, "vision_cfg": TINY_VIT["vision_cfg"],
                                      "text_cfg": {"hf_model_name": str(hf_dir), "hf_tokenizer_name": str(hf_dir),
                                                   "hf_pooler_type": "cls_pooler", "hf_proj_type": "linear",
                                                   "context_length": 32}}))
    result = run_cli("train", DEMO, TINY, f"run.output_dir={tmp_path / 'run'}", f"train.data={tiny_shards}",
                     f"model.name={model_json}", "train.steps=2", "train.save_every=2",
                     env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    weights = _weights(tmp_path / "run", 2)
    assert any(k.startswith("text.transformer.") for k in weights)


def test_in_loop_zero_shot_eval_is_logged(tmp_path, tiny_shards, eval_shards):
    result = run_cli("train", DEMO, TINY, f"run.output_dir={tmp_path}", f"train.data={tiny_shards}",
                     "train.steps=4", "train.eval_every=2", f"demo.eval_output_dir={eval_shards}")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = _metric_lines(tmp_path)
    evaluated = [m for m in lines if "eval/demo-colour/top1" in m]
    assert [m["step"] for m in evaluated] == [2, 4]
    assert all(0 <= m["eval/demo-retrieval/image_to_text_R@5"] <= 1 for m in evaluated)


def test_wandb_offline_writes_a_local_run(tmp_path, tiny_shards):
    result = run_cli("train", DEMO, TINY, f"run.output_dir={tmp_path}", f"train.data={tiny_shards}", "train.steps=2",
                     "train.save_every=2", "wandb.mode=offline", env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "train" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert (tmp_path / "train" / "wandb_run_id").read_text().strip() in runs[0].name


def test_grad_clipping_and_checkpointing_options(tmp_path, tiny_shards, vit_json):
    plain = make_trainer(tmp_path / "a", tiny_shards, vit_json)
    ckpt = make_trainer(tmp_path / "b", tiny_shards, vit_json, "model.grad_checkpointing=true", "train.grad_clip=1e-3")
    samples = make_samples(16, seed=5)
    plain.forward_backward(batches_for(plain, samples, 16))
    ckpt.forward_backward(batches_for(ckpt, samples, 16))
    g_plain, g_ckpt = grads(plain.model), grads(ckpt.model)
    for name in g_plain:  # recomputing activations changes nothing in the gradient
        torch.testing.assert_close(g_ckpt[name], g_plain[name], rtol=1e-5, atol=1e-7, msg=name)
    ckpt.optimizer_step()
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in ckpt.model.parameters()
                                                  if p.grad is not None]))
    assert float(total) <= 1e-3 * (1 + 1e-4)  # clipped before the step


@pytest.mark.fault
def test_nonfinite_loss_skips_the_step_then_aborts(tmp_path, tiny_shards, vit_json, fault_row):
    trainer = make_trainer(tmp_path, tiny_shards, vit_json, "train.max_nonfinite_steps=2")
    bad = batches_for(trainer, make_samples(8, seed=6), 8, normalized=True)[0]  # float pixels, so one can be NaN
    bad.images[0, 0, 0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train_step([bad])
    assert all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    good = batches_for(trainer, make_samples(8, seed=7), 8)[0]
    trainer.train_step([good])  # a good step resets the count and updates
    assert not torch.equal(before["text_projection"], trainer.model.text_projection)
    trainer.train_step([bad])
    with pytest.raises(RuntimeError, match="NaN/Inf for 2 steps in a row") as aborted:
        trainer.train_step([bad])
    fault_row(area="training", fault="NaN/Inf loss (train.max_nonfinite_steps=2)",
              happened=f"a NaN batch: update skipped, a good batch: updated and count reset, 2 NaN batches in a row: "
                       f"RuntimeError \"{str(aborted.value)[:90]}...\"",
              lost="0 parameters changed by the skipped steps")


def _resume_worker(rank, world, init_file, overrides, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        trainer = Trainer(load_config([DEMO, TINY], overrides), DistEnv(rank, world, rank, torch.device("cpu")))
        results[rank] = (trainer.model.state_dict(), trainer.optimizer.state_dict(), trainer.step)
    finally:
        dist.destroy_process_group()


def _assert_same_state(got, expected, where: str) -> None:
    """Nested dicts/lists of tensors and plain values, equal bit for bit."""
    if isinstance(expected, torch.Tensor):
        assert torch.equal(got, expected), where
    elif isinstance(expected, dict):
        assert got.keys() == expected.keys(), where
        for k in expected:
            _assert_same_state(got[k], expected[k], f"{where}.{k}")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), where
        for i, (g, e) in enumerate(zip(got, expected)):
            _assert_same_state(g, e, f"{where}[{i}]")
    else:
        assert got == expected, where


@pytest.mark.fault
def test_resume_on_another_world_size(tmp_path, tiny_shards, fault_row):
    first = run_cli(*_train_args(tmp_path, tiny_shards, "train.steps=2", "train.save_every=2", "train.workers=0"))
    assert first.returncode == 0, first.stderr[-3000:]
    port = str(free_port())
    second = run_cli("--standalone", "--nproc_per_node", "2", "--master_port", port, "-m", "clipline",
                     *_train_args(tmp_path, tiny_shards, "train.steps=4", "train.save_every=2", "train.workers=0"),
                     module="torch.distributed.run")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "the data order restarts" in second.stderr
    state = torch.load(tmp_path / "train/checkpoints/step_00000004/train_state.pt", weights_only=True)
    assert state["world_size"] == 2 and state["step"] == 4 and state["samples_seen"] == 4 * 32
    # The schedule went on from step 2: the first resumed step ran at the LR of step index 2, not of a restart.
    cfg = load_config([DEMO, TINY], _train_args(tmp_path, tiny_shards, "train.steps=4")[3:])
    assert [m["lr"] for m in _metric_lines(tmp_path)] == [pytest.approx(lr_at(i, cfg.train), rel=1e-6)
                                                          for i in range(4)]
    assert lr_at(2, cfg.train) != lr_at(0, cfg.train)
    # What each of the 2 ranks holds right after resuming the step-2 checkpoint: the checkpoint's weights and
    # optimizer state, bit for bit, and its step.
    ckpt = tmp_path / "train/checkpoints/step_00000002"
    saved_state = torch.load(ckpt / "train_state.pt", weights_only=True)
    saved_weights = load_file(str(ckpt / "open_clip_model.safetensors"))
    results = mp.Manager().dict()
    mp.spawn(_resume_worker, args=(2, str(tmp_path / "init"), _train_args(tmp_path, tiny_shards, "train.steps=4",
                                                                           f"train.resume={ckpt}")[3:], results),
             nprocs=2, join=True)
    for rank in (0, 1):
        weights, optimizer, step = results[rank]
        assert step == 2 and weights.keys() >= saved_weights.keys()
        assert all(torch.equal(weights[k], saved_weights[k]) for k in saved_weights), f"rank {rank} weights"
        _assert_same_state(optimizer, saved_state["optimizer"], f"rank {rank} optimizer")
    fault_row(area="training", fault="resume of a checkpoint on another world size (1 -> 2 ranks)",
              happened=f"step 2 of a 1-process run resumed under torchrun with {state['world_size']} ranks to step "
                       f"{state['step']}, samples_seen {state['samples_seen']}; the data order restarts (warned)",
              lost="0 steps; weights, optimizer and schedule restored")


def _pid_of_rank(parent: int, rank: int) -> int | None:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"clipline" in cmdline and \
                f"TORCHELASTIC_RUN_ID".encode() in b"".join(environ) and int(proc.name) != parent:
            return int(proc.name)
    return None


@pytest.mark.fault
def test_a_dying_rank_stops_the_others_quickly(tmp_path, tiny_shards, fault_row):
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "clipline", *_train_args(tmp_path, tiny_shards, "train.steps=2000",
                                                            "train.save_every=1000", "train.workers=0")],
                            cwd=REPO, env={**os.environ, "WANDB_MODE": "disabled"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_for_step(proc, tmp_path, 2)
        victim = _pid_of_rank(proc.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        start = time.time()
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode != 0 and time.time() - start < 60
        assert "Signal 9" in output or "SIGKILL" in output or "exitcode" in output
        fault_row(area="training", fault="one of 2 ranks SIGKILLed under torchrun",
                  happened=f"torchrun stopped the other rank and exited with code {proc.returncode} "
                           f"{time.time() - start:.1f} s after the kill (bound 60 s), reporting the dead rank's exit",
                  lost="the steps since the last checkpoint (this run saved none before the kill); no hang")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_momentum_queue_and_distillation_resume_exactly(tmp_path, tiny_shards):
    opts = ("train.queue_size=48", "train.distill_alpha=0.4", "train.momentum=0.9", "train.workers=0")
    straight = run_cli(*_train_args(tmp_path / "a", tiny_shards, "train.steps=6", "train.save_every=3", *opts))
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = run_cli(*_train_args(tmp_path / "b", tiny_shards, "train.steps=3", "train.save_every=3", *opts))
    second = run_cli(*_train_args(tmp_path / "b", tiny_shards, "train.steps=6", "train.save_every=3", *opts))
    assert first.returncode == 0 and second.returncode == 0, second.stderr[-3000:]
    a, b = _weights(tmp_path / "a", 6), _weights(tmp_path / "b", 6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(tmp_path / "b/train/checkpoints/step_00000006/train_state.pt", weights_only=True)
    assert state["queues"]["image"]["filled"] == 48 and "momentum_model" in state
