"""The tiled contrastive loss equals the plain one (values and gradients) without ever holding B x B scores."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils._python_dispatch import TorchDispatchMode

from training.loss import contrastive_loss, tiled_contrastive_loss

GLOBAL_BATCH, D_IMG, D_TXT, D_EMB = 12, 9, 7, 5
# Neither divides the local batches (12, 6, 4 rows at world sizes 1, 2, 3) nor the 12 columns evenly.
UNEVEN_TILES = (5, 7)


class TwoTowers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.image = torch.nn.Linear(D_IMG, D_EMB)
        self.text = torch.nn.Linear(D_TXT, D_EMB)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, x_img, x_txt):
        return F.normalize(self.image(x_img), dim=-1), F.normalize(self.text(x_txt), dim=-1), self.logit_scale


def make_inputs():
    g = torch.Generator().manual_seed(0)
    x_img = torch.randn(GLOBAL_BATCH, D_IMG, generator=g, dtype=torch.float64)
    return x_img, torch.randn(GLOBAL_BATCH, D_TXT, generator=g, dtype=torch.float64)


def make_model():
    torch.manual_seed(1)
    return TwoTowers().double()


def whole_batch_reference():
    """The loss written out on the concatenated batch in float64, with its parameter gradients."""
    model = make_model()
    img, txt, scale = model(*make_inputs())
    logits = scale.exp() * img @ txt.T
    labels = torch.arange(GLOBAL_BATCH)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


def _worker(rank, world_size, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        x_img, x_txt = make_inputs()
        local = GLOBAL_BATCH // world_size
        sl = slice(rank * local, (rank + 1) * local)
        out = {}
        for tile, gather in [(t, True) for t in UNEVEN_TILES] + [(UNEVEN_TILES[0], False)]:
            model = DistributedDataParallel(make_model())
            img, txt, scale = model(x_img[sl], x_txt[sl])
            loss = tiled_contrastive_loss(img, txt, scale, tile_size=tile, gather=gather)
            plain_share = contrastive_loss(img.detach(), txt.detach(), scale.detach(), gather=gather)
            loss.backward()  # DDP averages the parameter gradients over ranks
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            out[(tile, gather)] = (float(mean_loss) / world_size, float(loss.detach()), float(plain_share),
                                   {n: p.grad.clone() for n, p in model.module.named_parameters()})
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
def test_tiled_loss_and_gradients_equal_whole_batch_at_any_world_size(world_size, tmp_path):
    ref_loss, ref_grads = whole_batch_reference()
    results = run_ranks(_worker, world_size, tmp_path)
    for rank in range(world_size):
        for tile in UNEVEN_TILES:
            mean_loss, share, plain_share, grads = results[rank][(tile, True)]
            assert mean_loss == pytest.approx(ref_loss, rel=1e-10)
            assert share == pytest.approx(plain_share, rel=1e-10)  # each rank's value is contrastive_loss's share
            for name, g in grads.items():
                torch.testing.assert_close(g, ref_grads[name], rtol=1e-9, atol=1e-12,
                                           msg=f"rank {rank} tile {tile} grad {name}")
        if world_size > 1:  # guard: without the gather the same harness sees different gradients
            _, _, _, local_grads = results[rank][(UNEVEN_TILES[0], False)]
            assert not torch.allclose(local_grads["image.weight"], ref_grads["image.weight"], rtol=1e-6)


def _features(n, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).to(dtype)
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).to(dtype)
    return img.requires_grad_(), txt.requires_grad_()


def _value_and_grads(loss_fn, img, txt, log_scale, **kwargs):
    loss = loss_fn(img, txt, log_scale, **kwargs)
    return (loss.detach(), *torch.autograd.grad(loss, (img, txt, log_scale)))


@pytest.mark.parametrize("n,tile", [(37, 1), (37, 8), (37, 37), (37, 100), (64, 16)])
def test_single_process_equals_plain_for_any_tiling(n, tile):
    img, txt = _features(n, 6)
    log_scale = torch.tensor(math.log(30.0), dtype=torch.float64, requires_grad=True)
    expected = _value_and_grads(contrastive_loss, img, txt, log_scale)
    got = _value_and_grads(tiled_contrastive_loss, img, txt, log_scale, tile_size=tile)
    for e, g, what in zip(expected, got, ("loss", "d image", "d text", "d logit_scale")):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-13, msg=what)


def test_extreme_scores_stay_finite_and_exact():
    """At scale 100 with near-opposite pairs, scores span [-100, 100]: exp without shifting would overflow."""
    img, txt = _features(40, 4, seed=3)
    with torch.no_grad():
        txt[:20] = -img[:20] + 1e-3 * txt[:20]
    log_scale = torch.tensor(math.log(100.0), dtype=torch.float64, requires_grad=True)
    expected = _value_and_grads(contrastive_loss, img, txt, log_scale)
    got = _value_and_grads(tiled_contrastive_loss, img, txt, log_scale, tile_size=7)
    assert all(torch.isfinite(g).all() for g in got)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    img32, txt32 = img.detach().float(), txt.detach().float()
    loss32 = tiled_contrastive_loss(img32, txt32, log_scale.detach().float(), tile_size=7)
    assert float(loss32) == pytest.approx(float(expected[0]), rel=1e-5)


def test_scores_are_fp32_under_bf16_autocast():
    img, txt = _features(32, 16, dtype=torch.float32)
    log_scale = torch.tensor(math.log(100.0))
    exact = tiled_contrastive_loss(img, txt, log_scale, tile_size=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = tiled_contrastive_loss(img, txt, log_scale, tile_size=8)
    assert under_autocast.dtype == torch.float32
    assert float(under_autocast.detach()) == pytest.approx(float(exact.detach()), rel=1e-6)


def test_bf16_features_are_accumulated_in_fp32():
    img, txt = _features(32, 16, dtype=torch.bfloat16)
    log_scale = torch.tensor(math.log(50.0), requires_grad=True)
    loss = tiled_contrastive_loss(img, txt, log_scale, tile_size=8)
    d_img, d_txt, d_scale = torch.autograd.grad(loss, (img, txt, log_scale))
    assert loss.dtype == torch.float32 and d_img.dtype == torch.bfloat16 and d_scale.dtype == torch.float32
    img64, txt64 = img.detach().double().requires_grad_(), txt.detach().double().requires_grad_()
    log64 = log_scale.detach().double().requires_grad_()
    expected = _value_and_grads(contrastive_loss, img64, txt64, log64)
    assert float(loss.detach()) == pytest.approx(float(expected[0]), rel=1e-6)
    assert float(d_scale) == pytest.approx(float(expected[3]), rel=1e-5)
    torch.testing.assert_close(d_img.double(), expected[1], rtol=2e-2, atol=1e-4)  # bf16 output rounding only


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any aten op returns (forward and backward run on this thread on CPU)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _largest_allocation(loss_fn, n, d, **kwargs):
    img, txt = _features(n, d, dtype=torch.float32)
    log_scale = torch.tensor(math.log(10.0), requires_grad=True)
    with _LargestAllocation() as mode:
        loss_fn(img, txt, log_scale, **kwargs).backward()
    assert img.grad is not None and txt.grad is not None
    return mode.largest


def test_never_allocates_batch_by_batch():
    n, d, tile = 128, 8, 32
    # Guard: the same probe sees the plain loss's n x n logits.
    assert _largest_allocation(contrastive_loss, n, d) >= n * n
    assert _largest_allocation(tiled_contrastive_loss, n, d, tile_size=tile) <= max(tile * tile, n * d)


@pytest.mark.parametrize("tile_size", [0, -3, 2.5, True])
def test_bad_tile_size_is_rejected(tile_size):
    img, txt = _features(4, 3)
    with pytest.raises(ValueError, match="tile_size must be a positive integer"):
        tiled_contrastive_loss(img, txt, torch.tensor(0.0), tile_size=tile_size)


def test_mismatched_or_non_matrix_features_are_rejected():
    with pytest.raises(ValueError, match="differ in shape"):
        tiled_contrastive_loss(torch.zeros(4, 3), torch.zeros(5, 3), torch.tensor(0.0))
    with pytest.raises(ValueError, match=r"\(batch, dim\) matrices"):
        tiled_contrastive_loss(torch.zeros(4), torch.zeros(4), torch.tensor(0.0))


def test_default_tile_size_follows_the_device():
    from training.loss import default_tile_size

    assert default_tile_size("cpu") == 512 and default_tile_size(torch.device("cuda", 0)) == 2048
    img, txt = _features(600, 4)  # more rows than one default CPU tile
    log_scale = torch.tensor(math.log(20.0), dtype=torch.float64, requires_grad=True)
    expected = _value_and_grads(contrastive_loss, img, txt, log_scale)
    got = _value_and_grads(tiled_contrastive_loss, img, txt, log_scale, tile_size=None)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-13)
