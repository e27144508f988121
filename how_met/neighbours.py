"""Ranked neighbour lists: the hand-off between a search (ASMK, global) and what consumes it
(kNN classifier, reranker, reports).

``Neighbours`` is deliberately small: for each query key, up to k database images (as indices
into ``db_keys``) sorted by descending score. Rows with fewer than k results are padded with
index -1 and score -inf. Files: ``.h5`` (h5py) or ``.json``, chosen by suffix, written
atomically; a saved file holds only the database keys its rows refer to.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

import h5py
import numpy as np

from .utils import atomic_path

FORMAT = "how-met-neighbours"
FORMAT_VERSION = 1


@dataclass
class Neighbours:
    """query_keys (nq); db_keys; indices (nq, k) int64 into db_keys, -1 padded; scores (nq, k)
    float32, -inf padded, each row sorted descending."""

    query_keys: List[str]
    db_keys: List[str]
    indices: np.ndarray
    scores: np.ndarray

    def __post_init__(self):
        self.query_keys = list(self.query_keys)
        self.db_keys = list(self.db_keys)
        nq = len(self.query_keys)
        self.indices = np.asarray(self.indices, np.int64).reshape(nq, -1)
        self.scores = np.asarray(self.scores, np.float32).reshape(nq, -1)
        if self.indices.shape != self.scores.shape:
            raise ValueError(f"neighbours: indices {self.indices.shape} and scores "
                             f"{self.scores.shape} differ in shape")
        if self.indices.size and (self.indices.max() >= len(self.db_keys) or self.indices.min() < -1):
            raise ValueError(f"neighbours: indices outside [-1, {len(self.db_keys)})")
        self._rows = None  # query key -> row, built on first top()

    # -- access ------------------------------------------------------------------------------
    @property
    def k(self) -> int:
        return int(self.indices.shape[1])

    def __len__(self) -> int:
        return len(self.query_keys)

    def top(self, query_key: str) -> List[Tuple[str, float]]:
        """[(db_key, score)] of one query, best first, padding left out."""
        if self._rows is None:
            self._rows = {key: row for row, key in reversed(list(enumerate(self.query_keys)))}
        row = self._rows.get(query_key)
        if row is None:
            raise KeyError(f"no neighbours for query {query_key!r}")
        return [(self.db_keys[i], float(s)) for i, s in zip(self.indices[row], self.scores[row]) if i >= 0]

    def compacted(self) -> "Neighbours":
        """The same lists with ``db_keys`` cut down to the keys the rows refer to."""
        used = np.unique(self.indices[self.indices >= 0])
        remap = np.full(len(self.db_keys) + 1, -1, np.int64)  # slot -1 (last) keeps padding at -1
        remap[used] = np.arange(len(used))
        return Neighbours(self.query_keys, [self.db_keys[i] for i in used], remap[self.indices], self.scores)

    @staticmethod
    def concatenate(parts: Sequence["Neighbours"]) -> "Neighbours":
        """Stack the rows of several results over the same database (same db_keys)."""
        if not parts:
            raise ValueError("neighbours: nothing to concatenate")
        k = max(p.k for p in parts)
        idx, sc, keys = [], [], []
        for p in parts:
            if p.db_keys is not parts[0].db_keys and p.db_keys != parts[0].db_keys:
                raise ValueError("neighbours: cannot concatenate results over different databases")
            pad = k - p.k
            idx.append(np.pad(p.indices, ((0, 0), (0, pad)), constant_values=-1))
            sc.append(np.pad(p.scores, ((0, 0), (0, pad)), constant_values=-np.inf))
            keys.extend(p.query_keys)
        return Neighbours(keys, parts[0].db_keys, np.concatenate(idx), np.concatenate(sc))

    # -- files ---------------------------------------------------------------------------------
    def save(self, path: os.PathLike) -> None:
        path = Path(path)
        data = self.compacted()
        suffix = path.suffix.lower()
        if suffix == ".json":
            rows = []
            for qk, ind, sc in zip(data.query_keys, data.indices, data.scores):
                valid = ind >= 0
                rows.append({"query": qk, "db": [int(i) for i in ind[valid]],
                             "scores": [float(s) for s in sc[valid]]})
            obj = {"format": FORMAT, "format_version": FORMAT_VERSION, "k": data.k,
                   "db_keys": data.db_keys, "results": rows}
            with atomic_path(path) as tmp:
                with open(tmp, "w") as fh:
                    json.dump(obj, fh, allow_nan=False)
                    fh.write("\n")
        elif suffix in (".h5", ".hdf5"):
            with atomic_path(path) as tmp:
                with h5py.File(tmp, "w") as f:
                    f.attrs["format"] = FORMAT
                    f.attrs["format_version"] = FORMAT_VERSION
                    strings = h5py.string_dtype("utf-8")
                    f.create_dataset("query_keys", data=np.array(data.query_keys, dtype=object), dtype=strings)
                    f.create_dataset("db_keys", data=np.array(data.db_keys, dtype=object), dtype=strings)
                    f.create_dataset("indices", data=data.indices)
                    f.create_dataset("scores", data=data.scores)
        else:
            raise ValueError(f"{path}: neighbours are saved as .h5 or .json")

    @classmethod
    def load(cls, path: os.PathLike) -> "Neighbours":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: neighbours file does not exist")
        suffix = path.suffix.lower()
        try:
            if suffix == ".json":
                obj = json.loads(path.read_text())
                if not isinstance(obj, dict):
                    raise ValueError(f"{path}: not a how-met neighbours file (JSON {type(obj).__name__})")
                _check_format(path, obj.get("format"), obj.get("format_version"))
                k, rows = int(obj["k"]), obj["results"]
                indices = np.full((len(rows), k), -1, np.int64)
                scores = np.full((len(rows), k), -np.inf, np.float32)
                for r, row in enumerate(rows):
                    n = len(row["db"])
                    indices[r, :n] = row["db"]
                    scores[r, :n] = row["scores"]
                return cls([row["query"] for row in rows], obj["db_keys"], indices, scores)
            if suffix in (".h5", ".hdf5"):
                with h5py.File(path, "r") as f:
                    _check_format(path, _text(f.attrs.get("format")), f.attrs.get("format_version"))
                    return cls([_text(s) for s in f["query_keys"][()]], [_text(s) for s in f["db_keys"][()]],
                               f["indices"][()], f["scores"][()])
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a readable neighbours file ({exc})") from None
        raise ValueError(f"{path}: neighbours files are .h5 or .json")


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _check_format(path: Path, fmt, version) -> None:
    if fmt != FORMAT:
        raise ValueError(f"{path}: not a how-met neighbours file (format {fmt!r})")
    if version is None or int(version) > FORMAT_VERSION:
        raise ValueError(f"{path}: neighbours format version {version} is not supported "
                         f"(this how-met reads <= {FORMAT_VERSION})")
