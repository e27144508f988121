"""Training HOW descriptors: the loss falls and the trunk moves while the whitening and the
BatchNorm statistics stay put, an interrupted run resumes to the same weights, and the model
file loads and extracts like any other. Tiny images (64 px) and a handful of tuples."""
import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

from conftest import TEST_CONFIG
from met_fixture import write_met_fixture

from how_met.cli import main
from how_met.datasets import load_directory
from how_met.features.checkpoints import load_model, save_model, save_official
from how_met.features.extract import extract_image
from how_met.features.network import HOWNet, ModelConfig, model_fingerprint
from how_met.training.data import augment, image_of, seeded, training_images
from how_met.training.objective import contrastive_loss, describe, hard_negatives, pooled_descriptor
from how_met.training.settings import TrainingSettings
from how_met.training.trainer import last_epoch_model, train_model, training_files

SETTINGS = TrainingSettings(epochs=2, tuples_per_epoch=8, pool_size=16, negatives=3, tuples_per_step=2,
                            lr=1e-4, image_size=64, val_images=0)


@pytest.fixture(scope="module")
def images(museum_dir, landmarks_dir):
    """20 museum paintings (synthetic pairs) and the landmarks (real pairs: 3 classes with several)."""
    museum = load_directory(museum_dir)
    museum = museum.without(museum.db_keys[20:] + museum.query_keys)
    return training_images([museum, load_directory(landmarks_dir)])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, images, whitened_model):
    """(start model, trained model file, result) of an uninterrupted 2-epoch run."""
    start = copy.deepcopy(whitened_model)
    out = tmp_path_factory.mktemp("train") / "model.pt"
    result = train_model(images, out, SETTINGS, model=copy.deepcopy(start), config=TEST_CONFIG)
    return start, out, result


def _tuple_loss(model, images, tuples, negatives):
    """Mean loss over fixed tuples (fixed augmentations) -- what training lowers."""
    with torch.no_grad():
        losses = []
        for t, (i, negs) in enumerate(zip(tuples, negatives)):
            q = pooled_descriptor(model, image_of(images.root, images.keys[i], 64, (9, t, 0)))
            p = pooled_descriptor(model, image_of(images.root, images.keys[i], 64, (9, t, 1)))
            n = torch.stack([pooled_descriptor(model, image_of(images.root, images.keys[j], 64)) for j in negs])
            losses.append(float(contrastive_loss(q, p, n, SETTINGS.margin)))
    return float(np.mean(losses))


def test_training_lowers_the_loss_and_changes_only_the_trunk(trained, images):
    start, out, result = trained
    model = load_model(str(out))
    assert [r["epoch"] for r in result["history"]] == [0, 1, 2]
    assert result["best_epoch"] == 2  # no validation: the last epoch
    # the loss of fixed tuples (synthetic pairs, negatives mined with the start model) falls
    tuples = np.arange(0, 20, 2)
    desc = describe(start, images.root, images.keys, 64)
    negatives = hard_negatives(desc[tuples], images.labels[tuples], desc, images.labels, SETTINGS.negatives)
    assert (negatives >= 0).all()
    before, after = _tuple_loss(start, images, tuples, negatives), _tuple_loss(model, images, tuples, negatives)
    assert after < 0.9 * before, (before, after)
    old, new = start.state_dict(), model.state_dict()
    # frozen: the whitening and every BatchNorm's statistics
    frozen = [k for k in old if k.startswith("dim_reduction.") or k.endswith(("running_mean", "running_var"))]
    assert len(frozen) > 50 and all(torch.equal(old[k], new[k]) for k in frozen)
    # trained: the trunk up to the local layer (block 11's expansion); what lies above it gets no gradient
    assert not torch.equal(old["trunk.net._conv_stem.weight"], new["trunk.net._conv_stem.weight"])
    assert not torch.equal(old["trunk.net._blocks.11._expand_conv.weight"], new["trunk.net._blocks.11._expand_conv.weight"])
    assert torch.equal(old["trunk.net._blocks.11._depthwise_conv.weight"], new["trunk.net._blocks.11._depthwise_conv.weight"])
    assert torch.equal(old["trunk.net._conv_head.weight"], new["trunk.net._conv_head.weight"])


def test_resume_continues_from_the_saved_epoch(tmp_path, trained, images):
    start, straight, result = trained
    out = tmp_path / "model.pt"
    first = train_model(images, out, dataclasses.replace(SETTINGS, epochs=1),
                        model=copy.deepcopy(start), config=TEST_CONFIG)
    assert [r["epoch"] for r in first["history"]] == [0, 1]
    state, history = training_files(out)
    assert json.loads(history.read_text())["epochs"][1]["loss"] == first["history"][1]["loss"]
    resumed = train_model(images, out, SETTINGS, model=copy.deepcopy(start), config=TEST_CONFIG)
    assert resumed["history"][:2] == first["history"]  # epoch 1 was not trained again
    assert resumed["history"][2]["loss"] == pytest.approx(result["history"][2]["loss"], rel=1e-4)
    assert model_fingerprint(load_model(str(out))) == model_fingerprint(load_model(str(straight)))
    last, epoch = last_epoch_model(out)
    assert epoch == 2 and model_fingerprint(last) == model_fingerprint(load_model(str(straight)))
    # a state of another run is refused, not continued
    with pytest.raises(ValueError, match="another run"):
        train_model(images, out, dataclasses.replace(SETTINGS, lr=1e-3),
                    model=copy.deepcopy(start), config=TEST_CONFIG)


def test_the_trained_model_loads_and_extracts(trained, museum_dir):
    start, out, _ = trained
    model = load_model(str(out))
    image = museum_dir / "images" / load_directory(museum_dir).db_keys[0]
    features = extract_image(model, image, TEST_CONFIG)
    assert features.descriptors.shape == (TEST_CONFIG["features_num"], 64)
    assert np.isfinite(features.descriptors).all()
    assert not np.allclose(features.descriptors, extract_image(start, image, TEST_CONFIG).descriptors)


def test_train_command_validates_on_the_met_val_queries(tmp_path, whitened_model, capsys):
    met = write_met_fixture(tmp_path / "met", n_classes=6, images_per_class=2, size=96)
    start = tmp_path / "start.pt"
    save_model(whitened_model, start)
    out = tmp_path / "met-model.pt"
    argv = ["train", "--met", str(met["root"]), "--out", str(out), "--checkpoint", str(start), "--epochs", "1",
            "--tuples", "3", "--pool", "12", "--negatives", "3", "--image-size", "64"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    history = json.loads(training_files(out)[1].read_text())
    assert history["validation"].endswith("val queries")
    assert [e["epoch"] for e in history["epochs"]] == [0, 1]
    assert all(0 <= e["val_GAP"] <= 100 for e in history["epochs"])
    assert printed["best_val_GAP"] == max(e["val_GAP"] for e in history["epochs"])
    assert load_model(str(out)).has_whitening
    # the official HOW layout knows ResNets only: refused before any training
    assert main(argv + ["--official", str(tmp_path / "how.pth")]) == 1
    assert "ResNet trunks only" in capsys.readouterr().err


def test_synthetic_validation_holds_out_single_image_classes(images):
    from how_met.training.validation import synthetic_validation
    val, rest = synthetic_validation(images, 8, seed=0)
    assert len(rest) == len(images) - 8 and not set(val.query_keys) & set(rest.keys)
    assert len(val.db_keys) == 6 and (val.query_labels == -1).sum() == 2  # a quarter are distractors
    assert set(val.db_keys) <= set(val.query_keys)
    counts = dict(zip(*np.unique(images.labels, return_counts=True)))
    assert all(counts[label] == 1 for label in val.db_labels)  # no class keeps images in training


def test_official_layout_round_trip(tmp_path):
    model = HOWNet(ModelConfig("resnet18", "layer3", 32), imagenet=False)
    generator = torch.Generator().manual_seed(0)
    model.set_reduction(torch.randn(32, model.trunk.channels, generator=generator), torch.randn(32, generator=generator))
    save_official(model, tmp_path / "how_r18.pth")
    saved = torch.load(tmp_path / "how_r18.pth", weights_only=True)
    assert saved["net_params"]["skip_layer"] == 1 and "dim_reduction.weight" in saved["state_dict"]
    assert all(k.startswith(("features.", "dim_reduction.")) for k in saved["state_dict"])
    assert model_fingerprint(load_model(str(tmp_path / "how_r18.pth"))) == model_fingerprint(model)


def test_positive_pairs_and_class_separation(museum_dir, landmarks_dir):
    museum, landmarks = load_directory(museum_dir), load_directory(landmarks_dir)
    images = training_images([landmarks, museum])
    assert images.root == museum_dir.parent.resolve()
    assert images.keys[0] == "landmarks/images/" + landmarks.db_keys[0]
    # class ids repeat across the two sets, the training classes do not
    assert len(np.unique(images.labels)) == landmarks.n_classes + museum.n_classes
    pairs = images.positive_pairs()
    synthetic = pairs[pairs[:, 0] == pairs[:, 1]]
    assert len(synthetic) == len(images)
    real = pairs[pairs[:, 0] != pairs[:, 1]]
    sizes = np.unique(landmarks.db_labels, return_counts=True)[1]
    assert len(real) == sum(n * (n - 1) for n in sizes)
    assert (images.labels[real[:, 0]] == images.labels[real[:, 1]]).all()


def test_hard_negatives_are_the_nearest_of_other_classes_one_per_class():
    query = np.array([[1.0, 0.0]], np.float32)
    pool = np.array([[1, 0], [0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0, 1]], np.float32)
    # pool 0 is the query's own class; 1 and 2 are look-alikes of one class: only the nearer counts
    negatives = hard_negatives(query, np.array([5]), pool, np.array([5, 7, 7, 8, 9]), 3)
    assert negatives.tolist() == [[1, 3, 4]]
    assert hard_negatives(query, np.array([5]), pool, np.array([5, 7, 7, 7, 7]), 2).tolist() == [[1, -1]]


def test_contrastive_loss_by_hand():
    q, p = torch.tensor([1.0, 0.0]), torch.tensor([0.6, 0.8])
    negatives = torch.tensor([[0.0, 1.0], [0.96, 0.28]])   # distances 1.414 (beyond 0.8) and 0.283
    expected = 0.5 * (0.4 ** 2 + 0.8 ** 2) + 0.5 * (0.8 - np.hypot(0.04, 0.28)) ** 2
    assert float(contrastive_loss(q, p, negatives, 0.8)) == pytest.approx(expected, rel=1e-5)


def test_augmentation_is_seeded_and_follows_the_recipe():
    pixels = torch.randint(0, 256, (3, 90, 120), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    a, b = augment(pixels, 64, seeded(0, 1)), augment(pixels, 64, seeded(0, 1))
    assert torch.equal(a, b) and max(a.shape[1:]) == 64 and a.dtype == torch.uint8
    assert not torch.equal(a, augment(pixels, 64, seeded(0, 2)))
    gray = augment(pixels, 64, seeded(0, 1), grayscale_p=1.0, jitter_p=0.0)
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_train_refuses_bad_counts_and_no_images(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--images", str(tmp_path), "--out", str(tmp_path / "m.pt"), "--tuples", "0"])
    assert stop.value.code == 2 and "--tuples: expected an integer >= 1, got 0" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "m.pt")]) == 1
    assert "give training images" in capsys.readouterr().err
    assert main(["train", "--images", str(tmp_path), "--out", str(tmp_path / "m.pt")]) == 1
    assert "no images to train on" in capsys.readouterr().err


def test_train_skip_bad_leaves_out_a_corrupt_jpeg(tmp_path, whitened_model, museum_dir, capsys, caplog):
    folder = tmp_path / "photos"
    folder.mkdir()
    for key in load_directory(museum_dir).db_keys[:8]:
        (folder / key.replace("/", "_")).write_bytes((museum_dir / "images" / key).read_bytes())
    good = next(folder.glob("*.jpg")).read_bytes()
    (folder / "corrupt.jpg").write_bytes(good[:len(good) // 3])  # a download cut short
    start = tmp_path / "start.pt"
    save_model(whitened_model, start)
    out = tmp_path / "model.pt"
    # every image is a query (9 synthetic pairs) and in the pool, so the corrupt one is met
    argv = ["train", "--images", str(folder), "--out", str(out), "--checkpoint", str(start), "--epochs", "1",
            "--tuples", "9", "--pool", "9", "--negatives", "3", "--image-size", "64", "--val-images", "0"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "corrupt.jpg" in err and "--skip-bad" in err, err
    assert main(argv + ["--skip-bad"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped_images"] == 1
    assert any("corrupt.jpg" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    epoch = json.loads(training_files(out)[1].read_text())["epochs"][1]
    assert epoch["tuples"] == 8 and epoch["skipped_tuples"] == 1 and np.isfinite(epoch["loss"])
    assert model_fingerprint(load_model(str(out))) != model_fingerprint(whitened_model)
