"""Product quantisation of the L2-normalised local descriptors a compact record keeps for spatial
verification (``how_met.asmk.records``, descriptors "pq").

A D-dimensional unit descriptor is cut into M sub-vectors of D / M dimensions; each is replaced
by the index of its nearest of 2^B sub-centroids (k-means per sub-space, faiss, trained on a
sample): M x B bits per feature, packed (code "MxB", e.g. "16x8": 16 bytes, "16x6": 12 bytes). The reranker matches a query's exact descriptors against the
candidate's reconstruction (sub-centroids concatenated, then L2-normalised): the dot product
with a reconstruction is the asymmetric PQ distance (ADC), computed by the reranker's usual
matching code. Encoding and decoding are plain numpy (deterministic); faiss only trains.

The sub-centroids live in the records file's header as base64 of little-endian float32 (no
pickles), validated when read (``from_header``).
"""
from __future__ import annotations

import base64
import binascii

import numpy as np

MAX_BITS = 8             # per sub-vector: at most 256 centroids
TRAIN_POINTS = 65_536    # descriptors the sub-quantisers are trained on (at most)


class PQError(ValueError):
    """A product quantiser that cannot be used as given (the message says why)."""


class ProductQuantiser:
    """M sub-quantisers of 2^B centroids over unit descriptors of dimension M x dsub."""

    def __init__(self, centroids: np.ndarray):
        centroids = np.ascontiguousarray(centroids, np.float32)
        if centroids.ndim != 3 or not centroids.shape[0] or not centroids.shape[2] or \
                centroids.shape[1] not in _CENTROID_COUNTS:
            raise PQError(f"product-quantiser centroids must be (M, 2^B with B in 1..{MAX_BITS}, dsub), got "
                          f"{list(centroids.shape)}")
        if not np.isfinite(centroids).all():
            raise PQError("product-quantiser centroids hold NaN or infinite values")
        self.centroids = centroids
        self._sq_norms = (centroids ** 2).sum(axis=2)  # (M, 256)

    @property
    def subquantizers(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[0] * self.centroids.shape[2])

    @property
    def bits(self) -> int:
        return int(self.centroids.shape[1]).bit_length() - 1

    @property
    def code(self) -> str:
        """"MxB": sub-quantisers x bits each."""
        return f"{self.subquantizers}x{self.bits}"

    @property
    def code_bytes(self) -> int:
        """Bytes of one feature's packed code."""
        return -(-self.subquantizers * self.bits // 8)

    @classmethod
    def train(cls, unit_descriptors: np.ndarray, code: str, seed: int = 0) -> "ProductQuantiser":
        """k-means (faiss, seeded) of each sub-space over (at most TRAIN_POINTS of) the rows given."""
        import faiss
        x = np.ascontiguousarray(unit_descriptors, np.float32)
        subquantizers, bits = parse_code(code, x.shape[1] if x.ndim == 2 else 0)
        if len(x) == 0:
            raise PQError("no descriptors to train the product quantiser on")
        if len(x) > TRAIN_POINTS:
            x = x[np.sort(np.random.default_rng(seed).choice(len(x), TRAIN_POINTS, replace=False))]
        if len(x) < 2 ** bits:  # k-means needs a point per centroid: repeat the few there are
            x = np.ascontiguousarray(np.resize(x, (2 ** bits, x.shape[1])))
        pq = faiss.ProductQuantizer(x.shape[1], subquantizers, bits)
        pq.cp.seed = int(seed)
        pq.verbose = False
        pq.train(x)
        dsub = x.shape[1] // subquantizers
        return cls(faiss.vector_to_array(pq.centroids).reshape(subquantizers, 2 ** bits, dsub))

    def pack(self, codes: np.ndarray) -> np.ndarray:
        """(n, M) centroid indices -> (n, code_bytes) uint8, B bits each, little-endian."""
        codes = np.asarray(codes, np.uint8)
        if self.bits == 8:
            return np.ascontiguousarray(codes)
        bits = (codes[:, :, None] >> np.arange(self.bits, dtype=np.uint8)) & 1
        return np.packbits(bits.reshape(len(codes), -1), axis=1, bitorder="little")

    def unpack(self, packed: np.ndarray) -> np.ndarray:
        """Inverse of ``pack``: (n, code_bytes) uint8 -> (n, M) centroid indices."""
        packed = np.asarray(packed)
        if packed.ndim != 2 or packed.shape[1] != self.code_bytes or packed.dtype != np.uint8:
            raise PQError(f"pq codes {packed.dtype}{list(packed.shape)} are not (n, {self.code_bytes}) uint8")
        if self.bits == 8:
            return packed
        m, b = self.subquantizers, self.bits
        bits = np.unpackbits(packed, axis=1, bitorder="little")[:, :m * b].reshape(len(packed), m, b)
        return (bits << np.arange(b, dtype=np.uint8)).sum(axis=2, dtype=np.uint8)

    def encode(self, unit_descriptors: np.ndarray) -> np.ndarray:
        """(n, D) -> (n, M) uint8: the nearest sub-centroid of each sub-vector (``pack`` stores it)."""
        x = np.asarray(unit_descriptors, np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise PQError(f"descriptors {list(x.shape)} do not match the quantiser's dimension {self.dim}")
        m, _, dsub = self.centroids.shape
        codes = np.empty((len(x), m), np.uint8)
        for j in range(m):
            sub = x[:, j * dsub:(j + 1) * dsub]
            # argmin |x - c|^2 = argmin (|c|^2 - 2 x.c); first index on ties
            codes[:, j] = np.argmin(self._sq_norms[j] - 2.0 * (sub @ self.centroids[j].T), axis=1)
        return codes

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """(n, M) uint8 -> (n, D) float32 reconstructions (not normalised)."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != self.subquantizers:
            raise PQError(f"codes {list(codes.shape)} are not (n, {self.subquantizers})")
        return self.centroids[np.arange(self.subquantizers), codes.astype(np.intp)].reshape(len(codes), self.dim)

    # -- the records header ------------------------------------------------------------------------
    def to_header(self) -> dict:
        return {"subquantizers": self.subquantizers, "centroids_per_subspace": int(self.centroids.shape[1]),
                "dsub": int(self.centroids.shape[2]),
                "centroids_f4": base64.b64encode(self.centroids.astype("<f4").tobytes()).decode("ascii")}

    @classmethod
    def from_header(cls, header, dim: int) -> "ProductQuantiser":
        """The quantiser a records header describes, for descriptors of ``dim``; PQError (one
        line) for anything else: wrong types, sizes, dimension, or data of another length."""
        if not isinstance(header, dict):
            raise PQError("product quantiser header is not a mapping")
        m, k, dsub, text = (header.get(name) for name in ("subquantizers", "centroids_per_subspace",
                                                            "dsub", "centroids_f4"))
        for name, value in (("subquantizers", m), ("centroids_per_subspace", k), ("dsub", dsub)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PQError(f"product quantiser {name} is {value!r}, expected an integer >= 1")
        if k not in _CENTROID_COUNTS:
            raise PQError(f"product quantiser has {k} centroids per sub-space; this how-met reads 2^B, B in "
                          f"1..{MAX_BITS}")
        if m * dsub != dim:
            raise PQError(f"product quantiser covers {m} x {dsub} dimensions, the descriptors have {dim}")
        if not isinstance(text, str) or len(text) > 4 * (m * k * dsub * 4 // 3 + 4):
            raise PQError("product quantiser centroids are missing or longer than declared")
        try:
            raw = base64.b64decode(text.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            raise PQError("product quantiser centroids are not base64") from None
        if len(raw) != m * k * dsub * 4:
            raise PQError(f"product quantiser centroids hold {len(raw)} bytes, (M {m}, {k}, dsub {dsub}) "
                          f"float32 needs {m * k * dsub * 4}")
        return cls(np.frombuffer(raw, "<f4").reshape(m, k, dsub))


_CENTROID_COUNTS = tuple(2 ** b for b in range(1, MAX_BITS + 1))


def parse_code(code, dim: int) -> tuple:
    """(M, B) of a code "MxB" (or "M": B = 8); PQError (one line) unless M divides ``dim`` and
    B is in 1..8."""
    text = str(code) if isinstance(code, (str, int)) and not isinstance(code, bool) else ""
    parts = text.lower().split("x")
    try:
        m, bits = (int(parts[0]), int(parts[1]) if len(parts) > 1 else 8) if len(parts) <= 2 else (0, 0)
    except ValueError:
        m = bits = 0
    if m < 1 or not 1 <= bits <= MAX_BITS or (dim and dim % m):
        raise PQError(f"pq code must be MxB: M sub-quantisers dividing the descriptor dimension {dim}, "
                      f"B bits each in 1..{MAX_BITS} (e.g. 16x8, 16x6); got {code!r}")
    return m, bits
