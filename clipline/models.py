"""Model factory: open_clip architectures by name or JSON file, and loading of clipline checkpoints."""

from __future__ import annotations

import difflib
import json
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from clipline.checkpoint import check_weights_file
from clipline.config import ModelConfig
from clipline.errors import UsageError

log = logging.getLogger(__name__)


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


WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors")
"""The weights file of an open_clip model folder, in the order open_clip looks for them."""


def _pretrained_file(path: str) -> str | None:
    """A weights file, or the weights inside a checkpoint / open_clip model folder (checked to be whole)."""
    if not path:
        return None
    p = Path(path)
    if p.is_dir():
        found = next((p / name for name in WEIGHT_FILES if (p / name).is_file()), None)
        if found is None:
            raise FileNotFoundError(f"model.pretrained folder {p} holds no open_clip weights file")
        p = found
    elif not p.is_file():
        raise FileNotFoundError(f"model.pretrained weights file not found: {p}")
    check_weights_file(p, "model.pretrained weights file")
    return str(p)


def create_model(cfg: ModelConfig, device: torch.device | str = "cpu", objective: str = "clip") -> ModelBundle:
    """Build the model for training: architecture, objective-specific temperature/bias, weights, locks."""
    open_clip = _open_clip()
    arch = register_architecture(cfg.name)
    scale, bias = OBJECTIVE_INIT[objective]
    init = {"init_logit_scale": cfg.init_logit_scale if cfg.init_logit_scale is not None else scale}
    if cfg.init_logit_bias is not None or bias is not None:
        init["init_logit_bias"] = cfg.init_logit_bias if cfg.init_logit_bias is not None else bias
    pretrained = _pretrained_file(cfg.pretrained)
    model_cfg = {**_model_cfg(arch), **init}
    text_cfg = _hf_text_cfg_here(model_cfg, arch, cfg.hf_text_model)
    if text_cfg is not None:  # replaces open_clip's text_cfg whole, so it says itself where the tower's weights are
        loads_weights = bool(pretrained) or arch.startswith("local-dir:")
        init["text_cfg"] = text_cfg = {**text_cfg, "hf_model_pretrained": not loads_weights}
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        arch, pretrained=pretrained, device=device, output_dict=True, **init)
    if cfg.lock_image:
        model.lock_image_tower(unlocked_groups=cfg.lock_image_unlocked_groups, freeze_bn_stats=True)
    if cfg.lock_text and _is_hf_text(model) and cfg.lock_text_unlocked_layers:
        _lock_hf_text_tower(model.text, cfg.lock_text_unlocked_layers)
    elif cfg.lock_text:
        model.lock_text_tower(unlocked_layers=cfg.lock_text_unlocked_layers)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    apply_lora(model, cfg)
    tokenizer = _tokenizer(arch, text_cfg)
    # The saved config must rebuild this exact model (a logit bias adds a parameter).
    return ModelBundle(model, preprocess_train, preprocess_val, tokenizer, arch, {**model_cfg, **init})


def _is_hf_text(model: torch.nn.Module) -> bool:
    """Whether the text tower is open_clip's Hugging Face adapter (HFTextEncoder)."""
    return hasattr(getattr(model, "text", None), "transformer") and hasattr(model.text, "config")


def _lock_hf_text_tower(text: torch.nn.Module, unlocked_layers: int) -> None:
    """Freeze a Hugging Face text tower but its last ``unlocked_layers`` layers (and the projection above it), as
    open_clip's HFTextEncoder.lock does: the embeddings and the layers below are frozen, LayerNorms included.
    Ours because open_clip 3.3.0's table names no layers for BERT (its lock raises KeyError 'layer_attr')."""
    n = getattr(text.config, "num_hidden_layers", None)
    layers = next((m for m in text.transformer.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n),
                  None)
    if layers is None:
        raise UsageError(f"model.lock_text_unlocked_layers: the layers of this Hugging Face text tower "
                         f"({text.config.model_type}) cannot be found; set it to 0 (all frozen), or use "
                         f"model.lora_text instead of model.lock_text")
    if unlocked_layers > n:
        raise UsageError(f"model.lock_text_unlocked_layers={unlocked_layers} but the text tower has {n} layers: "
                         f"at most {n} (then only its embeddings stay frozen)")
    embeddings = getattr(text.transformer, "embeddings", None) or text.transformer.get_input_embeddings()
    for module in [embeddings, *layers[:n - unlocked_layers]]:
        for p in module.parameters():
            p.requires_grad_(False)


def _model_cfg(arch: str) -> dict:
    open_clip = _open_clip()
    if arch.startswith("local-dir:"):
        return json.loads((Path(arch[len("local-dir:"):]) / "open_clip_config.json").read_text())["model_cfg"]
    return open_clip.get_model_config(arch)


def open_clip_folder_config(bundle: ModelBundle) -> dict[str, Any]:
    """The ``open_clip_config.json`` content that makes a checkpoint folder loadable as ``local-dir:``. A Hugging
    Face text tower is pointed at the folder itself (HF_HERE), where ``hf_tower_writers`` puts its files: write
    both, or neither."""
    preprocess = dict(getattr(bundle.model.visual, "preprocess_cfg", {}) or {})
    model_cfg = bundle.model_cfg
    text = model_cfg.get("text_cfg") or {}
    if text.get("hf_model_name"):
        # hf_model_pretrained off: the tower's weights are in the folder's open_clip weights file, and open_clip
        # builds it from config.json alone before loading them.
        text = {**text, "hf_model_name": HF_HERE, "hf_model_pretrained": False}
        if text.get("hf_tokenizer_name"):
            text["hf_tokenizer_name"] = HF_HERE
        model_cfg = {**model_cfg, "text_cfg": text}
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess, "clipline_arch": bundle.arch}


HF_HERE = "."
"""Where a checkpoint's open_clip_config.json says its Hugging Face text tower's config and tokenizer are: the
checkpoint folder itself, so it can move. open_clip.get_tokenizer('local-dir:DIR') reads the tokenizer from DIR
whatever the name says; open_clip (transformers) resolves hf_model_name against the working directory, so plain
open_clip and CLIP_benchmark load such a checkpoint when run from inside it; clipline resolves it against the
checkpoint folder from anywhere."""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
"""Either one makes a folder a Hugging Face tokenizer folder."""


def hf_tower_writers(bundle: ModelBundle) -> dict[str, Callable[[Path], None]]:
    """File name -> writer of what makes a checkpoint folder of a model with a Hugging Face text tower
    self-contained: the tower's transformers config (config.json; not its weights, which the open_clip weights file
    holds) and the tokenizer files. Empty for other models. Goes with ``open_clip_folder_config``."""
    text = getattr(bundle.model, "text", None)
    hf_config = getattr(text, "config", None)
    text_cfg = bundle.model_cfg.get("text_cfg") or {}
    if not text_cfg.get("hf_model_name") or hf_config is None:
        return {}
    files = {"config.json": hf_config.to_json_string().encode()}
    hf_tokenizer = getattr(bundle.tokenizer, "tokenizer", None)
    if text_cfg.get("hf_tokenizer_name") and hasattr(hf_tokenizer, "save_pretrained"):
        with tempfile.TemporaryDirectory() as tmp:
            hf_tokenizer.save_pretrained(tmp)
            files.update({p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()})
    return {name: (lambda path, data=data: path.write_bytes(data)) for name, data in files.items()}


def _hf_text_cfg_here(model_cfg: dict, arch: str, hf_text_model: str = "") -> dict | None:
    """The text_cfg of a Hugging Face text tower with paths that work from here, or None when nothing changes:
    model.hf_text_model's folder in place of the architecture's, or a checkpoint's relative paths resolved against
    the checkpoint folder (open_clip would resolve them against the working directory)."""
    text = model_cfg.get("text_cfg") or {}
    if not text.get("hf_model_name"):
        if hf_text_model:
            raise UsageError(f"model.hf_text_model={hf_text_model} but {arch} has no Hugging Face text tower "
                             f"(its text_cfg has no hf_model_name): use a model JSON whose text_cfg names one, or "
                             f"set model.hf_text_model=''")
        return None
    if hf_text_model:
        if not (Path(hf_text_model) / "config.json").is_file():
            raise UsageError(f"model.hf_text_model={hf_text_model} is not a Hugging Face model folder (no "
                             f"config.json there): point it at the folder holding the model's config.json, "
                             f"weights and tokenizer files")
        out = {**text, "hf_model_name": hf_text_model}
        if text.get("hf_tokenizer_name"):
            out["hf_tokenizer_name"] = hf_text_model
        return out
    if not arch.startswith("local-dir:"):
        return None
    folder = Path(arch[len("local-dir:"):])
    out = dict(text)
    for key in ("hf_model_name", "hf_tokenizer_name"):
        name = text.get(key)
        if not name:
            continue
        if not Path(name).is_absolute() and (folder / name).exists():
            out[key] = str(folder / name)
        elif Path(name).is_absolute() and not Path(name).exists():
            raise UsageError(f"{folder}: open_clip_config.json's text_cfg.{key} is {name}, which is not on this "
                             f"machine (a checkpoint written before checkpoints held their Hugging Face files): "
                             f"copy that model folder there, or set {key} to a folder with its config.json and "
                             f"tokenizer files")
    return out if out != text else None


def _tokenizer(arch: str, text_cfg: dict | None) -> Callable:
    """open_clip's tokenizer for ``arch``; for a Hugging Face text tower whose files are elsewhere than open_clip
    looks (model.hf_text_model, a checkpoint without tokenizer files), built from where ``text_cfg`` says."""
    open_clip = _open_clip()
    if text_cfg is None or not text_cfg.get("hf_tokenizer_name"):
        return open_clip.get_tokenizer(arch)
    folder = Path(arch[len("local-dir:"):]) if arch.startswith("local-dir:") else None
    if folder is not None and any((folder / name).is_file() for name in TOKENIZER_FILES):
        return open_clip.get_tokenizer(arch)  # exactly what plain open_clip builds from the checkpoint
    from open_clip.tokenizer import HFTokenizer

    return HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=text_cfg.get("context_length", 77),
                       tokenizer_mode=text_cfg.get("tokenizer_mode"), **(text_cfg.get("tokenizer_kwargs") or {}))


def save_model_weights(model: torch.nn.Module, path: Path) -> None:
    """The weights under plain open_clip names (LoRA adapters merged), so open_clip loads the file as it is."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in merged_state_dict(model).items()}
    save_file(state, str(path))


def load_checkpoint_model(checkpoint_dir: str | Path, device: torch.device | str = "cpu") -> ModelBundle:
    """Load a clipline checkpoint folder (or any open_clip local-dir folder) for evaluation."""
    open_clip = _open_clip()
    folder = Path(checkpoint_dir)
    cfg_path = folder / "open_clip_config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder} has no open_clip_config.json: not a clipline checkpoint or open_clip "
                                f"model folder")
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                 "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth"):  # the first one open_clip reads
        if (folder / name).is_file():
            check_weights_file(folder / name, "checkpoint weights file")
            break
    arch = f"local-dir:{folder}"
    model_cfg = json.loads(cfg_path.read_text())["model_cfg"]
    text_cfg = _hf_text_cfg_here(model_cfg, arch)
    extra = {} if text_cfg is None else {"text_cfg": {**text_cfg, "hf_model_pretrained": False}}
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        arch, device=device, output_dict=True, **extra)
    return ModelBundle(model, preprocess_train, preprocess_val, _tokenizer(arch, text_cfg), arch, model_cfg)


# --- LoRA through peft --------------------------------------------------------------------------------------------

def apply_lora(model: torch.nn.Module, cfg: ModelConfig) -> None:
    """Inject peft LoRA adapters into the towers ``cfg`` names (model.lora_image / lora_text): every weight of such
    a tower is frozen, and only the adapters it gains train."""
    towers = [tower for tower in ("image", "text") if getattr(cfg, f"lora_{tower}")]
    if not towers:
        return
    from peft import LoraConfig, inject_adapter_in_model

    for tower in towers:
        for p in _tower_parameters(model, tower):
            p.requires_grad_(False)
        modules, parameters = _lora_targets(model, tower, cfg.lora_targets)
        if cfg.lora_dropout and parameters:
            raise UsageError(f"model.lora_dropout={cfg.lora_dropout} cannot apply to parameter targets such as "
                             f"{parameters[0]} (peft cannot factor the input out of a weight's update): set "
                             f"model.lora_dropout=0 or drop them from model.lora_targets")
        config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                            target_modules=modules or None, target_parameters=parameters or None)
        try:
            inject_adapter_in_model(config, _tower_root(model, tower))
        except ValueError as e:  # e.g. a target that is a LayerNorm
            raise UsageError(f"model.lora_targets on the {tower} tower: {e}") from None


def _tower_root(model: torch.nn.Module, tower: str) -> torch.nn.Module:
    """The module holding a tower's layers: ``visual``; for text ``text`` in open_clip's CustomTextCLIP and
    ``transformer`` in CLIP."""
    if tower == "image":
        return model.visual
    return model.text if hasattr(model, "text") else model.transformer


def _tower_parameters(model: torch.nn.Module, tower: str) -> list[torch.nn.Parameter]:
    """The image tower is ``visual``; the text tower is everything else but the logit scale and bias (CLIP keeps
    its token embedding, final norm and projection at the top level)."""
    if tower == "image":
        return list(model.visual.parameters())
    exclude = {id(p) for p in model.visual.parameters()}
    exclude |= {id(getattr(model, name)) for name in ("logit_scale", "logit_bias") if getattr(model, name, None)
                is not None}
    return [p for p in model.parameters() if id(p) not in exclude]


def _lora_targets(model: torch.nn.Module, tower: str, patterns: list[str]) -> tuple[list[str], list[str]]:
    """The tower's modules and parameters that ``patterns`` name (exact names or dotted suffixes), as peft's
    module and parameter targets, keeping only adapters that can train exactly.

    Two kinds look adaptable but are not. A layer whose forward never runs: nn.MultiheadAttention reads its
    out_proj's weight directly, as open_clip's ResNet attention pool does with q/k/v/c_proj, so an adapter there
    is never called (found by running the tower once on a dummy input; skipped with a warning). And a whole
    nn.MultiheadAttention: peft merges its adapter into the frozen weights before every forward and subtracts it
    after, which moves them by rounding error each step (refused; in_proj_weight adapts its q/k/v exactly).
    """
    root = _tower_root(model, tower)
    modules = dict(root.named_modules())
    matches = lambda name: any(name == p or name.endswith("." + p) for p in patterns)
    module_hits = [name for name in modules if name and matches(name)]
    parameter_hits = [name for name, _ in root.named_parameters() if matches(name) and name not in module_hits]
    for name in module_hits:
        if isinstance(modules[name], torch.nn.MultiheadAttention):
            raise UsageError(f"model.lora_targets names {name}, an nn.MultiheadAttention: peft's adapter for it "
                             f"changes the frozen weights on every step; use in_proj_weight for its query/key/value "
                             f"projections")
    owner = lambda name: name if name in module_hits else name.rpartition(".")[0]
    called = _modules_called(model, tower, {owner(n) for n in module_hits + parameter_hits})
    skipped = [n for n in module_hits + parameter_hits if owner(n) not in called]
    if skipped:
        log.warning("model.lora_targets: no adapter on %s of the %s tower: the forward pass reads their weights "
                    "directly and never calls them, so an adapter there would never train", skipped, tower)
    module_targets = [n for n in module_hits if n in called]
    parameter_targets = [n for n in parameter_hits if owner(n) in called]
    if not module_targets and not parameter_targets:
        layers = {n for n, m in modules.items() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
        usable = sorted(_modules_called(model, tower, layers))[:8]
        raise UsageError(f"model.lora_{tower}: model.lora_targets {patterns} gives the {tower} tower no adapter that "
                         f"trains" + (f" ({skipped} are never called by its forward)" if skipped else "")
                         + f"; layers that would work include {usable}")
    return module_targets, parameter_targets


def _modules_called(model: torch.nn.Module, tower: str, names: set[str]) -> set[str]:
    """Which of the tower's named modules run in a forward pass of the tower on a dummy input."""
    modules = dict(_tower_root(model, tower).named_modules())
    called: set[str] = set()
    hooks = [modules[n].register_forward_pre_hook(lambda m, args, n=n: called.add(n)) for n in names]
    training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with torch.no_grad():
            if tower == "image":
                size = model.visual.preprocess_cfg.get("size", 224)
                height, width = size[-2:] if isinstance(size, (list, tuple)) else (size, size)
                model.encode_image(torch.zeros(1, 3, height, width, device=device))
            else:
                model.encode_text(torch.zeros(1, model.context_length, dtype=torch.long, device=device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(training)
    return called


def has_lora(model: torch.nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state under plain open_clip names: every LoRA adapter merged into the weight it adapts
    (W + (alpha / r) B A), the adapters dropped. Without adapters, the state dict as it is."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if not any("lora_" in k for k in state):
        return state
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            key = f"{name}.base_layer.{getattr(module, 'parameter_name', 'weight')}"
            for adapter in module.lora_A:
                state[key] = state[key] + module.get_delta_weight(adapter).detach().to(state[key].dtype)
    return {k.replace(".base_layer", ""): v for k, v in state.items() if "lora_" not in k}


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a resume needs beyond the merged weights: the adapters and the unmerged weights they adapt (base +
    delta - delta would not give the base back bit for bit)."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if "lora_" in k or ".base_layer." in k}


def load_model_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor],
                       lora_state: dict[str, torch.Tensor] | None = None) -> None:
    """Load saved weights back: a plain state dict, or for a LoRA model the merged weights with the entries
    ``lora_state`` covers taken from it (strict: every key must be accounted for)."""
    if lora_state:
        covered = {k.replace(".base_layer", "") for k in lora_state}
        weights = {**{k: v for k, v in weights.items() if k not in covered}, **lora_state}
    model.load_state_dict(weights)
