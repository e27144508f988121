"""Visual-word codebook: faiss k-means training and nearest-centroid assignment.

Assignment searches: ``"exact"`` (faiss flat L2: one BLAS product per batch, on every thread
``configure_threads`` gives faiss), ``"bfloat16"`` (``how_met.asmk.bfloat16_search``: a bfloat16
product with every word, the 12 best of each descriptor re-ranked by exact distances),
``"grouped"`` (``how_met.asmk.grouped_search``: exact distances to the words of each descriptor's
80 nearest groups of K / 64 words, one matrix product per group), and two approximate searches
of faiss, available by name:

- ``"ivf"``: the centroids grouped by a second, coarse k-means into lists of ~16 (K / 16 lists);
  each descriptor scans the ``nprobe`` lists with the nearest coarse centroids;
- ``"hnsw"``: a faiss HNSW graph over the centroids (M ``hnsw_m``, ``ef_search``).

``"auto"`` (the default) is exact below 65,536 words and, from 65,536 on, bfloat16 where the CPU
has AMX tiles and grouped elsewhere (the bfloat16 product is too slow without them). On real HOW
descriptors at 65k words (README "Fidelity: word assignment") bfloat16 found the exact words
(recall@5 and top-1 1.000) for ~4x less CPU than exact, grouped kept 0.995 / 0.999 for ~3.5x
less, while faiss IVF and HNSW reached 0.99 only at settings about as slow as exact search (IVF
with 4 probes, round 1's default for 8k words and more, kept 65-69% of the exact top 5). "auto"
resolves on the machine that assigns: a codebook file records "auto", and its recorded recall is
that of the search of the machine that trained it.
Every trained codebook records, in ``meta["assignment_recall"]``, the recall of its search
measured on held-out real descriptors of the training store (``quantisation_recall``).

Training: faiss k-means (10 iterations) on descriptors sampled with the same quota from every
image; ``points_per_centroid`` caps the points faiss itself keeps (the official HOW codebook:
256 per centroid, seed 1234).

Files are ``.npz`` archives of plain arrays (read with ``allow_pickle=False``) holding the
centroids, the coarse centroids of the IVF search and the groups of the grouped search when
built, and the metadata as a JSON string;
a readable ``.json`` copy of the metadata is written beside the archive.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Optional, Sequence, Tuple

import faiss
import numpy as np

from .bfloat16_search import BFloat16Search, bfloat16_products_fast
from .grouped_search import DEFAULT_PROBES, GroupedSearch, check_groups, group_count, train_groups
from .settings import (AUTO_MIN_RECALL, CODEBOOK_DIR, CODEBOOK_RECIPES, DEFAULT_EF_SEARCH, DEFAULT_HNSW_M,
                       DEFAULT_MAX_DESCRIPTORS, DEFAULT_NPROBE, GROUPED_MIN_WORDS, KMEANS_POINTS_PER_WORD,
                       LEGACY_METHOD_NAMES, RECALL_SAMPLE, SEARCH_METHODS, auto_codebook_size)
from ..utils import atomic_path, check_file_format, configured_threads, load_npz, progress, write_json

logger = logging.getLogger(__name__)

HELD_OUT_SHARE = 20  # at most 1 in 20 training descriptors is held out to measure recall on
FORMAT = "how-met-codebook"
FORMAT_VERSION = 1


def centroid_fingerprint(centroids: np.ndarray) -> str:
    """Short content hash of the centroids: an index records it to refuse another codebook."""
    arr = np.ascontiguousarray(centroids, np.float32)
    digest = hashlib.sha256(str(arr.shape).encode() + arr.tobytes()).hexdigest()
    return digest[:16]


class Codebook:
    """K visual words (centroids) with nearest-centroid assignment.

    Training settings: size, iterations (10), seed, max_descriptors (sampled uniformly across
    images: the same quota from each image), points_per_centroid (faiss's own subsampling cap;
    None: every sampled descriptor). Search settings: method ("auto" = "exact"; "ivf"; "hnsw"),
    nlist/nprobe of the IVF search, hnsw_m/ef_search of the HNSW search.
    """

    def __init__(self, size: Optional[int] = None, iterations: int = 10, seed: int = 0,
                 max_descriptors: int = DEFAULT_MAX_DESCRIPTORS, method: str = "auto",
                 nlist: Optional[int] = None,
                 nprobe: int = DEFAULT_NPROBE, hnsw_m: int = DEFAULT_HNSW_M,
                 ef_search: int = DEFAULT_EF_SEARCH, points_per_centroid: Optional[int] = None,
                 probes: int = DEFAULT_PROBES):
        method = LEGACY_METHOD_NAMES.get(method, method)
        if method not in SEARCH_METHODS:
            raise ValueError(f"codebook search method must be one of {SEARCH_METHODS}, got {method!r}")
        self.points_per_centroid = None if points_per_centroid is None else int(points_per_centroid)
        self.size = None if size is None else int(size)
        self.iterations = int(iterations)
        self.seed = int(seed)
        self.max_descriptors = int(max_descriptors)
        self.requested_method = method
        self.nlist = nlist
        self.nprobe = int(nprobe)
        self.hnsw_m = int(hnsw_m)
        self.ef_search = int(ef_search)
        self.probes = int(probes)
        self.centroids: Optional[np.ndarray] = None
        self.coarse_centroids: Optional[np.ndarray] = None
        self.groups: Optional[Tuple[np.ndarray, np.ndarray]] = None  # (group centroids, group of each word)
        self.meta: dict = {}
        self.path: Optional[Path] = None  # the file it was loaded from or saved to
        self._exact = None
        self._approx = None
        self._approx_quantizer = None

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_centroids(cls, centroids: np.ndarray, meta: Optional[dict] = None, **search) -> "Codebook":
        centroids = np.ascontiguousarray(centroids, np.float32)
        if centroids.ndim != 2 or len(centroids) == 0:
            raise ValueError(f"centroids must be a non-empty (K, d) array, got {centroids.shape}")
        cb = cls(size=len(centroids), **search)
        cb.centroids = centroids
        cb.meta = dict(meta or {})
        cb.meta.update({"size": int(len(centroids)), "dim": int(centroids.shape[1])})
        return cb

    def train(self, source, keys: Optional[Sequence[str]] = None, show_progress: bool = True,
              recall_sample: int = RECALL_SAMPLE) -> "Codebook":
        """k-means on descriptors of a FeatureStore (or its path) or of an (n, d) array.

        First ``recall_sample`` descriptors (at most 1 in HELD_OUT_SHARE) are set aside (from a
        store: the same number from every image) and never trained on; the recall of this codebook's assignment search on
        them is stored in ``meta["assignment_recall"]``. From the rest ``max_descriptors`` are
        drawn, from a store with an equal quota per image (of ``keys``, default all).
        """
        if self.size is None or self.size < 1:
            raise ValueError("codebook size must be a positive integer")
        rng = np.random.default_rng(self.seed)
        extractor, training, model = {}, {}, None
        if isinstance(source, np.ndarray):
            data = np.ascontiguousarray(source, np.float32)
            order = rng.permutation(len(data))
            held_out = data[np.sort(order[:min(recall_sample, len(data) // HELD_OUT_SHARE)])]
            data = data[np.sort(order[len(held_out):][:self.max_descriptors])]
            training = {"source": "array", "descriptors": int(len(data))}
        else:
            data, held_out, extractor, model, training = self._sample_store(source, keys, rng, show_progress,
                                                                            recall_sample)
        if data.ndim != 2 or len(data) < self.size:
            raise ValueError(f"k-means into {self.size} words needs at least {self.size} "
                             f"descriptors, got {len(data)}")
        d = data.shape[1]
        started = time.perf_counter()
        if len(data) < KMEANS_POINTS_PER_WORD * self.size:
            # (said here, through logging, instead of faiss's own print to stderr)
            logger.warning("codebook: %d training descriptors for %d words (fewer than %d per word): the words "
                           "will be noisy; use fewer words (--size %d) or more images", len(data), self.size,
                           KMEANS_POINTS_PER_WORD, max(1, 2 ** int(math.log2(max(len(data) // KMEANS_POINTS_PER_WORD, 1)))))
        cap = self.points_per_centroid or len(data) // self.size + 1
        kmeans = faiss.Kmeans(d, self.size, niter=self.iterations, seed=self.seed, verbose=False,
                              min_points_per_centroid=1, max_points_per_centroid=cap)
        kmeans.train(data)
        self.centroids = np.ascontiguousarray(kmeans.centroids, np.float32)
        self._exact = self._approx = None
        self.coarse_centroids = self.groups = None
        training["points_per_centroid"] = self.points_per_centroid
        self.meta = {
            "size": int(self.size), "dim": int(d), "iterations": self.iterations, "seed": self.seed,
            # no date, duration or k-means objective: the same inputs give the same file, byte for
            # byte (the objective's last bits depend on how many threads BLAS splits its products
            # over, on some CPUs: it is logged instead)
            "extractor": extractor, "model_fingerprint": model, "training_set": training,
            "faiss_version": faiss.__version__,
        }
        logger.info("k-means into %d words: %.1f s, objective %s", self.size, time.perf_counter() - started,
                    f"{kmeans.obj[-1]:.6g}" if len(kmeans.obj) else "-")
        if len(held_out):
            recall = self.measure_recall(held_out, k=5)  # its milliseconds vary run to run: not kept
            if self.requested_method == "auto" and self.approximate and \
                    min(recall["recall"], recall["top1"]) < AUTO_MIN_RECALL:
                # the groups' share that keeps 0.99 depends on the codebook (README): auto never
                # records a search below it, it records the exact one
                logger.warning("codebook: the %s search kept recall@5 %.3f / top-1 %.3f of the exact one on "
                               "held-out descriptors (< %.2f): this codebook assigns with the exact search",
                               self.method, recall["recall"], recall["top1"], AUTO_MIN_RECALL)
                self.requested_method, self._approx, self.groups = "exact", None, None
                recall = self.measure_recall(held_out, k=5)
            self.meta["assignment_recall"] = {**{k: v for k, v in recall.items() if not k.endswith("_ms_per_1000")},
                                              "held_out": "descriptors of the training store not trained on"}
        return self

    def _sample_store(self, source, keys, rng, show_progress, recall_sample):
        from ..features.store import FeatureStore
        store = source if isinstance(source, FeatureStore) else FeatureStore(source, "r")
        try:
            keys = store.keys() if keys is None else list(keys)
            if not keys:
                raise ValueError(f"{store.path}: no images to train a codebook on")
            quota = -(-self.max_descriptors // len(keys))
            held_quota = -(-recall_sample // len(keys))
            parts, held, images = [], [], 0
            for key in progress(keys, desc="codebook sample", unit="img", disable=None if show_progress else True):
                desc = store.descriptors(key)
                order = rng.permutation(len(desc))
                n_held = min(held_quota, len(desc) // HELD_OUT_SHARE)
                held.append(desc[np.sort(order[:n_held])])
                desc = desc[np.sort(order[n_held:][:quota])]
                if len(desc):
                    parts.append(desc)
                    images += 1
            data = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
            held_out = np.concatenate(held) if held else np.zeros((0, 0), np.float32)
            training = {"source": str(store.path), "images": images, "per_image_quota": int(quota),
                        "descriptors": int(len(data)), "held_out": int(len(held_out))}
            return (np.ascontiguousarray(data, np.float32), np.ascontiguousarray(held_out, np.float32),
                    store.config, store.model_fingerprint, training)
        finally:
            if store is not source:
                store.close()

    # -- properties ----------------------------------------------------------------------------
    def _require(self) -> np.ndarray:
        if self.centroids is None:
            raise RuntimeError("codebook has no centroids (train or load it first)")
        return self.centroids

    @property
    def dim(self) -> int:
        return int(self._require().shape[1])

    @property
    def model_fingerprint(self) -> Optional[str]:
        """Fingerprint of the model whose descriptors trained the codebook (None if unknown)."""
        return self.meta.get("model_fingerprint")

    @property
    def fingerprint(self) -> str:
        return centroid_fingerprint(self._require())

    @property
    def method(self) -> str:
        """The search actually used: exact, bfloat16, grouped, ivf or hnsw ("auto": from
        GROUPED_MIN_WORDS words on, bfloat16 where the CPU has AMX tiles and grouped elsewhere;
        exact below)."""
        if self.requested_method == "auto":
            if len(self._require()) < GROUPED_MIN_WORDS:
                return "exact"
            return "bfloat16" if bfloat16_products_fast() else "grouped"
        return self.requested_method

    @property
    def approximate(self) -> bool:
        return self.method != "exact"

    def _nlist(self) -> int:
        if self.nlist:
            return int(self.nlist)
        # lists of ~16 centroids: measured on 65,536 128-D words (mixture data, top-5), 4,096
        # lists x 4 probes reached 99.98% recall in the time 1,024 lists x 8 probes took for
        # 99.35%; the coarse search over many lists is one BLAS product
        return int(max(1, len(self._require()) // 16))

    # -- search indexes ------------------------------------------------------------------------
    def _exact_index(self):
        if self._exact is None:
            index = faiss.IndexFlatL2(self.dim)
            index.add(self._require())
            self._exact = index
        return self._exact

    def _approx_index(self):
        if self._approx is None:
            centroids = self._require()
            d = centroids.shape[1]
            if self.method == "grouped":
                if self.groups is None:  # seeded: the same groups from the same centroids
                    self.groups = train_groups(centroids, group_count(len(centroids)), self.seed + 1)
                index = GroupedSearch(centroids, *self.groups)
            elif self.method == "bfloat16":
                index = BFloat16Search(centroids)
            elif self.method == "hnsw":
                index = faiss.IndexHNSWFlat(d, self.hnsw_m)
                index.hnsw.efConstruction = max(40, 2 * self.hnsw_m)
                index.add(centroids)
            else:
                if self.coarse_centroids is None:
                    nlist = self._nlist()
                    coarse = faiss.Kmeans(d, nlist, niter=10, seed=self.seed + 1, verbose=False,
                                          min_points_per_centroid=1,
                                          max_points_per_centroid=max(256, len(centroids) // nlist + 1))
                    coarse.train(centroids)
                    self.coarse_centroids = np.ascontiguousarray(coarse.centroids, np.float32)
                quantizer = faiss.IndexFlatL2(d)
                quantizer.add(self.coarse_centroids)
                index = faiss.IndexIVFFlat(quantizer, d, len(self.coarse_centroids))
                index.is_trained = True
                index.add(centroids)
                self._approx_quantizer = quantizer  # the index does not own it: keep it alive
            self._approx = index
        self._tune(self._approx)
        return self._approx

    def _tune(self, index) -> None:
        if isinstance(index, GroupedSearch):
            index.probes = int(min(max(1, self.probes), len(index.group_centroids)))
        elif isinstance(index, faiss.IndexHNSWFlat):
            index.hnsw.efSearch = self.ef_search
        elif isinstance(index, faiss.IndexIVFFlat):
            index.nprobe = self.nprobe

    # -- assignment ----------------------------------------------------------------------------
    def assign(self, descriptors: np.ndarray, k: int = 1, return_distances: bool = False,
               exact: Optional[bool] = None):
        """(n, k) int64 ids of the k nearest words of each descriptor, nearest first
        (and (n, k) float32 squared L2 distances with ``return_distances``).

        ``exact`` forces (True) or forbids (False) the exact search; default: ``self.method``.
        """
        centroids = self._require()
        desc = np.ascontiguousarray(descriptors, np.float32)
        if desc.ndim != 2 or desc.shape[1] != centroids.shape[1]:
            raise ValueError(f"descriptors of shape {desc.shape} do not match the codebook's "
                             f"dimension {centroids.shape[1]}")
        k = int(k)
        if not 1 <= k <= len(centroids):
            raise ValueError(f"k={k} must be in [1, {len(centroids)}]")
        use_exact = (self.method == "exact") if exact is None else exact
        index = self._exact_index() if use_exact else self._approx_index()
        if len(desc) == 0:
            ids, dist = np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        elif isinstance(index, (GroupedSearch, BFloat16Search)):
            dist, ids = index.search(desc, k, configured_threads() or 1)
            short = np.flatnonzero(ids[:, -1] < 0)  # probed groups with fewer than k words (or NaN input)
            if len(short):
                dist[short], ids[short] = self._exact_index().search(desc[short], k)
        else:
            dist, ids = index.search(desc, k)
        ids = ids.astype(np.int64, copy=False)
        return (ids, dist) if return_distances else ids

    def measure_recall(self, descriptors: np.ndarray, k: int = 5) -> dict:
        """Recall of this codebook's assignment against the exact one (see quantisation_recall)."""
        return quantisation_recall(self, descriptors, k)

    # -- files -----------------------------------------------------------------------------------
    def save(self, path: os.PathLike, float16: bool = False) -> Path:
        """Write ``path`` (.npz, plain arrays) and a readable ``<path>.json`` metadata copy.

        ``float16`` halves the file (for codebooks shipped in the repository): the centroids
        become their float16 values first, so the recorded fingerprint is what ``load`` reads.
        """
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        centroids = self._require()
        if float16:
            self.centroids = centroids = np.ascontiguousarray(centroids.astype(np.float16).astype(np.float32))
            self._exact = self._approx = None
        if self.method in ("ivf", "grouped"):
            self._approx_index()  # train the coarse centroids / groups once, store them with the file
        meta = dict(self.meta)
        meta.update({"format": FORMAT, "format_version": FORMAT_VERSION, "size": int(len(centroids)),
                     "dim": int(centroids.shape[1]), "fingerprint": self.fingerprint,
                     "search": self.search_settings()})
        arrays = {"centroids": centroids.astype(np.float16) if float16 else centroids,
                  "meta_json": np.array(json.dumps(meta, sort_keys=True))}
        if self.coarse_centroids is not None:
            arrays["coarse_centroids"] = self.coarse_centroids
        if self.groups is not None:
            arrays["group_centroids"], arrays["word_group"] = self.groups
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
        write_json(path.with_suffix(".json"), meta)
        self.meta = meta
        self.path = path
        return path

    def search_settings(self) -> dict:
        return {"method": self.requested_method,
                "nlist": self.nlist, "nprobe": self.nprobe, "hnsw_m": self.hnsw_m,
                "ef_search": self.ef_search, "probes": self.probes}

    @classmethod
    def load(cls, path: os.PathLike, **search) -> "Codebook":
        """Read a codebook .npz; keyword arguments override the stored search settings."""
        path = Path(path)
        if not path.exists() and path.with_name(path.name + ".npz").exists():
            path = path.with_name(path.name + ".npz")
        if not path.exists():
            raise FileNotFoundError(f"{path}: codebook does not exist")
        data = load_npz(path)  # headers checked against the file: no huge allocation, no pickles
        try:
            centroids = np.ascontiguousarray(data["centroids"], np.float32)
            meta = json.loads(str(data["meta_json"]))
            coarse = np.ascontiguousarray(data["coarse_centroids"], np.float32) \
                if "coarse_centroids" in data else None
            groups = (np.ascontiguousarray(data["group_centroids"], np.float32), np.asarray(data["word_group"])) \
                if "group_centroids" in data and "word_group" in data else None
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a readable codebook ({type(exc).__name__}: {exc})") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{path}: not a how-met codebook (metadata is a {type(meta).__name__})")
        check_file_format(path, meta, FORMAT, FORMAT_VERSION, "codebook")
        if centroids.ndim != 2 or list(centroids.shape) != [meta.get("size"), meta.get("dim")]:
            raise ValueError(f"{path}: centroids of shape {centroids.shape} do not match the "
                             f"metadata (size {meta.get('size')}, dim {meta.get('dim')})")
        if centroid_fingerprint(centroids) != meta.get("fingerprint"):
            raise ValueError(f"{path}: centroids do not match their recorded fingerprint (damaged file)")
        settings = {k: v for k, v in (meta.get("search") or {}).items()
                    if k in ("method", "nlist", "nprobe", "hnsw_m", "ef_search", "probes")}
        settings.update(search)
        cb = cls.from_centroids(centroids, meta=meta, **settings)
        cb.iterations = int(meta.get("iterations", cb.iterations))
        cb.seed = int(meta.get("seed", cb.seed))
        cb.points_per_centroid = (meta.get("training_set") or {}).get("points_per_centroid")
        if coarse is not None and coarse.ndim == 2 and coarse.shape[1] == centroids.shape[1]:
            cb.coarse_centroids = coarse
        if groups is not None:
            problem = check_groups(*groups, len(centroids), centroids.shape[1])
            if problem:
                raise ValueError(f"{path}: not a readable codebook ({problem})")
            cb.groups = (groups[0], groups[1].astype(np.int32))
        cb.path = path
        return cb

    def __repr__(self) -> str:
        if self.centroids is None:
            return f"Codebook(size={self.size}, untrained)"
        return f"Codebook(size={len(self.centroids)}, dim={self.dim}, method={self.method!r})"


def load_codebook(codebook) -> Codebook:
    """The Codebook given, or the one saved at that path."""
    return codebook if isinstance(codebook, Codebook) else Codebook.load(codebook)


def quantisation_recall(codebook: Codebook, descriptors: np.ndarray, k: int = 5) -> dict:
    """How well the codebook's assignment search matches the exact one on ``descriptors``.

    recall: mean fraction of the exact k nearest words found among the searched k (what query
    multiple assignment sees); top1: fraction of descriptors whose nearest word is the exact
    nearest word (what database assignment sees). Both are 1 for the exact search. Also the
    milliseconds per 1000 descriptors of the exact and of the used search (k nearest).
    """
    desc = np.ascontiguousarray(descriptors, np.float32)
    k = min(int(k), len(codebook._require()))
    n = max(len(desc), 1)
    t0 = time.perf_counter()
    exact = codebook.assign(desc, k, exact=True)
    exact_ms = 1000 * (time.perf_counter() - t0) * 1000 / n
    searched, searched_ms = exact, exact_ms
    if codebook.approximate:
        t0 = time.perf_counter()
        searched = codebook.assign(desc, k, exact=False)
        searched_ms = 1000 * (time.perf_counter() - t0) * 1000 / n
    recall, top1 = assignment_agreement(searched, exact) if len(desc) else (None, None)
    return {"method": codebook.method, "settings": codebook.search_settings(), "k": k,
            "descriptors": int(len(desc)), "recall": recall, "top1": top1,
            "exact_ms_per_1000": round(exact_ms, 2), "search_ms_per_1000": round(searched_ms, 2)}


def codebook_size_for(store, keys: Optional[Sequence[str]] = None) -> int:
    """The automatic codebook size (``auto_codebook_size``) for the descriptors of ``keys`` (default:
    all images) of a feature store or its path: the rule ``how-met evaluate`` sizes codebooks by."""
    from ..features.store import open_store
    store, owned = open_store(store)
    try:
        n_images = len(store.keys() if keys is None else keys)
        per_image = int(store.config.get("features_num", 1000))
    finally:
        if owned:
            store.close()
    return auto_codebook_size(per_image * n_images)


def assignment_agreement(searched: np.ndarray, exact: np.ndarray) -> Tuple[float, float]:
    """(recall, top1) of (n, k) searched word ids against the exact (n, k): the mean fraction of
    the exact k found among the searched k, and the fraction with the exact nearest word first."""
    searched, exact = np.asarray(searched), np.asarray(exact)
    hits = (searched[:, :, None] == exact[:, None, :]).any(axis=2).sum()
    return float(hits / exact.size), float(np.mean(searched[:, 0] == exact[:, 0]))


def train_codebook(features, size: Optional[int] = None, recipe: Optional[str] = None,
                   iterations: Optional[int] = None, seed: Optional[int] = None,
                   max_descriptors: Optional[int] = None, max_images: Optional[int] = None,
                   method: str = "auto", out=None, points_per_centroid: Optional[int] = None):
    """Train a codebook on a feature store and save it. ``recipe`` (a CODEBOOK_RECIPES name)
    supplies every setting not given explicitly and the file name; without a size either, the
    codebook is sized like ``how-met evaluate`` sizes it (``codebook_size_for``). ``out`` defaults
    to ``codebooks/<recipe or store name-size>.npz`` in the working directory. Returns (codebook,
    saved path)."""
    from ..features.store import FeatureStore

    given = {"size": size, "iterations": iterations, "max_descriptors": max_descriptors,
             "max_images": max_images, "points_per_centroid": points_per_centroid}
    for name, value in given.items():  # 0 used to mean "the default" silently
        if value is not None and value < 1:
            raise ValueError(f"codebook: {name} must be >= 1, got {value}")
    recipe_settings = dict(CODEBOOK_RECIPES[recipe]) if recipe else {}
    settings = {**recipe_settings, **{name: value for name, value in given.items() if value is not None}}
    size = settings.get("size")
    training = {"iterations": settings.get("iterations", 10),
                "seed": seed if seed is not None else settings.get("seed", 0),
                "max_descriptors": settings.get("max_descriptors", DEFAULT_MAX_DESCRIPTORS),
                "points_per_centroid": settings.get("points_per_centroid")}
    features = Path(features)
    with FeatureStore(features, "r") as store:
        keys = store.keys()
        if max_images is not None and max_images < len(keys):
            rng = np.random.default_rng(training["seed"])
            keys = sorted(rng.choice(keys, max_images, replace=False).tolist())
        size = size or codebook_size_for(store, keys)
        codebook = Codebook(size=size, method=method, **training)
        codebook.train(store, keys=keys)
    if recipe:
        codebook.meta["recipe"] = {"name": recipe, **recipe_settings}
    name = recipe or f"{features.stem}-{size}"
    saved = codebook.save(out or CODEBOOK_DIR / f"{name}.npz")
    return codebook, saved
