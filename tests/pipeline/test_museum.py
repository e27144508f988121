"""The demo museum: deterministic, Met-format, promised counts, queries showing their exhibit."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from how_met.pipeline import demo, museum, photos
from how_met.pipeline.museum import build_demo_museum, museum_is_built
from how_met.pipeline.settings import QUICK_SIZE

TINY = {"n_exhibits": 4, "n_queries": 5, "n_distractors": 2}


@pytest.fixture(scope="module")
def quick_museum(tmp_path_factory) -> Path:
    return build_demo_museum(tmp_path_factory.mktemp("demo") / "museum", seed=0, **QUICK_SIZE)


def _pixels_digest(museum: Path) -> dict:
    digests = {}
    for path in sorted((museum / "images").rglob("*.jpg")):
        with Image.open(path) as img:
            digests[path.relative_to(museum).as_posix()] = hashlib.sha1(
                np.asarray(img.convert("RGB")).tobytes()).hexdigest()
    return digests


def test_same_seed_same_museum_other_seed_other_museum(tmp_path):
    first = build_demo_museum(tmp_path / "a", seed=3, **TINY)
    second = build_demo_museum(tmp_path / "b", seed=3, **TINY)
    for name in ("database.json", "queries.json", museum.MANIFEST_NAME):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    assert _pixels_digest(first) == _pixels_digest(second)
    assert museum_is_built(first, seed=3, **TINY)
    assert not museum_is_built(first, seed=4, **TINY)
    assert not museum_is_built(first, seed=3, **QUICK_SIZE)
    assert not museum_is_built(tmp_path / "nowhere", seed=3, **TINY)
    # Rebuilding in place with another seed replaces the museum with other pictures and
    # leaves no temporary folder behind.
    build_demo_museum(first, seed=4, **TINY)
    assert museum_is_built(first, seed=4, **TINY)
    assert _pixels_digest(first) != _pixels_digest(second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_quick_museum_is_met_format_with_promised_counts(quick_museum):
    database = json.loads((quick_museum / "database.json").read_text())
    queries = json.loads((quick_museum / "queries.json").read_text())
    classes = {entry["id"] for entry in database}
    assert classes == set(range(QUICK_SIZE["n_exhibits"]))
    assert all(set(entry) == {"id", "path"} for entry in database)
    assert QUICK_SIZE["n_exhibits"] <= len(database) <= 2 * QUICK_SIZE["n_exhibits"]
    met = [q for q in queries if "MET_id" in q]
    distractors = [q for q in queries if "MET_id" not in q]
    assert len(met) == QUICK_SIZE["n_queries"] and len(distractors) == QUICK_SIZE["n_distractors"]
    assert all(set(q) == {"path"} for q in distractors)
    assert {q["MET_id"] for q in met} <= classes
    # Every exhibit is queried (n_queries >= n_exhibits); no exhibit twice more than another.
    per_class = np.bincount([q["MET_id"] for q in met], minlength=len(classes))
    assert per_class.min() >= 1 and per_class.max() - per_class.min() <= 1
    paths = [entry["path"] for entry in database] + [q["path"] for q in queries]
    assert len(set(paths)) == len(paths)
    for path in paths:
        with Image.open(quick_museum / "images" / path) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            if path.startswith("db/"):
                assert max(img.size) <= museum.DB_MAX_SIDE and min(img.size) >= 100
            else:
                assert max(img.size) == photos.QUERY_LONG_SIDE
    # File names say nothing about the answer.
    assert all(Path(q["path"]).stem.isdigit() for q in queries)


def test_distractors_and_exhibits_are_different_pictures(quick_museum):
    manifest = json.loads((quick_museum / museum.MANIFEST_NAME).read_text())
    exhibits = {(e["source"], e["cell"]) for e in manifest["exhibits"]}
    for record in manifest["queries"]:
        picture = (record["source"], record["cell"])
        if record["MET_id"] is None:
            assert picture not in exhibits
        else:
            exhibit = manifest["exhibits"][record["MET_id"]]
            assert (exhibit["source"], exhibit["cell"]) == picture
    # Crops of one photograph never overlap.
    boxes = {}
    for exhibit in manifest["exhibits"]:
        boxes.setdefault(exhibit["source"], []).append(exhibit["box"])
    for source_boxes in boxes.values():
        for i, (t1, l1, b1, r1) in enumerate(source_boxes):
            for t2, l2, b2, r2 in source_boxes[i + 1:]:
                assert min(b1, b2) <= max(t1, t2) or min(r1, r2) <= max(l1, l2)


def _colour_histogram(path: Path, centre: bool) -> np.ndarray:
    with Image.open(path) as img:
        img = img.convert("RGB")
        if centre:  # the artwork is in the middle of a visitor's photo
            w, h = img.size
            img = img.crop((int(w * 0.3), int(h * 0.3), int(w * 0.7), int(h * 0.7)))
        levels = np.asarray(img.resize((48, 48))).astype(np.int64) * 6 // 256
    counts = np.bincount((levels[..., 0] * 36 + levels[..., 1] * 6 + levels[..., 2]).ravel(),
                         minlength=216).astype(np.float64)
    return np.sqrt(counts / counts.sum())  # Hellinger: cosine of square roots


def test_a_visitor_photo_resembles_its_exhibit(quick_museum):
    database = json.loads((quick_museum / "database.json").read_text())
    queries = json.loads((quick_museum / "queries.json").read_text())
    exhibit_image = {}
    for entry in database:
        exhibit_image.setdefault(entry["id"], entry["path"])
    labels = sorted(exhibit_image)
    exhibits = np.stack([_colour_histogram(quick_museum / "images" / exhibit_image[label], False)
                         for label in labels])
    ranks = []
    for query in queries:
        if "MET_id" not in query:
            continue
        similarity = exhibits @ _colour_histogram(quick_museum / "images" / query["path"], True)
        ranks.append(int(np.sum(similarity > similarity[labels.index(query["MET_id"])])))
    ranks = np.array(ranks)
    # Chance would put the exhibit first 1 time in 12 and in the top 3 a quarter of the time.
    assert np.mean(ranks == 0) >= 0.5, ranks
    assert np.mean(ranks < 3) >= 0.75, ranks


def test_loads_as_a_met_directory(quick_museum):
    from how_met import datasets
    dataset = datasets.load_directory(quick_museum)
    assert dataset.n_classes == QUICK_SIZE["n_exhibits"]
    assert dataset.n_distractors == QUICK_SIZE["n_distractors"]


def test_size_limits_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="n_exhibits=999 must be between 1 and"):
        build_demo_museum(tmp_path / "m", n_exhibits=999)
    with pytest.raises(ValueError, match="n_distractors=999"):
        build_demo_museum(tmp_path / "m", n_distractors=999)
    assert not (tmp_path / "m").exists()


def test_work_dir_of_another_museum_is_refused(tmp_path):
    work = tmp_path / "work"
    stamp = {"data": None, "seed": 0, "quick": True}
    demo.check_work_dir(work, stamp)               # new directory: fine
    work.mkdir()
    (work / "demo.json").write_text(json.dumps(stamp))
    demo.check_work_dir(work, stamp)               # same museum: resume
    with pytest.raises(ValueError, match="holds a demo run on another museum"):
        demo.check_work_dir(work, {**stamp, "seed": 1})
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a how-met demo work directory"):
        demo.check_work_dir(other, stamp)


def test_demo_command_wiring(tmp_path, monkeypatch, capsys):
    """``how-met demo`` builds the museum once, hands it to run_evaluation, prints the table,
    writes the report; a stand-in run_evaluation keeps this fast (the real one runs in
    test_demo.py)."""
    from how_met import cli
    from how_met.pipeline import evaluate, settings

    calls = []

    def run_evaluation(data_dir, work_dir, settings=None, cv=None, **options):
        calls.append((Path(data_dir), Path(work_dir), settings, cv))
        database = json.loads((Path(data_dir) / "database.json").read_text())
        queries = json.loads((Path(data_dir) / "queries.json").read_text())
        predictions = [{"query": q["path"], "label": q.get("MET_id", -1), "pred": 0,
                        "conf": 0.5, "correct": q.get("MET_id") == 0,
                        "top": [{"key": database[0]["path"], "label": 0, "score": 0.9}]}
                       for q in queries]
        (Path(work_dir) / "predictions").mkdir(exist_ok=True)
        (Path(work_dir) / "predictions" / "global.json").write_text(json.dumps(predictions))
        results = {"dataset": {"name": "demo", "image_root": str(Path(data_dir) / "images"),
                               "n_db": len(database), "n_queries": len(queries),
                               "n_distractors": 2, "n_classes": 4},
                   "settings": settings, "protocol": "2-fold cross-tuning",
                   "methods": {"global": {"GAP": 12.5, "GAP-": 20.0, "ACC": 25.0, "K": 1,
                                          "t": 10, "extract_images_per_s": 5.0,
                                          "query_ms_per_image": 0.1, "index_mb": 0.01}},
                   "tuning": {}}
        (Path(work_dir) / "results.json").write_text(json.dumps(results))
        return results

    monkeypatch.setattr(evaluate, "run_evaluation", run_evaluation)
    monkeypatch.setattr(evaluate, "format_table", lambda results: "| method | GAP |\n| global | 12.5 |")
    monkeypatch.setattr(settings, "QUICK_SETTINGS", {"quick": True})
    monkeypatch.setattr(settings, "DEFAULT_SETTINGS", {"quick": False})
    monkeypatch.setattr(demo, "QUICK_SIZE", TINY)

    parser = cli.build_parser()

    def run_cli(args):
        return args.run(args)
    work = tmp_path / "demo-work"
    assert run_cli(parser.parse_args(["demo", "--quick", "--work", str(work)])) == 0
    printed = capsys.readouterr().out
    assert "building a museum" in printed and "| global | 12.5 |" in printed
    assert calls == [(work / "museum", work, {"quick": True}, 2)]
    assert (work / "report" / "index.html").is_file()
    assert f"report written to {work / 'report' / 'index.html'}" in printed

    assert run_cli(parser.parse_args(["demo", "--quick", "--work", str(work)])) == 0
    assert "reusing the museum" in capsys.readouterr().out
    with pytest.raises(ValueError, match="holds a demo run on another museum"):
        run_cli(parser.parse_args(["demo", "--quick", "--seed", "1", "--work", str(work)]))

    # --data: any Met-format directory, evaluated in place with the demo settings.
    other_work = tmp_path / "data-work"
    assert run_cli(parser.parse_args(["demo", "--data", str(work / "museum"),
                                           "--work", str(other_work)])) == 0
    assert calls[-1] == ((work / "museum").resolve(), other_work, {"quick": False}, 2)
    assert not (other_work / "museum").exists()
    with pytest.raises(FileNotFoundError, match="not a Met-format directory"):
        run_cli(parser.parse_args(["demo", "--data", str(tmp_path), "--work", str(other_work)]))
