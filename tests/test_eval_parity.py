"""clipline's zero-shot classification and retrieval numbers equal CLIP_benchmark 1.6.2's (a test dependency,
run in this process through its own CLI entry point) on the same model and data, within 0.1 points.

Data, built here: scikit-learn's digits upsampled to the model's 64 px, and a demo-like held-out split (the
demo's scene generator, 3 captions per image), each written both as clipline shards and in CLIP_benchmark's
webdataset layout. Model: a random tiny open_clip ResNet saved as a checkpoint folder, its output biases shifted
so that scores vary from image to image (see random_checkpoint); the test first checks that no score ties at
the ranks that count, so agreement cannot come from tie-breaking. Whether a random model's scores nearly tie
depends on the CPU's kernels (seed 5's demo model had a top-1/top-5 gap of 2e-7 with AVX2 kernels, 6e-6 with
AVX-512 ones), so the fixture picks, on the machine at hand, the first seed whose gaps clear twice the bar.

Environment: CLIP_benchmark 1.6.2's accuracy() calls float() on a 1-element numpy array, which numpy >= 2
refuses (its issue #147). Rather than a separate environment, this test uses a shim: it replaces that one
function with the same top-k count using .item(). CLIP_benchmark runs with --no_amp: with AMP on CPU its scores
are bf16 and most retrieval queries tie, so its numbers would depend on tie-breaking; clipline's similarities are
fp32 whatever the model's precision.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipline.config import EvalDatasetConfig
from conftest import make_samples, write_shard
from eval.checkpoints import Checkpoint, expand_checkpoints, load_model
from eval.datasets import load_split
from eval.suite import EvalContext, evaluate_checkpoint
from eval.zeroshot import encode_texts, zero_shot_classifier
from test_eval_datasets import (DIGIT_NAMES, DIGIT_TEMPLATES, by_key, digits, random_checkpoint, suite_config,
                                write_clip_benchmark_wds, write_digits_wds)

clip_benchmark = pytest.importorskip("clip_benchmark", reason="clip-benchmark==1.6.2 is in the test extra")

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
COLOUR_TEMPLATES = ["a photo of a {c} object.", "a {c} shape.", "something {c}."]
TOLERANCE = 0.001  # 0.1 points, as fractions


def _accuracy_shim(output, target, topk=(1,)):
    """CLIP_benchmark's accuracy(), with .item() where it calls float() on a 1-element array."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum(0).item() / len(target) for k in topk]


def _demo_samples(n: int) -> list[dict]:
    """Demo scenes with 3 captions each; a caption already used by another image is dropped, so that no two
    texts are identical (identical texts tie in image->text retrieval)."""
    seen, out = set(), []
    for s in make_samples(n, seed=7, captions_per_image=3, image_size=64):
        caps = [c for c in dict.fromkeys(s["txt"].splitlines()) if c not in seen]
        if caps:
            seen.update(caps)
            out.append({**s, "txt": "\n".join(caps)})
    return out


@pytest.fixture(scope="module")
def parity_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    images, labels = digits(n=1000)  # of 1797: enough to compare, half the time
    demo = _demo_samples(200)
    shards = root / "demo_shards"
    shards.mkdir()
    write_shard(shards / "00000.tar", demo[:100])
    write_shard(shards / "00001.tar", demo[100:])
    colour_index = [COLOURS.index(s["json"]["colour"]) for s in demo]
    wds = root / "wds"
    write_digits_wds(wds / "digits", images, labels)
    write_clip_benchmark_wds(wds / "democolour", [(("jpg", s["jpg"]), "cls", str(y).encode())
                                                  for s, y in zip(demo, colour_index)],
                             classnames=COLOURS, templates=COLOUR_TEMPLATES)
    write_clip_benchmark_wds(wds / "demoretrieval", [(("jpg", s["jpg"]), "txt", s["txt"].encode()) for s in demo],
                             retrieval=True)
    # One random model per data set, each centred on its own data, with scores that do not nearly tie here.
    demo_images = [Image.open(io.BytesIO(s["jpg"])).convert("RGB") for s in demo]
    digit_prompts = [t.replace("{c}", c) for c in DIGIT_NAMES for t in DIGIT_TEMPLATES]
    demo_texts = [cap for s in demo for cap in s["txt"].splitlines()] + [
        t.replace("{c}", c) for c in COLOURS for t in COLOUR_TEMPLATES]
    models = {"digits": _model_without_near_ties(root, wds, "digits", (images[:300], digit_prompts)),
              "demo": _model_without_near_ties(root, wds, "demo", (demo_images, demo_texts))}
    return {"root": root, "wds": wds, "shards": shards, "models": models}


# 6 first: it clears the bar with AVX-512 and with AVX2 kernels (5, the earlier choice, only with AVX-512).
SEEDS = (6, 5, *range(5), *range(7, 24))


def _model_without_near_ties(root: Path, wds: Path, model: str, centre_on) -> Path:
    """The first random model (by SEEDS) whose score gaps, computed exactly as test_scores_do_not_tie computes
    them, are all above 2 x SAFE_GAP on this machine; the test itself keeps the bar at SAFE_GAP."""
    found = {}
    for seed in SEEDS:
        folder = random_checkpoint(root / f"{model}_model_{seed}", seed=seed, centre_on=centre_on)
        cfg = suite_config(root / f"pick_{model}_{seed}", folder, _WDS_ENTRIES[model](wds))
        ctx = EvalContext.from_config(cfg, torch.device("cpu"))
        evaluate_checkpoint(expand_checkpoints(cfg)[0], cfg.datasets, ctx)
        found[seed] = min(_score_gaps(folder, wds, model, ctx).values())
        if found[seed] > 2 * SAFE_GAP:
            return folder
    raise AssertionError(f"no seed of {SEEDS} gives the {model} parity model score gaps above {2 * SAFE_GAP} on "
                         f"this machine (smallest gap per seed: {found}): widen SEEDS")


def _clip_benchmark(monkeypatch, data, model: str, task: str, datasets: list[str]) -> dict[str, dict]:
    from clip_benchmark import cli
    from clip_benchmark.metrics import zeroshot_classification

    monkeypatch.setattr(zeroshot_classification, "accuracy", _accuracy_shim)
    out = data["root"] / "cb_{dataset}_{task}.json"
    argv = ["clip_benchmark", "eval", "--dataset", *[f"wds/{d}" for d in datasets],
            "--dataset_root", str(data["wds"] / "{dataset}"), "--task", task,
            "--model", f"local-dir:{data['models'][model]}", "--pretrained", "", "--no_amp",
            "--batch_size", "64", "--num_workers", "0", "--recall_k", "1", "5", "10",
            "--output", str(out), "--quiet"]
    monkeypatch.setattr(sys, "argv", argv)
    cli.main()
    return {d: json.loads(Path(str(out).format(dataset=d, task=task)).read_text())["metrics"] for d in datasets}


_WDS_ENTRIES = {
    "digits": lambda wds: [{"name": "digits", "path": str(wds / "digits")}],  # class names, templates: its files
    "demo": lambda wds: [{"name": "democolour", "path": str(wds / "democolour")},
                         {"name": "demoretrieval", "task": "retrieval", "path": str(wds / "demoretrieval")}],
}


def _entries(data) -> dict[str, list[dict]]:
    return {
        "digits": _WDS_ENTRIES["digits"](data["wds"]),
        "demo": [
            *_WDS_ENTRIES["demo"](data["wds"]),
            # the same demo images as clipline shards (labels in .json, captions in .txt)
            {"name": "democolour-shards", "path": str(data["shards"]), "label_field": "colour",
             "classnames": COLOURS, "templates": COLOUR_TEMPLATES},
            {"name": "demoretrieval-shards", "task": "retrieval", "path": str(data["shards"])},
        ]}


@pytest.fixture(scope="module")
def ours(parity_data):
    """clipline's records, and per model the evaluation context holding the image features it computed."""
    records, contexts = [], {}
    for model, datasets in _entries(parity_data).items():
        cfg = suite_config(parity_data["root"] / model, parity_data["models"][model], datasets)
        contexts[model] = EvalContext.from_config(cfg, torch.device("cpu"))
        records += evaluate_checkpoint(expand_checkpoints(cfg)[0], cfg.datasets, contexts[model])
    assert not [r for r in records if r.get("error")], records
    return by_key(records), contexts


def _min_gap(scores: torch.Tensor, ks: tuple[int, ...]) -> float:
    """The smallest difference between the k-th and (k+1)-th best score of any row: what decides top-k."""
    top = scores.topk(min(max(ks) + 1, scores.shape[1]), dim=1).values
    return min(float((top[:, k - 1] - top[:, k]).min()) for k in ks if k < top.shape[1])


# Computing the same scores with other batchings (text batches of 7 vs 64, images @ texts.T vs texts @ images.T)
# moved them by up to 1.5e-7 here: gaps several times that cannot be reordered by such differences.
SAFE_GAP = 1e-6


def _logits(model_dir: Path, wds: Path, name: str, ctx: EvalContext) -> tuple[torch.Tensor, torch.Tensor]:
    """(image x class scores, which images were read) of a classification set, from the suite's image features."""
    bundle = load_model(Checkpoint("open_clip_dir", str(model_dir)), "cpu")
    split = load_split(EvalDatasetConfig(name=name, path=str(wds / name)), cache=ctx.splits)
    feats, ok = ctx.features[split.images_key]
    clf = zero_shot_classifier(bundle.model, bundle.tokenizer, split.classnames, split.templates, "cpu")
    return feats @ clf.T, ok


def _score_gaps(model_dir: Path, wds: Path, model: str, ctx: EvalContext) -> dict[str, float]:
    """The smallest gap between the k-th and (k+1)-th score at every k that a metric reads, per score matrix."""
    if model == "digits":
        return {"digits": _min_gap(_logits(model_dir, wds, "digits", ctx)[0], (1, 5))}
    bundle = load_model(Checkpoint("open_clip_dir", str(model_dir)), "cpu")
    split = load_split(EvalDatasetConfig(name="r", task="retrieval", path=str(wds / "demoretrieval")),
                       cache=ctx.splits)
    feats, _ = ctx.features[split.images_key]
    texts = encode_texts(bundle.model, bundle.tokenizer, [t for c in split.captions for t in c], "cpu", 64)
    sim = feats @ texts.T
    return {"democolour": _min_gap(_logits(model_dir, wds, "democolour", ctx)[0], (1, 5)),
            "image_to_text": _min_gap(sim, (1, 5, 10)), "text_to_image": _min_gap(sim.T, (1, 5, 10))}


def test_scores_do_not_tie(parity_data, ours):
    """The precondition of the comparison: every score that decides a top-1/top-5/recall@k differs from the next
    by more than rounding between two implementations, and the predictions vary from image to image."""
    _, contexts = ours
    for model, name in (("digits", "digits"), ("demo", "democolour")):
        logits, ok = _logits(parity_data["models"][model], parity_data["wds"], name, contexts[model])
        assert ok.all(), name
        assert len(set(logits.argmax(dim=1).tolist())) >= 5, f"{name}: predictions should vary"
        gaps = _score_gaps(parity_data["models"][model], parity_data["wds"], model, contexts[model])
        assert min(gaps.values()) > SAFE_GAP, gaps


def test_numbers_equal_clip_benchmark(parity_data, ours, monkeypatch):
    ours, _ = ours
    theirs = _clip_benchmark(monkeypatch, parity_data, "digits", "zeroshot_classification", ["digits"])
    theirs.update(_clip_benchmark(monkeypatch, parity_data, "demo", "zeroshot_classification", ["democolour"]))
    theirs.update(_clip_benchmark(monkeypatch, parity_data, "demo", "zeroshot_retrieval", ["demoretrieval"]))

    for name in ("digits", "democolour"):
        for ours_metric, their_metric in (("top1", "acc1"), ("top5", "acc5"),
                                          ("mean_per_class_recall", "mean_per_class_recall")):
            assert ours[(name, ours_metric)]["value"] == pytest.approx(theirs[name][their_metric], abs=TOLERANCE), \
                (name, ours_metric)
    # CLIP_benchmark's "image retrieval" is text->image; its "text retrieval" is image->text.
    for k in (1, 5, 10):
        assert ours[("demoretrieval", f"text_to_image_R@{k}")]["value"] == pytest.approx(
            theirs["demoretrieval"][f"image_retrieval_recall@{k}"], abs=TOLERANCE)
        assert ours[("demoretrieval", f"image_to_text_R@{k}")]["value"] == pytest.approx(
            theirs["demoretrieval"][f"text_retrieval_recall@{k}"], abs=TOLERANCE)
    # clipline's own shard layout gives the same numbers as the webdataset copy
    for metric in ("top1", "top5", "mean_per_class_recall"):
        assert ours[("democolour-shards", metric)]["value"] == pytest.approx(ours[("democolour", metric)]["value"])
    for k in (1, 5, 10):
        for way in ("text_to_image", "image_to_text"):
            assert ours[("demoretrieval-shards", f"{way}_R@{k}")]["value"] == pytest.approx(
                ours[("demoretrieval", f"{way}_R@{k}")]["value"])
    # and the numbers are not degenerate: better than nothing, short of perfect
    assert 0.0 < ours[("digits", "top1")]["value"] < 1.0 and ours[("digits", "top1")]["n_samples"] == 1000
    assert 0.0 < ours[("demoretrieval", "image_to_text_R@10")]["value"] < 1.0


# -- Retrieval sets stored as an images folder plus an annotation file (CLIP_benchmark's --dataset_root and
# --annotation_file): the demo retrieval images and captions, written as flickr30k and as mscoco_captions.


def _wds_retrieval_samples(folder: Path) -> list[tuple[bytes, list[str]]]:
    """(JPEG bytes, captions) of each sample of a CLIP_benchmark webdataset retrieval split, in shard order."""
    import tarfile

    samples: dict[str, dict[str, bytes]] = {}
    shards = sorted(folder.glob("*.tar"), key=lambda p: int(p.stem))
    for shard in shards:
        with tarfile.open(shard) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                samples.setdefault(f"{shard.stem}/{key}", {})[ext] = tar.extractfile(m).read()
    return [(s["jpg"], s["txt"].decode().splitlines()) for s in samples.values()]


@pytest.fixture(scope="module")
def annotation_layouts(parity_data):
    """flickr30k: ROOT/NAME.jpg + an `image,caption` file; mscoco_captions: ROOT/val2014/COCO_val2014_ID.jpg + a
    COCO captions JSON, with image ids not in file order (CocoCaptions reads images in id order)."""
    samples = _wds_retrieval_samples(parity_data["wds"] / "demoretrieval" / "test")
    root = parity_data["root"] / "annotated"
    flickr = root / "flickr30k"
    flickr.mkdir(parents=True)
    lines = ["image,caption"]
    for i, (jpg, caps) in enumerate(samples):
        (flickr / f"{1000 + i}.jpg").write_bytes(jpg)  # the same bytes: the same pixels as the wds copy
        lines += [f"{1000 + i}.jpg,{c}" for c in caps]
    (root / "flickr_test.txt").write_text("\n".join(lines) + "\n")
    coco = root / "mscoco_captions"
    (coco / "val2014").mkdir(parents=True)
    ids = [(i * 37) % 1009 + 1 for i in range(len(samples))]  # distinct, not increasing
    images, anns = [], []
    for image_id, (jpg, caps) in zip(ids, samples):
        name = f"COCO_val2014_{image_id:012d}.jpg"
        (coco / "val2014" / name).write_bytes(jpg)
        images.append({"id": image_id, "file_name": name, "height": 64, "width": 64})
        anns += [{"id": len(anns) + j + 1, "image_id": image_id, "caption": c} for j, c in enumerate(caps)]
    (root / "coco_test.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return {"sets": {"flickr30k": (flickr, root / "flickr_test.txt"),
                     "mscoco_captions": (coco, root / "coco_test.json")}, "n_images": len(samples)}


def _clip_benchmark_annotated(monkeypatch, data, dataset: str, root: Path, annotation: Path) -> dict:
    from clip_benchmark import cli

    out = data["root"] / f"cb_{dataset}.json"
    argv = ["clip_benchmark", "eval", "--dataset", dataset, "--dataset_root", str(root),
            "--annotation_file", str(annotation), "--task", "zeroshot_retrieval",
            "--model", f"local-dir:{data['models']['demo']}", "--pretrained", "", "--no_amp",
            "--batch_size", "64", "--num_workers", "0", "--recall_k", "1", "5", "10", "--output", str(out), "--quiet"]
    monkeypatch.setattr(sys, "argv", argv)
    cli.main()
    return json.loads(out.read_text())["metrics"]


def test_annotation_file_layouts_equal_clip_benchmark(parity_data, annotation_layouts, ours, monkeypatch):
    """flickr30k and mscoco_captions from an images folder and an annotation file: clipline (format auto, told only
    path and annotation_file) and CLIP_benchmark 1.6.2 (--no_amp) give the same recall@1/5/10 both ways. The
    images and captions are the demo retrieval set's, whose scores test_scores_do_not_tie checks for ties."""
    datasets = [{"name": name, "task": "retrieval", "path": str(folder), "annotation_file": str(annotation)}
                for name, (folder, annotation) in annotation_layouts["sets"].items()]
    cfg = suite_config(parity_data["root"] / "annotated-suite", parity_data["models"]["demo"], datasets)
    records = evaluate_checkpoint(expand_checkpoints(cfg)[0], cfg.datasets,
                                  EvalContext.from_config(cfg, torch.device("cpu")))
    assert not [r for r in records if r.get("error")], records
    got = by_key(records)
    wds, _ = ours
    for name, (folder, annotation) in annotation_layouts["sets"].items():
        assert got[(name, "text_to_image_R@1")]["n_samples"] == annotation_layouts["n_images"]
        theirs = _clip_benchmark_annotated(monkeypatch, parity_data, name, folder, annotation)
        for k in (1, 5, 10):
            # recall is a count over at most a few hundred queries: 1e-6 is far below one query
            assert got[(name, f"text_to_image_R@{k}")]["value"] == pytest.approx(
                theirs[f"image_retrieval_recall@{k}"], abs=1e-6), (name, k)
            assert got[(name, f"image_to_text_R@{k}")]["value"] == pytest.approx(
                theirs[f"text_retrieval_recall@{k}"], abs=1e-6), (name, k)
            for way in ("text_to_image", "image_to_text"):  # and equal to the same data read from webdataset
                assert got[(name, f"{way}_R@{k}")]["value"] == pytest.approx(
                    wds[("demoretrieval", f"{way}_R@{k}")]["value"], abs=1e-6), (name, way, k)
    assert 0.0 < got[("flickr30k", "image_to_text_R@10")]["value"] < 1.0
