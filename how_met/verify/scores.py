"""Scores of a reranked shortlist: fusing global similarity, ASMK score and inlier count into
one score, and scoring every (query, candidate) pair of a neighbour list with a ``Reranker``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from ..features.settings import check_model
from ..features.store import open_store
from ..neighbours import Neighbours
from ..utils import progress

@dataclass(frozen=True)
class FusionWeights:
    """fused = global_weight * global + asmk_weight * asmk + inlier_weight * r(inliers), with the
    saturating inlier term r(n) = x / (x + inlier_half), x = max(n - min_inliers, 0), in [0, 1):
    a RANSAC fit always finds its minimal sample, and beyond a few dozen inliers more only
    says "yes" more loudly.

    The defaults let the ASMK score lead, the inliers add a bounded bonus and the global
    similarity break ties. Used fixed, they beat the same weights tuned per fold over the
    155-point grid on every shared set (README "Choosing the defaults": global+rerank GAP
    museum 99.2 vs 97.9, grocery 86.0 vs 83.3, landmarks 93.6 vs 93.6): ~80 tuning queries
    cannot choose among 155 weightings without overfitting."""

    global_weight: float = 0.25
    asmk_weight: float = 2.0
    inlier_weight: float = 0.5
    inlier_half: float = 10.0
    min_inliers: int = 4

    def as_dict(self) -> dict:
        return {"global_weight": self.global_weight, "asmk_weight": self.asmk_weight,
                "inlier_weight": self.inlier_weight, "inlier_half": self.inlier_half,
                "min_inliers": self.min_inliers}


def inlier_term(inliers, inlier_half: float = 10.0, min_inliers: int = 4) -> np.ndarray:
    """Saturating map of inlier counts to [0, 1) (see FusionWeights)."""
    x = np.maximum(np.asarray(inliers, np.float64) - min_inliers, 0.0)
    return x / (x + max(float(inlier_half), 1e-12))


def fuse_scores(global_scores, asmk_scores, inliers, weights: Optional[FusionWeights] = None) -> np.ndarray:
    """One score from global similarity, ASMK score and inlier count (arrays of one shape)."""
    w = weights or FusionWeights()
    fused = w.asmk_weight * np.asarray(asmk_scores, np.float64)
    if w.global_weight:
        fused = fused + w.global_weight * np.asarray(global_scores, np.float64)
    if w.inlier_weight:
        fused = fused + w.inlier_weight * inlier_term(inliers, w.inlier_half, w.min_inliers)
    return fused


# ---------------------------------------------------------------------------------------------
# Batch reranking of neighbour lists, and tuning the fusion on validation queries
# ---------------------------------------------------------------------------------------------

@dataclass
class ShortlistScores:
    """The score components of a reranked shortlist, kept apart so that fusion weights can be
    tuned without re-running the verification. All arrays are (nq, k) in shortlist order;
    padding (index -1) has global score -inf, ASMK 0 and 0 inliers."""

    query_keys: List[str]
    db_keys: Sequence[str]
    indices: np.ndarray
    global_scores: np.ndarray
    asmk: np.ndarray
    inliers: np.ndarray

    def fused(self, weights: Optional[FusionWeights] = None) -> np.ndarray:
        """(nq, k) fused scores, -inf at padding."""
        glob = np.where(self.indices >= 0, self.global_scores, 0.0)
        glob = np.where(np.isfinite(glob), glob, 0.0)
        fused = fuse_scores(glob, self.asmk, self.inliers, weights)
        return np.where(self.indices >= 0, fused, -np.inf)

    def fuse(self, weights: Optional[FusionWeights] = None, k: Optional[int] = None):
        """Neighbours sorted by the fused score (ties keep the shortlist order)."""
        fused = self.fused(weights)
        order = np.argsort(-fused, axis=1, kind="stable")[:, :k]
        scores = np.take_along_axis(fused, order, axis=1)
        indices = np.where(np.isfinite(scores), np.take_along_axis(self.indices, order, axis=1), -1)
        return Neighbours(self.query_keys, self.db_keys, indices.astype(np.int64), scores.astype(np.float32))


def score_shortlist(reranker, query_store, shortlist, verify: bool = True,
                    show_progress: bool = True) -> ShortlistScores:
    """Score every (query, candidate) pair of a ``Neighbours`` shortlist with ``reranker``.

    query_store: FeatureStore (or path) with the local features of ``shortlist.query_keys``.
    The shortlist's scores are taken as the global similarities.
    """
    store, owned = open_store(query_store)
    try:
        check_model(store.model_fingerprint, reranker.store.model_fingerprint, store.path, reranker.store.path)
        indices = np.asarray(shortlist.indices, np.int64)
        global_scores = np.asarray(shortlist.scores, np.float32)
        db_keys = shortlist.db_keys
        asmk = np.zeros(indices.shape, np.float32)
        inliers = np.zeros(indices.shape, np.int32)
        query_keys = list(shortlist.query_keys)
        for row, qkey in enumerate(progress(query_keys, desc="rerank", unit="query",
                                            disable=None if show_progress else True)):
            valid = np.flatnonzero(indices[row] >= 0)
            if not len(valid):
                continue
            try:
                feats = store.read(qkey, with_global=False)
            except KeyError:
                raise KeyError(f"{store.path}: no local features for query {qkey!r}") from None
            query = reranker.prepare_query(feats, f"{store.path}:{qkey}")
            keys = [db_keys[i] for i in indices[row, valid]]
            a, n, _ = reranker.score_candidates(query, keys, verify)
            asmk[row, valid] = a
            inliers[row, valid] = n
        return ShortlistScores(query_keys, db_keys, indices, global_scores, asmk, inliers)
    finally:
        if owned:
            store.close()


def rerank_neighbours(reranker, query_store, shortlist, verify: bool = True,
                      weights: Optional[FusionWeights] = None, k: Optional[int] = None,
                      show_progress: bool = True):
    """Rerank a ``Neighbours`` shortlist (e.g. a global top-100): returns Neighbours sorted by
    the fused score (weights default to the reranker's)."""
    scores = score_shortlist(reranker, query_store, shortlist, verify, show_progress)
    return scores.fuse(weights or reranker.weights, k)

