"""Where jobs run: the scheduler choice, a LocalCluster sized to this machine, an existing
cluster (see :mod:`napari_stpredict.distributed`)."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import os
from collections.abc import Sequence
from typing import Any, Literal

from napari_stpredict.errors import StPredictError

logger = logging.getLogger("napari_stpredict.distributed")

#: environment variable read by jobs to size torch's intra-op thread pool on a worker
THREADS_ENV = "STPREDICT_WORKER_THREADS"


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
