"""`clipline eval` with its datasets and its output_dir in a bucket (moto's S3 server on 127.0.0.1, signatures
checked): the same numbers as the same datasets on local disk, a local copy reused while the objects are unchanged
and refreshed when one changes, results uploaded (results.json last) beside what was there, and no credential in
anything written or printed."""

from __future__ import annotations

import json

import pytest

from clipline import storage
from clipline.config import StorageConfig
from clipline.errors import UsageError
from conftest import make_shard_folder
from clipline.config import EvalDatasetConfig
from eval.datasets import check_dataset, load_split
from eval.suite import run_suite
from test_eval_datasets import (DIGIT_NAMES, DIGIT_TEMPLATES, by_key, digits, random_checkpoint, suite_config,
                                write_csv, write_digits_wds)

BUCKET = "clipline-eval"


@pytest.fixture(scope="module")
def bucket_data(s3_server, tmp_path_factory):
    """A random checkpoint, and the digits in CLIP_benchmark's webdataset layout and as a CSV of images, on disk
    and the same files in the bucket."""
    import s3fs

    tmp = tmp_path_factory.mktemp("storage_eval")
    images, labels = digits(n=60)
    local = {"wds": write_digits_wds(tmp / "data" / "wds", images, labels),
             "csv": write_csv(tmp / "data" / "csv" / "digits.csv", images, labels)}
    fs = s3fs.S3FileSystem(key=s3_server.key, secret=s3_server.secret, endpoint_url=s3_server.endpoint)
    fs.mkdir(BUCKET)
    fs.put(str(tmp / "data") + "/", f"{BUCKET}/data/", recursive=True)
    return tmp, fs, local, random_checkpoint(tmp / "ckpt", seed=3)


@pytest.fixture
def configured(s3_server, tmp_path):
    """Storage options as `clipline eval` sets them from the config: credentials in storage.options."""
    cfg = StorageConfig(endpoint_url=s3_server.endpoint, options={"key": s3_server.key, "secret": s3_server.secret},
                        cache_dir=str(tmp_path / "cache"))
    storage.configure(cfg)
    yield cfg
    storage.configure(None)


def _datasets(wds: str, csv: str) -> list[dict]:
    return [{"name": "wds", "path": wds, "templates": DIGIT_TEMPLATES},
            {"name": "csv", "path": csv, "classnames": DIGIT_NAMES, "templates": DIGIT_TEMPLATES}]


def _values(records: list[dict]) -> dict:
    return {k: (r["value"], r.get("n_samples")) for k, r in by_key(records).items()}


def test_eval_of_bucket_datasets_into_a_bucket_equals_the_local_eval(bucket_data, configured, tmp_path, s3_server,
                                                                    capfd):
    tmp, fs, local, ckpt = bucket_data
    here = run_suite(suite_config(tmp_path / "local", ckpt, _datasets(str(local["wds"]), str(local["csv"]))))
    out = f"s3://{BUCKET}/results"
    fs.pipe_file(f"{BUCKET}/results/demo_summary.json", b"{}")  # a file eval does not write: it must stay
    remote = _datasets(f"s3://{BUCKET}/data/wds", f"s3://{BUCKET}/data/csv/digits.csv")
    there = run_suite(suite_config(tmp_path / "remote", ckpt, remote, output_dir=out))
    assert not [r for r in there if r.get("error")] and len(by_key(there)) > 10
    assert _values(there) == _values(here)
    fs.invalidate_cache()
    assert json.loads(fs.cat_file(f"{BUCKET}/results/results.json")) == json.loads(json.dumps(there))
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{BUCKET}/results", detail=False)}
    assert names >= {"results.json", "results.csv", "results.md", "config.yaml", "demo_summary.json"}
    assert "s3://clipline-eval/data/wds" in fs.cat_file(f"{BUCKET}/results/config.yaml").decode()
    first = capfd.readouterr()
    assert "copied" in first.err and s3_server.secret not in first.out + first.err

    # Again (the start-of-run check reads the same copies): reused while unchanged, nothing copied; then one
    # changed object is copied again, alone.
    wds = EvalDatasetConfig(name="wds", path=f"s3://{BUCKET}/data/wds")
    assert check_dataset(wds) == "clip_benchmark_wds" and "copied" not in capfd.readouterr().err
    old = fs.cat_file(f"{BUCKET}/data/wds/classnames.txt")
    fs.pipe_file(f"{BUCKET}/data/wds/classnames.txt", old.upper())  # same size: the ETag tells it changed
    split = load_split(wds)
    assert split.classnames[7] == "SEVEN" and "copied 1 of 5 files" in capfd.readouterr().err
    fs.rm(f"{BUCKET}/data/wds/zeroshot_classification_templates.txt")
    assert load_split(wds).templates is None and "removed 1 stale" in capfd.readouterr().err

    # No credential in the bucket's results or in the local copies and mirrors.
    texts = [fs.cat_file(p).decode("latin-1") for p in fs.find(f"{BUCKET}/results")]
    texts += [p.read_bytes().decode("latin-1") for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert not [t[:80] for t in texts if s3_server.secret in t or s3_server.key in t]


def test_dataset_check_accepts_a_bucket_location_and_names_a_missing_one(bucket_data, configured):
    tmp, fs, _, _ = bucket_data
    shards = make_shard_folder(tmp / "shards", n_shards=3, per_shard=4, seed=5)
    fs.put(str(shards) + "/", f"{BUCKET}/shards/", recursive=True)
    # A brace pattern: only the shards it names are copied (not 00002.tar), and read as the local ones are.
    pattern = EvalDatasetConfig(name="r", task="retrieval", path=f"s3://{BUCKET}/shards/{{00000..00001}}.tar")
    local = EvalDatasetConfig(name="r", task="retrieval", path=f"{shards}/{{00000..00001}}.tar")
    assert load_split(pattern).captions == load_split(local).captions and len(load_split(local).captions) == 8
    mirror = storage.local_cache("eval-data", pattern.path)
    assert sorted(p.name for p in mirror.glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert check_dataset(EvalDatasetConfig(name="wds", path=f"s3://{BUCKET}/data/wds")) == "clip_benchmark_wds"
    with pytest.raises(UsageError, match=f"eval dataset 'gone'.*s3://{BUCKET}/data/nothing"):
        check_dataset(EvalDatasetConfig(name="gone", path=f"s3://{BUCKET}/data/nothing"))
