"""Faults the other test files do not inject, each recording a row of RELIABILITY.md (tests/reliability.py):

- SIGKILL in the middle of a checkpoint write (a wrapper script kills the trainer between two files);
- a full disk while saving, on a real tmpfs mounted for the test;
- a shard deleted while training reads the stream;
- tar members with absolute, '..' and link names, read by training, `clipline prep` and eval;
- weights files that carry pickled code;
- configs with negative sizes and paths that do not exist.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clipline.checkpoint import DiskFullError, latest_checkpoint, list_checkpoints, save_checkpoint
from clipline.cli import main as cli_main
from clipline.config import ConfigError, PrepConfig, load_config
from clipline.shards import iter_tar_members
from conftest import REPO, TINY_MODEL, make_samples, make_shard_folder, require_or_skip, run_cli, write_shard

DEMO = str(REPO / "configs" / "demo.yaml")
TINY = str(REPO / "configs" / "test-tiny.yaml")
STEPS, SAVE_EVERY = 8, 4
WEIGHTS = "open_clip_model.safetensors"


# -- helpers -------------------------------------------------------------------------------------------------

def train_args(out: Path, shards: Path, *extra: str) -> list[str]:
    return ["train", DEMO, TINY, f"run.output_dir={out}", f"train.data={shards}", f"train.steps={STEPS}",
            f"train.save_every={SAVE_EVERY}", "train.log_every=1", "train.workers=1", "train.keep_last=5",
            f"model.name={TINY_MODEL}", "train.precision=fp32", *extra]


def checkpoint_dir(train_out: Path, step: int) -> Path:
    return train_out / "checkpoints" / f"step_{step:08d}"


def equal_tensors(train_out: Path, reference: Path, step: int) -> tuple[int, int]:
    """(bitwise equal tensors, tensors) between the weights of two runs' checkpoints of ``step``."""
    x, y = (load_file(str(checkpoint_dir(out, step) / WEIGHTS)) for out in (train_out, reference))
    assert x.keys() == y.keys()
    return sum(torch.equal(x[k], y[k]) for k in x), len(x)


def metric_lines(train_out: Path) -> list[dict]:
    path = train_out / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def resumed_step(stdout: str) -> int:
    found = re.search(r"resumed from \S+ at step (\d+)", stdout)
    assert found, stdout[-2000:]
    return int(found.group(1))


def tree(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_shards) -> Path:
    """The train folder of an uninterrupted run: what every interrupted run must end equal to."""
    out = tmp_path_factory.mktemp("straight")
    result = run_cli(*train_args(out, tiny_shards))
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "train"


# -- SIGKILL mid-checkpoint ----------------------------------------------------------------------------------

KILL_MID_SAVE = '''
import os, signal, sys

import clipline.checkpoint as checkpoint
import training.trainer as trainer
from clipline.cli import main

real_save = checkpoint.save_checkpoint
saves = []


def save_then_die(root, step, writers):
    """The second checkpoint: write its first file, then SIGKILL before the next one (and the marker)."""
    saves.append(step)
    if len(saves) < 2:
        return real_save(root, step, writers)
    first = next(iter(writers))

    def wrap(name, write):
        def run(path):
            if name != first:
                os.kill(os.getpid(), signal.SIGKILL)
            write(path)
        return run

    return real_save(root, step, {name: wrap(name, write) for name, write in writers.items()})


checkpoint.save_checkpoint = save_then_die
if hasattr(trainer, "save_checkpoint"):  # imported by name there
    trainer.save_checkpoint = save_then_die
sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.fault
def test_sigkill_mid_checkpoint_write_keeps_the_previous_one_and_resumes_exactly(tmp_path, tiny_shards, straight,
                                                                                fault_row):
    script = tmp_path / "kill_mid_save.py"
    script.write_text(KILL_MID_SAVE)
    out = tmp_path / "run"
    killed = subprocess.run([sys.executable, str(script), *train_args(out, tiny_shards)], cwd=REPO,
                            env={**os.environ, "WANDB_MODE": "disabled"}, capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ckpts = out / "train" / "checkpoints"
    assert [s for s, _ in list_checkpoints(ckpts)] == [SAVE_EVERY]
    assert latest_checkpoint(ckpts) == checkpoint_dir(out / "train", SAVE_EVERY)
    (half,) = ckpts.glob(f".tmp-step_{STEPS:08d}-*")
    half_files = sorted(p.name for p in half.iterdir())
    assert half_files == ["open_clip_config.json"]  # one file written, no COMPLETE marker

    resumed = run_cli(*train_args(out, tiny_shards))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    start = resumed_step(resumed.stdout)
    assert start == SAVE_EVERY
    assert not list(ckpts.glob(".tmp-*"))  # the next save cleaned the half-written folder
    equal, total = equal_tensors(out / "train", straight, STEPS)
    assert equal == total
    fault_row(area="training", fault="SIGKILL in the middle of a checkpoint write",
              happened=f"killed (exit {killed.returncode}) writing step {STEPS} after {len(half_files)} of 4 files; "
                       f"latest complete checkpoint stayed step {SAVE_EVERY}; the half-written temp folder was "
                       f"ignored, resumed from step {start} and removed by the next save",
              lost=f"{STEPS - start} steps redone; {equal}/{total} weight tensors bitwise equal to an uninterrupted "
                   f"run")


# -- disk full -----------------------------------------------------------------------------------------------

class Tmpfs:
    """A tmpfs of a given size, mounted for one test (root only)."""

    def __init__(self, where: Path):
        self.where = where

    def mount(self, size: int) -> None:
        self.where.mkdir(parents=True, exist_ok=True)
        require_or_skip(shutil.which("mount") is not None,
                        "no mount command: the disk-full test needs a real small filesystem (tmpfs)")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(self.where)],
                              capture_output=True, text=True)
        require_or_skip(done.returncode == 0,
                        f"mounting a tmpfs is not permitted here (uid {os.geteuid()}): {done.stderr.strip()}")

    def resize(self, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.where)], check=True)

    def unmount(self) -> None:
        if os.path.ismount(self.where):
            subprocess.run(["umount", str(self.where)], check=False)
            if os.path.ismount(self.where):
                subprocess.run(["umount", "-l", str(self.where)], check=False)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def test_a_full_disk_is_named_even_when_the_writer_hides_the_errno(tmp_path, monkeypatch):
    """torch.save reports ENOSPC as "unexpected pos"; save_checkpoint then judges by the free space left."""
    previous = save_checkpoint(tmp_path, 1, {"a.txt": lambda p: p.write_text("one")})

    def enospc(path):
        path.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    def torch_style(path):
        path.write_text("half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    with pytest.raises(DiskFullError, match=f"no space left on the device holding {tmp_path} .*step_00000001 is "
                                            f"intact"):
        save_checkpoint(tmp_path, 2, {"a.txt": enospc})
    with pytest.raises(RuntimeError, match="unexpected pos"):  # plenty of room here: not a full disk
        save_checkpoint(tmp_path, 2, {"a.txt": torch_style})
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=4096))
    with pytest.raises(DiskFullError, match="ENOSPC"):
        save_checkpoint(tmp_path, 2, {"a.txt": torch_style})
    assert [p.name for p in tmp_path.iterdir()] == [previous.name]


@pytest.mark.fault
def test_disk_full_while_saving_keeps_the_previous_checkpoint_and_resumes(tmp_path, tiny_shards, straight,
                                                                         fault_row):
    ckpt_bytes = folder_bytes(checkpoint_dir(straight, SAVE_EVERY))
    size = ckpt_bytes * 3 // 2  # the first checkpoint fits, the second cannot
    disk = Tmpfs(tmp_path / "disk")
    try:
        disk.mount(size)
        train_out = disk.where / "train"
        args = train_args(tmp_path / "run", tiny_shards, f"train.output_dir={train_out}")
        started = time.monotonic()
        full = run_cli(*args)
        seconds = time.monotonic() - started
        error = [ln for ln in full.stderr.splitlines() if ln.startswith("clipline train: error:")]
        assert full.returncode == 2 and len(error) == 1 and "Traceback" not in full.stderr, full.stderr[-3000:]
        assert "no space left" in error[0] and "ENOSPC" in error[0] and str(disk.where) in error[0]
        assert f"step_{SAVE_EVERY:08d} is intact" in error[0]
        ckpts = train_out / "checkpoints"
        assert [s for s, _ in list_checkpoints(ckpts)] == [SAVE_EVERY]
        leftovers = [p.name for p in ckpts.iterdir() if p.name.startswith(".")]
        assert leftovers == []
        kept = checkpoint_dir(train_out, SAVE_EVERY)
        state = torch.load(kept / "train_state.pt", map_location="cpu", weights_only=True)
        assert state["step"] == SAVE_EVERY
        equal_kept, total = equal_tensors(train_out, straight, SAVE_EVERY)
        assert equal_kept == total
        logged = max(m["step"] for m in metric_lines(train_out))

        disk.resize(ckpt_bytes * 4)  # room made: the same command resumes
        resumed = run_cli(*args)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        start = resumed_step(resumed.stdout)
        equal, total = equal_tensors(train_out, straight, STEPS)
        assert start == SAVE_EVERY and equal == total
    finally:
        disk.unmount()
    message = error[0].replace(str(tmp_path), "$TMP")
    fault_row(area="training", fault="disk full while saving a checkpoint (real tmpfs)",
              happened=f"{size / 2**20:.0f} MiB tmpfs, checkpoints of {ckpt_bytes / 2**20:.0f} MiB: the save at step "
                       f"{logged} failed after {seconds:.0f} s with exit {full.returncode} and one line "
                       f"\"{message[:170]}...\"; step {SAVE_EVERY} intact ({equal_kept}/{total} tensors equal, "
                       f"train_state loads), {len(leftovers)} temp folders left; tmpfs grown, resumed from step "
                       f"{start}",
              lost=f"{logged - start} steps redone; {equal}/{total} weight tensors bitwise equal to an uninterrupted "
                   f"run")


# -- a shard vanishes mid-run --------------------------------------------------------------------------------

def wait_for_step(proc: subprocess.Popen, train_out: Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not any(m["step"] >= step for m in metric_lines(train_out)):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, f"step {step} never logged"
        time.sleep(0.05)


@pytest.mark.fault
def test_a_shard_deleted_mid_run_is_skipped_counted_and_logged(tmp_path, tiny_shards, fault_row):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    steps = 24  # 4 epochs of 192 samples at batch 32: later epochs must find the shard gone
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "clipline", *train_args(out, shards, f"train.steps={steps}",
                                                                         "train.save_every=100")],
                            cwd=REPO, env={**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for_step(proc, out / "train", 2)
        victim = shards / "00002.tar"
        victim.unlink()
        deleted_at = max(m["step"] for m in metric_lines(out / "train"))
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output[-3000:]
    metrics = metric_lines(out / "train")
    assert metrics[-1]["step"] == steps
    warnings = [ln for ln in output.splitlines() if "skipping the rest of shard" in ln and victim.name in ln]
    assert warnings and all("No such file" in ln for ln in warnings)
    counted = metrics[-1]["skipped_samples"]
    assert 1 <= counted <= len(warnings)  # the loader may have looked ahead past the last batch
    fault_row(area="data", fault="a shard deleted while training reads the stream",
              happened=f"{victim.name} deleted at step {deleted_at}; each later pass over it was skipped with "
                       f"a warning ({len(warnings)} logged, {counted} counted in skipped_samples); the run finished "
                       f"all {steps} steps, exit {proc.returncode}",
              lost=f"0 steps; only the vanished shard's {json.loads((shards / 'sizes.json').read_text())[victim.name]} "
                   f"samples, absent from the passes after the deletion")


# -- hostile tar members -------------------------------------------------------------------------------------

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
HOSTILE_SKIPS = {"unsafe_member_name": 4, "link_member": 2}
"""What the hostile shard holds besides good samples: 2 samples x 2 members with an absolute or '..' name, a
symlink and a hardlink (whose keys are then left with a caption and no image)."""


def add_member(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE,
               link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data)
    tar.addfile(info, io.BytesIO(data) if data else None)


def hostile_shard(path: Path, good: list[dict], outside: Path) -> None:
    write_shard(path, good)
    jpg = good[0]["jpg"]
    with tarfile.open(path, "a") as tar:
        for name in (f"{outside}/abs0001", "../../escape/dotdot0001"):
            add_member(tar, f"{name}.jpg", jpg)
            add_member(tar, f"{name}.txt", b"a red circle on a white background")
        add_member(tar, "link0001.jpg", kind=tarfile.SYMTYPE, link="/etc/passwd")
        add_member(tar, "link0001.txt", b"a symlink to the password file")
        add_member(tar, "hard0001.jpg", kind=tarfile.LNKTYPE, link="../../escape/dotdot0001.jpg")
        add_member(tar, "hard0001.txt", b"a hardlink out of the folder")


@pytest.mark.fault
def test_tar_members_with_absolute_dotdot_and_link_names_never_leave_the_output_folders(
        tmp_path, tmp_path_factory, monkeypatch, fault_row):
    from data_prep.prep import run_prep
    from eval.datasets import load_split
    from eval.suite import run_suite
    from test_eval_datasets import by_key, random_checkpoint, suite_config

    shards = make_shard_folder(tmp_path / "in", n_shards=2, per_shard=48, seed=21)
    outside = tmp_path / "outside_abs"
    hostile_shard(shards / "00002.tar", make_samples(16, seed=22), outside)
    sizes = json.loads((shards / "sizes.json").read_text())
    (shards / "sizes.json").write_text(json.dumps({**sizes, "00002.tar": 16}))
    good = sum(sizes.values()) + 16
    with open(shards / "00002.tar", "rb") as f:
        names = [n for n, _ in iter_tar_members(f)]
    assert f"{outside}/abs0001.jpg" in names and "../../escape/dotdot0001.jpg" in names  # the names are as crafted
    cwd = tmp_path / "cwd" / "deep"  # a relative '../..' from here (or from any output folder) lands in tmp_path
    cwd.mkdir(parents=True)
    train_out, prep_out = tmp_path / "train_run", tmp_path / "prep_out"
    ckpt = random_checkpoint(tmp_path / "ckpt")
    ds = {"name": "hostile", "path": str(shards), "format": "shards", "label_field": "colour", "classnames": COLOURS,
          "templates": ["a {c} object."]}
    eval_cfg = suite_config(tmp_path / "eval", ckpt, [ds])
    root = tmp_path_factory.getbasetemp()
    before = tree(root)

    trained = run_cli("train", DEMO, TINY, f"run.output_dir={train_out}", f"train.data={shards}", "train.steps=4",
                      "train.save_every=4", "train.log_every=1", "train.workers=0", f"model.name={TINY_MODEL}",
                      cwd=cwd)
    assert trained.returncode == 0, trained.stderr[-3000:]
    train_skipped = metric_lines(train_out / "train")[-1]["skipped_samples"]
    train_warnings = trained.stderr.count("an absolute or '..' name")
    assert train_skipped >= sum(HOSTILE_SKIPS.values()) + 2 and train_warnings >= HOSTILE_SKIPS["unsafe_member_name"]

    monkeypatch.chdir(cwd)
    manifest = run_prep(PrepConfig(input_shards=str(shards), output_dir=str(prep_out), image_size=32))
    prep_skipped = manifest.stats["skipped_while_reading"]
    assert prep_skipped == {**HOSTILE_SKIPS, "incomplete_sample": 2} and manifest.total_samples == good
    written = []
    for shard in sorted(prep_out.glob("*.tar")):
        with open(shard, "rb") as f:
            written += [n for n, _ in iter_tar_members(f)]
    assert len(written) == 3 * good and all(re.fullmatch(r"[0-9a-f]+\.(jpg|txt|json)", n) for n in written)

    records = by_key(run_suite(eval_cfg))
    eval_skipped = {k: v for k, v in load_split(eval_cfg.datasets[0]).skipped.items() if v}
    assert records[("hostile", "top1")]["n_samples"] == good and eval_skipped == {**HOSTILE_SKIPS, "no_image": 2}

    created = tree(root) - before
    allowed = (train_out, prep_out, tmp_path / "eval" / "out")
    stray = sorted(p for p in created if not any(Path(p).is_relative_to(a) for a in allowed))
    assert stray == [] and not outside.exists() and not (tmp_path / "escape").exists()
    assert not list(root.rglob("*dotdot0001*")) and not list(root.rglob("abs0001*"))
    for consumer, skipped in (("training stream (clipline train)", f"{train_skipped} samples/members skipped "
                                                                   f"(metrics), {train_warnings} warnings"),
                              ("clipline prep with prep.input_shards", f"skipped {prep_skipped}; {len(written)} "
                                                                       f"members written, all plain KEY.ext names"),
                              ("eval on shards", f"skipped {eval_skipped}; {good} images scored")):
        fault_row(area="hostile input",
                  fault=f"tar members with absolute, '..', symlink and hardlink names: {consumer}",
                  happened=f"{skipped}; {len(created)} paths created, {len(stray)} outside the output folders",
                  lost=f"0 of {good} good samples")


# -- pickled code in weights ---------------------------------------------------------------------------------

class Planted:
    """Unpickling this creates a file: proof that pickled code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


@pytest.fixture
def cli_in_process():
    """clipline's CLI in this process (fast: no interpreter start); the trainer's thread count is put back."""
    threads = torch.get_num_threads()
    yield cli_main
    torch.set_num_threads(threads)


@pytest.mark.fault
def test_weights_with_pickled_code_are_refused_without_running_it(tmp_path, tiny_shards, straight, cli_in_process,
                                                                  fault_row):
    from eval.suite import run_suite
    from test_eval_datasets import suite_config

    marker, control = tmp_path / "pwned", tmp_path / "control"
    torch.save({"payload": Planted(control)}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.exists()  # the payload is live: an unsafe load would run it

    evil_ckpt = tmp_path / "evil" / f"step_{SAVE_EVERY:08d}"
    shutil.copytree(checkpoint_dir(straight, SAVE_EVERY), evil_ckpt)
    state = torch.load(evil_ckpt / "train_state.pt", weights_only=True)
    torch.save({**state, "step": Planted(marker)}, evil_ckpt / "train_state.pt")
    evil_weights = tmp_path / "evil.pt"
    torch.save({"state_dict": load_file(str(evil_ckpt / WEIGHTS)), "payload": Planted(marker)}, evil_weights)

    refused = {}
    for key, extra in (("train.resume", f"train.resume={evil_ckpt}"),
                       ("model.pretrained", f"model.pretrained={evil_weights}")):
        with pytest.raises(Exception, match="Weights only load failed") as e:
            cli_in_process(train_args(tmp_path / key, tiny_shards, extra))
        refused[key] = type(e.value).__name__
    records = run_suite(suite_config(tmp_path / "eval", f"{TINY_MODEL}:{evil_weights}",
                                     [{"name": "any", "path": str(tiny_shards), "label_field": "colour",
                                       "classnames": COLOURS, "templates": ["a {c} object."]}]))
    assert [r["metric"] for r in records] == ["error"] and "Weights only load failed" in records[0]["error"]
    assert not marker.exists()
    fault_row(area="hostile input", fault="checkpoint and weights files carrying pickled code",
              happened=f"resume from a train_state.pt with a payload: {refused['train.resume']}; model.pretrained "
                       f"with one: {refused['model.pretrained']}; eval ARCH:WEIGHTS: an error record; each says "
                       f"'Weights only load failed'",
              lost=f"nothing ran: the payload's file was created {int(marker.exists())} times (a plain torch.load "
                   f"created it {int(control.exists())} time)")


# -- configs: negative sizes, paths that do not exist ------------------------------------------------------

NEGATIVE_SIZES = ["prep.image_size=-32", "prep.samples_per_shard=0", "prep.max_image_bytes=-1", "prep.deadline=-5",
                  "prep.filters.min_caption_chars=-1", "train.steps=-10", "train.save_every=0",
                  "train.shuffle_buffer=-1", "train.keep_last=-1", "eval.batch_size=-8", "demo.num_train=-1"]


@pytest.mark.fault
def test_negative_sizes_are_config_errors(fault_row):
    refused = []
    for override in NEGATIVE_SIZES:
        key = override.split("=")[0]
        with pytest.raises(ConfigError) as e:
            load_config([DEMO], [override])
        assert key in str(e.value), (override, str(e.value))
        refused.append(override)
    fault_row(area="config", fault="negative or zero sizes (" + ", ".join(NEGATIVE_SIZES) + ")",
              happened=f"{len(refused)} of {len(NEGATIVE_SIZES)} refused by load_config with a ConfigError naming "
                       f"the key (e.g. \"{e.value}\")",
              lost="nothing: raised while the config loads, before any stage starts")


@pytest.mark.fault
def test_missing_paths_fail_before_any_work(tmp_path, tiny_shards, cli_in_process, capsys, fault_row):
    nowhere = tmp_path / "does-not-exist"
    cases = {
        "train.data": ["train", DEMO, TINY, f"run.output_dir={tmp_path / 'a'}", f"train.data={nowhere}"],
        "model.pretrained": ["train", DEMO, TINY, f"run.output_dir={tmp_path / 'b'}", f"train.data={tiny_shards}",
                             f"model.name={TINY_MODEL}", f"model.pretrained={nowhere}.safetensors"],
        "eval.checkpoint": ["eval", DEMO, TINY, f"run.output_dir={tmp_path / 'c'}", f"eval.checkpoint={nowhere}"],
        "prep.input_shards": ["prep", DEMO, f"run.output_dir={tmp_path / 'd'}", f"prep.input_shards={nowhere}"],
        "prep.url_list": ["prep", DEMO, f"run.output_dir={tmp_path / 'e'}", f"prep.url_list={nowhere}.parquet"],
    }
    for key, args in cases.items():
        code = cli_in_process(args)
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and str(nowhere) in lines[0], (key, lines)
        out = Path(next(a for a in args if a.startswith("run.output_dir=")).split("=", 1)[1])
        assert not out.exists()  # nothing written: the error came first
        fault_row(area="config", fault=f"{key} names a path that does not exist",
                  happened=f"exit {code}, one line: \"{lines[0].replace(str(tmp_path), '$TMP')[:150]}\"",
                  lost="nothing: run.output_dir was never created")


# -- the table itself ----------------------------------------------------------------------------------------

PLUGIN_DEMO = """
import pytest


@pytest.mark.fault
def test_passes(fault_row):
    fault_row(area="data", fault="row of a passing test", happened="measured 1", lost="0")


@pytest.mark.fault
def test_fails(fault_row):
    fault_row(area="training", fault="row of a failing test", happened="measured 2", lost="1")
    assert False


def test_unmarked(fault_row):
    fault_row(area="data", fault="row of an unmarked test", happened="measured 3", lost="0")
"""


def test_the_table_keeps_the_intro_and_rows_of_passed_fault_tests_only(tmp_path):
    from reliability import MARKER

    (tmp_path / "conftest.py").write_text('pytest_plugins = ["reliability"]\n')
    (tmp_path / "test_demo.py").write_text(PLUGIN_DEMO)
    table = tmp_path / "TABLE.md"
    table.write_text(f"# Intro\n\nwritten by hand\n\n{MARKER}\n\nthe previous table\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    pytest_cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_demo.py")]
    run = subprocess.run([*pytest_cmd, "--reliability-table", str(table)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stdout[-3000:]
    text = table.read_text()
    intro, generated = text.split(MARKER)
    assert intro == "# Intro\n\nwritten by hand\n\n" and "the previous table" not in generated
    assert "--reliability-table" in generated and "**1 passed, 2 failed, 0 skipped**" in generated
    assert "| data | row of a passing test | measured 1 | 0 | `test_demo.py::test_passes` |" in generated
    assert "row of a failing test" not in generated and "row of an unmarked test" not in generated
    assert "- `test_demo.py::test_fails`" in generated and "- `test_demo.py::test_unmarked`" in generated

    again = subprocess.run(pytest_cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and table.read_text() == text  # without the option nothing is written
