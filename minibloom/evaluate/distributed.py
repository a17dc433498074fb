"""Spreading window-sized work over a Dask cluster (https://distributed.dask.org): connecting to one, the worker-side
model cache, and running tasks with their results kept in submission order.

The model travels to the workers as a ``ModelSpec`` (a path or hub id, the compute dtype and ``load`` options), never
as weights: each worker process loads it once, on its first task, and keeps it in a module-level cache keyed by the
spec. Dask is an optional dependency (``pip install minibloom[dask]``), imported only when a cluster is asked for.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..bloom import Bloom, load
from ..errors import MinibloomError, shown

DASK_MISSING = "Dask is not installed: pip install minibloom[dask] (or pip install \"dask[distributed]\")"


@dataclass(frozen=True)
class ModelSpec:
    """What a worker needs to load a model: ``path`` (a checkpoint path, a name under weights/, a hub id, or None for
    the default model), the compute ``dtype`` and the other ``minibloom.load`` keyword arguments as sorted pairs."""

    path: str | None
    dtype: str = "float32"
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def make(cls, path: str | os.PathLike | None, dtype: str = "float32", **options) -> "ModelSpec":
        """A spec whose local path is made absolute (workers started elsewhere resolve it the same way)."""
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise MinibloomError(f"model: a Dask worker loads the model itself, so pass it as a path or hub id, got "
                                 f"{type(path).__name__}")
        if path is not None:
            path = os.fspath(path)
            if os.path.exists(path):
                path = os.path.abspath(path)
        return cls(path, str(dtype), tuple(sorted((k, v) for k, v in options.items() if v is not None)))

    def load(self) -> Bloom:
        return load(self.path, dtype=self.dtype, progress=False, **dict(self.options))

    def __str__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options)
        return f"{self.path or 'weights/default'} ({self.dtype}{opts})"


_MODELS: dict[ModelSpec, Bloom] = {}
_LOADS: dict[ModelSpec, int] = {}
_LOCK = threading.Lock()


def worker_model(spec: ModelSpec) -> Bloom:
    """The model ``spec`` names, loaded on this process's first call and kept for the next ones (each Dask worker
    process holds its own cache; a worker with several threads loads it once too)."""
    with _LOCK:
        model = _MODELS.get(spec)
        if model is None:
            model = _MODELS[spec] = spec.load()
            _LOADS[spec] = _LOADS.get(spec, 0) + 1
        return model


def cached_models() -> dict[str, int]:
    """{spec: times loaded} of this process's cache (``client.run(cached_models)`` asks every worker)."""
    return {str(spec): n for spec, n in _LOADS.items() if spec in _MODELS}


def clear_cache() -> None:
    """Drop this process's cached models (``client.run(clear_cache)`` on every worker)."""
    with _LOCK:
        _MODELS.clear()
        _LOADS.clear()


def _dask():
    try:
        import distributed
    except ImportError:
        raise MinibloomError(DASK_MISSING) from None
    return distributed


SCHEMES = ("tcp", "tls", "ws", "wss", "ucx", "inproc")  # distributed's comm backends
DEFAULT_PORT = 8786  # a Dask scheduler's port when an address names none
CONNECT_TIMEOUT = 10.0  # seconds to wait for a scheduler before giving up (default of ``timeout``)
MAX_TIMEOUT = 3600.0


def check_scheduler(scheduler) -> str:
    """``scheduler`` checked as a Dask address ``SCHEME://HOST:PORT`` (``inproc://...`` has no port; a bare
    ``HOST:PORT`` means tcp), before anything connects; errors name --scheduler."""
    if not isinstance(scheduler, str) or not scheduler or len(scheduler) > 1024 or not scheduler.isprintable():
        raise MinibloomError(f"--scheduler: expected an address such as tcp://HOST:8786, got {shown(scheduler)}")
    scheme, sep, rest = scheduler.partition("://")
    if not sep:
        scheme, rest = "tcp", scheduler
    scheme = scheme.lower()
    if scheme not in SCHEMES:
        raise MinibloomError(f"--scheduler {scheduler}: unknown scheme {scheme!r} (a Dask address starts with "
                             f"{', '.join(s + '://' for s in SCHEMES)})")
    if scheme == "inproc":
        if not rest:
            raise MinibloomError(f"--scheduler {scheduler}: no address after inproc://")
        return scheduler
    host, colon, port = rest.rpartition(":")
    if not colon and rest and "/" not in rest and " " not in rest:  # HOST alone: Dask's default port
        host, colon, port = rest, ":", str(DEFAULT_PORT)
    if not colon or not host or host in ("[]",) or "/" in host or " " in host:
        raise MinibloomError(f"--scheduler {scheduler}: expected {scheme}://HOST:PORT (a host and a port, e.g. "
                             f"{scheme}://127.0.0.1:8786)")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise MinibloomError(f"--scheduler {scheduler}: port {port!r} is not a port number (1 to 65535)")
    return f"{scheme}://{host}:{port}"


def check_timeout(timeout, name: str = "timeout") -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_TIMEOUT:
        raise MinibloomError(f"{name}: must be a number of seconds in (0, {MAX_TIMEOUT:g}], got {shown(timeout)}")
    return float(timeout)


def check_cluster_args(scheduler: str | None, workers: int | None) -> None:
    if scheduler is not None and workers is not None:
        raise MinibloomError("scheduler / workers: give one of them (an existing cluster, or N local worker processes)")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, (int, np.integer))
                                or not 1 <= workers <= 1024):
        raise MinibloomError(f"workers: must be an integer from 1 to 1024, got {shown(workers)}")
    if scheduler is not None:
        check_scheduler(scheduler)


@contextmanager
def connect(scheduler: str | None = None, workers: int | None = None, *,
            timeout: float = CONNECT_TIMEOUT) -> Iterator[Any]:
    """A ``dask.distributed.Client``: of the cluster at ``scheduler`` (``tcp://HOST:8786``), or of a new
    ``LocalCluster`` of ``workers`` processes with one thread each, closed on exit (an existing cluster stays up).
    Connecting to ``scheduler`` says so on stderr first and gives up after ``timeout`` seconds with a
    MinibloomError."""
    check_cluster_args(scheduler, workers)
    timeout = check_timeout(timeout)
    if scheduler is None and workers is None:
        raise MinibloomError("scheduler / workers: give an address tcp://HOST:8786 or a number of local workers")
    dd = _dask()
    if scheduler is not None:
        address = check_scheduler(scheduler)
        print(f"connecting to the Dask scheduler at {address} (giving up after {timeout:g} s)", file=sys.stderr,
              flush=True)
        try:
            client = dd.Client(address, timeout=timeout)
        except Exception as e:  # noqa: BLE001 - OSError, TimeoutError, distributed's ValueError / CommClosedError
            raise MinibloomError(f"--scheduler {scheduler}: cannot connect within {timeout:g} s "
                                 f"({type(e).__name__}: {str(e)[:200]})") from None
        try:
            yield client
        finally:
            client.close()
        return
    # memory_limit=0: no spilling or pausing by Dask's memory monitor; a worker's memory is its model and one window
    try:
        cluster = dd.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                                  memory_limit=0, silence_logs=40)
    except Exception as e:  # noqa: BLE001 - no ports, no process spawning, a worker dying at start ...
        raise MinibloomError(f"--workers {workers}: cannot start a local Dask cluster ({type(e).__name__}: "
                             f"{str(e)[:200]})") from None
    with cluster, dd.Client(cluster) as client:
        yield client


def worker_count(client) -> int:
    return len(client.scheduler_info().get("workers", {}))


def map_ordered(client, fn: Callable, tasks: Sequence[tuple], progress: Callable[[], None] | None = None) -> list:
    """``[fn(*args) for args in tasks]`` on the cluster's workers, returned in the order of ``tasks`` whatever the
    order they finish in; ``progress()`` is called as each one finishes. A task's error is raised here."""
    dd = _dask()
    futures = [client.submit(fn, *args, pure=False) for args in tasks]
    index = {f.key: i for i, f in enumerate(futures)}
    results: list = [None] * len(futures)
    try:
        for future in dd.as_completed(futures):
            i = index[future.key]
            results[i] = future.result()  # a worker's exception is raised here
            futures[i] = future = None  # the worker may drop the result now
            if progress is not None:
                progress()
        return results
    finally:
        client.cancel([f for f in futures if f is not None])
