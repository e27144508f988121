"""Inverted file: scores equal a naive per-pair, per-shared-word implementation of SPEC 3;
incremental updates, files, damaged files, and equality with asmk 0.1.1 when installed."""
import json
import math

import numpy as np
import pytest

from how_met.asmk.aggregation import Aggregated, aggregate
from how_met.asmk.codes import binarize
from how_met.asmk.codebook import Codebook
from how_met.features.store import FeatureStore, LocalFeatures
from how_met.asmk.indexing import build_index
from how_met.asmk.inverted_file import InvertedFile

D = 32  # descriptor dimension of most tests (the code handles any; 128 in the asmk comparison)


# -- a deliberately naive ASMK (per image pair, per shared word) --------------------------------

def naive_aggregate(desc, words, centroids, binary=True):
    """{word: aggregated vector} of one image; words (n, k)."""
    words = np.asarray(words).reshape(len(desc), -1)
    out = {}
    for w in set(words.ravel().tolist()):
        total = np.zeros(desc.shape[1], np.float64)
        for i in range(len(desc)):
            if w in words[i].tolist():
                total += desc[i].astype(np.float64) - centroids[w]
        out[w] = total > 0 if binary else total / np.linalg.norm(total)
    return out


def naive_similarity(a, b, binary):
    if binary:
        hamming = sum(1 for x, y in zip(a, b) if x != y)
        return 1.0 - 2.0 * hamming / len(a)
    return float(np.dot(a, b))


def naive_score(query, db_image, database, binary=True, alpha=3.0, tau=0.0, use_idf=False):
    n = len(database)
    if use_idf:
        def idf(w):
            df = sum(1 for img in database if w in img)
            return math.log(n / df) ** 2 if df else 1.0
    else:
        def idf(w):
            return 1.0
    total = 0.0
    for w in query:
        if w in db_image:
            s = naive_similarity(query[w], db_image[w], binary)
            total += idf(w) * (s ** alpha if s >= tau else 0.0)
    norm_q = sum(idf(w) for w in query)
    norm_d = sum(idf(w) for w in db_image)
    if norm_q == 0 or norm_d == 0:
        return 0.0
    return total / (math.sqrt(norm_q) * math.sqrt(norm_d))


# -- synthetic scene -------------------------------------------------------------------------------

def scene(seed=0, n_db=30, n_q=6, n_words=48, per_image=40, d=D):
    rng = np.random.default_rng(seed)
    centroids = rng.normal(size=(n_words, d)).astype(np.float32)
    db = [(centroids[rng.integers(0, n_words, per_image)] + 0.6 * rng.normal(size=(per_image, d))).astype(np.float32)
          for _ in range(n_db)]
    queries = [(db[i][:per_image // 2] + 0.4 * rng.normal(size=(per_image // 2, d))).astype(np.float32)
               for i in range(n_q)]
    return Codebook.from_centroids(centroids), db, queries


def build(cb, db, binary=True, use_idf=False, keys=None, batches=1):
    ivf = InvertedFile(len(cb.centroids), cb.dim, binary=binary, use_idf=use_idf, codebook_fingerprint=cb.fingerprint)
    keys = keys or [f"db/{i}" for i in range(len(db))]
    for part in np.array_split(np.arange(len(db)), batches):
        if len(part):
            descs = [db[i] for i in part]
            desc = np.concatenate(descs)
            agg = aggregate(desc, cb.assign(desc, 1), cb.centroids,
                                 np.repeat(np.arange(len(part)), [len(d) for d in descs]), binary=binary)
            ivf.add([keys[i] for i in part], agg)
    return ivf


def search(ivf, cb, queries, k=10, ma=3, **kw):
    desc = np.concatenate(queries)
    agg = aggregate(desc, cb.assign(desc, ma), cb.centroids,
                         np.repeat(np.arange(len(queries)), [len(q) for q in queries]), binary=ivf.binary)
    return ivf.search(agg, k=k, query_keys=[f"q{i}" for i in range(len(queries))], **kw)


def assert_same_results(a, b):
    assert a.query_keys == b.query_keys
    for key in a.query_keys:
        ta, tb = a.top(key), b.top(key)
        assert [x[0] for x in ta] == [x[0] for x in tb]
        np.testing.assert_allclose([x[1] for x in ta], [x[1] for x in tb], rtol=1e-6, atol=1e-7)


# -- exactness ------------------------------------------------------------------------------------

@pytest.mark.parametrize("binary,use_idf,alpha,tau", [
    (True, False, 3.0, 0.0), (True, True, 3.0, 0.0), (True, False, 1.0, -0.3), (False, False, 3.0, 0.0),
    (False, True, 3.0, 0.1)])
def test_scores_equal_naive_definition(binary, use_idf, alpha, tau):
    cb, db, queries = scene(seed=1)
    ivf = build(cb, db, binary=binary, use_idf=use_idf, batches=3)
    result = search(ivf, cb, queries, k=len(db), alpha=alpha, tau=tau)
    database = [naive_aggregate(d, cb.assign(d, 1), cb.centroids, binary) for d in db]
    for qi, q in enumerate(queries):
        query = naive_aggregate(q, cb.assign(q, 3), cb.centroids, binary)
        expected = np.array([naive_score(query, img, database, binary, alpha, tau, use_idf) for img in database])
        got = dict(result.top(f"q{qi}"))
        shares = [i for i, img in enumerate(database) if set(img) & set(query)]
        assert sorted(got) == sorted(f"db/{i}" for i in shares)  # every image sharing a word, no other
        for i in shares:
            assert got[f"db/{i}"] == pytest.approx(expected[i], abs=1e-5)
        scores = [s for _, s in result.top(f"q{qi}")]
        assert scores == sorted(scores, reverse=True)


def test_planted_matches_rank_first_and_padding():
    cb, db, queries = scene(seed=2, n_db=40)
    ivf = build(cb, db)
    result = search(ivf, cb, queries, k=60)
    assert [result.top(f"q{i}")[0][0] for i in range(len(queries))] == [f"db/{i}" for i in range(len(queries))]
    assert result.indices.shape == (len(queries), 60)
    assert (result.indices[:, -1] == -1).all() and np.isneginf(result.scores[:, -1]).all()


def test_ties_are_broken_by_database_order():
    ivf = InvertedFile(4, 128)
    code = binarize(np.ones((1, 128)))
    for key in ["c", "a", "b"]:  # three identical images
        ivf.add([key], Aggregated(code, [2], [0]))
    result = ivf.search(Aggregated(code, [2], [0]), k=3, query_keys=["q"])
    assert [key for key, _ in result.top("q")] == ["c", "a", "b"]
    assert [s for _, s in result.top("q")] == [1.0, 1.0, 1.0]


def test_query_word_absent_from_database_counts_in_its_norm():
    ivf = InvertedFile(4, 128)
    code = binarize(np.ones((1, 128)))
    ivf.add(["a"], Aggregated(code, [0], [0]))
    result = ivf.search(Aggregated(np.repeat(code, 4, 0), [0, 1, 2, 3], [0, 0, 0, 0]), k=1)
    assert result.scores[0, 0] == pytest.approx(1 / math.sqrt(4))


# -- updates ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("use_idf", [False, True])
def test_batched_add_remove_compact_equal_a_fresh_build(use_idf):
    cb, db, queries = scene(seed=3)
    keys = [f"db/{i}" for i in range(len(db))]
    one = build(cb, db, use_idf=use_idf)
    many = build(cb, db, use_idf=use_idf, batches=7)
    assert_same_results(search(one, cb, queries), search(many, cb, queries))

    gone = keys[1:30:3]
    assert many.remove(gone) == len(gone)
    kept = [i for i, k in enumerate(keys) if k not in gone]
    fresh = build(cb, [db[i] for i in kept], use_idf=use_idf, keys=[keys[i] for i in kept])
    assert_same_results(search(many, cb, queries), search(fresh, cb, queries))
    assert len(many) == len(kept) and many.n_slots == len(db) and gone[0] not in many.keys

    many.compact()
    assert many.n_slots == len(kept) and many.keys == [keys[i] for i in kept]
    assert_same_results(search(many, cb, queries), search(fresh, cb, queries))
    assert many.n_postings == fresh.n_postings

    # re-adding a removed key after compact works; adding a present key does not
    desc = db[1]
    agg = aggregate(desc, cb.assign(desc, 1), cb.centroids)
    many.add([keys[1]], agg)
    with pytest.raises(ValueError, match="already in the index"):
        many.add([keys[1]], agg)
    with pytest.raises(KeyError):
        many.remove("db/unknown")
    assert many.remove(["db/unknown"], missing_ok=True) == 0


def test_add_validates_its_input():
    ivf = InvertedFile(8, 128)
    code = binarize(np.ones((2, 128)))
    with pytest.raises(ValueError, match="two aggregated vectors"):
        ivf.add(["a"], Aggregated(code, [3, 3], [0, 0]))
    with pytest.raises(ValueError, match="word ids"):
        ivf.add(["a"], Aggregated(code, [3, 8], [0, 0]))
    with pytest.raises(ValueError, match="not"):
        ivf.add(["a"], Aggregated(np.zeros((2, 128), np.float32), [3, 4], [0, 0]))
    assert len(ivf) == 0


# -- files -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,mmap", [("idx", True), ("idx", False), ("idx.h5", True), ("idx.h5", False)])
def test_save_load_round_trip(tmp_path, name, mmap):
    cb, db, queries = scene(seed=4)
    ivf = build(cb, db, use_idf=True, batches=2)
    ivf.remove(["db/3"])
    expected = search(ivf, cb, queries)
    path = ivf.save(tmp_path / name)
    back = InvertedFile.load(path, mmap=mmap)
    assert back.keys == ivf.keys and back.use_idf and back.codebook_fingerprint == cb.fingerprint
    if mmap:
        assert isinstance(back._vectors, np.memmap)
    assert_same_results(search(back, cb, queries), expected)
    # a loaded (memory-mapped) index takes appends and removals; saving over itself is safe
    back.add(["db/new"], aggregate(db[0], cb.assign(db[0], 1), cb.centroids))
    back.remove(["db/5"])
    back.save(path)
    again = InvertedFile.load(path)
    assert "db/new" in again and "db/5" not in again and len(again) == len(db) - 1
    assert search(again, cb, queries).top("q0")[0][1] == pytest.approx(search(back, cb, queries).top("q0")[0][1])


def test_damaged_files_fail_with_one_line_naming_the_file(tmp_path):
    cb, db, _ = scene(seed=5)
    ivf = build(cb, db)
    with pytest.raises(FileNotFoundError, match="nothing"):
        InvertedFile.load(tmp_path / "nothing")

    d = ivf.save(tmp_path / "dir")
    raw = (d / "vectors.npy").read_bytes()
    (d / "vectors.npy").write_bytes(raw[: len(raw) // 2])  # truncated
    with pytest.raises(ValueError, match=r"vectors\.npy") as err:
        InvertedFile.load(d)
    assert "\n" not in str(err.value)

    d = ivf.save(tmp_path / "dir2")
    np.save(d / "image_ids", np.zeros(3, np.uint32))  # shape no longer matches meta.json
    with pytest.raises(ValueError, match=r"image_ids\.npy.*metadata"):
        InvertedFile.load(d)

    d = ivf.save(tmp_path / "dir3")
    (d / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"meta\.json"):
        InvertedFile.load(d)

    d = ivf.save(tmp_path / "dir4")
    meta = json.loads((d / "meta.json").read_text())
    meta["format_version"] = 99
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="version 99"):
        InvertedFile.load(d)

    h5 = tmp_path / "bad.h5"
    h5.write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match="bad.h5"):
        InvertedFile.load(h5)

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("x")
    with pytest.raises(ValueError, match="not a how-met index"):
        ivf.save(tmp_path / "other")
    assert (tmp_path / "other" / "precious.txt").exists()


def test_failed_save_leaves_the_existing_index_intact(tmp_path, monkeypatch):
    cb, db, queries = scene(seed=6)
    ivf = build(cb, db)
    path = ivf.save(tmp_path / "idx")
    expected = search(InvertedFile.load(path), cb, queries)
    bigger = build(cb, db + db[:3], keys=[f"k{i}" for i in range(len(db) + 3)])
    calls = {"n": 0}
    real_save = np.save

    def failing_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(OSError):
        bigger.save(path)
    monkeypatch.undo()
    assert_same_results(search(InvertedFile.load(path), cb, queries), expected)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left behind


# -- building from a feature store -----------------------------------------------------------------

def write_store(path, arrays, keys, config=None):
    with FeatureStore(path, "a") as store:
        store.set_config(config or {"model": {"backbone": "synthetic"}, "dim": D})
        for key, desc in zip(keys, arrays):
            n = len(desc)
            store.write(key, LocalFeatures(desc, np.ones(n, np.float32), np.zeros((n, 2), np.int16),
                                           np.ones(n, np.float32), (64, 64), (64, 64)))
    return path


def test_build_index_and_append_via_cli(tmp_path, capsys):
    from how_met.cli import main
    cb, db, queries = scene(seed=7)
    keys = [f"db/{i}.jpg" for i in range(len(db))]
    cb_path = cb.save(tmp_path / "cb.npz")
    first = write_store(tmp_path / "a.h5", db[:20], keys[:20])
    second = write_store(tmp_path / "b.h5", db[20:], keys[20:])
    out = tmp_path / "index"
    assert main(["index", "--features", str(first), "--codebook", str(cb_path), "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 20
    assert main(["index", "--features", str(second), "--codebook", str(cb_path), "--out", str(out),
                 "--append"]) == 0
    appended = InvertedFile.load(out)
    direct = build_index(write_store(tmp_path / "all.h5", db, keys), cb, batch_size=7, show_progress=False)
    assert sorted(appended.keys) == sorted(direct.keys)
    assert_same_results(search(appended, cb, queries), search(direct, cb, queries))
    # another codebook is refused
    other = Codebook.from_centroids(cb.centroids + 1).save(tmp_path / "other.npz")
    assert main(["index", "--features", str(second), "--codebook", str(other), "--out", str(out), "--append"]) == 1
    assert "another codebook" in capsys.readouterr().err


# -- reference implementation ----------------------------------------------------------------------

def test_equal_to_asmk_reference_top10():
    pytest.importorskip("asmk")
    from asmk import codebook as ref_codebook, index as ref_index, inverted_file as ref_ivf, kernel as ref_kernel
    rng = np.random.default_rng(8)
    n_words, d, n_db = 256, 128, 50
    centroids = rng.normal(size=(n_words, d)).astype(np.float32)
    cb = Codebook.from_centroids(centroids)
    ref_cb = ref_codebook.Codebook(ref_index.initialize_index(None), size=n_words)
    ref_cb.index(centroids)
    db = [(centroids[rng.integers(0, n_words, 150)] + 0.7 * rng.normal(size=(150, d))).astype(np.float32)
          for _ in range(n_db)]
    queries = [(db[i][:80] + 0.5 * rng.normal(size=(80, d))).astype(np.float32) for i in range(8)]
    x, ids = np.concatenate(db), np.repeat(np.arange(n_db), 150)
    for binary, use_idf in [(True, False), (True, True), (False, False)]:
        kern = ref_kernel.ASMKKernel(ref_cb, binary=binary)
        ref = ref_ivf.IVF.initialize_empty(codebook_size=n_words, use_idf=use_idf)
        ref.add(*kern.aggregate(*ref_cb.quantize(x, ids.copy(), multiple_assignment=1)))
        ivf = build(cb, db, binary=binary, use_idf=use_idf)
        mine = search(ivf, cb, queries, k=10, ma=5)
        for qi, q in enumerate(queries):
            agg = kern.aggregate_image(*ref_cb.quantize(q, multiple_assignment=5))
            ranks, scores = ref.search(*agg, topk=10, similarity_func=lambda *a: kern.similarity(
                *a, alpha=3.0, similarity_threshold=0.0))
            assert mine.indices[qi].tolist() == ranks.tolist(), (binary, use_idf, qi)
            np.testing.assert_allclose(mine.scores[qi], scores, atol=1e-5)
