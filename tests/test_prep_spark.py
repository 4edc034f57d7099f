"""The pyspark distributor, in Spark local mode: the same list gives the same shards, byte for byte, as the
multiprocessing distributor, with the same safeguards running inside the Spark workers."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil

import pandas as pd
import pytest

from clipline.config import PrepConfig
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


def _digests(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


def test_pyspark_local_mode_builds_the_same_shards(tmp_path):
    samples = make_samples(30, seed=21, image_size=32)
    images = {f"s{i}.jpg": s["jpg"] for i, s in enumerate(samples)}
    with MisbehavingServer(images) as server:
        urls = [server.url(f"img/s{i}.jpg") for i in range(30)] + [server.url("404/x.jpg"),
                                                                   server.url("private/s0.jpg")]
        captions = [s["txt"] for s in samples] + ["a picture that is gone", "a picture robots.txt keeps out"]
        pd.DataFrame({"url": urls, "caption": captions}).to_parquet(tmp_path / "urls.parquet")
        common = dict(url_list=str(tmp_path / "urls.parquet"), image_size=32, samples_per_shard=10, processes=2,
                      threads=4, allowed_networks=["127.0.0.1/32"])
        spark = run_prep(PrepConfig(output_dir=str(tmp_path / "spark"), distributor="pyspark",
                                    spark_master="local[2]", **common))
        local = run_prep(PrepConfig(output_dir=str(tmp_path / "local"), **common))
    assert spark.total_samples == 30 and spark.sizes == local.sizes
    assert spark.stats["funnel"] == local.stats["funnel"]
    assert {s["stage"]: s["removed"] for s in spark.stats["funnel"]}["download"] == {
        "http_404": 1, "opt_out_robots_txt": 1}
    assert _digests(tmp_path / "spark") == _digests(tmp_path / "local")
