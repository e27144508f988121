"""The `how-met` command line: extract over a folder, shards + merge, whiten, clear errors."""
import json
import shutil

import numpy as np
import pytest

from how_met.cli import main
from how_met.features.store import FeatureStore


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory, museum_dir):
    root = tmp_path_factory.mktemp("photos")
    db = json.loads((museum_dir / "database.json").read_text())
    for entry in db[:4]:
        shutil.copy(museum_dir / "images" / entry["path"], root / entry["path"].split("/")[-1])
    return root


FAST = ["--image-size", "256", "--scales", "1", "--features-num", "150", "--workers", "0"]


def test_whiten_then_extract_shards_and_merge(tmp_path, photo_dir, capsys):
    model = tmp_path / "model.pt"
    assert main(["whiten", "--images", str(photo_dir), "--out", str(model), *FAST]) == 0
    for i in range(2):
        assert main(["extract", "--images", str(photo_dir), "-o", str(tmp_path / f"s{i}.h5"),
                     "--checkpoint", str(model), "--shard", f"{i}/2", "--float16", *FAST]) == 0
    assert main(["merge", str(tmp_path / "all.h5"), str(tmp_path / "s0.h5"), str(tmp_path / "s1.h5")]) == 0
    with FeatureStore(tmp_path / "all.h5") as store:
        assert len(store) == 4
        assert store.config["features_num"] == 150 and store.config["scales"] == [1.0]
        assert store._file[store.keys()[0]]["descriptors"].dtype == np.float16
    # Extracting again skips everything already stored.
    capsys.readouterr()
    assert main(["extract", "--images", str(photo_dir), "-o", str(tmp_path / "s0.h5"),
                 "--checkpoint", str(model), "--shard", "0/2", "--float16", *FAST]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["extracted"] == 0 and stats["skipped_existing"] == 2


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["extract", "--images", str(tmp_path / "nope"), "-o", str(tmp_path / "f.h5")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope: not a directory" in err
    assert main(["extract", "--images", str(tmp_path), "-o", str(tmp_path / "f.h5"),
                 "--shard", "3/2"]) == 1
    assert "--shard 3/2" in capsys.readouterr().err
    (tmp_path / "bad.h5").write_text("not hdf5")
    assert main(["codebook", "--features", str(tmp_path / "bad.h5"), "--size", "8",
                 "--out", str(tmp_path / "c.npz")]) == 1
    assert "bad.h5" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["query", "--index", "i", "--codebook", "c", "--features", "f", "--out", "o", "-k", "-1"],
     "argument -k: expected an integer >= 1, got -1"),  # was "negative dimensions are not allowed"
    (["index", "--features", "f", "--codebook", "c", "--out", "o", "--batch-size", "0"],
     "argument --batch-size: expected an integer >= 1, got 0"),  # was "range() arg 3 must not be zero"
    (["codebook", "--features", "f", "--size", "0"], "argument --size: expected an integer >= 1, got 0"),
    (["evaluate", "--data", "d", "--work", "w", "--cv", "1"], "argument --cv: expected an integer >= 2, got 1"),
    (["extract", "--images", "d", "-o", "o", "--workers", "x"], "argument --workers: expected an integer, got 'x'"),
])
def test_counts_out_of_range_are_refused_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_codebook_size_zero_is_refused_not_taken_as_the_default(tmp_path):
    from how_met.asmk.codebook import train_codebook
    with pytest.raises(ValueError, match="size must be >= 1, got 0"):
        train_codebook(tmp_path / "never-opened.h5", size=0)


def test_extract_names_the_missing_images_and_skip_missing_goes_on(tmp_path, museum_dir, capsys):
    db = json.loads((museum_dir / "database.json").read_text())[:3]
    for entry in db[1:]:
        target = tmp_path / "images" / entry["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(museum_dir / "images" / entry["path"], target)
    (tmp_path / "database.json").write_text(json.dumps(db))
    (tmp_path / "queries.json").write_text("[]")
    argv = ["extract", "--data", str(tmp_path), "--split", "database", "-o", str(tmp_path / "f.h5"), *FAST]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert db[0]["path"] in err and "--skip-missing" in err and not (tmp_path / "f.h5").exists()
    assert main([*argv, "--skip-missing"]) == 0
    with FeatureStore(tmp_path / "f.h5") as store:
        assert store.keys() == sorted(e["path"] for e in db[1:])


def test_commands_without_a_network_do_not_load_torch(tmp_path):
    """Building the parser, and running `how-met index`, import neither torch nor the
    extractor: each command imports only the stages it runs."""
    import subprocess
    import sys
    script = f"""
import sys
import numpy as np
from how_met import cli
cli.build_parser()
assert "torch" not in sys.modules, "build_parser loaded torch"
from how_met.asmk.codebook import Codebook
from how_met.features.store import FeatureStore, LocalFeatures
rng = np.random.default_rng(0)
with FeatureStore({str(tmp_path / "f.h5")!r}, "a") as store:
    for i in range(5):
        store.write(f"db/{{i}}.jpg", LocalFeatures(rng.normal(size=(40, 16)).astype(np.float32),
                    np.ones(40, np.float32), np.zeros((40, 2), np.int16), np.ones(40, np.float32),
                    (64, 64), (64, 64)))
Codebook.from_centroids(rng.normal(size=(8, 16))).save({str(tmp_path / "cb.npz")!r})
assert cli.main(["index", "--features", {str(tmp_path / "f.h5")!r}, "--codebook",
                 {str(tmp_path / "cb.npz")!r}, "--out", {str(tmp_path / "index")!r}]) == 0
assert "torch" not in sys.modules, "how-met index loaded torch"
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "index" / "meta.json").is_file()
