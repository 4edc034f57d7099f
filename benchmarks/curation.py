"""Cost of the curation filters on CPU: image embedding and semantic dedup (k-means + within-cluster search),
samples per second at each --n, and how the cost grows from one size to the next.

    .venv/bin/python benchmarks/curation.py [--n 10000 100000] [--model tiny] [--embed-max 10000]
    .venv/bin/python benchmarks/curation.py --n 2000          # smoke run (seconds)

Embedding: photo-like 256 px JPEGs (benchmarks/input_pipeline.picture) embedded by --model: 'tiny' (the randomly
initialised configs/models/clipline-tiny-rn.json: the cost of a small ResNet, not of a real CLIP), thumbnail:N, or
any prep.filters.embed_model spec. Embedding costs the same per image at every size, so it is measured on
min(n, --embed-max) images and the samples/s reported for larger n are that measurement (said in the output).

Semantic dedup: synthetic unit embeddings (--dim, float32) with known truth: n * --dup-fraction of them are near
copies (cosine ~0.99) of others, the rest are independent. Measured in one process: the k-means fit on
min(n, --kmeans-sample) rows (faiss), the assignment of every row, and the within-cluster search with
--clusters clusters at eps --eps (data_prep.clusters, as `clipline prep` runs them per cluster group). The removed
count is checked against the planted copies. The search within a cluster costs O(members x kept), so with a
fixed cluster count it grows about quadratically in n; keep n / clusters (members per cluster) constant, as
SemDeDup does, and it grows linearly (--clusters-per 1000 sets clusters = n / 1000).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _bench import machine, write_result  # noqa: E402


def embed_rate(n: int, model: str, batch_size: int) -> dict:
    from input_pipeline import picture

    from data_prep.embed import embedder

    spec = model
    if model == "tiny":
        spec = str(_tiny_weights())
    rng = np.random.default_rng(0)
    images = [picture(rng, 256, 256) for _ in range(n)]
    e = embedder(spec, "cpu", batch_size)
    e.images(images[:batch_size])  # warm-up: first-call allocations and kernel selection
    start = time.perf_counter()
    x = e.images(images)
    seconds = time.perf_counter() - start
    return {"images": n, "seconds": round(seconds, 3), "samples_per_s": round(n / seconds, 1), "dim": int(x.shape[1])}


def _tiny_weights() -> str:
    import tempfile

    import open_clip
    import torch
    from safetensors.torch import save_file

    from clipline.models import register_architecture

    arch_file = REPO / "configs" / "models" / "clipline-tiny-rn.json"
    torch.manual_seed(0)
    model = open_clip.create_model(register_architecture(str(arch_file)))
    path = Path(tempfile.mkdtemp()) / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return f"{arch_file}:{path}"


def synthetic(n: int, dim: int, dup_fraction: float, seed: int = 0) -> tuple[np.ndarray, int]:
    """Unit rows; the last n * dup_fraction are near copies (cosine ~0.99) of distinct earlier rows."""
    rng = np.random.default_rng(seed)
    copies = int(n * dup_fraction)
    base = rng.standard_normal((n - copies, dim)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    src = rng.choice(n - copies, size=copies, replace=False)
    noise = rng.standard_normal((copies, dim)).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    near = base[src] + 0.14 * noise
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    return np.concatenate([base, near]), copies


def dedup_rate(n: int, dim: int, clusters: int, eps: float, kmeans_sample: int, dup_fraction: float) -> dict:
    from data_prep.clusters import assign, dedup_cluster, fit_centroids, preference

    x, planted = synthetic(n, dim, dup_fraction)
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(n, size=min(kmeans_sample, n), replace=False))
    centroids = fit_centroids(x[sample], clusters, 20, 0)
    t1 = time.perf_counter()
    cluster, cos = assign(x, centroids)
    t2 = time.perf_counter()
    removed = 0
    for c in range(len(centroids)):
        members = np.flatnonzero(cluster == c)
        if len(members) > 1:
            keep, _ = dedup_cluster(x[members], preference(cos[members], None, members), eps)
            removed += int((~keep).sum())
    t3 = time.perf_counter()
    total = t3 - t0
    return {"n": n, "dim": dim, "clusters": len(centroids), "kmeans_s": round(t1 - t0, 3),
            "assign_s": round(t2 - t1, 3), "search_s": round(t3 - t2, 3), "seconds": round(total, 3),
            "samples_per_s": round(n / total, 1), "planted_copies": planted, "removed": removed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--embed-max", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--clusters", type=int, default=100)
    ap.add_argument("--clusters-per", type=int, default=0, help="if set: clusters = n / this (constant members)")
    ap.add_argument("--eps", type=float, default=0.05)
    ap.add_argument("--kmeans-sample", type=int, default=100_000)
    ap.add_argument("--dup-fraction", type=float, default=0.3)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "curation.json"))
    args = ap.parse_args()

    embed = embed_rate(min(max(args.n), args.embed_max), args.model, args.batch_size)
    print(f"embedding ({args.model}): {embed['samples_per_s']} images/s on {embed['images']} images "
          f"(the rate used for every n: per-image cost does not depend on n)")
    rows = []
    for n in args.n:
        clusters = max(1, n // args.clusters_per) if args.clusters_per else args.clusters
        d = dedup_rate(n, args.dim, clusters, args.eps, args.kmeans_sample, args.dup_fraction)
        both = n / (n / embed["samples_per_s"] + d["seconds"])
        rows.append({**d, "embed_samples_per_s": embed["samples_per_s"],
                     "embed_measured_on": embed["images"], "embed_plus_dedup_samples_per_s": round(both, 1)})
        print(f"n={n}: semantic dedup (synthetic {args.dim}-d embeddings, {d['clusters']} clusters) "
              f"{d['samples_per_s']} samples/s (k-means {d['kmeans_s']} s, assign {d['assign_s']} s, search "
              f"{d['search_s']} s), removed {d['removed']} of {d['planted_copies']} planted copies; embedding + "
              f"dedup {both:.1f} samples/s")
    for a, b in zip(rows, rows[1:]):
        print(f"n x{b['n'] / a['n']:.0f}: dedup time x{b['seconds'] / max(a['seconds'], 1e-9):.1f}, search time "
              f"x{b['search_s'] / max(a['search_s'], 1e-9):.1f}")
    path = write_result(args.out, {"machine": machine(), "embedding": embed, "rows": rows,
                                   "note": "dedup runs on synthetic embeddings with planted near copies; the "
                                           "embedding rate is measured once on embed_measured_on images"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
