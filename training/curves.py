"""Training curves as PNGs in the run folder, drawn from its metrics.jsonl, so they can be redrawn at any time.

``curves.png``: loss, learning rate, logit scale and throughput over steps. ``eval_curves.png``, when the run
logged in-loop evals (train.eval_every): one panel per metric, one line per dataset. During training the trainer
redraws through ``CurveWriter``, at most once per train.curves_every_s of wall time and once at the end; after the
fact, ``plot_run(run_dir)`` (or ``python -m training.curves RUN_DIR``) draws the same files.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

from clipline.io import atomic_write

log = logging.getLogger(__name__)

TRAIN_PNG = "curves.png"
EVAL_PNG = "eval_curves.png"
TRAIN_PANELS = (("loss", "loss"), ("lr", "learning rate"), ("logit_scale", "logit scale (exp)"),
                ("samples_per_s", "samples / s"))
MIN_REDRAW_S = 30.0
"""A redraw costs ~0.1-0.3 s of CPU (measured on the demo run, see tests/test_curves.py): at most one per 30 s
keeps it under 1% of a run's time."""


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a line cut short by a crash is skipped, not fatal."""
    records = []
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append(record)
    return records


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in records
              if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [s for s, _ in points], [v for _, v in points]


def _new_figure(n_panels: int, n_cols: int, legend_width: float = 0.0):
    from matplotlib.figure import Figure  # Agg canvas, no pyplot: no global state, never a display

    n_rows = -(-n_panels // n_cols)
    width, height = 4.2 * n_cols + legend_width, 2.9 * n_rows + 0.5
    fig = Figure(figsize=(width, height), dpi=100)
    # Fixed margins (inches): a layout engine measures every label at each draw and tripled the cost of a redraw.
    fig.subplots_adjust(left=0.6 / width, right=1 - (0.2 + legend_width) / width, bottom=0.5 / height, top=1 - 0.65 / height,
                        wspace=0.3, hspace=0.45)
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes


def _style(ax, title: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=10)
    ax.set_xlabel("training step", fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useMathText=True)


def _line(ax, steps: list[float], values: list[float], **kwargs) -> None:
    ax.plot(steps, values, marker="o" if len(steps) <= 30 else None, markersize=3, linewidth=1.2, **kwargs)


def _save(fig, path: Path) -> Path:
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    return path


def plot_training(records: list[dict], path: Path) -> Path | None:
    panels = [(key, title, _series(records, key)) for key, title in TRAIN_PANELS]
    panels = [p for p in panels if p[2][0]]
    if not panels:
        return None
    fig, axes = _new_figure(len(panels), n_cols=2)
    for ax, (key, title, (steps, values)) in zip(axes, panels):
        _line(ax, steps, values, color="#4c72b0")
        _style(ax, title)
    last = records[-1]
    fig.suptitle(f"step {last['step']}" + (f", {last['samples_seen']:,} samples seen" if "samples_seen" in last
                                           else ""), fontsize=10)
    return _save(fig, path)


def eval_series(records: list[dict]) -> dict[str, dict[str, tuple[list, list]]]:
    """{metric: {dataset: (steps, values)}} from the ``eval/DATASET/METRIC`` keys the trainer logs."""
    keys = sorted({k for r in records for k in r if k.startswith("eval/") and k.count("/") >= 2})
    out: dict[str, dict[str, tuple[list, list]]] = defaultdict(dict)
    for key in keys:
        _, rest = key.split("/", 1)
        dataset, metric = rest.rsplit("/", 1)
        out[metric][dataset] = _series(records, key)
    return dict(out)


def _metric_order(metric: str) -> tuple:
    """Classification metrics first, then retrieval by direction and k."""
    first = ("top1", "top5", "mean_per_class_recall")
    return (first.index(metric), "") if metric in first else (len(first), metric.split("@")[0],
                                                              int(metric.split("@")[1]) if "@" in metric else 0)


def plot_evals(records: list[dict], path: Path) -> Path | None:
    series = eval_series(records)
    if not series:
        return None
    from matplotlib import colormaps

    datasets = sorted({d for by_dataset in series.values() for d in by_dataset})
    palette = colormaps["tab10"].colors  # one colour per dataset in every panel, one legend for all
    colour = {d: palette[i % len(palette)] for i, d in enumerate(datasets)}
    fig, axes = _new_figure(len(series), n_cols=min(3, len(series)), legend_width=1.9)
    handles = {}
    for ax, metric in zip(axes, sorted(series, key=_metric_order)):
        for dataset, (steps, values) in sorted(series[metric].items()):
            _line(ax, steps, [100 * v for v in values], color=colour[dataset], label=dataset)
            handles[dataset] = ax.lines[-1]
        _style(ax, f"{metric} (%)")
        ax.set_ylim(bottom=0)  # flat curves stay flat instead of being stretched over the panel
    fig.legend([handles[d] for d in datasets], datasets, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(f"in-loop eval (train.eval_every), up to step {records[-1]['step']}", fontsize=10)
    return _save(fig, path)


def _last_eval_step(records: list[dict]) -> float | None:
    return max((r["step"] for r in records if any(k.startswith("eval/") for k in r)), default=None)


def plot_run(run_dir: str | Path, skip_evals_through: float | None = None) -> list[Path]:
    """(Re)draw the run's curves from its metrics.jsonl; returns the PNGs written (none before the first log).
    eval_curves.png is left as it is when no eval was logged after step ``skip_evals_through``."""
    run_dir = Path(run_dir)
    records = sorted(read_metrics(run_dir / "metrics.jsonl"), key=lambda r: r["step"])
    if not records:
        return []
    written = [plot_training(records, run_dir / TRAIN_PNG)]
    last_eval = _last_eval_step(records)
    if last_eval is not None and (skip_evals_through is None or last_eval > skip_evals_through):
        written.append(plot_evals(records, run_dir / EVAL_PNG))
    return [p for p in written if p is not None]


class CurveWriter:
    """Redraws a run's curves as training goes: at most once per ``min_interval_s``, and at the end. A failure to
    draw (no matplotlib, a full disk) is logged once and never stops training.

    With ``background`` (the trainer's setting) the periodic redraws run in a thread, so the training loop never
    waits on matplotlib (about 0.3-1 s a redraw on a CPU); a redraw still running when the next one is due is not
    queued. The final redraw waits for it and then draws in the caller's thread. matplotlib's Figure API (no pyplot)
    keeps no global state, so the thread shares nothing with the loop but metrics.jsonl, which it only reads."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, min_interval_s: float = MIN_REDRAW_S,
                 background: bool = False):
        self.run_dir, self.enabled, self.min_interval_s = Path(run_dir), enabled, min_interval_s
        self.background = background
        self.last_draw = time.monotonic()  # the first redraw after min_interval_s: a short run draws once, at the end
        self.evals_drawn_through: float | None = None
        self.seconds: list[float] = []
        """Time each redraw took, for the record."""
        self._thread: threading.Thread | None = None

    def update(self, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not final and now - self.last_draw < self.min_interval_s:
            return
        if final:
            self.wait()
        elif self._thread is not None and self._thread.is_alive():
            return  # the previous redraw is still running: skip this one
        self.last_draw = now
        if self.background and not final:
            self._thread = threading.Thread(target=self._draw, name="clipline-curves", daemon=True)
            self._thread.start()
        else:
            self._draw()

    def wait(self) -> None:
        """Block until a background redraw in progress has finished."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _draw(self) -> None:
        if not self.enabled:
            return
        start = time.monotonic()
        try:
            # eval panels only when a new eval was logged: with every metric of every dataset they cost the most
            written = plot_run(self.run_dir, skip_evals_through=self.evals_drawn_through)
            if any(p.name == EVAL_PNG for p in written):
                self.evals_drawn_through = _last_eval_step(read_metrics(self.run_dir / "metrics.jsonl"))
        except Exception as e:  # curves are a convenience; the run matters more
            log.warning("training curves not drawn (%s: %s); training goes on without them", type(e).__name__, e)
            self.enabled = False
            return
        self.seconds.append(time.monotonic() - start)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m training.curves RUN_DIR  (a folder with metrics.jsonl)", file=sys.stderr)
        return 2
    if not (Path(argv[0]) / "metrics.jsonl").is_file():
        print(f"error: {argv[0]}/metrics.jsonl does not exist: give the train.output_dir of a run", file=sys.stderr)
        return 2
    for path in plot_run(argv[0]):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
