"""The literature's objectives as written in METHODS.md, on hand-checked cases."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from training.loss import contrastive_loss
from training.objectives import (FeatureQueue, itc_distill_loss, make_momentum_encoder, momentum_update,
                                 nt_xent_loss)


def test_nt_xent_by_the_formula():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    tau = 0.5
    views = F.normalize(torch.stack([z1, z2], 1).reshape(6, 4), dim=-1)  # v0=z1[0], v1=z2[0], v2=z1[1], ...

    def l(i, j):
        s = lambda a, b: float(views[a] @ views[b]) / tau
        return -math.log(math.exp(s(i, j)) / sum(math.exp(s(i, k)) for k in range(6) if k != i))

    # L = 1/(2N) sum_k [l(2k-1, 2k) + l(2k, 2k-1)], 1-based in the paper, 0-based here
    expected = sum(l(2 * k, 2 * k + 1) + l(2 * k + 1, 2 * k) for k in range(3)) / 6
    assert float(nt_xent_loss(z1, z2, tau)) == pytest.approx(expected, rel=1e-6)


def test_nt_xent_two_identical_orthogonal_pairs():
    z = torch.eye(2)
    # each anchor: its positive scores 1/tau, the two others 0 -> l = -log(e^(1/tau) / (e^(1/tau) + 2))
    tau = 1.0
    expected = -math.log(math.e / (math.e + 2))
    assert float(nt_xent_loss(z, z.clone(), tau)) == pytest.approx(expected, rel=1e-6)


def test_queue_is_fifo_with_wraparound():
    q = FeatureQueue(size=4, dim=1)
    q.enqueue(torch.tensor([[1.0], [2.0], [3.0]]))
    assert q.contents().flatten().tolist() == [1, 2, 3]
    q.enqueue(torch.tensor([[4.0], [5.0]]))  # 1 falls out
    assert q.contents().flatten().tolist() == [2, 3, 4, 5]
    q.enqueue(torch.tensor([[6.0], [7.0], [8.0], [9.0], [10.0]]))  # more than fits: the newest 4
    assert q.contents().flatten().tolist() == [7, 8, 9, 10]
    restored = FeatureQueue(size=4, dim=1)
    restored.load_state_dict(q.state_dict())
    assert torch.equal(restored.contents(), q.contents())


def test_momentum_update_is_an_ema():
    model = torch.nn.Linear(2, 2)
    encoder = make_momentum_encoder(model)
    with torch.no_grad():
        model.weight.add_(1.0)
    before = encoder.weight.clone()
    momentum_update(encoder, model, 0.9)
    torch.testing.assert_close(encoder.weight, 0.9 * before + 0.1 * model.weight)
    assert not encoder.weight.requires_grad


def test_momentum_update_pairs_parameters_by_name_and_skips_frozen_ones():
    # peft's parameter adapters re-register a parameter on every forward, so the model may list its parameters
    # in another order than its momentum copy does.
    model = torch.nn.Module()
    model.a, model.b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    encoder = make_momentum_encoder(model)
    a = model.a
    del model.a
    model.a = a  # now listed after b
    assert [n for n, _ in model.named_parameters()] == ["b", "a"]
    model.b.requires_grad_(False)
    with torch.no_grad():
        model.a.fill_(3.0)
        model.b.fill_(5.0)  # changed by hand only to show that the EMA leaves frozen parameters alone
    momentum_update(encoder, model, 0.5)
    assert encoder.a.tolist() == [2.0, 2.0] and encoder.b.tolist() == [1.0, 1.0, 1.0]


def test_distill_with_alpha_zero_and_no_queue_is_clip_against_momentum_features():
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    scale = torch.tensor(math.log(10.0))
    # with the momentum encoder equal to the model, ALBEF's ITC with alpha=0 is the CLIP loss
    assert float(itc_distill_loss(img, txt, img, txt, scale, alpha=0.0)) == pytest.approx(
        float(contrastive_loss(img, txt, scale)), rel=1e-6)


def test_distill_soft_targets_by_hand():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = img.clone()
    scale = torch.tensor(0.0)  # s = 1
    alpha = 0.4
    # momentum = model: soft target row i = softmax(I_m T_m^T) = [e, 1]/(e + 1) for i = 0 (mirrored for 1)
    p = math.e / (math.e + 1)
    t = [alpha * p + (1 - alpha), alpha * (1 - p)]
    logp = [math.log(p), math.log(1 - p)]
    expected = -(t[0] * logp[0] + t[1] * logp[1])  # same for both rows and both directions
    assert float(itc_distill_loss(img, txt, img, txt, scale, alpha)) == pytest.approx(expected, rel=1e-6)


def test_queue_adds_negatives():
    img = F.normalize(torch.randn(4, 8), dim=-1)
    txt = F.normalize(torch.randn(4, 8), dim=-1)
    scale = torch.tensor(math.log(10.0))
    queue = F.normalize(torch.randn(16, 8), dim=-1)
    without = itc_distill_loss(img, txt, img, txt, scale, 0.0)
    with_queue = itc_distill_loss(img, txt, img, txt, scale, 0.0, queue_image=queue, queue_text=queue)
    assert float(with_queue) > float(without)  # more negatives in every softmax


def _queue_worker(rank, world, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from training.objectives import all_gather_no_grad

        q = FeatureQueue(size=6, dim=1)
        for step in range(2):
            local = torch.tensor([[100.0 * step + 10 * rank + i] for i in range(2)])
            q.enqueue(all_gather_no_grad(local))
        results[rank] = q.contents().flatten().tolist()
    finally:
        dist.destroy_process_group()


def test_queue_is_gathered_across_ranks_in_rank_order(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_queue_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    # step 0 enqueued [0, 1, 10, 11], step 1 [100, 101, 110, 111]; size 6 keeps the newest six, oldest first
    assert results[0] == results[1] == [10, 11, 100, 101, 110, 111]
