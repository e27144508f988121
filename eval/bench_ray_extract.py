"""Extraction on a local Ray instance against the single-process path: the scheduling overhead.

    python eval/bench_ray_extract.py [--images 24] [--data ../shared/data/museum] [--workers 2]

The same real images, the same settings (the default extraction config, the shipped
lite0-corpus-v1 model, so no whitening pass) and the same cores: one process on ``--workers``
image threads (``HOW_MET_THREADS``), then a local Ray instance of ``--workers`` CPUs running one
single-threaded worker per CPU, in units of ``--unit`` images. Both paths first extract the
same few images once (file cache, first calls; on Ray: the workers start and build the model,
reported apart), then all of them, timed. Prints images/s of each and checks that both stores
hold the same bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import h5py

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from how_met.features.checkpoints import load_model  # noqa: E402
from how_met.features.distributed import RayExtraction  # noqa: E402
from how_met.features.extract import extract_to_store  # noqa: E402
from how_met.features.settings import resolve_config  # noqa: E402
from how_met.utils import configure_threads  # noqa: E402


def array_bytes(path: Path) -> dict:
    """{dataset name: its bytes} of an HDF5 file."""
    found = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: found.__setitem__(name, obj[()].tobytes())
                     if isinstance(obj, h5py.Dataset) else None)
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "museum")
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--workers", type=int, default=2, help="image threads / Ray CPUs")
    p.add_argument("--unit", type=int, default=4, help="images per Ray work unit")
    args = p.parse_args(argv)
    import ray

    keys = [e["path"] for e in json.loads((args.data / "database.json").read_text())][:args.images]
    root = args.data / "images"
    config = resolve_config(None)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        configure_threads(args.workers)
        os.environ["HOW_MET_THREADS"] = str(args.workers)
        warmup = keys[:args.unit * args.workers]  # the same first images warm both paths (file cache, first calls)
        extract_to_store(root, warmup, tmp / "warm-one.h5", config=config, model=load_model("lite0-corpus-v1"))
        one = extract_to_store(root, keys, tmp / "one.h5", config=config, model=load_model("lite0-corpus-v1"))

        t0 = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        started = time.perf_counter() - t0
        cluster = RayExtraction(unit_images=args.unit)
        # the first units: each worker process imports how-met and builds the model once
        warm = extract_to_store(root, warmup, tmp / "warm.h5", config=config, model=load_model("lite0-corpus-v1"),
                                ray=cluster)
        steady = extract_to_store(root, keys, tmp / "ray.h5", config=config, model=load_model("lite0-corpus-v1"),
                                  ray=cluster)
        ray.shutdown()
        identical = array_bytes(tmp / "one.h5") == array_bytes(tmp / "ray.h5")
    n = len(keys)
    print(f"# extraction of {n} museum images, default config, lite0-corpus-v1, {args.workers} cores "
          f"(load average {os.getloadavg()[0]:.1f}); stores identical: {identical}\n")
    print("| path | images/s | seconds |")
    print("|---|---:|---:|")
    print(f"| one process, {args.workers} image threads | {one['images_per_s']:.2f} | {one['seconds']:.1f} |")
    print(f"| Ray, {args.workers} workers x 1 thread, units of {args.unit} (workers warm) | "
          f"{steady['images_per_s']:.2f} | {steady['seconds']:.1f} |")
    print(f"| Ray, first {warm['extracted']} images (workers start, build the model) | "
          f"{warm['images_per_s']:.2f} | {warm['seconds']:.1f} |")
    print(f"\nRay instance start: {started:.1f} s; ratio Ray (warm) / one process: "
          f"{steady['images_per_s'] / one['images_per_s']:.2f}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
