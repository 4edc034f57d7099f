"""Per-sample filters and the funnel that accounts for every sample they remove.

Each filter is a function from a table of samples (one row each) to a boolean Series "removed", keyed by a
reason. :class:`Funnel` applies them in order, so a sample is counted once, under the first reason that removed
it, and every stage's count equals the previous count minus what it removed.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import numpy as np
import pandas as pd

from clipline.config import PrepConfig, PrepFilterConfig
from clipline.errors import UsageError


@dataclass
class Stage:
    name: str
    count: int
    """Samples left after this stage."""
    removed: dict[str, int] = field(default_factory=dict)
    """reason -> samples this stage removed."""


class Funnel:
    """listed -> ... -> written: counts after every stage and what each stage removed, by reason."""

    def __init__(self, stages: list[dict] | None = None):
        """``stages``: a funnel as :meth:`to_list` wrote it, to continue it."""
        self.stages = [Stage(s["stage"], s["count"], dict(s["removed"])) for s in stages or []]

    def start(self, name: str, count: int) -> None:
        self.stages.append(Stage(name, int(count)))

    def record(self, name: str, removed: dict[str, int]) -> None:
        """A stage that removed ``removed`` from the current count."""
        removed = {k: int(v) for k, v in removed.items() if v}
        self.stages.append(Stage(name, self.count - sum(removed.values()), removed))

    @property
    def count(self) -> int:
        return self.stages[-1].count if self.stages else 0

    def apply(self, name: str, keep: pd.Series, checks: list[tuple[str, pd.Series]]) -> pd.Series:
        """Remove, among rows still kept, those each check flags (first reason wins); return the new keep mask."""
        removed = {}
        for reason, flagged in checks:
            hit = keep & flagged.astype(bool)
            removed[reason] = int(hit.sum())
            keep = keep & ~hit
        self.record(name, removed)
        return keep

    def to_list(self) -> list[dict]:
        return [{"stage": s.name, "count": s.count, "removed": s.removed} for s in self.stages]


# ------------------------------------------------------------------------------------------------------------
# Captions


@lru_cache(maxsize=8)
def _boilerplate_re(patterns: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE)


_IDENTIFIER_LOCK = threading.Lock()
_IDENTIFIER: list = []


def _language_identifier():
    """py3langid's identifier, loaded once per process (its model is 68 MB of LZMA: ~0.5 s to decompress)."""
    with _IDENTIFIER_LOCK:  # a preload in progress finishes first; nobody loads it twice
        if not _IDENTIFIER:
            try:
                from py3langid.langid import MODEL_FILE, LanguageIdentifier
            except ImportError:
                raise UsageError("prep.filters.languages needs the language detector py3langid (pip install "
                                 "py3langid); or set prep.filters.languages=[] to keep every language") from None
            _IDENTIFIER.append(LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True))
        return _IDENTIFIER[0]


def preload_language_identifier() -> None:
    """Start loading the language model in a background thread. Its LZMA decompression releases the GIL, so it
    runs beside whatever the caller does next (prep imports img2dataset and torch meanwhile); the first
    :func:`detect_languages` waits for it. A failure is left for that call to raise."""
    def load() -> None:
        try:
            _language_identifier()
        except Exception:  # noqa: BLE001 - raised again, with its message, where the model is used
            pass

    threading.Thread(target=load, name="language-model", daemon=True).start()


def detect_languages(captions: pd.Series) -> tuple[pd.Series, pd.Series]:
    """(ISO 639-1 code, probability) of each caption, from py3langid's model shipped inside the package."""
    identify = _language_identifier().classify
    results = [identify(c) for c in captions]
    return (pd.Series([r[0] for r in results], index=captions.index),
            pd.Series([float(r[1]) for r in results], index=captions.index))


LANGUAGE_ROWS_PER_PROCESS = 20_000
"""Captions per language-id process (~2 s of work, about as long as prep's imports): a list of n captions gets
n / 20,000 processes, at least one, at most ``prep.processes``."""

_FORKED_CAPTIONS: list[str] = []
"""The captions a :class:`LanguageJob`'s processes read: set before they fork, so nothing is sent to them."""


def _classify_forked(lo: int, hi: int, conn) -> None:
    # Runs in a forked process: the model loads here, not in the parent, whose signal handlers it does not keep.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        t0 = time.process_time()
        identify = _language_identifier().classify
        results = [identify(c) for c in _FORKED_CAPTIONS[lo:hi]]
        conn.send(("ok", np.array([r[0] for r in results], dtype="U8"),
                   np.array([r[1] for r in results], dtype=np.float64), time.process_time() - t0))
    except BaseException as e:  # noqa: BLE001 - the parent raises it with its message
        conn.send(("error", f"{type(e).__name__}: {e}", None, 0.0))
    finally:
        conn.close()


class LanguageJob:
    """Language identification of a list's captions, started before `clipline prep` imports img2dataset and torch
    (seconds in one thread) and collected after: in forked processes (``LANGUAGE_ROWS_PER_PROCESS`` captions each,
    up to ``processes``), so that on a machine with a second core it costs no wall time, and a long list is
    classified in parallel. Where fork is unavailable, the model loads in a background thread (its LZMA
    decompression releases the GIL) and the captions are classified in this process when asked for."""

    def __init__(self, captions: pd.Series, processes: int):
        import importlib.util
        import multiprocessing

        self.index = captions.index
        self.cpu_seconds = 0.0
        """CPU seconds the forked processes spent (model load and classification)."""
        self._lang: pd.Series | None = None
        self._score: pd.Series | None = None
        self._pending: list = []
        self._in_process: pd.Series | None = None
        """The captions, where they are classified in this process (no fork)."""
        if importlib.util.find_spec("py3langid") is None:
            _language_identifier()  # raises the UsageError that says how to install it
        if "fork" not in multiprocessing.get_all_start_methods() or not len(captions):
            self._in_process = captions
            preload_language_identifier()
            return
        ctx = multiprocessing.get_context("fork")
        n = len(captions)
        k = max(1, min(processes, n // LANGUAGE_ROWS_PER_PROCESS))
        _FORKED_CAPTIONS[:] = captions.tolist()
        bounds = np.linspace(0, n, k + 1).astype(int)
        try:
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                receive, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_classify_forked, args=(int(lo), int(hi), send), daemon=True,
                                   name="prep-language-id")
                proc.start()
                send.close()
                self._pending.append((proc, receive))
        finally:
            _FORKED_CAPTIONS.clear()  # the children have their copies

    def result(self) -> tuple[pd.Series, pd.Series]:
        """(language, probability) per caption, indexed as the captions given."""
        if self._lang is None:
            if self._in_process is not None:
                self._lang, self._score = detect_languages(self._in_process)
            elif not self._pending:
                raise RuntimeError("language identification was stopped (close()) before its answer was collected")
            else:
                langs, scores = [], []
                for proc, conn in self._pending:
                    try:
                        status, lang, score, cpu = conn.recv()
                    except EOFError:  # the process died (killed, out of memory): say so rather than guess
                        proc.join()
                        raise RuntimeError(f"language identification process exited with code {proc.exitcode} "
                                           f"before answering; re-run, or set prep.filters.languages=[]") from None
                    proc.join()
                    if status != "ok":
                        raise RuntimeError(f"language identification failed: {lang}")
                    langs.append(lang)
                    scores.append(score)
                    self.cpu_seconds += cpu
                self._pending.clear()
                self._lang = pd.Series(np.concatenate(langs), index=self.index, dtype=object)
                self._score = pd.Series(np.concatenate(scores), index=self.index)
        return self._lang, self._score

    def close(self) -> None:
        """Stop the processes whose answer was not collected (the list failed a later check, or every caption
        was removed before the language filter): they would otherwise wait to hand it over until this process
        exits."""
        for proc, conn in self._pending:
            proc.kill()  # not terminate(): a SIGTERM handler the parent had (a trainer's, a test's) is inherited
            proc.join()
            conn.close()
        self._pending.clear()

    def lookup(self, captions: pd.Series) -> tuple[pd.Series, pd.Series]:
        """The results for ``captions``, a subset (by index) of the captions the job was started with."""
        lang, score = self.result()
        return lang.loc[captions.index], score.loc[captions.index]


def _words(text: pd.Series) -> pd.Series:
    return text.str.split().str.len()  # whitespace-separated, as DataComp counts them


def caption_checks(f: PrepFilterConfig, languages: LanguageJob | None = None
                   ) -> list[tuple[str, Callable[[pd.Series], pd.Series]]]:
    """(reason, captions -> flagged) per caption filter, cheapest first; the language detector runs last (or
    ``languages`` has classified the captions already)."""
    checks = [("caption_too_short", lambda t: t.str.len() < f.min_caption_chars)]
    if f.max_caption_chars:
        checks.append(("caption_too_long", lambda t: t.str.len() > f.max_caption_chars))
    checks.append(("too_few_words", lambda t: _words(t) < f.min_caption_words))
    if f.max_caption_words:
        checks.append(("too_many_words", lambda t: _words(t) > f.max_caption_words))
    if f.drop_boilerplate and f.boilerplate_patterns:
        pattern = _boilerplate_re(tuple(f.boilerplate_patterns))
        checks.append(("boilerplate_caption", lambda t: t.map(lambda c: pattern.fullmatch(c) is not None)))
    if f.languages:
        def wrong_language(t: pd.Series) -> pd.Series:
            lang, score = languages.lookup(t) if languages is not None else detect_languages(t)
            return ~lang.isin(set(f.languages)) | (score < f.min_language_score)
        checks.append(("wrong_language", wrong_language))
    return checks


REMOVED_CAPTION_EXAMPLES = 10
"""Most common removed captions kept per reason, for report.md: so a person can judge each filter."""


def count_removed(removed_captions: dict[str, Counter] | None, reason: str, captions) -> None:
    if removed_captions is not None and len(captions):
        removed_captions.setdefault(reason, Counter()).update(captions)


def top_removed(removed_captions: dict[str, Counter]) -> dict[str, list[list]]:
    """reason -> [[caption, times removed], ...], the most common first (ties in first-seen order)."""
    return {reason: [[c, n] for c, n in counts.most_common(REMOVED_CAPTION_EXAMPLES)]
            for reason, counts in removed_captions.items() if counts}


def caption_text(captions: pd.Series) -> pd.Series:
    """The captions as the caption filters read them."""
    return captions.astype(str).str.strip()


def caption_keep_mask(captions: pd.Series, f: PrepFilterConfig, funnel: Funnel, name: str = "caption filters",
                      removed_captions: dict[str, Counter] | None = None,
                      languages: LanguageJob | None = None) -> pd.Series:
    """Which captions pass every caption filter; each check sees only the captions still kept. The removed
    captions are counted per reason into ``removed_captions``. ``languages``: a job started on
    ``caption_text(captions)`` (same index)."""
    text = caption_text(captions)
    keep = pd.Series(True, index=captions.index)
    removed = {}
    for reason, check in caption_checks(f, languages):
        rows = keep.index[keep.values]
        flagged = check(text.loc[rows]).to_numpy(dtype=bool) if len(rows) else np.zeros(0, bool)
        removed[reason] = int(flagged.sum())
        count_removed(removed_captions, reason, text.loc[rows[flagged]].tolist())
        keep.loc[rows[flagged]] = False
    funnel.record(name, removed)
    return keep


# ------------------------------------------------------------------------------------------------------------
# Image size and shape, from the original dimensions img2dataset records


def image_shape_checks(width: pd.Series, height: pd.Series, cfg: PrepConfig) -> list[tuple[str, pd.Series]]:
    w, h = width.astype(float), height.astype(float)
    short, long_ = np.minimum(w, h), np.maximum(w, h)
    checks = []
    if cfg.min_image_size:
        checks.append(("image_too_small", short < cfg.min_image_size))
    if cfg.max_aspect_ratio:
        checks.append(("aspect_ratio_too_large", long_ / np.maximum(short, 1) > cfg.max_aspect_ratio))
    return checks


# ------------------------------------------------------------------------------------------------------------
# All filters over shards, applied shard by shard in (shard, key) order


class SampleFilters:
    """The filters that run on downloaded (or existing) samples, with their state: hashes seen so far, the eval
    index, the CLIP scorer. Fed one shard at a time in order, a sample is judged only against earlier ones, so the
    survivors can be written as they come; only a CLIP top fraction has to see every score first (``deferred``).

    Stages, in order: caption filters (for existing shards; a build applies them to the list), decodable (when
    perceptual hashes are needed), image size, exact dedup, near dedup, decontamination, CLIP score.
    """

    def __init__(self, cfg: PrepConfig, caption_filters: bool, stats: dict):
        from data_prep.dedup import HammingIndex, eval_hash_index

        f = self.f = cfg.filters
        self.cfg = cfg
        self.caption_filters = caption_filters
        self.needs_phash = f.near_dedup_distance >= 0 or bool(f.decontaminate)
        self.removed: dict[str, Counter] = {}
        for name, on in (("caption filters", caption_filters), ("decodable", self.needs_phash), ("image size", True),
                         ("exact dedup", f.exact_dedup), ("near dedup", f.near_dedup_distance >= 0),
                         ("decontamination", bool(f.decontaminate)), ("CLIP score", bool(f.clip_model))):
            if on:
                self.removed[name] = Counter()
        self.removed_captions: dict[str, Counter] = {}
        """Caption filter reason -> removed captions and how often (with caption_filters)."""
        self._seen: set[str] = set()
        self._near = HammingIndex(f.near_dedup_distance) if f.near_dedup_distance >= 0 else None
        self._eval = None
        if f.decontaminate:
            self._eval, stats["decontamination"] = eval_hash_index(f.decontaminate, f.decontaminate_distance)
        self._scorer = None
        if f.clip_model:
            from data_prep.clip_score import ClipScorer

            self._scorer = ClipScorer(f.clip_model, f.clip_pretrained, f.clip_device, f.clip_batch_size,
                                      precision=f.clip_precision)
        self.deferred = f.clip_keep_fraction is not None
        """A CLIP top fraction: apply_deferred() decides once every shard has been scored."""

    def _drop(self, keep: np.ndarray, stage: str, reason: str, flagged: np.ndarray) -> None:
        hit = keep & flagged
        self.removed[stage][reason] += int(hit.sum())
        keep &= ~hit

    def _first_seen(self, keep: np.ndarray, values: list, seen: Callable, add: Callable) -> np.ndarray:
        flagged = np.zeros(len(keep), dtype=bool)
        for i in np.flatnonzero(keep):
            if values[i] is None:
                continue
            if seen(values[i]):
                flagged[i] = True
            else:
                add(values[i])
        return flagged

    def apply(self, features: pd.DataFrame, images: Callable[[list[int]], list[bytes]]) -> np.ndarray:
        """Keep mask over one shard's rows (``features``, in key order); ``images(rows)`` gives the image bytes
        of those rows, for the CLIP score. Adds a ``clip_score`` column when scoring."""
        keep = np.ones(len(features), dtype=bool)
        if self.caption_filters:
            text = features["caption"].astype(str).str.strip()
            for reason, check in caption_checks(self.f):
                rows = np.flatnonzero(keep)
                flagged = np.zeros(len(keep), dtype=bool)
                if len(rows):
                    flagged[rows] = check(text.iloc[rows]).to_numpy(dtype=bool)
                count_removed(self.removed_captions, reason, text.iloc[np.flatnonzero(flagged)].tolist())
                self._drop(keep, "caption filters", reason, flagged)
        hashes = [None if v is None or v != v else int(v) for v in features["phash"]]
        if self.needs_phash:
            self._drop(keep, "decodable", "undecodable_image", np.array([h is None for h in hashes], dtype=bool))
        for reason, flagged in image_shape_checks(features["width"], features["height"], self.cfg):
            self._drop(keep, "image size", reason, flagged.to_numpy(dtype=bool))
        if self.f.exact_dedup:
            digests = features["sha256"].tolist()
            self._drop(keep, "exact dedup", "duplicate_image",
                       self._first_seen(keep, digests, self._seen.__contains__, self._seen.add))
        if self._near is not None:
            self._drop(keep, "near dedup", "near_duplicate_image",
                       self._first_seen(keep, hashes, self._near.contains_near, self._near.add))
        if self._eval is not None:
            flagged = np.array([h is not None and self._eval.contains_near(h) for h in hashes], dtype=bool)
            self._drop(keep, "decontamination", "near_eval_image", flagged)
        if self._scorer is not None:
            self._score(features, keep, images)
        return keep

    def _score(self, features: pd.DataFrame, keep: np.ndarray, images: Callable) -> None:
        rows = np.flatnonzero(keep)
        scores = np.full(len(features), np.nan)
        if len(rows):
            scores[rows] = self._scorer.scores(images(list(rows)), features["caption"].iloc[rows].tolist())
        features["clip_score"] = scores
        if not self.deferred:
            self._drop(keep, "CLIP score", "low_clip_score", ~(scores >= self.f.clip_min_score))

    def apply_deferred(self, scores: np.ndarray) -> np.ndarray:
        """The CLIP top fraction (and threshold) over every sample that reached it."""
        from data_prep.clip_score import keep_by_score

        keep = np.ones(len(scores), dtype=bool)
        kept = keep_by_score(scores, self.f.clip_min_score, self.f.clip_keep_fraction)
        self._drop(keep, "CLIP score", "below_clip_top_fraction", ~kept)
        return keep

    def record(self, funnel: Funnel) -> None:
        for stage, removed in self.removed.items():
            funnel.record(stage, dict(removed))
