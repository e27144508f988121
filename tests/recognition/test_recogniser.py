"""The recogniser an evaluation writes: photos in, exhibits out, as evaluate predicted them; the
accept threshold; adding exhibits without a rebuild; refusing a directory whose files disagree;
building one without queries."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from how_met.cli import main
from how_met.features.settings import ModelMismatchError
from how_met.recognition.acceptance import acceptance_figures, choose_threshold
from how_met.recognition.recogniser import Recogniser, RecogniserError, build_recogniser, read_exhibits

N_PHOTOS = 10   # held-out photos identified (each costs one extraction and one verification)


def test_threshold_accepts_the_most_queries_that_keep_the_target_precision():
    # log-odds sorted: 9 (right), 8 (right), 7 (distractor), 6 (right), 5 (wrong), 4 (right)
    log_odds = [7, 9, 5, 8, 6, 4]
    labels = [-1, 1, 2, 3, 4, 5]
    predicted = [3, 1, 9, 3, 4, 5]
    # precision at each cut: 1, 1, 2/3, 3/4, 3/5, 4/6
    # halfway to the next lower log-odds (below the lowest: 0.5 under it)
    assert choose_threshold(log_odds, predicted, labels, 0.95) == 7.5
    assert choose_threshold(log_odds, predicted, labels, 0.75) == 5.5
    assert choose_threshold(log_odds, predicted, labels, 0.6) == 3.5
    # the boundary query asked again with float noise is still accepted (it sat on the threshold)
    noisy = np.array(log_odds, np.float64) - 1e-5
    assert acceptance_figures(noisy, predicted, labels, choose_threshold(log_odds, predicted, labels, 0.75)) \
        == acceptance_figures(log_odds, predicted, labels, 5.5)
    assert choose_threshold([1.0, 1.0], [1, 2], [1, 3], 0.95) == float("inf")  # a tie cannot be split
    figures = acceptance_figures(log_odds, predicted, labels, 6)
    assert figures == {"queries": 6, "positives": 5, "distractors": 1, "accepted": 4, "accepted_right": 3,
                       "precision": 0.75, "positives_right": 0.6, "distractors_rejected": 0.0}


@pytest.fixture(scope="module")
def identified(museum_evaluation, museum_dir):
    """The evaluation's recogniser and its answers for held-out photos of its first fold."""
    work, results = museum_evaluation
    recogniser = Recogniser(work / "recogniser")
    method = recogniser.settings["method"]
    rows = [r for r in json.loads((work / "predictions" / f"{method}.json").read_text()) if r["fold"] == 0]
    rows = [r for r in rows if r["label"] >= 0][:N_PHOTOS - 3] + [r for r in rows if r["label"] < 0][:3]
    answers = [recogniser.recognise(museum_dir / "images" / r["query"], name=r["query"]) for r in rows]
    yield work, results, recogniser, rows, answers
    recogniser.close()


@pytest.mark.slow
def test_identify_answers_as_the_evaluation_predicted(identified):
    work, results, recogniser, rows, answers = identified
    settings = recogniser.settings
    assert settings["method"] == results["recogniser"]["method"] and settings["tuned"]
    chosen = results["methods"][settings["method"]]["per_fold"][0]
    assert (settings["K"], settings["t"]) == (chosen["K"], chosen["t"])
    for row, answer in zip(rows, answers):
        assert answer.log_odds == pytest.approx(row["log_odds"], rel=1e-4, abs=1e-4), row["query"]
        assert answer.accepted == row["accepted"], row["query"]
        if answer.accepted:
            assert answer.exhibit == row["pred"]
        else:
            assert answer.exhibit is None
        assert len(answer.top) == 5 and answer.top[0]["exhibit"] == row["top"][0]["label"]
        assert {"exhibit", "image", "score", "global", "asmk", "inliers"} <= set(answer.top[0])
    # a right answer is backed by local evidence: verified correspondences with its painting
    right = [a for a, r in zip(answers, rows) if a.accepted and a.exhibit == r["label"]]
    assert right and all(a.top[0]["inliers"] >= 10 for a in right)


@pytest.mark.slow
def test_identify_cli_prints_one_json_object_per_photo(identified, museum_dir, capsys):
    work, _, _, rows, answers = identified
    photos = [str(museum_dir / "images" / r["query"]) for r in rows[:2]]
    missing = str(museum_dir / "images" / "no-such-photo.jpg")
    assert main(["identify", "--recogniser", str(work / "recogniser"), *photos, missing]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3  # the unreadable photo gets its line too, and the exit status says so
    assert json.loads(lines[2]) == {"image": missing, "error": f"{missing}: no such file"}
    for line, photo, answer in zip(lines, photos, answers):
        obj = json.loads(line)
        assert obj["image"] == photo and obj["accepted"] == answer.accepted and obj["exhibit"] == answer.exhibit
        assert obj["confidence"] == pytest.approx(answer.confidence)
        assert [t["image"] for t in obj["top"]] == [t["image"] for t in answer.top]


@pytest.mark.slow
def test_exhibits_are_added_without_rebuilding(identified, museum_dir, tmp_path):
    work, _, _, rows, _ = identified
    copy = tmp_path / "recogniser"
    shutil.copytree(work / "recogniser", copy)
    distractor = next(r for r in rows if r["label"] < 0)["query"]  # a painting not in the museum
    with Recogniser(copy) as recogniser:
        before = recogniser.recognise(museum_dir / "images" / distractor)
        n, codebook = len(recogniser), recogniser.codebook.fingerprint
        assert recogniser.add_exhibits(museum_dir / "images", [distractor], ["new-painting"]) == 1
        assert len(recogniser) == n + 1 and len(recogniser.index) == n + 1
        after = recogniser.recognise(museum_dir / "images" / distractor)
        assert recogniser.codebook.fingerprint == codebook
    assert before.top[0]["exhibit"] != "new-painting"
    assert after.top[0]["image"] == distractor and after.top[0]["exhibit"] == "new-painting"
    assert after.accepted and after.exhibit == "new-painting"
    keys, ids = read_exhibits(copy / "exhibits.json")
    assert keys[-1] == distractor and ids[-1] == "new-painting" and len(keys) == n + 1
    with Recogniser(copy) as again:  # the change is on disk
        assert len(again) == n + 1
        with pytest.raises(RecogniserError, match="already in"):
            again.add_exhibits(museum_dir / "images", [distractor], ["other"])


@pytest.mark.slow
def test_a_recogniser_with_another_model_is_refused(identified, whitened_model, tmp_path):
    from how_met.features.checkpoints import save_model
    work = identified[0]
    copy = tmp_path / "recogniser"
    shutil.copytree(work / "recogniser", copy)
    save_model(whitened_model, copy / "model.pt")  # not the model its database was extracted with
    with pytest.raises(ModelMismatchError) as error:
        Recogniser(copy)
    message = str(error.value)
    assert "database.h5" in message and "model.pt" in message and "\n" not in message
    assert main(["identify", "--recogniser", str(copy), str(copy / "any.jpg")]) == 1
    (copy / "recogniser.json").unlink()
    with pytest.raises(RecogniserError, match="recogniser.json: missing"):
        Recogniser(copy)


@pytest.mark.slow
def test_a_collection_without_queries_gets_a_default_recogniser(tmp_path, museum_dir, museum_pairs):
    """``how-met recogniser --images FOLDER``: one subfolder per exhibit; visitor photos of two
    of its paintings are then identified as those exhibits."""
    from conftest import TEST_CONFIG
    pairs, by_class = museum_pairs
    collection = tmp_path / "collection"
    chosen = [by_class[c] for c in sorted(by_class)[:10]]
    wanted = [(q, db) for q, db in pairs if db in chosen][:2]
    for db in chosen + [db for _, db in wanted]:
        target = collection / f"exhibit-{db.split('/')[-1].split('.')[0]}" / "photo.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(museum_dir / "images" / db, target)
    out = build_recogniser(collection, *_folder(collection), tmp_path / "rec", config=TEST_CONFIG,
                           codebook_size=64)
    with Recogniser(out) as recogniser:
        assert not recogniser.settings["tuned"] and recogniser.settings["method"] == "global+rerank"
        for query, db in wanted:
            answer = recogniser.recognise(museum_dir / "images" / query)
            assert answer.top[0]["exhibit"] == f"exhibit-{db.split('/')[-1].split('.')[0]}", answer
            assert answer.top[0]["inliers"] > answer.top[1]["inliers"]


@pytest.mark.slow
def test_a_small_collection_gets_the_shipped_whitening_and_codebook(tmp_path, museum_dir, museum_pairs):
    """With the default extractor, a collection smaller than the shipped parts' corpus uses
    them, as ``evaluate`` does: its store has the shipped model's fingerprint, its codebook is
    the shipped one, and a visitor photo of one of its paintings is answered right."""
    from how_met.asmk.codebook import Codebook
    from how_met.features.settings import DEFAULT_SHIPPED, shipped_path
    from how_met.features.shipped import read_whitening
    from how_met.features.store import FeatureStore
    pairs, by_class = museum_pairs
    query, db = pairs[0]
    collection = tmp_path / "collection"
    for key in [db] + [by_class[c] for c in sorted(by_class)[:3]]:
        target = collection / Path(key).stem / "photo.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(museum_dir / "images" / key, target)
    out = build_recogniser(collection, *_folder(collection), tmp_path / "rec")
    with FeatureStore(tmp_path / "rec" / "database.h5") as store:
        assert store.model_fingerprint == read_whitening(DEFAULT_SHIPPED)[2]["model_fingerprint"]
    shipped = Codebook.load(shipped_path(DEFAULT_SHIPPED, "codebook"))
    assert Codebook.load(tmp_path / "rec" / "codebook.npz").fingerprint == shipped.fingerprint
    with Recogniser(out) as recogniser:
        assert recogniser.settings["unsupervised"] == DEFAULT_SHIPPED
        assert recogniser.recognise(museum_dir / "images" / query).top[0]["exhibit"] == Path(db).stem


def _folder(collection):
    from how_met.recognition.recogniser import exhibits_in_folder
    return exhibits_in_folder(collection)
