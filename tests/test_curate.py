"""The curation filters of `clipline prep`: MetaCLIP balancing, semantic dedup (SemDeDup) and the DataComp
image-based cluster filter, on generated data whose truth is known."""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipline.cli import main as clipline
from clipline.config import PrepConfig, PrepFilterConfig
from clipline.errors import UsageError
from data_prep.balance import Matcher, decide, draw, keep_probability
from data_prep.clusters import assign, clusters_near_classes, dedup_cluster, fit_centroids, preference
from data_prep.prep import run_prep

from conftest import TINY_MODEL, require_or_skip, write_shard

try:
    import ahocorasick  # noqa: F401
    import faiss  # noqa: F401
    HAVE_DEPS = True
except ImportError:
    HAVE_DEPS = False


@pytest.fixture(autouse=True)
def _deps():
    require_or_skip(HAVE_DEPS, "the curation filters need pyahocorasick and faiss-cpu (pip install pyahocorasick "
                               "faiss-cpu)")


def _jpg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _field(rng: np.random.Generator) -> Image.Image:
    """A smooth random colour field: distinct fields are far apart, and survive crops and re-encoding."""
    return Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((64, 64), Image.Resampling.BICUBIC)


def _sample(key: str, image: bytes, caption: str) -> dict:
    return {"key": key, "jpg": image, "txt": caption, "json": {}}


def _written(folder: Path) -> list[str]:
    import tarfile

    keys = []
    for tar in sorted(folder.glob("[0-9]*.tar")):
        with tarfile.open(tar) as t:
            keys += [m.name.split(".")[0] for m in t.getmembers() if m.name.endswith(".txt")]
    return keys


def _stage(manifest, name: str) -> dict:
    return next(s for s in manifest.stats["funnel"] if s["stage"] == name)


# ------------------------------------------------------------------------------------------------------------
# Balancing


def test_matching_finds_whole_word_entries_once_per_caption():
    m = Matcher(["cat", "red cat", "dog"])
    assert m.match("A red cat and a cat") == [0, 1]
    assert m.match("concatenate the dogma") == []          # mutation: whole_words ignored -> [0, 2]
    assert Matcher(["cat"], whole_words=False).match("concatenate") == [0]
    assert m.count(["cat cat", "Red Cat", "dog"]) == Counter({0: 2, 1: 1, 2: 1})


def test_keep_probability_is_one_minus_product():
    counts = np.array([40, 40, 5])
    assert keep_probability([0, 1], counts, t=20) == pytest.approx(0.75)  # 1 - (1 - .5)(1 - .5)
    assert keep_probability([2], counts, t=20) == 1.0                      # rare entry: p = min(1, t / count)
    assert keep_probability([], counts, t=20) == 0.0


def test_each_entry_keeps_min_count_t_in_expectation_and_an_exact_seeded_set():
    counts_by_entry = {"alpha": 200, "bravo": 50, "charlie": 12, "delta": 3}
    captions = [f"a photo of {e} number {i}" for e, n in counts_by_entry.items() for i in range(n)]
    keys = [f"k{i:05d}" for i in range(len(captions))]
    m = Matcher(list(counts_by_entry))
    counts = np.array(list(counts_by_entry.values()))
    t = 20
    kept_per_entry = np.zeros(len(counts))
    seeds = 200
    for seed in range(seeds):
        keep, matched, kept_counts = decide(m, captions, keys, counts, t, seed, keep_unmatched=False)
        assert matched.all()
        kept_per_entry += [kept_counts[i] for i in range(len(counts))]
        if seed == 0:
            # The draw depends on the seed and the key only: shuffling the samples keeps the same set.
            order = list(range(len(keys)))
            random.Random(1).shuffle(order)
            shuffled, _, _ = decide(m, [captions[i] for i in order], [keys[i] for i in order], counts, t, 0, False)
            assert {keys[i] for i, k in zip(order, shuffled) if k} == {k for k, kk in zip(keys, keep) if kk}
            assert [draw(0, k) < min(1, t / counts_by_entry[c.split()[3]]) for k, c in zip(keys, captions)] \
                == keep.tolist()
    mean = kept_per_entry / seeds
    # Entries at or under t keep every caption exactly; above t, min(count, t) = t in expectation (the mean over
    # 200 seeds of Binomial(200, 0.1) has a standard deviation of 0.3). Mutation: p = t / count without the cap
    # keeps delta's captions with p > 1 (still all), but p = t / sum(counts) fails every line.
    assert mean[2:].tolist() == [12, 3]
    assert mean[0] == pytest.approx(20, abs=1.5) and mean[1] == pytest.approx(20, abs=1.5)


def _balance_shards(root: Path) -> dict[str, str]:
    """60 samples in 4 shards; captions: 36 name 'alpha', 16 'bravo', 6 'charlie', 2 nothing in the list."""
    rng = np.random.default_rng(3)
    words = ["alpha"] * 36 + ["bravo"] * 16 + ["charlie"] * 6 + ["zulu"] * 2
    random.Random(2).shuffle(words)
    samples = [_sample(f"s{i:04d}", _jpg(_field(rng)), f"a picture of {w} number {i}") for i, w in enumerate(words)]
    root.mkdir()
    for s in range(4):
        write_shard(root / f"{s:05d}.tar", samples[s * 15:(s + 1) * 15])
    return {s["key"]: s["txt"].split()[3] for s in samples}


def test_balance_in_prep_gives_the_same_kept_set_with_one_or_two_processes(tmp_path):
    truth = _balance_shards(tmp_path / "in")
    (tmp_path / "entries.txt").write_text("alpha\nbravo\ncharlie\n\nalpha\n")
    f = PrepFilterConfig(balance_entries=str(tmp_path / "entries.txt"), balance_t=8, balance_seed=7)
    runs = {}
    for processes in (1, 2):
        m = run_prep(PrepConfig(input_shards=str(tmp_path / "in"), output_dir=str(tmp_path / f"p{processes}"),
                                processes=processes, samples_per_shard=10, filters=f))
        runs[processes] = _written(tmp_path / f"p{processes}")
    assert runs[1] == runs[2]  # mutation: a draw from a shared RNG stream (order-dependent) fails here
    count = Counter(truth.values())
    expected = sorted(k for k, e in truth.items() if e != "zulu" and draw(7, k) < min(1.0, 8 / count[e]))
    assert sorted(runs[1]) == expected
    assert {truth[k] for k in runs[1]} >= {"charlie"} and sum(truth[k] == "charlie" for k in runs[1]) == 6
    stage = _stage(m, "balance")
    assert stage["removed"] == {"no_metadata_match": 2, "balanced_out": 58 - len(expected)}
    report = (tmp_path / "p2" / "report.md").read_text()
    assert "| alpha | 36 |" in report and "## Metadata balancing (MetaCLIP)" in report


def test_balance_entries_errors_are_clear(tmp_path):
    with pytest.raises(UsageError, match="balance_entries: .*nope.txt is not a file"):
        run_prep(PrepConfig(input_shards=str(tmp_path), output_dir=str(tmp_path / "o"),
                            filters=PrepFilterConfig(balance_entries=str(tmp_path / "nope.txt"))))
    with pytest.raises(UsageError, match="need prep.filters.embed_model"):
        PrepFilterConfig(semantic_dedup=True).validate()


# ------------------------------------------------------------------------------------------------------------
# Semantic dedup


def test_dedup_cluster_keeps_one_representative_by_the_rule():
    x = np.array([[1, 0, 0], [0.999, 0.045, 0], [0.998, 0, 0.063], [0, 1, 0]], dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    by_centroid = preference(np.array([0.9, 0.95, 0.8, 0.1]), None, np.arange(4))
    keep, pairs = dedup_cluster(x, by_centroid, eps=0.01)
    assert keep.tolist() == [False, True, False, True]   # #1 is closest to the centroid: it represents #0 and #2
    assert [(a, b) for a, b, _ in pairs] == [(1, 0), (1, 2)]
    by_score = preference(np.array([0.9, 0.95, 0.8, 0.1]), np.array([0.1, 0.2, 0.3, 0.0]), np.arange(4))
    keep, _ = dedup_cluster(x, by_score, eps=0.01)
    assert keep.tolist() == [False, False, True, True]   # mutation: ranking by lowest score keeps #0 instead
    keep, _ = dedup_cluster(x, by_centroid, eps=0.0001)
    assert keep.all()


def _semantic_samples() -> tuple[list[dict], list[str], list[str]]:
    """12 distinct colour fields, and 4 near copies of the first (crop, rescale, JPEG q35, colour shift), shuffled;
    the keys of the 11 other distinct fields, and of the group of 5 (the first field and its copies)."""
    rng = np.random.default_rng(0)
    fields = [_field(rng) for _ in range(12)]
    base = fields[0]
    shifted = Image.fromarray(np.clip(np.asarray(base).astype(int) + [6, -4, 3], 0, 255).astype(np.uint8))
    copies = [_jpg(base.crop((2, 2, 62, 62)).resize((64, 64))), _jpg(base.resize((96, 96))), _jpg(base, 35),
              _jpg(shifted)]
    samples = [_sample(f"d{i:03d}", _jpg(img), f"a colour field number {i}") for i, img in enumerate(fields)]
    samples += [_sample(f"n{i:03d}", data, f"another view number {i}") for i, data in enumerate(copies)]
    random.Random(4).shuffle(samples)
    return samples, [f"d{i:03d}" for i in range(1, 12)], ["d000"] + [f"n{i:03d}" for i in range(4)]


def _semantic_shards(root: Path) -> tuple[list[str], list[str]]:
    samples, distinct, group = _semantic_samples()
    root.mkdir()
    for s in range(2):
        write_shard(root / f"{s:05d}.tar", samples[s * 8:(s + 1) * 8])
    return distinct, group


def test_semantic_dedup_removes_near_copies_and_keeps_distinct_images(tmp_path):
    distinct, group = _semantic_shards(tmp_path / "in")
    f = PrepFilterConfig(exact_dedup=False, semantic_dedup=True, embed_model="thumbnail:8", semdedup_eps=0.1,
                         semdedup_clusters=3)
    m = run_prep(PrepConfig(input_shards=str(tmp_path / "in"), output_dir=str(tmp_path / "out"), filters=f))
    written = set(_written(tmp_path / "out"))
    # Mutation: comparing against 1 + eps (or eps) instead of 1 - eps removes nothing / everything: both fail.
    assert written >= set(distinct) and len(written & set(group)) == 1
    assert _stage(m, "semantic dedup")["removed"] == {"semantic_duplicate": 4}
    pairs = [json.loads(line) for line in (tmp_path / "out" / "semdedup_pairs.jsonl").read_text().splitlines()]
    kept = (written & set(group)).pop()
    assert sorted(p["removed"] for p in pairs) == sorted(set(group) - {kept})
    assert {p["kept"] for p in pairs} == {kept} and all(p["cosine"] > 0.9 for p in pairs)
    assert m.stats["curation"]["embeddings"] == {"model": "thumbnail:8", "computed": 16, "reused": 0}

    # A second run reuses the cached embeddings and gives the same result.
    again = run_prep(PrepConfig(input_shards=str(tmp_path / "in"), output_dir=str(tmp_path / "out"), filters=f))
    assert again.stats["curation"]["embeddings"]["reused"] == 16
    assert set(_written(tmp_path / "out")) == written


def test_semantic_dedup_during_a_build(tmp_path):
    """The same truth through a real download: img2dataset fetches from a loopback server, the per-sample filters
    write into _curate/shards, semantic dedup removes the copies and the survivors are re-sharded."""
    import pandas as pd

    from data_prep.serve import LocalImageServer

    samples, distinct, group = _semantic_samples()
    (tmp_path / "www").mkdir()
    for s in samples:
        (tmp_path / "www" / f"{s['key']}.jpg").write_bytes(s["jpg"])
    with LocalImageServer(tmp_path / "www") as server:
        pd.DataFrame({"url": [server.url_for(f"{s['key']}.jpg") for s in samples],
                      "caption": [s["txt"] for s in samples],
                      "name": [s["key"] for s in samples]}).to_parquet(tmp_path / "urls.parquet")
        f = PrepFilterConfig(exact_dedup=False, semantic_dedup=True, embed_model="thumbnail:8", semdedup_eps=0.1,
                             semdedup_clusters=3)
        m = run_prep(PrepConfig(url_list=str(tmp_path / "urls.parquet"), output_dir=str(tmp_path / "out"),
                                image_size=64, processes=1, threads=4, samples_per_shard=6,
                                allow_private_networks=True, filters=f))
    assert _stage(m, "semantic dedup")["removed"] == {"semantic_duplicate": 4}
    assert m.total_samples == 12 and sorted(m.sizes.values()) == [6, 6]
    pairs = [json.loads(line) for line in (tmp_path / "out" / "semdedup_pairs.jsonl").read_text().splitlines()]
    names = _names(tmp_path / "out")
    assert set(names.values()) >= set(distinct) and len(set(names.values()) & set(group)) == 1
    assert len(pairs) == 4 and not list((tmp_path / "out" / "_curate" / "shards").glob("*.tar"))


def _names(folder: Path) -> dict[str, str]:
    """key -> the 'name' column carried into each written sample's .json."""
    import tarfile

    out = {}
    for tar in sorted(folder.glob("[0-9]*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".json"):
                    out[m.name.split(".")[0]] = json.loads(t.extractfile(m).read())["name"]
    return out


# ------------------------------------------------------------------------------------------------------------
# Cluster filter


def test_cluster_filter_keeps_the_clusters_near_the_class_names():
    rng = np.random.default_rng(0)
    axes = np.eye(8, dtype=np.float32)
    x = np.concatenate([axes[a] + 0.05 * rng.standard_normal((20, 8)).astype(np.float32) for a in range(4)])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    centroids = fit_centroids(x, clusters=4, iterations=20, seed=0)
    cluster, _ = assign(x, centroids)
    classes = np.stack([axes[1] + 0.3 * axes[5], axes[3]])
    classes /= np.linalg.norm(classes, axis=1, keepdims=True)
    chosen = clusters_near_classes(centroids, classes, nearest=1)
    kept = np.flatnonzero(np.isin(cluster, chosen))
    # Mutation: the farthest clusters (argsort ascending) keep blobs 0 and 2 instead.
    assert kept.tolist() == list(range(20, 40)) + list(range(60, 80))
    assert len(clusters_near_classes(centroids, classes, nearest=4)) == 4


@pytest.fixture(scope="module")
def tiny_clip_folder(tmp_path_factory):
    """A randomly initialised tiny open_clip model as ARCH:WEIGHTS: a real checkpoint, no download."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from clipline.models import register_architecture

    torch.manual_seed(0)
    model = open_clip.create_model(register_architecture(str(TINY_MODEL)))
    path = tmp_path_factory.mktemp("clip") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return f"{TINY_MODEL}:{path}"


def test_cli_runs_all_three_filters_with_a_real_checkpoint(tmp_path, tiny_clip_folder):
    """Exact copies are duplicates under any model (cosine 1), so the count is exact even for random weights."""
    rng = np.random.default_rng(1)
    images = [_jpg(_field(rng)) for _ in range(10)]
    samples = [_sample(f"s{i:03d}", img, f"a red circle number {i}") for i, img in enumerate(images)]
    samples += [_sample(f"c{i:03d}", images[i], f"a blue square copy {i}") for i in range(3)]
    (tmp_path / "in").mkdir()
    write_shard(tmp_path / "in" / "00000.tar", samples)
    out = tmp_path / "out"
    code = clipline(["prep", f"prep.input_shards={tmp_path / 'in'}", f"prep.output_dir={out}",
                     "prep.filters.exact_dedup=false", "prep.filters.semantic_dedup=true",
                     f"prep.filters.embed_model={tiny_clip_folder}", "prep.filters.semdedup_eps=0.000001",
                     "prep.filters.semdedup_clusters=2", "prep.filters.cluster_filter_classnames=[cifar10]",
                     "prep.filters.cluster_filter_clusters=2", "prep.filters.cluster_filter_nearest=2",
                     "prep.filters.balance_entries=demo", "prep.filters.balance_t=1000"])
    assert code == 0
    stats = json.loads((out / "stats.json").read_text())
    stages = {s["stage"]: s for s in stats["funnel"]}
    assert stages["semantic dedup"]["removed"] == {"semantic_duplicate": 3}
    assert stages["cluster filter"]["removed"] == {}   # 2 nearest of 2 clusters: every cluster is kept
    assert stages["balance"]["removed"] == {} and stages["written"]["count"] == 10
    pairs = [json.loads(line) for line in (out / "semdedup_pairs.jsonl").read_text().splitlines()]
    assert sorted((p["kept"][1:], p["removed"][1:]) for p in pairs) == [("000", "000"), ("001", "001"),
                                                                          ("002", "002")]
    report = (out / "report.md").read_text()
    assert "| semantic dedup | 10 | semantic duplicate: 3 |" in report and "Cluster filter: 2 of 2" in report


def test_semantic_dedup_keeps_the_highest_clip_score_of_a_group(tmp_path, tiny_clip_folder):
    """semdedup_keep=clip_score: of the 5 near copies, the one the CLIP-score filter scored highest is kept (not the
    one closest to the centroid, which the default rule keeps)."""
    from data_prep.clip_score import ClipScorer

    samples, distinct, group = _semantic_samples()
    _semantic_shards(tmp_path / "in")
    weights = tiny_clip_folder[len(str(TINY_MODEL)) + 1:]
    by_key = {s["key"]: s for s in samples}
    scores = ClipScorer(str(TINY_MODEL), weights, precision="fp32").scores(
        [by_key[k]["jpg"] for k in group], [by_key[k]["txt"] for k in group])
    best = group[int(np.argmax(scores))]
    kept = {}
    for rule in ("clip_score", "centroid"):
        scoring = dict(clip_model=str(TINY_MODEL), clip_pretrained=weights, clip_min_score=-1.0,
                       clip_precision="fp32") if rule == "clip_score" else {}
        f = PrepFilterConfig(exact_dedup=False, semantic_dedup=True, embed_model="thumbnail:8", semdedup_eps=0.1,
                             semdedup_clusters=3, semdedup_keep=rule, **scoring)
        m = run_prep(PrepConfig(input_shards=str(tmp_path / "in"), output_dir=str(tmp_path / rule), filters=f))
        assert _stage(m, "semantic dedup")["removed"] == {"semantic_duplicate": 4}
        written = set(_written(tmp_path / rule))
        assert written >= set(distinct)
        (kept[rule],) = written & set(group)
    # Mutation: ranking by the lowest score (or ignoring the scores) keeps another copy.
    assert kept["clip_score"] == best and kept["centroid"] != best
    pairs = [json.loads(line) for line in (tmp_path / "clip_score" / "semdedup_pairs.jsonl").read_text().splitlines()]
    assert {p["kept"] for p in pairs} == {best}


def test_curation_runs_over_the_parts_of_a_prep_job_array(tmp_path):
    """The step after `sbatch --array` (docs/cluster.md): prep.input_shards names the parts' folders with a brace
    pattern, and the near copies are found across parts (the group of 5 is spread over both)."""
    samples, distinct, group = _semantic_samples()
    for p in range(2):
        (tmp_path / f"part-{p}").mkdir()
        write_shard(tmp_path / f"part-{p}" / "00000.tar", samples[p * 8:(p + 1) * 8])
    assert {s["key"] for s in samples[:8]} & set(group) and {s["key"] for s in samples[8:]} & set(group)
    code = clipline(["prep", f"prep.input_shards={tmp_path}/part-{{0..1}}", f"prep.output_dir={tmp_path / 'out'}",
                     "prep.processes=1", "prep.filters.exact_dedup=false", "prep.filters.semantic_dedup=true",
                     "prep.filters.embed_model=thumbnail:8", "prep.filters.semdedup_eps=0.1",
                     "prep.filters.semdedup_clusters=3"])
    assert code == 0
    written = set(_written(tmp_path / "out"))
    assert written >= set(distinct) and len(written & set(group)) == 1 and len(written) == 12
