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

from ..neighbours import Neighbours
from ..utils import progress
from .settings import DEFAULT_K, DEFAULT_MULTIPLE_ASSIGNMENT

logger = logging.getLogger(__name__)



def load_index_and_codebook(index, codebook):
    """The InvertedFile and Codebook (each given as the object or its path), checked to belong
    together."""
    from .codebook import Codebook
    from .inverted_file import InvertedFile
    if not isinstance(codebook, Codebook):
        codebook = Codebook.load(codebook)
    if not isinstance(index, InvertedFile):
        index = InvertedFile.load(index, mmap=True)
    index.check_codebook(codebook)
    return index, codebook


def _add_time(timings: Optional[dict], name: str, seconds: float) -> None:
    if timings is not None:
        timings[name] = timings.get(name, 0.0) + seconds


def query_descriptors(index, codebook, descriptors: Sequence[np.ndarray],
                      query_keys: Optional[Sequence[str]] = None, k: int = DEFAULT_K,
                      multiple_assignment: int = DEFAULT_MULTIPLE_ASSIGNMENT,
                      alpha: Optional[float] = None, tau: Optional[float] = None,
                      use_idf: Optional[bool] = None, timings: Optional[dict] = None) -> Neighbours:
    """Search a batch of query images given as a list of (n_i, d) descriptor arrays.

    timings: if a dict, seconds spent in "quantise", "aggregate" and "search" are added to it.
    """
    from .aggregation import aggregate
    index, codebook = load_index_and_codebook(index, codebook)
    query_keys = [str(i) for i in range(len(descriptors))] if query_keys is None else list(query_keys)
    if len(query_keys) != len(descriptors):
        raise ValueError(f"{len(query_keys)} query keys for {len(descriptors)} descriptor sets")
    counts = np.array([len(d) for d in descriptors], np.int64)
    parts = [np.asarray(d, np.float32) for d in descriptors if len(d)]
    desc = np.concatenate(parts) if parts else np.zeros((0, codebook.dim), np.float32)
    if desc.ndim != 2 or desc.shape[1] != codebook.dim:
        raise ValueError(f"query descriptors of dimension {desc.shape[1:]} do not match the codebook's {codebook.dim}")
    t0 = time.perf_counter()
    ma = min(int(multiple_assignment), len(codebook.centroids))
    words = codebook.assign(desc, ma)
    t1 = time.perf_counter()
    agg = aggregate(desc, words, codebook.centroids, np.repeat(np.arange(len(descriptors)), counts),
                         binary=index.binary)
    t2 = time.perf_counter()
    result = index.search_aggregated(agg, k=k, query_keys=query_keys, alpha=alpha, tau=tau, use_idf=use_idf)
    t3 = time.perf_counter()
    _add_time(timings, "quantise", t1 - t0)
    _add_time(timings, "aggregate", t2 - t1)
    _add_time(timings, "search", t3 - t2)
    return result


def query_store(index, codebook, features_path, k: int = DEFAULT_K,
                multiple_assignment: int = DEFAULT_MULTIPLE_ASSIGNMENT, keys: Optional[Sequence[str]] = None,
                batch_size: int = 32, alpha: Optional[float] = None, tau: Optional[float] = None,
                use_idf: Optional[bool] = None, show_progress: bool = True,
                timings: Optional[dict] = None) -> Neighbours:
    """Rank the database for every image of a query feature store (or ``keys`` of it)."""
    from ..features.settings import check_extractor, check_model
    from ..features.store import FeatureStore
    index, codebook = load_index_and_codebook(index, codebook)
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
    return Neighbours(keys, index._keys if db_keys is None else db_keys,
                      np.concatenate(indices), np.concatenate(scores))

