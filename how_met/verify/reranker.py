"""Rerank a shortlist with local features: exact ASMK score, spatial verification, score fusion.

A global-descriptor system (or the ASMK inverted file) proposes a shortlist of database images
per query; :class:`Reranker` scores the query against *only those* images, so the cost grows with
the shortlist, not with the database:

* **ASMK score** -- each candidate's descriptors are quantised and aggregated on demand exactly
  as ``how_met.asmk.indexing.build_index`` does (kept in a bounded LRU cache); the score is the value the
  inverted-file search gives for that pair (pass ``index=`` to share its alpha, tau and idf).
* **Spatial verification** -- tentative correspondences, then RANSAC in image coordinates
  (keypoints from the stored feature-map cells and scales) fitting an affine map (3 points; the default) or a
  homography (4 points, closed form in Hartley-normalised coordinates; least-squares refits by
  normalised DLT). Hypotheses are drawn in batches from a seeded generator and fitted
  and scored a batch at a time in one compiled (numba) call, the best is refined on its inliers
  (LO-RANSAC) and sampling stops at the usual confidence bound. A correspondence is an inlier
  when its reprojection error in the database image is within ``threshold`` cells of that
  feature (a cell is stride / scale input pixels: coarse-scale features are localised less
  precisely) and the model's local scale agrees with the two features' scale ratio. An
  optional 1-D vote on the scale ratios prefilters the correspondences. The verification
  score is the number of inliers, counted one-to-one (``how_met.verify.geometry``).
* **Fusion** -- ``how_met.verify.scores.fuse_scores`` combines global similarity, ASMK score
  and inliers; ``how_met.recognition.fusion`` tunes the weights.

Correspondences (``SpatialParams.matching``):

* ``"words"`` (default) -- mutual nearest neighbours (cosine of the L2-normalised descriptors,
  >= ``min_similarity``) among the pairs that share a visual word (the query's 5 words vs the
  candidate feature's word). The quantisation both queries need anyway prunes the 1000 x 1000
  similarity matrix to a few thousand pairs.
* ``"mnn"`` -- mutual nearest neighbours over all descriptor pairs (one 1000 x 1000 x 128
  matrix product per candidate).

Measured on ../shared/data/museum (lite0 features, 4096-word codebook, global top-100 of 164
queries): "words" separates positive from distractor queries as well as "mnn" (AUC of the top
inlier count 0.965 vs 0.966; ASMK score 0.907, global cosine 0.957) and reranking the global
shortlist raises kNN GAP from 95.6 to 98.5 (inliers alone) / 99.2 (tuned fusion), while it is
10x faster (131 vs 1265 ms per query for 100 candidates on a loaded 2-core box). "mnn" reaches
99.2 / 99.8. Shared words were first tried with Hamming-embedding similarity of residual
signs instead of descriptor cosine: far worse (GAP 66.9 from inliers), as the smoothed HOW
features of neighbouring cells fall into the same words and tie.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from ..asmk.aggregation import quantise_and_aggregate
from ..asmk.codebook import load_codebook
from ..asmk.codes import DEFAULT_ALPHA, DEFAULT_TAU, hamming, kernel_table
from ..asmk.inverted_file import load_index
from ..asmk.records import ImageRecord, RecordStore, open_database_features
from ..features.settings import check_model
from ..features.store import LocalFeatures
from ..utils import l2_normalise
from .geometry import MODELS, RansacResult, ransac
from .index_codes import codes_from_index
from .matching import mutual_nearest_neighbours, scale_consistent, shared_word_matches
from .scores import FusionWeights, fuse_scores

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# The reranker
# ---------------------------------------------------------------------------------------------

@dataclass
class SpatialParams:
    """Settings of spatial verification.

    Defaults were chosen on ../shared/data/museum (subset of 18 distractor + 49 positive
    queries, global top-100; separation = AUC of the top inlier count, positive vs distractor
    queries): ``max_per_word`` 16 -> 256 lifts it from 0.76 to 0.95 (bursts of neighbouring
    cells hold the true pairs); ``min_similarity`` 0.5 / 0.6 / 0.7 gives 0.94 / 0.95 / 0.94
    (0.6 leaves wrong candidates a median of 10 inliers, true matches 200); ``threshold`` 0.5 /
    1 / 1.5 cells gives 0.91 / 0.95 / 0.95; affine vs homography, and the scale prefilter and
    check, change it by < 0.01 there (frontal photos).
    The looser model (``model`` affine, ``threshold`` 2 cells, no ``scale_check``) was then
    chosen end to end for 3D objects and scenes (issue 13; global+rerank GAP, 5 repeats, shipped
    corpus parts): grocery 77.2 +- 4.6 -> 83.4 +- 2.3, landmarks 88.0 +- 4.5 -> 93.6 +- 0.4,
    museum 97.7 +- 0.7 -> 97.9 +- 0.7. A homography is exact only for planes; a product box or a
    building seen from two sides is two planes, and an affine map with a wider tolerance keeps
    the inliers of both. The scale prefilter stays (it removes wrong pairs cheaply).
    ``min_similarity`` is a cosine of the extractor's whitened descriptors: re-check it when
    the extractor changes.

    matching: "mnn" (mutual nearest neighbours of all descriptors) or "words" (mutual nearest
      neighbours among features sharing a visual word: no n x m similarity matrix).
    model: "homography" or "affine".
    min_similarity: lowest cosine similarity of a pair (of L2-normalised descriptors);
      min_similarity_pq: the same for candidates read from ``pq`` records (product-quantised
      descriptors: their similarity is the query's with a reconstruction, off by ~0.05 (std),
      which at 0.6 loses true pairs; 0.5 measured better on grocery and landmarks, README "Met
      at full scale"; None: min_similarity);
      max_per_word: for "words", words with more database features are skipped.
    max_correspondences: the most similar pairs kept for RANSAC.
    threshold: inlier reprojection error, in cells of the database feature (a feature's cell is
      stride / scale pixels of the input, mapped to the original image: coarse features are
      localised less precisely); min_threshold: floor as a fraction of the image diagonal.
    scale_prefilter: keep only pairs whose scale ratio agrees with the dominant one (1-D vote).
    scale_tolerance: factor within which a pair's scale ratio must agree (prefilter and inliers);
      scale_check: also require it of each inlier against the model's local scale.
    max_scale_change: hypotheses that scale by more than this (or mirror) are rejected.
    max_hypotheses, lo_iterations, seed: RANSAC budget, local-optimisation refits, RNG seed.
    """

    matching: str = "words"
    model: str = "affine"
    min_similarity: float = 0.6
    min_similarity_pq: Optional[float] = 0.5
    max_per_word: int = 256
    max_correspondences: int = 1000
    threshold: float = 2.0
    min_threshold: float = 0.005
    scale_prefilter: bool = True
    scale_check: bool = False
    scale_tolerance: float = 2.0
    max_scale_change: float = 10.0
    max_hypotheses: int = 1000
    lo_iterations: int = 4
    seed: int = 0

    def __post_init__(self):
        if self.matching not in ("mnn", "words"):
            raise ValueError(f"spatial matching must be 'mnn' or 'words', got {self.matching!r}")
        if self.model not in MODELS:
            raise ValueError(f"spatial model must be one of {MODELS}, got {self.model!r}")


@dataclass
class _ImageData:
    """What the reranker needs of one image (query or candidate), computed once."""

    words: np.ndarray            # (m,) sorted unique visual words of the aggregated vectors
    codes: Optional[np.ndarray]  # (m, 2) uint64 packed sign codes; None: looked up in the index
    keypoints: np.ndarray        # (n, 2) float64 image coordinates
    cells: np.ndarray            # (n,) cell size of each feature in original-image pixels
    diagonal: float              # original image diagonal in pixels
    unit_descriptors: np.ndarray  # (n, D) float32 L2-normalised descriptors
    feature_words: np.ndarray     # (n, k) words of each feature (query) or (n,) (candidate)
    slot: int = -1                # the candidate's image position in the index (codes None)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.words, self.codes, self.keypoints, self.cells,
                                      self.unit_descriptors, self.feature_words) if a is not None)


class Reranker:
    """Score a query against a shortlist of database images with local features.

    store: FeatureStore, or RecordStore of compact records (``how_met.asmk.records``), or the
      path of either, holding the database images' local features. Records give the same
      scores as the store they were made from ("full" descriptors; "int8", "pq": the same ASMK
      scores, verification on quantised descriptors; "none": ASMK scores only) and a
      candidate costs one record read, without quantisation. Records keep no aggregated
      codes: with ``index`` (the one assembled from them) they are looked up in its postings
      (``how_met.verify.index_codes``), else read from the records' sidecar while it exists.
    codebook: the ``how_met.asmk.codebook.Codebook`` (or its path) the ASMK index was built with.
    stride: feature-map stride in pixels (default: the store's extractor config).
    multiple_assignment, alpha, tau: ASMK query assignment and selective kernel.
    use_idf: idf-weighted ASMK scores; the idf needs the whole database, so it comes from
      ``index`` (or pass the per-word weights as ``idf``).
    index: optional ``InvertedFile`` (or path) of the same database: its alpha, tau, use_idf and
      idf are used, so the ASMK score equals what its search gives for the pair.
    spatial: :class:`SpatialParams` of the verification; weights: default
      :class:`FusionWeights`.
    cache_mb: bound of the LRU cache of prepared candidates (quantised + aggregated).

    ``rerank`` costs one query quantisation plus, per candidate, a cache lookup (or one
    database read and quantisation), a word intersection and, when verifying, one descriptor
    matching and one RANSAC. Candidates are quantised exactly as ``how_met.asmk.indexing.build_index``
    does (1 assignment, ``aggregate``), queries as ``how_met.asmk.query`` does.
    """

    def __init__(self, store, codebook, stride: Optional[float] = None, multiple_assignment: int = 5,
                 alpha: float = DEFAULT_ALPHA, tau: float = DEFAULT_TAU,
                 use_idf: bool = False, idf: Optional[np.ndarray] = None, index=None,
                 spatial: Optional[SpatialParams] = None, weights: Optional["FusionWeights"] = None,
                 cache_mb: float = 512.0):
        self.codebook = load_codebook(codebook)
        self.centroids = self.codebook.centroids
        self.index = None
        if index is not None:
            index = load_index(index, self.codebook)
            if not index.binary:
                raise ValueError(f"{index.path or 'the inverted file'}: the reranker scores binary "
                                 f"ASMK; this index holds float residuals")
            alpha, tau, use_idf = index.alpha, index.tau, index.use_idf
            if use_idf and idf is None:
                idf = index.idf()
        if use_idf and idf is None:
            raise ValueError("use_idf needs the database's idf: pass index= (or idf=)")
        self.store, self._owns_store = open_database_features(store)
        try:
            check_model(self.store.model_fingerprint, getattr(self.codebook, "model_fingerprint", None),
                        self.store.path, getattr(self.codebook, "path", None) or "the codebook")
            if isinstance(self.store, RecordStore) and self.store.codebook_fingerprint != self.codebook.fingerprint:
                raise ValueError(f"{self.store.path}: records were quantised with another codebook "
                                 f"({self.store.codebook_fingerprint}) than "
                                 f"{self.codebook.path or 'the codebook given'} ({self.codebook.fingerprint})")
            if isinstance(self.store, RecordStore) and not self.store.holds_codes:
                if index is not None and hasattr(index, "position"):
                    self.index = index  # candidates' codes from its postings
                elif not self.store.has_vectors:
                    raise ValueError(f"{self.store.path}: records keep no aggregated vectors and their "
                                     f"sidecar is gone: pass index= (the inverted file assembled from them) "
                                     f"for ASMK scores")
        except ValueError:
            self.close()
            raise
        self.index_lookups = 0  # (image, word) codes read from the index
        if stride is None:
            stride = self.store.config.get("stride")
            if stride is None:
                self.close()
                raise ValueError(f"{self.store.path}: extractor config has no 'stride'; pass stride=")
        self.stride = float(stride)
        self.multiple_assignment = int(multiple_assignment)
        self.alpha, self.tau = float(alpha), float(tau)
        self._kernel_table = kernel_table(self.centroids.shape[1], self.alpha, self.tau)
        self.idf = None if idf is None else np.asarray(idf, np.float64)
        if self.idf is not None and len(self.idf) != len(self.centroids):
            raise ValueError(f"idf has {len(self.idf)} weights for {len(self.centroids)} visual words")
        self.spatial = spatial or SpatialParams()
        self.weights = weights or FusionWeights()
        self.cache_bytes = int(cache_mb * 2 ** 20)
        self._cache: "OrderedDict[str, _ImageData]" = OrderedDict()
        self._cached_bytes = 0
        self.cache_hits = self.cache_misses = 0

    # -- lifetime ---------------------------------------------------------------------------------
    def close(self) -> None:
        if self._owns_store:
            self.store.close()

    def __enter__(self) -> "Reranker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def clear_cache(self) -> None:
        """Forget every prepared candidate."""
        self._cache.clear()
        self._cached_bytes = 0

    # -- per-image preparation -------------------------------------------------------------------
    def _prepare(self, feats: LocalFeatures, k: int, name: str) -> _ImageData:
        desc = np.ascontiguousarray(feats.descriptors, np.float32)
        if desc.ndim != 2 or desc.shape[1] != self.centroids.shape[1]:
            raise ValueError(f"{name}: descriptors {desc.shape} do not match the codebook's "
                             f"dimension {self.centroids.shape[1]}")
        words, aggregated = quantise_and_aggregate(self.codebook, [desc], k)  # sorted by word
        return self._image_data(feats, aggregated.words, aggregated.vectors, words.reshape(len(desc), -1))

    def _image_data(self, feats: LocalFeatures, words: np.ndarray, codes: np.ndarray,
                    feature_words: np.ndarray) -> _ImageData:
        zoom = np.asarray(feats.image_size, np.float64) / np.asarray(feats.input_size, np.float64)
        cells = self.stride / np.asarray(feats.scales, np.float64) * float(zoom.mean())
        return _ImageData(words=words, codes=codes,
                          keypoints=np.asarray(feats.keypoints(self.stride), np.float64),
                          cells=cells, diagonal=float(np.hypot(*feats.image_size)),
                          unit_descriptors=l2_normalise(feats.descriptors),
                          feature_words=np.ascontiguousarray(feature_words))

    def _from_record(self, key: str, record: ImageRecord) -> _ImageData:
        codes, slot = record.codes, -1
        if codes is None and self.index is not None:
            slot = self.index.position(key)
            if slot is None:
                raise KeyError(f"{self.index.path or 'the inverted file'}: does not hold {key!r} (the "
                               f"ASMK codes of records come from the index assembled from them)")
        elif codes is None:  # the sidecar, while it exists
            words, codes = self.store.read_words(key)
            if not np.array_equal(words, record.words):
                raise ValueError(f"{self.store.vectors_path}: words of {key!r} disagree with its record")
        data = self._image_data(record.features, record.words, codes, record.feature_words)
        data.slot = int(slot)
        return data

    def prepare_query(self, query: LocalFeatures, name: str = "query") -> _ImageData:
        """Quantise (multiple assignment) and aggregate a query once for several rerank calls."""
        return self._prepare(query, self.multiple_assignment, name)

    def candidate(self, key: str) -> _ImageData:
        """The prepared database image ``key`` (from the LRU cache, or read and quantised)."""
        data = self._cache.get(key)
        if data is not None:
            self._cache.move_to_end(key)
            self.cache_hits += 1
            return data
        self.cache_misses += 1
        if isinstance(self.store, RecordStore):
            data = self._from_record(key, self.store.read(key))
        else:
            data = self._prepare(self.store.read(key, with_global=False), 1, f"{self.store.path}:{key}")
            data.feature_words = np.ascontiguousarray(data.feature_words[:, 0])
        self._cache[key] = data
        self._cached_bytes += data.nbytes
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.nbytes
        return data

    # -- scores -----------------------------------------------------------------------------------
    def _norm(self, words: np.ndarray) -> float:
        return float(np.sqrt(self.idf[words].sum() if self.idf is not None else len(words)))

    def asmk_scores(self, query: _ImageData, candidates: Sequence[_ImageData]) -> np.ndarray:
        """Exact ASMK similarity of the query with each candidate (all candidates at once)."""
        if not candidates:
            return np.zeros(0, np.float32)
        owner = np.repeat(np.arange(len(candidates)), [len(c.words) for c in candidates])
        words = np.concatenate([c.words for c in candidates])
        pos = np.minimum(np.searchsorted(query.words, words), max(len(query.words) - 1, 0))
        hit = query.words[pos] == words if len(query.words) else np.zeros(len(words), bool)
        width = query.codes.shape[1]
        codes = np.concatenate([c.codes if c.codes is not None else np.zeros((len(c.words), width), np.uint64)
                                for c in candidates])[hit]
        in_index = np.array([c.codes is None for c in candidates])[owner[hit]]
        if in_index.any():  # only the shared words' codes are read from the index
            slots = np.array([c.slot for c in candidates], np.int64)[owner[hit][in_index]]
            codes[in_index] = codes_from_index(self.index, slots, words[hit][in_index])
            self.index_lookups += int(in_index.sum())
        # The inverted file's kernel: a table over Hamming distances (same float values).
        kernel = self._kernel_table[hamming(query.codes[pos[hit]], codes)]
        if self.idf is not None:
            kernel = kernel * self.idf[words[hit]]
        sums = np.bincount(owner[hit], weights=kernel, minlength=len(candidates))
        norms = np.array([self._norm(c.words) for c in candidates]) * self._norm(query.words)
        return (sums / np.maximum(norms, 1e-12)).astype(np.float32)

    def _min_similarity(self) -> float:
        p = self.spatial
        pq = isinstance(self.store, RecordStore) and self.store.descriptors_kind == "pq"
        return p.min_similarity_pq if pq and p.min_similarity_pq is not None else p.min_similarity

    def correspondences(self, query: _ImageData, cand: _ImageData
                        ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tentative (query_ids, db_ids, similarity), the best ``max_correspondences`` of them."""
        p = self.spatial
        if p.matching == "mnn":
            q, d, s = mutual_nearest_neighbours(query.unit_descriptors, cand.unit_descriptors,
                                                self._min_similarity())
        else:
            q, d, s = shared_word_matches(query.feature_words, cand.feature_words, query.unit_descriptors,
                                          cand.unit_descriptors, self._min_similarity(), p.max_per_word)
        if len(s) > p.max_correspondences:
            top = np.argsort(-s, kind="stable")[:p.max_correspondences]
            q, d, s = q[top], d[top], s[top]
        return q, d, s

    def verify(self, query: _ImageData, cand: _ImageData) -> Tuple[RansacResult, int]:
        """Spatial verification of one pair: (RANSAC result, number of tentative correspondences).

        The model maps query keypoints onto candidate keypoints; the result's inlier mask is
        over the (prefiltered) tentative correspondences.
        """
        result, tentative, _, _ = self._verify(query, cand)
        return result, tentative

    def inlier_matches(self, query: _ImageData, cand: _ImageData) -> Tuple[np.ndarray, np.ndarray, RansacResult, int]:
        """The evidence of one pair: (query points (n, 2), candidate points (n, 2)) of the inlier
        correspondences in original-image pixels, the RANSAC result and the tentative count."""
        result, tentative, q, d = self._verify(query, cand)
        mask = np.asarray(result.inlier_mask, bool)
        return query.keypoints[q[mask]], cand.keypoints[d[mask]], result, tentative

    def _verify(self, query: _ImageData, cand: _ImageData):
        p = self.spatial
        if not cand.unit_descriptors.shape[1]:
            raise ValueError(f"{self.store.path}: records without descriptors (--record-descriptors "
                             f"none) give ASMK scores only; verification needs pq, int8 or full records")
        q, d, _ = self.correspondences(query, cand)
        tentative = len(q)
        # Scale change implied by the two features: database cell over query cell.
        log_ratio = np.log(cand.cells[d]) - np.log(query.cells[q])
        if p.scale_prefilter and len(q):
            keep = scale_consistent(log_ratio, p.scale_tolerance)
            q, d, log_ratio = q[keep], d[keep], log_ratio[keep]
        threshold = np.maximum(p.threshold * cand.cells[d], p.min_threshold * cand.diagonal)
        result = ransac(query.keypoints[q], cand.keypoints[d], threshold, p.model,
                        log_scale_ratio=log_ratio if p.scale_check else None,
                        scale_tolerance=p.scale_tolerance, max_scale_change=p.max_scale_change,
                        max_hypotheses=p.max_hypotheses, lo_iterations=p.lo_iterations, seed=p.seed,
                        src_ids=q, dst_ids=d)
        return result, tentative, q, d

    def score_candidates(self, query: Union[LocalFeatures, _ImageData], candidate_keys: Sequence[str],
                         verify: bool = True) -> Tuple[np.ndarray, np.ndarray, List[dict]]:
        """ASMK scores (m,), inlier counts (m,) (0 without verification) and per-candidate
        details for the candidates, in the given order."""
        if isinstance(query, LocalFeatures):
            query = self.prepare_query(query)
        cands = [self.candidate(key) for key in candidate_keys]
        asmk = self.asmk_scores(query, cands)
        inliers = np.zeros(len(cands), np.int32)
        details = [{"asmk": float(a)} for a in asmk]
        if verify:
            for i, cand in enumerate(cands):
                result, tentative = self.verify(query, cand)
                inliers[i] = result.inliers
                details[i].update(inliers=int(result.inliers), tentative=int(tentative),
                                  model=result.model)
        return asmk, inliers, details

    def rerank(self, query_features: Union[LocalFeatures, _ImageData], candidate_keys: Sequence[str],
               global_scores: Optional[Sequence[float]] = None, verify: bool = True,
               weights: Optional["FusionWeights"] = None) -> List[Tuple[str, float, dict]]:
        """Rerank ``candidate_keys`` for one query.

        Returns ``[(key, fused score, details)]`` sorted by score (descending, ties in input
        order); details holds "global" (when given), "asmk", and with ``verify`` "inliers",
        "tentative" (correspondences before RANSAC) and "model" (3x3 query -> candidate map
        in image coordinates, or None).
        """
        candidate_keys = list(candidate_keys)
        if global_scores is not None and len(global_scores) != len(candidate_keys):
            raise ValueError(f"{len(global_scores)} global scores for {len(candidate_keys)} candidates")
        asmk, inliers, details = self.score_candidates(query_features, candidate_keys, verify)
        glob = np.zeros(len(candidate_keys)) if global_scores is None else np.asarray(global_scores, np.float64)
        if global_scores is not None:
            for det, g in zip(details, glob):
                det["global"] = float(g)
        fused = fuse_scores(glob, asmk, inliers, weights or self.weights)
        order = np.argsort(-fused, kind="stable")
        return [(candidate_keys[i], float(fused[i]), details[i]) for i in order]
