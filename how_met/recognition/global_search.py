"""Global-descriptor baseline: exact inner-product search of PCA-whitened GeM descriptors
(the whitening is ``how_met.features.whitening.PCAWhitening``)."""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

from ..utils import l2_normalise


def global_search(db_desc, q_desc, k: int, batch_size: int = 4096) -> Tuple[np.ndarray, np.ndarray]:
    """Exact inner-product kNN (faiss IndexFlatIP) of L2-normalised descriptors.

    Returns ``(indices (nq, k) int64, scores (nq, k) float32)`` sorted by descending cosine
    similarity, equal scores by ascending database index (the rule of the ASMK top-k), padded
    with -1 / -inf when the database has fewer than k images.
    """
    import faiss

    db = np.ascontiguousarray(l2_normalise(db_desc))
    queries = np.ascontiguousarray(l2_normalise(q_desc))
    if db.ndim != 2 or queries.ndim != 2 or (len(queries) and queries.shape[1] != db.shape[1]):
        raise ValueError(f"database {db.shape} and query {queries.shape} descriptors differ in dimension")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    nq = len(queries)
    indices = np.full((nq, k), -1, np.int64)
    scores = np.full((nq, k), -np.inf, np.float32)
    found = min(k, len(db))
    if found == 0 or nq == 0:
        return indices, scores
    index = faiss.IndexFlatIP(db.shape[1])
    index.add(db)
    for start in range(0, nq, batch_size):
        rows = slice(start, start + batch_size)
        sims, ids = index.search(queries[rows], found)
        order = np.lexsort((ids, -sims))  # per row: score descending, then index ascending
        indices[rows, :found] = np.take_along_axis(ids, order, axis=1)
        scores[rows, :found] = np.take_along_axis(sims, order, axis=1)
    return indices, scores


def global_neighbours(db_desc, q_desc, k: int, db_keys: Sequence[str], query_keys: Sequence[str],
                      batch_size: int = 4096):
    """``global_search`` wrapped as a ``how_met.neighbours.Neighbours``."""
    from ..neighbours import Neighbours

    if len(db_keys) != len(db_desc) or len(query_keys) != len(q_desc):
        raise ValueError(f"{len(db_keys)} database keys for {len(db_desc)} descriptors, "
                         f"{len(query_keys)} query keys for {len(q_desc)} descriptors")
    indices, scores = global_search(db_desc, q_desc, k, batch_size)
    return Neighbours(query_keys=list(query_keys), db_keys=list(db_keys), indices=indices, scores=scores)
