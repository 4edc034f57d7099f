"""Encoding with a CLIP model: zero-shot classifiers from class names x templates, image and text features."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image


@torch.no_grad()
def encode_images(model, preprocess: Callable, images: Sequence[Image.Image], device, batch_size: int) -> torch.Tensor:
    feats = []
    for i in range(0, len(images), batch_size):
        batch = torch.stack([preprocess(im) for im in images[i:i + batch_size]]).to(device)
        feats.append(model.encode_image(batch).float())
    # Similarities are computed in fp32 whatever the model's precision: low-precision scores tie.
    return F.normalize(torch.cat(feats), dim=-1).cpu()


@torch.no_grad()
def encode_texts(model, tokenizer: Callable, texts: Sequence[str], device, batch_size: int) -> torch.Tensor:
    feats = []
    for i in range(0, len(texts), batch_size):
        feats.append(model.encode_text(tokenizer(list(texts[i:i + batch_size])).to(device)).float())
    return F.normalize(torch.cat(feats), dim=-1).cpu()


@torch.no_grad()
def zero_shot_classifier(model, tokenizer: Callable, classnames: Sequence[str], templates: Sequence[str], device,
                         batch_size: int = 256) -> torch.Tensor:
    """(classes x d): per class, the mean of its normalised template embeddings, normalised again."""
    prompts = [t.replace("{c}", name) for name in classnames for t in templates]
    feats = encode_texts(model, tokenizer, prompts, device, batch_size)
    per_class = feats.view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1)
