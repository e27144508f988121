"""Parity with the published reference behaviour (gtolias/how + cirtorch extraction, jenicek/asmk,
nikosips/met kNN and GAP), against the small independent port in ``reference_port.py``.

How-met matches the reference's maths, and differs on purpose where the reference is wrong:
log-odds ranking where float64 confidences saturate, the full K x t grid, no clamping of
negative similarities (the last three tests; each shows the reference's failure too).
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from how_met.features.checkpoints import load_model
from how_met.features.extract import extract_to_store
from how_met.features.images import load_image
from how_met.features.network import HOWNet
from how_met.features.settings import CONFIGS
from how_met.features.store import FeatureStore
from how_met.recognition.knn import DEFAULT_TS, knn_predict
from how_met.recognition.metrics import gap
from how_met.recognition.protocol import tune
from reference_port import (reference_extract, reference_gap, reference_knn, reference_load_image,
                            reference_tune_t_at_k1, write_official_checkpoint)

IMAGE_SIZE = 256  # > 1000 cells over the 7 scales at stride 16, and quick


@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory):
    """An official-layout ResNet18 checkpoint without layer4 (skip_layer 1, as -R50 does):
    stride 16 gives 1000 features on a small image."""
    path = tmp_path_factory.mktemp("official") / "how_r18-.pth"
    trunk, weight, bias = write_official_checkpoint(path, "old", skip_layer=1, dim=16)
    return path, trunk, weight, bias


def _first_image(museum_dir, split):
    return f"{split}/" + sorted(p.name for p in (museum_dir / "images" / split).iterdir())[0]


@pytest.mark.parametrize("side,scale", [(500, 0.707), (333, 0.5), (375, 1.414), (281, 0.353), (640, 0.25)])
def test_scale_resize_is_the_official_floor_rule(side, scale):
    x = torch.rand(1, 3, side, side + 37)
    official = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False,
                             recompute_scale_factor=True)
    ours = HOWNet._scaled(x, scale, "floor")
    assert ours.shape == official.shape and torch.equal(ours, official)
    assert ours.shape[-2] == math.floor(side * scale)
    rounded = HOWNet._scaled(x, scale, "round")
    assert rounded.shape[-2] == round(side * scale)


@pytest.mark.parametrize("split", ["db", "queries"])
def test_official_image_loading_is_the_reference_loader(museum_dir, split):
    path = museum_dir / "images" / _first_image(museum_dir, split)
    ours, original = load_image(path, IMAGE_SIZE, "official")
    np.testing.assert_array_equal(ours, reference_load_image(path, IMAGE_SIZE))
    assert max(ours.shape[:2]) == IMAGE_SIZE and len(original) == 2


def test_extraction_equals_the_official_multiscale_extraction(official_checkpoint, museum_dir, tmp_path):
    path, trunk, weight, bias = official_checkpoint
    key = _first_image(museum_dir, "queries")  # a phone photo, shrunk by the LANCZOS thumbnail
    config = {**CONFIGS["how-r18"], "image_size": IMAGE_SIZE}
    extract_to_store(museum_dir / "images", [key], tmp_path / "f.h5", config=config,
                     model=load_model(str(path)), workers=0)
    with FeatureStore(tmp_path / "f.h5") as store:
        ours = store.read(key)
    image = reference_load_image(museum_dir / "images" / key, IMAGE_SIZE)
    desc, strength, cells, scales = reference_extract(trunk, weight, bias, image, config["scales"], 1000)
    assert len(ours) == len(desc) == 1000
    # the same 1000 features in the same order
    np.testing.assert_array_equal(ours.locations, cells)
    np.testing.assert_array_equal(ours.scales, scales)
    np.testing.assert_allclose(ours.strengths, strength, rtol=1e-4)
    np.testing.assert_allclose(ours.descriptors, desc, rtol=1e-3, atol=1e-3 * np.abs(desc).max())


# -- kNN classifier and GAP -----------------------------------------------------------------------

def _lists(rows):
    """[(label, similarity), ...] per query -> (indices, scores, db_labels), one database image
    per neighbour so that any labels can be used."""
    k = max(len(r) for r in rows)
    indices = np.full((len(rows), k), -1, np.int64)
    scores = np.full((len(rows), k), -np.inf, np.float32)
    db_labels = []
    for i, row in enumerate(rows):
        for j, (label, s) in enumerate(row):
            indices[i, j] = len(db_labels)
            scores[i, j] = s
            db_labels.append(label)
    return indices, scores, np.array(db_labels)


def test_knn_and_gap_agree_with_the_reference_where_it_is_sound():
    rng = np.random.default_rng(0)
    n_classes = 40
    rows = [[(int(rng.integers(n_classes)), float(s)) for s in np.sort(rng.uniform(0.05, 0.9, 10))[::-1]]
            for _ in range(60)]
    labels = np.array([r[0][0] if i % 3 else -1 for i, r in enumerate(rows)])
    indices, scores, db_labels = _lists(rows)
    neighbour_labels = [[label for label, _ in r] for r in rows]
    sims = [[np.float32(s) for _, s in r] for r in rows]
    for K in (1, 3, 10):
        for t in (0.1, 5.0, 20.0):
            ours = knn_predict(indices, scores, db_labels, K, t, n_classes=n_classes)
            ref_pred, ref_conf = reference_knn(neighbour_labels, sims, n_classes, K, t)
            assert ours.labels.tolist() == ref_pred.tolist()
            np.testing.assert_allclose(ours.confidence, ref_conf, rtol=1e-9)
            assert gap(ours.labels, ours.log_odds, labels) == pytest.approx(
                reference_gap(ref_pred, ref_conf, labels), abs=1e-12)


def test_saturated_confidences_are_still_ranked():
    # n = 10 classes, K = 1, t = 100: every confidence is 1 - 9 exp(-100 s) > 1 - 1e-16, i.e.
    # exactly 1.0 in float64. The right prediction (top similarity 0.60) must still rank first.
    rows = [[(3, 0.50)], [(2, 0.55)], [(5, 0.60)]]
    labels = np.array([-1, 7, 5])  # a distractor, a wrong prediction, a right one
    indices, scores, db_labels = _lists(rows)
    ref_pred, ref_conf = reference_knn([[3], [2], [5]], [[0.5], [0.55], [0.6]], 10, 1, 100.0)
    assert ref_conf.tolist() == [1.0, 1.0, 1.0]  # the reference ranks a three-way tie
    ours = knn_predict(indices, scores, db_labels, K=1, t=100.0, n_classes=10)
    assert ours.confidence.tolist() == [1.0, 1.0, 1.0]
    similarities = np.float32([0.50, 0.55, 0.60]).astype(np.float64)
    np.testing.assert_allclose(ours.log_odds, 100 * similarities - math.log(9), rtol=1e-9)
    # how-met: the right one first -> GAP = P(1) / M = 1/2. The reference keeps the tie in
    # input order (the right one last): P(3) / M = (1/3) / 2.
    assert gap(ours.labels, ours.log_odds, labels) == pytest.approx(0.5)
    assert reference_gap(ref_pred, ref_conf, labels) == pytest.approx(1 / 6)


def test_negative_similarities_are_not_clamped():
    # n = 4, K = 1, t = 1: a wrong prediction at -0.5 and a right one at -0.1. The reference
    # starts every class maximum at 0, so both become 0 and tie at 1/4.
    rows = [[(1, -0.5)], [(0, -0.1)]]
    labels = np.array([2, 0])
    indices, scores, db_labels = _lists(rows)
    ref_pred, ref_conf = reference_knn([[1], [0]], [[-0.5], [-0.1]], 4, 1, 1.0)
    assert ref_conf.tolist() == [0.25, 0.25]
    ours = knn_predict(indices, scores, db_labels, K=1, t=1.0, n_classes=4)
    np.testing.assert_allclose(ours.confidence, [math.exp(-0.5) / (math.exp(-0.5) + 3),
                                                 math.exp(-0.1) / (math.exp(-0.1) + 3)], rtol=1e-6)
    assert gap(ours.labels, ours.log_odds, labels) == pytest.approx(0.5)     # the right one first
    assert reference_gap(ref_pred, ref_conf, labels) == pytest.approx(0.25)  # tie, input order


def test_the_full_k_by_t_grid_is_searched():
    # Query 0 is wrong and ambiguous (classes at 0.80 / 0.79 / 0.78), query 1 right and clear
    # (0.70, then 0.10). At K = 1 only the top similarity counts: the wrong query ranks first for
    # every t, GAP = (1/2) / 2. From K = 2 and t = 1 its rival pulls its log-odds down
    # (0.8 - log(e^0.79 + 8) = -1.523 < 0.7 - log(e^0.1 + 8) = -1.509): GAP = 1/2.
    rows = [[(1, 0.80), (2, 0.79), (3, 0.78)], [(4, 0.70), (5, 0.10), (6, 0.10)]]
    labels = np.array([9, 4])
    indices, scores, db_labels = _lists(rows)
    (K, t), grid = tune(indices, scores, db_labels, labels, n_classes=10)
    assert (K, t) == (2, 1.0) and grid.max() == pytest.approx(0.5)
    np.testing.assert_allclose(grid[0], 0.25)
    (ref_K, _), ref_best = reference_tune_t_at_k1([[1, 2, 3], [4, 5, 6]], [[0.8, 0.79, 0.78], [0.7, 0.1, 0.1]],
                                                  labels, 10, DEFAULT_TS)
    assert ref_K == 1 and ref_best == pytest.approx(0.25)


def test_config_how_r18_is_the_published_pipeline():
    from how_met.cli import build_parser
    from how_met.cli.evaluation import evaluation_settings
    args = build_parser().parse_args(["evaluate", "--met", "met", "--work", "w", "--config", "how-r18",
                                      "--checkpoint", "how_r18.pth", "--codebook", "cb.npz"])
    settings = evaluation_settings(args)
    extract = settings["extract"]
    assert (extract["model"]["backbone"], extract["scales"], extract["image_size"], extract["features_num"]) == \
        ("resnet18", [2.0, 1.414, 1.0, 0.707, 0.5, 0.353, 0.25], 1024, 1000)
    assert (extract["resize_rule"], extract["image_loading"]) == ("floor", "official")
    assert (settings["codebook"], settings["codebook_size"], settings["codebook_points_per_centroid"],
            settings["seed"], settings["global_dims"]) == ("cb.npz", 65536, 256, 1234, 512)
    plain = evaluation_settings(build_parser().parse_args(["evaluate", "--met", "met", "--work", "w"]))
    assert plain["extract"]["resize_rule"] == "round" and plain["global_dims"] == 128 and plain["codebook"] is None
