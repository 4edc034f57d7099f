"""The `clipline` console script: one table of subcommands, each taking YAML files and dotted overrides.

    clipline <command> [CONFIG.yaml ...] [section.key=value ...]

This table is the only place in the shared layer that names the stages, and it imports them lazily, by name,
when a command runs.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import logging
import os
import sys
import typing
from pathlib import Path
from typing import Callable

from clipline import storage
from clipline.config import Config, config_to_yaml, load_config
from clipline.errors import UsageError
from clipline.help import COMMAND_SECTIONS, SECTIONS, all_keys, command_help

COMMANDS: dict[str, tuple[str, str]] = {
    "prep": ("data_prep.prep:main", "build webdataset shards from a URL + caption list (section prep)"),
    "train": ("training.trainer:main", "train a dual encoder on shards (sections model, train, wandb)"),
    "eval": ("eval.suite:main", "zero-shot classification and retrieval on a checkpoint (section eval)"),
    "demo": ("clipline.cli:demo", "the whole pipeline on generated demo data: data -> shards -> train -> eval"),
    "config": ("clipline.cli:show_config", "print the resolved config"),
}

ACTIONS: dict[tuple[str, str], str] = {
    ("prep", "--verify"): "data_prep.verify:main",
}
"""(command, flag) -> the function that takes the remaining arguments: `clipline prep --verify FOLDER`."""

FOLDER_COMMANDS: dict[str, tuple[str, str]] = {
    "export": ("clipline.export:main", "RUN_OR_CHECKPOINT OUT: a checkpoint's weights as an open_clip folder"),
}
"""Commands on folders that read no config: they take their arguments (and --help) themselves."""

USAGE = f"""usage: clipline <command> [CONFIG.yaml ...] [section.key=value ...]
       clipline <command> --help      the keys that command reads: type, default and meaning
       clipline --version

YAML files are merged left to right, then overrides are applied (e.g. train.lr=1e-3, eval.datasets.0.path=...).

commands:
""" + "\n".join(f"  {name:<8} {help_}" for name, (_, help_) in {**COMMANDS, **FOLDER_COMMANDS}.items()) + """

examples:
  clipline demo configs/demo.yaml
  clipline prep configs/demo.yaml prep.url_list=urls.parquet prep.output_dir=shards/
  clipline prep --verify shards/      check the shards against manifest.json (sizes and sha256)
  torchrun --nproc_per_node 2 -m clipline train configs/demo.yaml
  clipline config configs/demo.yaml train.steps=10
  clipline train configs/recipes/vit_b32_laion.yaml run.smoke=true train.data=my_shards/
"""

OPEN_CLIP_FLAGS: dict[str, tuple[str, str, str]] = {
    "batch_size": ("train.global_batch_size", "GLOBAL_BATCH", "the batch over all ranks: open_clip's --batch-size "
                                                               "times the number of GPUs"),
    "epochs": ("train.steps", "STEPS", "training is counted in optimizer steps: epochs x samples / global batch"),
    "wd": ("train.weight_decay", "", ""),
    "warmup": ("train.warmup_steps", "", ""),
    "train_data": ("train.data", "", ""),
    "model": ("model.name", "", ""),
    "pretrained": ("model.pretrained", "", "a weights file or checkpoint folder"),
    "precision": ("train.precision", "", ""),
    "report_to": ("wandb.mode", "", "online, offline or disabled"),
    "logs": ("run.output_dir", "", ""),
    "accum_freq": ("train.accum_steps", "", ""),
    "save_frequency": ("train.save_every", "STEPS", "in optimizer steps, not epochs"),
    "zeroshot_frequency": ("train.eval_every", "STEPS", "in optimizer steps, not epochs"),
    "torchcompile": ("train.compile", "", ""),
}
"""open_clip_train's flags whose clipline key has another name or unit -> (key, what to write when the unit
differs, a note), for the error a flag gets."""


def command(name: str) -> Callable[[Config], int]:
    module, _, func = COMMANDS[name][0].partition(":")
    return getattr(importlib.import_module(module), func)


def show_config(cfg: Config) -> int:
    print(config_to_yaml(cfg), end="")
    return 0


def demo(cfg: Config) -> int:
    """Generate and serve demo data and build its shards, then train, then evaluate: each stage reads the last
    one's artifacts from disk. Then write demo_summary.json beside the results and check the promised minimums
    (clipline.demo_check.DEMO_MINIMUMS): a missed one exits non-zero."""
    import time

    from clipline.demo_check import SUMMARY, report, write_summary

    stages = {"data": "data_prep.demo:main", "train": COMMANDS["train"][0], "eval": COMMANDS["eval"][0]}
    seconds: dict[str, float] = {}
    for stage, target in stages.items():
        print(f"\n== {stage} ==", flush=True)
        module, _, func = target.partition(":")
        start = time.perf_counter()
        code = getattr(importlib.import_module(module), func)(cfg)
        seconds[stage] = time.perf_counter() - start
        if code:
            return code
    shown = storage.redact(cfg.eval.output_dir)
    print(f"\nresults: {shown}/results.md (results.json and results.csv beside it)", flush=True)
    # Locations as written (a bucket URL too): Path() would fold s3://b into s3:/b.
    summary = write_summary(cfg.eval.output_dir, cfg.train.output_dir, seconds, cfg.train.steps)
    print(f"summary: {shown}/{SUMMARY} ({summary['total_seconds']:.0f} s in all; precision "
          f"train {summary['precision']['train']}, eval {summary['precision']['eval']})\n", flush=True)
    return report(summary) if cfg.demo.check_minimums else 0


def version() -> str:
    try:
        return importlib.metadata.version("clipline")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed: run `pip install -e .` in the repository)"


def _flag_error(command: str, args: list[str], i: int) -> str:
    """What to write instead of the flag args[i] (and its value, when the next argument is one)."""
    flag = args[i]
    name, eq, value = flag.lstrip("-").partition("=")
    name = name.replace("-", "_")
    if not eq and i + 1 < len(args) and not args[i + 1].startswith("--") and "=" not in args[i + 1]:
        value = args[i + 1]
    keys = all_keys()
    note = ""
    mine = [k for k in keys if k.endswith("." + name) and keys[k] in COMMAND_SECTIONS[command]]
    anywhere = [k for k in keys if k.endswith("." + name) and ".N." not in k]
    if name in keys:
        key = name
    elif len(mine) == 1:  # the command's own section first: eval --batch-size is eval.batch_size
        key = mine[0]
    elif name in OPEN_CLIP_FLAGS:
        key, unit, note = OPEN_CLIP_FLAGS[name]
        value = unit or value
    else:
        key = anywhere[0] if len(anywhere) == 1 else ""
    if not key:
        close = difflib.get_close_matches(name, sorted({k.rsplit(".", 1)[1] for k in keys}), n=1)
        hint = f" (a key named like '{close[0]}'?)" if close else ""
        return (f"flags are not used: write section.key=value overrides; {flag!r} names no key{hint}; "
                f"`clipline {command} --help` lists the keys")
    if not value:
        value = "true" if _is_bool(key) else "VALUE"
    return f"flags are not used: write {key}={value}" + (f" ({note})" if note else "")


def _is_bool(key: str) -> bool:
    prefix, _, field = key.rpartition(".")
    return typing.get_type_hints(SECTIONS[prefix]).get(field) is bool


def split_args(command: str, args: list[str]) -> tuple[list[str], list[str]]:
    """YAML files and overrides, in order; a flag or an argument that is neither is a UsageError saying what to
    write."""
    files, overrides = [], []
    for i, arg in enumerate(args):
        if arg.startswith("-"):
            raise UsageError(_flag_error(command, args, i))
        if arg.endswith((".yaml", ".yml")) or ("=" not in arg and Path(arg).is_file()):
            files.append(arg)
        elif "=" in arg:
            overrides.append(arg)
        else:
            hint = f": write {arg}=VALUE" if arg in all_keys() else (
                "; a config file ends in .yaml or .yml, an override looks like train.lr=1e-3")
            raise UsageError(f"argument {arg!r} is neither a YAML file nor a section.key=value override{hint}")
    return files, overrides


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    if args[0] in ("-V", "--version"):
        print(f"clipline {version()}")
        return 0
    name, rest = args[0], args[1:]
    if name in FOLDER_COMMANDS:
        module, _, func = FOLDER_COMMANDS[name][0].partition(":")
        try:
            return getattr(importlib.import_module(module), func)(rest)
        except (UsageError, FileNotFoundError) as e:
            print(f"clipline {name}: error: {e}", file=sys.stderr)
            return 2
    if name not in COMMANDS:
        print(f"clipline: error: unknown command {name!r}; commands: {', '.join(COMMANDS)} "
              f"(`clipline --help` shows them)", file=sys.stderr)
        return 2
    if any(a in ("-h", "--help") for a in rest):
        print(command_help(name, COMMANDS[name][1]), end="")
        return 0
    logging.basicConfig(level=os.environ.get("CLIPLINE_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    try:
        if rest and (name, rest[0]) in ACTIONS:  # a command's action on a folder, not a config run
            module, _, func = ACTIONS[name, rest[0]].partition(":")
            return getattr(importlib.import_module(module), func)(rest[1:])
        files, overrides = split_args(name, rest)
        cfg = load_config(files, overrides)
        storage.configure(cfg.storage)  # every stage reaches s3://, gs://, https:// locations with these options
        return command(name)(cfg)
    except (UsageError, FileNotFoundError) as e:
        if os.environ.get("CLIPLINE_DEBUG"):
            raise
        print(f"clipline {name}: error: {storage.scrub(str(e))}", file=sys.stderr)
        return 2
