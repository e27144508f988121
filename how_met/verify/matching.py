"""Tentative correspondences between two images' local features: mutual nearest neighbours
(all pairs, or only pairs that share a visual word) and a 1-D vote on their scale ratios."""
from __future__ import annotations

import math
from typing import Tuple

import numba
import numpy as np

@numba.njit(cache=True, nogil=True)
def _row_and_column_argmax(sim):
    """argmax of every row and every column of a C-ordered matrix in one pass over memory
    (numpy's argmax over axis 0 strides across rows and costs several times more)."""
    n, m = sim.shape
    row_best = np.zeros(n, np.int64)
    col_best = np.zeros(m, np.int64)
    col_max = np.full(m, -np.inf, np.float32)
    for i in range(n):
        best = -np.inf
        for j in range(m):
            v = sim[i, j]
            if v > best:
                best = v
                row_best[i] = j
            if v > col_max[j]:
                col_max[j] = v
                col_best[j] = i
    return row_best, col_best


def mutual_nearest_neighbours(query_desc: np.ndarray, db_desc: np.ndarray, min_similarity: float = 0.0
                              ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mutual nearest neighbours of two L2-normalised descriptor sets by cosine similarity.

    Returns (query_ids, db_ids, similarity) of the pairs that are each other's nearest
    neighbour with similarity >= min_similarity.
    """
    if not len(query_desc) or not len(db_desc):
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0, np.float32)
    sim = np.ascontiguousarray(np.asarray(query_desc, np.float32) @ np.asarray(db_desc, np.float32).T)
    best_db, best_query = _row_and_column_argmax(sim)
    q = np.flatnonzero(best_query[best_db] == np.arange(len(query_desc)))
    d = best_db[q]
    s = sim[q, d]
    keep = s >= min_similarity
    return q[keep], d[keep], s[keep]


def shared_word_matches(query_words: np.ndarray, db_words: np.ndarray, query_desc: np.ndarray,
                        db_desc: np.ndarray, min_similarity: float = 0.0, max_per_word: int = 64
                        ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mutual nearest neighbours among the features that share a visual word.

    query_words (n, k): the query features' words (multiple assignment); db_words (m,): the
    database features' words; query_desc, db_desc: their L2-normalised descriptors. Only pairs
    (i, j) with db_words[j] among query i's words are compared (the quantisation prunes the
    n x m similarity matrix); of those, pairs that are each other's most similar (cosine) and
    have similarity >= min_similarity are kept. Words holding more than ``max_per_word``
    database features are skipped (bursts). Returns (query_ids, db_ids, similarity).
    """
    query_words = np.asarray(query_words).reshape(len(query_desc), -1)
    n, k = query_words.shape
    order = np.argsort(db_words, kind="stable")
    sorted_words = db_words[order]
    flat_words = query_words.ravel()
    lo = np.searchsorted(sorted_words, flat_words, "left")
    counts = np.searchsorted(sorted_words, flat_words, "right") - lo
    counts[counts > max_per_word] = 0
    total = int(counts.sum())
    if total == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0, np.float32)
    # Expand every (query feature, word) into its run of database features with that word.
    within = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    db_ids = order[np.repeat(lo, counts) + within]
    query_ids = np.repeat(np.arange(n * k) // k, counts)
    sim = np.einsum("ij,ij->i", query_desc[query_ids], db_desc[db_ids])
    keep = sim >= min_similarity
    query_ids, db_ids, sim = query_ids[keep], db_ids[keep], sim[keep].astype(np.float32)
    # Mutual best: a pair survives when it comes first for its query feature and for its
    # database feature in the order of decreasing similarity (a pair found through two
    # shared words is the same pair twice; either copy may survive, never both).
    by_sim = np.argsort(-sim, kind="stable")
    first_q = np.zeros(len(sim), bool)
    first_q[by_sim[np.unique(query_ids[by_sim], return_index=True)[1]]] = True
    first_d = np.zeros(len(sim), bool)
    first_d[by_sim[np.unique(db_ids[by_sim], return_index=True)[1]]] = True
    mutual = first_q & first_d
    return query_ids[mutual], db_ids[mutual], sim[mutual]


def scale_consistent(log_scale_ratio: np.ndarray, tolerance: float = 2.0) -> np.ndarray:
    """Mask of correspondences whose scale change agrees (within a factor ``tolerance``) with
    the most common one: a 1-D Hough vote on the log scale ratio, a cheap RANSAC prefilter."""
    n = len(log_scale_ratio)
    if n == 0:
        return np.zeros(0, bool)
    width = math.log(tolerance)
    ordered = np.sort(log_scale_ratio)
    # Number of ratios in [r, r + 2 width] for every r: the densest window wins.
    upper = np.searchsorted(ordered, ordered + 2 * width, "right")
    start = int(np.argmax(upper - np.arange(n)))
    centre = 0.5 * (ordered[start] + ordered[upper[start] - 1])
    return np.abs(log_scale_ratio - centre) <= width

