"""Inverted-file files: write, read and validate (the layout is described in
``how_met.asmk.inverted_file``).

Files: a directory of ``.npy`` arrays + ``keys.json`` + ``meta.json``, or one HDF5 file
(``.h5``/``.hdf5``) with contiguous datasets; both load memory-mapped. Saves go to a temporary
name first and are renamed over the target, so an existing index is never left half-written; a
directory save killed between its two renames (old index moved aside, new one not yet in place)
is completed by the next load or save, and temporaries of killed saves are removed.

Every load validates, always, each array that indexes memory in the search kernels (offsets
monotone from 0 to the number of postings, every posting's image id below the number of images
and agreeing with the per-image counts, unique keys) and the metadata's types and ranges, and
refuses files whose headers declare more data than they hold: a tampered index is refused with
one line instead of crashing the process or returning corrupted scores. The checks read the
image ids once (4 bytes per posting).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict, List

import h5py
import numpy as np

from ..utils import atomic_path, check_npy_file, h5_dataset_problem, pid_alive, remove_stale_temporaries

FORMAT = "how-met-ivf"
FORMAT_VERSION = 1
ARRAY_NAMES = ("offsets", "vectors", "image_ids", "n_vectors", "alive")


def write_index(path: Path, meta: dict, arrays: Dict[str, np.ndarray], keys: List[str]) -> None:
    """Write an index (directory, or HDF5 for a .h5/.hdf5 path) atomically."""
    recover_interrupted_save(path)
    if path.suffix.lower() in (".h5", ".hdf5"):
        if path.is_dir():
            raise ValueError(f"{path}: is a directory, not an HDF5 index file")
        with atomic_path(path) as tmp:
            with h5py.File(tmp, "w") as f:
                f.attrs["meta"] = json.dumps(meta)
                for name, arr in arrays.items():
                    f.create_dataset(name, data=np.asarray(arr))  # contiguous: mmap-able
                f.create_dataset("keys", data=np.array(keys, dtype=object),
                                 dtype=h5py.string_dtype("utf-8"))
    else:
        if path.exists() and not (path.is_dir() and ((path / "meta.json").exists() or not any(path.iterdir()))):
            raise ValueError(f"{path}: exists and is not a how-met index directory (not overwritten)")
        with atomic_path(path) as tmp:
            tmp.mkdir()
            for name, arr in arrays.items():
                with open(tmp / f"{name}.npy", "wb") as fh:
                    np.save(fh, np.asarray(arr), allow_pickle=False)
            (tmp / "keys.json").write_text(json.dumps(keys))
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")  # written last


def recover_interrupted_save(path: Path) -> None:
    """Finish a directory save that was killed between its two renames, then remove what killed
    saves left (``.<name>.<pid>.tmp`` / ``.old``). The new index (complete once its meta.json,
    written last, exists) wins over the old one."""
    if not path.exists():
        for suffix in (".tmp", ".old"):
            for candidate in sorted(path.parent.glob(f".{path.name}.*{suffix}")):
                pid = candidate.name[len(path.name) + 2:-len(suffix)]
                if pid.isdigit() and not pid_alive(int(pid)) and (candidate / "meta.json").is_file():
                    os.replace(candidate, path)
                    break
            if path.exists():
                break
    remove_stale_temporaries(path)


def read_index(path: Path, mmap: bool):
    """(meta, arrays, keys) of a saved index; each array checked against the metadata."""
    recover_interrupted_save(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: inverted file does not exist")
    if path.is_dir():
        return _read_dir(path, mmap)
    return _read_h5(path, mmap)


def _check_meta(where: Path, meta) -> dict:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{where}: not a how-met inverted file")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{where}: inverted-file format version {version} is not supported "
                         f"(this how-met reads <= {FORMAT_VERSION})")
    for name in ("n_words", "dim", "binary", "use_idf", "alpha", "tau", "n_images", "n_postings", "arrays"):
        if name not in meta:
            raise ValueError(f"{where}: metadata lacks {name!r}")
    for name, low in (("n_words", 1), ("dim", 1), ("n_images", 0), ("n_postings", 0)):
        value = meta[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{where}: metadata {name} is {value!r}, expected an integer >= {low}")
    for name in ("binary", "use_idf"):
        if not isinstance(meta[name], bool):
            raise ValueError(f"{where}: metadata {name} is {meta[name]!r}, expected true or false")
    for name, low, high in (("alpha", 0.0, 64.0), ("tau", -1.0, 1.0)):
        value = meta[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not low <= value <= high or (name == "alpha" and value == 0):
            raise ValueError(f"{where}: metadata {name} is {value!r}, expected a number in "
                             f"{'(' if name == 'alpha' else '['}{low:g}, {high:g}]")
    arrays = meta["arrays"]
    if not isinstance(arrays, dict) or not all(
            isinstance(a, dict) and isinstance(a.get("dtype"), str) and isinstance(a.get("shape"), list)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in a["shape"])
            for a in arrays.values()):
        raise ValueError(f"{where}: metadata arrays is not a map of {{shape, dtype}} entries")
    return meta


def _read_dir(path: Path, mmap: bool):
    meta_path = path / "meta.json"
    if not meta_path.exists():
        raise ValueError(f"{meta_path}: missing (not a how-met inverted file, or an unfinished save)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{meta_path}: damaged ({exc})") from None
    _check_meta(meta_path, meta)
    arrays = {}
    for name in ARRAY_NAMES:
        file = path / f"{name}.npy"
        if not file.exists():
            raise ValueError(f"{file}: missing from the inverted file")
        try:
            check_npy_file(file)
            arrays[name] = np.load(file, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise ValueError(f"{file}: damaged ({exc})") from None
        _check_array(file, name, arrays[name], meta)
    keys_path = path / "keys.json"
    try:
        keys = json.loads(keys_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{keys_path}: damaged or missing ({exc})") from None
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ValueError(f"{keys_path}: not a list of image keys")
    return meta, arrays, keys


def _read_h5(path: Path, mmap: bool):
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"{path}: not a readable HDF5 inverted file ({exc})") from None
    with f:
        try:
            meta = json.loads(f.attrs["meta"])
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a how-met inverted file (no readable metadata: {exc})") from None
        _check_meta(path, meta)
        arrays = {}
        for name in ARRAY_NAMES:
            problem = h5_dataset_problem(f, name)
            if problem:
                raise ValueError(f"{path}: {problem}")
            ds = f[name]
            try:
                offset = ds.id.get_offset() if mmap and ds.size else None
                if offset is not None and ds.chunks is None and ds.compression is None:
                    arr = np.memmap(path, mode="r", dtype=ds.dtype, shape=ds.shape, offset=offset)
                else:
                    arr = ds[()]
            except (OSError, ValueError) as exc:
                raise ValueError(f"{path}: dataset {name!r} is damaged ({exc})") from None
            _check_array(path, name, arr, meta)
            arrays[name] = arr
        problem = h5_dataset_problem(f, "keys", numeric=False)
        if problem:
            raise ValueError(f"{path}: {problem}")
        try:
            keys = [k.decode("utf-8") if isinstance(k, bytes) else str(k) for k in f["keys"][()]]
        except (KeyError, OSError) as exc:
            raise ValueError(f"{path}: image keys missing or damaged ({exc})") from None
    return meta, arrays, keys


def _check_array(where: Path, name: str, arr: np.ndarray, meta: dict) -> None:
    want = meta["arrays"].get(name)
    if not want:
        raise ValueError(f"{where}: metadata does not describe {name!r}")
    if list(arr.shape) != list(want["shape"]) or arr.dtype.str != want["dtype"]:
        raise ValueError(f"{where}: {name} is {arr.dtype.str}{list(arr.shape)}, metadata says "
                         f"{want['dtype']}{want['shape']} (damaged or mixed-up file)")


def check_consistency(path: Path, meta: dict, arrays: dict, keys: list, width: int, dtype) -> None:
    """Shapes, dtypes and every value the search kernels use as a memory index (always run)."""
    n_words, n_images, n_postings = meta["n_words"], meta["n_images"], meta["n_postings"]
    expected = {"offsets": ((n_words + 1,), np.int64), "vectors": ((n_postings, width), dtype),
                "image_ids": ((n_postings,), np.uint32), "n_vectors": ((n_images,), np.uint32),
                "alive": ((n_images,), np.bool_)}
    for name, (shape, dt) in expected.items():
        arr = arrays[name]
        if arr.shape != shape or arr.dtype != np.dtype(dt):
            raise ValueError(f"{path}: {name} is {arr.dtype}{list(arr.shape)}, expected "
                             f"{np.dtype(dt)}{list(shape)}")
    if len(keys) != n_images:
        raise ValueError(f"{path}: {len(keys)} image keys for {n_images} images")
    if len(set(keys)) != len(keys):
        raise ValueError(f"{path}: image keys repeat (damaged file)")
    off = np.asarray(arrays["offsets"])
    if off[0] != 0 or off[-1] != n_postings or (np.diff(off) < 0).any():
        raise ValueError(f"{path}: word offsets are not monotone from 0 to {n_postings} (damaged file)")
    counts = np.asarray(arrays["n_vectors"])
    if int(counts.sum(dtype=np.int64)) != n_postings:
        raise ValueError(f"{path}: per-image vector counts do not add up to the postings (damaged file)")
    if n_postings:
        ids = arrays["image_ids"]
        if int(ids.max()) >= n_images:
            raise ValueError(f"{path}: posting image ids reach {int(ids.max())}, the index has "
                             f"{n_images} images (damaged file)")
        if not np.array_equal(np.bincount(ids, minlength=n_images), counts):
            raise ValueError(f"{path}: posting image ids disagree with the per-image counts (damaged file)")
    if not np.issubdtype(np.dtype(dtype), np.integer) and n_postings and \
            not np.isfinite(arrays["vectors"]).all():
        raise ValueError(f"{path}: vectors hold NaN or infinite values (damaged file)")
