"""End to end through the real CLI: demo data -> img2dataset over loopback -> shards -> train -> eval.

Also: a checkpoint's weights load in plain open_clip; a resumed run equals an uninterrupted one bitwise;
torchrun with two CPU processes trains the same model as one process.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, TINY_MODEL, run_cli

DEMO = str(REPO / "configs" / "demo.yaml")
TINY = str(REPO / "configs" / "test-tiny.yaml")


@pytest.fixture(scope="module")
def demo_run(local_demo_run):
    return local_demo_run  # conftest: one local test-tiny demo per session, shared with test_storage_prep.py


def test_demo_writes_every_artifact(demo_run):
    out, result = demo_run
    shards = out / "shards" / "train"
    sizes = json.loads((shards / "sizes.json").read_text())
    assert sum(sizes.values()) == 384 and len(sizes) == 3
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["total_samples"] == 384 and manifest["stats"]["success"] == 384
    assert (out / "shards" / "eval" / "sizes.json").is_file()
    ckpts = sorted((out / "train" / "checkpoints").glob("step_*"))
    assert [c.name for c in ckpts] == ["step_00000004", "step_00000008"]
    assert all((c / "COMPLETE").is_file() for c in ckpts)
    metrics = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4, 6, 8]
    assert all(math.isfinite(m["loss"]) for m in metrics)
    assert (out / "train" / "config.yaml").is_file() and (out / "eval" / "config.yaml").is_file()

    records = json.loads((out / "eval" / "results.json").read_text())
    headline = {(r["dataset"], r["metric"]): r for r in records}
    for key in [("demo-colour", "top1"), ("demo-shape", "top5"), ("demo-shape", "mean_per_class_recall"),
                ("demo-retrieval", "image_to_text_R@5"), ("demo-retrieval", "text_to_image_R@10")]:
        r = headline[key]
        assert 0.0 <= r["value"] <= 1.0 and 0.0 < r["chance"] < 1.0
        assert r["checkpoint"].endswith("step_00000008") and r["step"] == 8
    assert headline[("demo-colour", "top1")]["chance"] == pytest.approx(1 / 8)
    assert headline[("demo-retrieval", "text_to_image_R@1")]["n_samples"] == 60
    assert "| demo-shape | zeroshot_classification | top1 |" in result.stdout
    assert (out / "eval" / "results.csv").read_text().startswith("task,dataset,metric,value,chance")


def test_demo_rerun_reuses_everything(demo_run):
    out, _ = demo_run
    result = run_cli("demo", DEMO, TINY, f"run.output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train shards in" in result.stdout and "up to date" in result.stdout
    assert "already trained" in result.stdout


def test_checkpoint_loads_in_open_clip(demo_run):
    import open_clip

    out, _ = demo_run
    ckpt = out / "train" / "checkpoints" / "step_00000008"
    open_clip.add_model_config(TINY_MODEL)
    model, _, preprocess = open_clip.create_model_and_transforms(
        TINY_MODEL.stem, pretrained=str(ckpt / "open_clip_model.safetensors"))
    weights = load_file(str(ckpt / "open_clip_model.safetensors"))
    assert torch.equal(model.state_dict()["text_projection"], weights["text_projection"])
    # and as a self-describing folder, with no config registered
    model2, _, _ = open_clip.create_model_and_transforms(f"local-dir:{ckpt}")
    assert torch.equal(model2.state_dict()["visual.attnpool.c_proj.weight"], weights["visual.attnpool.c_proj.weight"])
    # the weights are no longer the random init
    fresh = open_clip.create_model(TINY_MODEL.stem)
    assert not torch.equal(fresh.state_dict()["text_projection"], weights["text_projection"])


def _train(out: Path, shards: Path, *extra: str, launcher: list[str] | None = None):
    args = ["train", DEMO, TINY, f"run.output_dir={out}", f"train.data={shards}", "train.precision=fp32", *extra]
    if launcher:
        return run_cli(*launcher, "-m", "clipline", *args, module="torch.distributed.run")
    return run_cli(*args)


def _final_weights(out: Path, step: int) -> dict:
    return load_file(str(out / "train" / "checkpoints" / f"step_{step:08d}" / "open_clip_model.safetensors"))


def _losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "train" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.fault
def test_resumed_run_equals_uninterrupted_run_bitwise(tmp_path, tiny_shards, fault_row):
    common = ("train.workers=1", "train.log_every=1", "train.save_every=3", "train.keep_last=5")
    straight = _train(tmp_path / "a", tiny_shards, "train.steps=7", *common)
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = _train(tmp_path / "b", tiny_shards, "train.steps=3", *common)
    assert first.returncode == 0, first.stderr[-3000:]
    second = _train(tmp_path / "b", tiny_shards, "train.steps=7", *common)
    assert second.returncode == 0 and "resumed from" in second.stdout, second.stderr[-3000:]
    a, b = _final_weights(tmp_path / "a", 7), _final_weights(tmp_path / "b", 7)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    resumed_at = next(ln for ln in second.stdout.splitlines() if "resumed from" in ln).rsplit(" at ", 1)[1]
    fault_row(area="training", fault="a run stopped at its step-3 checkpoint, resumed to step 7 (CLI, 1 data worker)",
              happened=f"the second command resumed at {resumed_at} and exited {second.returncode}",
              lost=f"0: {sum(torch.equal(a[k], b[k]) for k in a)}/{len(a)} weight tensors bitwise equal and "
                   f"{len(_losses(tmp_path / 'b'))} per-step losses identical to an uninterrupted run")


def test_torchrun_two_cpu_processes(tmp_path, tiny_shards):
    """Two ranks form a gloo group over loopback, split the global batch, save one checkpoint holding both ranks'
    data positions, and train the same model as one process reading the same samples.

    Rank r reads data stream r. One process with 2 data workers (streams 0 and 1) and 2 accumulation micro-batches
    (one per stream) sees the same 32 samples, with the same crops, in every step. The model is the ViT with no
    batch norm (conftest.TINY_VIT), whose forward does not depend on how the batch is split."""
    from conftest import TINY_VIT

    vit = tmp_path / "tiny-vit-test.json"
    vit.write_text(json.dumps(TINY_VIT))
    common = ("train.steps=4", "train.save_every=2", "train.log_every=1", f"model.name={vit}", "train.precision=fp32")
    result = _train(tmp_path / "ddp", tiny_shards, *common, "train.workers=0",
                    launcher=["--standalone", "--nproc_per_node", "2"])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "(2 x 1 x 16)" in result.stdout
    state = torch.load(tmp_path / "ddp" / "train" / "checkpoints" / "step_00000004" / "train_state.pt",
                       weights_only=True)
    assert state["world_size"] == 2 and state["step"] == 4
    assert [d["positions"][0] >= 4 * 16 for d in state["data"]] == [True, True]

    one = _train(tmp_path / "one", tiny_shards, *common, "train.workers=2", "train.accum_steps=2")
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-3000:]
    assert "(1 x 2 x 16)" in one.stdout
    # The same arithmetic in another order (a gloo all-reduce of two gradients vs one process's sums), in fp32.
    # Measured: per-step losses equal to 1e-7 relative, weights within 3.1e-5 after 4 steps (AdamW divides each
    # gradient by its own running scale, so tiny gradients turn rounding differences into updates of up to
    # lr = 2e-3 x a small fraction). The bounds below leave 3x to 100x margin; a wrong split (e.g. each rank's
    # loss over its own 16 samples only) moves the first loss by ~0.7 (log 32 - log 16).
    losses_ddp, losses_one = _losses(tmp_path / "ddp"), _losses(tmp_path / "one")
    assert len(losses_ddp) == 4 and losses_one == pytest.approx(losses_ddp, rel=1e-5), (losses_one, losses_ddp)
    a, b = _final_weights(tmp_path / "ddp", 4), _final_weights(tmp_path / "one", 4)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"two ranks vs one process: losses {losses_ddp} vs {losses_one}, largest weight difference {worst:.2e}")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4, msg=k)
