"""The CLI documents itself: `clipline <command> --help` lists every key its sections hold, with type, default and
meaning; `--version`; flags and stray arguments get the line that says what to write; list elements override."""

import dataclasses
import importlib.metadata
import re

import pytest

from clipline.cli import main as cli_main
from clipline.config import ConfigError, load_config
from clipline.help import COMMAND_SECTIONS, SECTIONS, field_docs

from conftest import REPO


def help_text(command: str, capsys) -> str:
    assert cli_main([command, "--help"]) == 0
    return capsys.readouterr().out


def test_every_config_key_has_a_docstring():
    # --help's meanings come from the string literal under each field; a field without one would print nothing.
    docs = field_docs()
    missing = [f"{prefix}.{f.name}" for prefix, cls in SECTIONS.items() for f in dataclasses.fields(cls)
               if not docs.get(cls.__name__, {}).get(f.name)]
    assert missing == []


@pytest.mark.parametrize("command", list(COMMAND_SECTIONS))
def test_help_lists_every_key_of_the_command_sections(command, capsys):
    out = help_text(command, capsys)
    flat = " ".join(out.split())  # lines are wrapped to the terminal: compare with whitespace collapsed
    docs = field_docs()
    for prefix in COMMAND_SECTIONS[command]:
        cls = SECTIONS[prefix]
        for f in dataclasses.fields(cls):
            key = f"{prefix}.{f.name}"
            assert re.search(rf"^  {re.escape(key)}: \S", out, re.M), f"{key} is not listed by {command} --help"
            meaning = " ".join(docs[cls.__name__][f.name].split())
            assert meaning[:60] in flat, f"{key}'s meaning is missing from {command} --help"
    for prefix in set(SECTIONS) - set(COMMAND_SECTIONS[command]):
        assert not re.search(rf"^  {re.escape(prefix)}\.[a-z_0-9]+: ", out, re.M), \
            f"{command} --help lists keys of {prefix}, which it does not read"


@pytest.mark.parametrize("line", [
    "train.lr: float = 0.0005",
    "train.steps: int = 1000",
    "train.loss: clip | siglip = clip",
    "train.crop_scale: list[float] = [0.9, 1.0]",
    "model.init_logit_scale: float or null = null",
    "model.pretrained: str = \"\"",
    "run.smoke: bool = false",
    "wandb.mode: disabled | offline | online = disabled",
])
def test_help_shows_type_and_default(line, capsys):
    # The defaults here are the dataclasses' own; a changed default must show up in --help (and here).
    flat = " ".join(help_text("train", capsys).split())
    assert line in flat


def test_help_groups_eval_dataset_entry_keys_and_explains_overrides(capsys):
    out = help_text("eval", capsys)
    assert "eval.datasets.N (each entry of the eval.datasets list, N from 0)" in out
    assert "eval.datasets.N.label_field: str" in out and "eval.linear_probe.l2_min: float = 1.0e-06" in out
    assert "eval.datasets.0.path=" in out  # the list-element override form is documented in the header
    assert max(len(line) for line in out.splitlines()) <= 120


def test_top_level_help_keeps_the_command_table(capsys):
    assert cli_main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("prep", "train", "eval", "demo", "config"):
        assert re.search(rf"^  {command} ", out, re.M)
    assert "clipline <command> --help" in out and "--version" in out


def test_version_is_the_installed_package_version(capsys):
    assert cli_main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"clipline {importlib.metadata.version('clipline')}"


@pytest.mark.parametrize("args, message", [
    (["train", "configs/demo.yaml", "--lr", "1e-3"], "flags are not used: write train.lr=1e-3"),
    (["train", "--train.lr=1e-3"], "flags are not used: write train.lr=1e-3"),
    (["eval", "--batch_size", "64"], "flags are not used: write eval.batch_size=64"),  # the command's own section
    (["train", "--lock-image"], "flags are not used: write model.lock_image=true"),
    (["train", "--batch-size", "256"], "write train.global_batch_size=GLOBAL_BATCH (the batch over all ranks"),
    (["train", "--epochs", "32"], "write train.steps=STEPS"),
    (["train", "--frobnicate"], "'--frobnicate' names no key"),
    (["train", "configs/demo.yaml", "lr"], "argument 'lr' is neither a YAML file nor a section.key=value override"),
    (["train", "configs/demo.yaml", "train.lr"], "write train.lr=VALUE"),
    (["config", "eval.datasets.3.name=x"], "eval.datasets is empty, so it has no element 3"),
    (["config", "configs/demo.yaml", "eval.datasets.7.name=x"], "eval.datasets has 7 entries, so the index must be 0..6"),
])
def test_bad_arguments_get_one_line_saying_what_to_write(args, message, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_list_elements_are_overridable():
    cfg = load_config([str(REPO / "configs/demo.yaml")], [
        "eval.datasets.0.name=foo",                      # a key of one entry of a list of mappings
        "eval.datasets.1.classnames.0=disc",             # an element of a list inside an entry
        "eval.datasets.2={label_field: shape}",          # a mapping merges into the entry
        "train.crop_scale.0=0.5",                        # a list left at its default, not in the YAML
    ])
    assert cfg.eval.datasets[0].name == "foo" and cfg.eval.datasets[0].label_field == "colour"
    assert cfg.eval.datasets[1].classnames[:2] == ["disc", "square"]
    assert cfg.eval.datasets[2].label_field == "shape" and cfg.eval.datasets[2].name == "demo-size"
    assert cfg.train.crop_scale == [0.5, 1.0]
    assert len(cfg.eval.datasets) == 7  # nothing else in the list changed


@pytest.mark.parametrize("override, message", [
    ("train.crop_scale.2=1.0", "train.crop_scale has 2 entries, so the index must be 0..1"),
    ("prep.filters.languages.0=en", "prep.filters.languages is empty"),
    ("train.lr.0=1", "train.lr is not a list, so it takes no index 0"),
    ("eval.datasets.0.nmae=x", "unknown key 'eval.datasets[0].nmae' (did you mean 'name'?)"),
])
def test_list_element_override_errors(override, message):
    with pytest.raises(ConfigError) as e:
        load_config([str(REPO / "configs/demo.yaml")], [override])
    assert message in str(e.value)
