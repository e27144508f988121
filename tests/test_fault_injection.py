"""Fault injection (issue 10): real `how-met` subprocesses are killed (SIGKILL at chosen points,
SIGTERM from outside) during extract, index and evaluate; every rerun must complete to the same
contents as a clean run. Tiny inputs: 8 small museum photos at 96 px, one scale."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

# Patches applied inside the subprocess before `how-met` runs; HOW_MET_FAULT=<point>:<n> picks
# one. Each ends the process with SIGKILL at the n-th occurrence of its point.
_RUNNER = textwrap.dedent("""
    import os, signal, sys, time
    point, n = os.environ.get("HOW_MET_FAULT", "none:0").split(":")
    n = int(n)
    count = [0]
    def due():
        count[0] += 1
        return count[0] == n
    def die():
        os.kill(os.getpid(), signal.SIGKILL)
    from how_met.features import store, network
    if point == "whitening":  # during the whitening pass (un-reduced extraction)
        extract = network.HOWNet.extract
        def patched(self, *args, **kwargs):
            if not kwargs.get("reduce", True) and due():
                die()
            return extract(self, *args, **kwargs)
        network.HOWNet.extract = patched
    elif point in ("after-image", "torn-image", "slow"):
        append = store.Journal._append
        def patched(self, header, payload):
            if header.get("type") != "image":
                return append(self, header, payload)
            if point == "torn-image" and due():  # half a record reaches the file, then death
                self._writer = self._writer or open(self.path, "ab")
                self._writer.write(b"HMJ1" + os.urandom(40))
                self._writer.flush()
                die()
            out = append(self, header, payload)
            if point == "after-image" and due():
                die()
            if point == "slow":
                count[0] += 1
                if count[0] == n:
                    open(os.environ["HOW_MET_FAULT_MARK"], "w").close()
                time.sleep(0.3)
            return out
        store.Journal._append = patched
    elif point in ("before-rename", "after-rename"):  # around a file's final rename
        replace = os.replace
        target = os.environ["HOW_MET_FAULT_TARGET"]
        def patched(src, dst):
            if os.path.basename(str(dst)) == target and point == "before-rename" and due():
                die()
            replace(src, dst)
            if os.path.basename(str(dst)) == target and point == "after-rename" and due():
                die()
        os.replace = patched
    from how_met.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _run(args, tmp_path, fault="none:0", check=True, **env):
    runner = tmp_path / "_runner.py"
    if not runner.exists():
        runner.write_text(_RUNNER)
    environ = {**os.environ, "PYTHONPATH": str(REPO), "HOW_MET_THREADS": "1", "HOW_MET_QUIET": "1",
               "HOW_MET_FAULT": fault, **env}
    proc = subprocess.run([sys.executable, str(runner), *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, env=environ)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _dump(path: Path) -> dict:
    """Every dataset and attribute of an HDF5 file, for comparing contents."""
    out = {}
    with h5py.File(path, "r") as f:
        # the model file is named after each store: compare what it holds (the fingerprint)
        out["/"] = {k: str(v) for k, v in f.attrs.items() if k != "model_file"}

        def visit(name, obj):
            attrs = {k: np.asarray(v).tolist() for k, v in obj.attrs.items()}
            out[name] = (attrs, obj[()].tobytes() + str(obj.dtype).encode() if isinstance(obj, h5py.Dataset) else None)
        f.visititems(visit)
    return out


@pytest.fixture(scope="module")
def tiny_images(tmp_path_factory, museum_dir):
    root = tmp_path_factory.mktemp("tiny")
    db = json.loads((museum_dir / "database.json").read_text())[:8]
    queries = [q for q in json.loads((museum_dir / "queries.json").read_text())
               if q.get("MET_id") in {e["id"] for e in db}][:4]
    for entry in db + queries:
        target = root / "images" / entry["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(museum_dir / "images" / entry["path"], target)
    (root / "database.json").write_text(json.dumps(db))
    (root / "queries.json").write_text(json.dumps(queries))
    return root


EXTRACT = ["extract", "--features-num", "40", "--image-size", "96", "--scales", "1", "--workers", "0"]


@pytest.fixture(scope="module")
def clean_store(tiny_images, tmp_path_factory):
    """The store of an uninterrupted `how-met extract` (what every interrupted run must reach)."""
    work = tmp_path_factory.mktemp("clean")
    _run([*EXTRACT, "--data", tiny_images, "--output", work / "clean.h5"], work)
    return work / "clean.h5"


def test_extract_killed_at_every_stage_continues_to_the_clean_store(tiny_images, clean_store, tmp_path):
    from how_met.features.store import FeatureStore, FeatureStoreError
    out = tmp_path / "killed.h5"
    args = [*EXTRACT, "--data", tiny_images, "--output", out]
    journal = out.with_name(out.name + ".journal")

    killed = _run(args, tmp_path, "whitening:3", check=False)  # during the whitening pass
    assert killed.returncode == -signal.SIGKILL and not out.exists()

    killed = _run(args, tmp_path, "after-image:3", check=False)  # 3 images finished
    assert killed.returncode == -signal.SIGKILL and journal.exists() and not out.exists()
    with pytest.raises(FeatureStoreError, match="rerun the same extract command"):
        FeatureStore(out)  # a reader meanwhile gets one line saying what to do

    killed = _run(args, tmp_path, "torn-image:2", check=False)  # 1 more finished, then a torn record
    assert killed.returncode == -signal.SIGKILL

    killed = _run(args, tmp_path, "before-rename:1", check=False, HOW_MET_FAULT_TARGET=out.name)
    assert killed.returncode == -signal.SIGKILL and not out.exists()  # consolidated, not renamed

    killed = _run(args, tmp_path, "after-rename:1", check=False, HOW_MET_FAULT_TARGET=out.name)
    assert killed.returncode == -signal.SIGKILL and out.exists() and journal.exists()

    done = _run(args, tmp_path)
    stats = json.loads(done.stdout.strip().splitlines()[-1])
    assert stats["skipped_existing"] == 12 and stats["extracted"] == 0  # nothing finished was lost
    assert not journal.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".killed.h5.")]
    assert _dump(out) == _dump(clean_store)


def test_sigterm_is_an_interrupt_and_the_rerun_continues(tiny_images, clean_store, tmp_path):
    out = tmp_path / "term.h5"
    mark = tmp_path / "two-done"
    (tmp_path / "_runner.py").write_text(_RUNNER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOW_MET_THREADS": "1", "HOW_MET_QUIET": "1",
           "HOW_MET_FAULT": "slow:2", "HOW_MET_FAULT_MARK": str(mark)}
    args = [*EXTRACT, "--data", tiny_images, "--output", out]
    proc = subprocess.Popen([sys.executable, str(tmp_path / "_runner.py"), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    deadline = time.time() + 300
    while not mark.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "interrupted (SIGTERM)" in err, err[-2000:]
    done = _run(args, tmp_path)
    assert json.loads(done.stdout.strip().splitlines()[-1])["skipped_existing"] >= 2
    assert _dump(out) == _dump(clean_store)


def test_index_save_killed_between_its_renames(clean_store, tmp_path):
    from how_met.asmk.codebook import Codebook
    from how_met.asmk.indexing import build_index
    from how_met.asmk.inverted_file import InvertedFile
    from how_met.features.store import FeatureStore
    with FeatureStore(clean_store) as store:
        data = np.concatenate([store.descriptors(k) for k in store.keys()])
    Codebook(size=16, iterations=3).train(data).save(tmp_path / "cb.npz")
    index = tmp_path / "index"
    reference = build_index(clean_store, tmp_path / "cb.npz", use_idf=True, show_progress=False)
    build_index(clean_store, tmp_path / "cb.npz", show_progress=False).save(index)
    # resaving swaps directories: index -> .index.<pid>.old, then .index.<pid>.tmp -> index
    killed = _run(["index", "--features", clean_store, "--codebook", tmp_path / "cb.npz", "--out", index,
                   "--idf"], tmp_path, "before-rename:1", check=False, HOW_MET_FAULT_TARGET="index")
    assert killed.returncode == -signal.SIGKILL and not index.exists()
    back = InvertedFile.load(index, mmap=False)  # recovered: the complete new save
    assert back.use_idf and back.keys == reference.keys
    expected = reference.arrays()
    assert all(np.array_equal(got, expected[name]) for name, got in back.arrays().items())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".index.")]


EVALUATE = ["evaluate", "--quick", "--features-num", "40", "--image-size", "96", "--scales", "1",
            "--codebook-size", "16", "--methods", "global,how-asmk", "--cv", "2"]


def test_evaluate_killed_during_extraction_gives_the_clean_results(tiny_images, tmp_path):
    """Also item 5: the resumed run loads model.pt and writes the same descriptors as the fresh
    run (which used to store projected float16-rounded whitening-pass features)."""
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    _run([*EVALUATE, "--data", tiny_images, "--work", clean], tmp_path)
    killed = _run([*EVALUATE, "--data", tiny_images, "--work", resumed], tmp_path, "after-image:5", check=False)
    assert killed.returncode == -signal.SIGKILL and (resumed / "model.pt").exists()
    _run([*EVALUATE, "--data", tiny_images, "--work", resumed], tmp_path)
    assert _dump(resumed / "features.h5") == _dump(clean / "features.h5")
    a, b = (json.loads((w / "results.json").read_text())["methods"] for w in (clean, resumed))
    assert {m: (r["GAP"], r["GAP-"], r["ACC"]) for m, r in a.items()} == \
        {m: (r["GAP"], r["GAP-"], r["ACC"]) for m, r in b.items()}


# -- in-process: evaluate's use of the data (items 3 and 4) ----------------------------------------

def _evaluate(data, work, **settings):
    from how_met.pipeline.evaluate import run_evaluation
    from how_met.pipeline.settings import QUICK_SETTINGS
    extract = {**QUICK_SETTINGS["extract"], "features_num": 40, "image_size": 96, "scales": [1.0]}
    return run_evaluation(data, work, settings={**QUICK_SETTINGS, "extract": extract, "codebook_size": 16,
                                                "methods": ["global", "how-asmk"]}, cv=2, **settings)


def test_evaluate_skip_bad_drops_bad_images_from_every_stage(tiny_images, tmp_path):
    """Before: a skipped image was still asked for ("no global descriptor for ...")."""
    data = tmp_path / "data"
    shutil.copytree(tiny_images, data)
    db = json.loads((data / "database.json").read_text())
    queries = json.loads((data / "queries.json").read_text())
    bad = [db[1]["path"], queries[0]["path"]]
    for key in bad:
        (data / "images" / key).write_bytes(b"not an image")
    results = _evaluate(data, tmp_path / "work", skip_bad=True)
    assert results["notes"]["skipped_images"] == sorted(bad, key=[e["path"] for e in db + queries].index)
    assert results["dataset"]["n_db"] == len(db) - 1 and results["dataset"]["n_queries"] == len(queries) - 1
    assert all(r["GAP"] is not None for r in results["methods"].values())


def test_evaluate_refuses_a_work_directory_made_from_other_data(tiny_images, tmp_path):
    """Before: adding database images silently returned the old results; removing one gave a
    bare-key error."""
    data = tmp_path / "data"
    shutil.copytree(tiny_images, data)
    work = tmp_path / "work"
    _evaluate(data, work)
    db = json.loads((data / "database.json").read_text())
    (data / "database.json").write_text(json.dumps(db[:-1]))
    with pytest.raises(ValueError, match="other data .database list"):
        _evaluate(data, work)
    (data / "database.json").write_text(json.dumps(db))
    image = data / "images" / db[0]["path"]
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10 ** 9))
    with pytest.raises(ValueError, match="image files"):
        _evaluate(data, work)
