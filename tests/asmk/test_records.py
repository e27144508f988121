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
from how_met.asmk.pq import ProductQuantiser
from how_met.asmk.records import RecordStore, RecordsError, vectors_path
from how_met.features.journal import Journal
from how_met.features.extract import extract_to_store
from how_met.features.store import FeatureStore
from how_met.neighbours import Neighbours
from how_met.verify.reranker import Reranker, SpatialParams


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


def _index_of(path, tmp_path, name):
    return index_from_records(path, tmp_path / f"{name}-index", show_progress=False)


def _scores_with_index(source, m, shortlist, index):
    with Reranker(source, m["codebook"], multiple_assignment=3, index=index) as rr, \
            FeatureStore(m["queries"]) as qs:
        out = [rr.score_candidates(rr.prepare_query(qs.read(q, with_global=False)),
                                   [key for key, _ in shortlist.top(q)])[:2] for q in shortlist.query_keys]
        return out, rr.store.records_read, rr.index_lookups


def test_rerank_from_records_gives_the_full_store_scores(museum_small, shortlist, tmp_path):
    """full records: the store's scores exactly; int8 and pq: the same ASMK scores (the codes
    come from the index the records assembled, or from the sidecar), inlier counts within the
    tolerances below; one read of each shortlisted record."""
    m = museum_small
    reference, _ = _scores(m["db"], m, shortlist)
    candidates = {key for keys, _, _ in reference for key in keys}
    assert max(inliers.max() for _, _, inliers in reference) >= 20  # true matches verified
    for kind in ("full", "int8", "pq"):
        path = tmp_path / f"{kind}.rec"
        records_from_stores([m["db"]], m["codebook"], path, descriptors=kind, show_progress=False,
                            pq_code="8x8" if kind == "pq" else None)
        from_sidecar, (records_read, bytes_read) = _scores(path, m, shortlist)
        from_index, read_with_index, lookups = _scores_with_index(path, m, shortlist, _index_of(path, tmp_path, kind))
        with RecordStore(path) as records:  # I/O: one read of each shortlisted record, nothing else
            assert records_read == read_with_index == len(candidates) < len(records) + 1
            assert bytes_read == sum(records.record_bytes(k) for k in candidates)
        assert lookups > 0  # the ASMK codes were read from the index's postings
        for (keys, asmk, inliers), (_, asmk_s, inliers_s), (asmk_i, inliers_i) in zip(reference, from_sidecar,
                                                                                       from_index):
            np.testing.assert_array_equal(asmk, asmk_s)  # the index's own codes: exact
            np.testing.assert_array_equal(asmk, asmk_i)
            np.testing.assert_array_equal(inliers_s, inliers_i)
            if kind == "full":
                np.testing.assert_array_equal(inliers, inliers_i)
            elif kind == "int8":  # within int8 rounding: a pair at the similarity threshold may flip
                assert np.abs(inliers.astype(int) - inliers_i).max() <= max(3, 0.1 * inliers.max())
                assert np.argmax(inliers) == np.argmax(inliers_i)
            else:  # 8 x 8 bits (here 64-D: 8 dims per byte), similarity 0.5: coarse, still verifies
                assert np.argmax(inliers) == np.argmax(inliers_i)  # the same best candidate
                best = inliers.max()
                if best >= 20:  # a verified true match keeps at least half its inliers
                    assert inliers_i.max() >= 0.5 * best, (inliers, inliers_i)
                # the lower similarity admits more pairs: wrong candidates gain up to ~12 inliers
                assert np.abs(inliers.astype(int) - inliers_i).max() <= max(12, 0.5 * best)


def test_records_keep_no_aggregated_vectors(museum_small, shortlist, tmp_path):
    """The codes live in the sidecar the index is assembled from (the same index as the batch
    build); once it is deleted the records still rerank with the store's ASMK scores through the
    index, and refuse, in one line, what needs the sidecar."""
    m = museum_small
    path = tmp_path / "db.rec"
    records_from_stores([m["db"]], m["codebook"], path, descriptors="pq", show_progress=False)
    with RecordStore(path) as records:
        names = {name for key in records.keys() for name, _, _ in records._journal.images[key][1]["arrays"]}
        assert names == {"feature_words", "locations", "scale_index", "attention", "pq_codes"}
        assert not records.holds_codes and records.vectors_path.exists()
    index = _index_of(path, tmp_path, "pq")
    _assert_same_index(index, m["batch"])
    reference, _ = _scores(m["db"], m, shortlist)
    vectors_path(path).unlink()
    with pytest.raises(RecordsError, match="gone") as refused:
        index_from_records(path, tmp_path / "again", show_progress=False)
    assert "\n" not in str(refused.value) and str(path) in str(refused.value)
    with pytest.raises(ValueError, match="pass index="):
        Reranker(path, m["codebook"])
    spatial = SpatialParams(min_similarity=0.6, min_similarity_pq=0.5)
    with Reranker(path, m["codebook"], index=index, spatial=spatial) as pq_rr, \
            Reranker(m["db"], m["codebook"], spatial=spatial) as store_rr:
        assert (pq_rr._min_similarity(), store_rr._min_similarity()) == (0.5, 0.6)  # pq candidates only
    scores, _, _ = _scores_with_index(path, m, shortlist, index)
    for (_, asmk, _), (asmk_i, _) in zip(reference, scores):
        np.testing.assert_array_equal(asmk, asmk_i)
    other = index_from_records(tmp_path / "full.rec", tmp_path / "other", keys=m["db_keys"][:3],
                               show_progress=False) if records_from_stores(
        [m["db"]], m["codebook"], tmp_path / "full.rec", descriptors="full", show_progress=False) else None
    with Reranker(path, m["codebook"], index=other) as rr, FeatureStore(m["queries"]) as qs, \
            pytest.raises(KeyError, match="does not hold"):
        q = shortlist.query_keys[0]
        rr.score_candidates(qs.read(q, with_global=False), [m["db_keys"][-1]])


def test_pq_records_round_trip_through_files(museum_small, tmp_path):
    m = museum_small
    path = tmp_path / "db.rec"
    records_from_stores([m["db"]], m["codebook"], path, descriptors="pq", pq_code="16x6", show_progress=False)
    with RecordStore(path) as records, FeatureStore(m["db"]) as store:
        pq = records.pq
        assert (pq.subquantizers, pq.bits, pq.code_bytes) == (16, 6, 12) and records.settings["pq_code"] == "16x6"
        again = ProductQuantiser.from_header(pq.to_header(), pq.dim)
        np.testing.assert_array_equal(again.centroids, pq.centroids)
        for key in m["db_keys"][:4]:
            feats, record = store.read(key, with_global=False), records.read(key)
            unit = feats.descriptors / np.linalg.norm(feats.descriptors, axis=1, keepdims=True)
            np.testing.assert_array_equal(record.features.descriptors, pq.decode(pq.encode(unit)))
            cos = np.einsum("ij,ij->i", unit, record.features.descriptors) / np.linalg.norm(
                record.features.descriptors, axis=1)
            assert np.median(cos) > 0.8  # 12 bytes for 64 dims
            np.testing.assert_array_equal(record.features.locations, feats.locations)
            np.testing.assert_array_equal(record.features.scales, feats.scales)
            assert record.features.image_size == feats.image_size
            assert np.abs(record.features.strengths - feats.strengths).max() <= feats.strengths.max() / 254
            np.testing.assert_array_equal(record.words, np.unique(record.feature_words))
            assert records.record_bytes(key) == len(feats) * (2 + 2 + 1 + 1 + 12)
    with pytest.raises(RecordsError, match="other settings"):  # appending with another code size
        records_from_stores([m["db"]], m["codebook"], path, descriptors="pq", pq_code="16x8", show_progress=False)
    for bad in ("7x8", "16x9", "16x", "x8", 16.0):
        with pytest.raises(ValueError, match="dividing"):
            records_from_stores([m["db"]], m["codebook"], tmp_path / "x.rec", descriptors="pq", pq_code=bad)
    assert not (tmp_path / "x.rec").exists()  # refused before anything is written


def _tampered(path, pq_header, **attrs):
    header = {"format": "how-met-records", "format_version": 2, "n_words": 64, "dim": 64,
              "descriptors": "pq", "pq_code": "8x8", "extractor": {}, "model_fingerprint": None,
              "codebook_fingerprint": None, "pq": pq_header, **attrs}
    journal = Journal(path)
    journal.set_attrs(header)
    journal.close()
    return path


@pytest.mark.parametrize("change, message", [
    ({"subquantizers": 3}, "covers 3 x 8"),
    ({"subquantizers": True}, "subquantizers is True"),
    ({"dsub": 16}, "covers 8 x 16"),
    ({"centroids_per_subspace": 65536}, "centroids per sub-space"),
    ({"centroids_per_subspace": 100}, "centroids per sub-space"),
    ({"centroids_f4": "not base64!"}, "not base64"),
    ({"centroids_f4": "AAAA"}, "hold 3 bytes"),
    ({"centroids_f4": "A" * 10 ** 6}, "longer than declared"),
    ({"centroids_f4": None}, "missing"),
    ("nan", "NaN"),
    (None, "not a mapping"),
])
def test_hostile_pq_headers_are_refused(tmp_path, change, message):
    good = ProductQuantiser(np.random.default_rng(0).normal(size=(8, 256, 8))).to_header()
    if change == "nan":
        bad = ProductQuantiser(np.zeros((8, 256, 8))).centroids.copy()
        bad[3, 7, 1] = np.nan
        pq_header = dict(good, centroids_f4=__import__("base64").b64encode(bad.astype("<f4").tobytes()).decode())
    else:
        pq_header = None if change is None else dict(good, **change)
    path = _tampered(tmp_path / "bad.rec", pq_header)
    with pytest.raises(RecordsError, match=message) as refused:
        RecordStore(path)
    assert "\n" not in str(refused.value) and str(path) in str(refused.value)
    assert RecordStore(_tampered(tmp_path / "good.rec", good)).pq.subquantizers == 8


@pytest.mark.parametrize("attrs, message", [
    ({"format_version": 3}, "supported version"), ({"format_version": True}, "supported version"),
    ({"dim": "64"}, "dim is"), ({"descriptors": "pq4"}, "not one of"), ({"pq_code": "16x8"}, "disagrees"),
    ({"dim": 128}, "covers 8 x 8"),
])
def test_hostile_records_headers_are_refused(tmp_path, attrs, message):
    good = ProductQuantiser(np.random.default_rng(0).normal(size=(8, 256, 8))).to_header()
    path = _tampered(tmp_path / "bad.rec", good, **attrs)
    with pytest.raises(RecordsError, match=message) as refused:
        RecordStore(path)
    assert "\n" not in str(refused.value)


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
