"""Sign codes of aggregated residuals and their similarity (SPEC section 3): bit packing,
Hamming distance, the selective kernel and idf weights.

Conventions
- A *code* is the sign pattern of an aggregated residual, ``bit = sum > 0``, packed into
  ``ceil(d / 64)`` little-endian uint64 words (two for d = 128): 16 bytes per aggregated vector.
- The similarity of two codes with Hamming distance h is ``s = 1 - 2 h / d`` in [-1, 1]; the
  selective kernel is ``sigma(s) = s**alpha if s >= tau else 0``.
- The non-binary variant keeps the L2-normalised float residual sums; ``s`` is their dot product.
"""
from __future__ import annotations

import numpy as np

DEFAULT_ALPHA = 3.0
DEFAULT_TAU = 0.0


def code_words(dim: int) -> int:
    """uint64 words per packed code of a dim-dimensional residual."""
    return (int(dim) + 63) // 64


def pack_signs(bits: np.ndarray) -> np.ndarray:
    """(m, d) bool -> (m, ceil(d/64)) uint64; bit j of a vector is bit j % 64 of word j // 64."""
    bits = np.asarray(bits, bool)
    m, d = bits.shape
    width = code_words(d) * 64
    if width != d:
        bits = np.concatenate([bits, np.zeros((m, width - d), bool)], axis=1)
    packed = np.packbits(bits, axis=1, bitorder="little")  # (m, width / 8) uint8
    return np.ascontiguousarray(packed).view("<u8").astype(np.uint64, copy=False)


def unpack_signs(codes: np.ndarray, dim: int) -> np.ndarray:
    """Inverse of pack_signs: (m, w) uint64 -> (m, dim) bool."""
    codes = np.ascontiguousarray(codes, dtype="<u8")
    bits = np.unpackbits(codes.view(np.uint8), axis=1, bitorder="little")
    return bits[:, :dim].astype(bool)


def binarize(sums: np.ndarray) -> np.ndarray:
    """Packed sign codes of residual sums: bit = sum > 0 (a zero component gives bit 0)."""
    return pack_signs(np.asarray(sums) > 0)



_BYTE_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.int64)


def popcount(x: np.ndarray) -> np.ndarray:
    """Number of set bits of each unsigned integer (int64, same shape).

    ``np.bitwise_count`` exists from NumPy 2.0 on; setup.cfg allows NumPy 1.24 (what torch and
    faiss wheels of that era pair with), so older NumPy counts the bits byte by byte.
    """
    x = np.asarray(x)
    bitwise_count = getattr(np, "bitwise_count", None)
    if bitwise_count is not None:
        return bitwise_count(x).astype(np.int64)
    as_bytes = np.ascontiguousarray(x).view(np.uint8).reshape(x.shape + (x.dtype.itemsize,))
    return _BYTE_POPCOUNT[as_bytes].sum(axis=-1)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances of packed codes (broadcast over leading axes, summed over the last)."""
    return popcount(np.bitwise_xor(a, b)).sum(axis=-1)


def hamming_similarity(distance, dim: int = 128):
    """s = 1 - 2 h / d."""
    return 1.0 - 2.0 * np.asarray(distance, np.float64) / dim


def selective_kernel(s, alpha: float = DEFAULT_ALPHA, tau: float = DEFAULT_TAU):
    """sigma(s) = s**alpha where s >= tau, else 0."""
    s = np.asarray(s, np.float64)
    keep = s >= tau
    out = np.zeros_like(s)
    out[keep] = np.power(s[keep], alpha)
    return out


def kernel_table(dim: int = 128, alpha: float = DEFAULT_ALPHA, tau: float = DEFAULT_TAU) -> np.ndarray:
    """(dim + 1,) float64: the selective kernel of every possible Hamming distance."""
    return selective_kernel(hamming_similarity(np.arange(dim + 1), dim), alpha, tau)


def idf_weights(df: np.ndarray, n_images: int) -> np.ndarray:
    """idf(w) = log(N / df(w))**2; a word no database image has weighs 1 (as asmk 0.1.1 does:
    it only changes the query's normalisation, never which image ranks first)."""
    df = np.asarray(df, np.float64)
    out = np.ones_like(df)
    seen = df > 0
    out[seen] = np.log(float(n_images) / df[seen]) ** 2
    return out
