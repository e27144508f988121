"""Hostile files and options: every one is refused with one line naming the file, memory stays
bounded, nothing crashes (issue 10). Inputs are tiny and made here; no network is built."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from how_met.asmk.codebook import Codebook
from how_met.asmk.inverted_file import InvertedFile
from how_met.features.store import FeatureStore, FeatureStoreError, LocalFeatures

REPO = Path(__file__).resolve().parents[1]


def _features(rng, n=6, dim=8):
    return LocalFeatures(rng.normal(size=(n, dim)).astype(np.float32), rng.random(n).astype(np.float32),
                         rng.integers(0, 9, (n, 2)).astype(np.int16), np.ones(n, np.float32),
                         (64, 48), (64, 48), rng.normal(size=4).astype(np.float32))


def _one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text and text
    return text


@pytest.fixture()
def small_index(tmp_path):
    """A saved 4-image, 8-word binary index (random codes) and the index object."""
    rng = np.random.default_rng(0)
    ivf = InvertedFile(8, dim=64)
    words = np.array([0, 1, 2, 1, 3, 4, 5, 6, 7, 0])
    images = np.array([0, 0, 1, 1, 2, 2, 2, 3, 3, 3])
    ivf.add(["a", "b", "c", "d"], rng.integers(0, 2 ** 63, (10, 1), dtype=np.uint64), words, images)
    path = ivf.save(tmp_path / "index")
    return path, ivf


def _tamper_npy(path: Path, name: str, fn):
    arr = np.load(path / f"{name}.npy").copy()
    arr = fn(arr)
    np.save(path / f"{name}.npy", arr, allow_pickle=False)


# -- item 1: an inverted file's arrays are validated at every load ---------------------------------

@pytest.mark.parametrize("case", ["id_out_of_range", "id_equals_n", "offsets_not_monotone",
                                  "offsets_out_of_range", "counts_disagree", "duplicate_keys"])
def test_tampered_index_arrays_are_refused(small_index, case):
    path, _ = small_index
    if case == "id_out_of_range":  # counts still add up: only a range check catches it
        _tamper_npy(path, "image_ids", lambda a: np.where(a == 1, np.uint32(3_000_000_000), a))
    elif case == "id_equals_n":
        _tamper_npy(path, "image_ids", lambda a: np.where(a == 3, np.uint32(4), a))
    elif case == "offsets_not_monotone":
        _tamper_npy(path, "offsets", lambda a: np.concatenate([[0, 5, 2], a[3:]]).astype(np.int64))
    elif case == "offsets_out_of_range":
        _tamper_npy(path, "offsets", lambda a: np.concatenate([a[:-2], [10 ** 9, a[-1]]]).astype(np.int64))
    elif case == "counts_disagree":
        _tamper_npy(path, "image_ids", lambda a: np.where(a == 1, np.uint32(0), a))
    else:
        (path / "keys.json").write_text(json.dumps(["a", "b", "a", "d"]))
    with pytest.raises(ValueError) as exc:
        InvertedFile.load(path)
    assert str(path) in _one_line(exc)


@pytest.mark.parametrize("field,value", [("n_words", "8"), ("arrays", []), ("alpha", float("nan")),
                                         ("tau", 5.0), ("n_images", True), ("binary", "yes")])
def test_tampered_index_metadata_is_refused(small_index, field, value):
    path, _ = small_index
    meta = json.loads((path / "meta.json").read_text())
    meta[field] = value
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError) as exc:
        InvertedFile.load(path)
    assert field in _one_line(exc)


def test_query_cli_on_a_tampered_index_prints_one_line(small_index, tmp_path):
    """Before: exit 139 (SIGSEGV) with nothing printed."""
    path, _ = small_index
    _tamper_npy(path, "image_ids", lambda a: np.where(a == 1, np.uint32(3_000_000_000), a))
    cb = Codebook.from_centroids(np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32))
    cb.save(tmp_path / "cb.npz")
    store = tmp_path / "q.h5"
    with FeatureStore(store, "a") as s:
        s.write("q.jpg", _features(np.random.default_rng(1), dim=64))
    run = subprocess.run([sys.executable, "-m", "how_met.cli", "query", "--index", str(path),
                          "--codebook", str(tmp_path / "cb.npz"), "--features", str(store),
                          "--out", str(tmp_path / "r.json")], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 1, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "image ids" in lines[0], run.stderr


def test_interrupted_index_save_is_recovered(small_index):
    """A crash between the two renames of a directory save left no index at the target."""
    path, ivf = small_index
    old = path.with_name(f".{path.name}.999999.old")
    tmp = path.with_name(f".{path.name}.999998.tmp")
    ivf.save(tmp.with_name("fresh"))
    os.replace(path, old)                       # the first rename happened ...
    os.replace(tmp.with_name("fresh"), tmp)     # ... the second did not
    back = InvertedFile.load(path)
    assert back.keys == ivf.keys and not old.exists() and not tmp.exists()




def test_temporaries_of_dead_processes_are_removed(tmp_path):
    """A killed save left .<name>.<pid>.tmp behind for good; a live writer's is kept."""
    from how_met.utils import write_json
    dead = tmp_path / ".r.json.999999.tmp"
    live = tmp_path / ".r.json.1.tmp"  # pid 1 always runs
    dead.write_text("x")
    live.write_text("y")
    write_json(tmp_path / "r.json", {"a": 1})
    assert not dead.exists() and live.exists()
