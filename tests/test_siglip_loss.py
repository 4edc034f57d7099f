"""The sigmoid (SigLIP) loss, plain and tiled: equal to open_clip's on one process and to the whole-batch loss at
any world size (values, DDP-averaged gradients, logit scale and bias included)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from training.loss import siglip_loss, tiled_siglip_loss

GLOBAL_BATCH, D_IMG, D_TXT, D_EMB = 12, 9, 7, 5
UNEVEN_TILES = (5, 7)  # divide neither the local batches (12, 6, 4) nor the 12 columns


class SigmoidTowers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.image = torch.nn.Linear(D_IMG, D_EMB)
        self.text = torch.nn.Linear(D_TXT, D_EMB)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))  # SigLIP's initialisation
        self.logit_bias = torch.nn.Parameter(torch.tensor(-10.0))

    def forward(self, x_img, x_txt):
        return (F.normalize(self.image(x_img), dim=-1), F.normalize(self.text(x_txt), dim=-1), self.logit_scale,
                self.logit_bias)


def make_inputs():
    g = torch.Generator().manual_seed(0)
    x_img = torch.randn(GLOBAL_BATCH, D_IMG, generator=g, dtype=torch.float64)
    return x_img, torch.randn(GLOBAL_BATCH, D_TXT, generator=g, dtype=torch.float64)


def make_model():
    torch.manual_seed(1)
    model = SigmoidTowers().double()
    with torch.no_grad():  # a bias nearer the scores than -10, so the positives' terms weigh in the gradients
        model.logit_bias.fill_(-2.0)
    return model


def whole_batch_reference():
    """The paper's formula on the concatenated batch in float64: -sum_ij log sigmoid(z_ij * logit_ij) / B."""
    model = make_model()
    img, txt, scale, bias = model(*make_inputs())
    logits = scale.exp() * img @ txt.T + bias
    signs = 2 * torch.eye(GLOBAL_BATCH, dtype=torch.float64) - 1
    loss = -F.logsigmoid(signs * logits).sum() / GLOBAL_BATCH
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


LOSSES = {"plain": siglip_loss, **{f"tiled-{t}": (lambda *a, t=t, **k: tiled_siglip_loss(*a, tile_size=t, **k))
                                   for t in UNEVEN_TILES}}


def _worker(rank, world_size, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        x_img, x_txt = make_inputs()
        local = GLOBAL_BATCH // world_size
        sl = slice(rank * local, (rank + 1) * local)
        out = {}
        for name, loss_fn in LOSSES.items():
            model = DistributedDataParallel(make_model())
            loss = loss_fn(*model(x_img[sl], x_txt[sl]))
            loss.backward()  # DDP averages the parameter gradients over ranks
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            out[name] = (float(mean_loss) / world_size, {n: p.grad.clone() for n, p in model.module.named_parameters()})
        results[rank] = out
    finally:
        dist.destroy_process_group()


def run_ranks(worker, world_size, tmp_path) -> dict:
    """Each rank's results; world size 1 runs in this process (a spawn costs seconds of imports)."""
    if world_size == 1:
        results = {}
        worker(0, 1, str(tmp_path / "init"), results)
    else:
        results = mp.Manager().dict()
        mp.spawn(worker, args=(world_size, str(tmp_path / "init"), results), nprocs=world_size, join=True)
    assert len(results) == world_size
    return results


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_plain_and_tiled_equal_whole_batch_at_any_world_size(world_size, tmp_path):
    ref_loss, ref_grads = whole_batch_reference()
    assert ref_grads["logit_bias"].abs() > 1e-3 and ref_grads["logit_scale"].abs() > 1e-3  # both are exercised
    results = run_ranks(_worker, world_size, tmp_path)
    for rank in range(world_size):
        for name in LOSSES:
            mean_loss, grads = results[rank][name]
            assert mean_loss == pytest.approx(ref_loss, rel=1e-10), name
            for param, g in grads.items():
                torch.testing.assert_close(g, ref_grads[param], rtol=1e-9, atol=1e-12,
                                           msg=f"{name} rank {rank} grad {param}")


def _features(n, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).to(dtype)
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).to(dtype)
    return img.requires_grad_(), txt.requires_grad_()


def _params(scale, bias, dtype=torch.float64):
    return (torch.tensor(math.log(scale), dtype=dtype, requires_grad=True),
            torch.tensor(bias, dtype=dtype, requires_grad=True))


def _value_and_grads(loss_fn, img, txt, log_scale, bias, **kwargs):
    loss = loss_fn(img, txt, log_scale, bias, **kwargs)
    return (loss.detach(), *torch.autograd.grad(loss, (img, txt, log_scale, bias)))


def test_plain_equals_open_clip_siglip_loss():
    from open_clip.loss import SigLipLoss

    img, txt = _features(16, 8)
    log_scale, bias = _params(10.0, -10.0)
    ours = _value_and_grads(siglip_loss, img, txt, log_scale, bias)
    theirs = _value_and_grads(lambda i, t, s, b: SigLipLoss()(i, t, s.exp(), b), img, txt, log_scale, bias)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t, rtol=1e-12, atol=1e-15)


def test_hand_checked_two_pairs():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # scale 1, bias 0: positives score 1, negatives 0; per image: -log sigmoid(1) - log sigmoid(0)
    expected = 2 * (math.log(1 + math.exp(-1)) + math.log(2)) / 2
    for loss_fn in (siglip_loss, tiled_siglip_loss):
        assert float(loss_fn(img, img.clone(), torch.tensor(0.0), torch.tensor(0.0))) == pytest.approx(expected)


@pytest.mark.parametrize("n,tile", [(37, 1), (37, 8), (37, 37), (37, 100)])
@pytest.mark.parametrize("scale,bias", [(10.0, -10.0), (100.0, 5.0)])
def test_tiled_equals_plain_for_any_tiling(n, tile, scale, bias):
    """(100, +5) puts scores far beyond 20, where a thresholded softplus would no longer be exact."""
    img, txt = _features(n, 6)
    log_scale, logit_bias = _params(scale, bias)
    expected = _value_and_grads(siglip_loss, img, txt, log_scale, logit_bias)
    got = _value_and_grads(tiled_siglip_loss, img, txt, log_scale, logit_bias, tile_size=tile)
    for e, g, what in zip(expected, got, ("loss", "d image", "d text", "d logit_scale", "d logit_bias")):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=what)


def test_tiled_is_fp32_under_bf16_autocast_and_with_bf16_features():
    img, txt = _features(32, 16, dtype=torch.float32)
    log_scale, bias = _params(10.0, -10.0, dtype=torch.float32)
    exact = tiled_siglip_loss(img, txt, log_scale, bias, tile_size=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = tiled_siglip_loss(img, txt, log_scale, bias, tile_size=8)
    assert under_autocast.dtype == torch.float32
    assert float(under_autocast.detach()) == pytest.approx(float(exact.detach()), rel=1e-6)
    img16, txt16 = img.detach().bfloat16().requires_grad_(), txt.detach().bfloat16().requires_grad_()
    loss16 = tiled_siglip_loss(img16, txt16, log_scale, bias, tile_size=8)
    upcast = siglip_loss(img16.detach().double(), txt16.detach().double(), log_scale.detach().double(),
                         bias.detach().double())
    assert loss16.dtype == torch.float32
    assert float(loss16.detach()) == pytest.approx(float(upcast), rel=1e-6)
    loss16.backward()
    assert img16.grad.dtype == torch.bfloat16 and torch.isfinite(img16.grad.float()).all()


def test_tiled_never_allocates_batch_by_batch():
    n, d, tile = 128, 8, 32
    sizes = []

    def largest(loss_fn, **kwargs):
        from torch.utils._python_dispatch import TorchDispatchMode

        class Largest(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(t, torch.Tensor):
                        sizes.append(t.numel())
                return out

        sizes.clear()
        img, txt = _features(n, d, dtype=torch.float32)
        log_scale, bias = _params(10.0, -10.0, dtype=torch.float32)
        with Largest():
            loss_fn(img, txt, log_scale, bias, **kwargs).backward()
        assert img.grad is not None and bias.grad is not None
        return max(sizes)

    assert largest(siglip_loss) >= n * n  # guard: the probe sees the plain loss's logits
    assert largest(tiled_siglip_loss, tile_size=tile) <= max(tile * tile, n * d)


def test_bad_inputs_are_rejected():
    img, txt = _features(4, 3)
    log_scale, bias = _params(10.0, -10.0)
    with pytest.raises(ValueError, match="tile_size must be a positive integer"):
        tiled_siglip_loss(img, txt, log_scale, bias, tile_size=0)
    with pytest.raises(ValueError, match="differ in shape"):
        siglip_loss(img, txt[:3], log_scale, bias)
