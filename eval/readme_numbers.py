"""The numbers of the README, regenerated: ``python eval/readme_numbers.py [WORK_ROOT]``.

1. ``how-met demo`` (the bundled-photo museum) and ``how-met evaluate`` on ../shared/data/museum
   (2-fold cross-tuning), fresh work directories, default settings: their tables.
2. ``how-met identify`` with the recogniser that evaluation wrote, on every museum query photo:
   how its answers compare with what validation promised (precision of the accepted answers,
   share of distractors rejected), on the validation queries and on the held-out ones.

Prints markdown with the date, for pasting into the README.
"""
from __future__ import annotations

import datetime
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parents[1]
DATA = HERE.parent / "shared" / "data"


def run(*args) -> str:
    started = time.perf_counter()
    # python -m: the how-met of this checkout (PYTHONPATH), not whichever is installed
    out = subprocess.run([sys.executable, "-m", "how_met.cli", *args], check=True, capture_output=True,
                         text=True).stdout
    print(f"$ how-met {' '.join(args)}   ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return out


def table(results_md: Path) -> str:
    return "\n".join(line for line in results_md.read_text().splitlines() if line.startswith("|"))


def identify_figures(work: Path, museum: Path, answers=None) -> str:
    """Run ``how-met identify`` on every query photo (or take its output lines ``answers``) and
    compare with what recogniser.json promised on the validation queries."""
    from how_met.datasets import load_dataset
    from how_met.recognition.acceptance import acceptance_figures
    from how_met.recognition.protocol import protocol_folds
    recogniser = json.loads((work / "recogniser" / "recogniser.json").read_text())
    ds = load_dataset(museum)
    if answers is None:
        photos = [str(ds.image_root / k) for k in ds.query_keys]
        answers = run("identify", "--recogniser", str(work / "recogniser"), *photos).strip().splitlines()
    by_photo = {Path(a["image"]).relative_to(ds.image_root).as_posix(): a for a in map(json.loads, answers)}
    answers = [by_photo[k] for k in ds.query_keys]
    log_odds = np.array([-np.inf if a["log_odds"] is None else a["log_odds"] for a in answers])
    accepted = np.array([a["accepted"] for a in answers])
    predicted = np.array([a["exhibit"] if a["accepted"] else -1 for a in answers], np.int64)
    threshold = recogniser["accept"]["log_odds"]
    assert (log_odds[accepted] >= threshold).all()
    _, folds = protocol_folds(ds, 2, 0)
    tune_rows, test_rows = folds[0]
    rows = []
    for name, positions, promised in (("validation (tuning queries of fold 1)", tune_rows, recogniser["accept"]["tuning"]),
                                      ("held out (test queries of fold 1)", test_rows, recogniser["accept"]["test"]),
                                      ("all", np.arange(len(answers)), None)):
        got = acceptance_figures(np.where(accepted[positions], np.inf, -np.inf), predicted[positions],
                                 ds.query_labels[positions], 0.0)

        def cell(key):
            return f"{got[key]}" + ("" if promised is None else f" ({promised[key]})")
        rows.append(f"| {name} | {got['queries']} ({got['distractors']} distractors) | {got['accepted']} | "
                    f"{cell('precision')} | {cell('positives_right')} | {cell('distractors_rejected')} |")
    header = ("| queries | photos | accepted | precision of accepted (evaluate) | positives answered right "
              "(evaluate) | distractors rejected (evaluate) |\n|---|---:|---:|---:|---:|---:|")
    return (f"Recogniser: method {recogniser['method']}, K {recogniser['K']}, t {recogniser['t']}, accept at "
            f"log-odds >= {threshold:.3g} (target precision {recogniser['accept']['target_precision']}).\n\n"
            + header + "\n" + "\n".join(rows))


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "readme-numbers")
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    museum = DATA / "museum"
    run("demo", "--work", str(root / "demo"))
    run("evaluate", "--data", str(museum), "--cv", "2", "--work", str(root / "museum"), "--report")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    print(f"Measured {date} with `python eval/readme_numbers.py` (fresh work directories).\n")
    print("how-met demo:\n\n" + table(root / "demo" / "results.md") + "\n")
    print("how-met evaluate --data ../shared/data/museum --cv 2:\n\n" + table(root / "museum" / "results.md") + "\n")
    print("how-met identify on the 164 museum query photos with museum/recogniser:\n")
    print(identify_figures(root / "museum", museum))


if __name__ == "__main__":
    main()
