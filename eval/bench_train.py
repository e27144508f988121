"""Training speed: seconds per tuple (1 query, 1 positive, 5 negatives: 7 forward + backward
passes at scale 1) of ``how-met train``, and what mining the hard negatives costs per image.

    python eval/bench_train.py [--data ../shared/data/museum] [--tuples 10] [--image-size 500] [--device cpu]

One epoch of ``train_model`` on the database images (synthetic pairs), starting from the shipped
corpus model, no validation; prints wall and CPU seconds per tuple (on a machine shared with other
jobs the CPU seconds are the figure to compare) and per mined image.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from how_met.datasets import load_directory  # noqa: E402
from how_met.features.checkpoints import load_model  # noqa: E402
from how_met.training.data import training_images  # noqa: E402
from how_met.training.settings import TrainingSettings  # noqa: E402
from how_met.training.trainer import train_model  # noqa: E402
from how_met.utils import configure_threads  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "museum")
    parser.add_argument("--tuples", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=500)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    threads = configure_threads()
    images = training_images([load_directory(args.data)])
    settings = TrainingSettings(epochs=1, tuples_per_epoch=args.tuples, pool_size=2 * args.tuples,
                                image_size=args.image_size, val_images=0)
    with tempfile.TemporaryDirectory() as tmp:
        result = train_model(images, Path(tmp) / "model.pt", settings,
                             model=load_model("lite0-corpus-v1", args.device), device=args.device)
    epoch = result["history"][1]
    print(json.dumps({"device": args.device, "threads": threads, "image_size": args.image_size,
                      "tuples": epoch["tuples"], "s_per_tuple": round(epoch["s_per_tuple"], 3),
                      "cpu_s_per_tuple": round(epoch["cpu_s_per_tuple"], 3),
                      "mining_s_per_image": round(epoch["mining_s"] / (3 * args.tuples), 3)}))


if __name__ == "__main__":
    main()
