"""`clipline <command> --help`: the keys a stage reads, with type, default and meaning, generated from the config
dataclasses. A field's meaning is the string literal directly under it in clipline/config.py, read here with
``ast``: the config source is the one place a key is documented."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import shutil
import textwrap
import types
import typing
from typing import Any, Literal

import yaml

from clipline import config as config_module
from clipline.config import (DemoConfig, EvalConfig, EvalDatasetConfig, LinearProbeConfig, ModelConfig,
                             PrepConfig, PrepFilterConfig, RunConfig, StorageConfig, TrainConfig, WandbConfig)

SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "demo": DemoConfig,
    "prep": PrepConfig,
    "prep.filters": PrepFilterConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "wandb": WandbConfig,
    "eval": EvalConfig,
    "eval.linear_probe": LinearProbeConfig,
    "eval.datasets.N": EvalDatasetConfig,
    "storage": StorageConfig,
}
"""Every section of the tree by its dotted prefix; eval.datasets.N stands for each entry of the eval.datasets list."""

COMMAND_SECTIONS: dict[str, list[str]] = {
    "prep": ["run", "prep", "prep.filters", "storage"],
    "train": ["run", "model", "train", "wandb", "storage"],
    "eval": ["run", "eval", "eval.linear_probe", "eval.datasets.N", "storage"],
    "demo": list(SECTIONS),
    "config": list(SECTIONS),
}

OVERRIDE_INTRO = ("YAML files are merged left to right, then each override is applied in order, then "
                  "${section.key} references are filled in. Override forms:")
OVERRIDE_FORMS = [
    "  train.lr=1e-3                        a key (values are read as YAML: 1e-3, true, [a, b], {k: v}, null)",
    "  eval.linear_probe={max_iter: 100}    a mapping is merged into the section",
    "  eval.datasets.0.path=/data/imagenet  an element of a list, by index from 0 (also train.crop_scale.1=1.0)",
    "  eval.datasets=[{name: x, path: p}]   a whole list",
]
OVERRIDE_OUTRO = "run.smoke=true shrinks any config to a CPU run of a few steps (it prints what it changed)."


@functools.lru_cache(maxsize=None)
def field_docs() -> dict[str, dict[str, str]]:
    """class name -> field name -> the docstring under the field, from the source of clipline/config.py."""
    tree = ast.parse(inspect.getsource(config_module))
    docs: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = docs.setdefault(node.name, {})
        for stmt, after in zip(node.body, node.body[1:] + [None]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                fields[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def type_name(tp: Any) -> str:
    """A key's type as a user writes it: int, float, str, bool, list[str], one of a|b|c, with 'or null'."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin is list:
        return f"list[{type_name(args[0])}]"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def default_text(value: Any, limit: int = 60) -> str:
    """A default in YAML's flow style (what one would write in an override); long lists are summarised."""
    if dataclasses.is_dataclass(value):
        return "(section)"
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    text = text.removesuffix("\n...").removesuffix("...").strip()
    if text == "''":
        text = '""'
    if len(text) > limit and isinstance(value, list):
        return f"[{len(value)} items; `clipline config` prints them]"
    return text


def field_line(prefix: str, cls: type, f: dataclasses.Field) -> str:
    """`prefix.key: type = default` for one field."""
    tp = typing.get_type_hints(cls)[f.name]
    if dataclasses.is_dataclass(tp):
        return f"{prefix}.{f.name}: section"
    return f"{prefix}.{f.name}: {type_name(tp)} = {default_text(getattr(cls(), f.name))}"


def section_help(prefix: str, width: int) -> str:
    cls = SECTIONS[prefix]
    docs = field_docs().get(cls.__name__, {})
    title = prefix if not prefix.endswith(".N") else f"{prefix} (each entry of the {prefix[:-2]} list, N from 0)"
    lines = [title]
    if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):  # dataclass's generated doc is no doc
        lines += textwrap.wrap(inspect.cleandoc(cls.__doc__), width, initial_indent="  ", subsequent_indent="  ")
    for f in dataclasses.fields(cls):
        lines += textwrap.wrap(field_line(prefix, cls, f), width, initial_indent="  ", subsequent_indent="      ",
                               break_on_hyphens=False)
        doc = " ".join(docs.get(f.name, "").split())
        if dataclasses.is_dataclass(typing.get_type_hints(cls)[f.name]):
            doc = (doc + " " if doc else "") + f"(its keys: {prefix}.{f.name}.*, below)"
        elif f.name == "datasets" and cls is EvalConfig:
            doc += " (the keys of each entry: eval.datasets.N.*, below)"
        lines += textwrap.wrap(doc, width, initial_indent="      ", subsequent_indent="      ",
                               break_on_hyphens=False)
    return "\n".join(lines)


def terminal_width() -> int:
    return max(60, min(shutil.get_terminal_size((100, 24)).columns, 120) - 1)


def command_help(command: str, summary: str, width: int | None = None) -> str:
    """The whole `clipline COMMAND --help` text."""
    width = width or terminal_width()
    head = [f"usage: clipline {command} [CONFIG.yaml ...] [section.key=value ...]", "",
            *textwrap.wrap(f"{command}: {summary}", width), ""]
    head += [*textwrap.wrap(OVERRIDE_INTRO, width), *OVERRIDE_FORMS, *textwrap.wrap(OVERRIDE_OUTRO, width)]
    head += ["", *textwrap.wrap(f"Keys of sections {', '.join(COMMAND_SECTIONS[command])}, as `key: type = default` "
                                f"and what the key means:", width), ""]
    body = "\n\n".join(section_help(prefix, width) for prefix in COMMAND_SECTIONS[command])
    return "\n".join(head) + "\n" + body + "\n"


def all_keys() -> dict[str, str]:
    """Every dotted key of the tree (list entries as eval.datasets.N.key) -> its section prefix."""
    return {f"{prefix}.{f.name}": prefix for prefix, cls in SECTIONS.items() for f in dataclasses.fields(cls)}

