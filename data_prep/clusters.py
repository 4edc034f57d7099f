"""k-means over embeddings (faiss), and the two filters built on it.

SemDeDup (Abbas et al. 2023): cluster the image embeddings; within each cluster, walk the members from the one the
rule ranks first (closest to the centroid, or highest CLIP score) and drop each member whose cosine similarity to a
member already kept exceeds 1 - eps. Each dropped sample is paired with the kept one it is closest to, so every
group of duplicates keeps exactly one representative.

DataComp's image-based clustering (Gadre et al. 2023): cluster the image embeddings, embed each class name of the
target eval datasets as text, and keep the samples whose cluster is among the ``nearest`` clusters nearest to some
class name.

Only the centroids are global (fit on a sample); assignment runs per shard and the within-cluster search per
cluster, so no process holds every embedding.
"""

from __future__ import annotations

import numpy as np

from clipline.errors import UsageError


def _faiss():
    try:
        import faiss
    except ImportError:
        raise UsageError("prep.filters.semantic_dedup / cluster_filter_classnames need faiss "
                         "(pip install faiss-cpu)") from None
    return faiss


def fit_centroids(sample: np.ndarray, clusters: int, iterations: int, seed: int) -> np.ndarray:
    """Spherical k-means centroids (unit rows) of ``sample``; fewer clusters when the sample is smaller."""
    faiss = _faiss()
    x = np.ascontiguousarray(sample, dtype=np.float32)
    k = max(1, min(clusters, len(x)))
    kmeans = faiss.Kmeans(x.shape[1], k, niter=iterations, seed=seed, spherical=True, verbose=False,
                          min_points_per_centroid=1, max_points_per_centroid=max(256, len(x)))
    kmeans.train(x)
    c = kmeans.centroids.astype(np.float32)
    return c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)


def assign(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nearest centroid, cosine to it) of each row; ties go to the lower centroid index."""
    if len(x) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    sims = x @ centroids.T
    best = sims.argmax(axis=1)
    return best, sims[np.arange(len(x)), best]


def dedup_cluster(x: np.ndarray, rank: np.ndarray, eps: float) -> tuple[np.ndarray, list[tuple[int, int, float]]]:
    """Within one cluster: ``x`` its members' unit embeddings, ``rank`` their order of preference (0 first).
    Returns (keep mask, [(kept member, removed member, cosine)])."""
    order = np.argsort(rank, kind="stable")
    keep = np.zeros(len(x), dtype=bool)
    kept: list[int] = []
    pairs = []
    threshold = 1.0 - eps
    for i in order:
        if kept:
            sims = x[kept] @ x[i]
            j = int(sims.argmax())
            if sims[j] > threshold:
                pairs.append((kept[j], int(i), float(sims[j])))
                continue
        keep[i] = True
        kept.append(int(i))
    return keep, pairs


def preference(centroid_cos: np.ndarray, clip_scores: np.ndarray | None, index: np.ndarray) -> np.ndarray:
    """Rank key per member (lower is kept first): highest CLIP score, else closest to the centroid; ties by the
    global sample index, so the result does not depend on the order the members were gathered in."""
    primary = -(clip_scores if clip_scores is not None else centroid_cos).astype(np.float64)
    primary = np.nan_to_num(primary, nan=np.inf)
    order = np.lexsort((index, primary))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank


def clusters_near_classes(centroids: np.ndarray, class_embeddings: np.ndarray, nearest: int) -> np.ndarray:
    """Sorted ids of the clusters among the ``nearest`` nearest (by cosine) to each class embedding."""
    sims = class_embeddings @ centroids.T
    k = min(nearest, centroids.shape[0])
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.unique(top)
