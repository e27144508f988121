"""Extraction on a local Ray instance: the same store as one process, resumed, retried after a
worker is killed, bad images skipped (issue 15)."""
import glob
import json
import os
import shutil
import signal
import threading
import time

import pytest

from conftest import TEST_CONFIG
from test_fault_injection import _dump

from how_met.cli import main
from how_met.features.checkpoints import build_model, save_model
from how_met.features.extract import extract_to_store
from how_met.features.images import ImageError
from how_met.features.store import FeatureStore

pytest.importorskip("ray")
from how_met.features.distributed import RayExtraction  # noqa: E402

# small images and few features: the tests are about scheduling, not about the network
TINY = {**TEST_CONFIG, "scales": [1.0], "features_num": 40, "image_size": 128}


@pytest.fixture(scope="module")
def images(museum_pairs):
    """Six real museum photos: three queries and their database paintings."""
    pairs, _ = museum_pairs
    keys = sorted({key for pair in pairs[:3] for key in pair})
    return keys


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, museum_dir, images, whitened_model):
    out = tmp_path_factory.mktemp("single") / "f.h5"
    extract_to_store(museum_dir / "images", images, out, config=TINY, model=whitened_model, workers=0)
    return out


def test_ray_extraction_is_single_process_extraction_and_resumes(ray_local, museum_dir, images,
                                                                 whitened_model, single_process, tmp_path):
    out = tmp_path / "ray.h5"
    stats = extract_to_store(museum_dir / "images", images, out, config=TINY, model=whitened_model,
                             ray=RayExtraction(unit_images=2))
    assert stats["extracted"] == len(images)
    assert _dump(out) == _dump(single_process)  # same keys, same bytes of every array and attribute
    again = extract_to_store(museum_dir / "images", images, out, config=TINY, model=whitened_model,
                             ray=RayExtraction(unit_images=2))
    assert again["extracted"] == 0 and again["skipped_existing"] == len(images)


def test_ray_learns_the_whitening_one_process_learns(ray_local, museum_dir, images, tmp_path):
    """A model without whitening: learned in a Ray task from the same sample, the same model
    (fingerprint) and descriptors as the single-process path, which reuses its raw features."""
    keys = images[:4]
    config = {**TINY, "model": {**TINY["model"], "dim": 32}}
    extract_to_store(museum_dir / "images", keys, tmp_path / "one.h5", config=config,
                     model=build_model(**config["model"]), workers=0)
    extract_to_store(museum_dir / "images", keys, tmp_path / "ray.h5", config=config,
                     model=build_model(**config["model"]), ray=True)
    with FeatureStore(tmp_path / "one.h5") as one, FeatureStore(tmp_path / "ray.h5") as ray:
        assert ray.model_fingerprint == one.model_fingerprint
    assert _dump(tmp_path / "ray.h5") == _dump(tmp_path / "one.h5")
    assert (tmp_path / "ray.model.pt").read_bytes() == (tmp_path / "one.model.pt").read_bytes()


def _unit_processes():
    """PIDs of Ray workers running an extraction unit (Ray titles a busy worker ray::<task>)."""
    found = []
    for path in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(path, "rb") as fh:
                if fh.read().startswith(b"ray::extract_unit"):
                    found.append(int(path.split("/")[2]))
        except OSError:
            continue
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds Ray's worker processes in /proc")
def test_a_killed_worker_is_retried_and_the_store_is_complete(ray_local, museum_dir, images,
                                                              whitened_model, single_process, tmp_path):
    out = tmp_path / "ray.h5"
    outcome = {}

    def run():
        try:
            outcome["stats"] = extract_to_store(museum_dir / "images", images, out, config=TINY,
                                                model=whitened_model, ray=RayExtraction(unit_images=1))
        except BaseException as exc:  # reported by the assertion below
            outcome["error"] = exc

    driver = threading.Thread(target=run)
    driver.start()
    killed = None
    deadline = time.monotonic() + 60
    while killed is None and driver.is_alive() and time.monotonic() < deadline:
        busy = _unit_processes()
        if busy:
            killed = busy[0]
            os.kill(killed, signal.SIGKILL)  # the worker dies in the middle of its unit
        time.sleep(0.01)
    driver.join()
    assert killed is not None, "no unit was seen running"
    assert "error" not in outcome, outcome.get("error")
    assert outcome["stats"]["extracted"] == len(images)
    assert _dump(out) == _dump(single_process)


def test_bad_images_are_skipped_and_logged_or_stop_the_run(ray_local, museum_dir, images, whitened_model,
                                                           tmp_path, caplog):
    root = tmp_path / "images"
    for key in images[:2]:
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(museum_dir / "images" / key, root / key)
    (root / "broken.jpg").write_bytes(b"not a jpeg at all")
    keys = images[:2] + ["broken.jpg"]
    with pytest.raises(ImageError, match="broken.jpg"):
        extract_to_store(root, keys, tmp_path / "strict.h5", config=TINY, model=whitened_model, ray=True)
    save_model(whitened_model, tmp_path / "model.pt")
    with caplog.at_level("WARNING", logger="how_met"):
        assert main(["extract", "--images", str(root), "--out", str(tmp_path / "f.h5"), "--skip-bad",
                     "--checkpoint", str(tmp_path / "model.pt"), "--features-num", "40",
                     "--image-size", "128", "--scales", "1", "--ray"]) == 0
    assert "broken.jpg" in caplog.text  # logged by the driver, not only in the worker's log
    with FeatureStore(tmp_path / "f.h5") as store:
        assert store.keys() == sorted(images[:2])


def test_evaluate_extraction_stage_on_ray(ray_local, museum_dir, museum_pairs, tmp_path):
    """``how-met evaluate --ray``'s extraction stage writes the features it writes without Ray."""
    from how_met.datasets import load_dataset
    from how_met.pipeline.settings import QUICK_SETTINGS
    from how_met.pipeline.stages import Timings, stage_extract
    pairs, by_class = museum_pairs
    classes = {v: k for k, v in by_class.items()}
    data = tmp_path / "data"
    data.mkdir()
    (data / "images").symlink_to(museum_dir / "images")
    (data / "database.json").write_text(json.dumps([{"id": classes[db], "path": db} for _, db in pairs[:3]]))
    (data / "queries.json").write_text(json.dumps([{"path": q, "MET_id": classes[db]} for q, db in pairs[:3]]))
    ds = load_dataset(data)
    settings = {**QUICK_SETTINGS, "extract": {**QUICK_SETTINGS["extract"], **{k: TINY[k] for k in
                                                                               ("scales", "features_num", "image_size")}}}
    stores = []
    for ray in (None, True):
        work = tmp_path / f"work-{ray}"
        work.mkdir()
        stores.append(stage_extract(ds, work, settings, Timings(work / "timings.json"), "cpu", ray=ray))
    with FeatureStore(stores[1]) as store:
        assert store.keys() == sorted(ds.all_keys())
    assert _dump(stores[1]) == _dump(stores[0])
