"""CLIP score: the cosine similarity between a sample's image and caption embeddings under a given model.

DataComp's CLIP-score baselines keep samples above a threshold, or the top fraction by score; both need only
this number per sample. The model is a clipline checkpoint or training run folder (its newest checkpoint), any
open_clip ``local-dir:`` folder, an open_clip model JSON file, or an open_clip architecture name with a weights
file; nothing is downloaded.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipline.errors import UsageError
from clipline.precision import autocast, resolve_precision


class ClipScorer:
    def __init__(self, model: str, pretrained: str = "", device: str = "cpu", batch_size: int = 256,
                 precision: str = "auto"):
        from clipline.checkpoint import resolve_checkpoint
        from clipline.models import load_checkpoint_model, register_architecture

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.precision_choice = resolve_precision(precision, self.device)
        self.precision = self.precision_choice.precision
        print(f"[prep] CLIP score: {self.precision_choice.line()}", flush=True)
        try:
            if Path(model).is_dir():
                folder = Path(model) if (Path(model) / "open_clip_config.json").is_file() else resolve_checkpoint(model)
                bundle = load_checkpoint_model(folder, device=self.device)
                self.model, self.preprocess, self.tokenizer = bundle.model, bundle.preprocess_val, bundle.tokenizer
            else:
                import open_clip

                arch = register_architecture(model)
                if not pretrained:
                    raise UsageError(f"prep.filters.clip_model {model!r} has no weights: set "
                                     f"prep.filters.clip_pretrained to a weights file (or give a checkpoint folder)")
                if not Path(pretrained).is_file():
                    raise UsageError(f"prep.filters.clip_pretrained: weights file not found: {pretrained}")
                self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                    arch, pretrained=pretrained, device=self.device)
                self.tokenizer = open_clip.get_tokenizer(arch)
        except (FileNotFoundError, ValueError) as e:
            if isinstance(e, UsageError):
                raise
            raise UsageError(f"prep.filters.clip_model: cannot load {model!r}: {e}") from None
        self.model.eval()

    def _encode(self, images: list[bytes], captions: list[str]) -> np.ndarray:
        pixels = torch.stack([self.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
        tokens = self.tokenizer(captions)
        with torch.inference_mode(), autocast(self.device, self.precision):
            img = self.model.encode_image(pixels.to(self.device), normalize=True)
            txt = self.model.encode_text(tokens.to(self.device), normalize=True)
        img, txt = img.float(), txt.float()  # the score in fp32 whatever the encoders ran in
        return (img * txt).sum(dim=-1).cpu().numpy()

    def scores(self, images: list[bytes], captions: list[str]) -> np.ndarray:
        """Cosine similarity of each (image, caption) pair, in [-1, 1]."""
        out = [self._encode(images[i:i + self.batch_size], captions[i:i + self.batch_size])
               for i in range(0, len(images), self.batch_size)]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def keep_by_score(scores: np.ndarray, min_score: float | None, keep_fraction: float | None) -> np.ndarray:
    """DataComp's rules: score >= min_score, and/or the top keep_fraction (ties broken by order, earliest first)."""
    keep = np.ones(len(scores), dtype=bool)
    if min_score is not None:
        keep &= scores >= min_score
    if keep_fraction is not None and len(scores):
        n_keep = int(round(keep_fraction * len(scores)))
        order = np.argsort(-scores, kind="stable")
        top = np.zeros(len(scores), dtype=bool)
        top[order[:n_keep]] = True
        keep &= top
    return keep
