"""Procedural captioned scenes used as demo data for CLIP-style training.

Every image shows ``count`` copies of one object (shape, colour, size) in one
region of the frame over one of a few backgrounds.  Because each attribute is
known exactly, a model trained on these pairs can be probed zero-shot on
colour, shape, size, position, count and background.
"""

from __future__ import annotations

import functools
import math
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

# Chosen so that every pair of colours is far apart in RGB and every colour
# differs clearly from every background tone below.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 30),
    "green": (40, 175, 60),
    "blue": (40, 80, 230),
    "yellow": (245, 225, 40),
    "purple": (150, 55, 200),
    "orange": (245, 130, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}

SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross", "diamond", "heart", "ring",
)
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
COUNTS: tuple[int, ...] = (1, 2, 3)


@dataclass(frozen=True)
class Background:
    """A background pattern; ``tones`` are the only colours it contains."""

    pattern: str  # "plain" | "stripes" | "dots" | "checks"
    tones: tuple[tuple[int, int, int], ...]


# Mid-tone, low-saturation tones only: that keeps both white and black objects
# (and every saturated colour) visible on every background.
BACKGROUNDS: dict[str, Background] = {
    "grey": Background("plain", ((128, 128, 128),)),
    "sand": Background("plain", ((190, 172, 128),)),
    "striped": Background("stripes", ((105, 105, 112), (152, 152, 146))),
    "dotted": Background("dots", ((140, 140, 140), (92, 92, 98))),
    "checkered": Background("checks", ((112, 116, 112), (150, 146, 150))),
}


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    size: str
    position: str
    count: int
    background: str

    def attributes(self) -> dict:
        attrs = asdict(self)
        attrs["count"] = int(attrs["count"])
        return attrs


def sample_scene(rng: random.Random) -> Scene:
    return Scene(
        colour=rng.choice(list(COLOURS)),
        shape=rng.choice(SHAPES),
        size=rng.choice(SIZES),
        position=rng.choice(POSITIONS),
        count=rng.choice(COUNTS),
        background=rng.choice(list(BACKGROUNDS)),
    )


# --------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------

# Drawing at 2x and box-downsampling gives anti-aliased edges, which keeps
# small stars, crosses and rings legible at 64 px.
_SUPERSAMPLE = 2

# Bounding radius as a fraction of the image side.  Large objects shrink a
# little when there are several so that three still fit side by side in a
# half of the frame; they stay >= 2.3x the area of small ones.
_RADIUS_FRACTION = {
    ("small", 1): 0.095, ("small", 2): 0.095, ("small", 3): 0.095,
    ("large", 1): 0.185, ("large", 2): 0.17, ("large", 3): 0.145,
}
_SCALE_JITTER = 0.08
_MAX_ROTATION_DEG = 10.0  # larger angles would turn squares into diamonds
_COLOUR_JITTER = 8
# Copies keep a visible gap (even after anti-aliasing) so they can be counted.
_GAP_FRACTION = 0.03
_PLACEMENT_TRIES = 40
_BACKGROUND_VARIANTS = 4

# Regions as (x0, y0, x1, y1) fractions of the image.
_REGIONS = {
    "left": (0.0, 0.0, 0.5, 1.0),
    "right": (0.5, 0.0, 1.0, 1.0),
    "top": (0.0, 0.0, 1.0, 0.5),
    "bottom": (0.0, 0.5, 1.0, 1.0),
    # Narrower than a quarter-frame so a lone object never drifts far enough
    # to read as "right" or "bottom".
    "center": (0.3, 0.3, 0.7, 0.7),
}


def render_scene(scene: Scene, rng: random.Random, image_size: int = 64) -> Image.Image:
    side = image_size * _SUPERSAMPLE
    variant = rng.randrange(_BACKGROUND_VARIANTS)
    canvas = _background(scene.background, side, variant).copy()
    draw = ImageDraw.Draw(canvas)
    colour = _jitter_colour(COLOURS[scene.colour], rng)
    radius = _RADIUS_FRACTION[(scene.size, scene.count)] * side
    radius *= rng.uniform(1 - _SCALE_JITTER, 1 + _SCALE_JITTER)
    for cx, cy in _place_centres(scene.position, scene.count, radius, side, rng):
        angle = math.radians(rng.uniform(-_MAX_ROTATION_DEG, _MAX_ROTATION_DEG))
        _draw_shape(draw, scene.shape, cx, cy, radius, angle, colour)
    return canvas.reduce(_SUPERSAMPLE)


def _jitter_colour(rgb: tuple[int, int, int], rng: random.Random) -> tuple[int, int, int]:
    return tuple(
        min(255, max(0, c + rng.randint(-_COLOUR_JITTER, _COLOUR_JITTER))) for c in rgb
    )


@functools.lru_cache(maxsize=128)
def _background(name: str, side: int, variant: int) -> Image.Image:
    """Cached so each render costs one copy instead of a pattern rebuild."""
    spec = BACKGROUNDS[name]
    if spec.pattern == "plain":
        return Image.new("RGB", (side, side), spec.tones[0])
    mask = _PATTERNS[spec.pattern](side, variant)
    tones = np.array(spec.tones, dtype=np.uint8)
    return Image.fromarray(tones[mask.astype(np.intp)], "RGB")


def _stripe_mask(side: int, variant: int) -> np.ndarray:
    period = max(2, side // 8)
    y, x = np.mgrid[0:side, 0:side]
    shift = variant * period // _BACKGROUND_VARIANTS
    return ((x + y + shift) // (period // 2)) % 2


def _dot_mask(side: int, variant: int) -> np.ndarray:
    period = max(2, side // 8)
    y, x = np.mgrid[0:side, 0:side]
    shift = variant * period // _BACKGROUND_VARIANTS
    # Offset every other row of dots so the grid reads as texture, not lines.
    row = (y + shift) // period
    dx = (x + shift + (row % 2) * (period // 2)) % period - period / 2
    dy = (y + shift) % period - period / 2
    return (dx * dx + dy * dy) <= (period * 0.17) ** 2


def _check_mask(side: int, variant: int) -> np.ndarray:
    cell = max(1, side // 4)
    y, x = np.mgrid[0:side, 0:side]
    shift = variant * cell // _BACKGROUND_VARIANTS
    return ((x + shift) // cell + (y + shift) // cell) % 2


_PATTERNS = {"stripes": _stripe_mask, "dots": _dot_mask, "checks": _check_mask}


def _place_centres(position: str, count: int, radius: float, side: int,
                   rng: random.Random) -> list[tuple[float, float]]:
    min_dist = 2 * radius + _GAP_FRACTION * side
    x0, y0, x1, y1 = _centre_box(position, count, radius, side)
    for _ in range(_PLACEMENT_TRIES):
        centres = [(rng.uniform(x0, x1), rng.uniform(y0, y1)) for _ in range(count)]
        if _far_apart(centres, min_dist):
            return centres
    # Random placement rarely fits three large objects; use a fixed layout.
    if position == "center":
        return _ring_layout(count, min_dist, side, rng)
    return _line_layout(position, count, radius, min_dist, side, rng)


def _centre_box(position: str, count: int, radius: float,
                side: int) -> tuple[float, float, float, float]:
    """Where object centres may go so that objects stay inside their region."""
    x0, y0, x1, y1 = (f * side for f in _REGIONS[position])
    if position == "center" and count > 1:
        # A group cannot fit inside the centre box; centres stay in it and the
        # objects spill out a little, so the group still sits in the middle.
        return x0, y0, x1, y1
    x_lo, x_hi = _shrink(x0, x1, radius)
    y_lo, y_hi = _shrink(y0, y1, radius)
    return x_lo, y_lo, x_hi, y_hi


def _shrink(lo: float, hi: float, margin: float) -> tuple[float, float]:
    if hi - lo <= 2 * margin:
        mid = (lo + hi) / 2
        return mid, mid
    return lo + margin, hi - margin


def _far_apart(centres: list[tuple[float, float]], min_dist: float) -> bool:
    return all(
        math.dist(a, b) >= min_dist
        for i, a in enumerate(centres) for b in centres[i + 1:]
    )


def _ring_layout(count: int, min_dist: float, side: int,
                 rng: random.Random) -> list[tuple[float, float]]:
    spread = min_dist / (2 * math.sin(math.pi / count))
    start = rng.uniform(0, 2 * math.pi)
    mid = side / 2
    return [
        (mid + spread * math.cos(start + 2 * math.pi * k / count),
         mid + spread * math.sin(start + 2 * math.pi * k / count))
        for k in range(count)
    ]


def _line_layout(position: str, count: int, radius: float, min_dist: float,
                 side: int, rng: random.Random) -> list[tuple[float, float]]:
    """Spread objects evenly along the long side of a half-frame region."""
    x0, y0, x1, y1 = (f * side for f in _REGIONS[position])
    vertical = position in ("left", "right")
    long_lo, long_hi = _shrink(*((y0, y1) if vertical else (x0, x1)), radius)
    short_lo, short_hi = _shrink(*((x0, x1) if vertical else (y0, y1)), radius)
    spacing = (long_hi - long_lo) / (count - 1)
    slack = max(0.0, (spacing - min_dist) / 2)
    centres = []
    for k in range(count):
        # Clamping only pulls the end objects inward, so gaps stay >= min_dist.
        along = long_lo + k * spacing + rng.uniform(-slack, slack)
        along = min(long_hi, max(long_lo, along))
        across = rng.uniform(short_lo, short_hi)
        centres.append((across, along) if vertical else (along, across))
    return centres


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float,
                r: float, angle: float, colour: tuple[int, int, int]) -> None:
    if shape == "circle":
        _ellipse(draw, cx, cy, 0.85 * r, fill=colour)
    elif shape == "ring":
        # A band of ~0.38 r leaves a hole of about half the diameter, which
        # stays open (and so distinct from "circle") even for small rings.
        _ellipse(draw, cx, cy, 0.9 * r, outline=colour, width=max(2, round(0.38 * r)))
    else:
        draw.polygon(_transform(_OUTLINES[shape], cx, cy, r, angle), fill=colour)


def _ellipse(draw: ImageDraw.ImageDraw, cx: float, cy: float, radius: float,
             **style) -> None:
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), **style)


def _transform(outline: tuple[tuple[float, float], ...], cx: float, cy: float,
               r: float, angle: float) -> list[tuple[float, float]]:
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * cos_a - y * sin_a), cy + r * (x * sin_a + y * cos_a))
            for x, y in outline]


def _regular(points: int, radius: float, phase: float) -> tuple[tuple[float, float], ...]:
    return tuple(
        (radius * math.cos(phase + 2 * math.pi * k / points),
         radius * math.sin(phase + 2 * math.pi * k / points))
        for k in range(points)
    )


def _star_outline() -> tuple[tuple[float, float], ...]:
    outer = _regular(5, 1.0, -math.pi / 2)
    inner = _regular(5, 0.42, -math.pi / 2 + math.pi / 5)
    return tuple(p for pair in zip(outer, inner) for p in pair)


def _heart_outline() -> tuple[tuple[float, float], ...]:
    # The classic parametric heart curve, scaled into the unit circle and
    # shifted down so its visual centre sits on the object centre.
    pts = []
    for k in range(32):
        t = 2 * math.pi * k / 32
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x / 17.0, -y / 17.0 + 0.1))
    return tuple(pts)


def _cross_outline(arm: float = 0.9, half_width: float = 0.3) -> tuple[tuple[float, float], ...]:
    a, w = arm, half_width
    return ((-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w),
            (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w))


# Unit outlines inside the bounding circle, y pointing down.
_OUTLINES: dict[str, tuple[tuple[float, float], ...]] = {
    "square": ((-0.7, -0.7), (0.7, -0.7), (0.7, 0.7), (-0.7, 0.7)),
    "triangle": _regular(3, 1.0, -math.pi / 2),
    "star": _star_outline(),
    "cross": _cross_outline(),
    # Taller than wide, so a slightly rotated square never looks like one.
    "diamond": ((0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)),
    "heart": _heart_outline(),
}


# --------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------

# Frame words vary; attribute words never do (zero-shot eval prompts use the
# class names).  {np}: noun phrase, {be}: is/are, {where}: position phrase,
# {bg}: background phrase; the last two may be empty.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of {np}{where}{bg}",
    "an image showing {np}{where}{bg}",
    "there {be} {np}{where}{bg}",
    "a picture with {np}{where}{bg}",
    "{np}{where}{bg}",
    "a drawing of {np}{where}{bg}",
    "this image contains {np}{where}{bg}",
    "{np} {be} visible{where}{bg}",
    "a rendering of {np}{where}{bg}",
    "a simple scene with {np}{where}{bg}",
    "an illustration of {np}{where}{bg}",
)
# Only usable when the caption mentions the position.
_POSITION_FIRST_TEMPLATES: tuple[str, ...] = (
    "{where_lead}, there {be} {np}{bg}",
    "{where_lead}, you can see {np}{bg}",
)

_POSITION_PHRASES = {
    "left": ("on the left", "in the left half", "on the left side", "at the left"),
    "right": ("on the right", "in the right half", "on the right side", "at the right"),
    "top": ("at the top", "in the top half", "near the top", "along the top"),
    "bottom": ("at the bottom", "in the bottom half", "near the bottom", "along the bottom"),
    "center": ("in the center", "in the middle", "at the center", "in the middle of the image"),
}
_BACKGROUND_PHRASES = (
    "on {a} {bg} background", "against {a} {bg} background",
    "with {a} {bg} background", "over {a} {bg} backdrop",
)
_NUMBER_WORDS = {1: ("one", "a single"), 2: ("two",), 3: ("three",)}
_UNCOUNTED_PLURAL = ("some ", "")
_MENTION_PROBABILITY = 0.65  # per optional attribute: most captions name several


def caption_scene(scene: Scene, rng: random.Random) -> str:
    mention = {k: rng.random() < _MENTION_PROBABILITY
               for k in ("size", "position", "count", "background")}
    fields = {
        "np": _noun_phrase(scene, rng, mention["size"], mention["count"]),
        "be": "are" if scene.count > 1 else "is",
        "where": "",
        "bg": "",
    }
    if mention["background"]:
        fields["bg"] = " " + _background_phrase(scene.background, rng)
    templates = CAPTION_TEMPLATES
    if mention["position"]:
        where = rng.choice(_POSITION_PHRASES[scene.position])
        fields["where"], fields["where_lead"] = " " + where, where
        templates = CAPTION_TEMPLATES + _POSITION_FIRST_TEMPLATES
    return rng.choice(templates).format(**fields)


def captions_for_scene(scene: Scene, rng: random.Random, n: int, *,
                       exclude: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """``n`` distinct captions, none in ``exclude``; ValueError if none found."""
    captions: list[str] = []
    for _ in range(20 * n + 20):
        caption = caption_scene(scene, rng)
        if caption not in exclude and caption not in captions:
            captions.append(caption)
            if len(captions) == n:
                return captions
    raise ValueError(f"could not find {n} distinct allowed captions for {scene}")


def _noun_phrase(scene: Scene, rng: random.Random, with_size: bool, with_count: bool) -> str:
    words = [scene.size] if with_size else []
    words += [scene.colour, _plural(scene.shape) if scene.count > 1 else scene.shape]
    phrase = " ".join(words)
    if with_count:
        return f"{_number_word(scene.count, phrase, rng)} {phrase}"
    if scene.count == 1:
        return f"{_article(phrase)} {phrase}"
    return rng.choice(_UNCOUNTED_PLURAL) + phrase


def _number_word(count: int, phrase: str, rng: random.Random) -> str:
    options = _NUMBER_WORDS[count]
    if count == 1:
        options = options + (_article(phrase),)
    return rng.choice(options)


def _background_phrase(background: str, rng: random.Random) -> str:
    return rng.choice(_BACKGROUND_PHRASES).format(a=_article(background), bg=background)


def _article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "sh", "ch")) else "s")


# --------------------------------------------------------------------------
# Writing a split
# --------------------------------------------------------------------------

_IMAGE_FORMATS = {"png": ("png", "PNG", {}), "jpg": ("jpg", "JPEG", {"quality": 95}),
                  "jpeg": ("jpg", "JPEG", {"quality": 95})}
_MAX_SCENE_TRIES = 50
SAMPLES_FILE = "samples.parquet"


def write_demo_split(out_dir: str | Path, *, n: int, seed: int, image_size: int = 64,
                     captions_per_image: int = 1,
                     exclude_captions: set[str] | frozenset[str] = frozenset(),
                     image_format: str = "png") -> Path:
    """Write ``n`` images plus ``samples.parquet``; returns the parquet path.

    Each row has its own RNG seeded from (seed, row), so a split is fully
    deterministic and a smaller ``n`` yields a prefix of a larger one.
    """
    out_dir = Path(out_dir)
    ext, pil_format, save_kwargs = _IMAGE_FORMATS[image_format.lower()]
    parquet_path = out_dir / SAMPLES_FILE
    # A stale index could point at images we are about to overwrite.
    parquet_path.unlink(missing_ok=True)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        rng = random.Random(f"{seed}:{i}")
        scene, captions = _sample_row(rng, captions_per_image, exclude_captions)
        rel_path = f"images/{i:06d}.{ext}"
        render_scene(scene, rng, image_size).save(out_dir / rel_path, pil_format, **save_kwargs)
        rows.append({"path": rel_path, "caption": "\n".join(captions),
                     **scene.attributes(), "uid": f"{seed}-{i}"})
    _write_parquet_atomic(_samples_frame(rows), parquet_path)
    return parquet_path


def all_captions(parquet_path: str | Path) -> set[str]:
    captions = pd.read_parquet(parquet_path, columns=["caption"])["caption"]
    return {line for text in captions for line in text.split("\n")}


def _sample_row(rng: random.Random, n_captions: int,
                exclude: set[str] | frozenset[str]) -> tuple[Scene, list[str]]:
    for _ in range(_MAX_SCENE_TRIES):
        scene = sample_scene(rng)
        try:
            return scene, captions_for_scene(scene, rng, n_captions, exclude=exclude)
        except ValueError:
            continue  # this scene's captions are all excluded; try another
    raise RuntimeError("exclude_captions rules out nearly every caption")


_COLUMNS = ("path", "caption", "colour", "shape", "size", "position", "count",
            "background", "uid")


def _samples_frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(_COLUMNS))
    frame["count"] = frame["count"].astype("int64")
    return frame


def _write_parquet_atomic(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
