"""The pyspark distributor, in Spark local mode: the same list gives the same shards, byte for byte, as the
multiprocessing distributor, with the same safeguards running inside the Spark workers."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import shutil
import tarfile

import pandas as pd
import pytest
from PIL import Image

from clipline.config import PrepConfig, PrepFilterConfig
from data_prep.curate import PAIRS_FILE
from data_prep.prep import run_prep

from conftest import make_samples, require_or_skip
from prep_server import MisbehavingServer

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def spark_prerequisites():
    """Skipped where pyspark or java is missing, but a failure under CI=true (the test extra installs pyspark and
    the CI image is meant to carry a JVM)."""
    require_or_skip(importlib.util.find_spec("pyspark") is not None,
                    "pyspark is not installed (pip install -e '.[test]' installs it)")
    require_or_skip(shutil.which("java") is not None, "no java on PATH: Spark needs a JVM (OpenJDK 17)")
    require_or_skip(all(importlib.util.find_spec(m) is not None for m in ("faiss", "ahocorasick")),
                    "the curation filters need faiss-cpu and pyahocorasick (pip install -e '.[test]' installs them)")


def _digests(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


def _copies(samples: list[dict]) -> dict[str, bytes]:
    """Near copies of the first three images (JPEG quality 50, rescaled to 48 px, quality 70): semantic dedup's
    truth (thumbnail:8 cosine > 0.98 to their originals; distinct scenes stay under 0.8)."""
    def encode(i: int, quality: int, size: int = 32) -> bytes:
        buf = io.BytesIO()
        Image.open(io.BytesIO(samples[i]["jpg"])).resize((size, size)).save(buf, format="JPEG", quality=quality)
        return buf.getvalue()
    return {"c0.jpg": encode(0, 50), "c1.jpg": encode(1, 90, 48), "c2.jpg": encode(2, 70)}


def test_pyspark_local_mode_builds_the_same_shards(tmp_path):
    """Also the curation pass (semantic dedup and MetaCLIP balancing) on Spark: the same kept set as on
    multiprocessing. The build holds one Spark session for the download and the curation pass."""
    samples = make_samples(30, seed=21, image_size=32)
    images = {f"s{i}.jpg": s["jpg"] for i, s in enumerate(samples)} | _copies(samples)
    with MisbehavingServer(images) as server:
        urls = [server.url(f"img/s{i}.jpg") for i in range(30)] + [server.url("404/x.jpg"),
                                                                   server.url("private/s0.jpg")]
        urls += [server.url(f"img/c{i}.jpg") for i in range(3)]
        captions = [s["txt"] for s in samples] + ["a picture that is gone", "a picture robots.txt keeps out"]
        captions += [f"another view of {samples[i]['txt']}" for i in range(3)]
        pd.DataFrame({"url": urls, "caption": captions}).to_parquet(tmp_path / "urls.parquet")
        curation = PrepFilterConfig(semantic_dedup=True, embed_model="thumbnail:8", semdedup_eps=0.05,
                                    semdedup_clusters=4, balance_entries="demo", balance_t=3, balance_seed=5)
        common = dict(url_list=str(tmp_path / "urls.parquet"), image_size=32, samples_per_shard=10, processes=2,
                      threads=4, allowed_networks=["127.0.0.1/32"], filters=curation)
        spark = run_prep(PrepConfig(output_dir=str(tmp_path / "spark"), distributor="pyspark",
                                    spark_master="local[2]", **common))
        local = run_prep(PrepConfig(output_dir=str(tmp_path / "local"), **common))
    assert spark.sizes == local.sizes
    assert spark.stats["funnel"] == local.stats["funnel"]
    removed = {s["stage"]: s["removed"] for s in spark.stats["funnel"]}
    assert removed["download"] == {"http_404": 1, "opt_out_robots_txt": 1}
    assert removed["semantic dedup"] == {"semantic_duplicate": 3}
    assert removed["balance"]["balanced_out"] > 0
    assert spark.total_samples == 30 - sum(removed["balance"].values())
    assert _keys(tmp_path / "spark") == _keys(tmp_path / "local")
    assert (tmp_path / "spark" / PAIRS_FILE).read_text() == (tmp_path / "local" / PAIRS_FILE).read_text()
    assert _digests(tmp_path / "spark") == _digests(tmp_path / "local")


def _keys(folder) -> set[str]:
    keys = set()
    for tar in sorted(folder.glob("[0-9]*.tar")):
        with tarfile.open(tar) as t:
            keys |= {m.name.split(".")[0] for m in t.getmembers() if m.name.endswith(".txt")}
    return keys
