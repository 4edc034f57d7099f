"""report.md and its plots: the funnel (listed -> downloaded -> after each filter -> written), the problems found
in the list with examples, why downloads failed, and histograms of what was written (PNGs drawn with PIL)."""

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
    # The download counts in img2dataset's terms, kept for readers of earlier reports.
    if "success" in s:
        lines += ["| download | count |", "|---|---:|",
                  f"| rows in the URL list | {s.get('rows_in', 0)} |",
                  f"| downloaded and written | {s.get('success', 0)} |",
                  f"| failed to download | {s.get('failed_to_download', 0)} |",
                  f"| failed to decode/resize | {s.get('failed_to_resize', 0)} |", ""]
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


def _bars_png(path: Path, title: str, labels: list[str], values: list[float], horizontal: bool,
              x_caption: str = "") -> None:
    """A plain bar chart drawn with PIL: no plotting library to install or import for three small figures."""
    from PIL import Image, ImageDraw

    from clipline.io import atomic_write

    font, small = _font(14), _font(11)
    top = max(max(values, default=0), 1)
    if horizontal:
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
    else:
        left, bottom = 60, 40
        width, height = 640, 320
        img = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(img)
        draw.text((10, 8), title, fill="black", font=font)
        plot_h, plot_w = height - bottom - 40, width - left - 20
        bar = plot_w / max(len(values), 1)
        for i, value in enumerate(values):
            h = int(plot_h * value / top)
            draw.rectangle([left + i * bar, height - bottom - h, left + (i + 1) * bar - 1, height - bottom],
                           fill="#55a868")
        draw.line([left, height - bottom, width - 20, height - bottom], fill="black")
        draw.line([left, 40, left, height - bottom], fill="black")
        draw.text((5, 40), f"{top:g}", fill="black", font=small)
        if labels:
            draw.text((left, height - bottom + 4), labels[0], fill="black", font=small)
            draw.text((width - 20 - 8 * len(labels[-1]), height - bottom + 4), labels[-1], fill="black", font=small)
        draw.text((left + plot_w // 2 - 4 * len(x_caption), height - 18), x_caption, fill="black", font=small)
    atomic_write(path, lambda p: img.save(p, format="PNG"))


def _histogram(values: np.ndarray, bins: int) -> tuple[list[str], list[float]]:
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return [], []
    counts, edges = np.histogram(values, bins=bins)
    return [f"{edges[0]:g}", f"{edges[-1]:g}"], counts.tolist()


def write_plots(out: Path, funnel: list[dict], caption_words: np.ndarray, widths: np.ndarray,
                heights: np.ndarray) -> list[str]:
    """The three PNGs beside report.md: the funnel, caption lengths and original image sizes of what was written."""
    _bars_png(out / FUNNEL_PNG, "funnel: samples left after each stage", [s["stage"] for s in funnel],
              [s["count"] for s in funnel], horizontal=True)
    n_words = int(np.max(caption_words)) + 1 if len(caption_words) else 1
    labels, counts = _histogram(caption_words, bins=min(50, max(5, n_words)))
    _bars_png(out / CAPTIONS_PNG, "caption length of written samples (words)", labels, counts, horizontal=False,
              x_caption="words")
    sides = np.minimum(widths, heights) if len(widths) else np.zeros(0)
    labels, counts = _histogram(sides, bins=40)
    _bars_png(out / RESOLUTION_PNG, "resolution of written samples: shorter side before resize (pixels)", labels,
              counts, horizontal=False, x_caption="pixels")
    return [FUNNEL_PNG, CAPTIONS_PNG, RESOLUTION_PNG]
