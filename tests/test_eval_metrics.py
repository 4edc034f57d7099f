"""Hand-checked tiny cases for every metric and its chance level."""

import math

import pytest
import torch
from PIL import Image

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


def test_absent_class_is_left_out_of_the_mean_recall():
    # 3 classes, class 2 never occurs: its recall is undefined (nan) and not averaged in.
    logits = torch.tensor([[2.0, 1, 0], [0, 2, 1], [2, 1, 0]])
    labels = torch.tensor([0, 1, 1])
    m = classification_metrics(logits, labels, topk=(1,))
    assert m["per_class_recall"][:2] == [1.0, 0.5] and math.isnan(m["per_class_recall"][2])
    assert m["mean_per_class_recall"] == pytest.approx(0.75)
    assert m["top1"] == pytest.approx(2 / 3)


class _LookupModel(torch.nn.Module):
    """encode_text/encode_image return fixed vectors: the tokenizer hands over row indices of a table."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def encode_text(self, rows):
        return self.table[rows]

    def encode_image(self, images):
        return images.flatten(1) @ self.table[: images[0].numel()]


def test_zero_shot_classifier_by_hand():
    from eval.zeroshot import zero_shot_classifier

    prompts = ["a cat", "the cat", "a dog", "the dog"]
    table = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0], [0.0, -1.0]])
    model = _LookupModel(table)

    def tokenizer(texts):
        return torch.tensor([prompts.index(t) for t in texts])

    clf = zero_shot_classifier(model, tokenizer, ["cat", "dog"], ["a {c}", "the {c}"], "cpu")
    # cat: mean of [0.6, 0.8] and [1, 0] = [0.8, 0.4] -> normalised [2, 1] / sqrt(5)
    assert clf[0].tolist() == pytest.approx([2 / math.sqrt(5), 1 / math.sqrt(5)])
    # dog: [0, 1] and [0, -1] average to zero: no direction (a zero row, scoring 0 against every image), no NaN
    assert torch.isfinite(clf).all()
    assert clf[1].abs().max() < 1e-6, clf[1]


def test_features_are_fp32_whatever_the_model_precision():
    from eval.zeroshot import encode_images, encode_texts

    table = torch.randn(12, 4)
    model = _LookupModel(table).to(torch.bfloat16)
    images = [Image.new("RGB", (2, 2), (40 * i, 200 - 30 * i, 17 * i)) for i in range(5)]

    def preprocess(image):
        return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(2, 2, 3).permute(2, 0, 1).to(
            torch.bfloat16) / 255

    feats, ok = encode_images(model, preprocess, images, "cpu", batch_size=2)
    assert feats.dtype == torch.float32 and ok.all()
    assert feats.norm(dim=1).tolist() == pytest.approx([1.0] * 5, abs=1e-6)
    texts = encode_texts(model, lambda t: torch.tensor([int(x) for x in t]), ["0", "3"], "cpu", 8, precision="bf16")
    assert texts.dtype == torch.float32
