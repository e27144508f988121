"""HDF5 feature store: one group per image, keyed by the image path relative to its root.

Layout (hloc-style; a key with slashes becomes nested groups)::

    /<key>/descriptors   (n, D) float32 or float16   whitened local descriptors, not L2-normalised
    /<key>/strengths     (n,)   float32              attention strength, normalised per image
    /<key>/locations     (n, 2) int16                feature-map cell (x, y) at the feature's scale
    /<key>/scales        (n,)   float32              scale the feature was extracted at
    /<key>/global        (G,)   float32              optional global (GeM) descriptor
    /<key>.attrs["image_size"]  (width, height) of the original image
    /<key>.attrs["input_size"]  (width, height) after the shrink-only resize (scale 1)
    /.attrs["extractor"]        JSON of the extractor config (backbone, layer, stride, scales, ...)
    /.attrs["model_fingerprint"]  fingerprint of the model that made the descriptors
    /.attrs["model_file"]       that model's file, relative to the store's folder

Writes are atomic per image: a group is written under ``/__partial__`` and moved to its key
only when complete, so a crash never leaves a half-written image behind; ``/__partial__`` is
discarded the next time the store is opened for writing. Nothing here unpickles anything.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import h5py
import numpy as np

from ..utils import atomic_path
from .settings import with_legacy_defaults

PARTIAL = "__partial__"
FORMAT_VERSION = 1


class FeatureStoreError(RuntimeError):
    """A feature store that cannot be read or written as asked (the message names the file)."""


@dataclass
class LocalFeatures:
    """Local features of one image (all arrays share the first dimension n)."""

    descriptors: np.ndarray
    strengths: np.ndarray
    locations: np.ndarray
    scales: np.ndarray
    image_size: Tuple[int, int]
    input_size: Tuple[int, int]
    global_descriptor: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.descriptors)

    def keypoints(self, stride: float) -> np.ndarray:
        """(n, 2) float32 image coordinates (x, y) of the feature centres in the original image."""
        zoom = np.array(self.image_size, np.float32) / np.array(self.input_size, np.float32)
        centres = (self.locations.astype(np.float32) + 0.5) * stride
        points = centres / self.scales.astype(np.float32)[:, None] * zoom[None, :]
        # The last cell of a map can overhang the image (ceil division): clip to the image.
        return np.minimum(points, np.array(self.image_size, np.float32) - 0.5)


def _check_key(key: str) -> str:
    key = key.strip("/")
    if not key or key.split("/")[0] == PARTIAL:
        raise ValueError(f"invalid feature key {key!r}")
    return key


class FeatureStore:
    """An HDF5 file of per-image features. Use as a context manager.

    mode "r" reads; "a" reads and appends (created if missing).
    """

    def __init__(self, path, mode: str = "r"):
        self.path = Path(path)
        if mode not in ("r", "a"):
            raise ValueError("mode must be 'r' or 'a'")
        if mode == "r" and not self.path.exists():
            raise FeatureStoreError(f"{self.path}: feature store does not exist")
        if mode == "a":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._file = h5py.File(self.path, mode)
        except OSError as exc:
            raise FeatureStoreError(f"{self.path}: not a readable HDF5 feature store ({exc})") from None
        self.mode = mode
        self._keys: Optional[List[str]] = None
        if mode == "a":
            if PARTIAL in self._file:
                del self._file[PARTIAL]
            self._file.attrs.setdefault("format_version", FORMAT_VERSION)
        version = int(self._file.attrs.get("format_version", FORMAT_VERSION))
        if version > FORMAT_VERSION:
            raise FeatureStoreError(f"{self.path}: format version {version} is newer than this how-met")

    # -- context manager ---------------------------------------------------------------------
    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()

    def flush(self) -> None:
        self._file.flush()

    # -- metadata ------------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        """The extractor config the features were made with ({} if unknown)."""
        raw = self._file.attrs.get("extractor")
        return json.loads(raw) if raw else {}

    def set_config(self, config: dict) -> None:
        """Record the extractor config; refuses to mix features of different extractors."""
        current = self.config
        if current and with_legacy_defaults(current) != with_legacy_defaults(config):
            raise FeatureStoreError(
                f"{self.path}: holds features of another extractor config "
                f"({json.dumps(current, sort_keys=True)}); use a new file")
        self._file.attrs["extractor"] = json.dumps(config, sort_keys=True)

    @property
    def model_fingerprint(self) -> Optional[str]:
        """Fingerprint of the model that made the descriptors (None in stores written before
        how-met recorded it)."""
        value = self._file.attrs.get("model_fingerprint")
        return str(value) if value else None

    def set_model_fingerprint(self, fingerprint: str) -> None:
        """Record the model's fingerprint; refuses to mix descriptors of two models (two
        PCA-whitenings of one backbone are two models)."""
        current = self.model_fingerprint
        if current and current != fingerprint:
            raise FeatureStoreError(
                f"{self.path}: holds descriptors of model {current}, not of this model ({fingerprint}); "
                f"extract into a new file, or with the store's own model (--like {self.path})")
        self._file.attrs["model_fingerprint"] = fingerprint

    @property
    def model_file(self) -> Optional[Path]:
        """The file of the model that made the descriptors, if the store records one."""
        value = self._file.attrs.get("model_file")
        return (self.path.parent / str(value)) if value else None

    def set_model_file(self, path: os.PathLike) -> None:
        self._file.attrs["model_file"] = os.path.relpath(Path(path).resolve(), self.path.parent.resolve())

    # -- keys ------------------------------------------------------------------------------------
    def keys(self) -> List[str]:
        """Image keys in the store, sorted."""
        if self._keys is None:
            found: List[str] = []

            def visit(name, obj):
                if isinstance(obj, h5py.Group) and "descriptors" in obj and not name.startswith(PARTIAL):
                    found.append(name)

            self._file.visititems(visit)
            self._keys = sorted(found)
        return list(self._keys)

    def __contains__(self, key: str) -> bool:
        key = key.strip("/")
        return key in self._file and "descriptors" in self._file[key]

    def __len__(self) -> int:
        return len(self.keys())

    # -- reading ----------------------------------------------------------------------------------
    def read(self, key: str, with_global: bool = True) -> LocalFeatures:
        key = key.strip("/")
        if key not in self:
            raise KeyError(f"{self.path}: no features for {key!r}")
        grp = self._file[key]
        try:
            glob = grp["global"][()].astype(np.float32) if with_global and "global" in grp else None
            return LocalFeatures(
                descriptors=grp["descriptors"][()].astype(np.float32, copy=False),
                strengths=grp["strengths"][()].astype(np.float32, copy=False),
                locations=grp["locations"][()].astype(np.int32),
                scales=grp["scales"][()].astype(np.float32, copy=False),
                image_size=tuple(int(v) for v in grp.attrs["image_size"]),
                input_size=tuple(int(v) for v in grp.attrs["input_size"]),
                global_descriptor=glob,
            )
        except (KeyError, OSError) as exc:
            raise FeatureStoreError(f"{self.path}: features of {key!r} are damaged ({exc})") from None

    def descriptors(self, key: str) -> np.ndarray:
        """Only the (n, D) float32 local descriptors of an image (cheaper than read())."""
        key = key.strip("/")
        if key not in self:
            raise KeyError(f"{self.path}: no features for {key!r}")
        return self._file[key]["descriptors"][()].astype(np.float32, copy=False)

    def global_descriptors(self, keys: Sequence[str]) -> np.ndarray:
        """(len(keys), G) float32 matrix of the stored global descriptors."""
        out = []
        for key in keys:
            grp = self._file.get(key.strip("/"))
            if grp is None or "global" not in grp:
                raise KeyError(f"{self.path}: no global descriptor for {key!r}")
            out.append(grp["global"][()].astype(np.float32))
        return np.stack(out) if out else np.zeros((0, 0), np.float32)

    # -- writing ----------------------------------------------------------------------------------
    def write(self, key: str, feats: LocalFeatures, float16: bool = False) -> None:
        """Store one image's features atomically (replaces an existing entry)."""
        if self.mode != "a":
            raise FeatureStoreError(f"{self.path}: opened read-only")
        key = _check_key(key)
        n = len(feats.descriptors)
        for name in ("strengths", "locations", "scales"):
            if len(getattr(feats, name)) != n:
                raise ValueError(f"{key}: {name} has {len(getattr(feats, name))} rows, descriptors {n}")
        tmp_name = f"{PARTIAL}/{key.replace('/', '|')}"
        if tmp_name in self._file:
            del self._file[tmp_name]
        grp = self._file.create_group(tmp_name)
        grp.create_dataset("descriptors", data=np.asarray(feats.descriptors,
                                                          np.float16 if float16 else np.float32))
        grp.create_dataset("strengths", data=np.asarray(feats.strengths, np.float32))
        grp.create_dataset("locations", data=np.asarray(feats.locations, np.int16).reshape(n, 2))
        grp.create_dataset("scales", data=np.asarray(feats.scales, np.float32))
        if feats.global_descriptor is not None:
            grp.create_dataset("global", data=np.asarray(feats.global_descriptor, np.float32))
        grp.attrs["image_size"] = np.asarray(feats.image_size, np.int64)
        grp.attrs["input_size"] = np.asarray(feats.input_size, np.int64)
        if key in self._file:
            del self._file[key]
        parent = key.rsplit("/", 1)[0] if "/" in key else None
        if parent is not None:
            self._file.require_group(parent)
        self._file.move(tmp_name, key)
        if self._keys is not None and key not in self._keys:
            self._keys.append(key)
            self._keys.sort()

    def delete(self, key: str) -> None:
        key = _check_key(key)
        if key in self._file:
            del self._file[key]
            self._keys = None

    def copy_from(self, other: "FeatureStore", key: str) -> None:
        """Copy one image's group from another store (used to merge shards)."""
        key = _check_key(key)
        parent = key.rsplit("/", 1)[0] if "/" in key else None
        if parent is not None:
            self._file.require_group(parent)
        if key in self._file:
            del self._file[key]
        other._file.copy(other._file[key], self._file, name=key)
        if self._keys is not None:
            self._keys = None


def open_store(store) -> Tuple["FeatureStore", bool]:
    """(the FeatureStore, whether the caller opened it and must close it) for a store or its path."""
    if isinstance(store, FeatureStore):
        return store, False
    return FeatureStore(store, "r"), True


def merge_stores(inputs: Sequence[os.PathLike], out: os.PathLike, overwrite: bool = False) -> int:
    """Merge shard stores into ``out`` (written to a temp file, then renamed). Returns #images.

    All inputs must share one extractor config; a key present in several shards is taken once.
    """
    if Path(out).exists() and not overwrite:
        raise FeatureStoreError(f"{out}: exists (how-met merge --overwrite, or overwrite=True, "
                                f"replaces it)")
    seen = set()
    config = None
    with atomic_path(out) as tmp, FeatureStore(tmp, "a") as merged:
        for path in inputs:
            with FeatureStore(path, "r") as shard:
                if config is None:
                    config = shard.config
                    merged.set_config(config)
                    if shard.model_file is not None:
                        merged.set_model_file(shard.model_file)
                elif shard.config != config:
                    raise FeatureStoreError(f"{path}: extractor config differs from the other shards")
                if shard.model_fingerprint:
                    try:
                        merged.set_model_fingerprint(shard.model_fingerprint)
                    except FeatureStoreError:
                        raise FeatureStoreError(f"{path}: descriptors of another model ({shard.model_fingerprint}) "
                                                f"than the shards before it ({merged.model_fingerprint})") from None
                for key in shard.keys():
                    if key not in seen:
                        merged.copy_from(shard, key)
                        seen.add(key)
    return len(seen)
