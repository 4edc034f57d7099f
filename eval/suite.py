"""`clipline eval`: run a suite (datasets x tasks) on a checkpoint and write results.json, .csv and .md."""

from __future__ import annotations

import csv
import io
import logging
import re
import time
from pathlib import Path

import torch

from clipline.checkpoint import resolve_checkpoint
from clipline.config import Config, EvalConfig, EvalDatasetConfig, config_to_yaml
from clipline.dist import pick_device
from clipline.errors import UsageError
from clipline.io import atomic_write_json, atomic_write_text
from clipline.models import ModelBundle, load_checkpoint_model
from eval.datasets import load_samples
from eval.metrics import classification_chance, classification_metrics, retrieval_chance, retrieval_metrics
from eval.zeroshot import encode_images, encode_texts, zero_shot_classifier

log = logging.getLogger(__name__)


def main(cfg: Config) -> int:
    records = run_suite(cfg.eval)
    print(markdown_table(records), flush=True)
    failed = [r for r in records if r.get("error")]
    return 1 if failed and len(failed) == len(records) else 0


def _step_of(checkpoint: Path) -> int | None:
    m = re.match(r"step_(\d+)$", checkpoint.name)
    return int(m.group(1)) if m else None


def evaluate_dataset(bundle: ModelBundle, ds: EvalDatasetConfig, device, batch_size: int) -> list[dict]:
    samples = load_samples(ds)
    model = bundle.model
    image_feats = encode_images(model, bundle.preprocess_val, samples.images, device, batch_size)
    base = {"task": ds.task, "dataset": ds.name, "n_samples": len(samples.images),
            "skipped": sum(samples.skipped.values())}
    if ds.task == "zeroshot_classification":
        classifier = zero_shot_classifier(model, bundle.tokenizer, ds.classnames, ds.templates, device, batch_size)
        labels = torch.tensor(samples.labels)
        metrics = classification_metrics(image_feats @ classifier.T, labels)
        chance = classification_chance(len(ds.classnames))
        per_class = metrics.pop("per_class_recall")
        records = [{**base, "metric": k, "value": v, "chance": chance[k]} for k, v in metrics.items()]
        records += [{**base, "metric": f"recall[{name}]", "value": r, "chance": chance["mean_per_class_recall"]}
                    for name, r in zip(ds.classnames, per_class) if r == r]
        return records
    texts = [t for caps in samples.captions for t in caps]
    text_to_image = torch.tensor([i for i, caps in enumerate(samples.captions) for _ in caps])
    text_feats = encode_texts(model, bundle.tokenizer, texts, device, batch_size)
    metrics = retrieval_metrics(image_feats @ text_feats.T, text_to_image)
    chance = retrieval_chance(text_to_image, len(samples.images))
    return [{**base, "metric": k, "value": v, "chance": chance[k]} for k, v in metrics.items()]


def run_suite(cfg: EvalConfig) -> list[dict]:
    if not cfg.datasets:
        raise UsageError("eval.datasets is empty: list the datasets to evaluate (see configs/demo.yaml)")
    checkpoint = resolve_checkpoint(cfg.checkpoint)
    device = pick_device(cfg.device, 0)
    bundle = load_checkpoint_model(checkpoint, device=device)
    bundle.model.eval()
    step = _step_of(checkpoint)
    records: list[dict] = []
    for ds in cfg.datasets:
        start = time.perf_counter()
        try:
            found = evaluate_dataset(bundle, ds, device, cfg.batch_size)
        except UsageError as e:  # one bad dataset must not cost the results of the others
            log.error("%s", e)
            found = [{"task": ds.task, "dataset": ds.name, "metric": "error", "value": None, "chance": None,
                      "error": str(e)}]
        for r in found:
            r.update(checkpoint=str(checkpoint), step=step, seconds=round(time.perf_counter() - start, 2))
        records += found
    write_results(cfg, records)
    return records


def write_results(cfg: EvalConfig, records: list[dict]) -> None:
    out = Path(cfg.output_dir)
    atomic_write_json(out / "results.json", records)
    buf = io.StringIO()
    fields = ["task", "dataset", "metric", "value", "chance", "checkpoint", "step", "n_samples", "skipped", "error"]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(records)
    atomic_write_text(out / "results.csv", buf.getvalue())
    atomic_write_text(out / "results.md", markdown_table(records))
    atomic_write_text(out / "config.yaml", config_to_yaml(cfg))


def markdown_table(records: list[dict]) -> str:
    """Headline metrics (per-class rows left to the CSV), values in percent with chance beside them."""
    lines = ["| dataset | task | metric | value (%) | chance (%) | x chance |", "|---|---|---|---:|---:|---:|"]
    for r in records:
        if r["metric"].startswith("recall["):
            continue
        if r.get("error"):
            lines.append(f"| {r['dataset']} | {r['task']} | error | {r['error']} | | |")
            continue
        ratio = r["value"] / r["chance"] if r["chance"] else float("nan")
        lines.append(f"| {r['dataset']} | {r['task']} | {r['metric']} | {100 * r['value']:.1f} | "
                     f"{100 * r['chance']:.1f} | {ratio:.1f} |")
    return "\n".join(lines) + "\n"
