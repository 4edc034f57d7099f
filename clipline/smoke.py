"""``run.smoke=true``: shrink any config to a CPU run of a few steps that goes through every stage it names.

big_vision's ``runlocal`` habit: the same recipe that runs on a cluster is checked end to end on a laptop first.
The switch shrinks work (steps, batch, model size, eval suite, workers) and moves outputs into a smoke folder; it
never touches where the data comes from (train.data, eval dataset paths, eval.checkpoint, prep.url_list), so a
smoke run reads real data or fails saying it is missing. Everything it changes is listed on stderr.
"""

from __future__ import annotations

import json
import os
import sys
import typing
from pathlib import Path
from typing import Any

from clipline.config import Config, EvalConfig, TrainConfig

STEPS = 4
"""Optimizer steps of a smoke run: a checkpoint at 2, and at 4 the end (and in-loop eval, when the config has it)."""
GLOBAL_BATCH = 8
IMAGE_SIDE = 64
"""Largest image side of a shrunk model (ViT sides are rounded to whole patches; a ResNet needs a multiple of 32)."""

OUTPUT_FIELDS = [("prep", "output_dir"), ("train", "output_dir"), ("eval", "output_dir"), ("demo", "source_dir"),
                 ("demo", "eval_output_dir")]
"""Folders the stages write to; each must end up under the smoke folder."""


class Changes:
    """Applies and records ``section.key: old -> new`` for the smoke report."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def set(self, section: Any, where: str, key: str, new: Any) -> None:
        old = getattr(section, key)
        if old != new:
            setattr(section, key, new)
            self.lines.append(f"{where}.{key}: {_show(old)} -> {_show(new)}")

    def cap(self, section: Any, where: str, key: str, most: int) -> None:
        self.set(section, where, key, min(getattr(section, key), most))

    def note(self, line: str) -> None:
        self.lines.append(line)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _auto_or_fp32(cls: type) -> str:
    """'auto' where the precision key offers it (bf16 only where the hardware runs it natively), else fp32."""
    return "auto" if "auto" in typing.get_args(typing.get_type_hints(cls)["precision"]) else "fp32"


def shrink_settings(cfg: Config) -> list[str]:
    """Everything but the model, on the config before ``${...}`` references are filled in: moving run.output_dir
    moves every path that refers to it (a demo's generated data and shards included)."""
    ch = Changes()
    if not cfg.run.output_dir.rstrip("/").endswith("/smoke"):
        ch.set(cfg.run, "run", "output_dir", cfg.run.output_dir.rstrip("/") + "/smoke")
    for section, key in OUTPUT_FIELDS:
        node = getattr(cfg, section)
        if "${run.output_dir}" not in getattr(node, key):  # an explicit folder: the real run's, keep out of it
            ch.set(node, section, key, getattr(type(node)(), key))

    t = cfg.train
    ch.cap(t, "train", "steps", STEPS)
    ch.cap(t, "train", "accum_steps", 2)
    ch.cap(t, "train", "global_batch_size", GLOBAL_BATCH)
    if t.global_batch_size % t.accum_steps:
        ch.set(t, "train", "accum_steps", 1)
    ch.cap(t, "train", "warmup_steps", 1)
    ch.set(t, "train", "save_every", max(1, t.steps // 2))
    ch.cap(t, "train", "keep_last", 2)
    ch.set(t, "train", "log_every", 1)
    if t.eval_every:
        ch.set(t, "train", "eval_every", t.steps)
    if t.queue_size:
        ch.cap(t, "train", "queue_size", 4 * t.global_batch_size)
    ch.set(t, "train", "workers", 0)
    ch.cap(t, "train", "shuffle_buffer", 32)
    ch.set(t, "train", "device", "cpu")
    ch.set(t, "train", "compile", False)
    ch.set(t, "train", "precision", _auto_or_fp32(TrainConfig))
    ch.set(t, "train", "resume", "never")  # a smoke run always runs its steps, even where one ran before

    e = cfg.eval
    ch.cap(e, "eval", "batch_size", 32)
    ch.set(e, "eval", "workers", 0)
    ch.set(e, "eval", "device", "cpu")
    ch.set(e, "eval", "precision", _auto_or_fp32(EvalConfig))
    ch.cap(e.linear_probe, "eval.linear_probe", "grid_points", 3)
    ch.cap(e.linear_probe, "eval.linear_probe", "refine_steps", 1)
    ch.cap(e.linear_probe, "eval.linear_probe", "max_iter", 50)
    first_of_task: dict[str, Any] = {}
    for ds in e.datasets:
        first_of_task.setdefault(ds.task, ds)
    kept = list(first_of_task.values())
    if len(kept) < len(e.datasets):
        dropped = [ds.name for ds in e.datasets if ds not in kept]
        e.datasets = kept
        ch.note(f"eval.datasets: kept the first of each task ({', '.join(ds.name for ds in kept)}); "
                f"dropped {', '.join(dropped)}")

    p = cfg.prep
    ch.set(p, "prep", "processes", 1)
    ch.cap(p, "prep", "threads", 8)
    ch.cap(p, "prep", "image_size", IMAGE_SIDE)
    ch.cap(p, "prep", "samples_per_shard", 128)
    ch.cap(p.filters, "prep.filters", "clip_batch_size", 16)
    ch.set(p.filters, "prep.filters", "clip_device", "cpu")

    d = cfg.demo
    ch.cap(d, "demo", "num_train", 384)
    ch.cap(d, "demo", "num_eval", 60)
    ch.cap(d, "demo", "image_size", 32)

    ch.set(cfg.wandb, "wandb", "mode", "disabled")
    return ch.lines


def _model_config(name: str) -> dict | None:
    """The open_clip model config ``name`` stands for, or None when it cannot be read here (model creation then
    reports the problem)."""
    if name.endswith(".json"):
        path = Path(name)
        return json.loads(path.read_text()) if path.is_file() else None
    if name.startswith("local-dir:"):
        path = Path(name[len("local-dir:"):]) / "open_clip_config.json"
        return json.loads(path.read_text()).get("model_cfg") if path.is_file() else None
    import open_clip  # only here: it costs seconds to import

    cfg = open_clip.get_model_config(name)
    return json.loads(json.dumps(cfg)) if cfg else None


def shrink_model_config(model_cfg: dict) -> dict | None:
    """The same architecture family (ViT with its patch size, or ResNet; the same text tower and tokenizer) at a
    few layers, a small width and a small image. A tower from timm or Hugging Face, whose size is in a name that
    cannot be shrunk, is kept as it is; None when both are."""
    vision, text = dict(model_cfg.get("vision_cfg", {})), dict(model_cfg.get("text_cfg", {}))
    if vision.get("timm_model_name") and text.get("hf_model_name"):
        return None
    out = dict(model_cfg, vision_cfg=vision, text_cfg=text)
    out["embed_dim"] = min(model_cfg.get("embed_dim", 128), 128)
    side = vision.get("image_size", 224)
    if vision.get("timm_model_name"):
        small = side  # its size is in its name: kept as it is
    elif isinstance(vision.get("layers"), (list, tuple)):  # ModifiedResNet: stages of bottleneck blocks
        vision["layers"] = [1] * len(vision["layers"])
        vision["width"] = min(vision.get("width", 64), 16)
        small = IMAGE_SIDE
    else:  # VisionTransformer
        vision["layers"] = min(vision.get("layers", 12), 2)
        vision["width"] = min(vision.get("width", 768), 128)
        patch = vision.get("patch_size", 16)
        small = patch * max(2, IMAGE_SIDE // patch)
    if isinstance(side, int) and side > small:
        vision["image_size"] = small
    if not text.get("hf_model_name"):
        text["layers"] = min(text.get("layers", 12), 2)
        text["width"] = min(text.get("width", 512), 128)
        text["heads"] = min(text.get("heads", 8), 2)
    return out


def shrink_model(cfg: Config) -> list[str]:
    """Point model.name at a shrunk copy of its architecture (a JSON file in the smoke folder), after references
    are filled in. Pretrained weights of the full model no longer fit it, so model.pretrained is dropped."""
    ch = Changes()
    model_cfg = _model_config(cfg.model.name)
    if model_cfg is None:
        return [f"model.name: {cfg.model.name!r} left as is (its config cannot be read here)"]
    small = shrink_model_config(model_cfg)
    if small is None:
        return [f"model.name: {cfg.model.name!r} left as is (a timm or Hugging Face tower cannot be shrunk)"]
    if small == model_cfg:
        return []
    stem = Path(cfg.model.name.split(":", 1)[-1]).name.removesuffix(".json")
    path = Path(cfg.run.output_dir) / f"{stem}-smoke.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(small, indent=2) + "\n")
    os.replace(tmp, path)  # every rank of a launch may write it: whole files only
    ch.set(cfg.model, "model", "name", str(path))
    v, s = small["vision_cfg"], model_cfg["vision_cfg"]
    t, u = small["text_cfg"], model_cfg["text_cfg"]
    image = ("kept (timm)" if v.get("timm_model_name") else f"{s.get('layers')} layers x {s.get('width')} wide at "
             f"{s.get('image_size')} px -> {v['layers']} x {v['width']} at {v.get('image_size')} px")
    text = ("kept (Hugging Face)" if t.get("hf_model_name") else
            f"{u.get('layers')} x {u.get('width')} -> {t['layers']} x {t['width']}")
    ch.note(f"  (image tower {image}; text tower {text}; embed_dim {small['embed_dim']})")
    if cfg.model.pretrained:
        ch.set(cfg.model, "model", "pretrained", "")
        ch.note("  (the pretrained weights fit the full model, not the shrunk one; locks and LoRA still apply)")
    return ch.lines


def report(lines: list[str]) -> None:
    print("run.smoke: a CPU check run of a few steps; changed:", file=sys.stderr)
    for line in lines:
        print(f"  {line}", file=sys.stderr)
    sys.stderr.flush()

