"""What `clipline demo` promises, checked by the demo itself: after eval it writes demo_summary.json beside
results.json (headline metrics, the precision each stage used, steps, wall time per stage, the CPU's bf16
capability) and prints PASS/FAIL per promised minimum; a missed minimum makes the demo exit non-zero.

DEMO_MINIMUMS is the one place the promised numbers live (the README quotes them; tests read them here).
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import yaml

from clipline import storage
from clipline.io import atomic_write_json


@dataclass(frozen=True)
class Minimum:
    dataset: str
    metric: str
    above: float
    """The value must be strictly above this (a fraction: 0.9 is 90%)."""
    label: str


DEMO_MINIMUMS = (
    Minimum("demo-colour", "top1", 0.90, "colour top-1"),
    Minimum("demo-shape", "top1", 0.40, "shape top-1"),
    Minimum("demo-retrieval", "image_to_text_R@5", 0.90, "image->text R@5"),
)
SUMMARY = "demo_summary.json"
EXIT_MINIMUM_MISSED = 3
"""`clipline demo`'s exit code when every stage ran but a promised minimum was missed."""


def headline_metrics(records: list[dict]) -> dict[str, dict[str, float | None]]:
    """{dataset: {metric: value}} without the per-class rows; an errored dataset maps to {'error': message}."""
    out: dict[str, dict] = {}
    for r in records:
        if r["metric"].startswith("recall["):
            continue
        out.setdefault(r["dataset"], {})[r["metric"]] = r.get("error") or r["value"]
    return out


def check_minimums(metrics: dict[str, dict], minimums=DEMO_MINIMUMS) -> list[dict]:
    """One row per minimum: what was found (None when the metric is missing) and whether it passes."""
    rows = []
    for m in minimums:
        value = metrics.get(m.dataset, {}).get(m.metric)
        ok = isinstance(value, (int, float)) and value > m.above
        rows.append({"label": m.label, "dataset": m.dataset, "metric": m.metric, "minimum": m.above,
                     "value": value if isinstance(value, (int, float)) else None, "passed": ok})
    return rows


def check_line(row: dict) -> str:
    found = "missing" if row["value"] is None else f"{100 * row['value']:.1f}%"
    return (f"{'PASS' if row['passed'] else 'FAIL'}  {row['label']}: {found} "
            f"(promised > {100 * row['minimum']:.0f}%; {row['dataset']} {row['metric']})")


def cpu_info() -> dict:
    """What decides bf16's speed on this CPU: the model name, the bf16-related flags, torch's kernel level and
    the kernel caps in the environment."""
    import torch

    from clipline.precision import cpu_flags, cpu_native_bf16

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    native, why = cpu_native_bf16()
    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16"})
    return {"model": model or platform.processor(), "cores": len(os.sched_getaffinity(0)) if hasattr(
                os, "sched_getaffinity") else os.cpu_count(),
            "flags": flags, "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "env_caps": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA")
                         if k in os.environ},
            "native_bf16": native, "native_bf16_reason": why}


def _train_precision(train_dir: str | Path) -> str | None:
    """The precision the training run used, from its saved (resolved) config (a bucket run folder too)."""
    path = storage.join(train_dir, "config.yaml")
    if not storage.isfile(path):
        return None
    return (yaml.safe_load(storage.read_text(path)) or {}).get("train", {}).get("precision")


def write_summary(eval_dir: str | Path, train_dir: str | Path, stage_seconds: dict[str, float], steps: int) -> dict:
    """Read results.json (and the training run's config), write demo_summary.json, return the summary. Either
    folder may be in a bucket (storage locations); the summary is then put there in one whole-object write."""
    records = json.loads(storage.read_text(storage.join(eval_dir, "results.json")))
    metrics = headline_metrics(records)
    eval_precisions = sorted({r.get("precision") for r in records if r.get("precision")})
    summary = {
        "metrics": metrics,
        "minimums": check_minimums(metrics),
        "precision": {"train": _train_precision(train_dir),
                      "eval": eval_precisions[0] if len(eval_precisions) == 1 else eval_precisions or None},
        "steps": steps,
        "stage_seconds": {k: round(v, 1) for k, v in stage_seconds.items()},
        "total_seconds": round(sum(stage_seconds.values()), 1),
        "cpu": cpu_info(),
    }
    target = storage.join(eval_dir, SUMMARY)
    if storage.is_remote(target):
        storage.write_text(target, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    else:
        atomic_write_json(target, summary)
    return summary


def report(summary: dict) -> int:
    """Print a PASS/FAIL line per minimum; 0 when all pass, EXIT_MINIMUM_MISSED otherwise."""
    for row in summary["minimums"]:
        print(check_line(row), flush=True)
    return 0 if all(row["passed"] for row in summary["minimums"]) else EXIT_MINIMUM_MISSED
