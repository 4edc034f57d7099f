"""report.md and its plots: the funnel (listed -> downloaded -> after each filter -> written), the problems found
in the list with examples, why downloads failed, and histograms of what was written (the funnel drawn with PIL, the
histograms with matplotlib)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from clipline.shards import ShardManifest

log = logging.getLogger(__name__)

FUNNEL_PNG = "report_funnel.png"
CAPTIONS_PNG = "report_caption_length.png"
RESOLUTION_PNG = "report_resolution.png"


def _title(reason: str) -> str:
    return reason.replace("_", " ")


def render_report(m: ShardManifest) -> str:
    s = m.stats
    lines = [f"# Shards built from {m.source}", "", f"{m.total_samples} samples in {len(m.shards)} shards.", ""]
    funnel = s.get("funnel", [])
    if funnel:
        lines += ["## Funnel", "", "| stage | samples | removed here, by reason |", "|---|---:|---|"]
        for stage in funnel:
            removed = ", ".join(f"{_title(k)}: {v}" for k, v in stage["removed"].items()) or ""
            lines.append(f"| {stage['stage']} | {stage['count']} | {removed} |")
        lines.append("")
    # The download counts in img2dataset's terms, kept for readers of earlier reports; the last two rows are the
    # funnel's: downloads that the filters after download (dedup, image size, ...) removed, and what was written.
    if "success" in s:
        written = s.get("written", m.total_samples)
        lines += ["| download | count |", "|---|---:|",
                  f"| rows in the URL list | {s.get('rows_in', 0)} |",
                  f"| failed to download | {s.get('failed_to_download', 0)} |",
                  f"| failed to decode/resize | {s.get('failed_to_resize', 0)} |",
                  f"| downloaded | {s.get('success', 0)} |",
                  f"| removed after download by the filters | {s.get('success', 0) - written} |",
                  f"| written | {written} |", ""]
    if any((s.get("politeness") or {}).values()):
        p = s["politeness"]
        lines += [f"Polite crawling: {p['throttled']} requests waited for a per-host slot; {p['retry_after']} "
                  f"429/503 answers' Retry-After honoured; {p['retry_after_too_long']} given up (Retry-After over "
                  f"prep.max_retry_after). Final HTTP failures are in the failure table.", ""]
    if s.get("content_type_not_image"):
        lines += [f"Images served with a Content-Type that is not an image type (kept: the bytes decide; "
                  f"prep.check_content_type=true refuses them): {s['content_type_not_image']}.", ""]
    if s.get("captionless"):
        lines += ["The URL list has no captions (a bare-URL .txt list): every sample carries an empty .txt and no "
                  "caption filter ran.", ""]
    if s.get("removed_captions"):
        lines += ["## Most common captions removed by the caption filters", ""]
        for reason, examples in s["removed_captions"].items():
            lines.append(f"- {_title(reason)}: " + ", ".join(f"{c!r} ({n})" for c, n in examples))
        lines.append("")
    if s.get("list_issues"):
        lines += ["## Problems in the URL list (rows dropped before download)", ""]
        lines += [f"- {_title(reason)}: {i['count']} (first: {', '.join(repr(e) for e in i['examples'])})"
                  for reason, i in s["list_issues"].items()]
        lines.append("")
    if s.get("failure_reasons"):
        lines += ["## Download failures (most common messages first)", ""]
        lines += [f"- {reason}: {n}" for reason, n in s["failure_reasons"].items()]
        lines.append("")
    if s.get("decontamination"):
        lines += ["## Decontamination sets", ""]
        lines += [f"- {folder}: {n} images" for folder, n in s["decontamination"].items()]
        lines.append("")
    if s.get("curation"):
        from data_prep.curate import report_lines

        lines += ["## Curation", ""] + report_lines(s)
    plots = [p for p in (FUNNEL_PNG, CAPTIONS_PNG, RESOLUTION_PNG) if p in s.get("plots", [])]
    if plots:
        lines += ["## Plots", ""] + [f"![{p[len('report_'):-4].replace('_', ' ')}]({p})" for p in plots] + [""]
    if s.get("timings"):
        lines += ["Time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in s["timings"].items()), ""]
    return "\n".join(lines)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the bitmap font, one size
        return ImageFont.load_default()


def _funnel_png(path: Path, title: str, labels: list[str], values: list[float]) -> None:
    """Horizontal bars drawn with PIL, one per stage, each labelled with its stage and count."""
    from PIL import Image, ImageDraw

    from clipline.io import atomic_write

    font, small = _font(14), _font(11)
    top = max(max(values, default=0), 1)
    left, row = 170, 26
    width, height = 760, 50 + row * len(labels)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), title, fill="black", font=font)
    span = width - left - 90
    for i, (label, value) in enumerate(zip(labels, values)):
        y = 40 + i * row
        draw.text((10, y + 3), label[:24], fill="black", font=small)
        draw.rectangle([left, y, left + max(1, int(span * value / top)), y + row - 6], fill="#4c72b0")
        draw.text((left + int(span * value / top) + 6, y + 3), f"{value:g}", fill="black", font=small)
    atomic_write(path, lambda p: img.save(p, format="PNG"))


def _histogram_png(path: Path, title: str, values: np.ndarray, bins: int, xlabel: str) -> None:
    """A histogram of integer values, with whole-number ticks on both axes and axis titles (matplotlib's Agg
    canvas, no display). One bar per value while there are at most ``bins`` distinct values to span."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from clipline.io import atomic_write

    values = np.asarray(values, dtype=float)
    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    ax = fig.subplots()
    if len(values):
        low, high = float(values.min()), float(values.max())
        edges = np.arange(low - 0.5, high + 1.5) if high - low < bins else bins
        ax.hist(values, bins=edges, color="#55a868", edgecolor="white", linewidth=0.5)
        if high - low < 10:  # e.g. every image the same size: whole-number ticks need some room around the bar
            middle = (low + high) / 2
            ax.set_xlim(middle - 6, middle + 6)
        ax.axvline(float(np.median(values)), color="0.3", linestyle="--", linewidth=1,
                   label=f"median {np.median(values):g}")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no samples written", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel("samples", fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))


def write_plots(out: Path, funnel: list[dict], caption_words: np.ndarray, widths: np.ndarray,
                heights: np.ndarray) -> list[str]:
    """The three PNGs beside report.md: the funnel, caption lengths and original image sizes of what was written."""
    _funnel_png(out / FUNNEL_PNG, "funnel: samples left after each stage", [s["stage"] for s in funnel],
                [s["count"] for s in funnel])
    _histogram_png(out / CAPTIONS_PNG, "caption length of written samples", caption_words, 50,
                   "caption length (words)")
    sides = np.minimum(widths, heights) if len(widths) else np.zeros(0)
    _histogram_png(out / RESOLUTION_PNG, "resolution of written samples, before resize", sides, 40,
                   "shorter image side (pixels)")
    return [FUNNEL_PNG, CAPTIONS_PNG, RESOLUTION_PNG]
