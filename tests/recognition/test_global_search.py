"""PCA-whitening (incl. the few-images rule) and exact inner-product search."""
import logging

import numpy as np
import pytest

from how_met.features.whitening import PCAWhitening, l2_normalise
from how_met.recognition.global_search import global_search


def anisotropic(n, dim, seed=0):
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    scales = np.geomspace(10.0, 0.1, dim)
    return (rng.normal(size=(n, dim)) * scales) @ basis.T + 3.0


def test_whitened_database_has_identity_covariance():
    X = anisotropic(3000, 24)
    w = PCAWhitening.learn(X)
    assert w.mode == "whiten" and w.output_dim == 24 and w.note == ""
    projected = (X - w.mean) @ w.projection
    assert np.cov(projected.T) == pytest.approx(np.eye(24), abs=1e-3)
    assert projected.mean(axis=0) == pytest.approx(np.zeros(24), abs=1e-4)
    reduced = PCAWhitening.learn(X, dims=8)
    assert reduced.output_dim == 8
    assert np.cov(((X - reduced.mean) @ reduced.projection).T) == pytest.approx(np.eye(8), abs=1e-3)
    # The 8 kept directions are the leading ones.
    assert reduced.eigenvalues == pytest.approx(w.eigenvalues[:8])
    out = reduced.apply(X[:10])
    assert out.shape == (10, 8) and out.dtype == np.float32
    assert np.linalg.norm(out, axis=1) == pytest.approx(np.ones(10), abs=1e-5)


def test_shrinkage_half_scales_by_fourth_root():
    X = anisotropic(3000, 12, seed=1)
    w = PCAWhitening.learn(X, shrinkage=0.5)
    variances = np.var((X - w.mean) @ w.projection, axis=0, ddof=1)
    assert variances == pytest.approx(np.sqrt(w.eigenvalues), rel=1e-3)


def test_save_load_roundtrip(tmp_path):
    w = PCAWhitening.learn(anisotropic(500, 16), dims=6)
    w.save(tmp_path / "pcaw.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pcaw.npz"]
    loaded = PCAWhitening.load(tmp_path / "pcaw.npz")
    assert loaded.mode == "whiten" and loaded.shrinkage == 1.0
    X = anisotropic(20, 16, seed=5)
    assert loaded.apply(X) == pytest.approx(w.apply(X))
    identity = PCAWhitening.identity(16, note="few images")
    identity.save(tmp_path / "id.npz")
    assert PCAWhitening.load(tmp_path / "id.npz").note == "few images"
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.npz"):
        PCAWhitening.load(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="none.npz"):
        PCAWhitening.load(tmp_path / "none.npz")


def test_nine_images_fall_back_to_plain_l2(caplog):
    rng = np.random.default_rng(2)
    db = l2_normalise(np.abs(rng.normal(size=(9, 256))))
    with caplog.at_level(logging.WARNING, logger="how_met.features.whitening"):
        w = PCAWhitening.learn(db, dims=128)
    assert w.mode == "identity" and "no whitening" in w.note and "skipped" in caplog.text
    queries = db + 0.05 * rng.normal(size=db.shape)
    out_db, out_q = w.apply(db), w.apply(queries)
    assert np.isfinite(out_db).all() and np.isfinite(out_q).all()
    indices, _ = global_search(out_db, out_q, k=3)
    assert indices[:, 0].tolist() == list(range(9))  # each query finds its own image


def test_few_images_cap_dims_at_rank_and_sample_count():
    rng = np.random.default_rng(3)
    db = rng.normal(size=(100, 256))
    w = PCAWhitening.learn(db, dims=128)
    assert w.mode == "whiten" and w.output_dim == 50 and "capped" in w.note
    queries = db[:20] + 0.1 * rng.normal(size=(20, 256))
    out = w.apply(queries)
    assert np.isfinite(out).all()
    indices, _ = global_search(w.apply(db), out, k=1)
    assert (indices[:, 0] == np.arange(20)).mean() >= 0.9
    # Identical descriptors: rank 0, nothing to whiten.
    same = PCAWhitening.learn(np.ones((50, 8)))
    assert same.mode == "identity" and np.isfinite(same.apply(np.ones((2, 8)))).all()
    # Explicitly few dims with plenty of images is honoured.
    assert PCAWhitening.learn(anisotropic(500, 64), dims=4).output_dim == 4


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
