"""Filtering existing shards (prep.input_shards): exact and near dedup, decontamination against shard and image
folders, the CLIP-score filter with a tiny model, re-sharding of the survivors; pHash and its index."""

from __future__ import annotations

import io
import itertools
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipline.config import PrepConfig, PrepFilterConfig
from clipline.errors import UsageError
from data_prep.dedup import HammingIndex, first_occurrences, hamming, phash_bytes, phash_image
from data_prep.prep import run_prep

from conftest import TINY_MODEL, make_samples, write_shard


def _reencode(data: bytes, quality: int = 50, size: int | None = None) -> bytes:
    img = Image.open(io.BytesIO(data))
    if size:
        img = img.resize((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """24 distinct scenes + an exact copy of #0 + a re-encoded copy of #1, in 3 shards; 4 eval scenes, two of
    which (#2 resized, #3) are also in training."""
    root = tmp_path_factory.mktemp("corpus")
    base = make_samples(24, seed=11, image_size=48)
    hashes = [phash_bytes(s["jpg"]) for s in base]
    assert min(hamming(a, b) for a, b in itertools.combinations(hashes, 2)) > 6  # the premise: all distinct
    copy = dict(base[0], key="copy0", txt="the first scene again under another name")
    near = dict(base[1], key="near1", jpg=_reencode(base[1]["jpg"], quality=40), txt="a recompressed second scene")
    bad_caption = dict(make_samples(1, seed=12, image_size=48)[0], key="zzboiler", txt="IMG 0042.jpg")
    samples = base + [copy, near, bad_caption]
    random.Random(0).shuffle(samples)
    train = root / "train"
    train.mkdir()
    for i in range(3):
        write_shard(train / f"{i:05d}.tar", samples[i * 9:(i + 1) * 9])
    eval_images = root / "eval_images"
    eval_images.mkdir()
    (eval_images / "a.png").write_bytes(_png(_reencode(base[2]["jpg"], quality=90, size=64)))
    (eval_images / "sub").mkdir()
    (eval_images / "sub" / "b.jpg").write_bytes(base[3]["jpg"])
    eval_shards = root / "eval_shards"
    eval_shards.mkdir()
    write_shard(eval_shards / "00000.tar", [base[3], *make_samples(2, seed=99, image_size=48)])
    return {"train": train, "eval_images": eval_images, "eval_shards": eval_shards, "base": base, "root": root}


def _png(jpeg_bytes: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpeg_bytes)).save(buf, format="PNG")
    return buf.getvalue()


def _read(folder: Path) -> list[dict]:
    out = []
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in sorted(files):
            if name.endswith(".json"):
                key = name[:-5]
                out.append({"key": key, "meta": json.loads(files[name]), "txt": files[key + ".txt"].decode(),
                            "jpg": files[key + ".jpg"]})
    return out


def _funnel(manifest) -> list[tuple]:
    return [(s["stage"], s["count"], s["removed"]) for s in manifest.stats["funnel"]]


def test_filter_existing_shards_dedup_and_decontaminate(corpus, tmp_path):
    out = tmp_path / "clean"
    cfg = PrepConfig(input_shards=str(corpus["train"]), output_dir=str(out), samples_per_shard=10,
                     filters=PrepFilterConfig(near_dedup_distance=4,
                                              decontaminate=[str(corpus["eval_images"]), str(corpus["eval_shards"])]))
    manifest = run_prep(cfg)
    assert _funnel(manifest) == [
        ("read from shards", 27, {}),
        ("caption filters", 26, {"boilerplate_caption": 1}),
        ("decodable", 26, {}),
        ("image size", 26, {}),
        ("exact dedup", 25, {"duplicate_image": 1}),
        ("near dedup", 24, {"near_duplicate_image": 1}),
        ("decontamination", 22, {"near_eval_image": 2}),
        ("written", 22, {}),
    ]
    assert manifest.stats["decontamination"] == {str(corpus["eval_images"]): 2, str(corpus["eval_shards"]): 3}
    assert manifest.sizes == {"00000.tar": 10, "00001.tar": 10, "00002.tar": 2}
    written = _read(out)
    keys = [s["key"] for s in written]
    assert len(set(keys)) == 22
    base = corpus["base"]
    survivors = {s["jpg"] for s in written}
    assert base[2]["jpg"] not in survivors and base[3]["jpg"] not in survivors  # in the eval sets
    # Of each duplicate pair, exactly the one that comes first in (shard, key) order is kept.
    assert sum(s["jpg"] == base[0]["jpg"] for s in written) == 1
    assert all(len(s["meta"]["phash"]) == 16 for s in written)
    assert (out / "report.md").is_file() and json.loads((out / "sizes.json").read_text()) == manifest.sizes


def test_filtering_in_place_is_refused(corpus):
    with pytest.raises(UsageError, match="must differ from prep.input_shards"):
        run_prep(PrepConfig(input_shards=str(corpus["train"]), output_dir=str(corpus["train"])))


def test_decontamination_needs_readable_sets(corpus, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder, message in ((tmp_path / "missing", "does not exist"), (empty, "no readable images")):
        with pytest.raises(UsageError, match=message):
            run_prep(PrepConfig(input_shards=str(corpus["train"]), output_dir=str(tmp_path / "o"),
                                filters=PrepFilterConfig(decontaminate=[str(folder)])))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A randomly initialised tiny open_clip model saved as a weights file: a real checkpoint, no download."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from clipline.models import register_architecture

    torch.manual_seed(0)
    arch = register_architecture(str(TINY_MODEL))
    model = open_clip.create_model(arch)
    path = tmp_path_factory.mktemp("clip") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def test_clip_score_filter_keeps_the_top_fraction_and_records_scores(corpus, tmp_path, tiny_clip):
    from data_prep.clip_score import ClipScorer

    f = dict(clip_model=str(TINY_MODEL), clip_pretrained=tiny_clip, clip_batch_size=7, exact_dedup=False,
             drop_boilerplate=False, clip_precision="fp32")
    top = run_prep(PrepConfig(input_shards=str(corpus["train"]), output_dir=str(tmp_path / "top"),
                              filters=PrepFilterConfig(clip_keep_fraction=0.5, **f)))
    assert _funnel(top)[-2] == ("CLIP score", 14, {"below_clip_top_fraction": 13})  # round(0.5 * 27) kept
    written = _read(tmp_path / "top")
    scorer = ClipScorer(str(TINY_MODEL), tiny_clip, precision="fp32")
    recomputed = scorer.scores([s["jpg"] for s in written], [s["txt"] for s in written])
    assert np.allclose(recomputed, [s["meta"]["clip_score"] for s in written], atol=1e-5)

    # A threshold at the 14th best score keeps exactly the same samples.
    threshold = min(s["meta"]["clip_score"] for s in written) - 1e-6
    by_threshold = run_prep(PrepConfig(input_shards=str(corpus["train"]), output_dir=str(tmp_path / "thr"),
                                       filters=PrepFilterConfig(clip_min_score=threshold, **f)))
    assert by_threshold.total_samples == 14
    assert {s["key"] for s in _read(tmp_path / "thr")} == {s["key"] for s in written}


def test_clip_model_errors_are_clear(corpus, tmp_path):
    with pytest.raises(UsageError, match="clip_pretrained"):
        run_prep(PrepConfig(input_shards=str(corpus["train"]), output_dir=str(tmp_path / "o"),
                            filters=PrepFilterConfig(clip_model=str(TINY_MODEL), clip_min_score=0.1)))


# ------------------------------------------------------------------------------------------------------------
# pHash and the Hamming index


def test_phash_survives_reencoding_and_resizing_but_not_other_images():
    a, b = make_samples(2, seed=4, image_size=64)
    h = phash_bytes(a["jpg"])
    assert hamming(h, phash_bytes(_reencode(a["jpg"], quality=30))) <= 4
    assert hamming(h, phash_bytes(_reencode(a["jpg"], quality=90, size=128))) <= 4
    assert hamming(h, phash_bytes(b["jpg"])) > 10
    assert phash_bytes(b"not an image") is None


def _reference_phash(grey: np.ndarray) -> int:
    # The definition written out with scipy's DCT and np.median (as the imagehash package does, but for the
    # downscaling filter: area averaging instead of Lanczos).
    import cv2
    from scipy.fft import dct

    pixels = cv2.resize(grey.astype(np.float32), (32, 32), interpolation=cv2.INTER_AREA).astype(np.float64)
    low = dct(dct(pixels, axis=0), axis=1)[:8, :8]
    bits = (low > np.median(low)).ravel()
    return int("".join("1" if x else "0" for x in bits), 2)


def _photo(width: int, height: int, seed: int) -> Image.Image:
    from input_pipeline import picture  # benchmarks/: colour fields, hard edges and sensor noise, like a photo

    return Image.open(io.BytesIO(picture(np.random.default_rng(seed), width, height))).convert("RGB")


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_phash_matches_the_reference_definition(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    for i, (w, h) in enumerate([(300, 260), (700, 480), (64, 64), (33, 500)]):
        grey = _photo(w, h, seed=i).convert("L")
        expected = _reference_phash(np.asarray(grey))
        # Lossless input decodes at full size: exactly the definition, from bytes and from a PIL image.
        assert phash_bytes(_encoded(grey, "PNG")) == expected
        assert phash_image(grey) == expected
        # A JPEG decodes at 1/8, 1/4 or 1/2 scale (keeping >= 32 px a side), whose pixels are block means, each
        # weighted by the source area it covers (the last row and column of blocks may be partial): the same
        # average, so only the encoder's loss moves a bit or two.
        assert hamming(phash_bytes(_encoded(grey, "JPEG", quality=95)), expected) <= 2, (w, h)


def test_phash_decodes_a_jpeg_at_the_smallest_scale_that_keeps_32_pixels(monkeypatch):
    import cv2

    import data_prep.dedup as dedup

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    calls = []
    real = cv2.imdecode
    monkeypatch.setattr(dedup.cv2, "imdecode", lambda buf, flags: calls.append(flags) or real(buf, flags))
    for side, scale_flag in [(256, cv2.IMREAD_REDUCED_GRAYSCALE_8), (255, cv2.IMREAD_REDUCED_GRAYSCALE_4),
                             (128, cv2.IMREAD_REDUCED_GRAYSCALE_4), (64, cv2.IMREAD_REDUCED_GRAYSCALE_2),
                             (40, cv2.IMREAD_GRAYSCALE)]:
        calls.clear()
        assert phash_bytes(_encoded(_photo(side, side, seed=side), "JPEG", quality=90)) is not None
        assert calls == [scale_flag | cv2.IMREAD_IGNORE_ORIENTATION], side  # one decode, at that scale
    # The download's writer gives the size it knows (no header parse): the same hash.
    data = _encoded(_photo(300, 256, seed=1), "JPEG", quality=90)
    assert phash_bytes(data, (300, 256)) == phash_bytes(data) is not None
    assert phash_bytes(b"not an image", (300, 256)) is None


def test_phash_of_a_gif_and_of_a_colour_image_agree_with_their_greyscale_png():
    for fmt in ("GIF", "WEBP"):
        img = Image.open(io.BytesIO(make_samples(1, seed=9, image_size=96)[0]["jpg"])).convert("RGB")
        data = _encoded(img, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        decoded = Image.open(io.BytesIO(data)).convert("L")  # GIF: the palette image the file really holds
        assert hamming(phash_bytes(data), phash_bytes(_encoded(decoded, "PNG"))) <= 1, fmt


def test_hamming_index_finds_exactly_the_hashes_within_distance():
    rng = np.random.default_rng(0)
    stored = [int(x) for x in rng.integers(0, 2**63, size=300, dtype=np.int64)]
    queries = stored[:50] + [h ^ (1 << int(rng.integers(64))) ^ (1 << int(rng.integers(64))) for h in stored[50:100]]
    queries += [int(x) for x in rng.integers(0, 2**63, size=50, dtype=np.int64)]
    for d in (0, 2, 5):
        index = HammingIndex(d)
        for h in stored:
            index.add(h)
        for q in queries:
            brute = min(hamming(q, h) for h in stored)
            assert index.nearest_within(q) == (brute if brute <= d else None)


def test_first_occurrences_keeps_the_first_of_each_group():
    assert first_occurrences([0b1111, 0b1110, None, 0b0000_1111_0000, 0b1111], 1).tolist() == [
        True, False, True, True, False]


def test_clip_scorer_loads_a_training_run_folder(tmp_path, tiny_clip):
    from clipline.checkpoint import MARKER, step_dir_name
    from data_prep.clip_score import ClipScorer

    folder = tmp_path / "run" / "checkpoints" / step_dir_name(10)
    folder.mkdir(parents=True)
    model_cfg = json.loads(TINY_MODEL.read_text())
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    (folder / "open_clip_model.safetensors").write_bytes(Path(tiny_clip).read_bytes())
    (folder / MARKER).write_text("")
    samples = make_samples(3, seed=5, image_size=48)
    images, captions = [s["jpg"] for s in samples], [s["txt"] for s in samples]
    from_run = ClipScorer(str(tmp_path / "run"), precision="fp32").scores(images, captions)
    from_file = ClipScorer(str(TINY_MODEL), tiny_clip, precision="fp32").scores(images, captions)
    assert np.allclose(from_run, from_file, atol=1e-5) and np.all(np.abs(from_run) <= 1.0)
