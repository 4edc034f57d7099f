"""The linear probe: the logistic-regression fit (a hand-solved case, and scikit-learn's solver on the same
objective), the regularisation sweep, CPU and GPU, and the probe task end to end through the suite."""

from __future__ import annotations

import math

import pytest
import torch

from clipline.config import LinearProbeConfig
from eval.linear_probe import accuracy, fit_logistic, holdout_split, linear_probe, sweep_l2
from eval.suite import run_suite
from test_eval_datasets import DIGIT_NAMES, by_key, digits, random_checkpoint, suite_config, write_csv


def test_two_points_by_hand():
    # x = +1 (class 1) and x = -1 (class 0). By symmetry b = 0 and W = [-w, w]; the loss is
    # log(1 + exp(-2w)) + l2 * w^2, stationary where l2 * w * (1 + exp(2w)) = 1.
    x = torch.tensor([[1.0], [-1.0]])
    y = torch.tensor([1, 0])
    l2 = 0.5
    lo, hi = 0.0, 2.0
    for _ in range(60):  # bisection on the stationarity condition
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if l2 * mid * (1 + math.exp(2 * mid)) < 1 else (lo, mid)
    clf = fit_logistic(x, y, 2, l2, tol=1e-9)
    assert clf.weight[0, 1].item() == pytest.approx(lo, abs=1e-5)
    assert clf.weight[0, 0].item() == pytest.approx(-lo, abs=1e-5)
    assert clf.bias.abs().max().item() < 1e-5
    assert lo == pytest.approx(0.5205, abs=1e-3)


def _blobs(n: int, d: int, classes: int, noise: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return centres[y] + noise * torch.randn(n, d, generator=g), y


def test_fit_equals_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    x, y = _blobs(300, 12, 4, noise=2.0, seed=0)
    l2 = 0.01
    ours = fit_logistic(x.double(), y, 4, l2, max_iter=500, tol=1e-10)
    # Same objective: sklearn minimises C * sum CE + ||W||^2 / 2, i.e. ours times C * n with C = 1 / (l2 * n).
    xd = x.double().numpy()  # float64 in both: sklearn keeps float32 input in float32
    ref = LogisticRegression(C=1 / (l2 * len(y)), tol=1e-10, max_iter=5000).fit(xd, y.numpy())
    ours_p = torch.softmax(ours.logits(x.double()), dim=1)
    ref_p = torch.from_numpy(ref.predict_proba(xd))
    assert (ours_p - ref_p).abs().max().item() < 1e-4
    # softmax is shift-invariant per sample: compare weights after removing the mean over classes
    w = ours.weight - ours.weight.mean(dim=1, keepdim=True)
    w_ref = torch.from_numpy(ref.coef_.T) - torch.from_numpy(ref.coef_.T).mean(dim=1, keepdim=True)
    assert (w - w_ref).abs().max().item() < 1e-3


def test_sweep_picks_the_best_validation_score():
    x, y = _blobs(400, 16, 5, noise=3.0, seed=1)
    fit, val = holdout_split(len(y), 0.25, seed=0)
    cfg = LinearProbeConfig(l2_min=1e-4, l2_max=1e2, grid_points=4, refine_steps=2)
    l2, tried = sweep_l2(x[fit], y[fit], x[val], y[val], 5, cfg)
    assert 4 <= len(tried) <= 4 + 2 * 2
    assert all(1e-4 * (1 - 1e-9) <= k <= 1e2 * (1 + 1e-9) for k in tried)
    assert tried[l2] == max(tried.values())
    assert l2 == max(k for k, v in tried.items() if v == tried[l2])  # ties go to the stronger penalty
    for grid_point in (1e2, 1e0, 1e-2, 1e-4):
        assert any(math.isclose(k, grid_point, rel_tol=1e-9) for k in tried)
    # an over-strong penalty predicts the majority class only
    assert tried[max(tried)] < max(tried.values())


def test_holdout_split_is_seeded_and_disjoint():
    a_fit, a_val = holdout_split(50, 0.2, seed=3)
    b_fit, b_val = holdout_split(50, 0.2, seed=3)
    assert torch.equal(a_val, b_val) and len(a_val) == 10
    assert sorted(a_fit.tolist() + a_val.tolist()) == list(range(50))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine (torch.cuda.is_available())")
def test_probe_on_gpu_equals_cpu():
    x, y = _blobs(500, 32, 6, noise=2.0, seed=2)
    fit, val = holdout_split(len(y), 0.2, seed=0)
    cfg = LinearProbeConfig(grid_points=5, refine_steps=1)
    cpu = linear_probe(x[fit], y[fit], x[val], y[val], 6, cfg, "cpu")
    gpu = linear_probe(x[fit], y[fit], x[val], y[val], 6, cfg, "cuda")
    assert gpu.classifier.weight.device.type == "cuda"
    assert gpu.l2 == pytest.approx(cpu.l2)
    assert accuracy(gpu.classifier, x.cuda(), y.cuda()) == pytest.approx(accuracy(cpu.classifier, x, y), abs=0.01)


def test_linear_probe_task_through_the_suite(tmp_path):
    images, labels = digits(size=64, n=300)
    train_csv = write_csv(tmp_path / "train" / "d.csv", images[:240], labels[:240])
    test_csv = write_csv(tmp_path / "test" / "d.csv", images[240:], labels[240:])
    ckpt = random_checkpoint(tmp_path / "ckpt", seed=0)
    datasets = [{"name": "digits-probe", "task": "linear_probe", "path": str(test_csv), "train_path": str(train_csv),
                 "classnames": DIGIT_NAMES},
                {"name": "no-train", "task": "linear_probe", "path": str(test_csv), "classnames": DIGIT_NAMES}]
    probe = {"grid_points": 4, "refine_steps": 1, "max_iter": 100}
    records = run_suite(suite_config(tmp_path, ckpt, datasets, linear_probe=probe))
    got = by_key(records)
    top1 = got[("digits-probe", "top1")]
    # frozen random features still separate digits far above chance (10%)
    assert top1["value"] > 0.5 and top1["chance"] == pytest.approx(0.1) and top1["n_samples"] == 60
    assert top1["n_train"] == 240 and 1e-6 <= top1["l2"] <= 1e2 and 0 < top1["val_top1"] <= 1
    assert "needs its training images: set train_path" in got[("no-train", "error")]["error"]
