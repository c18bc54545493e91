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

from napari_stpredict.distributed.cluster import (
    THREADS_ENV,
    ClusterPlan,
    SchedulerChoice,
    connect,
    parse_scheduler,
    plan_local_cluster,
    start_local_cluster,
    visible_gpus,
)
from napari_stpredict.distributed.jobs import (
    PROGRESS_TOPIC_PREFIX,
    Job,
    JobOutcome,
    JobProgress,
    clear_worker_cache,
    run_jobs,
    worker_cache,
    worker_cache_contains,
    worker_threads,
)

__all__ = [
    "PROGRESS_TOPIC_PREFIX",
    "THREADS_ENV",
    "ClusterPlan",
    "Job",
    "JobOutcome",
    "JobProgress",
    "SchedulerChoice",
    "clear_worker_cache",
    "connect",
    "parse_scheduler",
    "plan_local_cluster",
    "run_jobs",
    "start_local_cluster",
    "visible_gpus",
    "worker_cache",
    "worker_cache_contains",
    "worker_threads",
]
