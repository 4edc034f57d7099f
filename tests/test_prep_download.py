"""`clipline prep` against a misbehaving loopback server: every counter in the funnel equals what the list
contains, and each gap of img2dataset 1.47.0 that data_prep.downloader closes is shown closed."""

from __future__ import annotations

import io
import itertools
import json
import math
import tarfile
import time
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from clipline.config import PrepConfig, PrepFilterConfig
from clipline.errors import UsageError
from data_prep import downloader
from data_prep.dedup import hamming, phash_bytes
from data_prep.prep import DOWNLOAD_DIR, run_prep

from conftest import make_samples
from prep_server import MisbehavingServer, jpeg


def _reencoded(data: bytes, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


GOOD = 13
"""Distinct scenes g0..g12 (their pairwise pHash distances are checked to exceed the near-dup threshold)."""


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """One build over a list with one row for each way a row can fail, and the expected funnel."""
    tmp = tmp_path_factory.mktemp("mixed")
    samples = make_samples(GOOD, seed=31, image_size=64)
    images = {f"g{i}.jpg": s["jpg"] for i, s in enumerate(samples)}
    captions = {f"g{i}.jpg": s["txt"] for i, s in enumerate(samples)}
    hashes = [phash_bytes(b) for b in images.values()]
    assert min(hamming(a, b) for a, b in itertools.combinations(hashes, 2)) > 4  # no accidental near-duplicates
    images["dup.jpg"] = images["g0.jpg"]                            # same bytes, another URL
    images["near.jpg"] = _reencoded(images["g1.jpg"], quality=50)   # same picture, other bytes
    images["tiny.jpg"] = jpeg((8, 8))
    images["strip.jpg"] = jpeg((600, 20))
    images["cut.jpg"] = images["g12.jpg"][: len(images["g12.jpg"]) * 2 // 3]  # a file truncated on the server
    with MisbehavingServer(images, stall_s=3.0, trickle_s=0.2) as server:
        u = server.url
        rows = [(u(f"img/g{i}.jpg"), captions[f"g{i}.jpg"]) for i in range(8)]          # 8 written
        rows += [(u("redirect/g8.jpg"), captions["g8.jpg"]),                              # followed: written
                 (u("noctype/g9.jpg"), captions["g9.jpg"]),                               # no Content-Type: written
                 (u("optout-other/g10.jpg"), captions["g10.jpg"])]                        # other bot's opt-out
        rows += [(u("img/dup.jpg"), "the same red ring photographed again"),
                 (u("img/near.jpg"), "a recompressed copy of the white diamonds"),
                 (u("img/tiny.jpg"), "a very small red square"),
                 (u("img/strip.jpg"), "a very long thin red strip")]
        rows += [(u("404/a.jpg"), "a missing picture of a cat"),
                 (u("500/b.jpg"), "a server error instead of a dog"),
                 (u("stall/c.jpg"), "a server that never answers"),
                 (u("trickle/g11.jpg"), "a picture sent one byte at a time"),
                 (u("truncated/g12.jpg"), "a transfer cut in the middle"),
                 (u("corrupt/d.jpg"), "random bytes pretending to be a photo"),
                 (u("img/cut.jpg"), "a file cut short on the server itself"),
                 (u("html/g2.jpg"), "an image served as a web page"),
                 (u("bomb/e.png"), "a decompression bomb of a picture"),
                 (u("endless/f.jpg"), "a body that never ends at all"),
                 (u("optout/g3.jpg"), "a picture whose owner opted out"),
                 (u("private/g4.jpg"), "a picture robots.txt keeps out"),
                 (u("redirect-to/127.0.0.2/img/g12.jpg"), "a redirect to another loopback address")]
        rows += [(u("img/g6.jpg"), ""),                                   # empty caption
                 ("htp://not a url", "a row whose url is malformed"),
                 (u("img/g0.jpg"), "the first picture listed a second time"),  # duplicate URL
                 (u("img/g7.jpg?x=1"), "IMG 0042.JPG"),                   # boilerplate caption
                 (u("img/g7.jpg?x=2"), "kitten"),                         # too few words
                 ("http://10.1.2.3/x.jpg", "an intranet picture of a printer"),
                 (f"http://127.0.0.2:{server.port}/img/g0.jpg", "another loopback address listed directly")]
        url_list = tmp / "urls.csv"
        pd.DataFrame({"link": [r[0] for r in rows], "text": [r[1] for r in rows],
                      "uid": [f"u{i:03d}" for i in range(len(rows))]}).to_csv(url_list, index=False)
        cfg = PrepConfig(url_list=str(url_list), url_col="link", caption_col="text", output_dir=str(tmp / "out"),
                         image_size=32, samples_per_shard=8, processes=1, threads=8, timeout=1, deadline=5.0,
                         retries=1, max_image_bytes=100_000, min_image_size=16, max_aspect_ratio=10.0,
                         allowed_networks=["127.0.0.1/32"],
                         filters=PrepFilterConfig(near_dedup_distance=4))
        start = time.perf_counter()
        manifest = run_prep(cfg)
        elapsed = time.perf_counter() - start
        hits = dict(server.hits)
    return {"manifest": manifest, "out": Path(cfg.output_dir), "hits": hits, "rows": rows, "elapsed": elapsed,
            "cfg": cfg}


EXPECTED_FUNNEL = [
    ("listed", 35, {}),
    ("list validation", 32, {"malformed_url": 1, "empty_caption": 1, "duplicate_url": 1}),
    ("caption filters", 30, {"too_few_words": 1, "boilerplate_caption": 1}),
    ("address check", 28, {"refused_private_address": 2}),
    ("download", 16, {"http_404": 1, "http_500": 1, "timeout": 1, "deadline_exceeded": 1, "truncated": 1,
                      "not_an_image": 1, "decompression_bomb": 1, "too_large": 1,
                      "opt_out_x_robots_tag": 1, "opt_out_robots_txt": 1, "refused_private_address": 1,
                      "decode_error": 1}),
    ("decodable", 16, {}),
    ("image size", 14, {"image_too_small": 1, "aspect_ratio_too_large": 1}),
    # The image served as text/html is downloaded (the bytes decide) and is then a copy of img/g2.jpg.
    ("exact dedup", 12, {"duplicate_image": 2}),
    ("near dedup", 11, {"near_duplicate_image": 1}),
    ("written", 11, {}),
]


def test_every_counter_equals_what_the_list_contains(mixed):
    funnel = [(s["stage"], s["count"], s["removed"]) for s in mixed["manifest"].stats["funnel"]]
    assert funnel == EXPECTED_FUNNEL
    for before, after in zip(funnel, funnel[1:]):
        assert before[1] - sum(after[2].values()) == after[1]
    sizes = json.loads((mixed["out"] / "sizes.json").read_text())
    assert sizes == {"00000.tar": 8, "00001.tar": 3} and mixed["manifest"].total_samples == 11


def test_written_samples_are_the_good_rows(mixed):
    urls = []
    for shard in sorted(mixed["out"].glob("*.tar")):
        with tarfile.open(shard) as tar:
            metas = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
        urls += [m["url"] for m in metas]
        assert all({"uid", "url", "caption", "sha256", "phash"} <= set(m) for m in metas)
    expected = {r[0] for r in mixed["rows"][:11]}
    assert set(urls) == expected and len(urls) == len(expected)


def test_404_is_not_retried_but_a_500_is(mixed):
    hits = mixed["hits"]
    assert hits["/404/a.jpg"] == 1           # img2dataset would ask retries + 1 times
    assert hits["/500/b.jpg"] == 2           # retries=1: a failure that can pass gets one more attempt
    assert hits["/robots.txt"] == 1          # once per host per process, not once per image
    assert "/img/g12.jpg" not in hits        # the redirect to 127.0.0.2 was refused before connecting


def test_the_deadline_bounds_a_trickling_server(mixed):
    # The trickle route sends ~1 KB at 5 bytes/s: img2dataset's per-read timeout never fires, the deadline does.
    stats = [json.loads(p.read_text()) for p in (mixed["out"] / DOWNLOAD_DIR).glob("*_stats.json")]
    assert max(s["duration"] for s in stats) < 5.0 + 4.0
    assert mixed["elapsed"] < 120


def test_report_and_plots_are_written(mixed):
    out = mixed["out"]
    report = (out / "report.md").read_text()
    assert "| near dedup | 11 | near duplicate image: 1 |" in report
    assert "malformed url: 1 (first: 'htp://not a url')" in report
    for png in ("report_funnel.png", "report_caption_length.png", "report_resolution.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({png})" in report
    stats = json.loads((out / "stats.json").read_text())
    assert stats["funnel"][-1]["count"] == 11 and stats["list_issues"]["duplicate_url"]["count"] == 1


def test_download_processes_hash_each_image_as_the_filters_would(mixed):
    """The near-dedup filter takes each image's pHash from the download processes (_download/_phash/NNNNN.json)
    instead of decoding it again: every downloaded image has one, equal to phash_bytes of the bytes in the shard,
    and the written samples carry those values."""
    work = mixed["out"] / DOWNLOAD_DIR
    side: dict[str, str] = {}
    for shard in sorted(work.glob("[0-9]*.tar")):
        hashes = json.loads((work / "_phash" / (shard.stem + ".json")).read_text())
        with tarfile.open(shard) as tar:
            images = {m.name[:-4]: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")}
        assert set(hashes) == set(images)
        assert all(int(hashes[k], 16) == phash_bytes(images[k]) for k in images)
        side.update(hashes)
    stats = json.loads((mixed["out"] / "stats.json").read_text())
    assert len(side) == stats["success"]
    for shard in sorted(mixed["out"].glob("[0-9]*.tar")):
        with tarfile.open(shard) as tar:
            metas = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
        assert metas and all(m["phash"] == side[m["key"]] for m in metas)


def test_filter_pass_takes_the_phash_from_the_side_file_and_hashes_only_what_it_lacks(mixed, tmp_path):
    """read_shard uses the download's hash where the side file has one (a planted value comes back unchanged, so
    that image was not decoded again) and computes it where the side file has none."""
    from collections import Counter

    from data_prep.reshard import phash_file, read_shard

    shard = sorted((mixed["out"] / DOWNLOAD_DIR).glob("[0-9]*.tar"))[0]
    copy = tmp_path / shard.name
    copy.write_bytes(shard.read_bytes())
    hashes = json.loads(phash_file(shard).read_text())
    planted, dropped = sorted(hashes)[:2]
    hashes[planted] = "0123456789abcdef"
    del hashes[dropped]
    phash_file(copy).parent.mkdir()
    phash_file(copy).write_text(json.dumps(hashes))
    features, samples = read_shard(str(copy), True, Counter())
    got = dict(zip(features["key"], features["phash"]))
    assert got[planted] == 0x0123456789ABCDEF
    assert got[dropped] == phash_bytes(samples[dropped]["jpg"])


def test_overwrite_mode_rebuilds_where_img2dataset_crashes(tmp_path):
    out = tmp_path / "out"
    with MisbehavingServer({"a.jpg": make_samples(1, seed=3, image_size=32)[0]["jpg"]}) as server:
        first = tmp_path / "first.txt"
        first.write_text(f"{server.url('img/a.jpg')}\ta small red ring at the bottom\n")
        base = dict(output_dir=str(out), image_size=32, processes=1, threads=2, allowed_networks=["127.0.0.1/32"])
        run_prep(PrepConfig(url_list=str(first), **base))
        (out / "_download" / "stale-note.json").write_text("{}")
        second = tmp_path / "second.txt"
        second.write_text(f"{server.url('redirect/a.jpg')}\ta small red ring seen through a redirect\n")
        with pytest.raises(UsageError, match="another URL list"):
            run_prep(PrepConfig(url_list=str(second), **base))
        manifest = run_prep(PrepConfig(url_list=str(second), mode="overwrite", **base))
        assert manifest.total_samples == 1 and manifest.stats["funnel"][0]["count"] == 1
        assert not (out / "_download" / "stale-note.json").exists()

        # keep_downloads=false: the unfiltered shards go once the build is complete; the same command is then
        # up to date, and changed filters are pointed at filtering the built shards instead.
        lean = dict(base, url_list=str(second), keep_downloads=False)
        run_prep(PrepConfig(mode="overwrite", **lean))
        assert not list((out / "_download").glob("*.tar")) and (out / "00000.tar").is_file()
        assert run_prep(PrepConfig(**lean)).total_samples == 1
        with pytest.raises(UsageError, match="prep.input_shards="):
            run_prep(PrepConfig(min_image_size=10, **lean))
        assert (out / "00000.tar").is_file() and (out / "manifest.json").is_file()  # the built shards are intact


def test_unavailable_distributor_or_format_is_an_error_not_a_silent_exit(tmp_path, monkeypatch):
    if downloader.importlib.util.find_spec("ray") is None:
        with pytest.raises(UsageError, match="'ray' package"):
            downloader.check_backends("ray", "webdataset")
    if downloader.importlib.util.find_spec("tensorflow") is None:
        with pytest.raises(UsageError, match="'tensorflow' package"):
            downloader.check_backends("multiprocessing", "tfrecord")
    # Whatever makes img2dataset return early (here a distributor that does nothing), unfinished shards are an error.
    monkeypatch.setattr(downloader._i2d_main, "multiprocessing_distributor", lambda *a, **k: None)
    pd.DataFrame({"url": ["http://127.0.0.1:9/a.jpg"] * 3, "caption": ["a b c"] * 3}).to_parquet(tmp_path / "l.parquet")
    req = downloader.DownloadRequest(url_list=str(tmp_path / "l.parquet"), output_folder=str(tmp_path / "dl"),
                                     rows=3, extra_columns=[], policy=downloader.FetchPolicy(), samples_per_shard=2,
                                     processes=1, threads=1)
    with pytest.raises(downloader.DownloadIncomplete, match=r"without finishing 2 of 2 shards"):
        downloader.run_download(req)


def test_img2dataset_itself_exits_quietly_with_a_missing_distributor(tmp_path):
    """The gap being closed: plain img2dataset returns normally, having written no shard."""
    if downloader.importlib.util.find_spec("ray") is not None:
        pytest.skip("ray is installed here, so the missing-distributor path of img2dataset cannot be shown")
    pd.DataFrame({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a b c"]}).to_parquet(tmp_path / "l.parquet")
    downloader._i2d_main.download(url_list=str(tmp_path / "l.parquet"), input_format="parquet",
                                  output_folder=str(tmp_path / "dl"), output_format="webdataset",
                                  caption_col="caption", distributor="ray", processes_count=1)
    assert downloader.finished_shards(tmp_path / "dl") == set()


def test_expected_shards():
    assert downloader.expected_shards(17, 8) == [0, 1, 2] and len(downloader.expected_shards(16, 8)) == math.ceil(2)
