import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data_prep import demo_scenes as ds
from data_prep.demo_scenes import (
    BACKGROUNDS, CAPTION_TEMPLATES, COLOURS, COUNTS, POSITIONS, SHAPES, SIZES, Scene,
    all_captions, caption_scene, captions_for_scene, render_scene, sample_scene,
    write_demo_split,
)

N_SPLIT = 300
GREY = np.array(BACKGROUNDS["grey"].tones[0])


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    return write_demo_split(tmp_path_factory.mktemp("a"), n=N_SPLIT, seed=0)


def _split_bytes(parquet: Path) -> dict[str, bytes]:
    root = parquet.parent
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    return files


def _object_mask(image: Image.Image) -> np.ndarray:
    """Pixels clearly different from the plain grey background."""
    diff = np.abs(np.asarray(image, dtype=np.int16) - GREY).max(axis=2)
    return diff > 40


def _grey_scene(rng: random.Random, **fixed) -> Scene:
    attrs = sample_scene(rng).attributes() | {"background": "grey"} | fixed
    return Scene(**attrs)


# ---------------------------------------------------------------- split files

def test_same_seed_gives_byte_identical_split(split, tmp_path):
    again = write_demo_split(tmp_path, n=N_SPLIT, seed=0)
    assert _split_bytes(again) == _split_bytes(split)


def test_different_seed_gives_different_split(split, tmp_path):
    other = write_demo_split(tmp_path, n=N_SPLIT, seed=1)
    a, b = _split_bytes(split), _split_bytes(other)
    assert a.keys() == b.keys()
    differing = sum(a[k] != b[k] for k in a if k.startswith("images/"))
    assert differing == N_SPLIT
    assert a["samples.parquet"] != b["samples.parquet"]


def test_parquet_columns_and_dtypes(split):
    frame = pd.read_parquet(split)
    assert list(frame.columns) == ["path", "caption", "colour", "shape", "size",
                                   "position", "count", "background", "uid"]
    assert frame["count"].dtype == np.int64
    for col in ["path", "caption", "colour", "shape", "size", "position", "background", "uid"]:
        assert all(isinstance(v, str) for v in frame[col]), col
    assert frame["uid"].is_unique and frame["uid"].iloc[7] == "0-7"
    assert frame["path"].iloc[123] == "images/000123.png"
    assert len(frame) == N_SPLIT


def test_rows_match_their_images_and_attributes(split):
    frame = pd.read_parquet(split)
    for row in frame.head(40).itertuples():
        with Image.open(split.parent / row.path) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (64, 64)
        assert row.colour in COLOURS and row.shape in SHAPES and row.size in SIZES
        assert row.position in POSITIONS and row.count in COUNTS
        assert row.background in BACKGROUNDS
        assert row.colour in row.caption and row.shape in row.caption


def test_image_size_and_jpeg_format(tmp_path):
    parquet = write_demo_split(tmp_path, n=4, seed=3, image_size=40, image_format="jpg")
    frame = pd.read_parquet(parquet)
    assert all(p.endswith(".jpg") for p in frame["path"])
    for rel in frame["path"]:
        with Image.open(tmp_path / rel) as im:
            assert im.format == "JPEG" and im.size == (40, 40)


def test_every_attribute_value_appears(split):
    frame = pd.read_parquet(split)
    expected = {"colour": set(COLOURS), "shape": set(SHAPES), "size": set(SIZES),
                "position": set(POSITIONS), "count": set(COUNTS),
                "background": set(BACKGROUNDS)}
    for column, values in expected.items():
        assert set(frame[column]) == values, column


def test_smaller_split_is_prefix_of_larger(split, tmp_path):
    small = write_demo_split(tmp_path, n=10, seed=0)
    pd.testing.assert_frame_equal(pd.read_parquet(small), pd.read_parquet(split).head(10))


def test_captions_per_image_gives_distinct_lines(tmp_path):
    frame = pd.read_parquet(write_demo_split(tmp_path, n=60, seed=5, captions_per_image=3))
    for row in frame.itertuples():
        lines = row.caption.split("\n")
        assert len(lines) == 3 and len(set(lines)) == 3
        assert all(row.colour in line and row.shape in line for line in lines)
    assert len(all_captions(tmp_path / "samples.parquet")) > 100


def test_exclude_captions_is_honoured(split, tmp_path):
    banned = all_captions(split)
    unrestricted = all_captions(write_demo_split(tmp_path / "free", n=N_SPLIT, seed=9))
    assert unrestricted & banned, "seeds chosen so that overlap happens without exclusion"
    restricted = write_demo_split(tmp_path / "held", n=N_SPLIT, seed=9, captions_per_image=2,
                                  exclude_captions=banned)
    assert not all_captions(restricted) & banned


def test_all_captions_splits_lines(tmp_path):
    frame = pd.read_parquet(write_demo_split(tmp_path, n=5, seed=2, captions_per_image=2))
    expected = {line for text in frame["caption"] for line in text.split("\n")}
    assert all_captions(tmp_path / "samples.parquet") == expected
    assert len(expected) >= 9 and all("\n" not in c for c in expected)


def test_crash_leaves_no_parquet(tmp_path, monkeypatch):
    write_demo_split(tmp_path, n=3, seed=0)
    calls = Counter()

    def failing_render(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("simulated crash")
        return render_scene(*args, **kwargs)

    monkeypatch.setattr(ds, "render_scene", failing_render)
    with pytest.raises(RuntimeError, match="simulated"):
        write_demo_split(tmp_path, n=10, seed=1)
    assert not (tmp_path / "samples.parquet").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["images"]


# ---------------------------------------------------------------- captions

def _template_regex(template: str) -> re.Pattern:
    pieces = re.split(r"(\{\w+\})", template)
    slots = {"{np}": ".+?", "{be}": "(?:is|are)", "{where}": ".*?", "{bg}": ".*?"}
    return re.compile("".join(slots.get(p, re.escape(p)) for p in pieces) + "$")


def _template_of(caption: str) -> str | None:
    """The most specific public template (most literal text) matching a caption."""
    matches = [t for t in CAPTION_TEMPLATES if _template_regex(t).match(caption)]
    return max(matches, key=lambda t: len(re.sub(r"\{\w+\}", "", t)), default=None)


def test_captions_name_colour_and_shape_and_vary():
    rng = random.Random(0)
    captions, templates = set(), Counter()
    for _ in range(2000):
        scene = sample_scene(rng)
        caption = caption_scene(scene, rng)
        assert scene.colour in caption and scene.shape in caption, caption
        captions.add(caption)
        templates[_template_of(caption)] += 1
    assert len([t for t in templates if t is not None]) >= 8
    assert len(captions) > 1500


def test_captions_mention_several_attributes_usually():
    rng = random.Random(1)
    optional_counts = []
    for _ in range(500):
        scene = sample_scene(rng)
        caption = caption_scene(scene, rng)
        mentioned = [scene.size in caption, scene.background in caption,
                     any(w in caption for w in ("one ", "single", "two ", "three "))]
        optional_counts.append(sum(mentioned))
    assert np.mean(np.array(optional_counts) >= 1) > 0.8


def test_number_words_articles_and_plurals():
    rng = random.Random(2)
    seen = Counter()
    for _ in range(300):
        crosses = caption_scene(Scene("red", "cross", "large", "left", 3, "grey"), rng)
        assert "crosses" in crosses and "one " not in crosses and "two " not in crosses
        seen["three"] += "three red crosses" in crosses or "three large red crosses" in crosses
        orange = caption_scene(Scene("orange", "ring", "small", "top", 1, "sand"), rng)
        assert "rings" not in orange and " a orange" not in orange and not orange.startswith("a orange")
        seen["an orange"] += "an orange ring" in orange
        seen["one"] += "one small orange ring" in orange or "one orange ring" in orange
        two = caption_scene(Scene("blue", "star", "small", "center", 2, "dotted"), rng)
        seen["two"] += "two " in two
        seen["middle"] += "in the middle" in two
    assert all(seen[k] > 10 for k in ("three", "an orange", "one", "two", "middle")), seen


def test_captions_for_scene_are_distinct_and_respect_exclude():
    rng = random.Random(3)
    scene = Scene("green", "heart", "small", "bottom", 2, "striped")
    first = captions_for_scene(scene, rng, 5)
    assert len(first) == 5 and len(set(first)) == 5
    more = captions_for_scene(scene, rng, 5, exclude=set(first))
    assert not set(more) & set(first)


# ---------------------------------------------------------------- rendering

def test_colours_stay_visible_on_every_background():
    for name, background in BACKGROUNDS.items():
        for tone in background.tones:
            for colour, rgb in COLOURS.items():
                distance = np.linalg.norm(np.subtract(rgb, tone))
                assert distance > 90, (colour, name, tone)


def test_renders_are_rgb_and_never_repeat():
    scene = Scene("red", "square", "small", "center", 1, "striped")
    rng = random.Random(4)
    images = [render_scene(scene, rng) for _ in range(20)]
    assert all(im.mode == "RGB" and im.size == (64, 64) for im in images)
    assert len({im.tobytes() for im in images}) == 20
    assert render_scene(scene, rng, image_size=96).size == (96, 96)


def test_small_objects_cover_far_fewer_pixels_than_large():
    rng = random.Random(5)
    area = {size: [] for size in SIZES}
    for _ in range(150):
        for size in SIZES:
            scene = _grey_scene(rng, size=size)
            area[size].append(_object_mask(render_scene(scene, rng)).sum() / scene.count)
    assert min(area["small"]) > 20, "small objects must still be visible"
    assert np.mean(area["large"]) > 2.5 * np.mean(area["small"])


@pytest.mark.parametrize("position", POSITIONS)
def test_object_centroid_lies_in_named_region(position):
    rng = random.Random(6)
    for _ in range(60):
        mask = _object_mask(render_scene(_grey_scene(rng, position=position), rng))
        ys, xs = np.nonzero(mask)
        cx, cy = xs.mean() / 64, ys.mean() / 64
        inside = {
            "left": cx < 0.5, "right": cx > 0.5, "top": cy < 0.5, "bottom": cy > 0.5,
            "center": 0.3 < cx < 0.7 and 0.3 < cy < 0.7,
        }[position]
        assert inside, (position, cx, cy)


def _count_blobs(mask: np.ndarray) -> int:
    seen = np.zeros_like(mask)
    blobs = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        blobs += 1
        stack = [start]
        seen[start] = True
        while stack:
            y, x = stack.pop()
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] \
                        and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return blobs


@pytest.mark.parametrize("count", COUNTS)
def test_count_copies_do_not_merge(count):
    rng = random.Random(7)
    for _ in range(40):
        scene = _grey_scene(rng, shape="circle", count=count)
        assert _count_blobs(_object_mask(render_scene(scene, rng))) == count, scene
