"""MetaCLIP balancing (Xu et al. 2023, "Demystifying CLIP Data"): captions are matched against a vocabulary of
metadata entries; an entry that more than ``t`` captions match is sampled down to about ``t`` of them, rare entries
are kept whole, and captions that match nothing are dropped.

Per caption with matched entries i: p_i = min(1, t / count_i), and the caption is kept with probability
1 - prod_i(1 - p_i). A caption matching one entry is kept with p_i, so each entry keeps min(count_i, t) captions in
expectation. The counts are summed from per-shard partial counts (no machine needs every caption), and each
sample's draw is a hash of the seed and its key: the kept set does not depend on the order or the parallelism.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np

from clipline.errors import UsageError

DEMO_ENTRIES = Path(__file__).resolve().parents[1] / "configs" / "prep" / "metadata_demo.txt"
"""The entries shipped for the demo scenes: their colours, shapes, sizes, positions, counts and backgrounds."""


def entries_path(spec: str) -> Path:
    path = DEMO_ENTRIES if spec == "demo" else Path(spec)
    if not path.is_file():
        raise UsageError(f"prep.filters.balance_entries: {spec} is not a file; give a text file with one metadata "
                         f"entry a line, or 'demo' for the shipped list")
    return path


def read_entries(spec: str) -> list[str]:
    """The entries, lower-cased, blank lines and repeats dropped (first occurrence kept)."""
    path = entries_path(spec)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"prep.filters.balance_entries: cannot read {path}: {e}") from None
    entries = list(dict.fromkeys(ln.strip().lower() for ln in lines if ln.strip()))
    if not entries:
        raise UsageError(f"prep.filters.balance_entries: {path} holds no entries (one entry a line)")
    return entries


def _automaton(entries: tuple[str, ...]):
    try:
        import ahocorasick
    except ImportError:
        raise UsageError("prep.filters.balance_entries needs pyahocorasick (pip install pyahocorasick)") from None
    automaton = ahocorasick.Automaton()
    for i, entry in enumerate(entries):
        automaton.add_word(entry, (i, len(entry)))
    automaton.make_automaton()
    return automaton


@lru_cache(maxsize=4)
def matcher(spec: str, whole_words: bool) -> "Matcher":
    """One matcher per process and entries file (each worker builds its own automaton once)."""
    return Matcher(read_entries(spec), whole_words)


class Matcher:
    def __init__(self, entries: list[str], whole_words: bool = True):
        self.entries = entries
        self.whole_words = whole_words
        self._automaton = _automaton(tuple(entries))

    def match(self, caption: str) -> list[int]:
        """Indices of the entries in ``caption`` (each once), in entry order."""
        text = caption.lower()
        found = set()
        for end, (i, length) in self._automaton.iter(text):
            start = end - length + 1
            if self.whole_words and ((start > 0 and text[start - 1].isalnum())
                                     or (end + 1 < len(text) and text[end + 1].isalnum())):
                continue
            found.add(i)
        return sorted(found)

    def count(self, captions: list[str]) -> Counter:
        """Captions matching each entry (a partial count: sum them over shards)."""
        counts: Counter = Counter()
        for caption in captions:
            counts.update(self.match(caption))
        return counts


def draw(seed: int, key: str) -> float:
    """A uniform draw in [0, 1) that depends only on the seed and the sample key."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def keep_probability(matched: list[int], counts: np.ndarray, t: int) -> float:
    if not matched:
        return 0.0
    p = np.minimum(1.0, t / counts[matched].astype(np.float64))
    return float(1.0 - np.prod(1.0 - p))


def decide(m: Matcher, captions: list[str], keys: list[str], counts: np.ndarray, t: int, seed: int,
           keep_unmatched: bool) -> tuple[np.ndarray, np.ndarray, Counter]:
    """(keep mask, matched-anything mask, kept captions per entry) for one shard."""
    keep = np.zeros(len(captions), dtype=bool)
    matched_any = np.zeros(len(captions), dtype=bool)
    kept_counts: Counter = Counter()
    for j, (caption, key) in enumerate(zip(captions, keys)):
        matched = m.match(caption)
        matched_any[j] = bool(matched)
        if not matched:
            keep[j] = keep_unmatched
            continue
        if draw(seed, key) < keep_probability(matched, counts, t):
            keep[j] = True
            kept_counts.update(matched)
    return keep, matched_any, kept_counts


def distribution_summary(entries: list[str], before: np.ndarray, after: np.ndarray, t: int, n: int = 10) -> dict:
    """The head and tail of the entry distribution (by count before balancing), before and after, for report.md."""
    order = np.argsort(-before, kind="stable")
    matched = order[before[order] > 0]
    rows = lambda idx: [[entries[i], int(before[i]), int(after[i])] for i in idx]  # noqa: E731
    return {"entries": len(entries), "matched_entries": int(len(matched)), "t": t,
            "entries_over_t": int((before > t).sum()), "head": rows(matched[:n]),
            "tail": rows(matched[-n:][::-1]) if len(matched) > n else []}
