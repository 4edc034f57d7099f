"""The shard stream: deterministic, exact on resume, and never stopped by a bad sample or shard."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from clipline.shards import iter_tar_members, iter_tar_samples, list_shards
from training.augment import pil_decoder
from training.data import ShardStream, StreamState, make_loader

from conftest import make_samples, write_shard


def identity_tokens(texts):
    return torch.tensor([[len(t), sum(map(ord, t)) % 9973] for t in texts])


def random_crop(image):
    """A transform that draws random numbers, like the training augmentation does."""
    t = torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32).copy()).flatten()
    return t + torch.rand(1)


def stream(shards, state=None, n_streams=1, rank=0, world_size=1, batch=8):
    return ShardStream(shards, batch_size=batch, rank=rank, world_size=world_size, seed=3, shuffle_buffer=20,
                       decode=pil_decoder(random_crop), tokenizer=identity_tokens, n_streams=n_streams, state=state)


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_own_tar_reader_matches_tarfile(tiny_shards):
    shard = list_shards(str(tiny_shards))[0]
    with open(shard, "rb") as f:
        ours = list(iter_tar_members(f))
    with tarfile.open(shard) as tar:
        theirs = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    assert ours == theirs and len(ours) == 48 * 3


def test_reader_handles_pax_long_names(tmp_path):
    path = tmp_path / "pax.tar"
    long_key = "k" * 150
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for ext, data in (("txt", "é caption".encode()), ("json", b"{}")):
            info = tarfile.TarInfo(f"{long_key}.{ext}")
            info.size = len(data)
            info.pax_headers = {"comment": "x"}
            tar.addfile(info, io.BytesIO(data))
    samples = list(iter_tar_samples(str(path), Counter()))
    assert samples == [{"txt": "é caption".encode(), "json": b"{}"}]


def test_same_config_same_batches(tiny_shards):
    shards = list_shards(str(tiny_shards))
    a = take(make_loader(stream(shards), workers=0), 6)
    b = take(make_loader(stream(shards), workers=0), 6)
    for x, y in zip(a, b):
        assert torch.equal(x.images, y.images) and torch.equal(x.texts, y.texts)
    assert not torch.equal(a[0].texts, a[1].texts)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_the_exact_sequence(tiny_shards, workers):
    shards = list_shards(str(tiny_shards))
    n_streams = max(1, workers)
    full = take(make_loader(stream(shards, n_streams=n_streams), workers), 30)  # > one epoch of 192 samples
    state = StreamState(positions=[0] * n_streams)
    for batch in full[:13]:
        state.advance(batch)
    resumed = take(make_loader(stream(shards, state=state, n_streams=n_streams), workers), 17)
    for i, (x, y) in enumerate(zip(full[13:], resumed)):
        assert torch.equal(x.images, y.images), f"batch {13 + i} differs after resume"
        assert torch.equal(x.texts, y.texts)


def test_ranks_read_disjoint_shards_each_epoch(tiny_shards):
    shards = list_shards(str(tiny_shards))
    seen = [set(), set()]
    for rank in (0, 1):
        s = stream(shards, rank=rank, world_size=2)
        seen[rank] = set(s._epoch_shards(0, rank))
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(shards)


@pytest.mark.fault
def test_bad_samples_and_shards_are_skipped_and_counted(tmp_path, fault_row):
    good = make_samples(20, seed=5)
    write_shard(tmp_path / "00000.tar", good[:10] + [dict(good[0], key="bad000001", jpg=b"not a jpeg")])
    # non-UTF-8 caption and a sample with no image
    with tarfile.open(tmp_path / "00001.tar", "w") as tar:
        for name, data in (("x1.jpg", good[2]["jpg"]), ("x1.txt", b"\xff\xfe bad"), ("x2.txt", b"orphan caption")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    write_shard(tmp_path / "00002.tar", good[10:20])
    raw = (tmp_path / "00002.tar").read_bytes()
    (tmp_path / "00002.tar").write_bytes(raw[: len(raw) // 2])  # truncated mid-shard
    s = stream(list_shards(str(tmp_path)), batch=4)
    batches = take(make_loader(s, workers=0), 5)
    skipped = batches[-1].skipped
    assert skipped["undecodable_image"] >= 1 and skipped["non_utf8_caption"] >= 1
    assert skipped["missing_image"] >= 1 and skipped["unreadable_shard"] >= 1
    assert all(b.images.shape[0] == 4 for b in batches)
    fault_row(area="data", fault="truncated shard, undecodable image, non-UTF-8 caption, sample without an image",
              happened=f"skipped and counted by reason {dict(skipped)}; the stream went on",
              lost=f"only the bad samples: {len(batches)} full batches of {batches[0].images.shape[0]} from the rest")


def test_stream_state_must_match_streams(tiny_shards):
    with pytest.raises(ValueError, match="expected 2"):
        stream(list_shards(str(tiny_shards)), state=StreamState(positions=[0]), n_streams=2)


def test_resampled_mode_draws_with_replacement_deterministically(tiny_shards):
    shards = list_shards(str(tiny_shards))
    s = ShardStream(shards, batch_size=8, rank=0, world_size=1, seed=3, shuffle_buffer=20,
                    decode=pil_decoder(random_crop), tokenizer=identity_tokens, n_streams=1, resampled=True)
    epochs = [s._epoch_shards(e, 0) for e in range(12)]
    assert epochs == [s._epoch_shards(e, 0) for e in range(12)]  # deterministic
    assert all(len(e) == len(shards) for e in epochs)
    assert any(len(set(e)) < len(e) for e in epochs)  # with replacement: some epoch repeats a shard
    batches = take(make_loader(s, workers=0), 3)
    assert all(b.images.shape[0] == 8 for b in batches)


def test_list_shards_accepts_folders_patterns_and_folder_patterns(tmp_path):
    from conftest import make_shard_folder

    for part in (0, 1):
        make_shard_folder(tmp_path / f"part-{part}", n_shards=2 + part, per_shard=2, seed=part)
    assert len(list_shards(str(tmp_path / "part-{0..1}"))) == 5
    assert len(list_shards(str(tmp_path / "part-1"))) == 3
    assert list_shards(str(tmp_path / "part-0/{00000..00001}.tar"))[1].endswith("part-0/00001.tar")
    with pytest.raises(FileNotFoundError, match="do not exist"):
        list_shards(str(tmp_path / "part-{0..2}"))


def test_a_stream_where_nothing_decodes_is_an_error_not_a_hang(tiny_shards, monkeypatch):
    import training.data

    def broken(data, rng):
        raise OSError("cannot identify image file")

    monkeypatch.setattr(training.data, "MAX_UNUSABLE_IN_A_ROW", 50)
    s = ShardStream(list_shards(str(tiny_shards)), batch_size=8, rank=0, world_size=1, seed=3, shuffle_buffer=20,
                    decode=broken, tokenizer=identity_tokens, n_streams=1)
    with pytest.raises(RuntimeError, match=r"50 samples in a row could not be used \(undecodable_image=50.*"
                                           r"cannot identify image file"):
        take(make_loader(s, workers=0), 1)


def test_a_stream_whose_shards_all_vanish_is_an_error_not_a_hang(tmp_path):
    from conftest import make_shard_folder

    folder = make_shard_folder(tmp_path / "gone", n_shards=2, per_shard=4, seed=5)
    shards = list_shards(str(folder))
    for shard in shards:
        (folder / shard.rsplit("/", 1)[-1]).unlink()
    s = stream(shards)
    with pytest.raises(RuntimeError, match=r"read no sample in 3 passes.*unreadable_shard=6"):
        take(make_loader(s, workers=0), 1)
