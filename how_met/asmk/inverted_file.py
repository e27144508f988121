"""Binary ASMK inverted file: per-word postings of aggregated codes, incremental updates, fast
batched search and safe files.

Layout in memory (and on disk, after consolidation)
- ``offsets`` (n_words + 1,) int64: postings of word w are rows offsets[w]:offsets[w+1] of
- ``vectors`` (n_postings, 2) uint64 packed sign codes (or (n_postings, d) float32 unit vectors
  for the non-binary variant) and
- ``image_ids`` (n_postings,) uint32: image positions into ``keys`` (feature-store keys).
- ``n_vectors`` (n_images,) uint32 aggregated vectors per image (its norm without idf) and
  ``alive`` (n_images,) bool (False once removed, until ``compact``).

A binary posting costs 16 + 4 = 20 bytes. ``add`` appends a word-sorted chunk (cost
proportional to the batch; 2 more bytes per posting for its word until merged); chunks are
merged into the contiguous layout lazily, once, before the next search or save. ``remove`` only marks images; ``compact`` drops their postings and renumbers.

Search scores, for every query image, each database image that shares a visual word with it::

    score(q, d) = sum_{w in q and d} wt(w) sigma(s(q_w, d_w)) / (sqrt(norm(q)) sqrt(norm(d)))

with wt = 1 and norm = number of aggregated vectors, or wt = idf and norm = sum of idf over the
image's words (``use_idf``). It runs in numba (``how_met.asmk.kernels``). Files are read, written
and validated by ``how_met.asmk.io``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numba
import numpy as np

from . import codes
from .aggregation import Aggregated
from .io import FORMAT, FORMAT_VERSION, check_consistency, read_index, write_index
from .kernels import alive_df, compact_postings, copy_blocks, search_binary, search_float, weighted_norms
from ..neighbours import Neighbours
from ..features.settings import check_model

MAX_IMAGES = 2 ** 32 - 1


class InvertedFile:
    """ASMK inverted file over ``n_words`` visual words; database images are feature-store keys.

    binary: packed sign codes (default) or L2-normalised float residuals. use_idf, alpha, tau:
    default scoring (each can be overridden per search). codebook_fingerprint / extractor /
    model_fingerprint: what the index was built with (codebook, extractor settings, the model
    that made the descriptors), checked when querying and appending.
    """

    def __init__(self, n_words: int, dim: int = 128, binary: bool = True, use_idf: bool = False,
                 alpha: float = codes.DEFAULT_ALPHA, tau: float = codes.DEFAULT_TAU,
                 codebook_fingerprint: Optional[str] = None, extractor: Optional[dict] = None,
                 model_fingerprint: Optional[str] = None):
        if n_words < 1 or dim < 1:
            raise ValueError(f"inverted file needs n_words >= 1 and dim >= 1, got {n_words}, {dim}")
        self.n_words = int(n_words)
        self.dim = int(dim)
        self.binary = bool(binary)
        self.use_idf = bool(use_idf)
        self.alpha = float(alpha)
        self.tau = float(tau)
        self.codebook_fingerprint = codebook_fingerprint
        self.extractor = dict(extractor or {})
        self.model_fingerprint = model_fingerprint
        self.path: Optional[Path] = None
        self._keys: List[str] = []
        self._position: Dict[str, int] = {}
        self._alive = np.zeros(0, bool)
        self._n_vectors = np.zeros(0, np.uint32)
        self._offsets = np.zeros(self.n_words + 1, np.int64)
        self._vectors = np.zeros((0, self.vector_width), self.vector_dtype)
        self._image_ids = np.zeros(0, np.uint32)
        self._pending: List[Tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._derived: Dict[bool, Tuple[np.ndarray, np.ndarray]] = {}
        self._collection_idf: Optional[np.ndarray] = None

    # -- shape of the postings -----------------------------------------------------------------
    @property
    def vector_width(self) -> int:
        return codes.code_words(self.dim) if self.binary else self.dim

    @property
    def vector_dtype(self):
        return np.dtype(np.uint64) if self.binary else np.dtype(np.float32)

    # -- bookkeeping -----------------------------------------------------------------------------
    @property
    def keys(self) -> List[str]:
        """Keys of the images in the index (removed ones left out)."""
        if self._alive.all():
            return list(self._keys)
        return [k for k, a in zip(self._keys, self._alive) if a]

    def __len__(self) -> int:
        return len(self._position)

    def __contains__(self, key: str) -> bool:
        return key in self._position

    def position(self, key: str) -> Optional[int]:
        """The image position of ``key`` (what its postings' image ids hold), None if not held."""
        return self._position.get(key)

    @property
    def slot_keys(self) -> List[str]:
        """Keys of every image position, removed images included (until ``compact``): the
        database keys that search results index."""
        return list(self._keys)

    @property
    def n_slots(self) -> int:
        """Image positions in use, removed images included (until compact)."""
        return len(self._keys)

    @property
    def n_postings(self) -> int:
        return int(len(self._image_ids) + sum(len(c[2]) for c in self._pending))

    def nbytes(self) -> dict:
        """Bytes held by the index (postings, per-word and per-image arrays)."""
        self.consolidate()
        postings = int(self._vectors.nbytes + self._image_ids.nbytes)
        per_image = int(self._n_vectors.nbytes + self._alive.nbytes + sum(len(k.encode()) for k in self._keys))
        total = postings + int(self._offsets.nbytes) + per_image
        n = max(self.n_postings, 1)
        return {"postings": postings, "offsets": int(self._offsets.nbytes), "per_image": per_image,
                "total": total, "per_vector": postings / n, "per_vector_total": total / n,
                "per_image_total": total / max(len(self), 1)}

    def stats(self) -> dict:
        self.consolidate()
        counts = np.diff(self._offsets)
        return {"images": len(self), "removed_pending_compact": int(self.n_slots - len(self)),
                "postings": self.n_postings, "vectors_per_image": self.n_postings / max(self.n_slots, 1),
                "empty_words": int((counts == 0).sum()), "max_postings_per_word": int(counts.max(initial=0)),
                "binary": self.binary, "use_idf": self.use_idf, "bytes": self.nbytes()}

    # -- updates ---------------------------------------------------------------------------------
    def add(self, keys: Sequence[str], aggregated: Aggregated) -> None:
        """Add images ``keys`` with their aggregated vectors (``aggregated.images`` indexes ``keys``).

        Costs O(batch): the batch becomes a word-sorted chunk merged into the postings lazily.
        """
        vectors, words, images = aggregated
        keys = [str(k) for k in keys]
        vectors = np.asarray(vectors)
        words = np.asarray(words, np.int64).ravel()
        images = np.asarray(images, np.int64).ravel()
        m = len(words)
        if len(images) != m or len(vectors) != m:
            raise ValueError(f"add: {len(vectors)} vectors, {m} words and {len(images)} image indices differ")
        if vectors.ndim != 2 or vectors.shape[1] != self.vector_width or \
                (self.binary and vectors.dtype != np.uint64) or \
                (not self.binary and not np.issubdtype(vectors.dtype, np.floating)):
            kind = f"(m, {self.vector_width}) uint64 codes" if self.binary else f"(m, {self.dim}) float vectors"
            raise ValueError(f"add: vectors {vectors.shape} {vectors.dtype} are not {kind}")
        if len(set(keys)) != len(keys):
            raise ValueError("add: duplicate keys in one batch")
        present = [k for k in keys if k in self._position]
        if present:
            raise ValueError(f"add: {present[0]!r} is already in the index (remove it first)")
        if m and (words.min() < 0 or words.max() >= self.n_words):
            raise ValueError(f"add: word ids must be in [0, {self.n_words})")
        if m and (images.min() < 0 or images.max() >= len(keys)):
            raise ValueError(f"add: image indices must be in [0, {len(keys)})")
        base = self.n_slots
        if base + len(keys) > MAX_IMAGES:
            raise ValueError(f"add: an inverted file holds at most {MAX_IMAGES} images")
        pair = images * self.n_words + words
        order = np.argsort(pair, kind="stable")
        if m > 1 and (pair[order][1:] == pair[order][:-1]).any():
            raise ValueError("add: an image has two aggregated vectors for one word (aggregate first)")
        order = order[np.argsort(words[order], kind="stable")]  # by word, then image
        # a chunk keeps its sorted words compactly (2 bytes each for <= 65,536 words); per-word
        # offsets are only made while merging, one chunk at a time
        chunk_words = words[order].astype(np.uint16 if self.n_words <= 65536 else np.uint32)
        chunk_vec = np.ascontiguousarray(vectors[order], self.vector_dtype)
        chunk_ids = (images[order] + base).astype(np.uint32)
        if m:
            self._pending.append((chunk_words, chunk_vec, chunk_ids))
        self._keys.extend(keys)
        self._position.update((k, base + i) for i, k in enumerate(keys))
        self._alive = np.concatenate([self._alive, np.ones(len(keys), bool)])
        self._n_vectors = np.concatenate([self._n_vectors,
                                          np.bincount(images, minlength=len(keys)).astype(np.uint32)])
        self._changed()

    def remove(self, keys: Union[str, Sequence[str]], missing_ok: bool = False) -> int:
        """Remove images by key (their postings are skipped, and dropped by ``compact``)."""
        if isinstance(keys, str):
            keys = [keys]
        removed = 0
        for key in keys:
            pos = self._position.pop(key, None)
            if pos is None:
                if not missing_ok:
                    raise KeyError(f"{key!r} is not in the index")
                continue
            if not self._alive.flags.writeable:
                self._alive = self._alive.copy()
            self._alive[pos] = False
            removed += 1
        if removed:
            self._changed()
        return removed

    def _changed(self) -> None:
        """Forget what was derived from the images held (weights, norms, a collection's idf)."""
        self._derived.clear()
        self._collection_idf = None

    def consolidate(self) -> None:
        """Merge pending chunks into the contiguous per-word postings (one pass, chunks freed as
        they are copied)."""
        if not self._pending:
            return
        counts = np.diff(self._offsets)
        for chunk_words, _, _ in self._pending:
            counts = counts + np.bincount(chunk_words, minlength=self.n_words)
        offsets = np.zeros(self.n_words + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        total = int(offsets[-1])
        vectors = np.empty((total, self.vector_width), self.vector_dtype)
        image_ids = np.empty(total, np.uint32)
        cursor = offsets[:-1].copy()
        copy_blocks(self._vectors, self._image_ids, self._offsets, vectors, image_ids, cursor)
        self._vectors, self._image_ids = vectors[:0], image_ids[:0]  # let the old arrays go
        pending, self._pending = self._pending, []
        while pending:
            chunk_words, chunk_vec, chunk_ids = pending.pop(0)
            chunk_off = np.zeros(self.n_words + 1, np.int64)
            np.cumsum(np.bincount(chunk_words, minlength=self.n_words), out=chunk_off[1:])
            copy_blocks(chunk_vec, chunk_ids, chunk_off, vectors, image_ids, cursor)
            del chunk_words, chunk_vec, chunk_ids
        self._offsets, self._vectors, self._image_ids = offsets, vectors, image_ids

    def compact(self) -> None:
        """Drop removed images for good and renumber the rest (postings rewritten once)."""
        self.consolidate()
        if self._alive.all():
            return
        kept = self.subset(self._alive)
        self._offsets, self._vectors, self._image_ids = kept._offsets, kept._vectors, kept._image_ids
        self._keys, self._position = kept._keys, kept._position
        self._n_vectors, self._alive = kept._n_vectors, kept._alive
        self._changed()

    def subset(self, keep: np.ndarray) -> "InvertedFile":
        """A new index of the (alive) images at the positions where ``keep`` is True, in their
        order, with the same settings (how a sharded index splits one)."""
        self.consolidate()
        keep = np.asarray(keep, bool) & self._alive
        if keep.shape != (self.n_slots,):
            raise ValueError(f"subset: keep has {keep.size} entries, the index {self.n_slots} positions")
        new_position = (np.cumsum(keep) - 1).astype(np.uint32)
        total = int(self._n_vectors[keep].sum(dtype=np.int64))
        part = InvertedFile(self.n_words, self.dim, self.binary, self.use_idf, self.alpha, self.tau,
                            self.codebook_fingerprint, self.extractor, self.model_fingerprint)
        part._vectors = np.empty((total, self.vector_width), self.vector_dtype)
        part._image_ids = np.empty(total, np.uint32)
        compact_postings(self._offsets, self._vectors, self._image_ids, new_position, keep,
                         part._offsets, part._vectors, part._image_ids)
        part._keys = [k for k, a in zip(self._keys, keep) if a]
        part._position = {k: i for i, k in enumerate(part._keys)}
        part._n_vectors = np.ascontiguousarray(self._n_vectors[keep])
        part._alive = np.ones(len(part._keys), bool)
        return part

    # -- scoring helpers -------------------------------------------------------------------------
    def document_frequency(self) -> np.ndarray:
        """(n_words,) number of (alive) database images holding each word."""
        self.consolidate()
        if self._alive.all():
            return np.diff(self._offsets)
        return alive_df(self._offsets, self._image_ids, self._alive)

    def idf(self) -> np.ndarray:
        """(n_words,) float64 idf(w) = log(N / df(w))**2 (1 for words no image has); of the whole
        collection when this index is one shard of it (``set_collection_idf``)."""
        if self._collection_idf is not None:
            return self._collection_idf
        return codes.idf_weights(self.document_frequency(), len(self))

    def set_collection_idf(self, idf: np.ndarray) -> None:
        """Score with the idf of the collection this index is a shard of (its images' summed
        document frequencies), so that idf scores equal those of one index of every image.
        Forgotten when images are added or removed here."""
        idf = np.asarray(idf, np.float64)
        if idf.shape != (self.n_words,):
            raise ValueError(f"collection idf has shape {idf.shape}, the index {self.n_words} words")
        self._derived.pop(True, None)
        self._collection_idf = idf

    def _weights(self, use_idf: bool) -> Tuple[np.ndarray, np.ndarray]:
        """(per-word weight, per-image 1/sqrt(norm), 0 for removed or empty images)."""
        if use_idf not in self._derived:
            self.consolidate()
            if use_idf:
                weight = self.idf()
                norms = weighted_norms(self._offsets, self._image_ids, weight, self.n_slots)
            else:
                weight = np.ones(self.n_words, np.float64)
                norms = self._n_vectors.astype(np.float64)
            scale = np.zeros(self.n_slots, np.float64)
            ok = self._alive & (norms > 0)
            scale[ok] = 1.0 / np.sqrt(norms[ok])
            self._derived[use_idf] = (weight, scale)
        return self._derived[use_idf]

    # -- search ----------------------------------------------------------------------------------
    def search(self, aggregated: Aggregated, k: int = 100, query_keys: Optional[Sequence[str]] = None,
               alpha: Optional[float] = None, tau: Optional[float] = None,
               use_idf: Optional[bool] = None) -> Neighbours:
        """Top-k database images for a batch of aggregated queries.

        aggregated: the queries' vectors and words; ``aggregated.images`` (m,) the query index of
        each vector, in [0, nq) with nq = len(query_keys) (default: max + 1, keys "0", "1", ...).
        """
        query_keys, idx, sc = self.ranked(aggregated, k, query_keys, alpha, tau, use_idf)
        return Neighbours(query_keys, self._keys, idx, sc.astype(np.float32))

    def ranked(self, aggregated: Aggregated, k: int = 100, query_keys: Optional[Sequence[str]] = None,
               alpha: Optional[float] = None, tau: Optional[float] = None,
               use_idf: Optional[bool] = None) -> Tuple[List[str], np.ndarray, np.ndarray]:
        """``search`` before rounding: (query keys, (nq, k) positions, (nq, k) float64 scores),
        what a sharded index merges (rounded scores would tie where the full ones do not)."""
        vectors, words, images = aggregated
        alpha = self.alpha if alpha is None else float(alpha)
        tau = self.tau if tau is None else float(tau)
        use_idf = self.use_idf if use_idf is None else bool(use_idf)
        k = int(k)
        if k < 1:
            raise ValueError(f"search: k must be >= 1, got {k}")
        vectors = np.asarray(vectors)
        words = np.asarray(words, np.int64).ravel()
        images = np.asarray(images, np.int64).ravel()
        if query_keys is None:
            nq = int(images.max()) + 1 if len(images) else 0
            query_keys = [str(i) for i in range(nq)]
        query_keys = list(query_keys)
        nq = len(query_keys)
        if len(vectors) != len(words) or len(images) != len(words):
            raise ValueError("search: vectors, words and query indices differ in length")
        if len(words) and (images.min() < 0 or images.max() >= nq):
            raise ValueError(f"search: query indices must be in [0, {nq})")
        if len(words) and (words.min() < 0 or words.max() >= self.n_words):
            raise ValueError(f"search: word ids must be in [0, {self.n_words})")
        if vectors.ndim != 2 or vectors.shape[1] != self.vector_width:
            raise ValueError(f"search: query vectors {vectors.shape} do not match the index "
                             f"({'binary' if self.binary else 'float'}, width {self.vector_width})")
        weight, db_scale = self._weights(use_idf)
        order = np.argsort(images, kind="stable")
        q_words = np.ascontiguousarray(words[order])
        q_off = np.zeros(nq + 1, np.int64)
        np.cumsum(np.bincount(images, minlength=nq), out=q_off[1:])
        q_norm = np.bincount(images, weights=weight[words], minlength=nq)
        q_scale = np.zeros(nq, np.float64)
        q_scale[q_norm > 0] = 1.0 / np.sqrt(q_norm[q_norm > 0])
        workers = max(1, min(nq, numba.get_num_threads()))
        if nq == 0:
            idx, sc = np.zeros((0, k), np.int64), np.zeros((0, k), np.float64)
        elif self.binary:
            q_codes = np.ascontiguousarray(vectors[order], np.uint64)
            table = codes.kernel_table(self.dim, alpha, tau)
            idx, sc = search_binary(q_off, q_words, q_codes, q_scale, self._offsets, self._vectors,
                                     self._image_ids, db_scale, weight, table, k, workers)
        else:
            q_vecs = np.ascontiguousarray(vectors[order], np.float32)
            idx, sc = search_float(q_off, q_words, q_vecs, q_scale, self._offsets, self._vectors,
                                    self._image_ids, db_scale, weight, alpha, tau, k, workers)
        return query_keys, idx, sc

    def postings(self, word: int) -> Tuple[np.ndarray, np.ndarray]:
        """(vectors, image positions) of one word (for inspection and tests)."""
        self.consolidate()
        a, b = self._offsets[word], self._offsets[word + 1]
        return self._vectors[a:b], self._image_ids[a:b]

    # -- files -----------------------------------------------------------------------------------
    def _meta(self) -> dict:
        arrays = self.arrays()
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "n_words": self.n_words, "dim": self.dim, "binary": self.binary,
            "use_idf": self.use_idf, "alpha": self.alpha, "tau": self.tau,
            "n_images": self.n_slots, "n_alive": len(self), "n_postings": self.n_postings,
            "codebook_fingerprint": self.codebook_fingerprint, "extractor": self.extractor,
            "model_fingerprint": self.model_fingerprint,
            "arrays": {name: {"shape": list(a.shape), "dtype": a.dtype.str} for name, a in arrays.items()},
        }

    def arrays(self) -> Dict[str, np.ndarray]:
        """The postings and per-image arrays as they are saved (consolidated; see the module
        docstring): offsets, vectors, image_ids, n_vectors, alive."""
        self.consolidate()
        return {"offsets": self._offsets, "vectors": self._vectors, "image_ids": self._image_ids,
                "n_vectors": self._n_vectors, "alive": self._alive}

    def save(self, path: os.PathLike) -> Path:
        """Write the index (directory, or HDF5 for a .h5/.hdf5 path) atomically."""
        path = Path(path)
        self.consolidate()
        write_index(path, self._meta(), self.arrays(), self._keys)
        self.path = path
        return path

    @classmethod
    def load(cls, path: os.PathLike, mmap: bool = True) -> "InvertedFile":
        """Read an index saved by ``save`` (memory-mapped by default: postings stay on disk
        until touched), validated as described in ``how_met.asmk.io``."""
        path = Path(path)
        meta, arrays, keys = read_index(path, mmap)
        ivf = cls(meta["n_words"], meta["dim"], meta["binary"], meta["use_idf"], meta["alpha"], meta["tau"],
                  meta.get("codebook_fingerprint"), meta.get("extractor"), meta.get("model_fingerprint"))
        check_consistency(path, meta, arrays, keys, ivf.vector_width, ivf.vector_dtype)
        ivf._offsets = arrays["offsets"]
        ivf._vectors = arrays["vectors"]
        ivf._image_ids = arrays["image_ids"]
        ivf._n_vectors = arrays["n_vectors"]
        ivf._alive = np.array(arrays["alive"], bool)  # small and mutable (remove)
        ivf._keys = list(keys)
        ivf._position = {k: i for i, k in enumerate(keys) if ivf._alive[i]}
        ivf.path = path
        return ivf

    @classmethod
    def from_postings(cls, keys: Sequence[str], offsets: np.ndarray, vectors: np.ndarray,
                      image_ids: np.ndarray, n_vectors: np.ndarray, **settings) -> "InvertedFile":
        """An index over postings already in the consolidated layout (module docstring), e.g.
        memory-mapped arrays that ``how_met.asmk.indexing.index_from_records`` filled on disk;
        ``settings``: the constructor's (dim, binary, use_idf, fingerprints, ...)."""
        ivf = cls(len(offsets) - 1, **settings)
        ivf._offsets, ivf._vectors, ivf._image_ids = offsets, vectors, image_ids
        ivf._n_vectors = np.asarray(n_vectors, np.uint32)
        ivf._alive = np.ones(len(keys), bool)
        ivf._keys = list(keys)
        ivf._position = {k: i for i, k in enumerate(ivf._keys)}
        return ivf

    def check_codebook(self, codebook) -> None:
        """Refuse a codebook other than the one this index was built with, or one trained on
        descriptors of another model."""
        where = self.path or "the inverted file"
        if self.codebook_fingerprint and self.codebook_fingerprint != codebook.fingerprint:
            raise ValueError(f"{where} was built with another codebook (fingerprint "
                             f"{self.codebook_fingerprint}) than {codebook.path or 'the codebook given'} "
                             f"({codebook.fingerprint})")
        check_model(codebook.model_fingerprint, self.model_fingerprint, codebook.path or "the codebook", where)
        if self.n_words != len(codebook.centroids) or self.dim != codebook.dim:
            raise ValueError(f"{where}: has {self.n_words} words of dim {self.dim}; the codebook has "
                             f"{len(codebook.centroids)} of dim {codebook.dim}")

    def __repr__(self) -> str:
        kind = "binary" if self.binary else "float"
        return (f"InvertedFile({len(self)} images, {self.n_postings} postings, {self.n_words} words, "
                f"{kind}, idf={self.use_idf})")


def load_index(index, codebook=None, mmap: bool = True) -> InvertedFile:
    """The index given (an InvertedFile or a ``ShardedIndex``), or the InvertedFile saved at that
    path (memory-mapped); with ``codebook``, checked to be the one it was built with
    (``check_codebook``)."""
    if isinstance(index, (str, os.PathLike)):  # else an InvertedFile or a ShardedIndex
        index = InvertedFile.load(index, mmap=mmap)
    if codebook is not None:
        index.check_codebook(codebook)
    return index
