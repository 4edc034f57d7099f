"""What eval can evaluate, all from disk: clipline checkpoints (and training run folders), open_clip model folders,
open_clip architectures with a local weights file, and Hugging Face CLIP models saved with save_pretrained."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from clipline import storage
from clipline.checkpoint import (MARKER, check_weights_file, fetch_checkpoint, list_checkpoints,
                                 resolve_checkpoint)
from clipline.config import EvalConfig
from clipline.errors import UsageError
from clipline.models import ModelBundle, load_checkpoint_model, register_architecture

_STEP = re.compile(r"^step_(\d+)$")
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


@dataclass(frozen=True)
class Checkpoint:
    kind: str
    """'open_clip_dir' (clipline checkpoints included), 'open_clip_weights' or 'hf_clip'."""
    path: str
    """The folder, or the weights file."""
    arch: str = ""
    """open_clip_weights: the architecture name or model JSON file."""

    @property
    def label(self) -> str:
        return f"{self.arch}:{self.path}" if self.kind == "open_clip_weights" else self.path

    @property
    def step(self) -> int | None:
        m = _STEP.match(Path(self.path).name)
        return int(m.group(1)) if m else None


def expand_checkpoints(cfg: EvalConfig) -> list[Checkpoint]:
    """Every model to evaluate, in order; a run folder gives its newest checkpoint, or all with all_steps.
    Specs that name nothing on disk are errors here, before any work starts."""
    out: list[Checkpoint] = []
    for spec in cfg.checkpoints or [cfg.checkpoint]:
        out += _expand(spec, cfg.all_steps)
    return out


def _expand(spec: str, all_steps: bool) -> list[Checkpoint]:
    if spec.startswith("hf-hub:"):
        raise UsageError(f"checkpoint {spec!r}: nothing is downloaded; save the model to a folder and pass that")
    if spec.startswith("local-dir:"):
        spec = spec[len("local-dir:"):]
    if storage.is_remote(spec):  # a checkpoint or run folder in a bucket: evaluated from a local copy
        return _expand_remote(spec, all_steps)
    p = Path(spec)
    if not p.exists() and ":" in spec:
        arch, _, weights = spec.partition(":")
        if not Path(weights).is_file():
            raise UsageError(f"checkpoint {spec!r}: weights file {weights} not found (ARCH:WEIGHTS needs a local "
                             f"{'/'.join(_WEIGHT_SUFFIXES)} file)")
        return [Checkpoint("open_clip_weights", weights, arch)]
    if p.is_file() and p.suffix in _WEIGHT_SUFFIXES:
        raise UsageError(f"checkpoint {spec!r} is a bare weights file: say which architecture it is, as "
                         f"ARCH:{spec} (an open_clip model name or model JSON file)")
    if (p / "open_clip_config.json").is_file():
        if _STEP.match(p.name) and not (p / MARKER).is_file():
            resolve_checkpoint(p)  # raises the incomplete-checkpoint error
        return [Checkpoint("open_clip_dir", str(p))]
    if _is_hf_clip(p):
        return [Checkpoint("hf_clip", str(p))]
    try:
        if not all_steps:
            return [Checkpoint("open_clip_dir", str(resolve_checkpoint(p)))]
        found = list_checkpoints(p / "checkpoints") or list_checkpoints(p)
        if not found:
            resolve_checkpoint(p)  # raises the no-checkpoint error
        return [Checkpoint("open_clip_dir", str(path)) for _, path in found]
    except FileNotFoundError as e:
        raise UsageError(f"{e}; or an open_clip model folder, a Hugging Face CLIP folder, or ARCH:WEIGHTS") from None


def _expand_remote(spec: str, all_steps: bool) -> list[Checkpoint]:
    try:
        if not all_steps:
            return [Checkpoint("open_clip_dir", str(fetch_checkpoint(resolve_checkpoint(spec))))]
        found = list_checkpoints(storage.join(spec, "checkpoints")) or list_checkpoints(spec)
        if not found:
            resolve_checkpoint(spec)  # raises the no-checkpoint error
        return [Checkpoint("open_clip_dir", str(fetch_checkpoint(path))) for _, path in found]
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None


def _is_hf_clip(folder: Path) -> bool:
    config = folder / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return "clip" in str(data.get("model_type", "")).lower()


def load_model(ckpt: Checkpoint, device: torch.device | str) -> ModelBundle:
    """The model in eval mode. Weights that do not fit their architecture are a UsageError naming both."""
    try:
        if ckpt.kind == "open_clip_dir":
            bundle = load_checkpoint_model(ckpt.path, device=device)
        elif ckpt.kind == "open_clip_weights":
            bundle = _load_open_clip_weights(ckpt, device)
        else:
            bundle = _load_hf_clip(ckpt.path, device)
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001  (torch, safetensors and transformers each raise their own types)
        # open_clip reports weights of another architecture as a RuntimeError from load_state_dict, or as an
        # AssertionError when it resizes position embeddings first.
        detail = " ".join(ln.strip() for ln in str(e).strip().splitlines()[:3])[:400]
        if any(k in str(e) for k in _CORRUPT_SIGNS) or isinstance(e, EOFError):
            raise UsageError(f"checkpoint {ckpt.label}: a weights file is truncated or corrupt ({type(e).__name__}: "
                             f"{detail}); copy or download it again") from None
        if any(k in str(e) for k in ("size mismatch", "Missing key", "Unexpected key", "shape", "changed")):
            raise UsageError(f"checkpoint {ckpt.label}: its weights do not fit the architecture it names "
                             f"({detail}); use a checkpoint of that architecture, or name the architecture the "
                             f"weights were trained with") from None
        raise UsageError(f"checkpoint {ckpt.label} could not be loaded: {type(e).__name__}: {detail}") from None
    bundle.model.eval()
    return bundle


_CORRUPT_SIGNS = ("PytorchStreamReader", "central directory", "deserializing header", "Ran out of input",
                  "incomplete metadata", "MetadataIncompleteBuffer", "unexpected EOF", "might be corrupted")
"""What torch and safetensors say about a file cut short, when the header check could not tell beforehand."""


def _load_open_clip_weights(ckpt: Checkpoint, device) -> ModelBundle:
    import open_clip

    check_weights_file(ckpt.path, f"checkpoint {ckpt.label}: weights file")
    try:
        arch = register_architecture(ckpt.arch)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"checkpoint {ckpt.label}: {e}") from None
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        arch, pretrained=ckpt.path, device=device, output_dict=True)
    return ModelBundle(model, preprocess_train, preprocess_val, open_clip.get_tokenizer(arch), arch,
                       open_clip.get_model_config(arch) or {})


class HFCLIP(torch.nn.Module):
    """A transformers CLIPModel with open_clip's encode_image / encode_text."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def encode_image(self, pixel_values):
        return _pooled(self.model.get_image_features(pixel_values=pixel_values))

    def encode_text(self, tokens):
        return _pooled(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                     attention_mask=tokens.get("attention_mask")))


def _pooled(out):
    # transformers 4 returns the projected features; 5 returns an output whose pooler_output holds them.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class HFImageTransform:
    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image):
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


class HFTokenizer:
    def __init__(self, tokenizer, context_length: int):
        self.tokenizer, self.context_length = tokenizer, context_length

    def __call__(self, texts):
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.context_length,
                              return_tensors="pt")


def _load_hf_clip(folder: str, device) -> ModelBundle:
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    for name in ("model.safetensors", "pytorch_model.bin"):
        if (Path(folder) / name).is_file():
            check_weights_file(Path(folder) / name, f"checkpoint {folder}: weights file")
    model = CLIPModel.from_pretrained(folder, local_files_only=True).to(device)
    processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    context = model.config.text_config.max_position_embeddings
    transform = HFImageTransform(processor)
    return ModelBundle(HFCLIP(model), transform, transform, HFTokenizer(tokenizer, context), f"hf-clip:{folder}",
                       model.config.to_dict())
