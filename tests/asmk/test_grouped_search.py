"""Grouped word assignment: exact when every group is probed, the same answers on any number of
threads, groups stored in the codebook file (plain arrays, validated on load), the exact search
for descriptors whose probed groups hold fewer than k words, and "auto" choosing it for 65k words
where the CPU has no AMX (test_bfloat16_search.py: where it has).
Its recall on real descriptors: tests/asmk/test_codebook.py (real museum descriptors)."""
import zipfile

import numpy as np
import pytest

from how_met.asmk.codebook import Codebook
from how_met.asmk.grouped_search import GroupedSearch, train_groups
from how_met.asmk.settings import GROUPED_MIN_WORDS


def data(seed=0, words=2048, n=3000, d=16):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(64, d)).astype(np.float32) * 2
    centroids = (centres[rng.integers(0, 64, words)] + rng.normal(size=(words, d))).astype(np.float32)
    x = (centres[rng.integers(0, 64, n)] + rng.normal(size=(n, d))).astype(np.float32)
    return centroids, x


def brute(x, centroids, k):
    full = ((x[:, None].astype(np.float64) - centroids[None]) ** 2).sum(-1)
    return np.argsort(full, axis=1, kind="stable")[:, :k], np.sort(full, axis=1)[:, :k]


def test_every_group_probed_is_the_exact_search_and_threads_agree():
    centroids, x = data()
    groups = train_groups(centroids, 32, seed=1)
    search = GroupedSearch(centroids, *groups, probes=32)
    dist, ids = search.search(x, 5)
    ref_ids, ref_dist = brute(x, centroids, 5)
    assert np.mean(ids == ref_ids) > 0.999  # float32 against float64 distances: rare near-ties
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-4, atol=1e-3)
    few = GroupedSearch(centroids, *groups, probes=4)
    one, two = few.search(x, 5, threads=1), few.search(x, 5, threads=2)
    np.testing.assert_array_equal(one[1], two[1])
    np.testing.assert_array_equal(one[0], two[0])
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(one[1], ref_ids)])
    assert 0.5 < recall < 1.0  # 4 of 32 groups: approximate, and said to be by the test above


def test_groups_are_seeded_saved_and_validated(tmp_path):
    centroids, x = data(seed=2)
    cb = Codebook.from_centroids(centroids, method="grouped", probes=8)
    assert cb.method == "grouped" and cb.approximate
    ids = cb.assign(x, 5)
    again = Codebook.from_centroids(centroids, method="grouped", probes=8).assign(x, 5)
    np.testing.assert_array_equal(ids, again)  # the same groups from the same centroids
    path = cb.save(tmp_path / "cb.npz")
    with zipfile.ZipFile(path) as z:
        assert sorted(z.namelist()) == ["centroids.npy", "group_centroids.npy", "meta_json.npy", "word_group.npy"]
    back = Codebook.load(path)
    assert back.method == "grouped" and back.probes == 8 and back.groups is not None
    np.testing.assert_array_equal(back.assign(x, 5), ids)
    assert Codebook.load(path, probes=2).probes == 2
    with np.load(path, allow_pickle=False) as f:
        arrays = dict(f)
    arrays["word_group"] = arrays["word_group"].copy()
    arrays["word_group"][3] = len(arrays["group_centroids"])  # a group that does not exist
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    with pytest.raises(ValueError, match="bad.npz.*word groups outside"):
        Codebook.load(bad)


def test_too_few_words_in_the_probed_groups_falls_back_to_exact():
    centroids, x = data(seed=3, words=640, n=200)
    cb = Codebook.from_centroids(centroids, method="grouped", probes=1)  # 10 groups of ~64 words
    cb.assign(x[:1], 1)
    k = int(np.bincount(cb.groups[1]).max()) + 1  # more than any one group holds
    np.testing.assert_array_equal(cb.assign(x, k), Codebook.from_centroids(centroids).assign(x, k))


def test_auto_is_grouped_from_65k_words_without_bfloat16_hardware(monkeypatch):
    import how_met.asmk.codebook as codebook_module
    monkeypatch.setattr(codebook_module, "bfloat16_products_fast", lambda: False)
    small = Codebook.from_centroids(np.zeros((GROUPED_MIN_WORDS // 2, 4), np.float32))
    large = Codebook.from_centroids(np.zeros((GROUPED_MIN_WORDS, 4), np.float32))
    assert small.method == "exact" and large.method == "grouped"
    assert Codebook.from_centroids(np.zeros((GROUPED_MIN_WORDS, 4), np.float32), method="exact").method == "exact"


def test_auto_falls_back_to_exact_when_the_grouped_recall_is_short(monkeypatch, caplog):
    import how_met.asmk.codebook as codebook_module
    monkeypatch.setattr(codebook_module, "GROUPED_MIN_WORDS", 256)
    monkeypatch.setattr(codebook_module, "bfloat16_products_fast", lambda: False)
    _, x = data(seed=4, n=12000)
    few = Codebook(size=512, probes=1, seed=0).train(x, recall_sample=500)
    assert few.method == "exact" and few.meta["assignment_recall"]["method"] == "exact"
    assert few.meta["assignment_recall"]["recall"] == 1.0
    assert any("assigns with the exact search" in r.getMessage() for r in caplog.records)
    every = Codebook(size=512, probes=8, seed=0).train(x, recall_sample=500)  # all 8 groups: exact distances
    assert every.method == "grouped" and every.meta["assignment_recall"]["method"] == "grouped"


def test_kth_smallest_agrees_with_partition():
    from numba import njit

    from how_met.asmk.grouped_search import _kth_smallest

    @njit
    def kth(values, k):
        return _kth_smallest(values.copy(), len(values), k)

    rng = np.random.default_rng(3)
    for trial in range(400):
        n = int(rng.integers(1, 200))
        values = (rng.integers(0, 4, n) if trial % 2 else rng.normal(size=n)).astype(np.float32)  # ties too
        k = int(rng.integers(0, n))
        assert kth(values, k) == np.partition(values, k)[k]
    assert kth(np.array([3.0, 1.0, 2.0], np.float32), 0) == 1.0
    assert kth(np.array([3.0, 1.0, 2.0], np.float32), 2) == 3.0
