"""Benchmark of shortlist reranking: ms per query to rerank N candidates of n features each.

``bench_rerank(...)`` is imported by ``eval/bench_asmk.py`` for its "rerank 100 candidates per
query" line; run this file alone for the breakdown::

    python eval/bench_rerank.py [--candidates 100] [--features 1000] [--words 65536] [--queries 5]

Synthetic data: random 128-D descriptors and random centroids (the cost does not depend on what
the centroids are). One candidate in ten is a planar view of the query (60% of its features are
noisy copies of the query's, at the warped positions); the others are look-alikes: 20% of their
features are noisy copies of random query features at random positions, so they yield
tentative correspondences without a consistent geometry and RANSAC runs to its hypothesis
budget -- the expensive, realistic case for a global shortlist.

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

from how_met.features.store import FeatureStore, LocalFeatures  # noqa: E402
from how_met.verify.reranker import Reranker  # noqa: E402

STRIDE = 16
IMAGE = (1024, 768)


def _codebook(centroids: np.ndarray):
    from how_met.asmk.codebook import Codebook
    return Codebook.from_centroids(centroids)


def _random_features(rng, n, dim, desc=None, keypoints=None):
    scales = rng.choice([1.0, 0.707, 0.5], n).astype(np.float32)
    if keypoints is None:
        keypoints = rng.uniform([0, 0], IMAGE, (n, 2))
    if desc is None:
        desc = rng.normal(size=(n, dim))
    locations = np.floor(keypoints * scales[:, None] / STRIDE).astype(np.int32)
    return LocalFeatures(desc.astype(np.float32), np.ones(n, np.float32), locations, scales, IMAGE, IMAGE)


def bench_rerank(n_candidates: int = 100, n_features: int = 1000, n_words: int = 65536, dim: int = 128,
                 n_queries: int = 5, matching: str = "words", seed: int = 0, workdir=None) -> dict:
    """Time reranking; returns ms figures (see the module docstring) and a one-line summary."""
    from how_met.verify.reranker import SpatialParams

    rng = np.random.default_rng(seed)
    codebook = _codebook(rng.normal(size=(n_words, dim)).astype(np.float32))
    queries = [_random_features(rng, n_features, dim) for _ in range(n_queries)]
    H = np.array([[0.9, 0.1, 30.0], [-0.1, 0.9, 20.0], [1e-4, 0.0, 1.0]])  # the planar views' warp
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = Path(tmp) / "db.h5"
        keys = [f"db/{i:05d}.jpg" for i in range(n_candidates)]
        with FeatureStore(path, "a") as store:
            store.set_config({"stride": STRIDE})
            for i, key in enumerate(keys):
                q = queries[(i // 10) % n_queries] if i % 10 == 0 else queries[i % n_queries]
                feats = _random_features(rng, n_features, dim)
                if i % 10 == 0:  # a planar view of the query
                    copied = rng.random(n_features) < 0.6
                    kp = q.keypoints(STRIDE).astype(np.float64)[copied]
                    p = np.c_[kp, np.ones(len(kp))] @ H.T
                    kp = np.clip(p[:, :2] / p[:, 2:], 0, np.array(IMAGE) - 1)
                    feats.locations[copied] = np.floor(kp * feats.scales[copied, None] / STRIDE)
                else:  # a look-alike: similar descriptors, no geometry
                    copied = rng.random(n_features) < 0.2
                source = rng.integers(0, n_features, n_features) if i % 10 else np.arange(n_features)
                feats.descriptors[copied] = (q.descriptors[source[copied]]
                                             + rng.normal(0, 0.3, (int(copied.sum()), dim)))
                store.write(key, feats)
        with Reranker(path, codebook, spatial=SpatialParams(matching=matching)) as rr:
            rr.rerank(queries[0], keys[:1])  # loads the compiled numba kernels: not part of the timing
            rr.clear_cache()
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
    p.add_argument("--matching", choices=["mnn", "words"], default="words")
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
