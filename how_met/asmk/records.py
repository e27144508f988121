"""Compact per-image records of a database: what indexing and reranking need of an image,
instead of its raw descriptors.

A record holds everything the reranker (``how_met.verify.reranker``) needs to verify the image as
a candidate::

    feature_words  (n,)   uint16 (uint32 above 65,536 words)  the word of each local feature (1 assignment)
    locations      (n, 2) uint8 when every cell is < 256 (else int16)  feature-map cell (x, y)
    scale_index    (n,)   uint8    index into the record's attribute ``scales`` (the extraction scales)
    attention      (n,)   uint8    attention / the image's largest attention x 255 (attribute
                                   ``attention_max``; the reranker does not use it)
    descriptors, one of (``descriptors=``):
      "pq"     pq_codes (n, M x B / 8) uint8: the L2-normalised descriptor product-quantised (M
               sub-vectors of D / M dimensions, 2^B centroids each, codes packed; ``how_met.asmk.pq``,
               its centroids in the file's header): ``pq_code`` "MxB", default DEFAULT_PQ_CODE
      "int8"   unit_codes (n, D) int8 + unit_scales (n,) float32: the L2-normalised descriptor
               as round(127 x / max|x|) and max|x| / 127 (the verification's cosine within ~1e-3)
      "full"   descriptors (n, D) float16 when that is lossless, else float32: the same scores
               as a reranker reading the feature store
      "none"   nothing: ASMK scores only (no spatial verification)
    attributes: image_size, input_size, scales, attention_max

The image's aggregated ASMK vectors (its visual words and sign codes: ~12.5 KB, a copy of what the
inverted file holds) are not in the records: they go to a sidecar journal, ``<records>.vectors``
(``vectors_path``), which the index assembly (``how_met.asmk.indexing.index_from_records``)
reads and which may be deleted once the index exists. The reranker then takes a candidate's
codes from the index itself (``Reranker(..., index=)``): the same codes, so the same ASMK scores.
(Records of format 1 kept them inline; they are still read.)

Bytes per image (1,000 features, ~692 aggregated vectors, D = 128; measured by
``eval/bench_scale.py``, printed as ``record_bytes_per_image``): see README "Met at full scale".

The files are append-only journals (``how_met.features.journal.Journal``: framed, checksummed
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
from typing import Callable, List, Optional, Tuple

import numpy as np

from ..features.journal import MAGIC, Journal
from ..features.store import FeatureStoreError, LocalFeatures, open_store
from ..utils import l2_normalise, writer_lock
from .pq import PQError, ProductQuantiser, parse_code

FORMAT = "how-met-records"
FORMAT_VERSION = 2  # 1: the aggregated vectors inline, int16 cells, float16 attention
VECTORS_FORMAT = "how-met-record-vectors"
DESCRIPTOR_KINDS = ("int8", "pq", "full", "none")
DEFAULT_PQ_CODE = "8x8"  # 8 bytes per feature: index + records of the Met 10.4 GiB (README)


class RecordsError(FeatureStoreError):
    """A records file that cannot be read or written as asked (the message names the file)."""


@dataclass
class ImageRecord:
    """The record of one database image (see the module docstring)."""

    words: np.ndarray           # (m,) int64 sorted words of the aggregated vectors (= unique feature words)
    codes: Optional[np.ndarray]  # (m, 2) uint64 sign codes; None: not in the record (take them from the index)
    feature_words: np.ndarray   # (n,) int64
    features: LocalFeatures     # descriptors: (n, D) float32 (int8/pq records: reconstructed), or (n, 0)

    @property
    def has_descriptors(self) -> bool:
        return self.features.descriptors.shape[1] > 0


def vectors_path(path) -> Path:
    """The sidecar of a records file: the aggregated vectors the index is assembled from."""
    return Path(f"{path}.vectors")


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


def _compact_cells(locations: np.ndarray) -> np.ndarray:
    locations = np.asarray(locations)
    if locations.size and (locations.min() < 0 or locations.max() > 255):
        return np.ascontiguousarray(locations, np.int16)
    return np.ascontiguousarray(locations, np.uint8)


class RecordStore:
    """A file of per-image records (module docstring) and its sidecar of aggregated vectors.
    Use as a context manager.

    mode "r" reads; "a" appends (created if missing, one writer at a time: ``<path>.lock``).
    A new file takes its settings from ``settings`` (``records_settings``); an existing one must
    agree with them. ``pq_training``: for a new "pq" file, a function returning the unit
    descriptors its product quantiser is trained on (called once, at creation).
    """

    def __init__(self, path, mode: str = "r", settings: Optional[dict] = None,
                 pq_training: Optional[Callable[[], np.ndarray]] = None):
        self.path = Path(path)
        self.vectors_path = vectors_path(self.path)
        if mode not in ("r", "a"):
            raise ValueError("mode must be 'r' or 'a'")
        self.mode = mode
        self._lock = None
        self._vectors: Optional[Journal] = None
        self.pq: Optional[ProductQuantiser] = None
        if mode == "r" and not self.path.exists():
            raise RecordsError(f"{self.path}: records file does not exist")
        if mode == "a":
            self._lock = writer_lock(self.path)  # also guards the sidecar
            self._lock.__enter__()
        try:
            if self.path.exists() and self.path.stat().st_size and not is_records_file(self.path):
                raise RecordsError(f"{self.path}: not a how-met records file")
            self._journal = Journal(self.path, repair=mode == "a")
            self._check_settings(settings, pq_training)
            if mode == "a" and self.version >= 2:
                self._vectors = self._open_vectors()
        except BaseException:
            self.close()
            raise
        self.records_read = 0
        self.bytes_read = 0

    def _check_settings(self, settings: Optional[dict], pq_training) -> None:
        attrs = self._journal.attrs
        if not attrs:
            if self.mode == "r" or settings is None:
                raise RecordsError(f"{self.path}: holds no records header (empty or not a records file)")
            kind = settings["descriptors"]
            if kind not in DESCRIPTOR_KINDS:
                raise ValueError(f"record descriptors must be one of {DESCRIPTOR_KINDS}, got {kind!r}")
            header = {"format": FORMAT, "format_version": FORMAT_VERSION,
                      **{k: settings.get(k) for k in _SETTINGS}}
            if kind == "pq":
                if pq_training is None:
                    raise ValueError("a new pq records file needs descriptors to train its quantiser on")
                self.pq = ProductQuantiser.train(pq_training(), settings["pq_code"])
                header["pq"] = self.pq.to_header()
            self._journal.set_attrs(header)
            return
        version = attrs.get("format_version")
        if attrs.get("format") != FORMAT or isinstance(version, bool) or not isinstance(version, int) \
                or not 1 <= version <= FORMAT_VERSION:
            raise RecordsError(f"{self.path}: not a how-met records file of a supported version")
        if self.mode == "a" and version != FORMAT_VERSION:
            raise RecordsError(f"{self.path}: records of format {version} (an older how-met); append "
                               f"to a new records file")
        if attrs.get("descriptors") not in DESCRIPTOR_KINDS:
            raise RecordsError(f"{self.path}: header names descriptors {attrs.get('descriptors')!r}, "
                               f"not one of {DESCRIPTOR_KINDS}")
        dim = attrs.get("dim")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise RecordsError(f"{self.path}: header dim is {dim!r}, expected an integer >= 1")
        if attrs["descriptors"] == "pq":
            try:
                self.pq = ProductQuantiser.from_header(attrs.get("pq"), dim)
            except PQError as exc:
                raise RecordsError(f"{self.path}: {exc} (damaged header)") from None
            if self.pq.code != attrs.get("pq_code"):
                raise RecordsError(f"{self.path}: header pq_code {attrs.get('pq_code')!r} disagrees with its "
                                   f"quantiser ({self.pq.code}; damaged header)")
        if settings is not None:
            differ = [k for k in _SETTINGS if settings.get(k) != attrs.get(k)]
            if differ:
                raise RecordsError(f"{self.path}: was written with other settings ({', '.join(differ)}: "
                                   f"{', '.join(repr(attrs.get(k)) for k in differ)}); use a new file")

    def _open_vectors(self) -> Journal:
        """The sidecar journal (created on the first write), checked to belong to these records."""
        path = self.vectors_path
        if path.exists() and path.stat().st_size and not is_records_file(path):
            raise RecordsError(f"{path}: not a how-met record vectors file")
        journal = Journal(path, repair=self.mode == "a")
        own = {"format": VECTORS_FORMAT, "format_version": 1,
               "codebook_fingerprint": self._journal.attrs.get("codebook_fingerprint"),
               "n_words": self._journal.attrs.get("n_words"), "dim": self._journal.attrs.get("dim")}
        if not journal.attrs and self.mode == "a":
            journal.set_attrs(own)
        elif journal.attrs != own:
            journal.close()
            raise RecordsError(f"{path}: holds the vectors of other records (codebook, words or format "
                               f"differ from {self.path}'s)")
        return journal

    # -- lifetime ---------------------------------------------------------------------------------
    def __enter__(self) -> "RecordStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for journal in (getattr(self, "_vectors", None), getattr(self, "_journal", None)):
            if journal is not None:
                if self.mode == "a":
                    journal.sync()
                journal.close()
        if self._lock is not None:
            lock, self._lock = self._lock, None
            lock.__exit__(None, None, None)

    def flush(self) -> None:
        """Hand the written records to the disk (they are already safe from a killed process)."""
        if self._vectors is not None:
            self._vectors.sync()
        self._journal.sync()

    # -- metadata ---------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return int(self._journal.attrs["format_version"])

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

    @property
    def holds_codes(self) -> bool:
        """Whether ``read`` returns the aggregated codes (format 1 records, which kept them inline)."""
        return self.version < 2

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
        """Append the record of one image -- its features and the word of each feature -- and its
        aggregated vectors (``words`` sorted, ``codes`` their sign codes) to the sidecar."""
        if self.mode != "a":
            raise RecordsError(f"{self.path}: opened read-only")
        word_dtype = _word_dtype(self.settings["n_words"])
        scales, scale_index = np.unique(np.asarray(feats.scales, np.float32), return_inverse=True)
        if len(scales) > 255:
            raise ValueError(f"{key}: {len(scales)} distinct scales; a record holds at most 255")
        # The vectors first: an image whose record is written has its vectors (a kill between the
        # two writes leaves vectors without a record, and the rerun writes both again).
        self._vectors.add_image(key, {"words": np.asarray(words).astype(word_dtype),
                                      "codes": np.ascontiguousarray(codes, np.uint64)}, {})
        attention = np.asarray(feats.strengths, np.float32).ravel()
        peak = float(attention.max()) if len(attention) else 0.0
        arrays = {"feature_words": np.asarray(feature_words).ravel().astype(word_dtype),
                  "locations": _compact_cells(feats.locations),
                  "scale_index": scale_index.astype(np.uint8).ravel(),
                  "attention": (np.rint(np.clip(attention / peak, 0, 1) * 255) if peak > 0
                                else np.zeros(len(attention))).astype(np.uint8)}
        desc = np.asarray(feats.descriptors, np.float32)
        kind = self.descriptors_kind
        if kind == "int8":
            arrays["unit_codes"], arrays["unit_scales"] = _int8_unit(desc)
        elif kind == "pq":
            arrays["pq_codes"] = self.pq.pack(self.pq.encode(l2_normalise(desc)))
        elif kind == "full":
            arrays["descriptors"] = _lossless_float(desc)
        attrs = {"image_size": [int(v) for v in feats.image_size],
                 "input_size": [int(v) for v in feats.input_size],
                 "scales": [float(s) for s in scales], "attention_max": peak}
        self._journal.add_image(key, arrays, attrs)

    # -- reading ----------------------------------------------------------------------------------
    def _arrays(self, key: str):
        if key not in self._journal.images:
            raise KeyError(f"{self.path}: no record of {key!r}")
        arrays, attrs = self._journal.read_image(key)
        self.records_read += 1
        self.bytes_read += sum(a.nbytes for a in arrays.values())
        return arrays, attrs

    @property
    def has_vectors(self) -> bool:
        """Whether the aggregated vectors can be read (inline, or the sidecar exists)."""
        return self.holds_codes or self._vectors is not None or self.vectors_path.exists()

    def read_words(self, key: str) -> Tuple[np.ndarray, np.ndarray]:
        """(words (m,) int64, codes (m, 2) uint64) of one image: its aggregated vectors."""
        if self.holds_codes:
            arrays, _ = self._arrays(key)
        else:
            if self._vectors is None:
                if not self.vectors_path.exists():
                    raise RecordsError(f"{self.vectors_path}: the aggregated vectors of {self.path} are "
                                       f"gone (deleted once the index was assembled?); the index can only be "
                                       f"assembled from them: write the records again")
                self._vectors = self._open_vectors()
            if key not in self._vectors.images:
                raise RecordsError(f"{self.vectors_path}: holds no aggregated vectors of {key!r} (the "
                                   f"sidecar was deleted while records were added?); write the records again")
            arrays, _ = self._vectors.read_image(key)
        try:
            words, codes = arrays["words"].astype(np.int64), arrays["codes"]
            if codes.dtype != np.uint64 or codes.ndim != 2 or len(codes) != len(words) or \
                    (len(words) > 1 and (np.diff(words) <= 0).any()):
                raise ValueError("words not sorted, or codes of another shape")
        except (KeyError, ValueError, IndexError) as exc:
            raise RecordsError(f"{self.path}: aggregated vectors of {key!r} are damaged ({exc})") from None
        return words, codes

    def read(self, key: str) -> ImageRecord:
        arrays, attrs = self._arrays(key)
        try:
            feature_words = arrays["feature_words"].astype(np.int64)
            n = len(feature_words)
            scales = np.asarray(attrs["scales"], np.float32)
            if "unit_codes" in arrays:
                desc = arrays["unit_codes"].astype(np.float32) * arrays["unit_scales"][:, None]
            elif "pq_codes" in arrays:
                if self.pq is None:
                    raise ValueError("pq codes in a file without a quantiser")
                desc = self.pq.decode(self.pq.unpack(arrays["pq_codes"]))
            elif "descriptors" in arrays:
                desc = arrays["descriptors"].astype(np.float32)
            else:
                desc = np.zeros((n, 0), np.float32)
            if "attention" in arrays:  # format 2: uint8 of the image's largest attention
                strengths = arrays["attention"].astype(np.float32) * (float(attrs["attention_max"]) / 255.0)
            else:
                strengths = arrays["strengths"].astype(np.float32)
            feats = LocalFeatures(descriptors=desc, strengths=strengths,
                                  locations=arrays["locations"].astype(np.int32),
                                  scales=scales[arrays["scale_index"]],
                                  image_size=tuple(attrs["image_size"]), input_size=tuple(attrs["input_size"]))
            if len(desc) != n or len(feats.locations) != n or len(feats.scales) != n or len(strengths) != n:
                raise ValueError("arrays of different lengths")
            if "codes" in arrays:
                words, codes = arrays["words"].astype(np.int64), arrays["codes"]
            else:  # 1 assignment: every feature word is the word of one aggregated vector
                words, codes = np.unique(feature_words), None
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise RecordsError(f"{self.path}: record of {key!r} is damaged ({exc})") from None
        return ImageRecord(words=words, codes=codes, feature_words=feature_words, features=feats)


_SETTINGS = ("n_words", "dim", "descriptors", "pq_code", "extractor", "model_fingerprint",
             "codebook_fingerprint")


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


def records_settings(codebook, descriptors: str, extractor: dict, model_fingerprint: Optional[str],
                     pq_code: Optional[str] = None) -> dict:
    """The settings a records file of ``codebook``'s words is written with (``pq_code``: with
    descriptors "pq", "MxB" sub-quantisers x bits; default DEFAULT_PQ_CODE)."""
    if descriptors == "pq":
        pq_code = "{}x{}".format(*parse_code(DEFAULT_PQ_CODE if pq_code is None else pq_code, int(codebook.dim)))
    elif pq_code is not None:
        raise ValueError(f"a pq code is for pq records; these keep {descriptors!r} descriptors")
    return {"n_words": int(len(codebook.centroids)), "dim": int(codebook.dim), "descriptors": descriptors,
            "pq_code": pq_code, "extractor": json.loads(json.dumps(extractor or {})),
            "model_fingerprint": model_fingerprint, "codebook_fingerprint": codebook.fingerprint}
