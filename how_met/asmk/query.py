"""Query stage: local features of query images -> quantised (multiple assignment), aggregated,
searched in the ASMK inverted file -> ranked ``Neighbours``.

Queries are processed in batches sized by memory (``QUERY_BATCH_MB`` of descriptors and their
assignment and aggregation temporaries, optionally also capped by a count): one assignment call
for the whole batch (spread over the cores), one vectorised aggregation, one search call (numba,
queries over threads).
"""
from __future__ import annotations

import logging
import time
from typing import Optional, Sequence

import numpy as np

from ..features.settings import check_extractor, check_model
from ..features.store import FeatureStore
from ..neighbours import Neighbours
from ..utils import progress
from .aggregation import quantise_and_aggregate
from .codebook import load_codebook
from .inverted_file import load_index
from .settings import DEFAULT_K, DEFAULT_MULTIPLE_ASSIGNMENT

logger = logging.getLogger(__name__)

QUERY_BATCH_MB = 256  # working memory of one query batch (see batch_bytes_per_descriptor)


def batch_bytes_per_descriptor(dim: int, multiple_assignment: int) -> int:
    """Bytes one query descriptor costs while its batch is quantised and aggregated: the float32
    descriptor, and per assignment its word id, the row / key / order indices of aggregation and
    a float32 residual (the largest temporary), and the grouped search's per-probe row index."""
    return 4 * dim + int(multiple_assignment) * (4 * 8 + 4 * dim) + 80 * 8


def query_descriptors(index, codebook, descriptors: Sequence[np.ndarray],
                      query_keys: Optional[Sequence[str]] = None, k: int = DEFAULT_K,
                      multiple_assignment: int = DEFAULT_MULTIPLE_ASSIGNMENT,
                      alpha: Optional[float] = None, tau: Optional[float] = None,
                      use_idf: Optional[bool] = None, timings: Optional[dict] = None) -> Neighbours:
    """Search a batch of query images given as a list of (n_i, d) descriptor arrays.

    timings: if a dict, seconds spent in "quantise", "aggregate" and "search" are added to it.
    """
    codebook = load_codebook(codebook)
    index = load_index(index, codebook)
    query_keys = [str(i) for i in range(len(descriptors))] if query_keys is None else list(query_keys)
    if len(query_keys) != len(descriptors):
        raise ValueError(f"{len(query_keys)} query keys for {len(descriptors)} descriptor sets")
    _, aggregated = quantise_and_aggregate(codebook, descriptors, multiple_assignment, index.binary, timings)
    started = time.perf_counter()
    result = index.search(aggregated, k=k, query_keys=query_keys, alpha=alpha, tau=tau,
                          use_idf=use_idf)
    if timings is not None:
        timings["search"] = timings.get("search", 0.0) + time.perf_counter() - started
    return result


def query_store(index, codebook, features_path, k: int = DEFAULT_K,
                multiple_assignment: int = DEFAULT_MULTIPLE_ASSIGNMENT, keys: Optional[Sequence[str]] = None,
                batch_size: Optional[int] = None, alpha: Optional[float] = None, tau: Optional[float] = None,
                use_idf: Optional[bool] = None, show_progress: bool = True,
                timings: Optional[dict] = None, batch_mb: float = QUERY_BATCH_MB) -> Neighbours:
    """Rank the database for every image of a query feature store (or ``keys`` of it).

    Images are searched in batches of at most ``batch_mb`` MB of working memory
    (``batch_bytes_per_descriptor``; an image larger than that is a batch of its own) and, if
    given, at most ``batch_size`` images."""
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"query: batch_size must be >= 1, got {batch_size}")
    if not batch_mb > 0:
        raise ValueError(f"query: batch_mb must be > 0, got {batch_mb}")
    codebook = load_codebook(codebook)
    index = load_index(index, codebook)
    with FeatureStore(features_path, "r") as store:
        check_extractor(store.config, index.extractor, features_path, index.path or "the index")
        check_model(store.model_fingerprint, index.model_fingerprint, features_path, index.path or "the index")
        keys = store.keys() if keys is None else list(keys)
        indices, scores = [np.zeros((0, k), np.int64)], [np.zeros((0, k), np.float32)]
        db_keys = None
        bar = progress(total=len(keys), desc="query", unit="img", disable=None if show_progress else True)
        budget = batch_mb * 2 ** 20 / batch_bytes_per_descriptor(codebook.dim, multiple_assignment)
        batch, descs, held = [], [], 0

        def flush():
            nonlocal db_keys
            part = query_descriptors(index, codebook, descs, batch, k=k,
                                     multiple_assignment=multiple_assignment, alpha=alpha, tau=tau,
                                     use_idf=use_idf, timings=timings)
            indices.append(part.indices)
            scores.append(part.scores)
            db_keys = part.db_keys  # the same index answers every batch
            bar.update(len(batch))

        for key in keys:
            desc = store.descriptors(key)
            if batch and (held + len(desc) > budget or len(batch) == batch_size):
                flush()
                batch, descs, held = [], [], 0
            batch.append(key)
            descs.append(desc)
            held += len(desc)
        if batch:
            flush()
        bar.close()
    return Neighbours(keys, index.slot_keys if db_keys is None else db_keys,
                      np.concatenate(indices), np.concatenate(scores))

