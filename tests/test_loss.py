"""The gathered contrastive loss equals the single-process loss on the whole batch, values and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from training.loss import contrastive_loss

GLOBAL_BATCH, D_IMG, D_TXT, D_EMB = 12, 9, 7, 5


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
    return torch.randn(GLOBAL_BATCH, D_IMG, generator=g), torch.randn(GLOBAL_BATCH, D_TXT, generator=g)


def make_model():
    torch.manual_seed(1)
    return TwoTowers().double()


def reference():
    model = make_model()
    x_img, x_txt = make_inputs()
    img, txt, scale = model(x_img.double(), x_txt.double())
    logits = scale.exp() * img @ txt.T
    labels = torch.arange(GLOBAL_BATCH)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _worker(rank, world_size, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = DistributedDataParallel(make_model())
        x_img, x_txt = make_inputs()
        local = GLOBAL_BATCH // world_size
        sl = slice(rank * local, (rank + 1) * local)
        img, txt, scale = model(x_img[sl].double(), x_txt[sl].double())
        loss = contrastive_loss(img, txt, scale)
        loss.backward()  # DDP averages the parameter gradients over ranks
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        # open_clip's ClipLoss in its distributed mode (local rows, gather with gradient) on the same features
        from open_clip.loss import ClipLoss

        theirs = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)(
            img.detach(), txt.detach(), scale.detach().exp())
        results[rank] = (float(mean_loss) / world_size,
                         {n: p.grad.clone() for n, p in model.module.named_parameters()},
                         float(loss), float(theirs))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_gathered_loss_and_gradients_equal_single_process(world_size, tmp_path):
    ref_loss, ref_grads = reference()
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(world_size, str(tmp_path / "init"), results), nprocs=world_size, join=True)
    assert len(results) == world_size
    for rank in range(world_size):
        loss, grads, local_loss, open_clip_local_loss = results[rank]
        assert loss == pytest.approx(float(ref_loss), rel=1e-10)
        assert local_loss == pytest.approx(open_clip_local_loss, rel=1e-10)
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-9, atol=1e-12, msg=f"rank {rank} grad {name}")


def test_local_gradients_alone_would_be_wrong(tmp_path):
    """Guard for the test above: dropping the cross-rank gradient terms changes the gradients measurably."""
    ref_loss, ref_grads = reference()
    model = make_model()
    x_img, x_txt = make_inputs()
    img, txt, scale = model(x_img.double(), x_txt.double())
    half = GLOBAL_BATCH // 2
    losses = []
    for sl in (slice(0, half), slice(half, None)):  # rank-local rows against detached other-rank columns
        other = torch.ones(GLOBAL_BATCH, dtype=torch.bool)
        other[sl] = False
        cols_t = torch.where(other[:, None], txt.detach(), txt)
        cols_i = torch.where(other[:, None], img.detach(), img)
        labels = torch.arange(GLOBAL_BATCH)[sl]
        li = scale.exp() * img[sl] @ cols_t.T
        lt = scale.exp() * txt[sl] @ cols_i.T
        losses.append((F.cross_entropy(li, labels) + F.cross_entropy(lt, labels)) / 2)
    (sum(losses) / 2).backward()
    assert not torch.allclose(model.image.weight.grad, ref_grads["image.weight"], rtol=1e-6)


def test_equals_open_clip_clip_loss():
    from open_clip.loss import ClipLoss

    img = F.normalize(torch.randn(16, 8, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(16, 8, dtype=torch.float64), dim=-1)
    log_scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64)
    ours = contrastive_loss(img, txt, log_scale)
    theirs = ClipLoss()(img, txt, log_scale.exp())
    assert float(ours) == pytest.approx(float(theirs), rel=1e-12)


def test_hand_checked_two_pairs():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # logits = diag(1, 1) * s with s = 1: each row's CE = log(e + 1) - 1
    expected = math.log(math.e + 1) - 1
    assert float(contrastive_loss(img, txt, torch.tensor(0.0))) == pytest.approx(expected, rel=1e-6)


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError, match="differ in shape"):
        contrastive_loss(torch.zeros(4, 3), torch.zeros(5, 3), torch.tensor(0.0))
