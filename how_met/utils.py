"""Small shared helpers: thread sizing, progress bars, atomic file writes, timestamps, L2
normalisation, logging."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, Iterator, Optional

import numpy as np
from tqdm.auto import tqdm

logger = logging.getLogger("how_met")


def _cpu_times():
    """(all-CPU busy jiffies, all-CPU total jiffies, this process's jiffies) from /proc."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # guest time is already counted in user/nice
    with open("/proc/self/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    own = int(fields[11]) + int(fields[12])  # utime + stime, all threads
    return total - idle, total, own


def _cores_busy_elsewhere(cores: int, interval: float = 0.2) -> float:
    """How many cores other processes keep busy right now (sampled over ``interval``).

    The load average would count this process's own recent work as "busy" (after a stage
    that used both cores, the next would get one thread), so it is only the fallback.
    """
    try:
        busy0, total0, own0 = _cpu_times()
        time.sleep(interval)
        busy1, total1, own1 = _cpu_times()
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except OSError:
            return 0.0
    span = (total1 - total0) / max(cores, 1)  # jiffies per core in the interval
    if span <= 0:
        return 0.0
    return max(0.0, (busy1 - busy0) - (own1 - own0)) / span


def free_cores() -> int:
    """Cores this process may use that other processes are not already using.

    ``HOW_MET_THREADS`` overrides. Oversubscribing a busy machine is far worse than using one
    core fewer (faiss on a loaded 2-core box ran 6x slower with 2 threads than with 1).
    """
    env = os.environ.get("HOW_MET_THREADS")
    if env:
        return max(1, int(env))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        cores = os.cpu_count() or 1
    busy = _cores_busy_elsewhere(cores)
    return max(1, min(cores, int(round(cores - busy + 0.25))))


_configured_threads: Optional[int] = None


def configured_threads() -> Optional[int]:
    """The thread count the last ``configure_threads`` chose (None before the first call)."""
    return _configured_threads


def configure_threads(n: Optional[int] = None) -> int:
    """Size the torch, faiss and numba thread pools to ``n`` (default: free_cores()).

    torch only when the process has imported it already: importing it just to size its pool
    would load it into commands that run no network (``how-met index``); every stage that runs
    one imports torch first and calls this again.
    """
    global _configured_threads
    n = free_cores() if n is None else max(1, int(n))
    _configured_threads = n
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
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


# Distributions whose version can change a result (recorded in results.json).
RESULT_LIBRARIES = ("torch", "torchvision", "numpy", "scipy", "faiss-cpu", "numba", "h5py", "pillow")


def library_versions() -> Dict[str, Optional[str]]:
    """Installed versions of Python and of ``RESULT_LIBRARIES`` (None if not installed), read
    from the package metadata so nothing heavy is imported."""
    import platform
    from importlib import metadata
    versions: Dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in RESULT_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


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
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    The temporary may be a file or a directory; a directory replaces an existing directory
    (moved aside first, removed after), so ``path`` is never left half-written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{suffix}")
    old = path.with_name(f".{path.name}.{os.getpid()}.old")
    for stale in (tmp, old):
        _remove(stale)
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        for stale in (tmp, old):
            _remove(stale)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def write_json(path: os.PathLike, obj, indent: int = 1) -> None:
    """Write JSON atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=indent)
            fh.write("\n")


def l2_normalise(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm (all-zero rows stay zero), float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, eps)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def check_file_format(path, meta: dict, expected: str, version: int, what: str) -> None:
    """Refuse a self-describing file (its ``meta``) of another format or of a newer version
    than this how-met reads, with one line naming the file."""
    if meta.get("format") != expected:
        raise ValueError(f"{path}: not a how-met {what} (format {meta.get('format')!r})")
    if int(meta.get("format_version", 0)) > version:
        raise ValueError(f"{path}: {what} format version {meta['format_version']} is newer than this how-met")
