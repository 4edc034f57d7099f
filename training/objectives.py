"""Objectives from the contrastive-learning literature around InfoNCE, as pure functions and small state holders:
SimCLR's NT-Xent (the SLIP term), MoCo-style feature queues and momentum encoders, and ALBEF's image-text
contrastive loss with momentum distillation. Formulas: ../shared/METHODS.md.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent over 2N views: view k of the first augmentation pairs with view k of the second.

    Views are interleaved as in the paper (positives at 2k-1 / 2k); every view is classified against the 2N - 1
    others (the i != k mask), and the loss is the mean over all 2N anchors.
    """
    if z1.shape != z2.shape:
        raise ValueError(f"the two views differ in shape: {tuple(z1.shape)} vs {tuple(z2.shape)}")
    n = z1.shape[0]
    z = F.normalize(torch.stack([z1, z2], dim=1).reshape(2 * n, -1).float(), dim=-1)
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    positives = torch.arange(2 * n, device=z.device) ^ 1  # 0<->1, 2<->3, ...
    return F.cross_entropy(sim, positives)


class FeatureQueue:
    """A FIFO of the K most recent (momentum) features; identical on every rank because what is enqueued is
    gathered from all ranks first."""

    def __init__(self, size: int, dim: int, device: torch.device | str = "cpu"):
        if size <= 0:
            raise ValueError("queue size must be > 0")
        self.features = torch.zeros(size, dim, device=device)
        self.filled = 0
        self.ptr = 0

    @property
    def size(self) -> int:
        return self.features.shape[0]

    def contents(self) -> torch.Tensor:
        """The queued features, oldest first (only the filled part)."""
        if self.filled < self.size:
            return self.features[:self.filled]
        return torch.cat([self.features[self.ptr:], self.features[:self.ptr]])

    @torch.no_grad()
    def enqueue(self, features: torch.Tensor) -> None:
        features = features.detach().to(self.features.dtype)
        if features.shape[0] >= self.size:  # more than fits: keep the newest
            self.features.copy_(features[-self.size:])
            self.ptr, self.filled = 0, self.size
            return
        end = self.ptr + features.shape[0]
        if end <= self.size:
            self.features[self.ptr:end] = features
        else:
            first = self.size - self.ptr
            self.features[self.ptr:] = features[:first]
            self.features[:end - self.size] = features[first:]
        self.ptr = end % self.size
        self.filled = min(self.size, self.filled + features.shape[0])

    def state_dict(self) -> dict:
        return {"features": self.features.cpu(), "filled": self.filled, "ptr": self.ptr}

    def load_state_dict(self, state: dict) -> None:
        self.features.copy_(state["features"])
        self.filled, self.ptr = int(state["filled"]), int(state["ptr"])


def all_gather_no_grad(features: torch.Tensor) -> torch.Tensor:
    """Every rank's features concatenated in rank order (for momentum features, which carry no gradient)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features
    parts = [torch.empty_like(features) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, features.contiguous())
    return torch.cat(parts)


def make_momentum_encoder(model: torch.nn.Module) -> torch.nn.Module:
    encoder = copy.deepcopy(model)
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder


@torch.no_grad()
def momentum_update(encoder: torch.nn.Module, model: torch.nn.Module, momentum: float) -> None:
    """theta_k <- m * theta_k + (1 - m) * theta_q, parameter by parameter; buffers are copied."""
    for k, q in zip(encoder.parameters(), model.parameters()):
        k.mul_(momentum).add_(q.detach(), alpha=1 - momentum)
    for k, q in zip(encoder.buffers(), model.buffers()):
        k.copy_(q)


def itc_distill_loss(image: torch.Tensor, text: torch.Tensor, image_m: torch.Tensor, text_m: torch.Tensor,
                     logit_scale: torch.Tensor, alpha: float, queue_image: torch.Tensor | None = None,
                     queue_text: torch.Tensor | None = None) -> torch.Tensor:
    """ALBEF's image-text contrastive loss against momentum features (+ queues), with soft targets.

    ``image``/``text``: this rank's normalised features (with gradient). ``image_m``/``text_m``: this rank's
    momentum features. Columns are the momentum features of all ranks followed by the queue; the positive of
    local row i is global column rank * B + i. ``alpha`` mixes the momentum model's softmax into the one-hot
    targets (alpha = 0: plain InfoNCE against momentum features and queue, as in MoCo).
    """
    local = image.shape[0]
    all_image_m, all_text_m = all_gather_no_grad(image_m), all_gather_no_grad(text_m)
    cols_text = all_text_m if queue_text is None else torch.cat([all_text_m, queue_text])
    cols_image = all_image_m if queue_image is None else torch.cat([all_image_m, queue_image])
    offset = dist.get_rank() * local if dist.is_available() and dist.is_initialized() else 0
    onehot = torch.zeros(local, cols_text.shape[0], device=image.device)
    onehot[torch.arange(local), torch.arange(offset, offset + local)] = 1
    scale = logit_scale.exp().float()
    with torch.no_grad():
        target_i2t = alpha * F.softmax(scale * image_m.float() @ cols_text.float().T, dim=1) + (1 - alpha) * onehot
        target_t2i = alpha * F.softmax(scale * text_m.float() @ cols_image.float().T, dim=1) + (1 - alpha) * onehot
    log_i2t = F.log_softmax(scale * image.float() @ cols_text.float().T, dim=1)
    log_t2i = F.log_softmax(scale * text.float() @ cols_image.float().T, dim=1)
    return (-(log_i2t * target_i2t).sum(1).mean() - (log_t2i * target_t2i).sum(1).mean()) / 2
