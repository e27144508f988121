"""Streaming indexing through compact records on real museum photos: the same index as the
batch build, resume after a crash, and reranking from records with the full store's scores."""
import json
import shutil

import numpy as np
import pytest

from conftest import TEST_CONFIG
from how_met.asmk.codebook import Codebook
from how_met.asmk.indexing import build_index, index_from_records, records_from_images, records_from_stores
from how_met.asmk.inverted_file import InvertedFile
from how_met.asmk.query import query_store
from how_met.asmk.records import RecordStore, RecordsError
from how_met.features.extract import extract_to_store
from how_met.features.store import FeatureStore
from how_met.neighbours import Neighbours
from how_met.verify.reranker import Reranker


@pytest.fixture(scope="module")
def museum_small(tmp_path_factory, museum_dir, museum_pairs, whitened_model):
    """20 database photos (the true paintings of 8 visitor photos + 12 others), the 8 queries,
    their features, a 64-word codebook trained on the database and the batch-built index."""
    pairs, by_class = museum_pairs
    pairs = pairs[:8]
    truth = dict(pairs)
    others = [k for k in sorted(by_class.values()) if k not in truth.values()][:12]
    db_keys = sorted(set(truth.values()) | set(others))
    tmp = tmp_path_factory.mktemp("records")
    db = tmp / "db.h5"
    queries = tmp / "queries.h5"
    extract_to_store(museum_dir / "images", db_keys, db, config=TEST_CONFIG, model=whitened_model, workers=0)
    extract_to_store(museum_dir / "images", list(truth), queries, like=db, workers=0)
    codebook = Codebook(size=64, iterations=5, seed=0).train(db, show_progress=False)
    codebook.save(tmp / "cb.npz")
    return {"tmp": tmp, "db": db, "queries": queries, "db_keys": db_keys, "truth": truth,
            "codebook": codebook, "batch": build_index(db, codebook, show_progress=False)}


def _assert_same_index(a, b):
    assert a.slot_keys == b.slot_keys
    for name, arr in a.arrays().items():
        np.testing.assert_array_equal(np.asarray(arr), np.asarray(b.arrays()[name]), err_msg=name)


def test_streaming_build_equals_batch_build(museum_small, tmp_path):
    m = museum_small
    stats = records_from_stores([m["db"]], m["codebook"], tmp_path / "db.rec", descriptors="none",
                                show_progress=False)
    assert stats == {"written": len(m["db_keys"]), "skipped": 0}
    streamed = index_from_records(tmp_path / "db.rec", tmp_path / "index", show_progress=False)
    _assert_same_index(streamed, m["batch"])
    found = [query_store(index, m["codebook"], m["queries"], k=5, show_progress=False)
             for index in (m["batch"], streamed)]
    np.testing.assert_array_equal(found[0].indices, found[1].indices)
    np.testing.assert_array_equal(found[0].scores, found[1].scores)
    top1 = [found[1].top(q)[0][0] == db for q, db in m["truth"].items()]
    assert sum(top1) >= 6, top1  # the real paintings are found (not a degenerate index)


def test_images_stream_into_records_and_resume_after_a_crash(museum_small, museum_dir, tmp_path):
    """Images straight into records (no feature store written): a first run stops after 5
    images, a torn record is left at the end (a kill mid-write), the rerun skips the 5 and
    completes; the index equals the batch build over the extracted store."""
    m = museum_small
    records = tmp_path / "db.rec"
    first = records_from_images(museum_dir / "images", m["db_keys"][:5], m["db"], m["codebook"], records,
                                workers=0)
    assert first == {"written": 5, "skipped": 0}
    with open(records, "ab") as fh:
        fh.write(b"HMJ1" + bytes(64))  # the frame of a record whose write was cut short
    with pytest.raises(RecordsError, match="other settings"):
        records_from_images(museum_dir / "images", m["db_keys"], m["db"], m["codebook"], records,
                            descriptors="full", workers=0)
    rest = records_from_images(museum_dir / "images", m["db_keys"], m["db"], m["codebook"], records, workers=0)
    assert rest == {"written": len(m["db_keys"]) - 5, "skipped": 5}
    _assert_same_index(index_from_records(records, tmp_path / "index", show_progress=False), m["batch"])


@pytest.fixture(scope="module")
def shortlist(museum_small):
    m = museum_small
    return query_store(m["batch"], m["codebook"], m["queries"], k=8, show_progress=False)


def _scores(source, m, shortlist):
    with Reranker(source, m["codebook"], multiple_assignment=3) as rr, FeatureStore(m["queries"]) as qs:
        out = []
        for q in shortlist.query_keys:
            query = rr.prepare_query(qs.read(q, with_global=False))
            keys = [key for key, _ in shortlist.top(q)]
            asmk, inliers, _ = rr.score_candidates(query, keys)
            out.append((keys, asmk, inliers))
        read = (rr.store.records_read, rr.store.bytes_read) if isinstance(rr.store, RecordStore) else None
    return out, read


def test_rerank_from_records_gives_the_full_store_scores(museum_small, shortlist, tmp_path):
    m = museum_small
    reference, _ = _scores(m["db"], m, shortlist)
    for kind in ("full", "int8"):
        path = tmp_path / f"{kind}.rec"
        records_from_stores([m["db"]], m["codebook"], path, descriptors=kind, show_progress=False)
        scores, (records_read, bytes_read) = _scores(path, m, shortlist)
        candidates = {key for keys, _, _ in reference for key in keys}
        with RecordStore(path) as records:  # I/O: one read of each shortlisted record, nothing else
            assert records_read == len(candidates) < len(records) + 1
            assert bytes_read == sum(records.record_bytes(k) for k in candidates)
        for (keys, asmk, inliers), (keys_r, asmk_r, inliers_r) in zip(reference, scores):
            assert keys == keys_r
            np.testing.assert_array_equal(asmk, asmk_r)  # the index's own codes: exact
            if kind == "full":
                np.testing.assert_array_equal(inliers, inliers_r)
            else:  # descriptors within int8 rounding: a pair at the similarity threshold may flip
                assert np.abs(inliers.astype(int) - inliers_r).max() <= max(3, 0.1 * inliers.max())
                assert np.argmax(inliers) == np.argmax(inliers_r)
        assert max(inliers.max() for _, _, inliers in reference) >= 20  # true matches verified


def test_records_without_descriptors_score_asmk_only(museum_small, shortlist, tmp_path):
    m = museum_small
    path = tmp_path / "none.rec"
    records_from_stores([m["db"]], m["codebook"], path, descriptors="none", show_progress=False)
    q = shortlist.query_keys[0]
    keys = [key for key, _ in shortlist.top(q)]
    with FeatureStore(m["queries"]) as qs:
        query = qs.read(q, with_global=False)
    with Reranker(m["db"], m["codebook"]) as full, Reranker(path, m["codebook"]) as compact:
        np.testing.assert_array_equal(full.score_candidates(query, keys, verify=False)[0],
                                      compact.score_candidates(query, keys, verify=False)[0])
        with pytest.raises(ValueError, match="ASMK scores only"):
            compact.score_candidates(query, keys)
    other = Codebook(size=32, iterations=2, seed=1).train(m["db"], show_progress=False)
    with pytest.raises(ValueError, match="another codebook"):
        Reranker(path, other)


def test_cli_streams_images_into_an_index(museum_small, museum_dir, tmp_path, capsys):
    from how_met.cli import main
    m = museum_small
    folder = tmp_path / "photos"
    for key in m["db_keys"][:4]:
        (folder / key).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(museum_dir / "images" / key, folder / key)
    args = ["index", "--images", str(folder), "--like", str(m["db"]), "--codebook", str(m["tmp"] / "cb.npz"),
            "--records", str(tmp_path / "db.rec"), "--out", str(tmp_path / "index"), "--workers", "0"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["images"] == 4 and summary["records_written"] == 4 and summary["record_bytes_per_image"] > 0
    assert main(args) == 0  # a rerun finds every image recorded
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["records_written"] == 0
    ranked = query_store(tmp_path / "index", m["tmp"] / "cb.npz", m["queries"], k=1, show_progress=False)
    assert isinstance(ranked, Neighbours) and set(ranked.db_keys) == set(m["db_keys"][:4])


def _record_arrays(record):
    feats = record.features
    return {"words": record.words, "codes": record.codes, "feature_words": record.feature_words,
            "descriptors": feats.descriptors, "strengths": feats.strengths, "locations": feats.locations,
            "scales": feats.scales, "sizes": np.array([feats.image_size, feats.input_size])}


def test_images_stream_into_records_on_ray_as_in_one_process(ray_local, museum_small, museum_dir, tmp_path,
                                                             capsys):
    """The streaming build with the network on Ray workers (units of 2 images, returning in any
    order) and the records written by the driver: the same records, index and search results as
    one process; ``how-met index --ray`` over the records then extracts nothing."""
    from how_met.cli import main
    from how_met.features.distributed import RayExtraction
    m = museum_small
    keys = m["db_keys"][:6]
    one = records_from_images(museum_dir / "images", keys, m["db"], m["codebook"], tmp_path / "one.rec",
                              descriptors="full", workers=0)
    on_ray = records_from_images(museum_dir / "images", keys, m["db"], m["codebook"], tmp_path / "ray.rec",
                                 descriptors="full", ray=RayExtraction(unit_images=2))
    assert one == on_ray == {"written": len(keys), "skipped": 0}
    with RecordStore(tmp_path / "one.rec") as a, RecordStore(tmp_path / "ray.rec") as b:
        assert a.settings == b.settings and a.keys() == b.keys() == keys
        for key in keys:
            expected, got = _record_arrays(a.read(key)), _record_arrays(b.read(key))
            for name in expected:
                np.testing.assert_array_equal(got[name], expected[name], err_msg=f"{key} {name}")
    folder = tmp_path / "photos"
    for key in keys:
        (folder / key).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(museum_dir / "images" / key, folder / key)
    assert main(["index", "--images", str(folder), "--like", str(m["db"]), "--codebook", str(m["tmp"] / "cb.npz"),
                 "--records", str(tmp_path / "ray.rec"), "--record-descriptors", "full",
                 "--out", str(tmp_path / "ray-index"), "--ray"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["images"] == len(keys) and summary["records_written"] == 0  # every image recorded
    indexes = [index_from_records(tmp_path / "one.rec", tmp_path / "one-index", show_progress=False),
               tmp_path / "ray-index"]
    _assert_same_index(InvertedFile.load(indexes[1]), indexes[0])
    found = [query_store(index, m["codebook"], m["queries"], k=3, show_progress=False) for index in indexes]
    assert found[0].db_keys == found[1].db_keys
    np.testing.assert_array_equal(found[0].indices, found[1].indices)
    np.testing.assert_array_equal(found[0].scores, found[1].scores)
    assert (found[0].indices[:, 0] >= 0).any()  # queries whose painting is among the six are answered
    assert main(["index", "--features", str(m["db"]), "--codebook", str(m["tmp"] / "cb.npz"),
                 "--out", str(tmp_path / "x"), "--ray"]) == 1
    assert "--ray runs the network" in capsys.readouterr().err and not (tmp_path / "x").exists()
