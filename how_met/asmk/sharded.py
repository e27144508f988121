"""An inverted file split by database image into shards, each served by a Ray actor.

Layout on disk (``split_index``)::

    OUT/sharded.json    {"format": "how-met-sharded-index", "format_version": 1,
                         "shards": ["shard-000", "shard-001", ...]}
    OUT/shard-000/      an InvertedFile directory (``InvertedFile.save``) per shard

Shard s holds a contiguous run of the database images, in the order one index holds them, so
(shard, position in the shard) orders the images exactly as one index's positions do; new
images go to the last shard, as one index appends them. A search fans the query batch out to
every shard (one object in Ray's store, read by all), each returns its top k with unrounded
scores, and the merge keeps the k best by (score, shard, position): the keys, scores and order
of ``InvertedFile.search`` over all the images, ties included. With idf, every shard scores with
the idf of the whole collection (summed document frequencies), as one index would.

Each actor loads its shard memory-mapped; on a multi-machine cluster OUT must be at the same
path on every node (a shared filesystem).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import codes
from .aggregation import Aggregated
from .inverted_file import InvertedFile, load_index
from ..neighbours import Neighbours
from ..utils import atomic_path, check_file_format, configure_threads, write_json

FORMAT = "how-met-sharded-index"
FORMAT_VERSION = 1
MANIFEST = "sharded.json"
SETTINGS = ("n_words", "dim", "binary", "use_idf", "alpha", "tau", "codebook_fingerprint",
            "extractor", "model_fingerprint")


def split_index(index, n_shards: int, out: os.PathLike) -> Path:
    """Write ``index`` (an InvertedFile or its path) as ``n_shards`` shards of consecutive images
    (sizes differ by at most one) under ``out``, atomically. Returns ``out``."""
    index = load_index(index)
    alive = np.flatnonzero(index.arrays()["alive"])
    if not 1 <= n_shards <= max(len(alive), 1):
        raise ValueError(f"split_index: {n_shards} shards for {len(alive)} images")
    bounds = np.linspace(0, len(alive), n_shards + 1).round().astype(np.int64)
    names = [f"shard-{s:03d}" for s in range(n_shards)]
    out = Path(out)
    if out.exists() and not (out / MANIFEST).is_file():
        raise ValueError(f"{out}: exists and is not a sharded index (not overwritten)")
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for name, start, stop in zip(names, bounds[:-1], bounds[1:]):
            keep = np.zeros(index.n_slots, bool)
            keep[alive[start:stop]] = True
            index.subset(keep).save(tmp / name)
        write_json(tmp / MANIFEST, {"format": FORMAT, "format_version": FORMAT_VERSION, "shards": names})
    return out


def read_manifest(path: os.PathLike) -> List[Path]:
    """The shard directories a sharded index's manifest names."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a sharded index ({MANIFEST}: {exc})") from None
    check_file_format(path / MANIFEST, manifest, FORMAT, FORMAT_VERSION, "sharded index")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not shards or \
            any(not isinstance(s, str) or Path(s).name != s or s in (".", "..") for s in shards):
        raise ValueError(f"{path / MANIFEST}: 'shards' must be a non-empty list of folder names")
    return [path / name for name in shards]


class ShardServer:
    """One shard, memory-mapped, answering searches: the body of a shard's Ray actor."""

    def __init__(self, path: str, threads: int = 1):
        configure_threads(threads)
        self.path = Path(path)
        self.index = InvertedFile.load(self.path, mmap=True)
        self.dirty = False

    def describe(self) -> dict:
        """The shard's settings and its image positions' keys."""
        return {**{name: getattr(self.index, name) for name in SETTINGS},
                "slot_keys": self.index.slot_keys, "keys": self.index.keys}

    def document_frequency(self) -> np.ndarray:
        return self.index.document_frequency()

    def set_collection_idf(self, idf: np.ndarray) -> None:
        self.index.set_collection_idf(idf)

    def ranked(self, aggregated: Tuple[np.ndarray, np.ndarray, np.ndarray], k: int,
               query_keys: Optional[List[str]], alpha, tau, use_idf):
        return self.index.ranked(Aggregated(*aggregated), k, query_keys, alpha, tau, use_idf)

    def add(self, keys: List[str], aggregated) -> None:
        self.index.add(keys, Aggregated(*aggregated))
        self.dirty = True

    def remove(self, keys: List[str]) -> int:
        removed = self.index.remove(keys, missing_ok=True)
        self.dirty = self.dirty or bool(removed)
        return removed

    def save(self) -> None:
        if self.dirty:
            self.index.save(self.path)
            self.dirty = False


class ShardedIndex:
    """A sharded index (``split_index``) served by one Ray actor per shard; ``search`` takes and
    returns what ``InvertedFile.search`` does. Use as a context manager (``close`` stops the
    actors, and the Ray instance if this object started it).

    ray: True (or None) for a local Ray instance sized to the free cores unless this process
    already joined one, or a cluster address ("auto", "ray://head:10001").
    threads_per_shard: search threads of each actor.
    """

    def __init__(self, path: os.PathLike, ray: Union[bool, str, None] = True, threads_per_shard: int = 1):
        from ..features.distributed import import_ray, ray_session
        self.path = Path(path)
        shard_paths = read_manifest(self.path)
        self._ray = import_ray()
        self._session = ray_session(None if ray in (True, None) else str(ray))
        self._session.__enter__()
        try:
            server = self._ray.remote(ShardServer).options(scheduling_strategy="SPREAD")
            self._servers = [server.remote(str(p.resolve()), threads_per_shard) for p in shard_paths]
            described = self._call("describe")
        except BaseException:
            self.close()
            raise
        first = described[0]
        for shard, info in zip(shard_paths, described):
            differs = [name for name in SETTINGS if info[name] != first[name]]
            if differs:
                raise ValueError(f"{shard}: {differs[0]} differs from {shard_paths[0]} (shards of "
                                 f"different indexes)")
        # the settings and checks of one index (check_codebook, query_store's checks)
        self._header = InvertedFile(*(first[name] for name in SETTINGS))
        self._header.path = self.path
        self._slot_keys = [info["slot_keys"] for info in described]
        self._shard_of: Dict[str, int] = {}
        for s, info in enumerate(described):
            for key in info["keys"]:
                if key in self._shard_of:
                    raise ValueError(f"{self.path}: {key!r} is in two shards")
                self._shard_of[key] = s
        self._idf_current = False

    # -- what one index has ------------------------------------------------------------------
    def __getattr__(self, name):
        header = self.__dict__.get("_header")
        if header is not None and (name in SETTINGS or name in ("vector_width", "vector_dtype", "check_codebook")):
            return getattr(header, name)
        raise AttributeError(f"ShardedIndex has no attribute {name!r}")

    @property
    def n_shards(self) -> int:
        return len(self._servers)

    @property
    def slot_keys(self) -> List[str]:
        return [key for keys in self._slot_keys for key in keys]

    @property
    def keys(self) -> List[str]:
        return [key for key in self.slot_keys if key in self._shard_of]

    def __len__(self) -> int:
        return len(self._shard_of)

    def __contains__(self, key: str) -> bool:
        return key in self._shard_of

    # -- calls to the shards ------------------------------------------------------------------
    def _call(self, method: str, *args, shards: Optional[Sequence[int]] = None) -> list:
        """``method(*args)`` on the shards (all by default) at once; their answers in order."""
        from ..features.distributed import remote_result
        targets = range(self.n_shards) if shards is None else shards
        refs = [getattr(self._servers[s], method).remote(*args) for s in targets]
        return [remote_result(self._ray, ref) for ref in refs]

    def _refresh_idf(self) -> None:
        if not self._idf_current:
            df = np.sum(self._call("document_frequency"), axis=0)
            self._call("set_collection_idf", codes.idf_weights(df, len(self)))
            self._idf_current = True

    # -- search -------------------------------------------------------------------------------
    def search(self, aggregated: Aggregated, k: int = 100, query_keys: Optional[Sequence[str]] = None,
               alpha: Optional[float] = None, tau: Optional[float] = None,
               use_idf: Optional[bool] = None) -> Neighbours:
        """Top-k database images of every shard together (see ``InvertedFile.search``)."""
        if (self.use_idf if use_idf is None else use_idf):
            self._refresh_idf()
        vectors, words, images = aggregated
        batch = self._ray.put((np.asarray(vectors), np.asarray(words), np.asarray(images)))
        answers = self._call("ranked", batch, int(k), None if query_keys is None else list(query_keys),
                             alpha, tau, use_idf)
        query_keys = answers[0][0]
        offsets = np.cumsum([0] + [len(keys) for keys in self._slot_keys])
        positions = np.concatenate([np.where(idx >= 0, idx + offset, -1)
                                    for (_, idx, _), offset in zip(answers, offsets)], axis=1)
        scores = np.concatenate([sc for _, _, sc in answers], axis=1)
        # best score first, then the lower position over all shards (= shard, then position in
        # it): the order of one index; padding (-1, -inf) last
        tie = np.where(positions >= 0, positions, np.iinfo(np.int64).max)
        order = np.lexsort((tie, -scores), axis=1)[:, :int(k)]
        rows = np.arange(len(query_keys))[:, None]
        return Neighbours(query_keys, self.slot_keys, positions[rows, order],
                          scores[rows, order].astype(np.float32))

    # -- updates ------------------------------------------------------------------------------
    def add(self, keys: Sequence[str], aggregated: Aggregated) -> None:
        """Add images to the last shard (where one index would append them); ``save`` writes it."""
        keys = [str(k) for k in keys]
        present = [k for k in keys if k in self._shard_of]
        if present:
            raise ValueError(f"add: {present[0]!r} is already in the index (remove it first)")
        last = self.n_shards - 1
        vectors, words, images = aggregated
        self._call("add", keys, (np.asarray(vectors), np.asarray(words), np.asarray(images)), shards=[last])
        self._slot_keys[last] = self._slot_keys[last] + keys
        self._shard_of.update((k, last) for k in keys)
        self._idf_current = False

    def remove(self, keys: Union[str, Sequence[str]], missing_ok: bool = False) -> int:
        """Remove images from the shards holding them (see ``InvertedFile.remove``)."""
        keys = [keys] if isinstance(keys, str) else list(keys)
        missing = [k for k in keys if k not in self._shard_of]
        if missing and not missing_ok:
            raise KeyError(f"{missing[0]!r} is not in the index")
        by_shard: Dict[int, List[str]] = {}
        for key in dict.fromkeys(k for k in keys if k in self._shard_of):
            by_shard.setdefault(self._shard_of.pop(key), []).append(key)
        for s, shard_keys in by_shard.items():
            self._call("remove", shard_keys, shards=[s])
        self._idf_current = self._idf_current and not by_shard
        return sum(len(v) for v in by_shard.values())

    def save(self) -> None:
        """Write the shards that changed (each atomically, in place)."""
        self._call("save")

    # -- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        for server in self.__dict__.pop("_servers", []):
            self._ray.kill(server)
        session = self.__dict__.pop("_session", None)
        if session is not None:
            session.__exit__(None, None, None)

    def __enter__(self) -> "ShardedIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ShardedIndex({len(self)} images in {self.n_shards} shards at {self.path})"
