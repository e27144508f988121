"""Reranking: RANSAC on synthetic planar scenes, exact ASMK scores, ordering, fusion tuning."""
import math

import numpy as np
import pytest

from how_met.asmk.codebook import Codebook
from how_met.asmk.indexing import build_index
from how_met.asmk.query import query_descriptors
from how_met.features.store import FeatureStore, LocalFeatures
from how_met.recognition.fusion import tune_fusion_weights
from how_met.verify.geometry import count_one_to_one, fit_model, ransac
from how_met.verify.matching import mutual_nearest_neighbours, scale_consistent, shared_word_matches
from how_met.verify.reranker import Reranker, SpatialParams
from how_met.verify.scores import FusionWeights, ShortlistScores, fuse_scores, inlier_term

STRIDE = 16
IMAGE = (640, 480)


def _apply(H, pts):
    p = np.c_[pts, np.ones(len(pts))] @ np.asarray(H).T
    return p[:, :2] / p[:, 2:]


def _true_homography():
    angle = math.radians(12)
    R = np.array([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]])
    H = np.array([[0.85, 0.05, 40.0], [0.0, 0.8, 25.0], [2e-4, -1e-4, 1.0]]) @ R
    return H / H[2, 2]


def _planar_scene(H, n_in=150, n_out=100, noise=0.5, seed=0):
    rng = np.random.default_rng(seed)
    src = rng.uniform([0, 0], IMAGE, (n_in + n_out, 2))
    dst = _apply(H, src)
    dst[:n_in] += rng.normal(0, noise, (n_in, 2))
    dst[n_in:] = rng.uniform([0, 0], IMAGE, (n_out, 2))
    truth = np.zeros(n_in + n_out, bool)
    truth[:n_in] = True
    perm = rng.permutation(n_in + n_out)  # inliers must not be found by position
    return src[perm], dst[perm], truth[perm]


def _corner_error(H_est, H_true):
    corners = np.array([[0, 0], [IMAGE[0], 0], [IMAGE[0], IMAGE[1]], [0, IMAGE[1]]], float)
    return np.abs(_apply(H_est, corners) - _apply(H_true, corners)).max()


def test_ransac_recovers_homography_and_its_inliers():
    H = _true_homography()
    src, dst, truth = _planar_scene(H)
    result = ransac(src, dst, 3.0, "homography", seed=0)
    assert result.model is not None
    assert _corner_error(result.model, H) < 2.0
    np.testing.assert_array_equal(result.inlier_mask, truth)
    assert result.inliers == truth.sum()


def test_ransac_recovers_affine_and_its_inliers():
    A = np.array([[0.9, -0.2, 30.0], [0.25, 0.7, -10.0], [0.0, 0.0, 1.0]])
    src, dst, truth = _planar_scene(A, n_in=60, n_out=140, seed=1)
    result = ransac(src, dst, 3.0, "affine", seed=0)
    assert _corner_error(result.model, A) < 2.0
    np.testing.assert_array_equal(result.inlier_mask, truth)
    assert np.allclose(result.model[2], [0, 0, 1])


def test_ransac_rejects_pure_noise_and_mirrors():
    rng = np.random.default_rng(3)
    src = rng.uniform([0, 0], IMAGE, (200, 2))
    noise = ransac(src, rng.uniform([0, 0], IMAGE, (200, 2)), 3.0, seed=0)
    assert noise.inliers < 8
    mirrored = src * [-1, 1] + [IMAGE[0], 0]  # a reflection is never a view of a planar object
    assert ransac(src, mirrored, 3.0, "affine", seed=0).inliers < 8
    assert ransac(src[:3], src[:3], 3.0).model is None  # fewer points than a sample


def test_ransac_is_deterministic_for_a_seed():
    src, dst, _ = _planar_scene(_true_homography(), n_in=40, n_out=160, seed=2)
    a = ransac(src, dst, 3.0, seed=7)
    b = ransac(src, dst, 3.0, seed=7)
    np.testing.assert_array_equal(a.model, b.model)
    np.testing.assert_array_equal(a.inlier_mask, b.inlier_mask)
    assert a.hypotheses == b.hypotheses


def test_scale_check_and_prefilter_drop_scale_inconsistent_pairs():
    H = np.diag([0.5, 0.5, 1.0])  # the object appears at half size
    src, dst, truth = _planar_scene(H, n_in=50, n_out=0, seed=4)
    log_ratio = np.full(len(src), math.log(0.5))
    log_ratio[:10] = math.log(4.0)  # ten pairs claim the wrong scale change
    result = ransac(src, dst, 3.0, "affine", log_scale_ratio=log_ratio, seed=0)
    assert not result.inlier_mask[:10].any() and result.inlier_mask[10:].all()
    np.testing.assert_array_equal(scale_consistent(log_ratio, 2.0), np.arange(len(src)) >= 10)


def test_fit_model_least_squares_is_exact_on_exact_points():
    H = _true_homography()
    src = np.random.default_rng(5).uniform(0, 500, (30, 2))
    H_fit = fit_model(src, _apply(H, src), "homography")
    np.testing.assert_allclose(H_fit / H_fit[2, 2], H, atol=1e-8)
    assert fit_model(src[:3], src[:3], "homography") is None


def test_correspondence_matchers():
    rng = np.random.default_rng(6)
    q = rng.normal(size=(50, 16)).astype(np.float32)
    d = np.concatenate([q[::-1] + 0.01, rng.normal(size=(5, 16))]).astype(np.float32)
    qi, di, sim = mutual_nearest_neighbours(q / np.linalg.norm(q, axis=1, keepdims=True),
                                            d / np.linalg.norm(d, axis=1, keepdims=True))
    np.testing.assert_array_equal(di, 49 - qi)
    assert len(qi) == 50 and (sim > 0.99).all()
    # Shared words: query feature i has words (i, i + 100); database features have words
    # 3, 3, 105, 7, 999. Only pairs through a shared word are compared: (3, 0), (3, 1), (5, 2),
    # (7, 3); of the two partners of query 3 the more similar (0) wins.
    unit = np.eye(16, dtype=np.float32)
    qw = np.stack([np.arange(10), np.arange(10) + 100], axis=1)
    q_desc = unit[np.arange(10)]
    d_desc = np.stack([unit[3], 0.6 * unit[3] + 0.8 * unit[4], unit[5], unit[7], unit[9]])
    qi, di, sim = shared_word_matches(qw, np.array([3, 3, 105, 7, 999]), q_desc, d_desc)
    assert sorted(zip(qi.tolist(), di.tolist())) == [(3, 0), (5, 2), (7, 3)]
    assert np.allclose(sim, 1.0)


def test_shared_word_matches_skip_bursty_words():
    """A word holding more than max_per_word database features is skipped: query feature 0
    matches database feature 0 exactly, but through word 7, which 5 database features share;
    query feature 1 matches database feature 5 through word 3 (2 features)."""
    unit = np.eye(8, dtype=np.float32)
    q_words, q_desc = np.array([[7], [3]]), unit[[0, 1]]
    d_words = np.array([7, 7, 7, 7, 7, 3, 3])
    d_desc = unit[[0, 2, 3, 4, 5, 1, 6]]
    qi, di, _ = shared_word_matches(q_words, d_words, q_desc, d_desc, max_per_word=4)
    assert list(zip(qi.tolist(), di.tolist())) == [(1, 5)]
    qi, di, _ = shared_word_matches(q_words, d_words, q_desc, d_desc, max_per_word=5)
    assert sorted(zip(qi.tolist(), di.tolist())) == [(0, 0), (1, 5)]


def test_inliers_are_counted_one_to_one():
    """A feature matched twice counts once: 150 true pairs, plus 10 pairs that reuse a true
    pair's query feature and 10 that reuse a true pair's database feature, each with a new
    partner 0.3 px away. All 170 pairs fit the model; 160 distinct features on either side."""
    H = _true_homography()
    src, dst, truth = _planar_scene(H, n_out=0)
    ids = np.arange(len(src))
    first, second = ids[:10], ids[10:20]
    src_all = np.concatenate([src, src[first], src[second]])
    dst_all = np.concatenate([dst, dst[first] + 0.3, dst[second] + 0.3])
    src_ids = np.concatenate([ids, first, 2000 + second])    # query feature reused / new
    dst_ids = np.concatenate([ids, 1000 + first, second])    # database feature new / reused
    result = ransac(src_all, dst_all, 3.0, "homography", seed=0, src_ids=src_ids, dst_ids=dst_ids)
    assert result.inlier_mask.sum() == 170
    assert result.inliers == 160
    assert count_one_to_one(np.ones(4, bool), np.array([0, 0, 1, 2]), np.array([5, 6, 7, 7])) == 3


# ---- the reranker on synthetic feature stores ------------------------------------------------

def _features(keypoints, scales, desc, image_size=IMAGE):
    locations = np.floor(keypoints * scales[:, None] / STRIDE).astype(np.int32)  # the cell holding it
    return LocalFeatures(descriptors=desc.astype(np.float32), strengths=np.ones(len(desc), np.float32),
                         locations=locations, scales=scales.astype(np.float32),
                         image_size=image_size, input_size=image_size)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A query, its planar warp "match" (with extra clutter) and 6 unrelated database images."""
    rng = np.random.default_rng(0)
    dim, n = 32, 300
    centroids = rng.normal(size=(64, dim)).astype(np.float32)
    codebook = Codebook.from_centroids(centroids)
    q_desc = rng.normal(size=(n, dim))
    q_scales = rng.choice([1.0, 0.707, 0.5], n)
    q_kp = (np.floor(rng.uniform([0, 0], IMAGE, (n, 2)) * q_scales[:, None] / STRIDE) + 0.5) \
        * STRIDE / q_scales[:, None]
    query = _features(q_kp, q_scales, q_desc)
    H = _true_homography()
    keep = np.flatnonzero(rng.random(n) < 0.7)
    kp = _apply(H, q_kp[keep])
    inside = (kp >= 0).all(1) & (kp < IMAGE).all(1)
    keep, kp = keep[inside], kp[inside]
    scale_change = 0.82  # about the warp's linear scale: the candidate feature is ~0.82x as big
    m_desc = np.concatenate([q_desc[keep] + rng.normal(0, 0.25, (len(keep), dim)), rng.normal(size=(80, dim))])
    m_scales = np.concatenate([q_scales[keep] / scale_change, rng.choice([1.0, 0.707, 0.5], 80)])
    m_kp = np.concatenate([kp, rng.uniform([0, 0], IMAGE, (80, 2))])
    path = tmp_path_factory.mktemp("rerank") / "db.h5"
    with FeatureStore(path, "a") as store:
        store.set_config({"stride": STRIDE})
        store.write("db/match.jpg", _features(m_kp, m_scales, m_desc))
        for i in range(6):
            d_scales = rng.choice([1.0, 0.707, 0.5], n)
            store.write(f"db/other{i}.jpg", _features(rng.uniform([0, 0], IMAGE, (n, 2)), d_scales,
                                                      rng.normal(size=(n, dim))))
    return {"path": path, "codebook": codebook, "query": query, "H": H,
            "keys": [f"db/other{i}.jpg" for i in range(3)] + ["db/match.jpg"] + [f"db/other{i}.jpg" for i in range(3, 6)]}


@pytest.mark.parametrize("matching", ["mnn", "words"])
@pytest.mark.parametrize("model", ["homography", "affine"])
def test_reranker_verifies_the_planar_match(scene, matching, model):
    spatial = SpatialParams(matching=matching, model=model)
    with Reranker(scene["path"], scene["codebook"], multiple_assignment=3, spatial=spatial) as rr:
        assert rr.stride == STRIDE  # from the store's extractor config
        ranked = rr.rerank(scene["query"], scene["keys"])
    keys = [key for key, _, _ in ranked]
    assert keys[0] == "db/match.jpg" and sorted(keys) == sorted(scene["keys"])
    best = ranked[0][2]
    others = [details["inliers"] for _, _, details in ranked[1:]]
    assert best["inliers"] >= 40 and max(others) < 10, (best["inliers"], others)
    # Keypoints are feature-map cell centres (quantised): the fit is good to about a cell.
    assert _corner_error(best["model"], scene["H"]) < 2 * STRIDE
    scores = [score for _, score, _ in ranked]
    assert scores == sorted(scores, reverse=True)


def test_rerank_ordering_follows_fused_scores_and_keeps_ties_in_input_order(scene):
    with Reranker(scene["path"], scene["codebook"], multiple_assignment=3) as rr:
        keys = scene["keys"]
        plain = rr.rerank(scene["query"], keys, verify=False,
                          weights=FusionWeights(global_weight=1, asmk_weight=0, inlier_weight=0))
        assert [k for k, _, _ in plain] == keys  # all-zero scores: input order
        glob = np.linspace(0.0, 0.6, len(keys))
        by_global = rr.rerank(scene["query"], keys, global_scores=glob, verify=False,
                              weights=FusionWeights(global_weight=1, asmk_weight=0, inlier_weight=0))
        assert [k for k, _, _ in by_global] == keys[::-1]
        assert by_global[0][2]["global"] == pytest.approx(0.6)
        fused = rr.rerank(scene["query"], keys, global_scores=glob)
        for key, score, details in fused:
            expected = fuse_scores(details["global"], details["asmk"], details["inliers"], rr.weights)
            assert score == pytest.approx(float(expected))
        assert rr.cache_misses == len(keys) and rr.cache_hits == 2 * len(keys)


def _reference_asmk(rr, query, db_feats):
    """ASMK similarity written out word by word from SPEC section 3 (slow and obvious)."""
    def aggregate(desc, words):
        out = {}
        for d, ws in zip(desc, words):
            for w in ws:
                out[w] = out.get(w, 0) + (d - rr.centroids[w])
        return {w: v > 0 for w, v in out.items()}

    q = aggregate(query.descriptors, rr.codebook.assign(query.descriptors, rr.multiple_assignment))
    d = aggregate(db_feats.descriptors, rr.codebook.assign(db_feats.descriptors, 1))
    total = 0.0
    for w in set(q) & set(d):
        s = 1 - 2 * np.count_nonzero(q[w] != d[w]) / len(q[w])
        total += s ** rr.alpha if s >= rr.tau else 0.0
    return total / math.sqrt(len(q)) / math.sqrt(len(d))


def test_reranker_asmk_score_is_the_asmk_formula(scene):
    with Reranker(scene["path"], scene["codebook"], multiple_assignment=3) as rr:
        asmk, _, _ = rr.score_candidates(scene["query"], scene["keys"], verify=False)
        for key, value in zip(scene["keys"], asmk):
            assert value == pytest.approx(_reference_asmk(rr, scene["query"], rr.store.read(key)), abs=1e-6)


@pytest.mark.parametrize("use_idf", [False, True])
def test_reranker_asmk_score_equals_inverted_file_search(scene, tmp_path, use_idf):
    index = build_index(scene["path"], scene["codebook"], use_idf=use_idf, show_progress=False)
    found = query_descriptors(index, scene["codebook"], [scene["query"].descriptors], k=len(scene["keys"]),
                              multiple_assignment=3)
    by_key = dict(found.top(found.query_keys[0]))
    with Reranker(scene["path"], scene["codebook"], multiple_assignment=3, index=index) as rr:
        asmk, _, _ = rr.score_candidates(scene["query"], scene["keys"], verify=False)
    assert len(by_key) == len(scene["keys"])
    for key, value in zip(scene["keys"], asmk):
        assert value == pytest.approx(by_key[key], rel=1e-6, abs=1e-7)


def test_candidate_cache_is_bounded(scene):
    with Reranker(scene["path"], scene["codebook"], cache_mb=0.05) as rr:
        for key in scene["keys"]:
            rr.candidate(key)
        assert len(rr._cache) < len(scene["keys"])
        assert rr._cached_bytes == sum(c.nbytes for c in rr._cache.values())


# ---- fusion ------------------------------------------------------------------------------------

def test_fuse_scores_and_inlier_term():
    assert inlier_term([0, 4, 14], inlier_half=10, min_inliers=4).tolist() == [0.0, 0.0, 0.5]
    w = FusionWeights(global_weight=0.5, asmk_weight=2.0, inlier_weight=1.0, inlier_half=10, min_inliers=4)
    assert fuse_scores(0.4, 0.1, 14, w) == pytest.approx(0.2 + 0.2 + 0.5)


def _synthetic_shortlist():
    """10 queries (7 of database classes, 3 distractors) x 3 candidates, one image per class.

    The global score ranks a look-alike first for 3 queries and is high for distractors;
    only the inlier counts tell the true match apart.
    """
    rng = np.random.default_rng(0)
    nq, k, n_db = 10, 3, 20
    query_labels = np.array([0, 1, 2, 3, 4, 5, 6, -1, -1, -1])
    indices = np.stack([rng.choice(np.setdiff1d(np.arange(n_db), [c]), k, replace=False) for c in query_labels])
    truth = np.arange(7)
    indices[truth, 1] = query_labels[:7]  # the true image is second by global score
    glob = np.sort(rng.uniform(0.5, 0.7, (nq, k)), axis=1)[:, ::-1].copy()
    glob[[0, 1, 2], 1] = glob[[0, 1, 2], 0] + 0.05  # ... except for three queries
    glob[7:] += 0.2  # distractors look very similar globally
    inliers = rng.integers(0, 6, (nq, k))
    inliers[truth, 1] = 60
    asmk = rng.uniform(0.0, 0.05, (nq, k))
    scores = ShortlistScores([f"q{i}" for i in range(nq)], [f"d{i}" for i in range(n_db)], indices,
                             glob.astype(np.float32), asmk.astype(np.float32), inliers.astype(np.int32))
    return scores, np.arange(n_db), query_labels


def test_tune_fusion_weights_with_a_callable_objective():
    scores, db_labels, query_labels = _synthetic_shortlist()

    def top1_accuracy(neighbours):
        hits = db_labels[neighbours.indices[:, 0]] == query_labels
        return float(hits[query_labels >= 0].mean())

    best = tune_fusion_weights(scores, objective=top1_accuracy)
    assert best["value"] == 1.0 and best["weights"].inlier_weight > 0
    assert len(best["grid"]) > 50


def test_tune_fusion_weights_by_knn_gap():
    scores, db_labels, query_labels = _synthetic_shortlist()
    best = tune_fusion_weights(scores, db_labels, query_labels,
                               grid={"global_weight": (1.0,), "asmk_weight": (0.0,), "inlier_weight": (0.0, 1.0)})
    by_weight = {entry["inlier_weight"]: value for entry, value in best["grid"]}
    assert by_weight[1.0] == pytest.approx(1.0)  # every true match first and more confident
    assert by_weight[0.0] < 0.9
    assert best["weights"].inlier_weight == 1.0 and {"K", "t"} <= set(best)


def test_rerank_neighbours_reorders_a_shortlist(scene, tmp_path):
    from how_met.neighbours import Neighbours
    from how_met.verify.scores import rerank_neighbours, score_shortlist

    query_path = tmp_path / "queries.h5"
    with FeatureStore(query_path, "a") as store:
        store.set_config({"stride": STRIDE})
        store.write("q/0.jpg", scene["query"])
        store.write("q/1.jpg", scene["query"])
    db_keys = sorted(scene["keys"])
    match = db_keys.index("db/match.jpg")
    others = [i for i in range(len(db_keys)) if i != match]
    # Query 0: the match is last of 4 by global score; query 1: 2 candidates and padding.
    indices = np.array([others[:3] + [match], others[3:5] + [-1, -1]])
    scores = np.array([[0.9, 0.8, 0.7, 0.6], [0.5, 0.4, -np.inf, -np.inf]], np.float32)
    shortlist = Neighbours(["q/0.jpg", "q/1.jpg"], db_keys, indices, scores)
    with Reranker(scene["path"], scene["codebook"], multiple_assignment=3) as rr:
        out = rerank_neighbours(rr, query_path, shortlist, show_progress=False)
        components = score_shortlist(rr, query_path, shortlist, show_progress=False)
    assert isinstance(out, Neighbours) and out.db_keys == db_keys
    assert out.indices[0, 0] == match and sorted(out.indices[0]) == sorted(indices[0])
    assert (out.indices[1, 2:] == -1).all() and np.isneginf(out.scores[1, 2:]).all()
    assert (np.diff(out.scores[:, :2], axis=1) <= 0).all()
    assert components.inliers[0, 3] >= 40 and components.inliers[1, 2:].tolist() == [0, 0]
    np.testing.assert_array_equal(components.global_scores, scores)

    missing = Neighbours(["q/missing.jpg"], db_keys, indices[:1], scores[:1])
    with Reranker(scene["path"], scene["codebook"]) as rr, pytest.raises(KeyError, match="q/missing.jpg"):
        score_shortlist(rr, query_path, missing, show_progress=False)
