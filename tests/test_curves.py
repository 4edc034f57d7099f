"""Training curves (training/curves.py) and the train progress bar: PNGs drawn from metrics.jsonl, redraws
throttled, a tqdm bar with loss and throughput on a terminal (a real pty) and none in a log."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO, run_cli
from training import curves

DEMO, TINY = str(REPO / "configs" / "demo.yaml"), str(REPO / "configs" / "test-tiny.yaml")


def _write_metrics(run: Path, n: int, evals: bool) -> None:
    run.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(1, n + 1):
        r = {"step": 10 * i, "samples_seen": 320 * i, "loss": 4.0 / i, "lr": 1e-3, "logit_scale": 14.0 + i,
             "samples_per_s": 500.0, "skipped_samples": 0}
        if evals and i % 2 == 0:
            r.update({"eval/demo-colour/top1": 0.1 * i, "eval/demo-shape/top1": 0.05 * i})
        lines.append(json.dumps(r))
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 999, "loss": 1.2')  # cut short by a crash


def test_plot_run_draws_training_and_eval_curves(tmp_path):
    _write_metrics(tmp_path, 6, evals=True)
    written = curves.plot_run(tmp_path)
    assert sorted(p.name for p in written) == sorted([curves.EVAL_PNG, curves.TRAIN_PNG])
    for p in written:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.width >= 400 and im.height >= 250
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temp file, nothing left behind
    series = curves.eval_series(curves.read_metrics(tmp_path / "metrics.jsonl"))
    steps, values = series["top1"]["demo-colour"]
    assert steps == [20, 40, 60] and values == pytest.approx([0.2, 0.4, 0.6])


def test_no_eval_png_without_evals_and_nothing_before_the_first_log(tmp_path):
    assert curves.plot_run(tmp_path) == []
    _write_metrics(tmp_path, 3, evals=False)
    assert [p.name for p in curves.plot_run(tmp_path)] == [curves.TRAIN_PNG]


def test_redraws_are_throttled_but_the_final_one_always_happens(tmp_path, monkeypatch):
    _write_metrics(tmp_path, 3, evals=False)
    clock = [1000.0]
    monkeypatch.setattr(curves.time, "monotonic", lambda: clock[0])
    drawn = []
    monkeypatch.setattr(curves, "plot_run", lambda run_dir, **kwargs: drawn.append(clock[0]) or [])
    writer = curves.CurveWriter(tmp_path, min_interval_s=30)
    for t in (1001, 1010, 1029):  # within 30 s of the start: no redraw
        clock[0] = t
        writer.update()
    assert drawn == []
    for t in (1031, 1040, 1062):
        clock[0] = t
        writer.update()
    assert drawn == [1031, 1062]
    clock[0] = 1063
    writer.update(final=True)
    assert drawn == [1031, 1062, 1063]


def test_background_redraws_never_block_the_loop_and_the_final_one_waits(tmp_path, monkeypatch):
    import threading

    _write_metrics(tmp_path, 3, evals=False)
    release, drawn = threading.Event(), []

    def slow_plot(run_dir, **kwargs):
        release.wait(10)  # a redraw that lasts until the test lets it finish
        drawn.append(threading.current_thread().name)
        return []

    monkeypatch.setattr(curves, "plot_run", slow_plot)
    writer = curves.CurveWriter(tmp_path, min_interval_s=0, background=True)
    writer.update()  # starts the redraw in a thread and returns at once, the redraw still blocked
    writer.update()  # due again, but the previous one is still running: skipped, not queued
    assert drawn == [] and writer._thread.is_alive()
    release.set()
    writer.update(final=True)  # waits for the running redraw, then draws once more in this thread
    assert drawn == ["clipline-curves", threading.current_thread().name]
    assert not writer._thread


def test_eval_curves_are_redrawn_only_after_a_new_eval(tmp_path):
    _write_metrics(tmp_path, 4, evals=True)  # evals at steps 20 and 40
    writer = curves.CurveWriter(tmp_path, min_interval_s=0)
    writer.update()
    train_png, eval_png = tmp_path / curves.TRAIN_PNG, tmp_path / curves.EVAL_PNG
    first = (train_png.stat().st_ino, eval_png.stat().st_ino)  # each redraw renames a new file into place
    writer.update()
    assert train_png.stat().st_ino != first[0] and eval_png.stat().st_ino == first[1]
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write("\n" + json.dumps({"step": 50, "loss": 0.5, "eval/demo-colour/top1": 0.9}) + "\n")
    writer.update()
    assert eval_png.stat().st_ino != first[1]


def test_a_failing_redraw_never_stops_training(tmp_path, monkeypatch):
    def broken(run_dir, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(curves, "plot_run", broken)
    writer = curves.CurveWriter(tmp_path, min_interval_s=0)
    writer.update(final=True)
    writer.update(final=True)  # disabled after the first failure, no second attempt
    assert not writer.enabled


def test_redraw_after_the_fact_from_the_command_line(tmp_path):
    _write_metrics(tmp_path, 3, evals=False)
    assert curves.main([str(tmp_path)]) == 0 and (tmp_path / curves.TRAIN_PNG).is_file()
    assert curves.main([str(tmp_path / "missing")]) == 2


def _train_args(out: Path, shards: Path, *extra: str) -> list[str]:
    return ["train", DEMO, TINY, f"run.output_dir={out}", f"train.data={shards}", "train.precision=fp32",
            "train.steps=4", "train.log_every=2", "train.save_every=4", "train.curves_every_s=30", *extra]


def _run_in_pty(argv: list[str], columns: int = 100, timeout: float = 300) -> tuple[int, str]:
    """Run ``python -m clipline ARGV`` with stdin/stdout/stderr on a pty of the given width; all it printed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, columns, 0, 0))
    env = {**os.environ, "WANDB_MODE": "disabled", "COLUMNS": str(columns)}
    proc = subprocess.Popen([sys.executable, "-m", "clipline", *argv], cwd=REPO, env=env, stdin=slave, stdout=slave,
                            stderr=slave, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed its end
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return proc.wait(), b"".join(chunks).decode("utf-8", "replace")


def test_train_shows_a_bar_on_a_terminal_and_none_in_a_log(tmp_path, tiny_shards):
    rc, screen = _run_in_pty(_train_args(tmp_path / "tty", tiny_shards))
    assert rc == 0, screen[-3000:]
    lines = screen.replace("\r\n", "\n").replace("\r", "\n").splitlines()  # each bar redraw and log line
    bar_updates = [ln for ln in lines if re.search(r"\| *\d+/4 \[", ln)]  # tqdm's "...| 2/4 [00:03<..."
    assert bar_updates, screen[-3000:]
    assert any("4/4" in seg and "loss " in seg and "samples/s" in seg for seg in bar_updates), bar_updates[-3:]
    # the log lines are written above the bar, each on a line of its own, never glued to a bar update
    for text in ("step 2/4 loss", "saved "):  # a log line of ours, and a print0 line
        logged = [ln for ln in lines if text in ln]
        assert logged and all(ln.lstrip().startswith(text) for ln in logged), logged
    too_wide = [seg for seg in bar_updates if len(seg.rstrip()) > 100]
    assert not too_wide, too_wide  # fits the terminal's width

    logged_run = run_cli(*_train_args(tmp_path / "log", tiny_shards))
    assert logged_run.returncode == 0, logged_run.stderr[-3000:]
    output = logged_run.stdout + logged_run.stderr
    assert "step 2/4 loss" in output
    assert "\r" not in output and not re.search(r"\| *\d+/4 \[", output)
    train_dir = tmp_path / "log" / "train"
    with Image.open(train_dir / curves.TRAIN_PNG) as im:  # the final redraw at the end of the run
        assert im.format == "PNG"


@pytest.fixture
def saved_figures(monkeypatch):
    """The matplotlib figures saved during a test, to inspect what a PNG shows."""
    from matplotlib.figure import Figure

    figures, original = [], Figure.savefig

    def record(self, *args, **kwargs):
        figures.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return figures


def test_eval_plots_draw_each_chance_level_once_dashed_and_labelled(tmp_path, saved_figures):
    from eval.report import plot_over_steps

    records = [{"task": "zeroshot_classification", "dataset": ds, "metric": "top1", "value": v + step / 1000,
                "chance": chance, "checkpoint": f"step_{step}", "step": step}
               for step in (100, 200, 300)
               for ds, chance, v in (("colour", 1 / 8, 0.3), ("shape", 1 / 8, 0.2), ("size", 1 / 3, 0.5))]
    [png] = plot_over_steps(records, tmp_path)
    assert png.name == "top1.png" and png.is_file()
    ax = saved_figures[-1].axes[0]
    dashed = sorted(round(line.get_ydata()[0], 3) for line in ax.lines if line.get_linestyle() == "--")
    assert dashed == [12.5, 33.333]  # equal chance levels share one line instead of hiding each other
    labels = [t.get_text() for t in ax.texts]
    assert "chance 12.5%: colour, shape" in labels and "chance 33.3%: size" in labels


def test_prep_histograms_draw_one_bar_per_value_with_ticks_and_the_median(tmp_path):
    import numpy as np

    from data_prep.report import _nice_ticks, write_plots

    rng = np.random.default_rng(0)
    words = rng.integers(3, 20, 40)
    written = write_plots(tmp_path, [{"stage": "listed", "count": 50}, {"stage": "written", "count": 40}],
                          words, rng.integers(200, 900, 40), rng.integers(200, 900, 40))
    assert all((tmp_path / p).is_file() for p in written)
    with Image.open(tmp_path / "report_caption_length.png") as im:
        pixels = np.asarray(im.convert("RGB")).astype(int)
    bar = (np.abs(pixels - [0x55, 0xA8, 0x68]).sum(axis=2) == 0).any(axis=0)  # columns holding a bar
    runs = np.count_nonzero(bar[1:] & ~bar[:-1]) + int(bar[0])
    assert runs == len(set(words.tolist()))  # one bar per caption length present, with gaps between bars
    dashed = (np.abs(pixels - 0x4D).sum(axis=2) == 0).sum(axis=0)  # the median's dashed line: one grey column
    assert dashed.max() > 50 and np.count_nonzero(dashed > 50) == 1
    assert _nice_ticks(0, 41) == [0, 10, 20, 30, 40] and _nice_ticks(200, 900) == [200, 400, 600, 800]
    assert _nice_ticks(250, 262) == [250, 252, 254, 256, 258, 260, 262]
    # Every image the same size: one bar in the middle of a whole-number axis around it.
    written = write_plots(tmp_path, [{"stage": "listed", "count": 5}], np.full(5, 7), np.full(5, 256),
                          np.full(5, 256))
    with Image.open(tmp_path / "report_resolution.png") as im:
        pixels = np.asarray(im.convert("RGB")).astype(int)
    columns = np.flatnonzero((np.abs(pixels - [0x55, 0xA8, 0x68]).sum(axis=2) == 0).any(axis=0))
    assert 0 < len(columns) < 60 and abs((columns.min() + columns.max()) / 2 - (62 + 620) / 2) < 30
