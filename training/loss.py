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
    with torch.autocast(image_features.device.type, enabled=False):  # autocast would run the matmul in bf16
        scale = logit_scale.exp().to(dtype)
        logits_per_image = scale * image_features.to(dtype) @ all_texts.to(dtype).T
        logits_per_text = scale * text_features.to(dtype) @ all_images.to(dtype).T
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


# --- Tiled losses -------------------------------------------------------------------------------------------
#
# The B x B score matrix is never held: scores are built one (rows x columns) tile at a time, reduced to a few
# vectors in forward, and rebuilt tile by tile in backward (recomputation trades one extra matmul per tile for
# memory that does not grow with the batch). Across ranks each rank owns a horizontal strip of the global
# score matrix, its local images against all texts; only the texts are gathered. The text->image direction needs
# the log-sum-exp of whole columns, i.e. over every rank's rows: each rank reduces its strip to per-column partial
# log-sum-exps and one all-reduce of N numbers completes them. In backward each rank then knows d loss / d score
# for every entry of its strip, so it computes its strip's share of the whole-batch gradient for its images, all
# texts (summed over ranks by the gather's backward) and the scale. Normalised by the local batch (1 / b =
# world / B, as the value is), these shares average over ranks, as DDP does, to the whole-batch gradient.

# On CPU, tiles of 512 to 2048 run equally fast and 512 keeps the peak lowest (benchmarks/RESULTS.md). On a GPU
# each tile's work must hide the launch cost of about twenty kernels, hence larger tiles; 2048 is a reasoned
# choice not yet measured on a GPU. A tile's two fp32 score buffers: 2 MiB at 512, 32 MiB at 2048.
CPU_TILE_SIZE, GPU_TILE_SIZE = 512, 2048


def default_tile_size(device: torch.device | str) -> int:
    """The tile size ``tile_size=None`` picks on ``device``."""
    return CPU_TILE_SIZE if torch.device(device).type == "cpu" else GPU_TILE_SIZE


def _distributed_world(gather: bool) -> tuple[int, int]:
    """(rank, world size) of the group the loss spans; (0, 1) when it is local."""
    if gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_inputs(image_features: torch.Tensor, text_features: torch.Tensor, tile_size: int | None = None) -> int:
    """Validates the inputs; returns the tile size to use."""
    if image_features.shape != text_features.shape:
        raise ValueError(f"image and text features differ in shape: {tuple(image_features.shape)} vs "
                         f"{tuple(text_features.shape)}")
    if image_features.dim() != 2:
        raise ValueError(f"features must be (batch, dim) matrices, got shape {tuple(image_features.shape)}")
    if tile_size is None:
        return default_tile_size(image_features.device)
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1:
        raise ValueError(f"tile_size must be a positive integer (or None for the device's default), "
                         f"got {tile_size!r}")
    return tile_size


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _blocks(n: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, n)) for start in range(0, n, size)]


class _TileScratch:
    """Buffers reused by every tile. On CPU a fresh allocation per tile costs page faults, and glibc keeps the
    freed blocks, so the resident peak would creep up with the number of tiles."""

    def __init__(self, rows: int, cols: int, dim: int, dtype: torch.dtype, device: torch.device):
        self._a = torch.empty(rows * cols, dtype=dtype, device=device)
        self._b = torch.empty(rows * cols, dtype=dtype, device=device)
        self._rows = torch.empty(rows * dim, dtype=dtype, device=device)

    def pair(self, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._a[:rows * cols].view(rows, cols), self._b[:rows * cols].view(rows, cols)

    def scaled(self, block: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``block * scale`` in the compute dtype, in the row buffer."""
        # Copy (converting the dtype) first: multiplying a bf16 block by a 0-dim fp32 scale would compute in bf16.
        return self._rows[:block.numel()].view(block.shape).copy_(block).mul_(scale)


def _scores(scaled_rows: torch.Tensor, cols: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.mm(scaled_rows, cols.T, out=out)


def _logsumexp_(scores: torch.Tensor, dim: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """log-sum-exp along ``dim``, writing exp into ``out`` (or over ``scores`` itself when out is None)."""
    peak = scores.amax(dim, keepdim=True)
    shifted = torch.sub(scores, peak, out=out) if out is not None else scores.sub_(peak)
    return shifted.exp_().sum(dim).log_().add_(peak.squeeze(dim))


def _rowwise_dot(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, block: int) -> torch.Tensor:
    """(a_i . b_i) for each row, in ``dtype``, a block of rows at a time (no full-size product is held)."""
    out = torch.empty(a.shape[0], dtype=dtype, device=a.device)
    for r0, r1 in _blocks(a.shape[0], block):
        out[r0:r1] = (a[r0:r1].to(dtype) * b[r0:r1].to(dtype)).sum(1)
    return out


def _dot(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, block: int) -> torch.Tensor:
    """sum(a * b) over two equally shaped matrices in ``dtype``, a block of rows at a time."""
    total = torch.zeros((), dtype=dtype, device=a.device)
    for r0, r1 in _blocks(a.shape[0], block):
        total += torch.vdot(a[r0:r1].reshape(-1).to(dtype), b[r0:r1].reshape(-1).to(dtype))
    return total


def _all_reduce_logsumexp(partial: torch.Tensor) -> torch.Tensor:
    """Element-wise log-sum-exp over ranks, stable: shift by the global maximum before summing."""
    peak = partial.clone()
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    total = (partial - peak).exp_()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.log_().add_(peak)


def _no_autocast(device: torch.device):
    # Autocast would run the tile matmuls in bf16: the scores must stay in the compute dtype.
    return torch.autocast(device_type=device.type, enabled=False)


class _TiledContrastive(torch.autograd.Function):
    @staticmethod
    def forward(ctx, images, texts, logit_scale, offset, tile, reduce_columns):
        with _no_autocast(images.device):
            dtype = _compute_dtype(images, texts)
            b, n = images.shape[0], texts.shape[0]
            scale = logit_scale.to(dtype).exp()
            row_lse = torch.full((b,), -torch.inf, dtype=dtype, device=images.device)
            col_lse = torch.full((n,), -torch.inf, dtype=dtype, device=images.device)
            scratch = _TileScratch(min(tile, b), min(tile, n), images.shape[1], dtype, images.device)
            for r0, r1 in _blocks(b, tile):
                rows = scratch.scaled(images[r0:r1], scale)
                for c0, c1 in _blocks(n, tile):
                    scores, buf = scratch.pair(r1 - r0, c1 - c0)
                    _scores(rows, texts[c0:c1].to(dtype), scores)
                    torch.logaddexp(row_lse[r0:r1], _logsumexp_(scores, 1, out=buf), out=row_lse[r0:r1])
                    torch.logaddexp(col_lse[c0:c1], _logsumexp_(scores, 0), out=col_lse[c0:c1])
            if reduce_columns:
                col_lse = _all_reduce_logsumexp(col_lse)
            positive_sum = (_rowwise_dot(images, texts[offset:offset + b], dtype, tile) * scale).sum()
            loss = (row_lse.sum() + col_lse[offset:offset + b].sum()) / (2 * b) - positive_sum / b
        ctx.save_for_backward(images, texts, logit_scale, row_lse, col_lse, positive_sum)
        ctx.offset, ctx.tile = offset, tile
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        images, texts, logit_scale, row_lse, col_lse, positive_sum = ctx.saved_tensors
        offset, tile = ctx.offset, ctx.tile
        with _no_autocast(images.device):
            dtype = row_lse.dtype
            b, n = images.shape[0], texts.shape[0]
            scale = logit_scale.to(dtype).exp()
            # Sums over the strip of softmax_row + softmax_col, times the other side's features.
            d_images = torch.zeros(images.shape, dtype=dtype, device=images.device)
            d_texts = torch.zeros(texts.shape, dtype=dtype, device=texts.device)
            scratch = _TileScratch(min(tile, b), min(tile, n), images.shape[1], dtype, images.device)
            for r0, r1 in _blocks(b, tile):
                raw_rows = images[r0:r1].to(dtype)
                rows = scratch.scaled(raw_rows, scale)
                for c0, c1 in _blocks(n, tile):
                    scores, buf = scratch.pair(r1 - r0, c1 - c0)
                    cols = texts[c0:c1].to(dtype)
                    _scores(rows, cols, scores)
                    torch.sub(scores, row_lse[r0:r1, None], out=buf).exp_()
                    probs = scores.sub_(col_lse[None, c0:c1]).exp_().add_(buf)
                    d_images[r0:r1].addmm_(probs, cols)
                    d_texts[c0:c1].addmm_(probs.T, raw_rows)
            # d loss / d score = coef * (p_row + p_col) - 2 coef on the positives.
            coef = grad_loss.to(dtype) / (2 * b)
            # d score / d log-scale = score, so d loss / d log-scale = sum(d loss / d score * score).
            grad_scale = coef * (scale * _dot(images, d_images, dtype, tile) - 2 * positive_sum)
            d_images.sub_(texts[offset:offset + b], alpha=2).mul_(coef * scale)
            d_texts[offset:offset + b].sub_(images, alpha=2)
            d_texts.mul_(coef * scale)
        grad_scale = grad_scale.to(logit_scale.dtype).reshape(logit_scale.shape)
        return d_images.to(images.dtype), d_texts.to(texts.dtype), grad_scale, None, None, None


def tiled_contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                           *, gather: bool = True, tile_size: int | None = None) -> torch.Tensor:
    """:func:`contrastive_loss` computed tile by tile: the same value and gradients, never holding B x B scores.

    Peak memory beyond the features and their gradients is two ``tile_size`` x ``tile_size`` score tiles,
    whatever the batch (``None``: :func:`default_tile_size` of the features' device). Scores and accumulations
    are in fp32 (or the inputs' dtype if wider), autocast or not.
    Across ranks only the text features are gathered; one all-reduce of the per-column log-sum-exps (global batch
    many numbers) completes the text->image direction. The value returned is this rank's share, as for
    :func:`contrastive_loss`; after DDP's averaging the gradients are those of the whole-batch loss.
    """
    tile = _check_inputs(image_features, text_features, tile_size)
    rank, world = _distributed_world(gather)
    texts = gather_features(text_features) if world > 1 else text_features
    offset = rank * image_features.shape[0]
    return _TiledContrastive.apply(image_features, texts, logit_scale, offset, tile, world > 1)


# --- SigLIP ---------------------------------------------------------------------------------------------------


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor, *, gather: bool = True) -> torch.Tensor:
    """Sigmoid loss (SigLIP): -sum over pairs of log sigmoid(z_ij * (s <I_i, T_j> + b)) / batch, z = +1 on pairs.

    ``logit_scale`` is the log of s, ``logit_bias`` is b. Each rank scores its rows against the gathered texts and
    divides by its local batch, so the mean over ranks is the whole-batch loss normalised by the global batch, as
    in the SigLIP paper (and open_clip's ``SigLipLoss`` on one process).
    """
    _check_inputs(image_features, text_features)
    rank, world = _distributed_world(gather)
    texts = gather_features(text_features) if world > 1 else text_features
    b = image_features.shape[0]
    dtype = _compute_dtype(image_features, texts)
    logits = logit_scale.exp().to(dtype) * image_features.to(dtype) @ texts.to(dtype).T + logit_bias.to(dtype)
    signs = -torch.ones_like(logits)
    signs[torch.arange(b, device=logits.device), rank * b + torch.arange(b, device=logits.device)] = 1
    return -F.logsigmoid(signs * logits).sum() / b


def _softplus_sum_(scores: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """sum(log(1 + exp(x))), exact for any x (F.softplus switches to x above 20), overwriting ``scores``."""
    torch.abs(scores, out=buf).neg_().exp_().log1p_()
    return buf.sum() + scores.clamp_(min=0).sum()


class _TiledSigmoid(torch.autograd.Function):
    # No normalisation couples the pairs, so each rank's strip is self-contained: the gradient of this rank's
    # value is already its share of the whole-batch gradient (no collective beyond the text gather).
    @staticmethod
    def forward(ctx, images, texts, logit_scale, logit_bias, offset, tile):
        with _no_autocast(images.device):
            dtype = _compute_dtype(images, texts)
            b, n = images.shape[0], texts.shape[0]
            scale, bias = logit_scale.to(dtype).exp(), logit_bias.to(dtype)
            total = torch.zeros((), dtype=dtype, device=images.device)
            scratch = _TileScratch(min(tile, b), min(tile, n), images.shape[1], dtype, images.device)
            for r0, r1 in _blocks(b, tile):
                rows = scratch.scaled(images[r0:r1], scale)
                for c0, c1 in _blocks(n, tile):
                    scores, buf = scratch.pair(r1 - r0, c1 - c0)
                    total += _softplus_sum_(_scores(rows, texts[c0:c1].to(dtype), scores).add_(bias), buf)
            # A positive's term is softplus(-x) = softplus(x) - x: the loop counted softplus(x) for every pair.
            positive_sum = (_rowwise_dot(images, texts[offset:offset + b], dtype, tile) * scale).sum()
            loss = (total - positive_sum - b * bias) / b
        ctx.save_for_backward(images, texts, logit_scale, logit_bias, positive_sum)
        ctx.offset, ctx.tile = offset, tile
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        images, texts, logit_scale, logit_bias, positive_sum = ctx.saved_tensors
        offset, tile = ctx.offset, ctx.tile
        with _no_autocast(images.device):
            dtype = positive_sum.dtype
            b, n = images.shape[0], texts.shape[0]
            scale, bias = logit_scale.to(dtype).exp(), logit_bias.to(dtype)
            d_images = torch.zeros(images.shape, dtype=dtype, device=images.device)
            d_texts = torch.zeros(texts.shape, dtype=dtype, device=texts.device)
            sigmoid_sum = torch.zeros((), dtype=dtype, device=images.device)
            scratch = _TileScratch(min(tile, b), min(tile, n), images.shape[1], dtype, images.device)
            for r0, r1 in _blocks(b, tile):
                raw_rows = images[r0:r1].to(dtype)
                rows = scratch.scaled(raw_rows, scale)
                for c0, c1 in _blocks(n, tile):
                    scores, _ = scratch.pair(r1 - r0, c1 - c0)
                    cols = texts[c0:c1].to(dtype)
                    probs = _scores(rows, cols, scores).add_(bias).sigmoid_()
                    sigmoid_sum += probs.sum()
                    d_images[r0:r1].addmm_(probs, cols)
                    d_texts[c0:c1].addmm_(probs.T, raw_rows)
            # d loss / d x = coef * sigmoid(x), minus coef on the positives.
            coef = grad_loss.to(dtype) / b
            grad_scale = coef * (scale * _dot(images, d_images, dtype, tile) - positive_sum)
            grad_bias = coef * (sigmoid_sum - b)
            d_images.sub_(texts[offset:offset + b]).mul_(coef * scale)
            d_texts[offset:offset + b].sub_(images)
            d_texts.mul_(coef * scale)
        grad_scale = grad_scale.to(logit_scale.dtype).reshape(logit_scale.shape)
        grad_bias = grad_bias.to(logit_bias.dtype).reshape(logit_bias.shape)
        return d_images.to(images.dtype), d_texts.to(texts.dtype), grad_scale, grad_bias, None, None


def tiled_siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                      logit_bias: torch.Tensor, *, gather: bool = True,
                      tile_size: int | None = None) -> torch.Tensor:
    """:func:`siglip_loss` computed tile by tile: the same value and gradients, never holding B x B logits."""
    tile = _check_inputs(image_features, text_features, tile_size)
    rank, world = _distributed_world(gather)
    texts = gather_features(text_features) if world > 1 else text_features
    offset = rank * image_features.shape[0]
    return _TiledSigmoid.apply(image_features, texts, logit_scale, logit_bias, offset, tile)
