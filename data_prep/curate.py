"""The curation pass of `clipline prep`: semantic dedup (SemDeDup), image-based cluster filtering (DataComp) and
metadata balancing (MetaCLIP), in that order, over the samples the other filters kept.

These filters judge a sample against the whole set, so they run after the per-sample filters: those write their
survivors into ``{output_dir}/_curate/shards`` (instead of ``output_dir``), this pass decides, and the kept
samples are re-sharded into ``output_dir``. Per-shard work (embedding, cluster assignment, entry matching) runs
on the build's distributor (``prep.processes`` spawned processes, or Spark with distributor=pyspark); the global
steps (k-means centroids fit on a sample, per-entry counts summed from per-shard counts) see only small partial
results. Embeddings are cached per shard in ``_curate/embeddings`` and reused by later runs.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from clipline.config import PrepConfig, PrepFilterConfig
from clipline.io import atomic_write_text

CURATE_DIR = "_curate"
PAIRS_FILE = "semdedup_pairs.jsonl"
"""In output_dir: one line per image semantic dedup removed: {"kept", "removed", "cosine", "cluster"}."""

__all__ = ["enabled", "held_session", "staging_dir", "check_inputs", "curate", "Distributor", "report_lines",
           "CURATE_DIR", "PAIRS_FILE"]


def enabled(f: PrepFilterConfig) -> bool:
    return f.semantic_dedup or bool(f.cluster_filter_classnames) or bool(f.balance_entries)


def _embeds(f: PrepFilterConfig) -> bool:
    return f.semantic_dedup or bool(f.cluster_filter_classnames)


def staging_dir(cfg: PrepConfig, out: Path) -> Path:
    """Where the per-sample filters write: ``out`` itself, or the staging folder when a curation filter is on."""
    return out / CURATE_DIR / "shards" if enabled(cfg.filters) else out


@contextlib.contextmanager
def held_session(cfg: PrepConfig):
    """With distributor=pyspark and a curation filter on, one Spark session serves both the download and the
    curation pass (Spark takes tens of seconds to start); otherwise nothing."""
    if cfg.distributor != "pyspark" or not enabled(cfg.filters):
        yield
        return
    from data_prep.downloader import check_backends, spark_session

    check_backends(cfg.distributor, "webdataset")
    with spark_session(cfg.spark_master, cfg.processes):
        yield


def check_inputs(f: PrepFilterConfig) -> None:
    """Files, models and packages the curation filters need: checked before any download."""
    if f.balance_entries:
        from data_prep.balance import matcher

        matcher(f.balance_entries, f.balance_whole_words)
    if _embeds(f):
        from data_prep.clusters import _faiss
        from data_prep.embed import check_model

        _faiss()
        check_model(f.embed_model)
    if f.cluster_filter_classnames:
        _classnames(f.cluster_filter_classnames)


def _classnames(sources: list[str]) -> list[str]:
    from eval.datasets import read_classnames, shipped_file

    names: list[str] = []
    for source in sources:
        names += [n for n in read_classnames(shipped_file(source, "classnames", "prep.filters.cluster_filter_classnames"))
                  if n]
    return list(dict.fromkeys(names))


# ------------------------------------------------------------------------------------------------------------
# Per-shard work, on the distributor


@dataclass(frozen=True)
class Part:
    """One staged shard: its samples are global rows offset .. offset + n - 1 (the order the filters kept them)."""
    path: str
    sha256: str
    offset: int
    n: int


class Distributor:
    """``map(fn, tasks)`` = ``[fn(t) for t in tasks]``, in parallel on the build's distributor, results in task
    order. The worker pool (or Spark session) starts at the first parallel map and serves the whole pass."""

    def __init__(self, cfg: PrepConfig):
        self.cfg = cfg
        self._stack = contextlib.ExitStack()
        self._pool = None
        self._spark = None

    def map(self, fn: Callable, tasks: list) -> list:
        cfg = self.cfg
        if len(tasks) <= 1 or (cfg.processes <= 1 and cfg.distributor != "pyspark"):
            return [fn(t) for t in tasks]
        if cfg.distributor == "pyspark":
            if self._spark is None:
                from data_prep.downloader import spark_session
                from pyspark.sql import SparkSession

                self._stack.enter_context(spark_session(cfg.spark_master, cfg.processes))
                self._spark = SparkSession.getActiveSession().sparkContext
            return self._spark.parallelize(tasks, len(tasks)).map(fn).collect()
        if self._pool is None:
            # spawn, not fork: the parent may hold torch's thread pools, which a forked child can deadlock on.
            self._pool = self._stack.enter_context(multiprocessing.get_context("spawn").Pool(cfg.processes))
        return self._pool.map(fn, tasks, chunksize=1)

    def close(self) -> None:
        self._stack.close()


def _embed_task(args) -> tuple[list[str], int]:
    from data_prep.embed import shard_embeddings

    return shard_embeddings(*args)


def _assign_task(args) -> tuple[np.ndarray, np.ndarray]:
    from data_prep.clusters import assign
    from data_prep.embed import load_embeddings

    path, cache, with_text, centroids = args
    return assign(load_embeddings(path, Path(cache), with_text), centroids)


def _rows(parts: list[Part], cache: Path, with_text: bool, index: np.ndarray) -> np.ndarray:
    """Embeddings of the global rows ``index`` (sorted), read shard by shard (memory-mapped)."""
    from data_prep.embed import load_embeddings

    offsets = np.array([p.offset for p in parts])
    which = np.searchsorted(offsets, index, side="right") - 1
    out = [load_embeddings(parts[s].path, Path(cache), with_text, index[which == s] - parts[s].offset)
           for s in np.unique(which)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _dedup_task(args) -> tuple[np.ndarray, list[tuple[int, int, float, int]]]:
    """Semantic dedup of a group of clusters: (removed global rows, [(kept row, removed row, cosine, cluster)])."""
    from data_prep.clusters import dedup_cluster

    parts, cache, with_text, eps, clusters = args
    removed, pairs = [], []
    for cluster, members, rank in clusters:
        keep, found = dedup_cluster(_rows(parts, cache, with_text, members), rank, eps)
        removed.append(members[~keep])
        pairs += [(int(members[a]), int(members[b]), cos, int(cluster)) for a, b, cos in found]
    return (np.concatenate(removed) if removed else np.zeros(0, np.int64)), pairs


def _captions_task(args) -> list[tuple[str, str]]:
    from clipline.shards import iter_keyed_samples

    return [(k, s.get("txt", b"").decode("utf-8", "replace"))
            for k, s in list(iter_keyed_samples(args, Counter()))]


def _balance_count_task(args) -> tuple[list[str], dict[int, int]]:
    from data_prep.balance import matcher

    path, spec, whole_words, keep = args
    samples = _captions_task(path)
    captions = [c for (_, c), k in zip(samples, keep) if k]
    return [k for k, _ in samples], dict(matcher(spec, whole_words).count(captions))


def _balance_decide_task(args):
    from data_prep.balance import decide, matcher

    path, spec, whole_words, keep, counts, t, seed, keep_unmatched = args
    samples = [s for s, k in zip(_captions_task(path), keep) if k]
    return decide(matcher(spec, whole_words), [c for _, c in samples], [k for k, _ in samples], counts, t, seed,
                  keep_unmatched)


# ------------------------------------------------------------------------------------------------------------
# The pass


class Curation:
    def __init__(self, cfg: PrepConfig, parts: list[Part], keys: list[str], clip_scores: np.ndarray | None,
                 cache: Path, stats: dict, pool: Distributor):
        self.pool = pool
        self.cfg, self.f, self.parts, self.keys, self.cache = cfg, cfg.filters, parts, keys, cache
        self.clip_scores = clip_scores
        self.keep = np.ones(len(keys), dtype=bool)
        self.removed: dict[str, Counter] = {}
        self.info = stats.setdefault("curation", {})
        self.timings = stats.setdefault("timings", {})
        self.pairs: list[dict] = []

    def _check_keys(self, part: Part, keys: list[str]) -> None:
        if keys != self.keys[part.offset:part.offset + part.n]:
            raise RuntimeError(f"curation: the samples of {part.path} are not the ones the filters kept, in order")

    def _drop(self, stage: str, reason: str, rows: np.ndarray) -> None:
        hit = np.zeros(len(self.keep), dtype=bool)
        hit[rows] = True
        hit &= self.keep
        self.removed.setdefault(stage, Counter())[reason] += int(hit.sum())
        self.keep &= ~hit

    def embed(self) -> None:
        start = time.perf_counter()
        f = self.f
        with_text = f.semantic_dedup and f.semdedup_use_text
        from data_prep.embed import model_identity

        identity = model_identity(f.embed_model)
        tasks = [(p.path, p.sha256, str(self.cache), f.embed_model, identity, f.embed_device, f.embed_batch_size,
                  with_text) for p in self.parts]
        computed = 0
        for part, (keys, n) in zip(self.parts, self.pool.map(_embed_task, tasks)):
            self._check_keys(part, keys)
            computed += n
        self.info["embeddings"] = {"model": f.embed_model, "computed": computed, "reused": len(self.keys) - computed}
        self.timings["embed"] = time.perf_counter() - start

    def _clusters(self, clusters: int, with_text: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(centroids, cluster of each global row, cosine to it): centroids fit on a seeded sample of the kept rows."""
        from data_prep.clusters import fit_centroids

        f = self.f
        candidates = np.flatnonzero(self.keep)
        rng = np.random.default_rng(f.kmeans_seed)
        sample = np.sort(rng.choice(candidates, size=min(f.kmeans_sample, len(candidates)), replace=False))
        centroids = fit_centroids(_rows(self.parts, self.cache, with_text, sample), clusters, f.kmeans_iterations,
                                  f.kmeans_seed)
        tasks = [(p.path, str(self.cache), with_text, centroids) for p in self.parts]
        results = self.pool.map(_assign_task, tasks)
        return centroids, np.concatenate([a for a, _ in results]), np.concatenate([c for _, c in results])

    def semantic_dedup(self, out: Path) -> None:
        from data_prep.clusters import preference

        start = time.perf_counter()
        f = self.f
        with_text = f.semdedup_use_text
        centroids, cluster, cos = self._clusters(f.semdedup_clusters, with_text)
        groups = []
        for c in range(len(centroids)):
            members = np.flatnonzero((cluster == c) & self.keep)
            if len(members) > 1:
                scores = self.clip_scores[members] if f.semdedup_keep == "clip_score" else None
                groups.append((c, members, preference(cos[members], scores, members)))
        n_tasks = max(1, min(len(groups), 4 * max(1, self.cfg.processes)))
        tasks = [(self.parts, str(self.cache), with_text, f.semdedup_eps, groups[i::n_tasks]) for i in range(n_tasks)]
        removed, pairs = [], []
        for rows, found in self.pool.map(_dedup_task, tasks) if groups else []:
            removed.append(rows)
            pairs += found
        self._drop("semantic dedup", "semantic_duplicate", np.concatenate(removed) if removed else [])
        pairs.sort(key=lambda p: p[1])
        text = "".join(json.dumps({"kept": self.keys[a], "removed": self.keys[b], "cosine": round(c, 6),
                                   "cluster": k}) + "\n" for a, b, c, k in pairs)
        atomic_write_text(out / PAIRS_FILE, text)
        self.info["semantic_dedup"] = {"clusters": len(centroids), "eps": f.semdedup_eps, "keep": f.semdedup_keep,
                                       "removed": len(pairs), "pairs_file": PAIRS_FILE}
        self.timings["semantic_dedup"] = time.perf_counter() - start

    def cluster_filter(self) -> None:
        from data_prep.clusters import clusters_near_classes
        from data_prep.embed import embedder

        start = time.perf_counter()
        f = self.f
        names = _classnames(f.cluster_filter_classnames)
        model = embedder(f.embed_model, f.embed_device, f.embed_batch_size)
        text = model.texts([f.cluster_filter_template.format(n) for n in names])
        centroids, cluster, _ = self._clusters(f.cluster_filter_clusters, False)
        chosen = clusters_near_classes(centroids, text, f.cluster_filter_nearest)
        self._drop("cluster filter", "outside_eval_clusters", np.flatnonzero(~np.isin(cluster, chosen)))
        self.info["cluster_filter"] = {"clusters": len(centroids), "class_names": len(names),
                                       "kept_clusters": [int(c) for c in chosen]}
        self.timings["cluster_filter"] = time.perf_counter() - start

    def balance(self) -> None:
        from data_prep.balance import distribution_summary, read_entries

        start = time.perf_counter()
        f = self.f
        entries = read_entries(f.balance_entries)
        masks = [self.keep[p.offset:p.offset + p.n] for p in self.parts]
        counts = np.zeros(len(entries), dtype=np.int64)
        tasks = [(p.path, f.balance_entries, f.balance_whole_words, m) for p, m in zip(self.parts, masks)]
        for part, (keys, partial) in zip(self.parts, self.pool.map(_balance_count_task, tasks)):
            self._check_keys(part, keys)
            for i, n in partial.items():
                counts[i] += n
        tasks = [(p.path, f.balance_entries, f.balance_whole_words, m, counts, f.balance_t, f.balance_seed,
                  f.balance_keep_unmatched) for p, m in zip(self.parts, masks)]
        after = np.zeros(len(entries), dtype=np.int64)
        unmatched, balanced = [], []
        for part, mask, (keep, matched, kept_counts) in zip(self.parts, masks,
                                                             self.pool.map(_balance_decide_task, tasks)):
            rows = part.offset + np.flatnonzero(mask)
            unmatched.append(rows[~matched & ~keep])
            balanced.append(rows[matched & ~keep])
            for i, n in kept_counts.items():
                after[i] += n
        self._drop("balance", "no_metadata_match", np.concatenate(unmatched) if unmatched else [])
        self._drop("balance", "balanced_out", np.concatenate(balanced) if balanced else [])
        self.info["balance"] = distribution_summary(entries, counts, after, f.balance_t)
        self.timings["balance"] = time.perf_counter() - start


def _write(parts: list[Part], keep: np.ndarray, out: Path, per_shard: int):
    from clipline.shards import MANIFEST_FILE, SIZES_FILE, iter_keyed_samples
    from data_prep.reshard import ShardWriter, output_files, remove_stale

    for name in (MANIFEST_FILE, SIZES_FILE):
        (out / name).unlink(missing_ok=True)
    remove_stale(out)
    writer = ShardWriter(out, per_shard)
    for p in parts:
        samples = list(iter_keyed_samples(p.path, Counter()))
        for (key, files), kept in zip(samples, keep[p.offset:p.offset + p.n]):
            if kept:
                writer.write(key, output_files(files, {}))
    return writer.close(), writer.checksums


def curate(cfg: PrepConfig, result, staged: Path, out: Path, stats: dict):
    """Run the curation filters over the samples written to ``staged`` (``result``: the per-sample filters'
    :class:`~data_prep.prep.Filtered`) and re-shard the survivors into ``out``; returns the new Filtered."""
    (out / PAIRS_FILE).unlink(missing_ok=True)  # an earlier build's pairs must not outlive a changed config
    if staged == out:
        return result
    f = cfg.filters
    parts, offset = [], 0
    for name in sorted(result.sizes):
        parts.append(Part(str(staged / name), result.checksums[name]["sha256"], offset, result.sizes[name]))
        offset += result.sizes[name]
    kept = result.kept.reset_index(drop=True)
    if offset != len(kept):
        raise RuntimeError(f"curation: {offset} staged samples but {len(kept)} kept rows")
    scores = kept["clip_score"].to_numpy(dtype=np.float64) if "clip_score" in kept else None
    pool = Distributor(cfg)
    run = Curation(cfg, parts, kept["key"].astype(str).tolist(), scores, out / CURATE_DIR / "embeddings", stats,
                   pool)
    try:
        if run.keep.any() and _embeds(f):
            run.embed()
        if run.keep.any() and f.semantic_dedup:
            run.semantic_dedup(out)
        if run.keep.any() and f.cluster_filter_classnames:
            run.cluster_filter()
        if run.keep.any() and f.balance_entries:
            run.balance()
    finally:
        pool.close()
    start = time.perf_counter()
    sizes, checksums = _write(parts, run.keep, out, cfg.samples_per_shard)
    for p in parts:
        Path(p.path).unlink(missing_ok=True)  # the embeddings stay: a re-run re-stages the same bytes
    run.timings["curate_write"] = time.perf_counter() - start
    stages = dict(result.stages)
    for stage in ("semantic dedup", "cluster filter", "balance"):
        if stage in run.removed:
            stages[stage] = run.removed[stage]
    return type(result)(sizes, kept[run.keep].reset_index(drop=True), result.read, stages, checksums)


def report_lines(stats: dict) -> list[str]:
    """report.md's curation section: what each curation filter did (the funnel has the counts)."""
    info = stats.get("curation") or {}
    lines = []
    if "embeddings" in info:
        e = info["embeddings"]
        lines += [f"Embeddings ({e['model']}): {e['computed']} computed, {e['reused']} reused from an earlier run.", ""]
    if "semantic_dedup" in info:
        s = info["semantic_dedup"]
        lines += [f"Semantic dedup: {s['removed']} images within cosine {1 - s['eps']:.3f} of a kept one in "
                  f"{s['clusters']} clusters (kept: {s['keep']}); the pairs are in {s['pairs_file']}.", ""]
    if "cluster_filter" in info:
        c = info["cluster_filter"]
        lines += [f"Cluster filter: {len(c['kept_clusters'])} of {c['clusters']} image clusters are near the "
                  f"{c['class_names']} class names; images in the others were removed.", ""]
    if "balance" in info:
        b = info["balance"]
        lines += ["## Metadata balancing (MetaCLIP)", "",
                  f"{b['matched_entries']} of {b['entries']} entries matched; {b['entries_over_t']} had more than "
                  f"t = {b['t']} captions and were sampled down.", "",
                  "| entry | captions before | kept |", "|---|---:|---:|"]
        lines += [f"| {e} | {n} | {k} |" for e, n, k in b["head"]]
        if b["tail"]:
            lines += ["| ... | | |"] + [f"| {e} | {n} | {k} |" for e, n, k in b["tail"][::-1]]
        lines.append("")
    return lines
