"""Dataset loaders: the Met layout (generated fixture), directory datasets, error messages."""
import json
import logging
import shutil

import numpy as np
import pytest

from how_met.datasets import load_dataset, load_directory, load_met
from met_fixture import write_met_fixture


@pytest.fixture(scope="module")
def met_fixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("met")
    return write_met_fixture(root, n_classes=4, images_per_class=2, queries_per_class=2,
                             n_db_only_classes=2, distractors_per_split=2, size=64)


def test_met_layout_loads(met_fixture):
    root = met_fixture["root"]
    assert (root / "images" / "MET").is_dir() and (root / "MET_database.json").is_file()
    data = load_met(root)
    assert data.image_root == root / "images"
    assert len(data.db_keys) == met_fixture["db_images"] == 12
    assert data.n_classes == 6
    assert all(key.startswith("MET/") and key.endswith(".jpg") for key in data.db_keys)
    assert sorted(data.query_splits) == ["test", "val"]
    keys, labels, positions = data.split("val")
    assert len(keys) == met_fixture["val_queries"] == 6
    assert int((labels == -1).sum()) == met_fixture["val_distractors"] == 2
    assert all(data.image_path(k).is_file() for k in data.all_keys())
    assert set(data.query_labels[data.query_labels >= 0]) <= set(data.db_labels)
    assert data.db_labels.dtype == np.int64 and data.query_labels.dtype == np.int64
    # Distractors live under test_other / test_noart and carry label -1.
    for key, label in zip(data.query_keys, data.query_labels):
        assert (label == -1) == (not key.startswith("test_met/"))

    test_only = load_met(root, split="test")
    assert len(test_only.query_keys) == met_fixture["test_queries"] and list(test_only.query_splits) == ["test"]
    mini = load_met(root, mini=True)
    assert len(mini.db_keys) == met_fixture["mini_db_images"] < len(data.db_keys)
    assert set(data.query_labels[data.query_labels >= 0]) <= set(mini.db_labels)
    assert load_dataset(root).summary() == data.summary()


def test_met_layout_without_images_level_and_with_ground_truth_dir(tmp_path):
    info = write_met_fixture(tmp_path, n_classes=2, images_per_class=1, n_db_only_classes=0,
                             distractors_per_split=1, size=48, images_level=False, ground_truth_dir=True)
    assert (tmp_path / "MET").is_dir() and (tmp_path / "ground_truth" / "valset.json").is_file()
    data = load_met(tmp_path)
    assert data.image_root == tmp_path
    assert len(data.db_keys) == info["db_images"] == 2
    assert all(data.image_path(k).is_file() for k in data.all_keys())
    assert load_dataset(tmp_path).image_root == tmp_path


def test_real_museum(museum_dir):
    data = load_directory(museum_dir)
    assert (len(data.db_keys), len(data.query_keys), data.n_distractors) == (231, 164, 18)
    assert data.n_classes == 231 and not data.has_splits
    assert data.image_root == museum_dir / "images"
    assert data.db_keys[0] == "db/bbdd_00000.jpg"


def test_real_landmarks(landmarks_dir):
    data = load_dataset(landmarks_dir)
    assert (len(data.db_keys), len(data.query_keys), data.n_distractors) == (9, 30, 15)
    assert data.n_classes == 5


def write_dir(path, database, queries=None, images=True):
    path.mkdir(parents=True, exist_ok=True)
    (path / "database.json").write_text(database if isinstance(database, str) else json.dumps(database))
    if queries is not None:
        (path / "queries.json").write_text(queries if isinstance(queries, str) else json.dumps(queries))
    if images:
        entries = []
        for listed in (database, queries or []):
            try:
                listed = json.loads(listed) if isinstance(listed, str) else listed
            except ValueError:  # a deliberately malformed file: no images to make
                continue
            entries += listed if isinstance(listed, list) else []
        for entry in entries:
            if isinstance(entry, dict) and isinstance(entry.get("path"), str) and ".." not in entry["path"]:
                target = path / "images" / entry["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(b"\xff\xd8")
    return path


GOOD_DB = [{"id": 1, "path": "db/a.jpg"}, {"id": 2, "path": "db/b.jpg"}]
GOOD_Q = [{"path": "q/x.jpg", "MET_id": 1}, {"path": "q/y.jpg"}]


def one_line_error(exc_info, *fragments):
    message = str(exc_info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_directory_with_val_and_test(tmp_path):
    path = write_dir(tmp_path / "d", GOOD_DB)
    for name, entries in (("val", GOOD_Q), ("test", [{"path": "q/z.jpg", "MET_id": 2}])):
        (path / f"{name}.json").write_text(json.dumps(entries))
        for e in entries:
            (path / "images" / e["path"]).parent.mkdir(parents=True, exist_ok=True)
            (path / "images" / e["path"]).write_bytes(b"")
    data = load_directory(path)
    assert data.query_keys == ["q/x.jpg", "q/y.jpg", "q/z.jpg"]
    assert data.query_labels.tolist() == [1, -1, 2]
    assert data.query_splits["val"].tolist() == [0, 1] and data.query_splits["test"].tolist() == [2]


@pytest.mark.parametrize("database, queries, fragments", [
    ("[{\"id\": 1, \"path\": \"db/a.jpg\"", GOOD_Q, ["database.json", "malformed JSON", "line 1"]),
    ({"id": 1}, GOOD_Q, ["database.json", "JSON array"]),
    ([{"id": 1, "path": "db/a.jpg"}, 5], GOOD_Q, ["database.json", "entry 1", "object"]),
    ([{"id": 1, "path": "db/a.jpg"}, {"path": "db/b.jpg"}], GOOD_Q, ["database.json", "entry 1", "\"id\""]),
    ([{"id": "one", "path": "db/a.jpg"}], GOOD_Q, ["database.json", "entry 0", "integer"]),
    ([{"id": -3, "path": "db/a.jpg"}], GOOD_Q, ["database.json", "entry 0", ">= 0"]),
    ([{"id": 1}], GOOD_Q, ["database.json", "entry 0", "\"path\""]),
    ([{"id": 1, "path": "../a.jpg"}], GOOD_Q, ["database.json", "entry 0", "relative"]),
    (GOOD_DB + [{"id": 3, "path": "db/a.jpg"}], GOOD_Q, ["database.json", "entry 2", "entry 0"]),
    ([], GOOD_Q, ["database.json", "no images"]),
    (GOOD_DB, [{"path": "q/x.jpg", "MET_id": True}], ["queries.json", "entry 0", "MET_id"]),
    (GOOD_DB, "[1, 2,]", ["queries.json", "malformed JSON"]),
])
def test_malformed_files_give_one_line_errors(tmp_path, database, queries, fragments):
    path = write_dir(tmp_path / "d", database, queries)
    with pytest.raises(ValueError) as exc_info:
        load_directory(path)
    one_line_error(exc_info, *fragments)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError) as exc_info:
        load_directory(tmp_path)
    one_line_error(exc_info, "database.json", "not found")
    path = write_dir(tmp_path / "d", GOOD_DB)
    with pytest.raises(FileNotFoundError) as exc_info:
        load_directory(path)
    one_line_error(exc_info, "queries.json")
    (path / "val.json").write_text(json.dumps(GOOD_Q))
    with pytest.raises(FileNotFoundError) as exc_info:
        load_directory(path)
    one_line_error(exc_info, "test.json")
    with pytest.raises(FileNotFoundError) as exc_info:
        load_met(tmp_path)
    one_line_error(exc_info, "MET_database.json", "ground_truth")


def test_met_missing_query_file(tmp_path):
    write_met_fixture(tmp_path, n_classes=2, images_per_class=1, n_db_only_classes=0,
                      distractors_per_split=1, size=48)
    (tmp_path / "testset.json").unlink()
    with pytest.raises(FileNotFoundError) as exc_info:
        load_met(tmp_path)
    one_line_error(exc_info, "testset.json")
    assert len(load_met(tmp_path, split="val").query_keys) == 3


def test_missing_images_fail_or_skip(tmp_path, caplog):
    db = [{"id": i % 3, "path": f"db/{i}.jpg"} for i in range(10)]
    queries = [{"path": f"q/{i}.jpg", "MET_id": i % 3} for i in range(6)]
    path = write_dir(tmp_path / "d", db, queries)
    for name in ("db/2.jpg", "db/7.jpg", "q/4.jpg"):
        (path / "images" / name).unlink()
    with pytest.raises(FileNotFoundError) as exc_info:
        load_directory(path)
    one_line_error(exc_info, "3 of 16", "database.json: 2", "queries.json: 1", "db/2.jpg", "q/4.jpg",
                   "skip_missing")
    with caplog.at_level(logging.WARNING, logger="how_met.datasets"):
        data = load_directory(path, skip_missing=True)
    assert "skipping 3 missing images" in caplog.text
    assert len(data.db_keys) == 8 and "db/7.jpg" not in data.db_keys
    assert len(data.query_keys) == 5 and "q/4.jpg" not in data.query_keys
    assert data.db_labels.tolist() == [0, 1, 0, 1, 2, 0, 2, 0]
    shutil.rmtree(path / "images")
    with pytest.raises(FileNotFoundError) as exc_info:
        load_directory(path)
    one_line_error(exc_info, "16 of 16")
    assert len(load_directory(path, check_images=False).db_keys) == 10
