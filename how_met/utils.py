"""Small shared helpers: thread sizing, progress bars, atomic file writes, logging."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator, Optional

from tqdm.auto import tqdm

logger = logging.getLogger("how_met")


def free_cores() -> int:
    """Cores this process may use that are not already busy.

    ``HOW_MET_THREADS`` overrides. Oversubscribing a busy machine is far worse than using one
    core fewer (faiss on a loaded 2-core box ran 6x slower with 2 threads than with 1), so the
    1-minute load average of *other* processes is subtracted from the cores we may run on.
    """
    env = os.environ.get("HOW_MET_THREADS")
    if env:
        return max(1, int(env))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cores, int(round(cores - busy + 0.49))))


def configure_threads(n: Optional[int] = None) -> int:
    """Size the torch, faiss and numba thread pools to ``n`` (default: free_cores())."""
    n = free_cores() if n is None else max(1, int(n))
    try:
        import torch
        torch.set_num_threads(n)
    except ImportError:
        pass
    try:
        import faiss
        faiss.omp_set_num_threads(n)
    except ImportError:
        pass
    try:
        import numba
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass
    return n


def progress(iterable: Iterable = None, desc: str = "", total: Optional[int] = None,
             unit: str = "it", disable: Optional[bool] = None) -> Iterator:
    """A tqdm progress bar on stderr; silenced by HOW_MET_QUIET=1 and when stderr is not a
    terminal (so logs of batch jobs hold results, not bars)."""
    if disable is None and os.environ.get("HOW_MET_QUIET") == "1":
        disable = True
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable,
                file=sys.stderr, dynamic_ncols=True, leave=False)


@contextlib.contextmanager
def atomic_path(path: os.PathLike, suffix: str = ".tmp"):
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            if tmp.is_dir():
                import shutil
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink()


def write_json(path: os.PathLike, obj, indent: int = 1) -> None:
    """Write JSON atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=indent)
            fh.write("\n")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
