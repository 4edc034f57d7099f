"""`clipline eval`: run a suite (datasets x tasks) over one or several checkpoints and write results.json,
results.csv and results.md (with several checkpoints of a run: a table and plots over training steps)."""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from dataclasses import dataclass, field

import torch

from clipline import storage
from clipline.config import Config, EvalConfig, EvalDatasetConfig, LinearProbeConfig
from clipline.dist import pick_device
from clipline.errors import UsageError
from clipline.models import ModelBundle
from clipline.precision import PrecisionChoice, resolve_precision
from eval.checkpoints import Checkpoint, expand_checkpoints, load_model
from eval.datasets import EvalSplit, SplitCache, load_split, resolve_templates
from eval.linear_probe import holdout_split, linear_probe
from eval.metrics import classification_chance, classification_metrics, retrieval_chance, retrieval_metrics
from eval.report import markdown_table, write_results  # noqa: F401  (part of this module's API)
from eval.zeroshot import encode_images, encode_texts, zero_shot_classifier

log = logging.getLogger(__name__)


def main(cfg: Config) -> int:
    records = run_suite(cfg.eval)
    print(markdown_table(records), flush=True)
    failed = [r for r in records if r.get("error")]
    return 1 if failed and len(failed) == len(records) else 0


def _say(message: str) -> None:
    print(f"[eval] {message}", file=sys.stderr, flush=True)


@dataclass
class EvalContext:
    """How to encode, and what is shared between the dataset entries of a suite."""

    device: torch.device
    batch_size: int = 256
    precision: str = "fp32"
    """Concrete: fp32, bf16 or fp16."""
    workers: int = 0
    progress: bool = False
    probe: LinearProbeConfig = field(default_factory=LinearProbeConfig)
    splits: SplitCache = field(default_factory=SplitCache)
    features: dict = field(default_factory=dict)
    """images_key -> (features, ok) for the current model; cleared when the model changes."""
    precision_choice: PrecisionChoice | None = None
    """How precision was chosen (eval.precision may be 'auto')."""

    @classmethod
    def from_config(cls, cfg: EvalConfig, device: torch.device) -> "EvalContext":
        choice = resolve_precision(cfg.precision, device)
        return cls(device, cfg.batch_size, choice.precision, cfg.workers, cfg.progress, cfg.linear_probe,
                   precision_choice=choice)


def run_suite(cfg: EvalConfig) -> list[dict]:
    if not cfg.datasets:
        raise UsageError("eval.datasets is empty: list the datasets to evaluate (see configs/demo.yaml)")
    if storage.is_remote(cfg.output_dir):  # a wrong bucket or credentials fail now, not after the whole suite
        storage.check_reachable(storage.root_of(cfg.output_dir), "eval.output_dir bucket")
    checkpoints = expand_checkpoints(cfg)
    ctx = EvalContext.from_config(cfg, pick_device(cfg.device, 0))
    _say(ctx.precision_choice.line())
    records: list[dict] = []
    for ckpt in checkpoints:
        records += evaluate_checkpoint(ckpt, cfg.datasets, ctx)
    for r in records:  # results.json says what the numbers were computed in, and whether auto chose it
        r.update(precision=ctx.precision, precision_requested=cfg.precision)
    # The saved config holds the concrete precision, as the trainer's does.
    plots = write_results(dataclasses.replace(cfg, precision=ctx.precision), records)
    if plots:
        _say(f"plots over training steps: {', '.join(str(p) for p in plots)}")
    return records


def evaluate_checkpoint(ckpt: Checkpoint, datasets: list[EvalDatasetConfig], ctx: EvalContext) -> list[dict]:
    """Every dataset on one checkpoint; a checkpoint that cannot be loaded gives an error record per dataset."""
    where = {"checkpoint": ckpt.label, "step": ckpt.step}
    _say(f"checkpoint {ckpt.label}")
    try:
        bundle = load_model(ckpt, ctx.device)
    except UsageError as e:
        log.error("%s", e)
        return [_error_record(ds, str(e)) | where for ds in datasets]
    ctx.features.clear()
    records = []
    for ds in datasets:
        start = time.perf_counter()
        try:
            found = evaluate_dataset(bundle, ds, ctx.device, ctx.batch_size, ctx=ctx)
        except (UsageError, OSError) as e:  # one bad dataset must not cost the results of the others
            log.error("%s", e)
            found = [_error_record(ds, str(e))]
        except Exception as e:  # noqa: BLE001  (a bug or an odd file: report it, keep the other results)
            log.exception("eval dataset %r failed", ds.name)
            found = [_error_record(ds, f"{type(e).__name__}: {e}")]
        seconds = round(time.perf_counter() - start, 2)
        for r in found:
            r.update(where, seconds=seconds)
        n = found[0].get("n_samples")
        _say(f"{ds.name} ({ds.task}): " + (f"error: {found[0]['error']}" if found[0].get("error") else
                                          f"{n} images, {seconds:.1f} s"))
        records += found
    return records


def _error_record(ds: EvalDatasetConfig, message: str) -> dict:
    return {"task": ds.task, "dataset": ds.name, "metric": "error", "value": None, "chance": None, "error": message}


def evaluate_dataset(bundle: ModelBundle, ds: EvalDatasetConfig, device, batch_size: int, *,
                     ctx: EvalContext | None = None) -> list[dict]:
    """Records of one dataset entry on one model (the trainer calls this for in-loop evals)."""
    ctx = ctx or EvalContext(torch.device(device), batch_size)
    if ds.task == "zeroshot_classification":
        return _zero_shot_classification(bundle, ds, ctx)
    if ds.task == "retrieval":
        return _retrieval(bundle, ds, ctx)
    return _linear_probe(bundle, ds, ctx)


def _image_features(bundle: ModelBundle, split: EvalSplit, ctx: EvalContext) -> tuple[torch.Tensor, torch.Tensor]:
    if split.images_key not in ctx.features:
        ctx.features[split.images_key] = encode_images(
            bundle.model, bundle.preprocess_val, split.refs, ctx.device, ctx.batch_size, indexed=split.indexed,
            workers=ctx.workers, precision=ctx.precision, progress=ctx.progress,
            desc=split.name.split(" (")[0])  # "eval dataset 'NAME'": the bar keeps the terminal's width
    feats, ok = ctx.features[split.images_key]
    if not ok.any():
        raise UsageError(f"{split.name}: none of its {len(ok)} images could be read (see the warnings above)")
    split.skipped["unreadable_image"] += int((~ok).sum())
    return feats, ok


def _labelled(bundle: ModelBundle, split: EvalSplit, ctx: EvalContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of the images that could be read and have a usable label."""
    feats, ok = _image_features(bundle, split, ctx)
    labels = torch.tensor(split.labels)
    keep = ok & (labels >= 0)
    if not keep.any():
        raise UsageError(f"{split.name}: no image both readable and labelled (skipped: {dict(split.skipped)})")
    return feats[keep], labels[keep]


def _base(ds: EvalDatasetConfig, split: EvalSplit, n: int) -> dict:
    return {"task": ds.task, "dataset": ds.name, "n_samples": n, "skipped": len(split.refs) - n}


def _classification_records(base: dict, metrics: dict, classnames: list[str], extra: dict | None = None) -> list:
    chance = classification_chance(len(classnames))
    per_class = metrics.pop("per_class_recall")
    records = [{**base, "metric": k, "value": v, "chance": chance[k], **(extra or {})} for k, v in metrics.items()]
    records += [{**base, "metric": f"recall[{name}]", "value": r, "chance": chance["mean_per_class_recall"]}
                for name, r in zip(classnames, per_class) if r == r]
    return records


def _zero_shot_classification(bundle: ModelBundle, ds: EvalDatasetConfig, ctx: EvalContext) -> list[dict]:
    split = load_split(ds, "test", ctx.splits)
    templates = resolve_templates(ds, split.templates)
    x, y = _labelled(bundle, split, ctx)
    classifier = zero_shot_classifier(bundle.model, bundle.tokenizer, split.classnames, templates, ctx.device,
                                      ctx.batch_size, precision=ctx.precision)
    metrics = classification_metrics(x @ classifier.T, y)
    return _classification_records(_base(ds, split, len(y)), metrics, split.classnames,
                                   {"n_templates": len(templates)})


def _retrieval(bundle: ModelBundle, ds: EvalDatasetConfig, ctx: EvalContext) -> list[dict]:
    split = load_split(ds, "test", ctx.splits)
    feats, ok = _image_features(bundle, split, ctx)
    keep = [i for i, caps in enumerate(split.captions) if caps and ok[i]]
    captions = [split.captions[i] for i in keep]
    texts = [t for caps in captions for t in caps]
    text_to_image = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
    text_feats = encode_texts(bundle.model, bundle.tokenizer, texts, ctx.device, ctx.batch_size,
                              precision=ctx.precision)
    metrics = retrieval_metrics(feats[keep] @ text_feats.T, text_to_image)
    chance = retrieval_chance(text_to_image, len(keep))
    base = {**_base(ds, split, len(keep)), "n_texts": len(texts)}
    return [{**base, "metric": k, "value": v, "chance": chance[k]} for k, v in metrics.items()]


def _linear_probe(bundle: ModelBundle, ds: EvalDatasetConfig, ctx: EvalContext) -> list[dict]:
    test = load_split(ds, "test", ctx.splits)
    train = load_split(ds, "train", ctx.splits)
    if train.classnames != test.classnames:
        raise UsageError(f"eval dataset {ds.name!r}: the train and test splits have different classes "
                         f"({len(train.classnames)} vs {len(test.classnames)})")
    if train.images_key == test.images_key:
        raise UsageError(f"eval dataset {ds.name!r}: the linear probe's training split is its test split; set "
                         f"train_path or train_split")
    train_x, train_y = _labelled(bundle, train, ctx)
    if ds.val_path or ds.val_split:
        val_x, val_y = _labelled(bundle, load_split(ds, "val", ctx.splits), ctx)
    else:
        fit, held = holdout_split(len(train_y), ctx.probe.val_proportion, ctx.probe.seed)
        train_x, train_y, val_x, val_y = train_x[fit], train_y[fit], train_x[held], train_y[held]
    test_x, test_y = _labelled(bundle, test, ctx)
    n_classes = len(test.classnames)
    result = linear_probe(train_x, train_y, val_x, val_y, n_classes, ctx.probe, ctx.device)
    metrics = classification_metrics(result.classifier.logits(test_x.to(ctx.device)).float().cpu(), test_y)
    extra = {"l2": result.l2, "val_top1": result.val_top1, "n_train": len(train_y) + len(val_y)}
    return _classification_records(_base(ds, test, len(test_y)), metrics, test.classnames, extra)
