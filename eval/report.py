"""Results of a suite on disk: results.json (tidy records), results.csv, results.md, and with several checkpoints
of one run a table and a PNG plot of each metric over training steps."""

from __future__ import annotations

import csv
import importlib.util
import io
import logging
import re
from collections import defaultdict
from pathlib import Path

from clipline import storage
from clipline.config import EvalConfig, config_to_yaml
from clipline.io import atomic_write, atomic_write_json, atomic_write_text
from eval.remote import results_folder, upload_results

log = logging.getLogger(__name__)

CSV_FIELDS = ["task", "dataset", "metric", "value", "chance", "checkpoint", "step", "n_samples", "skipped",
              "seconds", "error"]


def is_headline(record: dict) -> bool:
    """Per-class rows stay in the JSON and CSV; tables and plots show the headline metrics."""
    return not record["metric"].startswith("recall[")


def write_results(cfg: EvalConfig, records: list[dict]) -> list[Path | str]:
    """Write the results files (each atomically) and return the plots. A bucket output_dir gets them through a
    local mirror (storage.cache_dir/eval/...), uploaded with results.json last; other objects there are kept."""
    out = results_folder(cfg.output_dir)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(records)
    atomic_write_text(out / "results.csv", buf.getvalue())
    atomic_write_text(out / "results.md", markdown_table(records))
    # A location's user:password@ never reaches the saved config.
    atomic_write_text(out / "config.yaml", storage.redact(config_to_yaml(cfg)))
    plots = plot_over_steps(records, out / "plots")
    atomic_write_json(out / "results.json", records)
    if not storage.is_remote(cfg.output_dir):
        return plots
    written = [out / n for n in ("results.csv", "results.md", "config.yaml", "results.json")] + plots
    uploaded = upload_results(out, cfg.output_dir, written)
    return [storage.redact(u) for u in uploaded if u.endswith(".png")]


def _checkpoints(records: list[dict]) -> list[tuple[str, int | None]]:
    seen: dict[str, int | None] = {}
    for r in records:
        seen.setdefault(r.get("checkpoint", ""), r.get("step"))
    return list(seen.items())


def markdown_table(records: list[dict]) -> str:
    """One checkpoint: value and chance per metric, in percent. Several: one column per checkpoint (by step)."""
    if len(_checkpoints(records)) > 1:
        return _comparison_table(records)
    lines = ["| dataset | task | metric | value (%) | chance (%) | x chance |", "|---|---|---|---:|---:|---:|"]
    for r in records:
        if not is_headline(r):
            continue
        if r.get("error"):
            lines.append(f"| {r['dataset']} | {r['task']} | error | {_cell(r['error'])} | | |")
            continue
        ratio = r["value"] / r["chance"] if r["chance"] else float("nan")
        lines.append(f"| {r['dataset']} | {r['task']} | {r['metric']} | {100 * r['value']:.1f} | "
                     f"{100 * r['chance']:.1f} | {ratio:.1f} |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _column_names(ckpts: list[tuple[str, int | None]]) -> dict[str, str]:
    """'step N' for the checkpoints of one run; otherwise the shortest unambiguous tail of each path."""
    for name in (lambda c, s: f"step {s}" if s is not None else None,
                 lambda c, s: "/".join(Path(c).parts[-2:]),
                 lambda c, s: c):
        names = {c: name(c, s) for c, s in ckpts}
        if None not in names.values() and len(set(names.values())) == len(names):
            return names
    return {c: c for c, _ in ckpts}


def _comparison_table(records: list[dict]) -> str:
    ckpts = sorted(_checkpoints(records), key=lambda c: (c[1] is None, c[1] or 0))
    column = _column_names(ckpts)
    rows: dict[tuple, dict] = defaultdict(dict)
    chance: dict[tuple, float] = {}
    for r in records:
        if not is_headline(r):
            continue
        key = (r["dataset"], r["task"], r["metric"])
        rows[key][r.get("checkpoint", "")] = r
        if r.get("chance") is not None:
            chance[key] = r["chance"]
    header = "| dataset | task | metric | chance (%) | " + " | ".join(column[c] for c, _ in ckpts) + " |"
    lines = [header, "|---|---|---|---:|" + "---:|" * len(ckpts)]
    for key, by_ckpt in rows.items():
        cells = []
        for name, _ in ckpts:
            r = by_ckpt.get(name)
            cells.append("" if r is None else "error" if r.get("error") else f"{100 * r['value']:.1f}")
        c = f"{100 * chance[key]:.1f}" if key in chance else ""
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {c} | " + " | ".join(cells) + " |")
    errors = [r for r in records if r.get("error")]
    if errors:
        lines += ["", "Errors:", ""] + [f"- {column.get(r.get('checkpoint', ''), '')}, {r['dataset']}: {r['error']}"
                                        for r in errors]
    return "\n".join(lines) + "\n"


def plot_over_steps(records: list[dict], folder: Path) -> list[Path]:
    """One PNG per metric (one line per dataset; each chance level a dashed grey line labelled with its datasets)
    when it was measured at 2+ steps."""
    series: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    chance: dict[tuple[str, str], float] = {}
    for r in records:
        if is_headline(r) and not r.get("error") and r.get("step") is not None:
            series[r["metric"]][r["dataset"]].append((r["step"], r["value"]))
            chance[(r["metric"], r["dataset"])] = r["chance"]
    over_steps = {m: d for m, d in series.items() if max(len({s for s, _ in p}) for p in d.values()) >= 2}
    if not over_steps:
        return []
    if importlib.util.find_spec("matplotlib") is None:  # the tables are written anyway; plots are an extra
        log.warning("matplotlib is not installed: no plots over steps (pip install matplotlib)")
        return []
    return [_plot_metric(metric, by_dataset, chance, folder) for metric, by_dataset in over_steps.items()]


def _plot_metric(metric: str, by_dataset: dict, chance: dict, folder: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    levels: dict[float, list[str]] = defaultdict(list)  # one dashed line per chance level, naming its datasets
    for dataset, points in sorted(by_dataset.items()):
        points = sorted(points)
        ax.plot([s for s, _ in points], [100 * v for _, v in points], marker="o", label=dataset)
        if chance.get((metric, dataset)) is not None:
            levels[round(100 * chance[(metric, dataset)], 6)].append(dataset)
    for level, datasets in sorted(levels.items()):
        # Datasets with equal chance share one line: drawn once, it cannot hide behind another dataset's colour.
        ax.axhline(level, color="0.35", linestyle="--", linewidth=1, zorder=1)
        ax.annotate(f"chance {level:.3g}%: {', '.join(datasets)}", xy=(0.01, level), xycoords=("axes fraction", "data"),
                    xytext=(0, 2), textcoords="offset points", fontsize=7, color="0.25", va="bottom")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"{metric} over training (dashed: chance level)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    fig.tight_layout()
    path = folder / (re.sub(r"[^A-Za-z0-9_.-]+", "_", metric.replace("@", "_at_")) + ".png")
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return path
