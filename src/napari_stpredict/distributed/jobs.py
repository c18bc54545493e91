"""Running jobs on the chosen scheduler: the worker cache, progress events, cancel, outcomes
(see :mod:`napari_stpredict.distributed`)."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

from napari_stpredict.distributed.cluster import (
    THREADS_ENV,
    SchedulerChoice,
    _close_quietly,
    connect,
    plan_local_cluster,
    start_local_cluster,
)
from napari_stpredict.errors import Cancelled, StPredictError
from napari_stpredict.progress import CancelToken, ProgressCallback

logger = logging.getLogger("napari_stpredict.distributed")

PROGRESS_TOPIC_PREFIX = "stpredict-progress-"
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


# --------------------------------------------------------------------------------------------
# running jobs


@dataclasses.dataclass(frozen=True)
class Job:
    """One unit of work.

    Attributes
    ----------
    name
        Unique among the jobs of a run; shown in progress and used in task keys.
    payload
        Passed to the job function (must pickle for a cluster).
    """

    name: str
    payload: Any


@dataclasses.dataclass
class JobOutcome:
    """What a job gave back.

    Attributes
    ----------
    job
        The job.
    result
        The function's return value (``None`` when it failed).
    error
        The exception when the job failed (a worker death included), else ``None``.
    """

    job: Job
    result: Any = None
    error: BaseException | None = None


#: a job function: ``fn(payload, *, progress, cancel) -> result``; module-level for a cluster
JobFunction = Callable[..., Any]
#: ``on_progress(job_name, done, total, message)``
JobProgress = Callable[[str, int, "int | None", str], None]


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


def _remote_call(fn: JobFunction, job: Job, topic: str, cancel_event: str) -> Any:
    """Runs on a worker: call ``fn`` with a progress relay and a cluster-aware cancel token."""
    try:
        return fn(
            job.payload,
            progress=_ThrottledEvents(topic, job.name),
            cancel=_ClusterCancelToken(cancel_event),
        )
    except Cancelled:
        return CANCELLED


def _run_inline(
    fn: JobFunction,
    jobs: Sequence[Job],
    *,
    on_progress: JobProgress | None,
    cancel: CancelToken | None,
) -> Iterator[JobOutcome]:
    for job in jobs:
        if cancel is not None and cancel.cancelled:
            raise Cancelled("cohort cancelled")
        progress: ProgressCallback | None = None
        if on_progress is not None:

            def progress(done, total, message="", _name=job.name):
                on_progress(_name, done, total, message)

        try:
            result = fn(job.payload, progress=progress, cancel=cancel)
        except Cancelled:
            raise
        except Exception as err:
            yield JobOutcome(job, error=err)
        else:
            yield JobOutcome(job, result=result)


def _run_on_client(
    client,
    fn: JobFunction,
    jobs: Sequence[Job],
    *,
    on_progress: JobProgress | None,
    cancel: CancelToken | None,
    resources: dict[str, float] | None,
) -> Iterator[JobOutcome]:
    from distributed import Event, as_completed

    run_id = uuid.uuid4().hex[:8]
    topic = PROGRESS_TOPIC_PREFIX + run_id
    cancel_name = f"stpredict-cancel-{run_id}"
    if on_progress is not None:

        def handler(event):
            _, msg = event
            try:
                on_progress(msg["job"], msg["done"], msg["total"], msg.get("message", ""))
            except Exception:  # a drawing glitch must not kill the client's event loop
                logger.debug("progress handler failed", exc_info=True)

        client.subscribe_topic(topic, handler)
    by_key = {}
    futures = []
    for i, job in enumerate(jobs):
        fut = client.submit(
            _remote_call,
            fn,
            job,
            topic,
            cancel_name,
            key=f"stpredict-{job.name}-{run_id}",
            pure=False,
            priority=len(jobs) - i,  # first slides first
            resources=resources,
        )
        by_key[fut.key] = job
        futures.append(fut)
    finished = False
    stop_requested = threading.Event()

    def stop_cluster_jobs() -> None:
        # running jobs stop after their batch in progress; queued ones are dropped
        if stop_requested.is_set():
            return
        stop_requested.set()
        with contextlib.suppress(Exception):
            Event(cancel_name, client=client).set()
        with contextlib.suppress(Exception):
            client.cancel([f for f in futures if f.status == "pending"])

    watcher = None
    if cancel is not None:
        # as_completed blocks until a job ends: a thread relays the token meanwhile
        def watch() -> None:
            while not finished and not stop_requested.is_set():
                if cancel.cancelled:
                    stop_cluster_jobs()
                    return
                time.sleep(0.2)

        watcher = threading.Thread(target=watch, name="stpredict-cancel-watch", daemon=True)
        watcher.start()
    try:
        for fut in as_completed(futures, loop=client.loop):
            if cancel is not None and cancel.cancelled:
                raise Cancelled("cohort cancelled")
            job = by_key[fut.key]
            if fut.cancelled():
                continue  # dropped by a cancel: reported when the loop ends
            try:
                result = fut.result()
            except Exception as err:  # the job raised, or its worker died (KilledWorker)
                yield JobOutcome(job, error=err)
                continue
            if isinstance(result, str) and result == CANCELLED:
                raise Cancelled("cohort cancelled")
            yield JobOutcome(job, result=result)
        if stop_requested.is_set():
            raise Cancelled("cohort cancelled")
        finished = True
    finally:
        if not finished:
            stop_cluster_jobs()
            with contextlib.suppress(Exception):
                client.cancel(futures)
        if on_progress is not None:
            with contextlib.suppress(Exception):
                client.unsubscribe_topic(topic)


def run_jobs(
    fn: JobFunction,
    jobs: Sequence[Job],
    *,
    scheduler: SchedulerChoice,
    workers: int | None = None,
    on_progress: JobProgress | None = None,
    on_cluster: Callable[[str], None] | None = None,
    cancel: CancelToken | None = None,
) -> Iterator[JobOutcome]:
    """Run ``fn`` over ``jobs`` and yield one :class:`JobOutcome` per job as it finishes.

    A job that raises gives an outcome with ``error`` set; the others go on. A cancel (the
    token, or Ctrl-C) stops running jobs at their next check and raises
    :class:`~napari_stpredict.errors.Cancelled` (or ``KeyboardInterrupt``) here.

    Parameters
    ----------
    fn
        ``fn(payload, *, progress, cancel) -> result``. For a cluster it must be importable
        (module level) and its result picklable.
    jobs
        The jobs, in the order they should start.
    scheduler
        From :func:`parse_scheduler`.
    workers
        Workers of a LocalCluster (default: :func:`plan_local_cluster`). Ignored otherwise.
    on_progress
        ``on_progress(job_name, done, total, message)``, called in this process (from a
        background thread when a cluster is used).
    on_cluster
        Called once with a line describing where the jobs run (and the dashboard link).
    cancel
        Cancels the run.

    Yields
    ------
    JobOutcome
    """
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise StPredictError("job names must be unique")
    if not jobs:
        return
    if scheduler.kind == "inline":
        if on_cluster is not None:
            on_cluster("scheduler: inline (this process, one slide after the other)")
        yield from _run_inline(fn, jobs, on_progress=on_progress, cancel=cancel)
        return

    from distributed import Client

    if scheduler.kind == "local":
        plan = plan_local_cluster(n_jobs=len(jobs), workers=workers)
        cluster = start_local_cluster(plan)
        try:
            with Client(cluster, set_as_default=False) as client:
                if on_cluster is not None:
                    has_bokeh = importlib.util.find_spec("bokeh") is not None
                    link = client.dashboard_link if has_bokeh else None
                    on_cluster(
                        f"scheduler: LocalCluster, {plan.describe()}"
                        + (f"; dashboard {link}" if link else "")
                    )
                yield from _run_on_client(
                    client, fn, jobs, on_progress=on_progress, cancel=cancel, resources=None
                )
        finally:
            _close_quietly(cluster)
        return

    assert scheduler.address is not None
    with connect(scheduler.address) as client:
        info = client.scheduler_info()
        wk = info.get("workers", {})
        # workers that declare a GPU resource run one slide per GPU at a time
        gpu_res = any("GPU" in (w.get("resources") or {}) for w in wk.values())
        if on_cluster is not None:
            link = getattr(client, "dashboard_link", None)
            on_cluster(
                f"scheduler: dask cluster {scheduler.address}, {len(wk)} worker(s)"
                + (" with GPU resources" if gpu_res else "")
                + (f"; dashboard {link}" if link else "")
            )
        yield from _run_on_client(
            client,
            fn,
            jobs,
            on_progress=on_progress,
            cancel=cancel,
            resources={"GPU": 1} if gpu_res else None,
        )
