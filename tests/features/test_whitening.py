"""PCA-whitening: the global-descriptor rule (caps, identity fallback) and the HOW layer's."""
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from how_met.features.whitening import PCAWhitening, principal_directions, whitening_from_moments
from how_met.recognition.global_search import global_search
from how_met.utils import l2_normalise


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


def test_how_layer_whitening_matches_the_global_rule_and_refuses_low_rank():
    X = anisotropic(3000, 24)
    mean, cov = X.mean(axis=0), np.cov(X, rowvar=False)
    _, projection = whitening_from_moments(mean, cov, len(X), 8)
    global_rule = PCAWhitening.learn(X, dims=8, min_dims=1)
    # the same directions and scaling: (dim, C) here, (C, dim) there
    np.testing.assert_allclose(np.abs(projection), np.abs(global_rule.projection.T), rtol=1e-4, atol=1e-6)
    white = (X - mean) @ projection.T
    np.testing.assert_allclose(np.cov(white, rowvar=False), np.eye(8), atol=1e-3)
    # 24-D features that vary in only 5 directions cannot be whitened into 8 dims
    flat = anisotropic(3000, 5) @ np.random.default_rng(1).normal(size=(5, 24))
    with pytest.raises(RuntimeError, match="span only 5 directions"):
        whitening_from_moments(flat.mean(axis=0), np.cov(flat, rowvar=False), len(flat), 8)


def test_eigenvector_signs_are_canonical(monkeypatch):
    """The whitening is the same whichever sign LAPACK returns for each eigenvector."""
    X = anisotropic(500, 12, seed=2)
    cov = np.cov(X.T)
    values, vectors, _ = principal_directions(cov, 500)
    assert (np.diff(values) <= 0).all()
    pivots = np.abs(vectors).argmax(axis=0)
    assert (vectors[pivots, np.arange(12)] > 0).all()
    assert vectors @ np.diag(values) @ vectors.T == pytest.approx(cov)
    before = (PCAWhitening.learn(X, dims=8).projection, whitening_from_moments(X.mean(0), cov, 500, 8)[1])

    eigh = np.linalg.eigh
    flips = np.where(np.arange(12) % 3 == 0, -1.0, 1.0)
    monkeypatch.setattr(np.linalg, "eigh", lambda a: (eigh(a)[0], eigh(a)[1] * flips))
    after = (PCAWhitening.learn(X, dims=8).projection, whitening_from_moments(X.mean(0), cov, 500, 8)[1])
    for b, a in zip(before, after):
        assert np.array_equal(b, a)


def test_principal_directions_do_not_depend_on_the_blas_thread_count():
    """numpy's eigensolver split over more BLAS threads moved the eigenvectors in their last bits
    (a Ray worker has as many as its CPUs, a driver as many as the machine's cores)."""
    import subprocess
    import sys
    script = ("import hashlib, numpy as np; from how_met.features.whitening import principal_directions; "
              "x = np.random.default_rng(0).random((2000, 672)); "
              "v, w, _ = principal_directions(np.cov(x, rowvar=False), len(x)); "
              "print(hashlib.sha256(v.tobytes() + w.tobytes()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
                                   "OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads,
                                   "MKL_NUM_THREADS": threads}).stdout for threads in ("1", "2")}
    assert len(digests) == 1
