"""Where the jobs of a cohort run: in this process, on a LocalCluster, or on an existing cluster.

A *job* is one unit of work (for ``stpredict predict``: one slide). :func:`run_jobs` runs a
module-level function over jobs and yields their outcomes as they finish, whatever the
scheduler:

- ``inline`` (or ``none``): one after the other in this process;
- ``local``: a :mod:`dask.distributed` cluster on this machine, sized by
  :func:`plan_local_cluster` (one worker per GPU with ``CUDA_VISIBLE_DEVICES`` set per worker,
  otherwise CPU workers sharing the cores);
- ``tcp://HOST:PORT`` (any dask scheduler address): an existing cluster, e.g. one started by
  dask-jobqueue or the dask Kubernetes operator. Its dashboard shows the tasks.

Workers report progress to the client through dask's event topics and honour a cancel request
through a :class:`distributed.Event`, so the same ``progress``/``cancel`` protocol as everywhere
else in the package works across processes. Things that are expensive to build (a model on a
GPU) are cached per worker process with :func:`worker_cache`.

Nothing here knows about slides: see :mod:`napari_stpredict.cohort`.
"""

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
from typing import Any, Literal

from napari_stpredict.errors import Cancelled, StPredictError
from napari_stpredict.progress import CancelToken, ProgressCallback

__all__ = [
    "ClusterPlan",
    "Job",
    "JobOutcome",
    "SchedulerChoice",
    "parse_scheduler",
    "plan_local_cluster",
    "run_jobs",
    "start_local_cluster",
    "visible_gpus",
    "worker_cache",
    "worker_cache_contains",
]

logger = logging.getLogger(__name__)

PROGRESS_TOPIC_PREFIX = "stpredict-progress-"
#: environment variable read by jobs to size torch's intra-op thread pool on a worker
THREADS_ENV = "STPREDICT_WORKER_THREADS"
#: seconds between two progress events of one job (the last one is always sent)
_EVENT_INTERVAL_S = 0.25
#: seconds between two looks at the cluster-wide cancel flag from a worker
_CANCEL_POLL_S = 0.5


# --------------------------------------------------------------------------------------------
# choosing the scheduler


@dataclasses.dataclass(frozen=True)
class SchedulerChoice:
    """A parsed ``--scheduler`` value.

    Attributes
    ----------
    kind
        ``"inline"`` (this process), ``"local"`` (a new LocalCluster) or ``"address"``.
    address
        The scheduler address for ``kind == "address"`` (e.g. ``"tcp://10.0.0.5:8786"``).
    """

    kind: Literal["inline", "local", "address"]
    address: str | None = None

    def __str__(self) -> str:
        return self.address if self.kind == "address" else self.kind


_ADDRESS_SCHEMES = ("tcp://", "tls://", "ucx://", "ws://", "wss://", "inproc://")


def parse_scheduler(value: str) -> SchedulerChoice:
    """Parse a ``--scheduler`` value.

    Parameters
    ----------
    value
        ``"local"``, ``"inline"``/``"none"``, or a dask scheduler address such as
        ``"tcp://HOST:PORT"`` (``HOST:PORT`` alone means ``tcp://HOST:PORT``).

    Returns
    -------
    SchedulerChoice

    Raises
    ------
    StPredictError
        If the value is none of these.
    """
    text = value.strip()
    low = text.lower()
    if low in ("local", "localcluster"):
        return SchedulerChoice("local")
    if low in ("inline", "none", "sync", "synchronous"):
        return SchedulerChoice("inline")
    if low.startswith(_ADDRESS_SCHEMES):
        return SchedulerChoice("address", text)
    host, sep, port = text.rpartition(":")
    if sep and host and port.isdigit():
        return SchedulerChoice("address", f"tcp://{text}")
    raise StPredictError(
        f"--scheduler {value!r}: expected 'local', 'inline' or a dask scheduler address "
        "such as tcp://HOST:8786"
    )


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as ``CUDA_VISIBLE_DEVICES`` entries.

    ``CUDA_VISIBLE_DEVICES`` is honoured when set (so a job scheduler's GPU allocation is
    respected); otherwise torch counts the devices. No CUDA context is created.
    """
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        ids = [d.strip() for d in env.split(",") if d.strip()]
        # "-1" or "" hide every GPU; an invalid id hides the ones after it (CUDA semantics)
        out: list[str] = []
        for d in ids:
            if d.startswith("-"):
                break
            out.append(d)
        return out
    if importlib.util.find_spec("torch") is None:
        return []
    import torch

    try:
        n = torch.cuda.device_count()
    except Exception:  # a broken driver must not stop CPU work
        n = 0
    return [str(i) for i in range(n)]


@dataclasses.dataclass(frozen=True)
class ClusterPlan:
    """How a LocalCluster is laid out.

    Attributes
    ----------
    n_workers
        Worker processes.
    threads_per_worker
        CPU threads each worker's job may use (torch intra-op threads, tile decoding).
    gpus
        One entry per worker: the ``CUDA_VISIBLE_DEVICES`` value it gets, or ``None`` (CPU).
    """

    n_workers: int
    threads_per_worker: int
    gpus: tuple[str | None, ...]

    def describe(self) -> str:
        """One line for the CLI."""
        n_gpu = sum(g is not None for g in self.gpus)
        dev = f", {n_gpu} GPU(s): one per worker" if n_gpu else ", CPU"
        return f"{self.n_workers} worker(s) × {self.threads_per_worker} thread(s){dev}"


def plan_local_cluster(
    *,
    n_jobs: int,
    workers: int | None = None,
    cores: int | None = None,
    gpus: Sequence[str] | None = None,
    cores_per_cpu_worker: int = 4,
) -> ClusterPlan:
    """Size a LocalCluster for ``n_jobs`` jobs on this machine.

    With GPUs there is one worker per GPU (each sees only its own device through
    ``CUDA_VISIBLE_DEVICES``) and the CPU cores are shared among them for reading tiles. Without
    GPUs, one worker per ``cores_per_cpu_worker`` cores: a CNN forward pass already uses several
    cores, so many single-threaded workers would only multiply the memory of the model.
    Never more workers than jobs.

    Parameters
    ----------
    n_jobs
        Number of jobs (slides) to run.
    workers
        Force the number of workers (``--workers``). With GPUs, workers beyond the GPU count
        share GPUs round-robin.
    cores
        CPU cores to use (default: those this process may run on).
    gpus
        GPU ids (default: :func:`visible_gpus`).
    cores_per_cpu_worker
        Cores given to each worker when there is no GPU and ``workers`` is not set.

    Returns
    -------
    ClusterPlan
    """
    if workers is not None and workers < 1:
        raise StPredictError(f"--workers {workers}: must be at least 1")
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # macOS, Windows
            cores = os.cpu_count() or 1
    cores = max(1, int(cores))
    gpu_ids = list(visible_gpus() if gpus is None else gpus)
    n_jobs = max(1, int(n_jobs))
    if workers is None:
        n = len(gpu_ids) if gpu_ids else max(1, cores // max(1, cores_per_cpu_worker))
        n = min(n, n_jobs)
    else:
        n = int(workers)
    threads = max(1, cores // n)
    assigned: tuple[str | None, ...] = (
        tuple(gpu_ids[i % len(gpu_ids)] for i in range(n)) if gpu_ids else (None,) * n
    )
    return ClusterPlan(n_workers=n, threads_per_worker=threads, gpus=assigned)


def start_local_cluster(plan: ClusterPlan, *, dashboard: bool = True):
    """Start a LocalCluster laid out as ``plan`` and return it (close it when done).

    Each worker is a separate process (a nanny restarts it if it dies) with one task slot, so a
    worker runs one job at a time and gives that job all of its threads and its GPU, and an
    equal share of the machine's memory. Workers get
    ``CUDA_VISIBLE_DEVICES`` and thread-count variables through their environment, before torch is
    imported there.

    Parameters
    ----------
    plan
        From :func:`plan_local_cluster`.
    dashboard
        Serve the dask dashboard (needs ``bokeh``; skipped silently when it is missing).

    Returns
    -------
    distributed.SpecCluster
    """
    from distributed import Nanny, Scheduler, SpecCluster
    from distributed.system import MEMORY_LIMIT

    has_bokeh = importlib.util.find_spec("bokeh") is not None
    workers: dict[str, dict[str, Any]] = {}
    for i, gpu in enumerate(plan.gpus):
        env = {
            THREADS_ENV: str(plan.threads_per_worker),
            "OMP_NUM_THREADS": str(plan.threads_per_worker),
            "MKL_NUM_THREADS": str(plan.threads_per_worker),
        }
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        options: dict[str, Any] = {
            "nthreads": 1,
            "env": env,
            # "auto" would give a 1-thread worker only 1/cores of the RAM
            "memory_limit": max(1, MEMORY_LIMIT // max(1, plan.n_workers)),
            "silence_logs": logging.ERROR,
            "dashboard": False,
        }
        if gpu is not None:
            options["resources"] = {"GPU": 1}
        workers[f"stpredict-{i}" + (f"-gpu{gpu}" if gpu is not None else "")] = {
            "cls": Nanny,
            "options": options,
        }
    scheduler = {
        "cls": Scheduler,
        "options": {
            "host": "127.0.0.1",
            "dashboard": bool(dashboard and has_bokeh),
            "dashboard_address": ":8787" if dashboard and has_bokeh else None,
        },
    }
    try:
        # ERROR: the nanny's "still alive, killing" on close is noise for a finished run
        return SpecCluster(
            workers=workers, scheduler=scheduler, silence_logs=logging.ERROR, name="stpredict"
        )
    except Exception as err:  # ports, spawn failures: say it in one line
        raise StPredictError(f"--scheduler local: could not start a LocalCluster ({err})") from err


def _close_quietly(cluster) -> None:
    """Close a LocalCluster without the nanny's "still alive after 4 s, killing" warning.

    A worker that has loaded torch can take a few seconds to exit; the nanny then kills it,
    which is fine at the end of a run and not worth a warning on the user's terminal.
    """
    nanny_log = logging.getLogger("distributed.nanny")
    level = nanny_log.level
    nanny_log.setLevel(logging.ERROR)
    try:
        cluster.close()
    finally:
        nanny_log.setLevel(level)


@contextlib.contextmanager
def connect(address: str, *, timeout_s: float = 30.0):
    """Connect a :class:`distributed.Client` to an existing scheduler.

    Raises
    ------
    StPredictError
        If the scheduler cannot be reached within ``timeout_s``.
    """
    from distributed import Client

    try:
        client = Client(address, timeout=f"{timeout_s}s", set_as_default=False)
    except Exception as err:
        raise StPredictError(
            f"--scheduler {address}: cannot connect to the dask scheduler ({type(err).__name__}: {err})"
        ) from err
    try:
        yield client
    finally:
        client.close()


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
