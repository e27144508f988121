"""Extraction on a Ray cluster (``extract_to_store(..., ray=...)``, ``how-met extract --ray``;
the streaming index build too: ``records_from_images(..., ray=...)``, ``how-met index --ray``).

The driver (the process that calls ``extract_to_store``) keeps everything that must be done
once: it opens the feature store, decides the model, lists the images still to do and records
the model in the store. The network runs on the cluster:

- the image list is cut into work units of ``unit_images`` consecutive keys, each one Ray task
  (``extract_unit``) on ``cpus_per_worker`` CPUs, or one GPU with ``device="cuda"``; the model
  travels once, as its state (``model_payload``) in Ray's object store, and each worker process
  builds it once and keeps it for every unit it runs;
- a unit returns its images' features to the driver, which writes them into its crash-safe
  store (journal + consolidation, ``how_met.features.store``) as units finish.

Why units come back to the driver instead of each worker writing a shard store for ``merge``:
the workers need no shared writable filesystem and no merge step, a unit's output becomes
durable only through the store's journal (a record per image, so an image is in the store
completely or not at all), and a rerun -- after a killed driver too -- skips exactly the images
the store holds, so finished units are never redone. Ray retries a unit whose worker died
(``max_retries``); a unit has no side effects, so running it twice is harmless. Bad images are
logged by the driver and skipped with ``skip_bad``, or stop the run with the usual one-line
error. A model without whitening learns it first in one task (``whitening_unit``, the same
``learn_whitening`` as one machine: the same whitening, so the same descriptors).

The workers read the images at ``image_root`` themselves: on a multi-machine cluster it must be
the same path on every node (a shared filesystem), and how-met must be installed on every node.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from .checkpoints import model_from_payload, model_payload
from .extract import _extract_batches, inference_copy, learn_whitening
from .network import HOWNet
from .store import FeatureStore, LocalFeatures
from ..utils import configure_threads, free_cores, progress

logger = logging.getLogger(__name__)

LOCAL = "local"  # the address that starts a Ray instance on this machine


def import_ray():
    try:
        import ray
    except ImportError:
        raise RuntimeError("Ray is not installed: pip install 'how-met[ray]'") from None
    return ray


@contextlib.contextmanager
def ray_session(address: Optional[str] = None):
    """Ray, connected: the instance this process already joined, else the cluster at
    ``address`` ("auto", "ray://head:10001", ...), else (None or "local") a new local instance
    sized to the free cores. Disconnects on exit from what it connected to, only."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    if address in (None, LOCAL):
        ray.init(num_cpus=free_cores(), include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def remote_result(ray, ref):
    """``ray.get(ref)``, raising a task's own exception (an ImageError, a ValueError) as itself so
    that the command line prints it as one line; a unit whose workers kept dying is a
    RuntimeError."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from None
        raise
    except ray.exceptions.RayError as exc:  # worker or node lost more often than max_retries
        raise RuntimeError(f"Ray: {str(exc).splitlines()[0]}") from None


# ---------------------------------------------------------------------------------------------
# On the workers
# ---------------------------------------------------------------------------------------------

_WORKER_MODEL: Dict[Tuple[str, str], HOWNet] = {}  # one model per worker process


def _worker_model(payload: dict, device: str) -> HOWNet:
    """The inference copy of the shipped model, built once per worker process (a process that
    receives another model drops the one it held)."""
    key = (payload["model_fingerprint"], device)
    if key not in _WORKER_MODEL:
        _WORKER_MODEL.clear()
        _WORKER_MODEL[key] = inference_copy(model_from_payload(payload, "the model shipped to this Ray worker", device))
    return _WORKER_MODEL[key]


def extract_unit(payload: dict, image_root: str, keys: Sequence[str], config: dict, device: str,
                 threads: int, batch_size: int, decode_workers: int, skip_bad: bool,
                 autocast: bool) -> Tuple[List[Tuple[str, LocalFeatures]], List[str]]:
    """One work unit: ([(key, features)] of its readable images, messages of those skipped)."""
    configure_threads(threads)
    skipped: List[str] = []
    features = list(_extract_batches(_worker_model(payload, device), Path(image_root), keys, config,
                                     batch_size, decode_workers, skip_bad, reduce=True,
                                     autocast=autocast, skipped=skipped))
    return features, skipped


def whitening_unit(payload: dict, image_root: str, keys: Sequence[str], config: dict, device: str,
                   threads: int, batch_size: int, decode_workers: int) -> dict:
    """Learn the model's PCA-whitening from ``keys`` (``learn_whitening``); the whitened model's
    payload."""
    configure_threads(threads)
    model = model_from_payload(payload, "the model shipped to this Ray worker", device)
    learn_whitening(model, Path(image_root), keys, config, batch_size=batch_size,
                    workers=decode_workers, skip_bad=True)
    return model_payload(model)


# ---------------------------------------------------------------------------------------------
# On the driver
# ---------------------------------------------------------------------------------------------


@dataclass
class RayExtraction:
    """How extraction uses a Ray cluster.

    address: None or "local" (a local instance sized to the free cores), "auto" (the cluster
    this machine belongs to, ``ray start``), or "ray://host:10001". unit_images: images per work
    unit (what a dead worker's retry redoes). cpus_per_worker: CPUs (= image threads) per unit on
    CPU workers. decode_workers: image-decoding processes per unit (useful beside a GPU).
    max_retries: reruns of a unit whose worker process died.
    """

    address: Optional[str] = None
    unit_images: int = 16
    cpus_per_worker: int = 1
    decode_workers: int = 0
    max_retries: int = 3

    def __post_init__(self):
        for name in ("unit_images", "cpus_per_worker"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"RayExtraction: {name} must be >= 1, got {getattr(self, name)}")
        if self.decode_workers < 0 or self.max_retries < 0:
            raise ValueError("RayExtraction: decode_workers and max_retries must be >= 0")

    def session(self):
        return ray_session(self.address)

    def _task(self, ray, fn, device: str):
        """``fn`` as a Ray task on the resources of one worker: a GPU for CUDA, else CPUs."""
        resources = {"num_cpus": self.cpus_per_worker}
        if device.startswith("cuda"):
            if ray.cluster_resources().get("GPU", 0) < 1:
                raise RuntimeError(f"--device {device}: the Ray cluster has no GPUs")
            resources["num_gpus"] = 1
        return ray.remote(fn).options(max_retries=self.max_retries, **resources)

    def workers(self, ray, device: str) -> int:
        """Units the cluster runs at once."""
        total = ray.cluster_resources()
        if device.startswith("cuda"):
            return max(1, int(total.get("GPU", 0)))
        return max(1, int(total.get("CPU", 1)) // self.cpus_per_worker)

    def learn_whitening(self, model: HOWNet, image_root, keys: Sequence[str], config: dict,
                        batch_size: int, device: str) -> None:
        """Learn ``model``'s whitening from ``keys`` on a worker and set it on ``model`` (as
        ``learn_whitening`` does on this machine)."""
        ray = import_ray()
        task = self._task(ray, whitening_unit, device)
        ref = task.remote(model_payload(model), str(Path(image_root).resolve()), list(keys), config,
                          device, self.cpus_per_worker, batch_size, self.decode_workers)
        whitened = model_from_payload(remote_result(ray, ref), "the model whitened on Ray")
        model.load_state_dict(whitened.state_dict())

    def iter_features(self, model: HOWNet, image_root, keys: Sequence[str], config: dict,
                      batch_size: int, skip_bad: bool, autocast: bool, device: str):
        """Yield (key, LocalFeatures) of the readable images of ``keys``, extracted in work units
        on the cluster (at most two units per worker in flight), unit by unit as they finish --
        not in key order. Bad images are logged (``skip_bad``) or raise. Closing the generator
        early cancels the units still running."""
        ray = import_ray()
        task = self._task(ray, extract_unit, device)
        payload = ray.put(model_payload(model))
        root = str(Path(image_root).resolve())
        units = iter([list(keys[i:i + self.unit_images]) for i in range(0, len(keys), self.unit_images)])
        limit = 2 * self.workers(ray, device)
        in_flight: Dict = {}
        bar = progress(total=len(keys), desc="extract (ray)", unit="img")
        try:
            while True:
                for unit in units:
                    ref = task.remote(payload, root, unit, config, device, self.cpus_per_worker,
                                      batch_size, self.decode_workers, skip_bad, autocast)
                    in_flight[ref] = unit
                    if len(in_flight) >= limit:
                        break
                if not in_flight:
                    break
                (ref,), _ = ray.wait(list(in_flight), num_returns=1)
                unit = in_flight.pop(ref)
                features, skipped = remote_result(ray, ref)
                for message in skipped:
                    logger.warning("skipping %s", message)
                yield from features
                bar.update(len(unit))
        finally:
            for ref in in_flight:  # interrupted or failed: stop the units still running
                ray.cancel(ref, force=True)
            bar.close()

    def write_features(self, store: FeatureStore, model: HOWNet, image_root, todo: Sequence[str],
                       config: dict, batch_size: int, skip_bad: bool, float16: bool, autocast: bool,
                       flush_every: int, device: str) -> int:
        """Extract ``todo`` on the cluster (``iter_features``) and write every image into
        ``store`` as its unit finishes. Returns images written."""
        done = 0
        with contextlib.closing(self.iter_features(model, image_root, todo, config, batch_size,
                                                   skip_bad, autocast, device)) as features:
            for key, feats in features:
                store.write(key, feats, float16=float16)
                done += 1
                if done % flush_every == 0:
                    store.flush()
        return done


def ray_extraction(ray: Union[bool, str, RayExtraction]) -> RayExtraction:
    """The ``ray=`` argument of ``extract_to_store`` as a RayExtraction (True: local)."""
    if isinstance(ray, RayExtraction):
        return ray
    if ray is True:
        return RayExtraction()
    if isinstance(ray, str):
        return RayExtraction(address=ray)
    raise TypeError(f"ray= takes True, a cluster address or a RayExtraction, not {ray!r}")
