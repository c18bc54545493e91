"""Running jobs on the chosen scheduler (inline, a LocalCluster, a cluster address): submit,
relay progress and cancel, yield outcomes (see :mod:`napari_stpredict.distributed`; what runs
on the worker is in :mod:`.worker`)."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from napari_stpredict.distributed.cluster import (
    SchedulerChoice,
    _close_quietly,
    connect,
    plan_local_cluster,
    start_local_cluster,
)
from napari_stpredict.distributed.worker import (  # noqa: F401  (importable from here, as before)
    CANCELLED,
    clear_worker_cache,
    remote_call,
    worker_cache,
    worker_cache_contains,
    worker_threads,
)
from napari_stpredict.errors import Cancelled, StPredictError
from napari_stpredict.progress import CancelToken, ProgressCallback

logger = logging.getLogger("napari_stpredict.distributed")

PROGRESS_TOPIC_PREFIX = "stpredict-progress-"


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


def _relay_progress(client: Any, topic: str, on_progress: JobProgress) -> None:
    """Subscribe ``on_progress`` to the workers' progress events of this run."""

    def handler(event: Any) -> None:
        _, msg = event
        try:
            on_progress(msg["job"], msg["done"], msg["total"], msg.get("message", ""))
        except Exception:  # a drawing glitch must not kill the client's event loop
            logger.debug("progress handler failed", exc_info=True)

    client.subscribe_topic(topic, handler)


class _ClusterStop:
    """Stops a run's jobs on the cluster once: running jobs after their batch in progress
    (a cluster-wide Event), queued ones dropped; a thread relays a local cancel token to it
    (``as_completed`` blocks until a job ends)."""

    def __init__(self, client: Any, cancel_name: str, futures: list[Any]) -> None:
        self.client, self.cancel_name, self.futures = client, cancel_name, futures
        self.requested = threading.Event()
        self.finished = False

    def __call__(self) -> None:
        if self.requested.is_set():
            return
        self.requested.set()
        from distributed import Event

        with contextlib.suppress(Exception):
            Event(self.cancel_name, client=self.client).set()
        with contextlib.suppress(Exception):
            self.client.cancel([f for f in self.futures if f.status == "pending"])

    def watch(self, cancel: CancelToken) -> None:
        """Relay ``cancel`` from a daemon thread until the run finishes or is stopped."""

        def loop() -> None:
            while not self.finished and not self.requested.is_set():
                if cancel.cancelled:
                    self()
                    return
                time.sleep(0.2)

        threading.Thread(target=loop, name="stpredict-cancel-watch", daemon=True).start()


def _submit_all(
    client: Any,
    fn: JobFunction,
    jobs: Sequence[Job],
    *,
    run_id: str,
    topic: str,
    cancel_name: str,
    resources: dict[str, float] | None,
) -> dict[Any, tuple[Any, Job]]:
    """Submit every job (first jobs first); ``{task key: (future, job)}``."""
    submitted = {}
    for i, job in enumerate(jobs):
        fut = client.submit(
            remote_call,
            fn,
            job,
            topic,
            cancel_name,
            key=f"stpredict-{job.name}-{run_id}",
            pure=False,
            priority=len(jobs) - i,  # first slides first
            resources=resources,
        )
        submitted[fut.key] = (fut, job)
    return submitted


def _run_on_client(
    client,
    fn: JobFunction,
    jobs: Sequence[Job],
    *,
    on_progress: JobProgress | None,
    cancel: CancelToken | None,
    resources: dict[str, float] | None,
) -> Iterator[JobOutcome]:
    """Run the jobs on a dask client and yield their outcomes as they finish; a cancel stops
    the cluster's jobs and raises :class:`~napari_stpredict.errors.Cancelled` here."""
    from distributed import as_completed

    run_id = uuid.uuid4().hex[:8]
    topic = PROGRESS_TOPIC_PREFIX + run_id
    cancel_name = f"stpredict-cancel-{run_id}"
    if on_progress is not None:
        _relay_progress(client, topic, on_progress)
    submitted = _submit_all(
        client, fn, jobs, run_id=run_id, topic=topic, cancel_name=cancel_name, resources=resources
    )
    futures = [fut for fut, _ in submitted.values()]
    stop = _ClusterStop(client, cancel_name, futures)
    if cancel is not None:
        stop.watch(cancel)
    try:
        for fut in as_completed(futures, loop=client.loop):
            if cancel is not None and cancel.cancelled:
                raise Cancelled("cohort cancelled")
            if fut.cancelled():
                continue  # dropped by a cancel: reported when the loop ends
            outcome = _outcome(fut, submitted[fut.key][1])
            if outcome is None:
                raise Cancelled("cohort cancelled")
            yield outcome
        if stop.requested.is_set():
            raise Cancelled("cohort cancelled")
        stop.finished = True
    finally:
        if not stop.finished:
            stop()
            with contextlib.suppress(Exception):
                client.cancel(futures)
        if on_progress is not None:
            with contextlib.suppress(Exception):
                client.unsubscribe_topic(topic)


def _outcome(fut: Any, job: Job) -> JobOutcome | None:
    """The outcome of a finished future; ``None`` when the job was cancelled on its worker."""
    try:
        result = fut.result()
    except Exception as err:  # the job raised, or its worker died (KilledWorker)
        return JobOutcome(job, error=err)
    if isinstance(result, str) and result == CANCELLED:
        return None
    return JobOutcome(job, result=result)


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

    if scheduler.kind == "local":
        yield from _run_on_local_cluster(
            fn, jobs, workers=workers, on_progress=on_progress, on_cluster=on_cluster, cancel=cancel
        )
        return
    assert scheduler.address is not None
    yield from _run_on_address(
        fn,
        jobs,
        scheduler.address,
        on_progress=on_progress,
        on_cluster=on_cluster,
        cancel=cancel,
    )


def _run_on_local_cluster(
    fn: JobFunction,
    jobs: Sequence[Job],
    *,
    workers: int | None,
    on_progress: JobProgress | None,
    on_cluster: Callable[[str], None] | None,
    cancel: CancelToken | None,
) -> Iterator[JobOutcome]:
    """A LocalCluster sized to this machine for the run (closed at the end)."""
    from distributed import Client

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


def _run_on_address(
    fn: JobFunction,
    jobs: Sequence[Job],
    address: str,
    *,
    on_progress: JobProgress | None,
    on_cluster: Callable[[str], None] | None,
    cancel: CancelToken | None,
) -> Iterator[JobOutcome]:
    """A running dask cluster; workers that declare a GPU resource run one job per GPU."""
    with connect(address) as client:
        wk = client.scheduler_info().get("workers", {})
        gpu_res = any("GPU" in (w.get("resources") or {}) for w in wk.values())
        if on_cluster is not None:
            link = getattr(client, "dashboard_link", None)
            on_cluster(
                f"scheduler: dask cluster {address}, {len(wk)} worker(s)"
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
