"""Extraction invariants on real museum photos, store round trips, resume and shards."""

import h5py
import numpy as np
import pytest

from conftest import TEST_CONFIG
import torch

from how_met.features.extract import extract_to_store
from how_met.features.network import strongest
from how_met.features.journal import Journal
from how_met.features.store import FeatureStore, FeatureStoreError, journal_path, merge_stores


@pytest.fixture(scope="module")
def museum_keys(museum_pairs):
    pairs, by_class = museum_pairs
    query, positive = pairs[0]
    unrelated = next(v for v in by_class.values() if v != positive)
    return [positive, unrelated, query, pairs[1][0]]


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, museum_dir, museum_keys, whitened_model):
    out = tmp_path_factory.mktemp("feats") / "f.h5"
    extract_to_store(museum_dir / "images", museum_keys, out, config=TEST_CONFIG,
                     model=whitened_model, workers=0)
    return out


def test_strongest_features_keep_input_order_on_ties():
    attention = torch.tensor([0.5, 1.0, 0.5, 1.0, 0.2, 0.5])
    assert strongest(attention, 4).tolist() == [1, 3, 0, 2]
    assert strongest(attention, 10).tolist() == [1, 3, 0, 2, 5, 4]
    # many ties: torch.topk would be free to return any of them
    flat = torch.zeros(5000)
    flat[[17, 4000]] = 1.0
    assert strongest(flat, 5).tolist() == [17, 4000, 0, 1, 2]


def test_invariants(extracted, museum_keys, whitened_model):
    stride = whitened_model.stride
    with FeatureStore(extracted) as store:
        assert store.keys() == sorted(museum_keys)
        assert store.config["stride"] == stride and store.config["scales"] == TEST_CONFIG["scales"]
        for key in museum_keys:
            f = store.read(key)
            n = TEST_CONFIG["features_num"]
            assert f.descriptors.shape == (n, 64) and f.descriptors.dtype == np.float32
            assert f.strengths.shape == (n,) and f.locations.shape == (n, 2) and f.scales.shape == (n,)
            assert np.all(np.diff(f.strengths) <= 0), "top-N must be sorted by attention"
            assert f.strengths[0] == pytest.approx(1.0)  # divided by the common maximum
            assert set(np.unique(f.scales)) <= set(np.float32(TEST_CONFIG["scales"]))
            assert max(f.input_size) <= TEST_CONFIG["image_size"]
            # feature-map cells lie inside the map of their scale
            for scale in np.unique(f.scales):
                sel = f.scales == scale
                w = int(round(f.input_size[0] * scale))
                h = int(round(f.input_size[1] * scale))
                assert f.locations[sel, 0].min() >= 0 and f.locations[sel, 1].min() >= 0
                assert f.locations[sel, 0].max() < -(-w // stride)
                assert f.locations[sel, 1].max() < -(-h // stride)
            kp = f.keypoints(stride)
            assert np.all(kp >= 0) and np.all(kp <= np.array(f.image_size) + stride)
            assert f.global_descriptor.shape == (1280,)
            assert np.linalg.norm(f.global_descriptor) == pytest.approx(1.0, abs=1e-4)


def test_float16_round_trip(tmp_path, extracted, museum_keys):
    with FeatureStore(extracted) as src, FeatureStore(tmp_path / "h.h5", "a") as dst:
        f = src.read(museum_keys[0])
        dst.write("x/y.jpg", f, float16=True)
    with FeatureStore(tmp_path / "h.h5") as back:
        assert back._file["x/y.jpg/descriptors"].dtype == np.float16
        g = back.read("x/y.jpg")
    np.testing.assert_allclose(g.descriptors, f.descriptors, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(g.locations, f.locations)
    assert g.image_size == f.image_size and g.input_size == f.input_size


def _dump(path):
    out = {}
    with FeatureStore(path) as store:
        for key in store.keys():
            f = store.read(key)
            out[key] = (f.descriptors, f.strengths, f.locations, f.scales, f.global_descriptor)
    return out


def _assert_same(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        for x, y in zip(a[key], b[key]):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


def test_resume_after_interruption(tmp_path, museum_dir, museum_keys, whitened_model, extracted,
                                   monkeypatch):
    import how_met.features.extract as extract_module
    out = tmp_path / "resume.h5"
    calls = {"n": 0}
    original = extract_module._to_local_features

    def crash_on_third(*args, **kwargs):  # the process dies while the third image is computed
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(extract_module, "_to_local_features", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        extract_to_store(museum_dir / "images", museum_keys, out, config=TEST_CONFIG,
                         model=whitened_model, workers=0)
    monkeypatch.setattr(extract_module, "_to_local_features", original)
    with pytest.raises(FeatureStoreError, match="rerun the same extract command"):
        FeatureStore(out)  # readers are told the store is unfinished
    assert len(Journal(journal_path(out)).images) == 2  # two complete images, nothing half-written
    stats = extract_to_store(museum_dir / "images", museum_keys, out, config=TEST_CONFIG,
                             model=whitened_model, workers=0)
    assert stats["skipped_existing"] == 2 and stats["extracted"] == 2
    _assert_same(_dump(out), _dump(extracted))


def test_half_written_group_is_discarded(tmp_path, extracted, museum_keys):
    path = tmp_path / "partial.h5"
    with FeatureStore(extracted) as src, FeatureStore(path, "a") as dst:
        dst.write(museum_keys[0], src.read(museum_keys[0]))
    with h5py.File(path, "a") as raw:  # simulate a crash in the middle of a write
        raw.create_group("__partial__/db|half.jpg").create_dataset("descriptors", data=np.zeros((2, 2)))
    with FeatureStore(path) as store:  # a round-1 store's leftover is never an image
        assert store.keys() == [museum_keys[0]]


def test_shards_merge_equals_single_run(tmp_path, museum_dir, museum_keys, whitened_model, extracted):
    shards = []
    for i in range(2):
        shards.append(tmp_path / f"s{i}.h5")
        extract_to_store(museum_dir / "images", museum_keys, shards[-1], config=TEST_CONFIG,
                         model=whitened_model, workers=0, shard=(i, 2))
    sizes = [len(FeatureStore(s)) for s in shards]
    assert sizes == [2, 2]
    merge_stores(shards, tmp_path / "merged.h5")
    _assert_same(_dump(tmp_path / "merged.h5"), _dump(extracted))


def test_mixing_configs_is_refused(tmp_path, extracted, museum_dir, museum_keys, whitened_model):
    import shutil
    copy = tmp_path / "copy.h5"
    shutil.copy(extracted, copy)
    other = dict(TEST_CONFIG, features_num=100)
    with pytest.raises(RuntimeError, match="another extractor config"):
        extract_to_store(museum_dir / "images", museum_keys + ["db/bbdd_00010.jpg"], copy,
                         config=other, model=whitened_model, workers=0)


def test_a_store_from_before_the_resize_rule_reads_as_round(tmp_path, extracted):
    import json
    import shutil
    legacy = tmp_path / "legacy.h5"
    shutil.copy(extracted, legacy)
    with h5py.File(legacy, "a") as h5:  # what round 1 recorded: no resize rule, no image loading
        recorded = json.loads(h5.attrs["extractor"])
        for name in ("resize_rule", "image_loading"):
            del recorded[name]
        h5.attrs["extractor"] = json.dumps(recorded)
    with FeatureStore(legacy, "a") as store:
        store.set_config({**recorded, "resize_rule": "round", "image_loading": "how-met"})
        with pytest.raises(RuntimeError, match="another extractor config"):
            store.set_config({**recorded, "resize_rule": "floor", "image_loading": "how-met"})


def _mutual_nn(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    sim = a @ b.T
    ab, ba = sim.argmax(1), sim.argmax(0)
    return int(np.sum(ba[ab] == np.arange(len(a))))


def test_query_matches_its_painting_more_than_an_unrelated_one(extracted, museum_keys):
    positive, unrelated, query = museum_keys[:3]
    with FeatureStore(extracted) as store:
        q = store.descriptors(query)
        good = _mutual_nn(q, store.descriptors(positive))
        bad = _mutual_nn(q, store.descriptors(unrelated))
    assert good > 1.5 * bad, (good, bad)


def test_bad_images_skip_or_fail(tmp_path, whitened_model):
    from PIL import Image
    root = tmp_path / "imgs"
    root.mkdir()
    Image.new("RGB", (96, 64), (200, 30, 30)).save(root / "good.jpg")
    (root / "broken.jpg").write_text("not an image")
    with pytest.raises(ValueError, match=r"broken\.jpg: unreadable image.*--skip-bad"):
        extract_to_store(root, ["broken.jpg", "good.jpg"], tmp_path / "a.h5", config=TEST_CONFIG,
                         model=whitened_model, workers=0)
    stats = extract_to_store(root, ["broken.jpg", "good.jpg"], tmp_path / "b.h5", config=TEST_CONFIG,
                             model=whitened_model, workers=0, skip_bad=True)
    assert stats["extracted"] == 1
    with FeatureStore(tmp_path / "b.h5") as store:
        assert store.keys() == ["good.jpg"]



def test_one_photo_is_extracted_as_the_store_extracts_it_with_upscales(tmp_path, museum_dir, museum_keys,
                                                                       whitened_model):
    """extract_image (identify, query --images) used to ignore the upscale limit: a photo larger
    than image_size got scale-2 features that the stored queries (and evaluate) never had."""
    from how_met.features.extract import extract_image
    config = {**TEST_CONFIG, "scales": [2.0, 1.0, 0.5], "upscale_to_image_size": True}
    out = tmp_path / "up.h5"
    extract_to_store(museum_dir / "images", museum_keys[:1], out, config=config, model=whitened_model, workers=0)
    one = extract_image(whitened_model, museum_dir / "images" / museum_keys[0], config)
    with FeatureStore(out) as store:
        stored = store.read(museum_keys[0], with_global=False)
    assert max(stored.input_size) * 2 > config["image_size"]  # the upscale is out of bounds here
    assert set(np.unique(stored.scales)) <= {1.0, 0.5}
    assert np.array_equal(one.scales, stored.scales) and np.array_equal(one.locations, stored.locations)
    assert np.abs(one.descriptors - stored.descriptors).max() < 1e-2
