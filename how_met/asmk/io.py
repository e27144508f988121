"""Inverted-file files: write, read and validate (the layout is described in
``how_met.asmk.inverted_file``).

Files: a directory of ``.npy`` arrays + ``keys.json`` + ``meta.json``, or one HDF5 file
(``.h5``/``.hdf5``) with contiguous datasets; both load memory-mapped. Saves go to a temporary
name first and are renamed over the target, so an existing index is never left half-written.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import h5py
import numpy as np

from ..utils import atomic_path

FORMAT = "how-met-ivf"
FORMAT_VERSION = 1
ARRAY_NAMES = ("offsets", "vectors", "image_ids", "n_vectors", "alive")


def write_index(path: Path, meta: dict, arrays: Dict[str, np.ndarray], keys: List[str]) -> None:
    """Write an index (directory, or HDF5 for a .h5/.hdf5 path) atomically."""
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


def read_index(path: Path, mmap: bool):
    """(meta, arrays, keys) of a saved index; each array checked against the metadata."""
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
            if name not in f:
                raise ValueError(f"{path}: dataset {name!r} is missing")
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


def check_consistency(path: Path, meta: dict, arrays: dict, keys: list, width: int, dtype, verify: bool) -> None:
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
    off = np.asarray(arrays["offsets"])
    if off[0] != 0 or off[-1] != n_postings or (np.diff(off) < 0).any():
        raise ValueError(f"{path}: word offsets are inconsistent (damaged file)")
    if int(np.asarray(arrays["n_vectors"]).sum(dtype=np.int64)) != n_postings:
        raise ValueError(f"{path}: per-image vector counts do not add up to the postings (damaged file)")
    if verify and n_postings:
        ids = arrays["image_ids"]
        if int(ids.max()) >= n_images or \
                not np.array_equal(np.bincount(ids, minlength=n_images), arrays["n_vectors"]):
            raise ValueError(f"{path}: posting image ids disagree with the per-image counts (damaged file)")

