"""The suite over several checkpoints and kinds of model: every checkpoint of a run through the real CLI (a table
and plots over steps), an open_clip architecture with a weights file, a Hugging Face CLIP saved on disk, a
checkpoint of another architecture (a clear error while the others go on), bf16 autocast."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from clipline import precision
from clipline.errors import UsageError
from conftest import TINY_MODEL, run_cli
from eval.suite import run_suite
from test_eval_datasets import (DIGIT_NAMES, DIGIT_TEMPLATES, by_key, digits, random_checkpoint, suite_config,
                                write_digits_wds)
from test_precision import observed_dtypes


@pytest.fixture(scope="module")
def digits_wds(tmp_path_factory):
    images, labels = digits(n=200)
    return write_digits_wds(tmp_path_factory.mktemp("digits") / "wds", images, labels)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, digits_wds):
    """A training run folder with checkpoints at steps 2 and 4 (different random weights) and an incomplete 6."""
    run = tmp_path_factory.mktemp("run")
    images, _ = digits(n=100)
    prompts = [t.replace("{c}", c) for c in DIGIT_NAMES for t in DIGIT_TEMPLATES]
    for step, seed in ((2, 0), (4, 1)):
        random_checkpoint(run / "checkpoints" / f"step_{step:08d}", seed=seed, centre_on=(images, prompts))
    partial = random_checkpoint(run / "checkpoints" / "step_00000006", seed=2)
    (partial / "COMPLETE").unlink()
    return run


def test_cli_every_step_of_a_run(tmp_path, run_folder, digits_wds):
    suite = {"eval": {"checkpoint": str(run_folder), "all_steps": True, "output_dir": str(tmp_path / "out"),
                      "batch_size": 64, "datasets": [{"name": "digits", "path": str(digits_wds)},
                                                     {"name": "missing", "path": str(tmp_path / "nope")}]}}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    result = run_cli("eval", str(tmp_path / "suite.yaml"))
    assert result.returncode == 0, result.stderr[-3000:]
    records = json.loads((tmp_path / "out" / "results.json").read_text())
    assert sorted({r["step"] for r in records}) == [2, 4]  # the incomplete step 6 is not evaluated
    top1 = {r["step"]: r for r in records if r["dataset"] == "digits" and r["metric"] == "top1"}
    assert top1[2]["value"] != top1[4]["value"]
    assert all(set(r) >= {"task", "dataset", "metric", "value", "chance", "checkpoint", "step"} for r in records)
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| dataset | task | metric | chance (%) | step 2 | step 4 |" in md
    assert f"| digits | zeroshot_classification | top1 | 10.0 | {100 * top1[2]['value']:.1f} | " in md
    assert "missing: " in md and "does not exist" in md  # the bad dataset is reported, the others still ran
    for metric in ("top1", "top5", "mean_per_class_recall"):
        assert (tmp_path / "out" / "plots" / f"{metric}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "[eval] digits (zeroshot_classification): 200 images" in result.stderr
    csv_header = (tmp_path / "out" / "results.csv").read_text().splitlines()[0]
    assert csv_header.startswith("task,dataset,metric,value,chance,checkpoint,step")


def test_cli_missing_checkpoint_is_a_one_line_error(tmp_path, digits_wds):
    result = run_cli("eval", f"eval.checkpoint={tmp_path / 'nothing'}",
                     f"eval.datasets=[{{name: d, path: {digits_wds}}}]")
    assert result.returncode == 2 and "no complete checkpoint found" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def _other_architecture(tmp_path: Path) -> Path:
    """The tiny model's JSON with a wider text tower: same names, other shapes."""
    cfg = json.loads(TINY_MODEL.read_text())
    cfg["text_cfg"]["width"] = 64
    path = tmp_path / "clipline-tiny-rn-narrow.json"
    path.write_text(json.dumps(cfg))
    return path


def test_weights_file_and_wrong_architecture(tmp_path, run_folder, digits_wds):
    step2 = run_folder / "checkpoints" / "step_00000002"
    weights = step2 / "open_clip_model.safetensors"
    mismatched = tmp_path / "mismatched"  # another architecture's config beside these weights
    shutil.copytree(step2, mismatched)
    config = json.loads((mismatched / "open_clip_config.json").read_text())
    config["model_cfg"] = json.loads(_other_architecture(tmp_path).read_text())
    (mismatched / "open_clip_config.json").write_text(json.dumps(config))
    specs = [str(step2), f"{TINY_MODEL}:{weights}", str(mismatched), f"{_other_architecture(tmp_path)}:{weights}"]
    records = run_suite(suite_config(tmp_path, specs, [{"name": "digits", "path": str(digits_wds)}]))
    by_ckpt = {r["checkpoint"]: r for r in records if r["metric"] in ("top1", "error")}
    assert by_ckpt[f"{TINY_MODEL}:{weights}"]["value"] == by_ckpt[str(step2)]["value"]  # the same weights
    for bad in (str(mismatched), f"{_other_architecture(tmp_path)}:{weights}"):
        assert "weights do not fit the architecture" in by_ckpt[bad]["error"]
    with pytest.raises(UsageError, match="bare weights file: say which architecture"):
        run_suite(suite_config(tmp_path, [str(weights)], [{"name": "digits", "path": str(digits_wds)}]))


def _hf_clip(folder: Path) -> Path:
    """A tiny random transformers CLIPModel saved with save_pretrained, with a CLIP BPE tokenizer built from
    open_clip's bundled vocabulary (nothing downloaded)."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder.mkdir(parents=True)
    bpe = SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # HF spells them so
    (folder / "vocab.json").write_text(json.dumps({names.get(k, k): v for k, v in bpe.encoder.items()}))
    merges = sorted(bpe.bpe_ranks.items(), key=lambda kv: kv[1])
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for (a, b), _ in merges) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    layer = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config={**layer, "max_position_embeddings": 32, "vocab_size": 49408},
                        vision_config={**layer, "image_size": 32, "patch_size": 8}, projection_dim=16)
    torch.manual_seed(0)
    model_dir = folder / "model"
    CLIPModel(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(model_dir)
    return model_dir


@torch.no_grad()
def test_hugging_face_clip_on_disk(tmp_path, digits_wds):
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    model_dir = _hf_clip(tmp_path / "hf")
    records = run_suite(suite_config(tmp_path, model_dir, [{"name": "digits", "path": str(digits_wds)}]))
    got = by_key(records)
    # the same numbers computed directly with transformers
    model = CLIPModel.from_pretrained(model_dir).eval()
    processor = CLIPImageProcessor.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    images, labels = digits(n=200)
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    image = torch.nn.functional.normalize(_tensor(model.get_image_features(pixel_values=pixels)), dim=-1)
    classes = []
    for name in DIGIT_NAMES:
        tokens = tokenizer([t.replace("{c}", name) for t in DIGIT_TEMPLATES], padding=True, return_tensors="pt")
        text = torch.nn.functional.normalize(_tensor(model.get_text_features(**tokens)), dim=-1).mean(dim=0)
        classes.append(text / text.norm())
    predicted = (image @ torch.stack(classes).T).argmax(dim=1)
    assert got[("digits", "top1")]["value"] == pytest.approx((predicted == torch.tensor(labels)).float().mean().item())
    assert got[("digits", "top1")]["checkpoint"] == str(model_dir)


def _tensor(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _suite_observed(tmp_path, checkpoint, datasets, **keys) -> tuple[dict, set]:
    """The records of a suite run and the (module type, output dtype) pairs its forwards produced."""
    with observed_dtypes() as seen:
        records = by_key(run_suite(suite_config(tmp_path, checkpoint, datasets, **keys)))
    return records, seen


def test_bf16_autocast_runs_and_stays_close(tmp_path, run_folder, digits_wds):
    step4 = run_folder / "checkpoints" / "step_00000004"
    datasets = [{"name": "digits", "path": str(digits_wds)}]
    fp32, seen32 = _suite_observed(tmp_path / "a", step4, datasets)
    bf16, seen16 = _suite_observed(tmp_path / "b", step4, datasets, precision="bf16")
    # eval.precision reaches both encoders: bf16 convolutions (image tower) and linears (text tower) under bf16
    # only; a suite that ignored it would run both in fp32.
    for layer in ("Conv2d", "Linear"):
        assert (layer, torch.bfloat16) in seen16 and (layer, torch.bfloat16) not in seen32, layer
    assert (bf16[("digits", "top1")]["precision"], fp32[("digits", "top1")]["precision"]) == ("bf16", "fp32")
    # and bf16 rounding moves the headline metrics little
    for metric in ("top1", "top5", "mean_per_class_recall"):
        assert abs(bf16[("digits", metric)]["value"] - fp32[("digits", metric)]["value"]) < 0.15, metric


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_follows_the_hardware_and_is_saved(tmp_path, run_folder, digits_wds, monkeypatch, capsys,
                                                          native, expected):
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: (native, "patched"))
    step4 = run_folder / "checkpoints" / "step_00000004"
    records, seen = _suite_observed(tmp_path, step4, [{"name": "digits", "path": str(digits_wds)}],
                                    precision="auto")
    assert f"[eval] precision auto -> {expected} (patched)" in capsys.readouterr().err
    assert (("Conv2d", torch.bfloat16) in seen) == native
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {(r["precision"], r["precision_requested"]) for r in saved} == {(expected, "auto")}
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["precision"] == expected
