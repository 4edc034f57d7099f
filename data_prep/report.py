"""report.md and its plots: the funnel (listed -> downloaded -> after each filter -> written), the problems found
in the list with examples, why downloads failed, and histograms of what was written (the funnel drawn with PIL, the
histograms too, so a build does not import matplotlib)."""

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


def _nice_ticks(low: float, high: float, target: int = 6) -> list[int]:
    """Whole-number ticks 1, 2 or 5 x 10^k apart covering [low, high], about ``target`` of them."""
    span = max(high - low, 1.0)
    step = 1
    for magnitude in (10 ** k for k in range(0, 12)):
        step = next((m * magnitude for m in (1, 2, 5) if span / (m * magnitude) <= target), 0)
        if step:
            break
    first = int(np.ceil(low / step) * step)
    return list(range(first, int(high) + 1, step))


def _histogram_png(path: Path, title: str, values: np.ndarray, bins: int, xlabel: str) -> None:
    """A histogram of integer values drawn with PIL: whole-number ticks on both axes, axis titles and the median as a
    dashed line. One bar per value while there are at most ``bins`` distinct values to span, else ``bins`` equal
    bins. (PIL, not matplotlib: importing and laying out matplotlib took ~0.9 s of every build.)"""
    from PIL import Image, ImageDraw

    from clipline.io import atomic_write

    font, small = _font(13), _font(11)
    width, height = 640, 360
    left, right, top, bottom = 62, 20, 34, 52
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 8), title, fill="black", font=font)
    x0, x1, y0, y1 = left, width - right, top, height - bottom  # plot area; y grows downwards
    draw.text(((x0 + x1) // 2 - 6 * len(xlabel) // 2, height - 20), xlabel, fill="black", font=small)
    label = Image.new("RGB", (70, 14), "white")
    ImageDraw.Draw(label).text((0, 0), "samples", fill="black", font=small)
    img.paste(label.rotate(90, expand=True), (4, (y0 + y1) // 2 - 35))
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        draw.rectangle([x0, y0, x1, y1], outline="#999999")
        draw.text(((x0 + x1) // 2 - 50, (y0 + y1) // 2), "no samples written", fill="black", font=small)
        atomic_write(path, lambda p: img.save(p, format="PNG"))
        return
    low, high = float(values.min()), float(values.max())
    edges = np.arange(low - 0.5, high + 1.5) if high - low < bins else np.linspace(low, high, bins + 1)
    counts, edges = np.histogram(values, bins=edges)
    lo_x, hi_x = float(edges[0]), float(edges[-1])
    if high - low < 10:  # e.g. every image the same size: give the bars room and whole-number ticks around them
        middle = (low + high) / 2
        lo_x, hi_x = middle - 6, middle + 6
    top_y = max(int(counts.max()), 1) * 1.05

    def px(x: float) -> float:
        return x0 + (x - lo_x) / (hi_x - lo_x) * (x1 - x0)

    def py(y: float) -> float:
        return y1 - y / top_y * (y1 - y0)

    for t in _nice_ticks(0, top_y):
        draw.line([x0, py(t), x1, py(t)], fill="#e6e6e6")
        text = f"{t:,}"
        draw.text((x0 - 8 - 6 * len(text), py(t) - 6), text, fill="black", font=small)
    for count, a, b in zip(counts, edges[:-1], edges[1:]):
        if count:
            gap = 2 if px(b) - px(a) > 6 else 0  # a white line between wide bars, as between matplotlib's
            draw.rectangle([round(px(a)), py(count), max(round(px(a)), round(px(b)) - 1 - gap), y1], fill="#55a868")
    for t in _nice_ticks(np.ceil(lo_x), np.floor(hi_x)):
        draw.line([px(t), y1, px(t), y1 + 4], fill="black")
        draw.text((px(t) - 3 * len(str(t)), y1 + 6), str(t), fill="black", font=small)
    draw.rectangle([x0, y0, x1, y1], outline="black")
    median = float(np.median(values))
    for y in range(int(y0), int(y1), 8):  # dashed
        draw.line([px(median), y, px(median), min(y + 4, y1)], fill="#4d4d4d")
    draw.text((x1 - 110, y0 + 4), f"median {median:g}", fill="#4d4d4d", font=small)
    atomic_write(path, lambda p: img.save(p, format="PNG"))


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
