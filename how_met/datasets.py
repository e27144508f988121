"""Datasets of the Met protocol (SPEC section 1): a database of labelled images and queries.

Two layouts are read:

- The official Met ground truth (``load_met``): ``MET_database.json`` or
  ``mini_MET_database.json`` (``{"id": class, "path": "MET/<id>/<n>.jpg"}``) and
  ``valset.json`` / ``testset.json`` (``{"path": "test_met/...jpg", "MET_id": class, ...}``;
  distractors carry no ``MET_id``), in ``root`` or ``root/ground_truth``.
- Any directory in the same format (``load_directory``): ``database.json`` plus either
  ``queries.json`` (one query set) or ``val.json`` + ``test.json``.

Image paths are relative to an image root, which is ``<root>/images`` when the listed images
are found there, else ``<root>`` itself. The key of an image (in the Dataset and in the
feature store) is that relative path.

Errors are one line naming the file: FileNotFoundError for a missing file or missing images,
ValueError for malformed JSON or entries. Missing images are all counted before failing; with
``skip_missing=True`` they are dropped and their count is logged instead.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

logger = logging.getLogger("how_met.datasets")

DISTRACTOR = -1
_MISSING_SHOWN = 5  # missing images named in the error message


@dataclass
class Dataset:
    """A recognition dataset.

    ``query_labels`` holds -1 for distractors. ``query_splits`` maps a split name ("val",
    "test") to sorted positions in the query arrays; empty when the dataset has a single
    query set (tune by cross-validation then).
    """

    name: str
    image_root: Path
    db_keys: List[str]
    db_labels: np.ndarray
    query_keys: List[str]
    query_labels: np.ndarray
    query_splits: Dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        """Number of distinct database classes (the n of the kNN confidence)."""
        return int(len(np.unique(self.db_labels)))

    @property
    def n_distractors(self) -> int:
        return int(np.count_nonzero(self.query_labels == DISTRACTOR))

    @property
    def has_splits(self) -> bool:
        return bool(self.query_splits)

    def image_path(self, key: str) -> Path:
        return self.image_root / key

    def all_keys(self) -> List[str]:
        """Database keys then query keys, each image once (for feature extraction)."""
        seen = set()
        out = []
        for key in list(self.db_keys) + list(self.query_keys):
            if key not in seen:
                seen.add(key)
                out.append(key)
        return out

    def split(self, name: str) -> Tuple[List[str], np.ndarray, np.ndarray]:
        """``(keys, labels, positions)`` of one query split ("all" gives every query)."""
        if name == "all":
            positions = np.arange(len(self.query_keys))
        elif name in self.query_splits:
            positions = self.query_splits[name]
        else:
            raise KeyError(f"dataset {self.name!r} has no query split {name!r} "
                           f"(splits: {sorted(self.query_splits) or 'none'})")
        return [self.query_keys[i] for i in positions], self.query_labels[positions], positions

    def without(self, keys: Sequence[str]) -> "Dataset":
        """This dataset with the images ``keys`` dropped (database entries and queries)."""
        drop = set(keys)
        db = [i for i, k in enumerate(self.db_keys) if k not in drop]
        kept = np.array([k not in drop for k in self.query_keys], bool)
        new_position = np.cumsum(kept) - 1
        splits = {name: new_position[positions[kept[positions]]] for name, positions in self.query_splits.items()}
        return Dataset(self.name, self.image_root, [self.db_keys[i] for i in db], self.db_labels[db],
                       [k for k, keep in zip(self.query_keys, kept) if keep], self.query_labels[kept], splits)

    def identity(self) -> Dict[str, str]:
        """Hashes of what results depend on besides the settings: the database list (keys and
        labels), the query list (keys, labels, splits) and the image files (size and
        modification time of each; one stat per image). A work directory records them."""
        import hashlib

        def digest(*parts) -> str:
            h = hashlib.sha256()
            for part in parts:
                h.update(json.dumps(part, sort_keys=True).encode())
            return h.hexdigest()[:16]

        files = []
        for key in self.all_keys():
            try:
                st = os.stat(self.image_root / key)
                files.append((key, st.st_size, st.st_mtime_ns))
            except OSError:
                files.append((key, None, None))
        return {"database list": digest(list(self.db_keys), self.db_labels.tolist()),
                "query list": digest(list(self.query_keys), self.query_labels.tolist(),
                                     {k: v.tolist() for k, v in self.query_splits.items()}),
                "image files": digest(files)}

    def summary(self) -> dict:
        out = {"name": self.name, "image_root": str(self.image_root),
               "db_images": len(self.db_keys), "db_classes": self.n_classes,
               "queries": len(self.query_keys), "distractors": self.n_distractors}
        for name, positions in self.query_splits.items():
            out[f"{name}_queries"] = int(len(positions))
            out[f"{name}_distractors"] = int(np.count_nonzero(self.query_labels[positions] == DISTRACTOR))
        return out


# -- reading the ground-truth files -----------------------------------------------------------------

def read_entries(path: Path) -> list:
    """The entries of a JSON list of images (one-line errors for a missing, non-UTF-8, malformed
    or non-list file)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: ground-truth file not found")
    try:
        with open(path, "rb") as fh:
            entries = json.loads(fh.read().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: malformed JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON array of entries, found a JSON {type(entries).__name__}")
    return entries


def relative_key(where: str, image: str) -> str:
    """``image`` as a key relative to an image root, the one rule for every list of images
    (ground truth, query lists, the extractor): no absolute path, drive letter or '..'."""
    image = image.strip()
    if image.startswith(("/", "\\")) or (len(image) > 1 and image[1] == ":") or \
            ".." in image.replace("\\", "/").split("/"):
        raise ValueError(f"{where} path {image!r} must be relative to the image root, without '..'")
    if "//" in image or image.startswith("./") or "/./" in image or image.endswith("/"):
        image = str(PurePosixPath(image))  # "./a//b.jpg" -> "a/b.jpg" (rare; skipped for speed)
    return image


def entry_path(path: Path, i: int, entry, plain_strings: bool = False) -> str:
    """The image key of entry ``i`` of a JSON list: ``{"path": ...}`` (or a plain string)."""
    image = entry.get("path") if isinstance(entry, dict) else entry
    if not isinstance(entry, dict) and not (plain_strings and isinstance(entry, str)):
        raise ValueError(f"{path}: entry {i} is a JSON {type(entry).__name__}, expected an object")
    if not isinstance(image, str) or not image.strip():
        raise ValueError(f"{path}: entry {i} has no \"path\" string")
    return relative_key(f"{path}: entry {i}", image)


def _class_id(path: Path, i: int, entry: dict, field_name: str, required: bool) -> int:
    value = entry.get(field_name)
    if value is None:
        if required:
            raise ValueError(f"{path}: entry {i} has no \"{field_name}\" class id")
        return DISTRACTOR
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{path}: entry {i} \"{field_name}\" is {value!r}, expected an integer class id")
    if isinstance(value, str):
        if not value.strip().isdigit():
            raise ValueError(f"{path}: entry {i} \"{field_name}\" is {value!r}, expected an integer class id")
        value = int(value)
    if value < 0:
        raise ValueError(f"{path}: entry {i} \"{field_name}\" is {value}, class ids must be >= 0")
    if value >= 2 ** 63:  # stored as int64
        raise ValueError(f"{path}: entry {i} \"{field_name}\" is {value}, class ids must be < 2**63")
    return int(value)


def _read_labelled(path, field_name: str, required: bool) -> Tuple[List[str], np.ndarray]:
    """Entries with a unique "path" and a class id in ``field_name`` -> (keys, labels int64)."""
    path = Path(path)
    keys, labels, first_seen = [], [], {}
    for i, entry in enumerate(read_entries(path)):
        key = entry_path(path, i, entry)
        if key in first_seen:
            raise ValueError(f"{path}: entry {i} repeats the path {key!r} of entry {first_seen[key]}")
        first_seen[key] = i
        keys.append(key)
        labels.append(_class_id(path, i, entry, field_name, required=required))
    return keys, np.asarray(labels, np.int64)


def read_database(path) -> Tuple[List[str], np.ndarray]:
    """Database entries ``{"id", "path"}`` -> (keys, labels int64)."""
    keys, labels = _read_labelled(path, "id", required=True)
    if not keys:
        raise ValueError(f"{Path(path)}: the database lists no images")
    return keys, labels


def read_queries(path) -> Tuple[List[str], np.ndarray]:
    """Query entries ``{"path", "MET_id"?}`` -> (keys, labels int64, -1 for distractors)."""
    return _read_labelled(path, "MET_id", required=False)


# -- images ---------------------------------------------------------------------------------------------

def find_image_root(root: Path, keys: Sequence[str], probe: int = 20) -> Path:
    """``root/images`` if listed images are found there, else ``root`` if they are found
    there, else whichever of the two exists as a directory (``root/images`` first)."""
    candidates = [root / "images", root]
    for key in keys[:probe]:
        for candidate in candidates:
            if (candidate / key).is_file():
                return candidate
    return candidates[0] if candidates[0].is_dir() else candidates[1]


def _missing_images(image_root: Path, keys: Sequence[str]) -> np.ndarray:
    """Bool mask of keys whose file does not exist (one stat per image)."""
    return np.fromiter((not os.path.isfile(image_root / key) for key in keys), dtype=bool, count=len(keys))


def _resolve_missing(image_root: Path, parts: Sequence[Tuple[str, List[str], np.ndarray]],
                     skip_missing: bool) -> List[Tuple[List[str], np.ndarray, np.ndarray]]:
    """For every (file name, keys, labels) part: check all images, then fail or drop.

    Returns per part (keys, labels, kept positions)."""
    masks = [_missing_images(image_root, keys) for _, keys, _ in parts]
    n_missing = int(sum(m.sum() for m in masks))
    if n_missing and not skip_missing:
        n_total = sum(len(keys) for _, keys, _ in parts)
        per_file = ", ".join(f"{name}: {int(m.sum())}" for (name, _, _), m in zip(parts, masks) if m.any())
        examples = [key for (_, keys, _), m in zip(parts, masks) for key in np.asarray(keys, object)[m]]
        shown = ", ".join(examples[:_MISSING_SHOWN]) + (", ..." if n_missing > _MISSING_SHOWN else "")
        raise FileNotFoundError(f"{image_root}: {n_missing} of {n_total} listed images are missing ({per_file}; "
                                f"first: {shown}); pass skip_missing=True (--skip-missing) to skip them")
    if n_missing:
        logger.warning("%s: skipping %d missing images (%s)", image_root, n_missing,
                       ", ".join(f"{name}: {int(m.sum())}" for (name, _, _), m in zip(parts, masks) if m.any()))
    out = []
    for (_, keys, labels), mask in zip(parts, masks):
        kept = np.flatnonzero(~mask)
        out.append(([keys[i] for i in kept], labels[kept], kept))
    return out


def _assemble(name: str, root: Path, image_root: Optional[Path], database: Tuple[str, List[str], np.ndarray],
              query_sets: Sequence[Tuple[str, str, List[str], np.ndarray]], check_images: bool,
              skip_missing: bool) -> Dataset:
    """Build a Dataset from the database and named query sets (split, file, keys, labels)."""
    db_file, db_keys, db_labels = database
    if image_root is None:
        image_root = find_image_root(root, db_keys + [k for q in query_sets for k in q[2][:5]])
    image_root = Path(image_root)
    parts = [(db_file, db_keys, db_labels)] + [(file, keys, labels) for _, file, keys, labels in query_sets]
    if check_images:
        resolved = _resolve_missing(image_root, parts, skip_missing)
    else:
        resolved = [(keys, labels, np.arange(len(keys))) for _, keys, labels in parts]
    db_keys, db_labels, _ = resolved[0]
    if not db_keys:
        raise FileNotFoundError(f"{image_root}: none of the database images listed in {db_file} exist")
    query_keys: List[str] = []
    query_labels = []
    splits: Dict[str, np.ndarray] = {}
    for (split, file, _, _), (keys, labels, _) in zip(query_sets, resolved[1:]):
        if split:
            splits[split] = np.arange(len(query_keys), len(query_keys) + len(keys))
        query_keys += keys
        query_labels.append(labels)
    query_labels = np.concatenate(query_labels) if query_labels else np.zeros(0, np.int64)
    unknown = (query_labels != DISTRACTOR) & ~np.isin(query_labels, db_labels)
    if unknown.any():
        logger.warning("%s: %d non-distractor queries belong to classes without a database image "
                       "(they can never be recognised)", name, int(unknown.sum()))
    return Dataset(name=name, image_root=image_root, db_keys=db_keys, db_labels=db_labels,
                   query_keys=query_keys, query_labels=query_labels.astype(np.int64), query_splits=splits)


def _ground_truth_dir(root: Path, first_file: str) -> Path:
    for candidate in (root, root / "ground_truth"):
        if (candidate / first_file).is_file():
            return candidate
    raise FileNotFoundError(f"{root / first_file}: ground-truth file not found (looked in {root} and {root / 'ground_truth'})")


def load_met(root, mini: bool = False, split: str = "all", image_root=None, check_images: bool = True,
             skip_missing: bool = False) -> Dataset:
    """The Met dataset at ``root`` (ground truth in ``root`` or ``root/ground_truth``).

    ``split``: "all" (default: val queries then test queries, with ``query_splits`` "val" and
    "test"), "val" or "test" (only that query set). ``mini`` reads mini_MET_database.json.
    ``image_root`` overrides the detection of ``root/images`` vs ``root``.
    """
    root = Path(root)
    if split not in ("all", "val", "test"):
        raise ValueError(f"split must be 'all', 'val' or 'test', got {split!r}")
    db_name = "mini_MET_database.json" if mini else "MET_database.json"
    gt_dir = _ground_truth_dir(root, db_name)
    db_keys, db_labels = read_database(gt_dir / db_name)
    query_sets = []
    for name, file in (("val", "valset.json"), ("test", "testset.json")):
        if split in ("all", name):
            keys, labels = read_queries(gt_dir / file)
            query_sets.append((name, file, keys, labels))
    return _assemble("met-mini" if mini else "met", root, image_root, (db_name, db_keys, db_labels),
                     query_sets, check_images, skip_missing)


def load_directory(directory, image_root=None, check_images: bool = True, skip_missing: bool = False) -> Dataset:
    """A directory with ``database.json`` and ``queries.json`` (one query set, no splits) or
    ``val.json`` + ``test.json`` (splits "val" and "test"), images under ``images/`` (or the
    directory itself)."""
    directory = Path(directory)
    db_keys, db_labels = read_database(directory / "database.json")
    if (directory / "queries.json").is_file():
        keys, labels = read_queries(directory / "queries.json")
        query_sets = [("", "queries.json", keys, labels)]
    elif (directory / "val.json").is_file() or (directory / "test.json").is_file():
        query_sets = []
        for name in ("val", "test"):
            keys, labels = read_queries(directory / f"{name}.json")  # raises naming a missing half
            query_sets.append((name, f"{name}.json", keys, labels))
    else:
        raise FileNotFoundError(f"{directory / 'queries.json'}: query file not found (nor val.json + test.json)")
    return _assemble(directory.resolve().name, directory, image_root, ("database.json", db_keys, db_labels),
                     query_sets, check_images, skip_missing)


def load_dataset(path, mini: bool = False, **kwargs) -> Dataset:
    """``load_met`` when ``path`` holds the Met ground truth (directly or in ground_truth/),
    else ``load_directory``."""
    path = Path(path)
    db_name = "mini_MET_database.json" if mini else "MET_database.json"
    if (path / db_name).is_file() or (path / "ground_truth" / db_name).is_file():
        return load_met(path, mini=mini, **kwargs)
    if mini:
        raise FileNotFoundError(f"{path / db_name}: ground-truth file not found (--mini needs the Met files)")
    return load_directory(path, **kwargs)
