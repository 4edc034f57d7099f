"""The `clipline` console script: one table of subcommands, each taking YAML files and dotted overrides.

    clipline <command> [CONFIG.yaml ...] [section.key=value ...]

This table is the only place in the shared layer that names the stages, and it imports them lazily, by name,
when a command runs.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Callable

from clipline.config import Config, config_to_yaml, load_config
from clipline.errors import UsageError

COMMANDS: dict[str, tuple[str, str]] = {
    "prep": ("data_prep.prep:main", "build webdataset shards from a URL + caption list (section prep)"),
    "train": ("training.trainer:main", "train a dual encoder on shards (sections model, train, wandb)"),
    "eval": ("eval.suite:main", "zero-shot classification and retrieval on a checkpoint (section eval)"),
    "demo": ("clipline.cli:demo", "the whole pipeline on generated demo data: data -> shards -> train -> eval"),
    "config": ("clipline.cli:show_config", "print the resolved config"),
}

USAGE = f"""usage: clipline <command> [CONFIG.yaml ...] [section.key=value ...]

YAML files are merged left to right, then overrides are applied (e.g. train.lr=1e-3).

commands:
""" + "\n".join(f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()) + """

examples:
  clipline demo configs/demo.yaml
  clipline prep configs/demo.yaml prep.url_list=urls.parquet prep.output_dir=shards/
  torchrun --nproc_per_node 2 -m clipline train configs/demo.yaml
  clipline config configs/demo.yaml train.steps=10
"""


def command(name: str) -> Callable[[Config], int]:
    module, _, func = COMMANDS[name][0].partition(":")
    return getattr(importlib.import_module(module), func)


def show_config(cfg: Config) -> int:
    print(config_to_yaml(cfg), end="")
    return 0


def demo(cfg: Config) -> int:
    """Generate and serve demo data and build its shards, then train, then evaluate: each stage reads the last
    one's artifacts from disk."""
    stages = {"data": "data_prep.demo:main", "train": COMMANDS["train"][0], "eval": COMMANDS["eval"][0]}
    for stage, target in stages.items():
        print(f"\n== {stage} ==", flush=True)
        module, _, func = target.partition(":")
        code = getattr(importlib.import_module(module), func)(cfg)
        if code:
            return code
    print(f"\nresults: {cfg.eval.output_dir}/results.md (results.json and results.csv beside it)", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"clipline: error: unknown command {name!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if any(a in ("-h", "--help") for a in rest):
        print(f"clipline {name}: {COMMANDS[name][1]}\n\n{USAGE}", end="")
        return 0
    logging.basicConfig(level=os.environ.get("CLIPLINE_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    files = [a for a in rest if "=" not in a]
    overrides = [a for a in rest if "=" in a]
    try:
        cfg = load_config(files, overrides)
        return command(name)(cfg)
    except (UsageError, FileNotFoundError) as e:
        if os.environ.get("CLIPLINE_DEBUG"):
            raise
        print(f"clipline {name}: error: {e}", file=sys.stderr)
        return 2
