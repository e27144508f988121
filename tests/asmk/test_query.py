"""Query stage and Neighbours files: planted-match retrieval from feature stores, CLI, round trips."""
import json

import numpy as np
import pytest

from how_met.asmk.codebook import Codebook
from how_met.features.store import FeatureStore, LocalFeatures
from how_met.asmk.indexing import build_index
from how_met.neighbours import Neighbours
from how_met.asmk.query import query_descriptors, query_store
from how_met.pipeline.query import read_image_list

D = 32
CONFIG = {"model": {"backbone": "synthetic"}, "dim": D, "stride": 16}


def write_store(path, arrays, keys, config=CONFIG):
    with FeatureStore(path, "a") as store:
        store.set_config(config)
        for key, desc in zip(keys, arrays):
            n = len(desc)
            store.write(key, LocalFeatures(desc, np.ones(n, np.float32), np.zeros((n, 2), np.int16),
                                           np.ones(n, np.float32), (64, 64), (64, 64)))
    return path


@pytest.fixture(scope="module")
def museum(tmp_path_factory):
    """40 database images, 10 queries: 8 re-photograph a database image (planted: a noisy
    subset of its descriptors plus clutter), 2 show nothing from the database."""
    tmp = tmp_path_factory.mktemp("museum")
    rng = np.random.default_rng(0)
    n_words = 96
    centroids = (rng.normal(size=(n_words, D)) * 2).astype(np.float32)
    db = [(centroids[rng.integers(0, n_words, 60)] + 0.8 * rng.normal(size=(60, D))).astype(np.float32)
          for _ in range(40)]
    truth = {f"q/{i}.jpg": f"db/{3 * i}.jpg" for i in range(8)}
    queries = []
    for i in range(8):
        planted = db[3 * i][rng.choice(60, 35, replace=False)] + 0.3 * rng.normal(size=(35, D))
        clutter = centroids[rng.integers(0, n_words, 25)] + 0.8 * rng.normal(size=(25, D))
        queries.append(np.concatenate([planted, clutter]).astype(np.float32))
    for _ in range(2):
        queries.append((centroids[rng.integers(0, n_words, 60)] + 0.8 * rng.normal(size=(60, D))).astype(np.float32))
    q_keys = [f"q/{i}.jpg" for i in range(10)]
    cb = Codebook.from_centroids(centroids, meta={"extractor": CONFIG})
    cb_path = cb.save(tmp / "cb.npz")
    db_path = write_store(tmp / "db.h5", db, [f"db/{i}.jpg" for i in range(40)])
    q_path = write_store(tmp / "q.h5", queries, q_keys)
    index = tmp / "index"
    build_index(db_path, cb_path, show_progress=False).save(index)
    return {"tmp": tmp, "cb": cb_path, "db": db_path, "queries": q_path, "index": index, "truth": truth,
            "q_arrays": queries, "q_keys": q_keys}


def test_planted_matches_are_retrieved_first(museum):
    result = query_store(museum["index"], museum["cb"], museum["queries"], k=5, show_progress=False)
    assert result.query_keys == museum["q_keys"]
    for q, db in museum["truth"].items():
        top = result.top(q)
        assert top[0][0] == db and top[0][1] > 2 * top[1][1]
    # distractors match nothing nearly as well
    best_true = min(result.top(q)[0][1] for q in museum["truth"])
    assert all(result.top(q)[0][1] < 0.5 * best_true for q in museum["q_keys"][8:])


def test_batches_and_timings_do_not_change_results(museum):
    timings = {}
    whole = query_store(museum["index"], museum["cb"], museum["queries"], k=8, batch_size=100, show_progress=False)
    split = query_store(museum["index"], museum["cb"], museum["queries"], k=8, batch_size=3,
                        show_progress=False, timings=timings)
    np.testing.assert_array_equal(whole.indices, split.indices)
    np.testing.assert_allclose(whole.scores, split.scores)
    assert set(timings) == {"quantise", "aggregate", "search"}
    direct = query_descriptors(museum["index"], museum["cb"], museum["q_arrays"], museum["q_keys"], k=8)
    np.testing.assert_array_equal(direct.indices, whole.indices)

    # batches sized by memory: a budget below one image's descriptors makes every image a batch
    from how_met.asmk.query import batch_bytes_per_descriptor
    calls = []
    import how_met.asmk.query as query_module
    original = query_module.query_descriptors

    def counting(*args, **kwargs):
        calls.append(len(args[2]))
        return original(*args, **kwargs)

    query_module.query_descriptors = counting
    try:
        tiny = query_store(museum["index"], museum["cb"], museum["queries"], k=8, show_progress=False, batch_mb=1e-6)
        per_image = len(museum["q_arrays"][0]) * batch_bytes_per_descriptor(D, 5) / 2 ** 20
        two = query_store(museum["index"], museum["cb"], museum["queries"], k=8, show_progress=False,
                          batch_mb=2.5 * per_image)
    finally:
        query_module.query_descriptors = original
    n = len(museum["q_keys"])
    assert calls[:n] == [1] * n and max(calls[n:]) == 2  # the second: 2 images (of equal size) per batch
    np.testing.assert_array_equal(tiny.indices, whole.indices)
    np.testing.assert_array_equal(two.indices, whole.indices)
    with pytest.raises(ValueError, match="batch_mb"):
        query_store(museum["index"], museum["cb"], museum["queries"], batch_mb=0, show_progress=False)


def test_multiple_assignment_changes_scores_as_expected(museum):
    one = query_store(museum["index"], museum["cb"], museum["queries"], k=3, multiple_assignment=1,
                      show_progress=False)
    five = query_store(museum["index"], museum["cb"], museum["queries"], k=3, show_progress=False)
    assert not np.allclose(one.scores, five.scores)
    assert [one.top(q)[0][0] for q in museum["truth"]] == list(museum["truth"].values())


def test_cli_writes_json_and_h5(museum, capsys):
    from how_met.cli import main
    outs = []
    for name in ("results.json", "results.h5"):
        out = museum["tmp"] / name
        assert main(["query", "--index", str(museum["index"]), "--codebook", str(museum["cb"]),
                     "--features", str(museum["queries"]), "--out", str(out), "-k", "4"]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["queries"] == 10
        outs.append(Neighbours.load(out))
    a, b = outs
    assert a.query_keys == b.query_keys and a.db_keys == b.db_keys
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_allclose(a.scores, b.scores)
    for q, db in museum["truth"].items():
        assert a.top(q)[0][0] == db


def test_another_codebook_is_refused(museum, tmp_path):
    other = Codebook.from_centroids(Codebook.load(museum["cb"]).centroids * 1.5).save(tmp_path / "o.npz")
    with pytest.raises(ValueError, match="another codebook"):
        query_store(museum["index"], other, museum["queries"], show_progress=False)


def test_features_of_another_extractor_are_refused(museum, tmp_path):
    foreign = write_store(tmp_path / "foreign.h5", museum["q_arrays"][:2], ["a", "b"],
                          config={"model": {"backbone": "other"}, "dim": D, "stride": 16})
    with pytest.raises(ValueError, match="another extractor"):
        query_store(museum["index"], museum["cb"], foreign, show_progress=False)


def test_neighbours_round_trip_and_compaction(tmp_path):
    nb = Neighbours(["q1", "q2"], ["a", "b", "c", "d"], [[3, 1, -1], [-1, -1, -1]],
                    [[0.9, 0.5, -np.inf], [-np.inf] * 3])
    assert nb.top("q1") == [("d", pytest.approx(0.9)), ("b", pytest.approx(0.5))] and nb.top("q2") == []
    for name in ("n.json", "n.h5"):
        nb.save(tmp_path / name)
        back = Neighbours.load(tmp_path / name)
        assert back.db_keys == ["b", "d"]  # only referenced keys are stored
        assert back.top("q1") == nb.top("q1") and back.top("q2") == [] and back.k == 3
    with pytest.raises(KeyError):
        nb.top("zz")
    with pytest.raises(ValueError):
        Neighbours(["q"], ["a"], [[0, 1]], [[1.0, 0.5]])
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(ValueError, match="bad.json"):
        Neighbours.load(tmp_path / "bad.json")
    with pytest.raises(ValueError):
        nb.save(tmp_path / "n.txt")


def test_image_lists(tmp_path):
    (tmp_path / "images" / "x").mkdir(parents=True)
    for name in ("a.jpg", "b.png"):
        (tmp_path / "images" / "x" / name).write_bytes(b"")
    root, keys = read_image_list(tmp_path / "images")
    assert root == tmp_path / "images" and keys == ["x/a.jpg", "x/b.png"]
    (tmp_path / "q.json").write_text(json.dumps([{"path": "x/a.jpg", "MET_id": 3}, {"path": "x/b.png"}]))
    assert read_image_list(tmp_path / "q.json") == (tmp_path / "images", ["x/a.jpg", "x/b.png"])
    (tmp_path / "q.txt").write_text("x/b.png\n\n# comment\n")
    assert read_image_list(tmp_path / "q.txt")[1] == ["x/b.png"]


# -- real photos ------------------------------------------------------------------------------------

MUSEUM_QUERIES = 40         # positive queries searched (of 146)
MUSEUM_OTHER_PAINTINGS = 40  # database paintings besides the queries' own (CI time)
# Measured: 38/40 (0.95) with this setup (0.95 with all 231 paintings and 146 queries, codebook
# 512); the assertion leaves room for 4 more misses.
MUSEUM_MIN_TOP1 = 0.85


@pytest.mark.slow
def test_museum_true_painting_ranks_first(tmp_path_factory, museum_dir, museum_pairs, whitened_model):
    """Real gallery photos (../shared/data/museum): ASMK ranks the photographed painting first
    for most queries; the queries go through ``how-met query --images`` (photos -> ranking)."""
    from conftest import TEST_CONFIG
    from how_met.cli import main
    from how_met.features.extract import extract_to_store
    from how_met.features.checkpoints import save_model
    pairs, by_class = museum_pairs
    pairs = pairs[:MUSEUM_QUERIES]
    targets = sorted({db for _, db in pairs})
    others = [p for p in sorted(by_class.values()) if p not in targets][:MUSEUM_OTHER_PAINTINGS]
    tmp = tmp_path_factory.mktemp("museum_asmk")
    db_store = tmp / "db.h5"
    extract_to_store(museum_dir / "images", targets + others, db_store, config=TEST_CONFIG,
                     model=whitened_model, workers=0)
    codebook = Codebook(size=256, seed=0).train(db_store, show_progress=False)
    codebook.save(tmp / "cb.npz")
    build_index(db_store, codebook, show_progress=False).save(tmp / "index")
    # the model file carries the whitening; extraction settings come from what the index recorded
    save_model(whitened_model, tmp / "model.pt")
    (tmp / "queries.txt").write_text("\n".join(q for q, _ in pairs))
    assert main(["query", "--index", str(tmp / "index"), "--codebook", str(tmp / "cb.npz"),
                 "--images", str(tmp / "queries.txt"), "--image-root", str(museum_dir / "images"),
                 "--checkpoint", str(tmp / "model.pt"), "--workers", "0", "--out", str(tmp / "r.h5"),
                 "-k", "5", "--save-features", str(tmp / "q.h5")]) == 0
    result = Neighbours.load(tmp / "r.h5")
    top1 = np.mean([result.top(q)[0][0] == db for q, db in pairs])
    print(f"museum ASMK top-1 {top1:.3f}")
    assert top1 >= MUSEUM_MIN_TOP1, f"top-1 {top1:.3f}"
    # --rerank: spatial verification of the top-5 keeps the true painting first
    assert main(["query", "--index", str(tmp / "index"), "--codebook", str(tmp / "cb.npz"),
                 "--features", str(tmp / "q.h5"), "--rerank", "--db-features", str(db_store),
                 "--out", str(tmp / "rr.h5"), "-k", "5"]) == 0
    reranked = Neighbours.load(tmp / "rr.h5")
    top1_reranked = np.mean([reranked.top(q)[0][0] == db for q, db in pairs])
    print(f"museum ASMK + rerank top-1 {top1_reranked:.3f}")
    assert top1_reranked >= MUSEUM_MIN_TOP1, f"reranked top-1 {top1_reranked:.3f}"
    assert main(["query", "--index", str(tmp / "index"), "--codebook", str(tmp / "cb.npz"),
                 "--features", str(tmp / "q.h5"), "--rerank", "--out", str(tmp / "x.h5")]) == 1
