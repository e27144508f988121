"""Query stage: local features of query images -> quantised (multiple assignment), aggregated,
searched in the ASMK inverted file -> ranked ``Neighbours``.

Queries are processed in batches: one assignment call for the whole batch (faiss spreads it
over the cores), one vectorised aggregation, one search call (numba, queries over threads).
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
                batch_size: int = 32, alpha: Optional[float] = None, tau: Optional[float] = None,
                use_idf: Optional[bool] = None, show_progress: bool = True,
                timings: Optional[dict] = None) -> Neighbours:
    """Rank the database for every image of a query feature store (or ``keys`` of it)."""
    codebook = load_codebook(codebook)
    index = load_index(index, codebook)
    with FeatureStore(features_path, "r") as store:
        check_extractor(store.config, index.extractor, features_path, index.path or "the index")
        check_model(store.model_fingerprint, index.model_fingerprint, features_path, index.path or "the index")
        keys = store.keys() if keys is None else list(keys)
        indices, scores = [np.zeros((0, k), np.int64)], [np.zeros((0, k), np.float32)]
        db_keys = None
        bar = progress(total=len(keys), desc="query", unit="img", disable=None if show_progress else True)
        for start in range(0, len(keys), batch_size):
            batch = keys[start:start + batch_size]
            descs = [store.descriptors(key) for key in batch]
            part = query_descriptors(index, codebook, descs, batch, k=k,
                                     multiple_assignment=multiple_assignment, alpha=alpha, tau=tau,
                                     use_idf=use_idf, timings=timings)
            indices.append(part.indices)
            scores.append(part.scores)
            db_keys = part.db_keys  # the same index answers every batch
            bar.update(len(batch))
        bar.close()
    return Neighbours(keys, index.slot_keys if db_keys is None else db_keys,
                      np.concatenate(indices), np.concatenate(scores))

