"""HDF5 feature store: one group per image, keyed by the image path relative to its root.

Layout (hloc-style; a key with slashes becomes nested groups)::

    /<key>/descriptors   (n, D) float32 or float16   whitened local descriptors, not L2-normalised
    /<key>/strengths     (n,)   float32              attention strength, normalised per image
    /<key>/locations     (n, 2) int16                feature-map cell (x, y) at the feature's scale
    /<key>/scales        (n,)   float32              scale the feature was extracted at
    /<key>/global        (G,)   float32              optional global (GeM) descriptor
    /<key>.attrs["image_size"]  (width, height) of the original image
    /<key>.attrs["input_size"]  (width, height) after the shrink-only resize (scale 1)
    /.attrs["format_version"]
    /.attrs["extractor"]        JSON of the extractor config (backbone, layer, stride, scales, ...)
    /.attrs["model_fingerprint"]  fingerprint of the model that made the descriptors
    /.attrs["model_file"]       that model's file, relative to the store's folder

An image group is a group holding a ``descriptors`` dataset and an ``image_size`` attribute, so
an image folder that happens to be called ``descriptors`` is just a folder.

Crash safety. A writer never changes the store file in place. ``FeatureStore(path, "a")``
appends each written image to a journal beside the store (``<store>.journal``: framed,
checksummed records, handed to the OS after every image) and ``close()`` consolidates: the store
is copied to a temporary file (or created), the journal's images are written into it, the file
is synced and renamed over the store, then the journal is deleted. A process killed at any
moment leaves the old store intact plus a journal whose complete records are every finished
image; opening the store for writing again replays them (a torn last record is cut off), so an
interrupted extraction continues where it stopped and ends with the same contents as an
uninterrupted one. Readers are told to rerun the extraction while a journal exists. One writer
at a time (``<store>.lock``, see :func:`how_met.utils.writer_lock`).

Reading refuses what could make it read outside the file or allocate more than the file holds:
links, external or virtual storage, filters, datasets declaring more bytes than are stored.
Nothing here unpickles anything.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import h5py
import numpy as np

from .journal import Journal
from .settings import with_legacy_defaults
from ..utils import atomic_path, h5_dataset_problem, writer_lock

logger = logging.getLogger(__name__)

PARTIAL = "__partial__"  # written by how-met <= round 1 during a write; ignored and dropped
FORMAT_VERSION = 1
ARRAY_NAMES = ("descriptors", "strengths", "locations", "scales", "global")


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


def journal_path(path: os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".journal")


def _check_key(key: str) -> str:
    key = key.strip("/")
    parts = key.split("/")
    if not key or parts[0] == PARTIAL or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid feature key {key!r}")
    return key


def _stored_arrays(key: str, feats: LocalFeatures, float16: bool) -> Dict[str, np.ndarray]:
    """The arrays of one image as they are stored (dtypes and shapes checked)."""
    n = len(feats.descriptors)
    arrays = {
        "descriptors": np.ascontiguousarray(feats.descriptors, np.float16 if float16 else np.float32),
        "strengths": np.ascontiguousarray(feats.strengths, np.float32),
        "locations": np.ascontiguousarray(feats.locations, np.int16),
        "scales": np.ascontiguousarray(feats.scales, np.float32),
    }
    if feats.global_descriptor is not None:
        arrays["global"] = np.ascontiguousarray(feats.global_descriptor, np.float32).ravel()
    if arrays["descriptors"].ndim != 2 or arrays["locations"].shape != (n, 2):
        raise ValueError(f"{key}: descriptors {arrays['descriptors'].shape} and locations "
                         f"{arrays['locations'].shape} must be (n, D) and (n, 2)")
    for name in ("strengths", "scales"):
        if arrays[name].shape != (n,):
            raise ValueError(f"{key}: {name} has shape {arrays[name].shape}, descriptors {n} rows")
    for name, arr in arrays.items():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ValueError(f"{key}: {name} holds NaN or infinite values (the image could never "
                             f"be retrieved)")
    return arrays


def _write_group(file: h5py.File, key: str, arrays: Dict[str, np.ndarray], attrs: dict) -> None:
    if key in file:
        del file[key]
    grp = file.create_group(key)  # creates the parent groups of a nested key
    for name, arr in arrays.items():
        grp.create_dataset(name, data=arr)
    for name, value in attrs.items():
        grp.attrs[name] = np.asarray(value, np.int64)


def _image_attrs(feats: LocalFeatures) -> dict:
    return {"image_size": [int(v) for v in feats.image_size],
            "input_size": [int(v) for v in feats.input_size]}


# ---------------------------------------------------------------------------------------------
# Safe reading
# ---------------------------------------------------------------------------------------------

def _hard_dataset(where, grp: h5py.Group, name: str):
    """``grp[name]`` if it is safe to read (see h5_dataset_problem), None if absent."""
    if name not in grp and grp.get(name, getlink=True) is None:
        return None
    problem = h5_dataset_problem(grp, name)
    if problem:
        raise FeatureStoreError(f"{where}: {problem}")
    return grp[name]


def _is_image_group(obj) -> bool:
    return isinstance(obj, h5py.Group) and "image_size" in obj.attrs and \
        isinstance(obj.get("descriptors", getlink=True), h5py.HardLink) and \
        isinstance(obj.get("descriptors"), h5py.Dataset)


def _read_group(path: Path, key: str, grp: h5py.Group, names: Sequence[str]) -> Tuple[Dict[str, np.ndarray], dict]:
    where = f"{path}: features of {key!r}"
    arrays = {}
    try:
        for name in names:
            ds = _hard_dataset(where, grp, name)
            if ds is None:
                if name == "global":
                    continue
                raise FeatureStoreError(f"{where}: {name} is missing (damaged file)")
            arrays[name] = ds[()]
        attrs = {name: [int(v) for v in np.asarray(grp.attrs[name]).ravel()]
                 for name in ("image_size", "input_size") if name in grp.attrs}
    except (KeyError, OSError, ValueError, TypeError) as exc:
        raise FeatureStoreError(f"{where}: damaged ({exc})") from None
    return arrays, attrs


def _validated(path: Path, key: str, arrays: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    where = f"{path}: features of {key!r}"
    desc = arrays.get("descriptors")
    if desc is not None:
        if desc.ndim != 2 or desc.dtype.kind != "f":
            raise FeatureStoreError(f"{where}: descriptors are {desc.dtype}{list(desc.shape)}, "
                                    f"expected an (n, D) float array (damaged file)")
        if not np.isfinite(desc).all():
            raise FeatureStoreError(f"{where}: descriptors hold NaN or infinite values (damaged file)")
    n = None if desc is None else len(desc)
    for name in ("strengths", "locations", "scales"):
        arr = arrays.get(name)
        if arr is not None and n is not None and len(arr) != n:
            raise FeatureStoreError(f"{where}: {name} has {len(arr)} rows, descriptors {n} (damaged file)")
    loc = arrays.get("locations")
    if loc is not None and (loc.ndim != 2 or loc.shape[1:] != (2,)):
        raise FeatureStoreError(f"{where}: locations are {list(loc.shape)}, expected (n, 2) (damaged file)")
    return arrays


def _features(path: Path, key: str, arrays: Dict[str, np.ndarray], attrs: dict,
              with_global: bool) -> LocalFeatures:
    arrays = _validated(path, key, arrays)
    for name in ("image_size", "input_size"):
        if len(attrs.get(name, ())) != 2:
            raise FeatureStoreError(f"{path}: features of {key!r} lack a valid {name} (damaged file)")
    glob = arrays.get("global") if with_global else None
    return LocalFeatures(
        descriptors=arrays["descriptors"].astype(np.float32, copy=False),
        strengths=arrays["strengths"].astype(np.float32, copy=False),
        locations=arrays["locations"].astype(np.int32),
        scales=arrays["scales"].astype(np.float32, copy=False),
        image_size=tuple(attrs["image_size"]),
        input_size=tuple(attrs["input_size"]),
        global_descriptor=None if glob is None else glob.astype(np.float32).ravel(),
    )


def _open_h5(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        if "lock" in str(exc).lower():
            raise FeatureStoreError(f"{path}: locked by another process (HDF5 file locking); "
                                    f"wait for it or close it") from None
        raise FeatureStoreError(f"{path}: not a readable HDF5 feature store ({exc})") from None


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------


class FeatureStore:
    """An HDF5 file of per-image features. Use as a context manager.

    mode "r" reads; "a" reads and appends (created if missing) through the journal described in
    the module docstring: the file itself only changes when a writer closes cleanly.
    """

    def __init__(self, path, mode: str = "r"):
        self.path = Path(path)
        if mode not in ("r", "a"):
            raise ValueError("mode must be 'r' or 'a'")
        self.mode = mode
        self._file: Optional[h5py.File] = None
        self._journal: Optional[Journal] = None
        self._lock = None
        self._keys: Optional[List[str]] = None
        self._key_set: set = set()
        jpath = journal_path(self.path)
        if mode == "r":
            if jpath.exists():
                raise FeatureStoreError(
                    f"{self.path}: an extraction into this store was interrupted or is still running "
                    f"({jpath.name} holds its unfinished work); rerun the same extract command to "
                    f"complete the store")
            if not self.path.exists():
                raise FeatureStoreError(f"{self.path}: feature store does not exist")
        else:
            self._lock = writer_lock(self.path)
            self._lock.__enter__()
        try:
            if self.path.exists():
                self._file = _open_h5(self.path)
                if "format_version" not in self._file.attrs:
                    raise FeatureStoreError(f"{self.path}: not a how-met feature store (no "
                                            f"format_version attribute)")
                version = self._file.attrs["format_version"]
                if not isinstance(version, (int, np.integer)) or int(version) > FORMAT_VERSION:
                    raise FeatureStoreError(f"{self.path}: format version {version} is not supported "
                                            f"(this how-met reads <= {FORMAT_VERSION})")
            if mode == "a":
                self._journal = Journal(jpath)
                if self._journal.images:
                    logger.info("%s: resuming an interrupted write (%d images in its journal)",
                                self.path, len(self._journal.images))
        except BaseException:
            self._release()
            raise

    # -- context manager ---------------------------------------------------------------------
    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # keep the journal: a rerun continues from every image finished so far
            self._release()

    def _release(self) -> None:
        if self._file is not None and self._file.id.valid:
            self._file.close()
        if self._journal is not None:
            if self._journal.path.exists() and self._journal.path.stat().st_size == 0:
                self._journal.delete()
            self._journal.close()
        if self._lock is not None:
            lock, self._lock = self._lock, None
            lock.__exit__(None, None, None)

    def close(self) -> None:
        """Close; a writer first consolidates its journal into the store (see the module doc)."""
        try:
            if self._journal is not None and self._journal.path.exists():
                self._consolidate()
        finally:
            self._release()

    def flush(self) -> None:
        """Hand the journal to the disk (it is already safe from a killed process)."""
        if self._journal is not None:
            self._journal.sync()

    def _consolidate(self) -> None:
        journal = self._journal
        journal.sync()
        if self._file is not None:
            self._file.close()
        with atomic_path(self.path) as tmp:
            if self.path.exists():
                shutil.copyfile(self.path, tmp)
            with h5py.File(tmp, "a") as out:
                if PARTIAL in out:
                    del out[PARTIAL]
                out.attrs["format_version"] = FORMAT_VERSION
                for name, value in journal.attrs.items():
                    out.attrs[name] = value
                for key in sorted(journal.images):
                    arrays, attrs = journal.read_image(key)
                    _write_group(out, key, arrays, attrs)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        journal.delete()
        self._file = None

    # -- metadata ------------------------------------------------------------------------------
    def _attr(self, name: str):
        if self._journal is not None and name in self._journal.attrs:
            return self._journal.attrs[name]
        return self._file.attrs.get(name) if self._file is not None else None

    @property
    def config(self) -> dict:
        """The extractor config the features were made with ({} if unknown)."""
        raw = self._attr("extractor")
        try:
            return json.loads(raw) if raw else {}
        except (TypeError, ValueError):
            raise FeatureStoreError(f"{self.path}: extractor attribute is not JSON (damaged file)") from None

    def set_config(self, config: dict) -> None:
        """Record the extractor config; refuses to mix features of different extractors."""
        current = self.config
        if current and with_legacy_defaults(current) != with_legacy_defaults(config):
            raise FeatureStoreError(
                f"{self.path}: holds features of another extractor config "
                f"({json.dumps(current, sort_keys=True)}); use a new file")
        self._set_attr("extractor", json.dumps(config, sort_keys=True))

    def _set_attr(self, name: str, value: str) -> None:
        if self.mode != "a":
            raise FeatureStoreError(f"{self.path}: opened read-only")
        if self._attr(name) != value:
            self._journal.set_attrs({name: value})

    @property
    def model_fingerprint(self) -> Optional[str]:
        """Fingerprint of the model that made the descriptors (None in stores written before
        how-met recorded it)."""
        value = self._attr("model_fingerprint")
        return str(value) if value else None

    def set_model_fingerprint(self, fingerprint: str) -> None:
        """Record the model's fingerprint; refuses to mix descriptors of two models (two
        PCA-whitenings of one backbone are two models)."""
        current = self.model_fingerprint
        if current and current != fingerprint:
            raise FeatureStoreError(
                f"{self.path}: holds descriptors of model {current}, not of this model ({fingerprint}); "
                f"extract into a new file, or with the store's own model (--like {self.path})")
        self._set_attr("model_fingerprint", fingerprint)

    @property
    def model_file(self) -> Optional[Path]:
        """The file of the model that made the descriptors, if the store records one."""
        value = self._attr("model_file")
        return (self.path.parent / str(value)) if value else None

    def set_model_file(self, path: os.PathLike) -> None:
        self._set_attr("model_file", os.path.relpath(Path(path).resolve(), self.path.parent.resolve()))

    # -- keys ------------------------------------------------------------------------------------
    def keys(self) -> List[str]:
        """Image keys in the store, sorted."""
        if self._keys is None:
            found: List[str] = []

            def visit(name, obj):
                if not name.startswith(PARTIAL) and _is_image_group(obj):
                    found.append(name)

            if self._file is not None:
                self._file.visititems(visit)
            if self._journal is not None:
                found = list(set(found) | set(self._journal.images))
            self._keys = sorted(found)
            self._key_set = set(self._keys)
        return list(self._keys)

    def __contains__(self, key: str) -> bool:
        self.keys()
        return key.strip("/") in self._key_set

    def __len__(self) -> int:
        return len(self.keys())

    # -- reading ----------------------------------------------------------------------------------
    def _arrays(self, key: str, names: Sequence[str]) -> Tuple[Dict[str, np.ndarray], dict]:
        key = key.strip("/")
        if key not in self:
            raise KeyError(f"{self.path}: no features for {key!r}")
        if self._journal is not None and key in self._journal.images:
            arrays, attrs = self._journal.read_image(key)
            return {n: a for n, a in arrays.items() if n in names}, attrs
        return _read_group(self.path, key, self._file[key], names)

    def read(self, key: str, with_global: bool = True) -> LocalFeatures:
        arrays, attrs = self._arrays(key, ARRAY_NAMES if with_global else ARRAY_NAMES[:4])
        return _features(self.path, key, arrays, attrs, with_global)

    def descriptors(self, key: str) -> np.ndarray:
        """Only the (n, D) float32 local descriptors of an image (cheaper than read())."""
        arrays, _ = self._arrays(key, ("descriptors",))
        return _validated(self.path, key, arrays)["descriptors"].astype(np.float32, copy=False)

    def global_descriptors(self, keys: Sequence[str]) -> np.ndarray:
        """(len(keys), G) float32 matrix of the stored global descriptors."""
        out = []
        for key in keys:
            glob = self._arrays(key, ("global",))[0].get("global")
            if glob is None:
                raise KeyError(f"{self.path}: no global descriptor for {key!r}")
            if glob.dtype.kind != "f" or not np.isfinite(glob).all() or \
                    (out and glob.size != out[0].size):
                raise FeatureStoreError(f"{self.path}: global descriptor of {key!r} is damaged")
            out.append(glob.astype(np.float32).ravel())
        return np.stack(out) if out else np.zeros((0, 0), np.float32)

    # -- writing ----------------------------------------------------------------------------------
    def write(self, key: str, feats: LocalFeatures, float16: bool = False) -> None:
        """Store one image's features (replaces an existing entry). Safe from a kill once it
        returns; the store file itself is updated by ``close()``."""
        if self.mode != "a":
            raise FeatureStoreError(f"{self.path}: opened read-only")
        key = _check_key(key)
        arrays = _stored_arrays(key, feats, float16)
        self._journal.add_image(key, arrays, _image_attrs(feats))
        self._added(key)

    def copy_from(self, other: "FeatureStore", key: str) -> None:
        """Copy one image's arrays as they are stored (float16 stays float16) from another store."""
        arrays, attrs = other._arrays(key, ARRAY_NAMES)
        self._journal.add_image(_check_key(key), _validated(other.path, key, arrays), attrs)
        self._added(key)

    def _added(self, key: str) -> None:
        if self._keys is not None and key not in self._key_set:
            self._keys.append(key)
            self._keys.sort()
            self._key_set.add(key)


def open_store(store) -> Tuple["FeatureStore", bool]:
    """(the FeatureStore, whether the caller opened it and must close it) for a store or its path."""
    if isinstance(store, FeatureStore):
        return store, False
    return FeatureStore(store, "r"), True


def merge_stores(inputs: Sequence[os.PathLike], out: os.PathLike, overwrite: bool = False) -> int:
    """Merge shard stores into ``output`` (written to a temp file, then renamed). Returns #images.

    All inputs must share one extractor config; a key present in several shards is taken once.
    """
    output = Path(out)
    if output.exists() and not overwrite:
        raise FeatureStoreError(f"{output}: exists (how-met merge --overwrite, or overwrite=True, "
                                f"replaces it)")
    seen = set()
    config = None
    with writer_lock(output), atomic_path(output) as tmp, FeatureStore(tmp, "a") as merged:
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
