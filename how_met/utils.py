"""Small shared helpers: thread sizing, progress bars, atomic file writes and their leftovers,
writer locks, safe reading of .npy/.npz headers and HDF5 datasets, timestamps, L2
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
from typing import Dict, Iterable, Iterator, Optional, Sequence

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
    # torch last: the first import of faiss or numba resets torch's pool to every core (measured:
    # set to 1, then 2 after `import faiss, numba` on this 2-core machine -- ten times slower
    # training steps on a loaded machine)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
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
    Temporaries that killed processes left beside ``path`` are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path, (suffix, ".old", suffix + ".journal", suffix + ".lock"))
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


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (signal 0 probes without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except (OSError, OverflowError):
        return False
    return True


def remove_stale_temporaries(path: os.PathLike, suffixes: Sequence[str] = (".tmp", ".old")) -> None:
    """Delete the ``.<name>.<pid><suffix>`` siblings of ``path`` that killed processes left.

    Temporaries of processes still running (another writer) are left alone.
    """
    path = Path(path)
    prefix = f".{path.name}."
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        name = entry.name
        suffix = next((s for s in suffixes if name.endswith(s)), None)
        if suffix is None or not name.startswith(prefix):
            continue
        pid = name[len(prefix):-len(suffix)]
        if pid.isdigit() and not pid_alive(int(pid)):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()


class LockedError(RuntimeError):
    """Another process is writing the file."""


@contextlib.contextmanager
def writer_lock(path: os.PathLike):
    """Hold ``<path>.lock`` while writing ``path``; a second writer is refused with one line.

    An advisory ``flock`` on the lock file does the work: the kernel releases it when the holder
    dies, so a killed job leaves no stale lock, and it does not depend on HDF5's own file
    locking, which ``HDF5_USE_FILE_LOCKING=FALSE`` (common on NFS) turns off. The file holds
    the holder's host and pid for the message and is removed on release.
    """
    import fcntl
    import socket
    lock_path = Path(path).with_name(Path(path).name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockedError(f"{path}: another how-met process (host and pid: {holder}) is writing "
                              f"it; wait for it to finish") from None
        try:  # the previous holder may have removed the file between our open and flock
            if os.fstat(fd).st_ino == os.stat(lock_path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} {os.getpid()}".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)  # while still holding the lock: see the inode check above
        os.close(fd)


def read_npy_header(fh, where, available: int):
    """(shape, fortran_order, dtype) from the header of a .npy stream, refusing object arrays
    (pickles) and headers declaring more bytes than the ``available`` bytes that follow."""
    import numpy as np
    start = fh.tell()
    try:
        version = np.lib.format.read_magic(fh)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(fh)
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise ValueError(f"{where}: not a readable .npy array ({exc})") from None
    if dtype.hasobject:
        raise ValueError(f"{where}: holds Python objects (pickles are never loaded)")
    declared = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if declared > available - (fh.tell() - start):
        raise ValueError(f"{where}: declares a {dtype}{list(shape)} array ({declared} bytes) in a "
                         f"{available}-byte file (damaged or hostile file)")
    return shape, fortran, dtype


def check_npy_file(path: os.PathLike) -> None:
    """Refuse a .npy file whose header declares more data than the file holds (before np.load
    allocates it) or that holds pickled objects."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        read_npy_header(fh, path, size)


def load_npz(path: os.PathLike) -> Dict[str, "np.ndarray"]:
    """The arrays of an uncompressed .npz archive, read without pickles and without trusting
    its headers: each member must declare no more bytes than it holds, so a small file cannot
    make this allocate a huge array."""
    import zipfile
    import numpy as np
    path = Path(path)
    size = path.stat().st_size
    out = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                where = f"{path}[{info.filename}]"
                if info.compress_type != zipfile.ZIP_STORED or info.file_size > size:
                    raise ValueError(f"{where}: compressed or larger than the archive (how-met "
                                     f"writes plain, uncompressed archives)")
                with archive.open(info) as fh:
                    shape, fortran, dtype = read_npy_header(fh, where, info.file_size)
                    count = int(np.prod(shape, dtype=np.int64))
                    data = fh.read(count * dtype.itemsize)
                if len(data) != count * dtype.itemsize:
                    raise ValueError(f"{where}: truncated")
                out[info.filename[:-4]] = np.frombuffer(data, dtype, count).reshape(
                    shape, order="F" if fortran else "C").copy()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
        raise ValueError(f"{path}: not a readable .npz archive ({type(exc).__name__}: {exc})") from None
    return out


def h5_dataset_problem(group, name: str, numeric: bool = True) -> Optional[str]:
    """Why ``group[name]`` must not be read, or None: a link (soft or external: it may point
    anywhere), data kept outside the file (external or virtual storage), a filter pipeline,
    or more bytes declared than the file stores (a small file cannot make us allocate much)."""
    import h5py
    link = group.get(name, getlink=True)
    if link is None:
        return f"{name} is missing"
    if not isinstance(link, h5py.HardLink):
        return f"{name} is a link ({type(link).__name__}); links are refused"
    ds = group[name]
    if not isinstance(ds, h5py.Dataset):
        return f"{name} is not a dataset"
    if ds.external or ds.is_virtual:
        return f"{name} keeps its data outside the file (external or virtual storage is refused)"
    if numeric and (ds.compression is not None or ds.dtype.kind not in "fiub"):
        return f"{name} is compressed or of type {ds.dtype} (plain numeric arrays expected)"
    declared = ds.size * ds.dtype.itemsize
    stored = ds.id.get_storage_size()
    if numeric and declared and stored < declared:
        return (f"{name} declares shape {ds.shape} ({declared} bytes) but the file stores "
                f"{stored} (damaged or hostile file)")
    return None


def setup_logging(verbose: bool = False) -> None:
    """how-met's own messages from INFO (DEBUG with ``verbose``); other libraries' (faiss's
    loader chatter) only from WARNING, so an error stays one line on stderr."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)


def check_file_format(path, meta: dict, expected: str, version: int, what: str) -> None:
    """Refuse a self-describing file (its ``meta``) of another format or of a newer version
    than this how-met reads, with one line naming the file."""
    if meta.get("format") != expected:
        raise ValueError(f"{path}: not a how-met {what} (format {meta.get('format')!r})")
    found = meta.get("format_version", 0)
    if not isinstance(found, int) or isinstance(found, bool) or found > version:
        raise ValueError(f"{path}: {what} format version {found!r} is not supported (this how-met "
                         f"reads <= {version})")
