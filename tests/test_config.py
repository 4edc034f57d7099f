from pathlib import Path

import pytest
import yaml

from clipline.cli import main as cli_main
from clipline.config import Config, ConfigError, config_from_dict, config_to_dict, load_config

from conftest import REPO, run_cli


def write(tmp_path: Path, name: str, data: dict) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


CLIPLINE_CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")
                          if "accelerate" not in p.parts)  # configs/accelerate/ holds accelerate's own configs


@pytest.mark.parametrize("path", CLIPLINE_CONFIGS)
def test_every_shipped_config_loads(path):
    # test-tiny.yaml is an overlay: it is loaded on top of demo.yaml, as its header says.
    files = [str(REPO / "configs/demo.yaml"), str(REPO / path)] if "test-tiny" in path else [str(REPO / path)]
    cfg = load_config(files)
    assert isinstance(cfg, Config)


def test_files_merge_left_to_right_then_overrides(tmp_path):
    a = write(tmp_path, "a.yaml", {"train": {"lr": 0.1, "steps": 5}, "run": {"name": "a"}})
    b = write(tmp_path, "b.yaml", {"train": {"lr": 0.2}})
    cfg = load_config([a, b], ["train.steps=7", "run.name=c"])
    assert cfg.train.lr == 0.2 and cfg.train.steps == 7 and cfg.run.name == "c"
    assert cfg.train.weight_decay == 0.2  # untouched default survives the merge


def test_override_accepts_exponent_floats_and_lists():
    cfg = load_config([], ["train.lr=1e-3", "prep.disallowed_header_directives=[noai]"])
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.prep.disallowed_header_directives == ["noai"]


@pytest.mark.fault
def test_unknown_key_names_the_valid_keys(fault_row):
    with pytest.raises(ConfigError) as e:
        load_config([], ["train.lrr=1"])
    assert "train.lrr" in str(e.value) and "did you mean 'lr'" in str(e.value) and "warmup_steps" in str(e.value)
    fault_row(area="config", fault="an unknown key (train.lrr=1)", happened=f"ConfigError: {str(e.value)[:120]}...",
              lost="nothing: raised while the config loads")


@pytest.mark.fault
def test_unknown_section_names_the_sections(fault_row):
    with pytest.raises(ConfigError, match="valid keys: run, demo, prep, model, train, wandb, eval") as e:
        load_config([], ["trian.lr=1"])
    fault_row(area="config", fault="an unknown section (trian.lr=1)", happened=f"ConfigError: {e.value}",
              lost="nothing: raised while the config loads")


@pytest.mark.parametrize("override, message", [
    ("train.steps=abc", "train.steps: expected an integer"),
    ("train.steps=1.5", "train.steps: expected an integer"),
    ("train.precision=fp8", "not one of"),
    ("prep.allow_private_networks=yes please", "expected true/false"),
    ("train.global_batch_size=-4", "global_batch_size must be > 0"),
    ("train.lr=-1", "train.lr must be >= 0"),
    ("eval.datasets=[{name: x, path: p, label_field: y, classnames: [a, b], templates: [nope]}]", "{c}"),
])
@pytest.mark.fault
def test_wrong_values_are_errors(override, message, fault_row):
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}")) as e:
        load_config([], [override])
    fault_row(area="config", fault=f"a wrong type or impossible value ({override[:60]})",
              happened=f"ConfigError: {str(e.value)[:140]}", lost="nothing: raised while the config loads")


def test_references_resolve_and_follow_overrides():
    cfg = load_config([str(REPO / "configs/demo.yaml")], ["run.output_dir=/x/y"])
    assert cfg.train.output_dir == "/x/y/train"
    assert cfg.eval.datasets[0].path == "/x/y/shards/eval"


def test_bad_reference_is_an_error():
    with pytest.raises(ConfigError, match="names no config key"):
        load_config([], ["train.output_dir=${run.nope}/x"])


def test_resolved_config_round_trips():
    cfg = load_config([str(REPO / "configs/demo.yaml")])
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(config_to_dict(cfg)))) == cfg


def test_cli_config_prints_resolved_yaml(capsys):
    assert cli_main(["config", str(REPO / "configs/demo.yaml"), "train.steps=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["steps"] == 3 and printed["train"]["output_dir"] == "runs/demo/train"


@pytest.mark.parametrize("args, message", [
    (["config", "missing.yaml"], "config file not found: missing.yaml"),
    (["train", "configs/demo.yaml", "train.bogus=1"], "unknown key 'train.bogus'"),
    (["frobnicate"], "unknown command 'frobnicate'"),
])
@pytest.mark.fault
def test_cli_errors_are_one_line_and_nonzero(args, message, fault_row):
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    fault_row(area="config", fault=f"clipline {' '.join(args)}",
              happened=f"exit {result.returncode}, one line: \"{result.stderr.strip()[:140]}\"",
              lost="nothing: no command ran")


@pytest.mark.parametrize("path", sorted(str(p) for p in (REPO / "configs" / "accelerate").glob("*.yaml")))
def test_accelerate_configs_are_valid_accelerate_configs(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(path)
    # What README's "Every launcher" section states: one process per GPU (8 per machine, as its torchrun lines),
    # num_processes counting all machines together, and mixed_precision 'no' (clipline does its own autocast).
    machines = {"single-node.yaml": 1, "multi-node.yaml": 2}[Path(path).name]
    assert (cfg.distributed_type.value, cfg.num_machines, cfg.num_processes) == ("MULTI_GPU", machines, 8 * machines)
    assert cfg.mixed_precision == "no" and cfg.use_cpu is False and cfg.machine_rank == 0
