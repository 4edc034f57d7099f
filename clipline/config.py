"""The typed config tree shared by every stage.

YAML files are merged left to right, then dotted overrides (``train.lr=1e-3``) are applied, then
``${section.key}`` references in strings are filled in, then every section validates itself. An unknown key or a
value of the wrong type is a :class:`ConfigError` that names the valid keys, raised before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from clipline.errors import UsageError


class ConfigError(UsageError):
    """A config that cannot be used; the message says what is wrong and how to fix it."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class RunConfig:
    name: str = "clipline"
    """Run name: used for wandb and in results records."""
    output_dir: str = "runs/clipline"
    """Root folder of this run's artifacts; stage folders default to places under it."""
    seed: int = 0
    """Seed for model init, data order and augmentation."""

    def validate(self) -> None:
        _check(bool(self.name), "run.name must not be empty")
        _check(bool(self.output_dir), "run.output_dir must not be empty")


@dataclass
class DemoConfig:
    num_train: int = 12000
    """Procedural training scenes to generate."""
    num_eval: int = 1000
    """Held-out scenes (never seen in training, captions included) for eval."""
    captions_per_eval_image: int = 3
    """Captions per held-out image, for retrieval."""
    image_size: int = 64
    """Side of the generated scenes in pixels."""
    seed: int = 1234
    """Seed of the scene generator."""
    source_dir: str = "${run.output_dir}/demo_source"
    """Where the generated images and URL lists are written (and served from over HTTP on 127.0.0.1)."""
    eval_output_dir: str = "${run.output_dir}/shards/eval"
    """Shards of the held-out split; prep.output_dir receives the training split."""

    def validate(self) -> None:
        _check(self.num_train > 0 and self.num_eval > 0, "demo.num_train and demo.num_eval must be > 0")
        _check(self.captions_per_eval_image >= 1, "demo.captions_per_eval_image must be >= 1")
        _check(self.image_size >= 16, "demo.image_size must be >= 16")


@dataclass
class PrepConfig:
    url_list: str = ""
    """URL + caption list: a .parquet, .csv, .tsv or .jsonl file."""
    url_col: str = "url"
    """Column holding the image URL."""
    caption_col: str = "caption"
    """Column holding the caption."""
    extra_columns: list[str] | None = None
    """Columns carried into each sample's .json; null carries every other column, [] carries none."""
    output_dir: str = "${run.output_dir}/shards/train"
    """Folder the webdataset shards, sizes.json, manifest.json and report.md are written to."""
    image_size: int = 256
    """Target image side for img2dataset's resize."""
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = "center_crop"
    """img2dataset resize mode."""
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    """Image encoding inside the shards."""
    encode_quality: int = 95
    """JPEG/WebP quality."""
    samples_per_shard: int = 10000
    """Samples per tar shard."""
    processes: int = 2
    """Download processes."""
    threads: int = 32
    """Download threads per process."""
    timeout: int = 10
    """Per-request socket timeout in seconds."""
    retries: int = 0
    """Download retries per URL."""
    min_image_size: int = 0
    """Drop images whose smaller side is below this (0 keeps all)."""
    user_agent_token: str = "clipline"
    """Token appended to the HTTP user agent so site owners can identify the crawler."""
    disallowed_header_directives: list[str] = field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"])
    """X-Robots-Tag directives that make a response be skipped (opt-out)."""
    allow_private_networks: bool = False
    """Allow URLs whose host resolves to loopback/private/link-local addresses (local demo and tests only)."""

    def validate(self) -> None:
        for key in ("image_size", "samples_per_shard", "processes", "threads", "timeout"):
            _check(getattr(self, key) > 0, f"prep.{key} must be > 0, got {getattr(self, key)}")
        _check(self.retries >= 0 and self.min_image_size >= 0, "prep.retries and prep.min_image_size must be >= 0")
        _check(1 <= self.encode_quality <= 100, "prep.encode_quality must be in 1..100")
        _check(bool(self.url_col) and bool(self.caption_col), "prep.url_col and prep.caption_col must be set")


@dataclass
class ModelConfig:
    name: str = "RN50"
    """An open_clip architecture name (see open_clip.list_models()) or a path to an open_clip model JSON file."""
    pretrained: str = ""
    """Optional weights file (.safetensors or .pt) to start from; empty trains from scratch."""

    def validate(self) -> None:
        _check(bool(self.name), "model.name must name an open_clip architecture or a model JSON file")


@dataclass
class TrainConfig:
    data: str = "${run.output_dir}/shards/train"
    """Training shards: a folder with sizes.json, or a brace pattern such as 'dir/{00000..00009}.tar'."""
    output_dir: str = "${run.output_dir}/train"
    """Run folder: resolved config, metrics.jsonl and checkpoints/ go here."""
    global_batch_size: int = 256
    """Contrastive batch over all ranks; each rank takes global_batch_size / world_size."""
    steps: int = 1000
    """Optimizer steps to train for."""
    lr: float = 5e-4
    """Peak learning rate."""
    weight_decay: float = 0.2
    """AdamW weight decay (not applied to gains, biases, embeddings or the logit scale)."""
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 100
    """Linear warmup steps before the cosine decay."""
    grad_clip: float = 0.0
    """Clip the gradient norm to this value; 0 disables clipping."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast precision of the forward pass (weights stay fp32)."""
    workers: int = 1
    """DataLoader worker processes per rank."""
    shuffle_buffer: int = 2000
    """Samples held in each worker's shuffle buffer."""
    save_every: int = 500
    """Write a checkpoint every this many steps (and at the end)."""
    keep_last: int = 2
    """Completed checkpoints to keep; older ones are deleted."""
    resume: str = "auto"
    """'auto' continues from the newest complete checkpoint in output_dir, 'never' starts fresh, or a checkpoint path."""
    log_every: int = 10
    """Log metrics every this many steps."""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu' or 'cuda'."""
    threads: int = 0
    """torch intra-op threads per rank; 0 keeps torch's default."""

    def validate(self) -> None:
        for key in ("global_batch_size", "steps", "save_every", "keep_last", "log_every"):
            _check(getattr(self, key) > 0, f"train.{key} must be > 0, got {getattr(self, key)}")
        for key in ("lr", "weight_decay", "warmup_steps", "grad_clip", "workers", "threads", "shuffle_buffer"):
            _check(getattr(self, key) >= 0, f"train.{key} must be >= 0, got {getattr(self, key)}")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "train.beta1 and train.beta2 must be in [0, 1)")
        _check(self.device in ("auto", "cpu", "cuda"), f"train.device must be auto, cpu or cuda, got {self.device!r}")
        _check(bool(self.resume), "train.resume must be 'auto', 'never' or a checkpoint path")


@dataclass
class WandbConfig:
    mode: Literal["disabled", "offline", "online"] = "disabled"
    """wandb mode; 'disabled' needs no account and writes nothing."""
    project: str = "clipline"
    entity: str = ""


@dataclass
class EvalDatasetConfig:
    name: str = ""
    """Name of the dataset in results."""
    task: Literal["zeroshot_classification", "retrieval"] = "zeroshot_classification"
    """What to measure on it."""
    path: str = ""
    """Folder of webdataset shards (or a brace pattern)."""
    label_field: str = ""
    """For classification: key of the class name in each sample's .json."""
    classnames: list[str] = field(default_factory=list)
    """For classification: class names, in label order."""
    label_values: list[str] = field(default_factory=list)
    """For classification: the label_field value of each class, when it differs from the class name (e.g. the
    integer 2 for the class 'two'); empty means the values are the class names."""
    templates: list[str] = field(default_factory=lambda: ["a photo of a {c}."])
    """For classification: prompt templates; '{c}' is replaced by the class name."""

    def validate(self) -> None:
        _check(bool(self.name) and bool(self.path), "every eval.datasets entry needs a name and a path")
        if self.task == "zeroshot_classification":
            _check(bool(self.label_field), f"eval dataset {self.name!r}: label_field is required for classification")
            _check(len(self.classnames) >= 2, f"eval dataset {self.name!r}: needs at least 2 classnames")
            _check(not self.label_values or len(self.label_values) == len(self.classnames),
                   f"eval dataset {self.name!r}: label_values must have one entry per classname")
            _check(bool(self.templates) and all("{c}" in t for t in self.templates),
                   f"eval dataset {self.name!r}: every template must contain '{{c}}'")


@dataclass
class EvalConfig:
    checkpoint: str = "${run.output_dir}/train"
    """A checkpoint folder, or a training run folder (its newest complete checkpoint is used)."""
    datasets: list[EvalDatasetConfig] = field(default_factory=list)
    """The suite: datasets x tasks."""
    batch_size: int = 256
    output_dir: str = "${run.output_dir}/eval"
    """results.json, results.csv and results.md go here."""
    device: str = "auto"

    def validate(self) -> None:
        _check(self.batch_size > 0, "eval.batch_size must be > 0")
        for ds in self.datasets:
            ds.validate()
        names = [ds.name for ds in self.datasets]
        _check(len(names) == len(set(names)), f"eval dataset names must be unique, got {names}")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    prep: PrepConfig = field(default_factory=PrepConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()


# ----------------------------------------------------------------------------------------------------------------
# Building the tree from plain data, with type checks


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: unexpected null")
    if origin is Literal:
        _check(value in args, f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        _check(isinstance(value, list), f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), f"{where}: expected a mapping of {_valid_keys(tp)}, got {value!r}")
        return _build(tp, value, where)
    if tp is bool:
        _check(isinstance(value, bool), f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # PyYAML reads '1e-3' (no dot) as a string; accept any string float() understands.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        _check(isinstance(value, (int, float)) and not isinstance(value, bool),
               f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def _valid_keys(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _build(cls: type, data: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{where + '.' if where else ''}{key}'{hint}; "
                              f"valid keys{' of ' + where if where else ''}: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    return cls(**kwargs)


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _apply_override(data: dict, override: str) -> dict:
    key, sep, raw = override.partition("=")
    _check(bool(sep) and bool(key), f"override {override!r} must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: cannot parse value ({e})") from None
    nested: Any = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return _deep_merge(data, nested)


_REF = re.compile(r"\$\{([a-zA-Z_][\w.]*)\}")


def _interpolate(cfg: Config) -> None:
    """Fill ``${section.key}`` references in string fields from other (scalar) fields of the tree."""

    def lookup(path: str, where: str) -> str:
        node: Any = cfg
        for part in path.split("."):
            _check(dataclasses.is_dataclass(node) and hasattr(node, part),
                   f"{where}: reference '${{{path}}}' names no config key")
            node = getattr(node, part)
        _check(isinstance(node, (str, int, float)), f"{where}: reference '${{{path}}}' is not a scalar")
        return str(node)

    def fill(value: str, where: str, depth: int = 0) -> str:
        _check(depth < 10, f"{where}: references form a cycle")
        new = _REF.sub(lambda m: lookup(m.group(1), where), value)
        return fill(new, where, depth + 1) if new != value and _REF.search(new) else new

    def walk(node: Any, where: str) -> None:
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            here = f"{where}.{f.name}" if where else f.name
            if isinstance(value, str):
                setattr(node, f.name, fill(value, here))
            elif dataclasses.is_dataclass(value):
                walk(value, here)
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    if dataclasses.is_dataclass(item):
                        walk(item, f"{here}[{i}]")
                    elif isinstance(item, str):
                        value[i] = fill(item, f"{here}[{i}]")

    walk(cfg, "")


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    _check(p.is_file(), f"config file not found: {p} (pass an existing YAML file, e.g. configs/demo.yaml)")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if data is None:
        return {}
    _check(isinstance(data, dict), f"config file {p} must hold a mapping of sections, got {type(data).__name__}")
    return data


def load_config(files: list[str] | tuple[str, ...] = (), overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Merge YAML ``files`` left to right, apply dotted ``overrides``, resolve references, validate."""
    data: dict = {}
    for path in files:
        data = _deep_merge(data, read_yaml(path))
    for override in overrides:
        data = _apply_override(data, override)
    cfg = _build(Config, data, "")
    _interpolate(cfg)
    cfg.validate()
    return cfg


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)


def config_from_dict(data: dict) -> Config:
    """Rebuild a resolved config (as saved in a run folder or checkpoint)."""
    cfg = _build(Config, data, "")
    cfg.validate()
    return cfg
