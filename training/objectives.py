"""Objectives from the contrastive-learning literature around InfoNCE, as pure functions and small state holders:
SimCLR's NT-Xent with its projection head (the SLIP term), MoCo-style feature queues and momentum encoders, and
ALBEF's image-text contrastive loss with momentum distillation. Formulas: ../shared/METHODS.md.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F

from training.loss import gather_features


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float, *, gather: bool = True) -> torch.Tensor:
    """SimCLR's NT-Xent over 2N views: view k of the first augmentation pairs with view k of the second.

    Views are interleaved as in the paper (positives at 2k-1 / 2k); every view is classified against the 2N - 1
    others (the i != k mask), and the loss is the mean over all 2N anchors. Across ranks (``gather``) N is the
    global batch: this rank's 2n views are scored against every rank's views, gathered with their gradient, as
    the CLIP loss does; the value returned is this rank's share, whose mean over ranks is the whole-batch loss, and
    DDP's gradient averaging then gives the whole-batch gradient.
    """
    if z1.shape != z2.shape:
        raise ValueError(f"the two views differ in shape: {tuple(z1.shape)} vs {tuple(z2.shape)}")
    n = z1.shape[0]
    distributed = gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    # fp32 scores whatever the autocast dtype: at tau = 0.1 bf16 similarities would tie.
    with torch.autocast(z1.device.type, enabled=False):
        local = F.normalize(torch.stack([z1, z2], dim=1).reshape(2 * n, -1).float(), dim=-1)
        views = gather_features(local) if distributed else local
        offset = dist.get_rank() * 2 * n if distributed else 0
        rows = torch.arange(offset, offset + 2 * n, device=z1.device)
        sim = local @ views.T / temperature
        sim = sim.masked_fill(F.one_hot(rows, views.shape[0]).bool(), float("-inf"))
        return F.cross_entropy(sim, rows ^ 1)  # the offset is even: 0<->1, 2<->3, ... in global indices


class ProjectionHead(torch.nn.Sequential):
    """SLIP's SimCLR projection head (3 layers, as its ``image_mlp``), with LayerNorm where SLIP has SyncBatchNorm:
    per-sample normalisation keeps the loss the same at every world size and needs no cross-rank statistics
    (SyncBatchNorm does not run on the CPU)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__(torch.nn.Linear(in_dim, hidden_dim), torch.nn.LayerNorm(hidden_dim), torch.nn.ReLU(),
                         torch.nn.Linear(hidden_dim, hidden_dim), torch.nn.LayerNorm(hidden_dim), torch.nn.ReLU(),
                         torch.nn.Linear(hidden_dim, out_dim))


class SLIPModel(torch.nn.Module):
    """An open_clip model and the SimCLR projection head as one module, so that DDP and the optimizer see both
    while the open_clip model itself (and its saved weights) stays untouched.

    ``image`` is (B, 3, C, H, W): the CLIP crop, then SimCLR's two views of the same image. The head reads the
    image tower's output before CLIP's normalisation (``encode_image(normalize=False)``): every open_clip tower
    has that output, whereas the pooled feature before the tower's projection, which SLIP uses, sits at a
    different place in each tower (ViT ``proj``, the ResNet attention pool, timm heads).
    """

    def __init__(self, clip: torch.nn.Module, head: torch.nn.Module):
        super().__init__()
        self.clip, self.head = clip, head

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> dict:
        out = self.clip(image=image[:, 0], text=text)
        # Separate from the CLIP crop's pass, as in SLIP: batch-norm towers see each batch of views alone.
        views = self.clip.encode_image(image[:, 1:].flatten(0, 1), normalize=False)
        out["view_embeddings"] = self.head(views).unflatten(0, (image.shape[0], 2))
        return out


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
    """theta_k <- m * theta_k + (1 - m) * theta_q for every trained parameter; buffers are copied.

    Parameters are paired by name, not position: peft's parameter adapters re-register the adapted parameter on
    each forward, which changes the order ``parameters()`` lists them in. Frozen parameters (a locked tower, a
    LoRA tower's base weights) equal their copy already and are left alone, so they stay bit for bit equal.
    """
    keys = dict(encoder.named_parameters())
    for name, q in model.named_parameters():
        if q.requires_grad:
            keys[name].mul_(momentum).add_(q.detach(), alpha=1 - momentum)
    keys = dict(encoder.named_buffers())
    for name, q in model.named_buffers():
        keys[name].copy_(q)


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
