"""PCA-whitening, one implementation and one rule for the HOW reduction layer
(``whitening_from_moments``) and for global descriptors (``PCAWhitening``): only directions the
data supports are whitened (numerical rank, rule 1 below). The HOW layer's dimension is fixed,
so it refuses features of lower rank instead of capping.

``PCAWhitening.learn`` learns the whitening on the database descriptors (SPEC section 4):
mean-centring, projection onto the covariance eigenvectors scaled by eigenvalue^(-shrinkage/2)
(shrinkage 1 = full whitening, 0 = plain PCA), L2 normalisation after.

Few database images. With n database images the centred descriptors span at most n - 1
directions, and the smallest eigenvalues that are kept are estimated from almost no data;
scaling them up by eigenvalue^-1/2 mostly amplifies noise (whitening 9 images into 8 dims maps
them onto a regular simplex: every database image equally far from every other). The rule:

1. Numerical rank r: eigenvalues below ``1e-6 * largest`` are null; at most n - 1 remain.
2. Output dims d = min(requested dims (default: the descriptor dimension), r,
   floor(n / ``min_images_per_dim``)) -- at least ``min_images_per_dim`` (2) database
   images per whitened dimension.
3. If that cap leaves d < min(requested, ``min_dims`` (32)), whitening is not learned at all:
   the transform is the identity (descriptors are only L2-normalised), which is what a
   9-image database gets (measured on ../shared/data/landmarks: 65.3 GAP unwhitened vs 59.5
   whitened). Each cap and the fallback is logged and recorded in ``mode``/``note``.

Saved as a plain ``.npz`` (no pickles); loading uses ``allow_pickle=False``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
from threadpoolctl import threadpool_limits

from ..utils import atomic_path, l2_normalise

logger = logging.getLogger(__name__)

RANK_TOLERANCE = 1e-6
_COVARIANCE_CHUNK = 32768


def principal_directions(covariance: np.ndarray, n_samples: int) -> Tuple[np.ndarray, np.ndarray, int]:
    """Eigenvalues (descending), eigenvectors (columns) and numerical rank of a covariance
    estimated from ``n_samples``: eigenvalues below ``RANK_TOLERANCE`` times the largest are
    null, and n samples span at most n - 1 directions.

    Each eigenvector is signed so that its largest-magnitude entry (the first of equal ones) is
    positive: LAPACK returns an eigenvector or its negative depending on rounding, and a fixed
    sign makes the whitening (and every descriptor and sign bit after it) the same bytes
    whenever the covariance is, instead of flipping whole output dimensions between runs.
    """
    # LAPACK's eigensolver on one BLAS thread: with more (numpy's default: every core; a Ray
    # worker: its CPUs) the eigenvectors move in their last bits, so the whitening -- and every
    # descriptor -- depended on the machine's core count
    with threadpool_limits(1, user_api="blas"):
        eigenvalues, eigenvectors = np.linalg.eigh(np.asarray(covariance, np.float64))
    order = np.argsort(eigenvalues, kind="stable")[::-1]
    eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
    pivots = np.argmax(np.abs(eigenvectors), axis=0)
    eigenvectors = eigenvectors * np.where(eigenvectors[pivots, np.arange(eigenvectors.shape[1])] < 0, -1.0, 1.0)
    largest = eigenvalues[0] if n_samples > 1 else 0.0
    rank = int(np.count_nonzero(eigenvalues > RANK_TOLERANCE * largest)) if largest > 0 else 0
    return eigenvalues, eigenvectors, min(rank, n_samples - 1)


def whitening_projection(eigenvalues: np.ndarray, eigenvectors: np.ndarray, dims: int,
                         shrinkage: float = 1.0) -> np.ndarray:
    """(C, dims) float64: the top ``dims`` eigenvectors scaled by eigenvalue^(-shrinkage/2)
    (shrinkage 1 = full whitening, 0 = plain PCA); ``dims`` must not exceed the rank."""
    return eigenvectors[:, :dims] * eigenvalues[:dims][None, :] ** (-0.5 * shrinkage)


@dataclass
class PCAWhitening:
    """``apply(x) = l2((x - mean) @ projection)``; identity mode has no mean/projection."""

    mean: np.ndarray          # (D,) float32 (zeros in identity mode)
    projection: np.ndarray    # (D, d) float32: eigenvectors * eigenvalue^(-shrinkage/2); (0, 0) in identity mode
    eigenvalues: np.ndarray   # (d,) float64 eigenvalues of the kept directions (empty in identity mode)
    shrinkage: float
    mode: str                 # "whiten" or "identity"
    note: str = ""            # why dims were capped / whitening skipped ("" when neither)

    @property
    def input_dim(self) -> int:
        return int(len(self.mean))

    @property
    def output_dim(self) -> int:
        return self.input_dim if self.mode == "identity" else int(self.projection.shape[1])

    @classmethod
    def learn(cls, X, dims: Optional[int] = None, shrinkage: float = 1.0, min_images_per_dim: float = 2.0,
              min_dims: int = 32) -> "PCAWhitening":
        """Learn on database descriptors ``X`` (n, D); see the module docstring for the rule
        that caps ``dims`` or falls back to the identity when n is small."""
        X = np.asarray(X)
        if X.ndim != 2 or len(X) == 0:
            raise ValueError(f"PCA-whitening needs an (n, D) matrix of descriptors, got shape {X.shape}")
        if not np.isfinite(X).all():
            raise ValueError("PCA-whitening: descriptors contain NaN or inf")
        if dims is not None and dims < 1:
            raise ValueError(f"PCA-whitening dims must be >= 1, got {dims}")
        n, D = X.shape
        requested = D if dims is None else min(int(dims), D)
        mean = X.mean(axis=0, dtype=np.float64)
        # Covariance accumulated in float64 over row chunks: a Met-sized database (400k x 2048)
        # would need 6.5 GB as one float64 matrix.
        covariance = np.zeros((D, D))
        for start in range(0, n, _COVARIANCE_CHUNK):
            centred = X[start:start + _COVARIANCE_CHUNK].astype(np.float64) - mean
            covariance += centred.T @ centred
        covariance /= max(n - 1, 1)
        eigenvalues, eigenvectors, rank = principal_directions(covariance, n)
        by_samples = int(n // min_images_per_dim)
        out_dim = min(requested, rank, by_samples)
        if out_dim < min(requested, min_dims):
            note = (f"{n} database images support only {out_dim} whitened dims (rank {rank}, "
                    f"{min_images_per_dim:g} images per dim) < {min(requested, min_dims)}: no whitening, L2 only")
            logger.warning("PCA-whitening skipped: %s", note)
            return cls.identity(D, note=note)
        note = ""
        if out_dim < requested:
            note = (f"dims capped from {requested} to {out_dim}: {n} database images, rank {rank}, "
                    f"at least {min_images_per_dim:g} images per dim")
            logger.warning("PCA-whitening %s", note)
        projection = whitening_projection(eigenvalues, eigenvectors, out_dim, shrinkage)
        return cls(mean=mean.astype(np.float32), projection=projection.astype(np.float32),
                   eigenvalues=eigenvalues[:out_dim], shrinkage=float(shrinkage), mode="whiten", note=note)

    @classmethod
    def identity(cls, dim: int, note: str = "") -> "PCAWhitening":
        return cls(mean=np.zeros(dim, np.float32), projection=np.zeros((0, 0), np.float32),
                   eigenvalues=np.zeros(0), shrinkage=0.0, mode="identity", note=note)

    def apply(self, X, batch_size: int = 65536) -> np.ndarray:
        """(n, D) -> (n, d) float32 whitened and L2-normalised descriptors."""
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.input_dim:
            raise ValueError(f"whitening expects (n, {self.input_dim}) descriptors, got {X.shape}")
        if self.mode == "identity":
            return l2_normalise(X)
        out = np.empty((len(X), self.output_dim), np.float32)
        for start in range(0, len(X), batch_size):
            rows = slice(start, start + batch_size)
            out[rows] = l2_normalise((X[rows] - self.mean) @ self.projection)
        return out

    def save(self, path) -> None:
        """Write an ``.npz`` of plain arrays atomically."""
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:  # a file object: numpy would append ".npz" to a name
                np.savez(fh, mean=self.mean, projection=self.projection, eigenvalues=self.eigenvalues,
                         shrinkage=np.float64(self.shrinkage), mode=np.str_(self.mode), note=np.str_(self.note))

    @classmethod
    def load(cls, path) -> "PCAWhitening":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: whitening file not found")
        try:
            with np.load(path, allow_pickle=False) as data:
                return cls(mean=data["mean"], projection=data["projection"], eigenvalues=data["eigenvalues"],
                           shrinkage=float(data["shrinkage"]), mode=str(data["mode"]), note=str(data["note"]))
        except (KeyError, ValueError, OSError) as exc:
            raise ValueError(f"{path}: not a how-met whitening file ({exc})") from None


def whitening_from_moments(mean: np.ndarray, cov: np.ndarray, n_samples: int, dim: int,
                           shrinkage: float = 1.0) -> Tuple[np.ndarray, np.ndarray]:
    """PCA-whitening of the HOW reduction layer from a mean (C,) and covariance (C, C) of
    ``n_samples`` features: returns (mean, projection (dim, C)). The layer's dim is fixed, so
    the rule's cap cannot apply: features spanning fewer than ``dim`` directions are refused."""
    if dim > len(mean):
        raise ValueError(f"whitening dim {dim} > descriptor dim {len(mean)}")
    eigenvalues, eigenvectors, rank = principal_directions(cov, n_samples)
    if rank < dim:
        raise RuntimeError(f"the local features span only {rank} directions: a {dim}-D whitening "
                           f"needs more (and more varied) images")
    projection = whitening_projection(eigenvalues, eigenvectors, dim, shrinkage)
    return np.asarray(mean, np.float32), projection.T.astype(np.float32)
