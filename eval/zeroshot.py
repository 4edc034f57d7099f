"""Encoding with a CLIP model: image and text features (batched, optionally in bf16/fp16 autocast, always
returned in fp32 and L2-normalised) and zero-shot classifiers from class names x templates."""

from __future__ import annotations

import sys
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from clipline.precision import autocast
from eval.images import ImageDataset, ImageRef, collate_images, model_threads, resolve_workers


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", leave=False, dynamic_ncols=True,
                disable=not (enabled and sys.stderr.isatty()))


@torch.no_grad()
def encode_images(model, preprocess: Callable, images: Sequence[ImageRef], device, batch_size: int, *,
                  indexed=None, workers: int = 0, precision: str = "fp32", progress: bool = False,
                  desc: str = "images") -> tuple[torch.Tensor, torch.Tensor]:
    """(features, ok): (N x d) fp32 normalised features on the CPU, and which images could be read (the rows of
    the others are zero). ``images`` are paths, tar members, bytes, PIL images or indices into ``indexed``."""
    device = torch.device(device)
    dataset = ImageDataset(images, preprocess, indexed)
    n_workers = resolve_workers(workers, len(dataset), batch_size, device.type)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=n_workers, collate_fn=collate_images,
        pin_memory=device.type == "cuda", prefetch_factor=4 if n_workers else None)
    feats: torch.Tensor | None = None
    ok = torch.zeros(len(dataset), dtype=torch.bool)
    with _progress(len(dataset), desc, progress) as bar, model_threads(device.type, n_workers):
        for index, batch, bad in loader:
            if batch is not None:
                with autocast(device, precision):
                    out = model.encode_image(batch.to(device, non_blocking=True))
                # Similarities are computed in fp32 whatever the model's precision: low-precision scores tie.
                out = F.normalize(out.float(), dim=-1).cpu()
                if feats is None:
                    feats = torch.zeros(len(dataset), out.shape[1])
                feats[index] = out
                ok[index] = True
            bar.update(len(index) + len(bad))
    if feats is None:
        feats = torch.zeros(len(dataset), 0)
    return feats, ok


@torch.no_grad()
def encode_texts(model, tokenizer: Callable, texts: Sequence[str], device, batch_size: int, *,
                 precision: str = "fp32") -> torch.Tensor:
    feats = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[i:i + batch_size])).to(device)
        with autocast(device, precision):
            out = model.encode_text(tokens)
        feats.append(F.normalize(out.float(), dim=-1).cpu())
    return torch.cat(feats)


@torch.no_grad()
def zero_shot_classifier(model, tokenizer: Callable, classnames: Sequence[str], templates: Sequence[str], device,
                         batch_size: int = 256, *, precision: str = "fp32") -> torch.Tensor:
    """(classes x d): per class, the mean of its normalised template embeddings, normalised again."""
    prompts = [t.replace("{c}", name) for name in classnames for t in templates]
    feats = encode_texts(model, tokenizer, prompts, device, batch_size, precision=precision)
    per_class = feats.view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1)
