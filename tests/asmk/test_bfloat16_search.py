"""bfloat16 word assignment: the exact search's words and distances, the same answers on any
number of threads, the running best of each row kept right (ties, NaN, -inf, blocks), rows with
no word, and "auto" choosing it for 65k words where the CPU has AMX. Its recall on real
descriptors: tests/asmk/test_codebook.py (real museum descriptors). The searches run on any CPU
(without AMX, torch takes slower AVX512-BF16 or emulated paths for the bfloat16 products)."""
import numpy as np
import pytest
import torch

from how_met.asmk.bfloat16_search import CANDIDATES, SPAN, BFloat16Search, _merge_scores
from how_met.asmk.codebook import Codebook
from how_met.asmk.settings import GROUPED_MIN_WORDS

from test_grouped_search import brute, data


def test_bfloat16_search_finds_the_exact_words_and_distances_on_any_threads():
    centroids, x = data(words=3000, n=2500, d=40)  # 3,000 words: 6 product blocks, the last padded
    dist, ids = BFloat16Search(centroids).search(x, 5)
    ref_ids, ref_dist = brute(x, centroids, 5)
    np.testing.assert_array_equal(ids, ref_ids)  # the re-ranking sums in float64, as brute does
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-6)
    two = BFloat16Search(centroids).search(x, 5, threads=2)
    np.testing.assert_array_equal(two[1], ids)
    np.testing.assert_array_equal(two[0], dist)
    cb = Codebook.from_centroids(centroids, method="bfloat16")
    assert cb.method == "bfloat16" and cb.approximate
    np.testing.assert_array_equal(cb.assign(x, 1)[:, 0], ref_ids[:, 0])


def test_fewer_words_than_candidates_and_rows_without_a_word():
    centroids, x = data(seed=1, words=7, n=50, d=8)
    x[3] = np.nan
    dist, ids = BFloat16Search(centroids).search(x, 7)
    ref_ids, _ = brute(np.delete(x, 3, 0), centroids, 7)
    np.testing.assert_array_equal(np.delete(ids, 3, 0), ref_ids)  # every word, in order
    assert (ids[3] == -1).all() and np.isinf(dist[3]).all()  # NaN: no candidate
    cb = Codebook.from_centroids(centroids, method="bfloat16")
    # the codebook hands rows without enough words to the exact search, as it does for the grouped one
    np.testing.assert_array_equal(cb.assign(x, 7), Codebook.from_centroids(centroids).assign(x, 7))


def bfloat16_bits(values):
    return torch.from_numpy(np.asarray(values, np.float32)).to(torch.bfloat16).view(torch.int16).numpy()


def test_merge_scores_keeps_each_rows_best_across_blocks():
    rng = np.random.default_rng(5)
    rows, words, m = 40, 8 * SPAN, CANDIDATES
    values = rng.integers(-20, 20, (rows, 3 * words)).astype(np.float32) / 4  # many ties
    values[0, 5] = np.nan
    values[1, :] = -np.inf  # a row no word scores for
    values[2, 7] = np.inf
    bits = bfloat16_bits(values)
    best_neg = np.full((rows + 3, m), np.inf, np.float32)
    best_i = np.full((rows + 3, m), -1, np.int64)
    for b in range(3):  # three blocks of words, rows 3.. of the running best
        block = np.ascontiguousarray(bits[:, b * words:(b + 1) * words])
        _merge_scores(block, rows, 3, b * words, best_neg, best_i)
    scored = np.where(np.isnan(values), -np.inf, values)
    for r in range(rows):
        order = np.argsort(-scored[r], kind="stable")[:m]  # best first, ties: the earlier word
        finite = scored[r, order] > -np.inf
        np.testing.assert_array_equal(best_i[3 + r][finite], order[finite])
        np.testing.assert_array_equal(-best_neg[3 + r][finite], scored[r, order][finite])
        assert (best_i[3 + r][~finite] == -1).all()
    assert (best_i[:3] == -1).all()  # rows before first_row untouched
    assert (best_i[4] == -1).all() and best_i[5, 0] == 7


def test_auto_is_bfloat16_from_65k_words_with_bfloat16_hardware(monkeypatch):
    import how_met.asmk.codebook as codebook_module
    monkeypatch.setattr(codebook_module, "bfloat16_products_fast", lambda: True)
    assert Codebook.from_centroids(np.zeros((GROUPED_MIN_WORDS, 4), np.float32)).method == "bfloat16"
    assert Codebook.from_centroids(np.zeros((GROUPED_MIN_WORDS // 2, 4), np.float32)).method == "exact"
    grouped = Codebook.from_centroids(np.zeros((GROUPED_MIN_WORDS, 4), np.float32), method="grouped")
    assert grouped.method == "grouped"


def test_bfloat16_is_a_recorded_search_setting(tmp_path):
    centroids, x = data(seed=2, words=600, n=100)
    path = Codebook.from_centroids(centroids, method="bfloat16").save(tmp_path / "cb.npz")
    back = Codebook.load(path)
    assert back.method == "bfloat16" and back.groups is None
    np.testing.assert_array_equal(back.assign(x, 3), brute(x, centroids, 3)[0])
    with pytest.raises(ValueError, match="must be one of"):
        Codebook.from_centroids(centroids, method="bf16")
