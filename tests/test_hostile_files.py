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

from how_met.asmk.aggregation import Aggregated
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
    ivf.add(["a", "b", "c", "d"], Aggregated(rng.integers(0, 2 ** 63, (10, 1), dtype=np.uint64), words, images))
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





# -- item 6: dataset names do not collide with image folders ----------------------------------------

def test_image_folder_named_like_a_dataset(tmp_path):
    rng = np.random.default_rng(0)
    keys = ["descriptors/1.jpg", "art/descriptors/2.jpg", "art/strengths/global/3.jpg"]
    with FeatureStore(tmp_path / "s.h5", "a") as store:
        for key in keys:
            store.write(key, _features(rng))
    with FeatureStore(tmp_path / "s.h5") as store:
        assert store.keys() == sorted(keys)
        assert "art" not in store
        assert all(len(store.descriptors(k)) == 6 for k in keys)


# -- items 8, 9, 12: hostile stores -------------------------------------------------------------------

def _store_with(tmp_path, name, make):
    path = tmp_path / f"{name}.h5"
    with FeatureStore(path, "a") as store:
        store.write("ok.jpg", _features(np.random.default_rng(0)))
    with h5py.File(path, "a") as f:
        grp = f.create_group("bad.jpg")
        grp.attrs["image_size"] = [64, 48]
        grp.attrs["input_size"] = [64, 48]
        for other in ("strengths", "scales"):
            grp.create_dataset(other, data=np.ones(6, np.float32))
        grp.create_dataset("locations", data=np.zeros((6, 2), np.int16))
        make(grp, f)
    return path


@pytest.mark.parametrize("case", ["external", "nan", "soft_link", "external_link", "huge_rows"])
def test_hostile_store_datasets_are_refused(tmp_path, case):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(os.urandom(6 * 8 * 4))
    makers = {
        "external": lambda g, f: g.create_dataset("descriptors", (6, 8), np.float32,
                                                  external=[(str(secret), 0, 6 * 8 * 4)]),
        "nan": lambda g, f: g.create_dataset("descriptors", data=np.full((6, 8), np.nan, np.float32)),
        "soft_link": lambda g, f: g.__setitem__("descriptors", h5py.SoftLink("/ok.jpg/descriptors")),
        "external_link": lambda g, f: g.__setitem__("descriptors", h5py.ExternalLink(str(secret), "/x")),
        "huge_rows": lambda g, f: g.create_dataset("descriptors", (1_000_000, 128), np.float32),
    }
    path = _store_with(tmp_path, case, makers[case])
    with FeatureStore(path) as store:
        if case in ("soft_link", "external_link"):  # never listed as an image
            assert store.keys() == ["ok.jpg"]
            return
        with pytest.raises(FeatureStoreError) as exc:
            store.descriptors("bad.jpg")
        assert str(path) in _one_line(exc)


def test_foreign_and_empty_hdf5_are_refused(tmp_path):
    from how_met.asmk.indexing import build_index
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(FeatureStoreError, match="not a how-met feature store"):
        FeatureStore(foreign)
    empty = tmp_path / "empty.h5"
    with FeatureStore(empty, "a") as store:
        store.set_config({"dim": 8})
    cb = Codebook.from_centroids(np.eye(8, dtype=np.float32))
    with pytest.raises(ValueError, match="no image features"):
        build_index(empty, cb, tmp_path / "index")


def test_nan_descriptors_are_not_written(tmp_path):
    feats = _features(np.random.default_rng(0))
    feats.descriptors[2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        with FeatureStore(tmp_path / "s.h5", "a") as store:
            store.write("x.jpg", feats)


def test_concurrent_writer_is_refused_without_hdf5_locking(tmp_path, monkeypatch):
    from how_met.utils import LockedError
    monkeypatch.setenv("HDF5_USE_FILE_LOCKING", "FALSE")
    with FeatureStore(tmp_path / "s.h5", "a") as first:
        first.write("a.jpg", _features(np.random.default_rng(0)))
        with pytest.raises(LockedError, match="another how-met process"):
            FeatureStore(tmp_path / "s.h5", "a")
    with FeatureStore(tmp_path / "s.h5", "a") as again:  # released on close
        assert again.keys() == ["a.jpg"]


def test_codebook_archives(tmp_path):
    cb = Codebook.from_centroids(np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32))
    good = cb.save(tmp_path / "cb.npz")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(ValueError) as exc:
        Codebook.load(truncated)
    assert str(truncated) in _one_line(exc)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, centroids=np.array([{"x": 1}], dtype=object), meta_json=np.array("{}"))
    with pytest.raises(ValueError, match="object"):
        Codebook.load(pickled)


# -- item 8: memory stays bounded against declared sizes -------------------------------------------

def test_size_bombs_stay_in_bounded_memory(tmp_path):
    """Small files declaring huge arrays are refused before anything that size is allocated."""
    import zipfile
    # a codebook whose .npy header declares 2M x 128 float32 (1 GB) in a ~1 MB archive
    header = {"descr": "<f4", "fortran_order": False, "shape": (2_000_000, 128)}
    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w") as zf:
        with zf.open("centroids.npy", "w") as fh:
            np.lib.format.write_array_header_1_0(fh, header)
            fh.write(b"\0" * 1_000_000)
        with zf.open("meta_json.npy", "w") as fh:
            np.save(fh, np.array("{}"))
    # a feature store whose image claims 1M rows (unallocated storage reads as zeros)
    store = tmp_path / "rows.h5"
    _store_with(tmp_path, "rows", lambda g, f: g.create_dataset("descriptors", (1_000_000, 128), np.float32)
                ).rename(store)
    # an index whose offsets declare 100M words
    rng = np.random.default_rng(0)
    ivf = InvertedFile(4, dim=64)
    ivf.add(["a"], Aggregated(rng.integers(0, 2 ** 63, (2, 1), dtype=np.uint64), np.array([0, 1]), np.array([0, 0])))
    index = ivf.save(tmp_path / "index")
    meta = json.loads((index / "meta.json").read_text())
    meta["n_words"] = 100_000_000
    meta["arrays"]["offsets"]["shape"] = [100_000_001]
    (index / "meta.json").write_text(json.dumps(meta))
    with open(index / "offsets.npy", "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": "<i8", "fortran_order": False,
                                                  "shape": (100_000_001,)})
        fh.write(b"\0" * 1000)
    script = textwrap.dedent(f"""
        import resource, sys
        from how_met.asmk.codebook import Codebook
        from how_met.asmk.inverted_file import InvertedFile
        from how_met.features.store import FeatureStore
        def rss_mb():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        base = rss_mb()
        refused = 0
        for attempt in (lambda: Codebook.load({str(bomb)!r}),
                        lambda: FeatureStore({str(store)!r}).descriptors("bad.jpg"),
                        lambda: InvertedFile.load({str(index)!r}, mmap=False)):
            try:
                attempt()
            except (ValueError, RuntimeError) as exc:
                assert "\\n" not in str(exc)
                refused += 1
        print(refused, rss_mb() - base)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr
    refused, growth = run.stdout.split()
    assert int(refused) == 3
    assert float(growth) < 150, f"RSS grew by {growth} MB"  # the bombs declare 0.5-1 GB each


@pytest.mark.parametrize("option,value,message", [
    ("scales", [40.0], "scale"), ("scales", [float("inf")], "scale"), ("scales", [1.0] * 30, "scales"),
    ("image_size", -1, "image_size"), ("features_num", 0, "features_num"),
    ("features_num", -5, "features_num")])
def test_hostile_extraction_options_are_refused(option, value, message):
    """--scales 40 took 18 GB and 272 s; -1 / 0 were silently accepted."""
    from how_met.features.settings import check_extraction_config, default_config
    config = {**default_config(), option: value}
    with pytest.raises(ValueError, match=message):
        check_extraction_config(config, "test")


# -- item 9: one root rule for image paths -----------------------------------------------------------

@pytest.mark.parametrize("entry", ["../outside.jpg", "/etc/passwd", "a/../../b.jpg", {"nopath": 1}])
def test_query_image_lists_follow_the_root_rule(tmp_path, entry):
    from how_met.pipeline.query import read_image_list
    (tmp_path / "images").mkdir()
    listing = tmp_path / "queries.json"
    listing.write_text(json.dumps([entry]))
    with pytest.raises(ValueError) as exc:
        read_image_list(listing)
    assert str(listing) in _one_line(exc)


def test_symlink_out_of_the_image_root_is_refused(tmp_path):
    from PIL import Image
    from how_met.features.images import ImageError, image_file
    outside = tmp_path / "outside.jpg"
    Image.new("RGB", (8, 8)).save(outside)
    root = tmp_path / "root"
    root.mkdir()
    (root / "link.jpg").symlink_to(outside)
    Image.new("RGB", (8, 8)).save(root / "inside.jpg")
    assert image_file(root, "inside.jpg") == (root / "inside.jpg").resolve()
    with pytest.raises(ImageError, match="outside the image root"):
        image_file(root, "link.jpg")


# -- items 7, 12: decompression bombs and big photos -------------------------------------------------

def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header declares width x height (no real pixel data)."""
    import struct
    import zlib
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data)))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


@pytest.mark.parametrize("width,height", [(14000, 12000), (20000, 20000)])
def test_decompression_bomb_message_names_size_and_limit(tmp_path, width, height):
    from how_met.features.images import MAX_PIXELS, ImageError, load_image
    path = tmp_path / "bomb.png"
    _png_header_only(path, width, height)
    with pytest.raises(ImageError) as exc:
        load_image(path, 500)
    text = _one_line(exc)
    assert f"{width * height}" in text.replace(",", "") or f"{width}x{height}" in text
    assert f"{MAX_PIXELS}" in text.replace(",", "")


def test_report_thumbnail_of_a_bomb_is_a_placeholder(tmp_path):
    from how_met.pipeline.thumbnails import Thumbnails
    _png_header_only(tmp_path / "bomb.png", 20000, 20000)
    thumbs = Thumbnails(tmp_path, tmp_path / "report")
    src, _, _ = thumbs.get("bomb.png")
    assert src.endswith("missing.png") and thumbs.missing == ["bomb.png"]


def test_big_camera_photo_is_decoded_in_bounded_memory(tmp_path):
    """A genuine 108 Mpx JPEG was refused (PIL's 89.5 Mpx warning escalated); it is decoded at
    reduced resolution (JPEG draft) and kept."""
    script = textwrap.dedent(f"""
        import resource
        from PIL import Image
        Image.MAX_IMAGE_PIXELS = None
        Image.new("L", (12000, 9000), 128).save({str(tmp_path / 'big.jpg')!r}, quality=50)
    """)
    subprocess.run([sys.executable, "-c", script], check=True)
    script = textwrap.dedent(f"""
        import resource
        from how_met.features.images import load_image
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        arr, original = load_image({str(tmp_path / 'big.jpg')!r}, 500)
        print(arr.shape[1], arr.shape[0], original[0], original[1],
              resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr
    width, height, ow, oh, growth = run.stdout.split()
    assert (int(width), int(height), int(ow), int(oh)) == (500, 375, 12000, 9000)
    assert float(growth) < 200, f"decoding grew RSS by {growth} MB (full decode: 324 MB)"


# -- item 12: one line instead of a traceback ------------------------------------------------------

def test_class_id_beyond_int64_is_one_line(tmp_path):
    from how_met.datasets import load_directory
    (tmp_path / "images").mkdir()
    (tmp_path / "database.json").write_text('[{"id": 9223372036854775808, "path": "a.jpg"}]')
    (tmp_path / "queries.json").write_text("[]")
    with pytest.raises(ValueError) as exc:
        load_directory(tmp_path, check_images=False)
    assert "database.json" in _one_line(exc)


def test_checkpoint_config_with_an_unknown_key_is_one_line(tmp_path):
    import torch
    from how_met.features.checkpoints import CHECKPOINT_FORMAT, load_model
    path = tmp_path / "model.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "config": json.dumps({"backbone": "x", "evil": 1}),
                "state_dict": {}}, path)
    with pytest.raises(RuntimeError) as exc:
        load_model(str(path))
    assert "evil" in _one_line(exc)


def test_checkpoint_url_cache_is_keyed_by_url(tmp_path, monkeypatch):
    """Two URLs ending in the same file name used to share one cached file."""
    import hashlib
    import urllib.request
    from how_met.features import checkpoints as network
    served = {"https://a.example/m/model.pt": b"first", "https://b.example/m/model.pt": b"second"}
    monkeypatch.setattr(urllib.request, "urlretrieve",
                        lambda url, target: Path(target).write_bytes(served[url]))
    monkeypatch.setenv("HOW_MET_CACHE", str(tmp_path / "cache"))
    first = network.cached_download("https://a.example/m/model.pt")
    second = network.cached_download("https://b.example/m/model.pt")
    assert first.read_bytes() == b"first" and second.read_bytes() == b"second"
    digest = hashlib.sha256(b"second").hexdigest()
    assert network.cached_download(f"https://b.example/m/model.pt#sha256={digest}") == second
    with pytest.raises(RuntimeError, match="sha256"):
        network.cached_download(f"https://a.example/m/model.pt#sha256={digest}")


def test_temporaries_of_dead_processes_are_removed(tmp_path):
    """A killed save left .<name>.<pid>.tmp behind for good; a live writer's is kept."""
    from how_met.utils import write_json
    dead = tmp_path / ".r.json.999999.tmp"
    live = tmp_path / ".r.json.1.tmp"  # pid 1 always runs
    dead.write_text("x")
    live.write_text("y")
    write_json(tmp_path / "r.json", {"a": 1})
    assert not dead.exists() and live.exists()
