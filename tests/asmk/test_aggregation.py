"""ASMK maths (how_met.asmk.aggregation, how_met.asmk.codes) against deliberately plain loops over the SPEC definitions."""
import numpy as np
import pytest

from how_met.asmk import aggregation
from how_met.utils import l2_normalise
from how_met.asmk import codes as sign_codes


def naive_residual_sums(desc, words, centroids):
    """{word: sum of (descriptor - centroid) over descriptors having that word among theirs}."""
    words = np.asarray(words).reshape(len(desc), -1)
    out = {}
    for w in sorted(set(words.ravel().tolist()) - {-1}):
        members = [i for i in range(len(desc)) if w in words[i].tolist()]
        total = np.zeros(desc.shape[1], np.float32)
        for i in members:
            total += desc[i] - centroids[w]
        out[w] = total
    return out


def test_residual_sums_match_per_word_loop_with_multiple_assignment():
    rng = np.random.default_rng(0)
    centroids = rng.normal(size=(12, 8)).astype(np.float32)
    desc = rng.normal(size=(40, 8)).astype(np.float32)
    words = rng.integers(0, 12, (40, 3))
    words[5] = [-1, 4, -1]          # missing assignments are ignored
    words[6] = [7, 7, 2]            # a repeated word counts once
    sums, w, img = aggregation.residual_sums(desc, words, centroids)
    expected = naive_residual_sums(desc, words, centroids)
    assert w.tolist() == sorted(expected)
    assert (img == 0).all()
    for row, word in zip(sums, w):  # the same float32 additions in the same order
        np.testing.assert_array_equal(row, expected[word])


def test_residual_sums_of_several_images_sorted_by_image_then_word():
    rng = np.random.default_rng(1)
    centroids = rng.normal(size=(6, 4)).astype(np.float32)
    desc = rng.normal(size=(30, 4)).astype(np.float32)
    words = rng.integers(0, 6, 30)
    images = rng.integers(0, 3, 30)
    sums, w, img = aggregation.residual_sums(desc, words, centroids, images)
    pairs = list(zip(img.tolist(), w.tolist()))
    assert pairs == sorted(set(zip(images.tolist(), words.tolist())))
    for row, (i, word) in zip(sums, pairs):
        sel = (images == i) & (words == word)
        np.testing.assert_allclose(row, (desc[sel] - centroids[word]).sum(0), rtol=1e-5, atol=1e-6)


def test_residual_sums_rejects_bad_shapes():
    c = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError):
        aggregation.residual_sums(np.zeros((5, 2), np.float32), np.zeros(5, int), c)
    with pytest.raises(ValueError):
        aggregation.residual_sums(np.zeros((5, 3), np.float32), np.zeros(4, int), c)
    with pytest.raises(ValueError):
        aggregation.residual_sums(np.zeros((5, 3), np.float32), np.full(5, 4), c)
    empty = aggregation.residual_sums(np.zeros((0, 3), np.float32), np.zeros(0, int), c)
    assert empty[0].shape == (0, 3) and len(empty[1]) == 0


def test_binarize_threshold_and_packing():
    sums = np.zeros((3, 128), np.float32)
    sums[0, [0, 63, 64, 127]] = 1.0
    sums[1] = -1.0
    sums[1, 5] = 1e-9
    sums[2] = 0.0  # exactly zero -> bit 0 (bit = sum > 0)
    codes = sign_codes.binarize(sums)
    assert codes.shape == (3, 2) and codes.dtype == np.uint64
    assert codes[0].tolist() == [1 | (1 << 63), 1 | (1 << 63)]
    assert codes[1].tolist() == [1 << 5, 0] and codes[2].tolist() == [0, 0]
    np.testing.assert_array_equal(sign_codes.unpack_signs(codes, 128), sums > 0)


def test_packing_pads_odd_dimensions():
    bits = np.random.default_rng(2).random((5, 100)) > 0.5
    codes = sign_codes.pack_signs(bits)
    assert codes.shape == (5, 2)
    np.testing.assert_array_equal(sign_codes.unpack_signs(codes, 100), bits)


def test_hamming_similarity_and_selective_kernel():
    rng = np.random.default_rng(3)
    a, b = rng.random((4, 128)) > 0.5, rng.random((4, 128)) > 0.5
    h = sign_codes.hamming(sign_codes.pack_signs(a), sign_codes.pack_signs(b))
    assert h.tolist() == [(x != y).sum() for x, y in zip(a, b)]
    s = sign_codes.hamming_similarity(np.array([0, 32, 64, 96, 128]))
    np.testing.assert_allclose(s, [1.0, 0.5, 0.0, -0.5, -1.0])
    np.testing.assert_allclose(sign_codes.selective_kernel(s), [1.0, 0.125, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(sign_codes.selective_kernel(s, alpha=1.0, tau=0.25), [1.0, 0.5, 0.0, 0.0, 0.0])
    table = sign_codes.kernel_table(128, 3.0, 0.0)
    assert table.shape == (129,)
    for dist in range(129):
        sim = 1 - 2 * dist / 128
        assert table[dist] == pytest.approx(sim ** 3 if sim >= 0 else 0.0)


def test_aggregate_non_binary_is_unit_length():
    rng = np.random.default_rng(4)
    centroids = rng.normal(size=(5, 16)).astype(np.float32)
    desc = rng.normal(size=(20, 16)).astype(np.float32)
    agg = aggregation.aggregate(desc, rng.integers(0, 5, 20), centroids, binary=False)
    np.testing.assert_allclose(np.linalg.norm(agg.vectors, axis=1), 1.0, rtol=1e-5)
    assert l2_normalise(np.zeros((1, 3))).tolist() == [[0.0, 0.0, 0.0]]
    binary = aggregation.aggregate(desc, rng.integers(0, 5, 20), centroids)
    assert binary.vectors.dtype == np.uint64 and len(binary) == len(binary.words)


def test_idf_weights():
    idf = sign_codes.idf_weights(np.array([0, 1, 5, 10]), 10)
    np.testing.assert_allclose(idf, [1.0, np.log(10) ** 2, np.log(2) ** 2, 0.0])


def test_a_residual_sum_within_rounding_of_zero_is_zero():
    # The word's centroid is the float32 mean of exactly these descriptors (a codebook trained
    # on the database): the float sum of residuals is rounding noise, not a direction.
    rng = np.random.default_rng(0)
    desc = rng.normal(size=(7, 128)).astype(np.float32)
    centroid = desc.mean(axis=0, dtype=np.float32)[None]
    assert (np.sum(desc - centroid, axis=0) != 0).any()  # what plain float arithmetic gives
    words = np.zeros(7, np.int64)
    sums, _, _ = aggregation.residual_sums(desc, words, centroid)
    assert (sums == 0).all()
    codes = {aggregation.aggregate(desc[order], words, centroid).vectors.tobytes()
             for order in (np.arange(7), np.arange(7)[::-1], rng.permutation(7))}
    assert codes == {np.zeros((1, 2), np.uint64).tobytes()}  # zero -> bit 0, in any order
    # a genuine residual sum keeps every sign, also small ones
    signs = np.where(rng.random(128) < 0.5, -1.0, 1.0).astype(np.float32)
    offset = centroid - 1e-3 * signs
    sums, _, _ = aggregation.residual_sums(desc, words, offset)
    np.testing.assert_array_equal(np.sign(sums[0]), signs)
    # one component within rounding of zero in a genuine sum is left as it is
    offset[0, 0] = centroid[0, 0]
    sums, _, _ = aggregation.residual_sums(desc, words, offset)
    assert sums[0, 0] == np.sum(desc[:, 0] - offset[0, 0]) and (np.sign(sums[0, 1:]) == signs[1:]).all()
    single, _, _ = aggregation.residual_sums(desc[:1], words[:1], centroid)
    np.testing.assert_array_equal(single[0], desc[0] - centroid[0])
    desc[2, 5] = np.nan  # not a sum within rounding of zero
    sums, _, _ = aggregation.residual_sums(desc, words, centroid)
    assert np.isnan(sums[0, 5]) and (sums[0, :5] != 0).any()


def test_popcount_without_numpy_2(monkeypatch):
    """NumPy 1.x has no np.bitwise_count (setup.cfg allows numpy>=1.24): the byte-wise count
    must give the same Hamming distances."""
    rng = np.random.default_rng(5)
    a, b = (rng.integers(0, 2 ** 63, size=(40, 2), dtype=np.uint64) * 2 + 1 for _ in range(2))
    reference = np.array([[bin(int(v)).count("1") for v in row] for row in a ^ b])
    monkeypatch.delattr(np, "bitwise_count", raising=False)
    assert sign_codes.popcount(a ^ b).tolist() == reference.tolist()
    assert sign_codes.hamming(a, b).tolist() == reference.sum(axis=1).tolist()
    assert sign_codes.popcount(np.uint64(2 ** 64 - 1)) == 64
