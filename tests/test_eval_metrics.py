"""Hand-checked tiny cases for every metric and its chance level."""

import math

import pytest
import torch

from eval.metrics import classification_chance, classification_metrics, retrieval_chance, retrieval_metrics


def test_classification_by_hand():
    # 4 samples, 3 classes. Rankings: s0 [0,1,2] label 0 (hit@1); s1 [2,1,0] label 1 (hit@2);
    # s2 [2,0,1] label 2 (hit@1); s3 [1,2,0] label 0 (hit@3).
    logits = torch.tensor([[3.0, 2, 1], [1, 2, 3], [2, 1, 3], [1, 3, 2]])
    labels = torch.tensor([0, 1, 2, 0])
    m = classification_metrics(logits, labels, topk=(1, 2))
    assert m["top1"] == pytest.approx(2 / 4)
    assert m["top2"] == pytest.approx(3 / 4)
    # per-class recall@1: class 0: 1 of 2; class 1: 0 of 1; class 2: 1 of 1
    assert m["per_class_recall"] == pytest.approx([0.5, 0.0, 1.0])
    assert m["mean_per_class_recall"] == pytest.approx(0.5)


def test_topk_larger_than_classes_is_left_out():
    m = classification_metrics(torch.eye(3), torch.arange(3))
    assert "top5" not in m and m["top1"] == 1.0


def test_classification_chance():
    assert classification_chance(8) == {"top1": 1 / 8, "top5": 5 / 8, "mean_per_class_recall": 1 / 8}


def test_retrieval_by_hand():
    # 2 images, 3 texts: texts 0,1 belong to image 0, text 2 to image 1.
    sim = torch.tensor([[0.1, 0.9, 0.5],   # image 0 ranks texts 1, 2, 0 -> hit@1
                        [0.8, 0.2, 0.3]])  # image 1 ranks texts 0, 2, 1 -> its text (2) at rank 2
    text_to_image = torch.tensor([0, 0, 1])
    m = retrieval_metrics(sim, text_to_image, ks=(1, 2))
    assert m["image_to_text_R@1"] == pytest.approx(1 / 2)
    assert m["image_to_text_R@2"] == pytest.approx(1.0)
    # text 0: images ranked [1, 0] -> miss@1; text 1: [0, 1] -> hit; text 2: [0, 1] -> miss@1
    assert m["text_to_image_R@1"] == pytest.approx(1 / 3)
    assert m["text_to_image_R@2"] == pytest.approx(1.0)


def test_retrieval_chance_matches_formula_and_simulation():
    text_to_image = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])  # 4 images x 3 captions
    c = retrieval_chance(text_to_image, 4, ks=(1, 5))
    assert c["text_to_image_R@1"] == pytest.approx(1 / 4)
    # P(at least one of 3 positives in the top 5 of 12) = 1 - C(9,5)/C(12,5)
    assert c["image_to_text_R@5"] == pytest.approx(1 - math.comb(9, 5) / math.comb(12, 5))
    g = torch.Generator().manual_seed(0)
    sims = [retrieval_metrics(torch.rand(4, 12, generator=g), text_to_image, ks=(5,))["image_to_text_R@5"]
            for _ in range(4000)]
    assert sum(sims) / len(sims) == pytest.approx(c["image_to_text_R@5"], abs=0.02)
