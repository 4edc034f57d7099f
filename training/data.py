"""Streaming image-text batches from webdataset tar shards, deterministically, so a resume continues exactly.

A rank reads ``workers`` streams (one per DataLoader worker; stream 0 when there are none). In epoch mode the shard
list is permuted each epoch with a seed that depends only on (seed, epoch), and shard i of that order goes to global
stream ``i mod (world_size * workers)``, so ranks and workers read disjoint shards; in resampled mode each stream
draws its shards with replacement from its own seeded generator. A stream shuffles its samples in a seeded buffer and yields full batches, each
tagged with its stream and with how many raw samples the stream had consumed when the batch was complete.
The trainer records the position of every stream after each consumed batch; on resume, every stream fast-forwards
through its tar bytes (no image is decoded) to its recorded position, so the batch sequence goes on as if never
interrupted.

Shards may be remote (s3://, gs://, https://): each is streamed through a read-ahead block cache, a transient
error is retried with backoff and the read resumes at the byte where it stopped (clipline.storage.RetryingReader),
so positions, and with them the resume contract, are the same as for local shards. A shard still failing after
storage.retries retries, or gone, is skipped from there and counted (unreadable_shard) like a corrupt one.

Samples that cannot be used (unreadable tar member, missing image or caption, undecodable image, non-UTF-8 or
empty caption) are skipped and counted, never fatal.
"""

from __future__ import annotations

import logging
import random
import signal
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipline import storage
from clipline.config import StorageConfig
from clipline.shards import iter_tar_samples

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_UNUSABLE_IN_A_ROW = 1000
"""Skipping bad samples is routine; this many in a row is a broken dataset or decoder, and an error."""


@dataclass
class Batch:
    images: torch.Tensor
    texts: torch.Tensor
    stream: int
    """Which of this rank's streams produced the batch."""
    position: int
    """Raw samples that stream had consumed when this batch was complete."""
    skipped: dict = field(default_factory=dict)
    """The stream's running count of skipped samples, by reason."""


@dataclass
class StreamState:
    """Where a rank's data streams stand: saved in checkpoints, restored on resume."""

    positions: list[int]
    next_stream: int = 0

    def advance(self, batch: Batch) -> None:
        self.positions[batch.stream] = batch.position
        self.next_stream = (batch.stream + 1) % len(self.positions)


class ShardStream(IterableDataset):
    """Endless, deterministic batches of (image tensor, token ids) for one rank. ``decode(image_bytes, rng)``
    turns one encoded image into a tensor, drawing its augmentation from ``rng`` (seeded per sample):
    :func:`training.augment.decode_random_crop` (uint8 pixels) or :func:`training.augment.pil_decoder`."""

    def __init__(self, shards: list[str], *, batch_size: int, rank: int, world_size: int, seed: int,
                 shuffle_buffer: int, decode: Callable[[bytes, random.Random], torch.Tensor],
                 tokenizer: Callable, n_streams: int,
                 state: StreamState | None = None, resampled: bool = False,
                 batch_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 storage_cfg: StorageConfig | None = None):
        if not shards:
            raise ValueError("no shards to read")
        self.shards, self.batch_size = list(shards), batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer, self.n_streams, self.resampled = shuffle_buffer, n_streams, resampled
        self.decode, self.tokenizer, self.batch_transform = decode, tokenizer, batch_transform
        # Remote shards are read with these options in every worker, however the worker was started.
        self.storage_cfg = storage_cfg or storage.current()
        self.state = state or StreamState(positions=[0] * n_streams)
        if len(self.state.positions) != n_streams:
            raise ValueError(f"stream state has {len(self.state.positions)} streams, expected {n_streams}")

    def _epoch_shards(self, epoch: int, global_stream: int) -> list[str]:
        total = self.world_size * self.n_streams
        if self.resampled:  # shards drawn with replacement, independently per stream
            rng = random.Random(f"{self.seed}-resample-{epoch}-{global_stream}")
            return rng.choices(self.shards, k=max(1, len(self.shards) // total))
        order = list(self.shards)
        random.Random(f"{self.seed}-shards-{epoch}").shuffle(order)
        # More streams than shards: each stream still gets one shard, so no rank starves and stalls the others.
        return order[global_stream::total] or [order[global_stream % len(order)]]

    def _raw_samples(self, global_stream: int, skipped: Counter) -> Iterator[dict[str, bytes]]:
        epoch, empty_epochs = 0, 0
        while True:
            rng = random.Random(f"{self.seed}-buffer-{epoch}-{global_stream}")
            buffer: list[dict[str, bytes]] = []
            shards, read = self._epoch_shards(epoch, global_stream), 0
            for shard in shards:
                for sample in iter_tar_samples(shard, skipped):
                    read += 1
                    buffer.append(sample)
                    if len(buffer) >= max(1, self.shuffle_buffer):
                        i = rng.randrange(len(buffer))
                        buffer[i], buffer[-1] = buffer[-1], buffer[i]
                        yield buffer.pop()
            rng.shuffle(buffer)
            yield from buffer
            empty_epochs = 0 if read else empty_epochs + 1
            if empty_epochs >= 3:  # would otherwise spin forever without a batch
                counts = ", ".join(f"{k}={v}" for k, v in skipped.most_common()) or "none"
                raise RuntimeError(f"data stream {global_stream} read no sample in 3 passes over its shards "
                                   f"({', '.join(shards[:3])}{', ...' if len(shards) > 3 else ''}; skipped: "
                                   f"{counts}): the shards are missing, empty or unreadable")
            epoch += 1

    def _usable(self, sample: dict[str, bytes], skipped: Counter, global_stream: int,
                position: int) -> tuple[torch.Tensor, str] | None:
        image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
        if image is None or "txt" not in sample:
            skipped["missing_image" if image is None else "missing_caption"] += 1
            return None
        try:
            text = sample["txt"].decode("utf-8").strip()
        except UnicodeDecodeError:
            skipped["non_utf8_caption"] += 1
            return None
        if not text:
            skipped["empty_caption"] += 1
            return None
        # Augmentation randomness is a function of the sample's place in the stream, not of how many samples
        # this process happened to decode: samples skipped on resume must not shift it.
        rng = random.Random(f"{self.seed}-aug-{global_stream}-{position}")
        try:
            return self.decode(image, rng), text
        except Exception as e:  # PIL raises many types for corrupt images
            skipped["undecodable_image"] += 1
            self.last_decode_error = f"{type(e).__name__}: {e}"
            log.debug("undecodable image: %s", self.last_decode_error)
            return None

    def _batches(self, stream: int, start: int) -> Iterator[Batch]:
        skipped: Counter = Counter()
        pending: list[tuple[torch.Tensor, str]] = []
        global_stream = self.rank * self.n_streams + stream
        unusable_in_a_row = 0
        for position, sample in enumerate(self._raw_samples(global_stream, skipped), 1):
            if position <= start:  # consumed before the checkpoint: skip without decoding
                continue
            usable = self._usable(sample, skipped, global_stream, position)
            if usable is None:
                unusable_in_a_row += 1
                if unusable_in_a_row >= MAX_UNUSABLE_IN_A_ROW:
                    raise RuntimeError(self._nothing_usable_message(unusable_in_a_row, skipped))
                continue
            unusable_in_a_row = 0
            pending.append(usable)
            if len(pending) == self.batch_size:
                images = torch.stack([p[0] for p in pending])
                if self.batch_transform is not None:
                    images = self.batch_transform(images)
                texts = self.tokenizer([p[1] for p in pending])
                pending = []
                yield Batch(images, texts, stream, position, dict(skipped))

    last_decode_error = ""

    def _nothing_usable_message(self, n: int, skipped: Counter) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in skipped.most_common())
        last = f"; last decode error: {self.last_decode_error}" if self.last_decode_error else ""
        return (f"{n} samples in a row could not be used ({counts}{last}). Bad samples are skipped one by one, but "
                f"this many means the data or the decoding is broken: check that the shards hold an image "
                f"(.{'/.'.join(IMAGE_EXTS)}) and a UTF-8 .txt caption per sample, or try "
                f"train.image_pipeline=open_clip")

    def __iter__(self) -> Iterator[Batch]:
        storage.configure(self.storage_cfg)
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        if n_workers != self.n_streams:
            raise RuntimeError(f"ShardStream built for {self.n_streams} streams is read by {n_workers} workers")
        # The DataLoader starts its round-robin at worker 0: give worker 0 the stream that was due next.
        stream = (worker + self.state.next_stream) % n_workers
        yield from self._batches(stream, self.state.positions[stream])


def _ignore_stop_signals(worker_id: int) -> None:
    # Slurm and `kill -TERM -PGID` signal the whole process tree. The main process turns SIGTERM/SIGUSR1 into a
    # checkpoint at the next step; a worker that died of it instead would crash the loader first.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def make_loader(stream: ShardStream, workers: int, pin_memory: bool = False) -> DataLoader:
    return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=False, prefetch_factor=4 if workers > 0 else None,
                      worker_init_fn=_ignore_stop_signals if workers > 0 else None)
