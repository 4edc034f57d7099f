import os
import time

import pytest

from clipline.checkpoint import (MARKER, latest_checkpoint, list_checkpoints, prune_checkpoints, resolve_checkpoint,
                                 save_checkpoint)


def writer(text):
    return lambda p: p.write_text(text)


def test_save_is_complete_and_listed(tmp_path):
    path = save_checkpoint(tmp_path, 5, {"a.txt": writer("five")})
    assert path.name == "step_00000005" and (path / MARKER).is_file() and (path / "a.txt").read_text() == "five"
    assert list_checkpoints(tmp_path) == [(5, path)]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


@pytest.mark.fault
def test_a_failed_write_leaves_the_previous_checkpoint_and_no_folder(tmp_path, fault_row):
    good = save_checkpoint(tmp_path, 1, {"a.txt": writer("one")})

    def boom(p):
        p.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, {"a.txt": boom})
    assert latest_checkpoint(tmp_path) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]
    fault_row(area="training", fault="a checkpoint writer raising OSError half-way (save_checkpoint)",
              happened=f"the error propagated; latest checkpoint still {latest_checkpoint(tmp_path).name}; folder "
                       f"holds {sorted(p.name for p in tmp_path.iterdir())}",
              lost="0: the previous checkpoint is untouched, no partial folder remains")


def test_latest_is_by_step_not_file_time_and_ignores_incomplete(tmp_path):
    new = save_checkpoint(tmp_path, 20, {"a.txt": writer("20")})
    old = save_checkpoint(tmp_path, 3, {"a.txt": writer("3")})
    os.utime(new, (time.time() - 1000, time.time() - 1000))  # the newer step looks older on disk
    (tmp_path / "step_00000099").mkdir()  # a crash mid-write: no marker
    assert latest_checkpoint(tmp_path) == new
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 20]
    assert old.exists()


def test_prune_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, {"a.txt": writer(str(step))})
    prune_checkpoints(tmp_path, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]


def test_resolve_accepts_run_folder_and_names_incomplete(tmp_path):
    ckpt = save_checkpoint(tmp_path / "run" / "checkpoints", 7, {"a.txt": writer("7")})
    assert resolve_checkpoint(tmp_path / "run") == ckpt
    assert resolve_checkpoint(ckpt) == ckpt
    broken = tmp_path / "step_00000009"
    broken.mkdir()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        resolve_checkpoint(broken)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path / "nothing")


def test_saving_the_same_step_again_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 4, {"a.txt": writer("first")})
    path = save_checkpoint(tmp_path, 4, {"a.txt": writer("second")})
    assert (path / "a.txt").read_text() == "second" and len(list_checkpoints(tmp_path)) == 1
