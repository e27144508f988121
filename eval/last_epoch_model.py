"""Write the last finished epoch's model of a ``how-met train`` run as a model file, for
evaluating it when the validation kept an earlier epoch as ``--out``.

    python eval/last_epoch_model.py RUN_OUT.pt LAST.pt

RUN_OUT.pt is the run's ``--out``; its ``<stem>.training.pt`` holds the last epoch's weights.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from how_met.features.checkpoints import save_model  # noqa: E402
from how_met.training.trainer import last_epoch_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_out", type=Path, help="the training run's --out")
    parser.add_argument("out", type=Path, help="model file to write")
    args = parser.parse_args()
    model, epoch = last_epoch_model(args.run_out)
    save_model(model, args.out)
    print(json.dumps({"out": str(args.out), "epoch": epoch}))


if __name__ == "__main__":
    main()
