"""The binary search kernel gives bit-identical rankings and scores to the stamp-based kernel it
replaced (kept here, single-threaded, as the reference; its sums float32 as the kernel's are now),
and scores within float32 rounding of float64 sums, on random indexes with idf weights,
zero-weight words, removed images, fewer touched images than k, and codes of 1, 2 and 3 words."""
import numpy as np
import pytest
from numba import njit

from how_met.asmk import codes
from how_met.asmk.kernels import _popcount, search_binary, top_k


def reference_search_binary(q_off, q_words, q_codes, q_scale, offsets, vecs, image_ids, db_scale,
                            word_weight, table, k, single=True):
    """The reference's top k, its scores summed in float32 (single) or float64."""
    acc = np.zeros(len(db_scale), np.float32 if single else np.float64)
    return _reference(q_off, q_words, q_codes, q_scale, offsets, vecs, image_ids, db_scale,
                      word_weight, table, k, acc)


@njit(cache=True)
def _reference(q_off, q_words, q_codes, q_scale, offsets, vecs, image_ids, db_scale, word_weight,
               table, k, acc):
    nq = len(q_off) - 1
    n_db = len(db_scale)
    nb = vecs.shape[1]
    out_i = np.full((nq, k), -1, np.int64)
    out_s = np.full((nq, k), -np.inf, np.float64)
    term = acc[:1].copy()  # one term, rounded to the sums' precision
    stamp = np.full(n_db, -1, np.int32)
    touched = np.empty(n_db, np.int64)
    heap_s, heap_i = np.empty(k, np.float64), np.empty(k, np.int64)
    for q in range(nq):
        n_touched = 0
        for j in range(q_off[q], q_off[q + 1]):
            w = q_words[j]
            wt = word_weight[w]
            if wt == 0.0:
                continue
            for p in range(offsets[w], offsets[w + 1]):
                h = 0
                for b in range(nb):
                    h += _popcount(q_codes[j, b] ^ vecs[p, b])
                img = image_ids[p]
                if stamp[img] != q:
                    stamp[img] = q
                    acc[img] = 0.0
                    touched[n_touched] = img
                    n_touched += 1
                term[0] = wt * table[h]
                acc[img] += term[0]
        top_k(touched, n_touched, acc, db_scale, q_scale[q], k, heap_s, heap_i, out_i[q], out_s[q])
    return out_i, out_s


def random_index(rng, n_db, n_words, per_image, nb):
    postings = [(w, img) for img in range(n_db)
                for w in rng.choice(n_words, min(per_image, n_words), replace=False)]
    postings.sort()
    words = np.array([w for w, _ in postings], np.int64)
    image_ids = np.array([i for _, i in postings], np.uint32)
    offsets = np.zeros(n_words + 1, np.int64)
    np.cumsum(np.bincount(words, minlength=n_words), out=offsets[1:])
    vecs = rng.integers(0, 2 ** 63, (len(words), nb), dtype=np.int64).astype(np.uint64)
    vecs[::7] = vecs[0]  # repeated codes: tied scores
    db_scale = 1.0 / np.sqrt(np.bincount(image_ids, minlength=n_db).clip(1))
    db_scale[rng.random(n_db) < 0.1] = 0.0  # removed images
    return offsets, vecs, image_ids, db_scale


@pytest.mark.parametrize("nb,n_db,tau,use_idf,workers", [
    (2, 700, 0.0, False, 1), (2, 700, 0.0, True, 2), (2, 130, -0.4, True, 3), (1, 300, 0.1, False, 2),
    (3, 300, 0.0, True, 1)])
def test_identical_to_the_reference_kernel(nb, n_db, tau, use_idf, workers):
    rng = np.random.default_rng(nb * 1000 + n_db)
    n_words = 200
    offsets, vecs, image_ids, db_scale = random_index(rng, n_db, n_words, 25, nb)
    df = np.diff(offsets)
    weight = codes.idf_weights(df, n_db) if use_idf else np.ones(n_words)
    weight[rng.choice(n_words, 10, replace=False)] = 0.0
    k = int(np.diff(offsets).max()) + 5  # more than one word's postings: query 4 is padded
    nq = 9
    per_query = rng.integers(0, 60, nq)
    per_query[3] = 0  # a query without words
    per_query[4] = 1  # few touched images: padded with -1 / -inf
    q_words = np.concatenate([np.sort(rng.choice(n_words, m, replace=False)) for m in per_query]).astype(np.int64)
    q_off = np.concatenate(([0], np.cumsum(per_query))).astype(np.int64)
    q_codes = rng.integers(0, 2 ** 63, (len(q_words), nb), dtype=np.int64).astype(np.uint64)
    q_codes[::5] = vecs[0]
    q_scale = rng.uniform(0.05, 0.2, nq)
    table = codes.kernel_table(64 * nb, 3.0, tau)
    args = (q_off, q_words, q_codes, q_scale, offsets, vecs, image_ids, db_scale, weight, table, k)
    ref_i, ref_s = reference_search_binary(*args)
    got_i, got_s = search_binary(*args, workers)
    assert np.array_equal(got_i, ref_i)
    assert np.array_equal(got_s, ref_s)  # bit for bit, -inf padding included
    assert (ref_i[4] == -1).any() and (ref_i[3] == -1).all()
    # float32 sums: the scores of float64 sums within rounding (the rankings may differ in ties)
    exact_i, exact_s = reference_search_binary(*args, single=False)
    found = np.isfinite(exact_s)
    assert np.array_equal(np.isfinite(got_s), found)
    np.testing.assert_allclose(got_s[found], exact_s[found], rtol=1e-5, atol=1e-9)
    assert (got_i[:, 0] == exact_i[:, 0]).mean() > 0.8
    # a second call reuses no state: the same answer
    again_i, again_s = search_binary(*args, workers)
    assert np.array_equal(again_i, ref_i) and np.array_equal(again_s, ref_s)
