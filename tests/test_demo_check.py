"""`clipline demo` checks its own promises: demo_summary.json beside results.json, a PASS/FAIL line per minimum of
clipline.demo_check.DEMO_MINIMUMS and a non-zero exit when one is missed; the stages are stand-ins here (the real
demo runs in test_pipeline.py, shrunk, with the check off)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from clipline import cli
from clipline.config import load_config
from clipline.demo_check import (DEMO_MINIMUMS, EXIT_MINIMUM_MISSED, SUMMARY, check_minimums, headline_metrics,
                                 report, write_summary)
from conftest import REPO


def records_with(values: dict[tuple[str, str], float | None]) -> list[dict]:
    """results.json records: the given headline values, a per-class row and eval's precision fields."""
    out = [{"task": "zeroshot_classification", "dataset": d, "metric": m, "value": v, "chance": 0.1,
            "precision": "fp32", "precision_requested": "auto"} for (d, m), v in values.items()]
    out.append({"task": "zeroshot_classification", "dataset": "demo-colour", "metric": "recall[red]", "value": 0.0,
                "chance": 0.1, "precision": "fp32", "precision_requested": "auto"})
    return out


def passing() -> dict[tuple[str, str], float]:
    return {(m.dataset, m.metric): m.above + 0.05 for m in DEMO_MINIMUMS}


def test_minimums_pass_only_strictly_above():
    assert all(row["passed"] for row in check_minimums(headline_metrics(records_with(passing()))))
    for i, m in enumerate(DEMO_MINIMUMS):
        at_minimum = {**passing(), (m.dataset, m.metric): m.above}
        rows = check_minimums(headline_metrics(records_with(at_minimum)))
        assert [row["passed"] for row in rows] == [j != i for j in range(len(DEMO_MINIMUMS))]


def test_missing_or_errored_metrics_fail():
    first = DEMO_MINIMUMS[0]
    values = {k: v for k, v in passing().items() if k != (first.dataset, first.metric)}
    rows = check_minimums(headline_metrics(records_with(values)))
    assert rows[0]["passed"] is False and rows[0]["value"] is None
    errored = records_with(passing())
    errored[0] = {**errored[0], "metric": "error", "value": None, "error": "cannot read"}
    assert not check_minimums(headline_metrics(errored))[0]["passed"]


@pytest.fixture
def run_dirs(tmp_path):
    train, out = tmp_path / "train", tmp_path / "eval"
    train.mkdir()
    (train / "config.yaml").write_text("# train.precision: auto -> fp32 (x)\n" + yaml.safe_dump(
        {"train": {"precision": "fp32"}}))
    out.mkdir()
    return train, out


def test_summary_is_written_and_reported(run_dirs, capsys):
    train, out = run_dirs
    values = {**passing(), ("demo-shape", "top1"): 0.31}
    (out / "results.json").write_text(json.dumps(records_with(values)))
    summary = write_summary(out, train, {"data": 10.0, "train": 200.04, "eval": 5.0}, steps=1100)
    assert json.loads((out / SUMMARY).read_text()) == summary
    assert summary["precision"] == {"train": "fp32", "eval": "fp32"} and summary["steps"] == 1100
    assert summary["stage_seconds"] == {"data": 10.0, "train": 200.0, "eval": 5.0}
    assert summary["total_seconds"] == 215.0
    assert "recall[red]" not in summary["metrics"]["demo-colour"]
    assert {"flags", "torch_capability", "native_bf16"} <= set(summary["cpu"])
    assert report(summary) == EXIT_MINIMUM_MISSED
    lines = capsys.readouterr().out.splitlines()
    assert "FAIL  shape top-1: 31.0% (promised > 40%; demo-shape top1)" in lines
    assert sum(line.startswith("PASS  ") for line in lines) == len(DEMO_MINIMUMS) - 1


def _fake_stages(monkeypatch, cfg, values, calls):
    import data_prep.demo
    import eval.suite
    import training.trainer

    def data(c):
        calls.append("data")
        return 0

    def train(c):
        calls.append("train")
        (cfg_dir := Path(c.train.output_dir)).mkdir(parents=True, exist_ok=True)
        (cfg_dir / "config.yaml").write_text(yaml.safe_dump({"train": {"precision": "bf16"}}))
        return 0

    def evaluate(c):
        calls.append("eval")
        Path(c.eval.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(c.eval.output_dir) / "results.json").write_text(json.dumps(records_with(values)))
        return 0

    monkeypatch.setattr(data_prep.demo, "main", data)
    monkeypatch.setattr(training.trainer, "main", train)
    monkeypatch.setattr(eval.suite, "main", evaluate)


@pytest.mark.parametrize("shape_top1, check, code", [(0.55, "true", 0), (0.39, "true", EXIT_MINIMUM_MISSED),
                                                     (0.39, "false", 0)])
def test_demo_command_writes_the_summary_and_exits_by_the_minimums(tmp_path, monkeypatch, capsys, shape_top1,
                                                                  check, code):
    cfg = load_config([str(REPO / "configs" / "demo.yaml")], [f"run.output_dir={tmp_path}",
                                                              f"demo.check_minimums={check}"])
    calls: list[str] = []
    _fake_stages(monkeypatch, cfg, {**passing(), ("demo-shape", "top1"): shape_top1}, calls)
    assert cli.demo(cfg) == code
    assert calls == ["data", "train", "eval"]
    summary = json.loads((tmp_path / "eval" / SUMMARY).read_text())
    assert set(summary["stage_seconds"]) == {"data", "train", "eval"} and summary["steps"] == cfg.train.steps
    assert summary["precision"] == {"train": "bf16", "eval": "fp32"}
    out = capsys.readouterr().out
    assert ("FAIL  shape top-1" in out) == (check == "true" and code != 0)


def test_the_shipped_demo_checks_and_test_tiny_does_not():
    assert load_config([str(REPO / "configs" / "demo.yaml")]).demo.check_minimums is True
    tiny = load_config([str(REPO / "configs" / "demo.yaml"), str(REPO / "configs" / "test-tiny.yaml")])
    assert tiny.demo.check_minimums is False


def test_readme_demo_table_is_the_stored_measured_run():
    """The README's demo table, its minimums and its step count come from the stored summary of a real run."""
    stored = json.loads((REPO / "benchmarks" / "results" / "demo_summary_avx2.json").read_text())
    readme = (REPO / "README.md").read_text()
    rows = [line.split("|")[1:-1] for line in readme.splitlines() if line.startswith("| demo-")]
    assert len(rows) >= 10
    for dataset, _task, metric, value, _chance in (map(str.strip, r) for r in rows):
        assert float(value) == pytest.approx(100 * stored["metrics"][dataset][metric], abs=0.051), (dataset, metric)
    assert all(m["passed"] for m in stored["minimums"])
    for m in DEMO_MINIMUMS:
        assert f"{m.label} above {m.above * 100:.0f}%" in readme
    assert stored["steps"] == load_config([str(REPO / "configs" / "demo.yaml")]).train.steps
    assert f"for {stored['steps']} steps of batch 128" in readme
