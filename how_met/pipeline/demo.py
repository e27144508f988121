"""``how-met demo``: the demo museum (``how_met.pipeline.museum``) built, evaluated and reported."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

from ..utils import write_json
from .museum import GENERATOR_VERSION, build_demo_museum, museum_is_built
from .settings import DEMO_SIZE, QUICK_SIZE


def check_work_dir(work: Path, stamp: dict) -> None:
    """Refuse to mix a new museum into a work directory holding results of another one."""
    stamp_path = work / "demo.json"
    if stamp_path.is_file():
        try:
            previous = json.loads(stamp_path.read_text())
        except ValueError:
            previous = None
        if previous == stamp:
            return
        raise ValueError(
            f"{work}: holds a demo run on another museum ({_describe(previous)}); "
            f"pass --work with a new directory or delete {work}")
    if work.is_dir() and any(p.name not in ("museum", "demo.json") for p in work.iterdir()):
        raise ValueError(f"{work}: exists and is not a how-met demo work directory; "
                         "pass --work with a new directory")


def _describe(stamp: Optional[dict]) -> str:
    if not isinstance(stamp, dict):
        return "unreadable demo.json"
    if stamp.get("data"):
        return f"data {stamp['data']}"
    return f"seed {stamp.get('seed')}, {'quick' if stamp.get('quick') else 'full'} size"


def run_demo(work: "str | Path" = "how-met-demo", data: "str | Path | None" = None,
             quick: bool = False, seed: int = 0, out=None) -> dict:
    """Build (or reuse) the museum, run the evaluation, print the table, write the report."""
    out = out or sys.stdout
    started = time.monotonic()
    work = Path(work)
    size = QUICK_SIZE if quick else DEMO_SIZE
    if data is not None:
        museum = Path(data).resolve()
        if not (museum / "database.json").is_file() or not (museum / "queries.json").is_file():
            raise FileNotFoundError(f"{museum}: not a Met-format directory (needs "
                                    "database.json and queries.json)")
        stamp = {"data": str(museum), "quick": bool(quick)}
    else:
        museum = work / "museum"
        stamp = {"data": None, "seed": int(seed), "quick": bool(quick), **size,
                 "version": GENERATOR_VERSION}
    check_work_dir(work, stamp)
    work.mkdir(parents=True, exist_ok=True)
    write_json(work / "demo.json", stamp)
    if data is None:
        if museum_is_built(museum, seed, **size):
            print(f"demo: reusing the museum in {museum}", file=out)
        else:
            print(f"demo: building a museum of {size['n_exhibits']} exhibits, "
                  f"{size['n_queries']} visitor photos and {size['n_distractors']} distractors "
                  f"in {museum}", file=out)
            build_demo_museum(museum, seed=seed, **size)
    out.flush()

    from . import evaluate, settings  # imported here: the heavy stack loads only when the demo runs
    from .report import write_report

    chosen = settings.QUICK_SETTINGS if quick else settings.DEFAULT_SETTINGS
    results = evaluate.run_evaluation(museum, work, settings=chosen, cv=2)
    print(evaluate.format_table(results), file=out)
    report = write_report(work)
    elapsed = time.monotonic() - started
    print(f"demo: report written to {report}", file=out)
    print(f"demo: done in {elapsed:.0f} s", file=out)
    out.flush()
    return results

