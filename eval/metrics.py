"""Zero-shot classification and retrieval metrics, and what a random model scores on each."""

from __future__ import annotations

import torch


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, topk: tuple[int, ...] = (1, 5)) -> dict:
    """top-k accuracy, mean per-class recall and per-class recall from (N, C) scores and (N,) labels."""
    n, n_classes = logits.shape
    ranked = logits.topk(min(max(topk), n_classes), dim=1).indices
    hits = ranked == labels[:, None]
    out = {f"top{k}": float(hits[:, :k].any(dim=1).double().mean()) for k in topk if k <= n_classes}
    correct = hits[:, 0]
    per_class = []
    for c in range(n_classes):
        mask = labels == c
        per_class.append(float(correct[mask].double().mean()) if mask.any() else float("nan"))
    present = [r for r in per_class if r == r]
    out["mean_per_class_recall"] = sum(present) / len(present)
    out["per_class_recall"] = per_class
    return out


def classification_chance(n_classes: int, topk: tuple[int, ...] = (1, 5)) -> dict:
    out = {f"top{k}": k / n_classes for k in topk if k <= n_classes}
    out["mean_per_class_recall"] = 1 / n_classes
    return out


def retrieval_metrics(similarity: torch.Tensor, text_to_image: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict:
    """Recall@k both ways from an (images x texts) similarity matrix and each text's image index.

    text->image: the caption's own image is in its top k images. image->text: at least one of the image's
    captions is in its top k texts.
    """
    n_images, n_texts = similarity.shape
    positives = torch.zeros(n_images, n_texts, dtype=torch.bool)
    positives[text_to_image, torch.arange(n_texts)] = True
    out = {}
    for k in ks:
        top_images = similarity.T.topk(min(k, n_images), dim=1).indices
        out[f"text_to_image_R@{k}"] = float((top_images == text_to_image[:, None]).any(dim=1).double().mean())
        top_texts = similarity.topk(min(k, n_texts), dim=1).indices
        out[f"image_to_text_R@{k}"] = float(positives.gather(1, top_texts).any(dim=1).double().mean())
    return out


def _p_no_positive_in_top_k(n_texts: int, n_positive: int, k: int) -> float:
    """P(none of n_positive items is among k drawn without replacement from n_texts)."""
    p = 1.0
    for j in range(min(k, n_texts)):
        p *= max(0, n_texts - n_positive - j) / (n_texts - j)
    return p


def retrieval_chance(text_to_image: torch.Tensor, n_images: int, ks: tuple[int, ...] = (1, 5, 10)) -> dict:
    n_texts = len(text_to_image)
    counts = torch.bincount(text_to_image, minlength=n_images).tolist()
    out = {}
    for k in ks:
        out[f"text_to_image_R@{k}"] = min(k, n_images) / n_images
        out[f"image_to_text_R@{k}"] = sum(1 - _p_no_positive_in_top_k(n_texts, c, k) for c in counts) / n_images
    return out
