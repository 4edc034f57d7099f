"""The symmetric contrastive (CLIP) loss over features gathered from every rank.

Each rank scores its local rows against the columns of the whole global batch. The gather keeps the autograd
graph: in backward, the gradient every rank computed for each slice of the gathered features is summed and sent
back to the slice's owner. Averaging the parameter gradients over ranks (as DDP does) then gives exactly the
gradient of the single-process loss on the concatenated batch, at any world size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.batch = dist.get_rank(), local.shape[0]
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # gloo has no reduce_scatter: sum the full gradient, then keep this rank's slice.
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.batch:(ctx.rank + 1) * ctx.batch]


def gather_features(features: torch.Tensor) -> torch.Tensor:
    """All ranks' features concatenated in rank order; the gradient flows back to each rank's own rows."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features
    return _GatherWithGrad.apply(features)


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, *,
                     gather: bool = True) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropy for this rank's rows against the global batch.

    ``image_features`` and ``text_features`` are this rank's L2-normalised embeddings (same local batch size on
    every rank); ``logit_scale`` is the log of the scale (the caller clamps it). The value returned is this rank's
    share: its mean over ranks is the loss of the whole batch.
    """
    if image_features.shape != text_features.shape:
        raise ValueError(f"image and text features differ in shape: {tuple(image_features.shape)} vs "
                         f"{tuple(text_features.shape)}")
    local = image_features.shape[0]
    distributed = gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    all_images = gather_features(image_features) if distributed else image_features
    all_texts = gather_features(text_features) if distributed else text_features
    offset = dist.get_rank() * local if distributed else 0
    labels = torch.arange(offset, offset + local, device=image_features.device)
    # Scores in at least fp32 whatever the autocast dtype: low-precision logits tie and bias the softmax.
    dtype = torch.promote_types(image_features.dtype, torch.float32)
    scale = logit_scale.exp().to(dtype)
    logits_per_image = scale * image_features.to(dtype) @ all_texts.to(dtype).T
    logits_per_text = scale * text_features.to(dtype) @ all_images.to(dtype).T
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
