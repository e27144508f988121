"""Model fingerprints: every store, codebook and index records the model that made its descriptors,
and every consumer refuses to mix two models -- the trap of extracting database and queries in two
calls, each learning its own PCA-whitening (museum ASMK top-1 falls to chance, silently)."""
import copy
import json
import shutil

import pytest
import torch

from conftest import TEST_CONFIG
from how_met.asmk.codebook import Codebook
from how_met.asmk.indexing import build_index
from how_met.asmk.query import query_store
from how_met.cli import main
from how_met.features.checkpoints import load_model, save_model
from how_met.features.extract import extract_to_store, model_of_store
from how_met.features.network import model_fingerprint
from how_met.features.settings import ModelMismatchError
from how_met.features.store import FeatureStore, FeatureStoreError
from how_met.neighbours import Neighbours
from how_met.verify.reranker import Reranker
from how_met.verify.scores import score_shortlist

N_PAIRS = 4        # query photos of database paintings
N_OTHERS = 4       # database paintings nobody photographed


@pytest.fixture(scope="module")
def trap(tmp_path_factory, museum_dir, museum_pairs):
    """Database extracted once; its query photos extracted twice: in a second call that learns
    its own whitening (the trap), and ``like`` the database store (the right way)."""
    pairs, by_class = museum_pairs
    pairs = pairs[:N_PAIRS]
    targets = sorted({db for _, db in pairs})
    others = [p for p in sorted(by_class.values()) if p not in targets][:N_OTHERS]
    tmp = tmp_path_factory.mktemp("fingerprint")
    images = museum_dir / "images"
    queries = [q for q, _ in pairs]
    extract_to_store(images, targets + others, tmp / "db" / "db.h5", config=TEST_CONFIG, workers=0)
    extract_to_store(images, queries, tmp / "own.h5", config=TEST_CONFIG, workers=0)
    extract_to_store(images, queries, tmp / "like.h5", like=tmp / "db" / "db.h5", workers=0)
    codebook = Codebook(size=64, seed=0).train(tmp / "db" / "db.h5", show_progress=False)
    codebook.save(tmp / "cb.npz")
    Codebook(size=64, seed=0).train(tmp / "own.h5", show_progress=False).save(tmp / "cb-own.npz")
    build_index(tmp / "db" / "db.h5", tmp / "cb.npz", show_progress=False).save(tmp / "index")
    return {"tmp": tmp, "pairs": pairs, "db": tmp / "db" / "db.h5", "own": tmp / "own.h5",
            "like": tmp / "like.h5", "cb": tmp / "cb.npz", "cb_own": tmp / "cb-own.npz",
            "index": tmp / "index"}


def test_fingerprint_follows_the_weights_and_survives_files(whitened_model, tmp_path):
    fingerprint = model_fingerprint(whitened_model)
    assert len(fingerprint) == 16 and fingerprint == model_fingerprint(whitened_model)
    other = copy.deepcopy(whitened_model)
    with torch.no_grad():
        other.dim_reduction.bias.add_(1e-3)  # another whitening of the same backbone
    assert model_fingerprint(other) != fingerprint
    save_model(whitened_model, tmp_path / "model.pt")
    assert model_fingerprint(load_model(str(tmp_path / "model.pt"))) == fingerprint
    payload = torch.load(tmp_path / "model.pt", weights_only=True)
    payload["state_dict"]["dim_reduction.bias"] += 1.0  # edited weights, stale fingerprint
    torch.save(payload, tmp_path / "edited.pt")
    with pytest.raises(RuntimeError, match="edited.pt: weights do not match the model fingerprint"):
        load_model(str(tmp_path / "edited.pt"))


def test_every_file_records_the_model(trap):
    model, config, model_file = model_of_store(trap["db"])
    fingerprint = model_fingerprint(model)
    assert model_file == trap["tmp"] / "db" / "db.model.pt"  # saved beside the store
    assert config["features_num"] == TEST_CONFIG["features_num"]
    with FeatureStore(trap["like"]) as like, FeatureStore(trap["own"]) as own:
        assert like.model_fingerprint == fingerprint and like.model_file == model_file
        assert own.model_fingerprint not in (None, fingerprint)
    assert Codebook.load(trap["cb"]).model_fingerprint == fingerprint
    meta = json.loads((trap["index"] / "meta.json").read_text())
    assert meta["model_fingerprint"] == fingerprint
    with pytest.raises(FeatureStoreError, match="like.h5: holds descriptors of model"):
        extract_to_store(trap["tmp"], [], trap["like"], config=TEST_CONFIG,
                         model=load_model(str(trap["tmp"] / "own.model.pt")))


def _one_line(error, *names):
    message = str(error.value)
    assert "\n" not in message
    for name in names:
        assert str(name) in message, (name, message)


def test_two_whitenings_are_refused_by_every_consumer(trap):
    with pytest.raises(ModelMismatchError) as error:
        query_store(trap["index"], trap["cb"], trap["own"], show_progress=False)
    _one_line(error, trap["own"], trap["index"])
    with pytest.raises(ModelMismatchError) as error:
        build_index(trap["db"], trap["cb_own"], show_progress=False)
    _one_line(error, trap["db"], trap["cb_own"])
    with Reranker(trap["db"], trap["cb"]) as reranker:
        shortlist = query_store(trap["index"], trap["cb"], trap["like"], k=3, show_progress=False)
        with pytest.raises(ModelMismatchError) as error:
            score_shortlist(reranker, trap["own"], shortlist, show_progress=False)
    _one_line(error, trap["own"], trap["db"])
    with pytest.raises(ModelMismatchError):
        Reranker(trap["own"], trap["cb"])


def test_queries_extracted_like_the_database_find_their_paintings(trap):
    result = query_store(trap["index"], trap["cb"], trap["like"], k=3, show_progress=False)
    right = sum(result.top(q)[0][0] == db for q, db in trap["pairs"])
    assert right >= N_PAIRS - 1, right


def test_cli_refuses_mixed_files_with_one_line(trap, tmp_path, capsys, museum_dir):
    assert main(["query", "--index", str(trap["index"]), "--codebook", str(trap["cb"]),
                 "--features", str(trap["own"]), "--out", str(tmp_path / "r.json")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(trap["own"]) in err and str(trap["index"]) in err, err
    assert main(["index", "--features", str(trap["db"]), "--codebook", str(trap["cb_own"]),
                 "--out", str(tmp_path / "index")]) == 1
    err = capsys.readouterr().err.strip()
    assert str(trap["cb_own"]) in err and "different models" in err, err
    # the README's way: queries --like the database store, into a folder that does not exist yet
    photos = tmp_path / "photos"
    photos.mkdir()
    query, painting = trap["pairs"][0]
    shutil.copyfile(museum_dir / "images" / query, photos / "visitor.jpg")
    out = tmp_path / "new" / "dir" / "q.h5"
    assert main(["extract", "--images", str(photos), "--like", str(trap["db"]), "--out", str(out),
                 "--workers", "0"]) == 0
    assert main(["query", "--index", str(trap["index"]), "--codebook", str(trap["cb"]),
                 "--features", str(out), "--out", str(tmp_path / "r.json"), "-k", "1"]) == 0
    assert Neighbours.load(tmp_path / "r.json").top("visitor.jpg")[0][0] == painting
