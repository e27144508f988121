"""Benchmark of shortlist reranking: ms per query to rerank N candidates of n features each.

``bench_rerank(...)`` is imported by ``eval/bench_asmk.py`` for its "rerank 100 candidates per
query" line; run this file alone for the breakdown::

    python eval/bench_rerank.py [--candidates 100] [--features 1000] [--words 65536] [--queries 5]

Synthetic data: random 128-D descriptors and a k-means-free codebook (random centroids; the
cost does not depend on what the centroids are). One candidate in ten is a planar warp of the
query (RANSAC then stops early); the others are unrelated (RANSAC runs to its hypothesis
budget), which is the expensive, realistic case for a global shortlist.

Reported: query preparation (multiple assignment + aggregation), candidate preparation per
candidate (read + quantise + aggregate: paid once, then cached), and the rerank itself with a
warm cache, with and without spatial verification.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from how_met.features import FeatureStore, LocalFeatures  # noqa: E402
from how_met.rerank import Reranker  # noqa: E402

STRIDE = 16
IMAGE = (1024, 768)


class _FlatCodebook:
    """Exact nearest-centroid assignment with faiss (stands in when how_met.codebook is absent)."""

    def __init__(self, centroids: np.ndarray):
        import faiss

        self.centroids = np.ascontiguousarray(centroids, np.float32)
        self._index = faiss.IndexFlatL2(self.centroids.shape[1])
        self._index.add(self.centroids)

    def assign(self, descriptors: np.ndarray, k: int = 1) -> np.ndarray:
        return self._index.search(np.ascontiguousarray(descriptors, np.float32), k)[1]


def _codebook(centroids: np.ndarray):
    try:
        from how_met.codebook import Codebook
        return Codebook(centroids)
    except (ImportError, TypeError):
        return _FlatCodebook(centroids)


def _random_features(rng, n, dim, desc=None, keypoints=None):
    scales = rng.choice([1.0, 0.707, 0.5], n).astype(np.float32)
    if keypoints is None:
        keypoints = rng.uniform([0, 0], IMAGE, (n, 2))
    if desc is None:
        desc = rng.normal(size=(n, dim))
    locations = np.floor(keypoints * scales[:, None] / STRIDE).astype(np.int32)
    return LocalFeatures(desc.astype(np.float32), np.ones(n, np.float32), locations, scales, IMAGE, IMAGE)


def bench_rerank(n_candidates: int = 100, n_features: int = 1000, n_words: int = 65536, dim: int = 128,
                 n_queries: int = 5, matching: str = "mnn", seed: int = 0, workdir=None) -> dict:
    """Time reranking; returns ms figures (see the module docstring) and a one-line summary."""
    from how_met.rerank import SpatialParams

    rng = np.random.default_rng(seed)
    codebook = _codebook(rng.normal(size=(n_words, dim)).astype(np.float32))
    queries = [_random_features(rng, n_features, dim) for _ in range(n_queries)]
    H = np.array([[0.9, 0.1, 30.0], [-0.1, 0.9, 20.0], [1e-4, 0.0, 1.0]])
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = Path(tmp) / "db.h5"
        keys = [f"db/{i:05d}.jpg" for i in range(n_candidates)]
        with FeatureStore(path, "a") as store:
            store.set_config({"stride": STRIDE})
            for i, key in enumerate(keys):
                if i % 10 == 0:  # a planar view of query i % n_queries
                    q = queries[(i // 10) % n_queries]
                    kp = q.keypoints(STRIDE).astype(np.float64)
                    p = np.c_[kp, np.ones(len(kp))] @ H.T
                    feats = _random_features(rng, n_features, dim,
                                             q.descriptors + rng.normal(0, 0.3, q.descriptors.shape),
                                             np.clip(p[:, :2] / p[:, 2:], 0, np.array(IMAGE) - 1))
                else:
                    feats = _random_features(rng, n_features, dim)
                store.write(key, feats)
        with Reranker(path, codebook, spatial=SpatialParams(matching=matching)) as rr:
            t0 = time.perf_counter()
            prepared = [rr.prepare_query(q) for q in queries]
            t1 = time.perf_counter()
            for key in keys:
                rr.candidate(key)
            t2 = time.perf_counter()
            for q in prepared:
                rr.rerank(q, keys, verify=False)
            t3 = time.perf_counter()
            for q in prepared:
                rr.rerank(q, keys, verify=True)
            t4 = time.perf_counter()
    out = {
        "candidates": n_candidates, "features": n_features, "words": n_words, "matching": matching,
        "prepare_query_ms": 1e3 * (t1 - t0) / n_queries,
        "prepare_candidate_ms": 1e3 * (t2 - t1) / n_candidates,
        "rerank_asmk_only_ms": 1e3 * (t3 - t2) / n_queries,
        "rerank_verified_ms": 1e3 * (t4 - t3) / n_queries,
    }
    out["line"] = (f"rerank {n_candidates} candidates per query: {out['rerank_verified_ms']:.0f} ms "
                   f"({out['rerank_asmk_only_ms']:.1f} ms ASMK only; cached candidates, {n_features} "
                   f"features each; + {out['prepare_query_ms']:.0f} ms query quantisation, "
                   f"{out['prepare_candidate_ms']:.1f} ms per uncached candidate)")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--features", type=int, default=1000)
    p.add_argument("--words", type=int, default=65536)
    p.add_argument("--queries", type=int, default=5)
    p.add_argument("--matching", choices=["mnn", "words"], default="mnn")
    args = p.parse_args(argv)
    from how_met.utils import configure_threads
    configure_threads()
    out = bench_rerank(args.candidates, args.features, args.words, n_queries=args.queries,
                       matching=args.matching)
    print(out["line"])
    print(json.dumps({k: v for k, v in out.items() if k != "line"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
