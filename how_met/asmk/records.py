"""Compact per-image records of a database: what indexing and reranking need of an image,
instead of its raw descriptors.

A record holds, per image, the aggregated ASMK vectors the inverted file is assembled from and
everything the reranker (``how_met.verify.reranker``) needs to score and verify the image as a
candidate::

    words          (m,)   uint16 (uint32 above 65,536 words)  sorted visual words of the aggregated vectors
    codes          (m, 2) uint64   packed sign codes of the aggregated residuals (binary ASMK)
    feature_words  (n,)   uint16/uint32  the word of each local feature (1 assignment)
    locations      (n, 2) int16    feature-map cell (x, y)
    scale_index    (n,)   uint8    index into the record's attribute ``scales`` (the extraction scales)
    strengths      (n,)   float16  attention
    descriptors, one of (``descriptors=``):
      "int8"   unit_codes (n, D) int8 + unit_scales (n,) float32: the L2-normalised descriptor
               as round(127 x / max|x|) and max|x| / 127 (the verification's cosine within ~1e-3)
      "full"   descriptors (n, D) float16 when that is lossless, else float32: the same scores
               as a reranker reading the feature store
      "none"   nothing: ASMK scores only (no spatial verification)
    attributes: image_size, input_size, scales

Bytes per image (1,000 features, ~700 aggregated vectors, D = 128; measured by
``eval/bench_scale.py``, printed as ``record_bytes_per_image``): "none" ~22 KB, "int8" ~154 KB,
"full" ~278 KB (float16) -- the raw float16 store holds ~268 KB.

The file is an append-only journal (``how_met.features.journal.Journal``: framed, checksummed
records, handed to the OS after every image), so a build killed at any moment keeps every
finished image and a rerun skips them; reading one record is one seek and one read (I/O
proportional to the records read). The file's attributes record the format, the descriptor
kind, the extractor config, the model and codebook fingerprints. Nothing is unpickled.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from ..features.journal import MAGIC, Journal
from ..features.store import FeatureStoreError, LocalFeatures, open_store
from ..utils import writer_lock

FORMAT = "how-met-records"
FORMAT_VERSION = 1
DESCRIPTOR_KINDS = ("int8", "full", "none")


class RecordsError(FeatureStoreError):
    """A records file that cannot be read or written as asked (the message names the file)."""


@dataclass
class ImageRecord:
    """The record of one database image (see the module docstring)."""

    words: np.ndarray           # (m,) int64
    codes: np.ndarray           # (m, 2) uint64
    feature_words: np.ndarray   # (n,) int64
    features: LocalFeatures     # descriptors: (n, D) float32 (int8 records: reconstructed), or (n, 0)

    @property
    def has_descriptors(self) -> bool:
        return self.features.descriptors.shape[1] > 0


def _word_dtype(n_words: int):
    return np.uint16 if n_words <= 65536 else np.uint32


def _int8_unit(descriptors: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    unit = descriptors / np.maximum(np.linalg.norm(descriptors, axis=1, keepdims=True), 1e-12)
    peak = np.abs(unit).max(axis=1) if len(unit) else np.zeros(0, np.float32)
    scale = (np.maximum(peak, 1e-12) / 127.0).astype(np.float32)
    return np.rint(unit / scale[:, None]).astype(np.int8), scale


def _lossless_float(descriptors: np.ndarray) -> np.ndarray:
    half = descriptors.astype(np.float16)
    return half if np.array_equal(half.astype(np.float32), descriptors) else descriptors


class RecordStore:
    """A file of per-image records (module docstring). Use as a context manager.

    mode "r" reads; "a" appends (created if missing, one writer at a time: ``<path>.lock``).
    A new file takes its settings from ``settings`` (n_words, dim, descriptors, extractor,
    model_fingerprint, codebook_fingerprint); an existing one must agree with them.
    """

    def __init__(self, path, mode: str = "r", settings: Optional[dict] = None):
        self.path = Path(path)
        if mode not in ("r", "a"):
            raise ValueError("mode must be 'r' or 'a'")
        self.mode = mode
        self._lock = None
        if mode == "r" and not self.path.exists():
            raise RecordsError(f"{self.path}: records file does not exist")
        if mode == "a":
            self._lock = writer_lock(self.path)
            self._lock.__enter__()
        try:
            if self.path.exists() and self.path.stat().st_size and not is_records_file(self.path):
                raise RecordsError(f"{self.path}: not a how-met records file")
            self._journal = Journal(self.path, repair=mode == "a")
            self._check_settings(settings)
        except BaseException:
            self.close()
            raise
        self.records_read = 0
        self.bytes_read = 0

    def _check_settings(self, settings: Optional[dict]) -> None:
        attrs = self._journal.attrs
        if not attrs:
            if self.mode == "r" or settings is None:
                raise RecordsError(f"{self.path}: holds no records header (empty or not a records file)")
            if settings["descriptors"] not in DESCRIPTOR_KINDS:
                raise ValueError(f"record descriptors must be one of {DESCRIPTOR_KINDS}, got "
                                 f"{settings['descriptors']!r}")
            self._journal.set_attrs({"format": FORMAT, "format_version": FORMAT_VERSION,
                                     **{k: settings.get(k) for k in _SETTINGS}})
            return
        if attrs.get("format") != FORMAT or not isinstance(attrs.get("format_version"), int) or \
                attrs["format_version"] > FORMAT_VERSION:
            raise RecordsError(f"{self.path}: not a how-met records file of a supported version")
        if settings is not None:
            differ = [k for k in _SETTINGS if settings.get(k) != attrs.get(k)]
            if differ:
                raise RecordsError(f"{self.path}: was written with other settings ({', '.join(differ)}: "
                                   f"{', '.join(repr(attrs.get(k)) for k in differ)}); use a new file")

    # -- lifetime ---------------------------------------------------------------------------------
    def __enter__(self) -> "RecordStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        journal = getattr(self, "_journal", None)
        if journal is not None:
            if self.mode == "a":
                journal.sync()
            journal.close()
        if self._lock is not None:
            lock, self._lock = self._lock, None
            lock.__exit__(None, None, None)

    def flush(self) -> None:
        """Hand the written records to the disk (they are already safe from a killed process)."""
        self._journal.sync()

    # -- metadata ---------------------------------------------------------------------------------
    @property
    def settings(self) -> dict:
        return {k: self._journal.attrs.get(k) for k in _SETTINGS}

    @property
    def config(self) -> dict:
        """The extractor config of the features the records were made from."""
        return dict(self._journal.attrs.get("extractor") or {})

    @property
    def model_fingerprint(self) -> Optional[str]:
        return self._journal.attrs.get("model_fingerprint")

    @property
    def codebook_fingerprint(self) -> Optional[str]:
        return self._journal.attrs.get("codebook_fingerprint")

    @property
    def descriptors_kind(self) -> str:
        return self._journal.attrs["descriptors"]

    def keys(self) -> List[str]:
        return sorted(self._journal.images)

    def __contains__(self, key: str) -> bool:
        return key in self._journal.images

    def __len__(self) -> int:
        return len(self._journal.images)

    def record_bytes(self, key: str) -> int:
        """Bytes of one record's arrays on disk (its header not counted)."""
        _, header = self._journal.images[key]
        return sum(np.dtype(dt).itemsize * int(np.prod(shape)) for _, dt, shape in header["arrays"])

    # -- writing ----------------------------------------------------------------------------------
    def write(self, key: str, feats: LocalFeatures, feature_words: np.ndarray, words: np.ndarray,
              codes: np.ndarray) -> None:
        """Append the record of one image: its features, the word of each feature, and its
        aggregated vectors (``words`` sorted, ``codes`` their sign codes)."""
        if self.mode != "a":
            raise RecordsError(f"{self.path}: opened read-only")
        word_dtype = _word_dtype(self.settings["n_words"])
        scales, scale_index = np.unique(np.asarray(feats.scales, np.float32), return_inverse=True)
        if len(scales) > 255:
            raise ValueError(f"{key}: {len(scales)} distinct scales; a record holds at most 255")
        arrays = {"words": np.asarray(words).astype(word_dtype),
                  "codes": np.ascontiguousarray(codes, np.uint64),
                  "feature_words": np.asarray(feature_words).ravel().astype(word_dtype),
                  "locations": np.ascontiguousarray(feats.locations, np.int16),
                  "scale_index": scale_index.astype(np.uint8).ravel(),
                  "strengths": np.asarray(feats.strengths, np.float16)}
        desc = np.asarray(feats.descriptors, np.float32)
        kind = self.descriptors_kind
        if kind == "int8":
            arrays["unit_codes"], arrays["unit_scales"] = _int8_unit(desc)
        elif kind == "full":
            arrays["descriptors"] = _lossless_float(desc)
        attrs = {"image_size": [int(v) for v in feats.image_size],
                 "input_size": [int(v) for v in feats.input_size],
                 "scales": [float(s) for s in scales]}
        self._journal.add_image(key, arrays, attrs)

    # -- reading ----------------------------------------------------------------------------------
    def _arrays(self, key: str):
        if key not in self._journal.images:
            raise KeyError(f"{self.path}: no record of {key!r}")
        arrays, attrs = self._journal.read_image(key)
        self.records_read += 1
        self.bytes_read += sum(a.nbytes for a in arrays.values())
        return arrays, attrs

    def read_words(self, key: str) -> Tuple[np.ndarray, np.ndarray]:
        """(words (m,) int64, codes (m, 2) uint64) of one image: its aggregated vectors."""
        arrays, _ = self._arrays(key)
        return arrays["words"].astype(np.int64), arrays["codes"]

    def read(self, key: str) -> ImageRecord:
        arrays, attrs = self._arrays(key)
        try:
            n = len(arrays["feature_words"])
            scales = np.asarray(attrs["scales"], np.float32)
            if "unit_codes" in arrays:
                desc = arrays["unit_codes"].astype(np.float32) * arrays["unit_scales"][:, None]
            elif "descriptors" in arrays:
                desc = arrays["descriptors"].astype(np.float32)
            else:
                desc = np.zeros((n, 0), np.float32)
            feats = LocalFeatures(descriptors=desc, strengths=arrays["strengths"].astype(np.float32),
                                  locations=arrays["locations"].astype(np.int32),
                                  scales=scales[arrays["scale_index"]],
                                  image_size=tuple(attrs["image_size"]), input_size=tuple(attrs["input_size"]))
            if len(desc) != n or len(feats.locations) != n or len(feats.scales) != n:
                raise ValueError("arrays of different lengths")
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise RecordsError(f"{self.path}: record of {key!r} is damaged ({exc})") from None
        return ImageRecord(words=arrays["words"].astype(np.int64), codes=arrays["codes"],
                           feature_words=arrays["feature_words"].astype(np.int64), features=feats)


_SETTINGS = ("n_words", "dim", "descriptors", "extractor", "model_fingerprint", "codebook_fingerprint")


def is_records_file(path: os.PathLike) -> bool:
    """Whether ``path`` is a records file (by its first bytes; an HDF5 store starts otherwise)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(len(MAGIC)) == MAGIC
    except (IsADirectoryError, FileNotFoundError):
        return False


def open_database_features(source):
    """(a RecordStore or FeatureStore, whether the caller must close it) for either object or
    the path of either kind of file: what the reranker reads database images from."""
    if isinstance(source, RecordStore):
        return source, False
    if not hasattr(source, "read") and is_records_file(source):
        return RecordStore(source, "r"), True
    return open_store(source)


def records_settings(codebook, descriptors: str, extractor: dict, model_fingerprint: Optional[str]) -> dict:
    """The settings a records file of ``codebook``'s words is written with."""
    return {"n_words": int(len(codebook.centroids)), "dim": int(codebook.dim), "descriptors": descriptors,
            "extractor": json.loads(json.dumps(extractor or {})),
            "model_fingerprint": model_fingerprint, "codebook_fingerprint": codebook.fingerprint}
