"""What runs on a worker: the per-process cache of expensive objects (a model on a GPU), the
thread budget, and the call of a job with a progress relay (dask event topics) and a cancel
token that also listens to a cluster-wide :class:`distributed.Event`."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

from napari_stpredict.distributed.cluster import THREADS_ENV
from napari_stpredict.errors import Cancelled
from napari_stpredict.progress import CancelToken

__all__ = [
    "CANCELLED",
    "clear_worker_cache",
    "remote_call",
    "worker_cache",
    "worker_cache_contains",
    "worker_threads",
]

#: seconds between two progress events of one job (the last one is always sent)
_EVENT_INTERVAL_S = 0.25
#: seconds between two looks at the cluster-wide cancel flag from a worker
_CANCEL_POLL_S = 0.5

# --------------------------------------------------------------------------------------------
# per-worker cache

_CACHE: dict[Hashable, Any] = {}
_CACHE_LOCK = threading.Lock()


def worker_cache(key: Hashable, factory: Callable[[], Any], *, max_items: int = 1) -> Any:
    """Return the object cached under ``key`` in this process, building it once with ``factory``.

    Worker processes outlive their tasks, so a model loaded by the first slide of a worker is
    reused by the next ones. At most ``max_items`` objects are kept (a model can hold a GPU's
    memory), least recently used first out. Thread-safe: a worker with several task slots
    builds each object once.

    Parameters
    ----------
    key
        Must change whenever the object would (e.g. model path, size, mtime, device).
    factory
        Builds the object.
    max_items
        How many objects to keep.
    """
    with _CACHE_LOCK:
        if key in _CACHE:
            value = _CACHE.pop(key)
            _CACHE[key] = value  # most recent last
            return value
        value = factory()
        _CACHE[key] = value
        while len(_CACHE) > max(1, max_items):
            _CACHE.pop(next(iter(_CACHE)))
        return value


def worker_cache_contains(key: Hashable) -> bool:
    """Whether :func:`worker_cache` holds ``key`` in this process."""
    with _CACHE_LOCK:
        return key in _CACHE


def clear_worker_cache() -> None:
    """Drop everything :func:`worker_cache` holds in this process."""
    with _CACHE_LOCK:
        _CACHE.clear()


def worker_threads() -> int | None:
    """CPU threads a job on this worker may use (set by :func:`start_local_cluster`), or None."""
    value = os.environ.get(THREADS_ENV)
    return int(value) if value and value.isdigit() else None


class _ThrottledEvents:
    """Progress callback on a worker: sends ``log_event`` at most every few hundred ms."""

    def __init__(self, topic: str, name: str) -> None:
        self.topic, self.name = topic, name
        self._last = 0.0

    def __call__(self, done: int, total: int | None, message: str = "") -> None:
        now = time.monotonic()
        final = total is not None and done >= total
        if not final and now - self._last < _EVENT_INTERVAL_S:
            return
        self._last = now
        from distributed import get_worker

        with contextlib.suppress(Exception):  # progress must never fail a job
            get_worker().log_event(
                self.topic,
                {"job": self.name, "done": int(done), "total": total, "message": str(message)},
            )


class _ClusterCancelToken(CancelToken):
    """A cancel token that is also set when the client sets a cluster-wide Event."""

    def __init__(self, event_name: str) -> None:
        super().__init__()
        self._event_name = event_name
        self._next_poll = 0.0

    @property
    def cancelled(self) -> bool:
        if self._event.is_set():
            return True
        now = time.monotonic()
        if now >= self._next_poll:
            self._next_poll = now + _CANCEL_POLL_S
            try:
                from distributed import Event

                if Event(self._event_name).is_set():
                    self._event.set()
            except Exception:  # scheduler gone: the nanny will stop us anyway
                pass
        return self._event.is_set()

    def raise_if_cancelled(self, what: str = "work") -> None:
        if self.cancelled:
            raise Cancelled(f"{what} cancelled")


#: what a job cancelled on a worker returns (raising would log a "Compute Failed" error there)
CANCELLED = "__stpredict_cancelled__"


def remote_call(fn: Callable[..., Any], job: Any, topic: str, cancel_event: str) -> Any:
    """Runs on a worker: call ``fn(job.payload, progress=..., cancel=...)`` with a progress
    relay and a cluster-aware cancel token; a cancelled job returns :data:`CANCELLED`."""
    try:
        return fn(
            job.payload,
            progress=_ThrottledEvents(topic, job.name),
            cancel=_ClusterCancelToken(cancel_event),
        )
    except Cancelled:
        return CANCELLED
