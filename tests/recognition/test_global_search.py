"""Exact inner-product search of global descriptors."""
import numpy as np
import pytest

from how_met.recognition.global_search import global_search
from how_met.utils import l2_normalise


def test_exact_search_matches_brute_force():
    rng = np.random.default_rng(4)
    db, queries = rng.normal(size=(500, 32)), rng.normal(size=(40, 32))
    indices, scores = global_search(db, queries, k=10, batch_size=16)
    sims = l2_normalise(queries) @ l2_normalise(db).T
    expected = np.argsort(-sims, axis=1)[:, :10]
    assert indices.tolist() == expected.tolist()
    assert scores == pytest.approx(np.take_along_axis(sims, expected, axis=1), abs=1e-5)
    assert indices.dtype == np.int64 and scores.dtype == np.float32


def test_search_pads_when_database_is_small():
    rng = np.random.default_rng(5)
    indices, scores = global_search(rng.normal(size=(3, 8)), rng.normal(size=(2, 8)), k=5)
    assert (indices[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
    assert sorted(indices[0, :3].tolist()) == [0, 1, 2]
    assert (np.diff(scores[:, :3], axis=1) <= 0).all()


def test_global_neighbours_wraps_neighbours():
    from how_met.recognition.global_search import global_neighbours
    rng = np.random.default_rng(6)
    nb = global_neighbours(rng.normal(size=(4, 8)), rng.normal(size=(2, 8)), 3, list("abcd"), ["q1", "q2"])
    assert nb.indices.shape == (2, 3) and nb.db_keys == list("abcd") and nb.query_keys == ["q1", "q2"]


def test_equal_global_scores_rank_by_database_index():
    rng = np.random.default_rng(5)
    db = rng.normal(size=(6, 16)).astype(np.float32)
    db[[1, 4]] = db[5]  # three identical database images
    indices, scores = global_search(db, np.stack([db[5], db[0]]), k=4)
    assert indices[0, :3].tolist() == [1, 4, 5] and scores[0, 0] == scores[0, 2]
    assert indices[1, 0] == 0
