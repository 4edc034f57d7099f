"""Model factory: open_clip architectures by name or JSON file, and loading of clipline checkpoints."""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from clipline.config import ModelConfig


@dataclass
class ModelBundle:
    model: torch.nn.Module
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable
    arch: str
    """The open_clip architecture name the model was built from."""
    model_cfg: dict
    """open_clip's model config dict; saved in checkpoints so they load without this project."""


def _open_clip():
    import open_clip  # imported lazily: it pulls in timm/transformers and costs seconds

    return open_clip


def register_architecture(name: str) -> str:
    """Return the open_clip architecture name for ``name``, registering a JSON model config file if given one."""
    open_clip = _open_clip()
    path = Path(name)
    if name.endswith(".json"):
        if not path.is_file():
            raise FileNotFoundError(f"model config file not found: {path}")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"model config {path} is not valid JSON: {e}") from None
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
        if missing:
            raise ValueError(f"model config {path} lacks {missing}: an open_clip model JSON needs embed_dim, "
                             f"vision_cfg and text_cfg")
        open_clip.add_model_config(path)
        return path.stem
    if name.startswith("local-dir:"):
        return name
    if name not in open_clip.list_models():
        close = difflib.get_close_matches(name, open_clip.list_models(), n=3)
        raise ValueError(f"unknown open_clip architecture {name!r}"
                         + (f"; did you mean {', '.join(close)}?" if close else "")
                         + " (see open_clip.list_models(), or pass a path to a model JSON file)")
    return name


OBJECTIVE_INIT = {"clip": (math.log(1 / 0.07), None), "siglip": (math.log(10), -10.0)}
"""(initial log logit scale, initial logit bias) per objective, as in the CLIP and SigLIP papers."""


def _pretrained_file(path: str) -> str | None:
    """A weights file, or the weights inside a checkpoint / open_clip model folder."""
    if not path:
        return None
    p = Path(path)
    if p.is_dir():
        for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors"):
            if (p / name).is_file():
                return str(p / name)
        raise FileNotFoundError(f"model.pretrained folder {p} holds no open_clip weights file")
    if not p.is_file():
        raise FileNotFoundError(f"model.pretrained weights file not found: {p}")
    return str(p)


def create_model(cfg: ModelConfig, device: torch.device | str = "cpu", objective: str = "clip") -> ModelBundle:
    """Build the model for training: architecture, objective-specific temperature/bias, weights, locks."""
    open_clip = _open_clip()
    arch = register_architecture(cfg.name)
    scale, bias = OBJECTIVE_INIT[objective]
    init = {"init_logit_scale": cfg.init_logit_scale if cfg.init_logit_scale is not None else scale}
    if cfg.init_logit_bias is not None or bias is not None:
        init["init_logit_bias"] = cfg.init_logit_bias if cfg.init_logit_bias is not None else bias
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        arch, pretrained=_pretrained_file(cfg.pretrained), device=device, output_dict=True, **init)
    if cfg.lock_image:
        model.lock_image_tower(unlocked_groups=cfg.lock_image_unlocked_groups, freeze_bn_stats=True)
    if cfg.lock_text:
        model.lock_text_tower(unlocked_layers=cfg.lock_text_unlocked_layers)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    tokenizer = open_clip.get_tokenizer(arch)
    # The saved config must rebuild this exact model (a logit bias adds a parameter).
    model_cfg = {**_model_cfg(arch), **init}
    return ModelBundle(model, preprocess_train, preprocess_val, tokenizer, arch, model_cfg)


def _model_cfg(arch: str) -> dict:
    open_clip = _open_clip()
    if arch.startswith("local-dir:"):
        return json.loads((Path(arch[len("local-dir:"):]) / "open_clip_config.json").read_text())["model_cfg"]
    return open_clip.get_model_config(arch)


def open_clip_folder_config(bundle: ModelBundle) -> dict[str, Any]:
    """The ``open_clip_config.json`` content that makes a checkpoint folder loadable as ``local-dir:``."""
    preprocess = dict(getattr(bundle.model.visual, "preprocess_cfg", {}) or {})
    return {"model_cfg": bundle.model_cfg, "preprocess_cfg": preprocess, "clipline_arch": bundle.arch}


def save_model_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))


def load_checkpoint_model(checkpoint_dir: str | Path, device: torch.device | str = "cpu") -> ModelBundle:
    """Load a clipline checkpoint folder (or any open_clip local-dir folder) for evaluation."""
    open_clip = _open_clip()
    folder = Path(checkpoint_dir)
    cfg_path = folder / "open_clip_config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder} has no open_clip_config.json: not a clipline checkpoint or open_clip "
                                f"model folder")
    arch = f"local-dir:{folder}"
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        arch, device=device, output_dict=True)
    tokenizer = open_clip.get_tokenizer(arch)
    model_cfg = json.loads(cfg_path.read_text())["model_cfg"]
    return ModelBundle(model, preprocess_train, preprocess_val, tokenizer, arch, model_cfg)
