"""Cohort prediction: every slide of a study through the same engine as the napari widget.

For each slide, :func:`predict_slide` opens it, finds the tissue cells of the model's grid,
predicts them with :class:`~napari_stpredict.inference.Engine` into a
:class:`~napari_stpredict.inference.PredictionStore` (zarr) under ``OUT/<slide-name>/`` and
writes the exports asked for. :func:`predict_cohort` runs that over many slides on a scheduler
from :mod:`napari_stpredict.distributed` (in-process, a LocalCluster, or an existing dask
cluster) and writes ``OUT/summary.json``.

Resuming is free: the store keeps a done-mask (a killed run loses at most one batch per slide),
and ``OUT/<slide-name>/done.json`` is written last, atomically, when a slide is complete, so a
rerun skips finished slides and finishes the others. A slide that fails is reported in the
summary with its error (the traceback goes to ``OUT/<slide-name>/error.log``); the others go on.

Layout of ``OUT``::

    OUT/summary.json                      one row per slide of the last run
    OUT/<name>/predictions.zarr           the PredictionStore (genes × grid, NaN = not predicted)
    OUT/<name>/<name>.h5ad | .csv | _heatmaps.ome.tif | _tumor.geojson    the exports
    OUT/<name>/done.json                  written last: the slide is complete
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_stpredict import __version__
from napari_stpredict.distributed import (
    Job,
    JobProgress,
    SchedulerChoice,
    parse_scheduler,
    run_jobs,
    worker_cache,
    worker_cache_contains,
    worker_threads,
)
from napari_stpredict.errors import Cancelled, ModelFileError, SlideError, StPredictError
from napari_stpredict.io_utils import atomic_path
from napari_stpredict.progress import CancelToken, ProgressCallback, check_cancel, report

__all__ = [
    "EXPORT_FORMATS",
    "CohortResult",
    "SlideJob",
    "collect_slides",
    "parse_exports",
    "predict_cohort",
    "predict_slide",
]

#: export names accepted by ``--export`` (:data:`napari_stpredict.export.EXPORT_KINDS`)
EXPORT_FORMATS = ("h5ad", "csv", "ome-tiff", "geojson", "mask-ome-tiff", "png")
#: file extensions taken from a folder given as a slide argument
SLIDE_SUFFIXES = (
    ".svs",
    ".ndpi",
    ".tif",
    ".tiff",
    ".scn",
    ".bif",
    ".mrxs",
    ".jpg",
    ".jpeg",
    ".png",
    ".zarr",
)
DONE_FILE = "done.json"
STORE_NAME = "predictions"  # OUT/<name>/predictions.zarr
#: cohort results are outputs, not a cache: never evicted by size
_NO_EVICTION = 2**62
ERROR_FILE = "error.log"
SUMMARY_FILE = "summary.json"
_MULTI_SUFFIXES = (".ome.tiff", ".ome.tif", ".ome.zarr")


# --------------------------------------------------------------------------------------------
# inputs


def parse_exports(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """Parse ``--export h5ad,geojson,...`` into a tuple of known export names.

    Raises
    ------
    StPredictError
        On an unknown name.
    """
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for raw in items:
        name = raw.strip().lower().replace("_", "-")
        if not name:
            continue
        name = {
            "ome-tif": "ome-tiff",
            "ometiff": "ome-tiff",
            "tiff": "ome-tiff",
            "mask": "mask-ome-tiff",
            "figure": "png",
        }.get(name, name)
        if name not in EXPORT_FORMATS:
            raise StPredictError(
                f"--export {raw.strip()!r}: unknown export (choose from {', '.join(EXPORT_FORMATS)})"
            )
        if name not in out:
            out.append(name)
    return tuple(out)


def slide_stem(path: str | os.PathLike) -> str:
    """The name of a slide without its (multi-part) extension: ``a/b.ome.tif`` → ``b``."""
    name = Path(path).name
    low = name.lower()
    for suf in _MULTI_SUFFIXES:
        if low.endswith(suf):
            return name[: -len(suf)]
    return Path(name).stem or name


def _is_slide_file(p: Path) -> bool:
    low = p.name.lower()
    if p.name.startswith("."):
        return False
    return low.endswith(SLIDE_SUFFIXES)


def collect_slides(paths: Sequence[str | os.PathLike]) -> list[tuple[Path, str]]:
    """Expand the slide arguments and give each slide a unique output name.

    A folder that is not itself a slide (an OME-Zarr is one) contributes the slide files directly
    inside it, sorted. A file given twice (or through a symlink) counts once. Output names are
    the slide stems; slides sharing a stem get their parent folder's name prepended
    (``patientA__slide1``), then a counter.

    Parameters
    ----------
    paths
        Files or folders as given on the command line.

    Returns
    -------
    list of (path, name)

    Raises
    ------
    StPredictError
        If a path does not exist, a folder holds no slide, or nothing is left.
    """
    files: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            raise SlideError(f"{p}: no such file or folder")
        if p.is_dir() and not p.name.lower().endswith(".zarr"):
            found = sorted(c for c in p.iterdir() if _is_slide_file(c))
            if not found:
                raise SlideError(f"{p}: folder holds no slide file ({', '.join(SLIDE_SUFFIXES)})")
            files.extend(found)
        else:
            files.append(p)
    seen: set[Path] = set()
    unique: list[Path] = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    if not unique:
        raise StPredictError("no slides given")
    stems = [slide_stem(f) for f in unique]
    counts = {s: stems.count(s) for s in stems}
    names: list[str] = []
    for f, s in zip(unique, stems, strict=True):
        name = s if counts[s] == 1 else f"{f.absolute().parent.name}__{s}"
        base, k = name, 2
        while name in names:
            name = f"{base}-{k}"
            k += 1
        names.append(name)
    return list(zip(unique, names, strict=True))


def model_digest(path: str | os.PathLike) -> str:
    """sha256 of a model file (hex): names the model in done markers and store keys."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def check_model(path: str | os.PathLike) -> dict[str, Any]:
    """Validate a model file before any slide is touched; return its metadata.

    Raises
    ------
    ModelFileError
        If the file is missing or not a valid stpredict model file.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelFileError(f"{p}: model file not found")
    from napari_stpredict.model import load_model_file

    return dict(load_model_file(p).metadata)


# --------------------------------------------------------------------------------------------
# one slide


@dataclasses.dataclass(frozen=True)
class SlideJob:
    """Everything one worker needs to predict one slide (picklable).

    Attributes
    ----------
    slide
        Slide path.
    name
        Output folder name under ``out``.
    model
        Model file path.
    model_sha256
        Digest of the model file (computed once by the client).
    out
        The cohort's output folder.
    exports
        Export names (:data:`EXPORT_FORMATS`).
    stride_um
        Grid stride in µm (default: the patch size, no overlap).
    batch_size
        Patches per model call (default: the Predictor's).
    device
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
    mpp
        µm per pixel for a slide whose file does not record one (the file's value wins).
    min_tissue
        Minimum tissue fraction of a cell to be predicted.
    overwrite_exports
        Replace existing export files.
    """

    slide: str
    name: str
    model: str
    model_sha256: str
    out: str
    exports: tuple[str, ...] = ()
    stride_um: float | None = None
    batch_size: int | None = None
    device: str = "auto"
    mpp: float | None = None
    min_tissue: float = 0.2
    overwrite_exports: bool = True

    @property
    def folder(self) -> Path:
        """``OUT/<name>``."""
        return Path(self.out) / self.name

    def config_key(self) -> dict[str, Any]:
        """What must match for a finished slide to be skipped on a rerun."""
        return {
            "slide": str(Path(self.slide).resolve()),
            "model_sha256": self.model_sha256,
            "stride_um": self.stride_um,
            "mpp": self.mpp,
            "min_tissue": self.min_tissue,
        }


def _load_predictor(job: SlideJob):
    """The job's Predictor, built once per worker process; also says if it was cached."""
    from napari_stpredict.model import Predictor

    st = os.stat(job.model)
    key = (
        "predictor",
        str(Path(job.model).resolve()),
        st.st_size,
        st.st_mtime_ns,
        job.device,
        job.batch_size,
    )
    cached = worker_cache_contains(key)
    predictor = worker_cache(
        key, lambda: Predictor(job.model, device=job.device, batch_size=job.batch_size)
    )
    return predictor, cached


def _worker_name() -> str:
    """``host:pid`` of the process running a job (summary rows say where a slide ran)."""
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def read_done(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The done marker of a slide folder, or None when absent or unreadable."""
    p = Path(folder) / DONE_FILE
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: Any) -> None:
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _is_skippable(job: SlideJob, done: dict[str, Any] | None) -> bool:
    if not done or done.get("status") != "done":
        return False
    if done.get("config") != job.config_key():
        return False
    outputs = done.get("outputs", {})
    return all(e in outputs and (job.folder / outputs[e]).exists() for e in job.exports)


def predict_slide(
    job: SlideJob,
    *,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> dict[str, Any]:
    """Predict the tissue of one slide into ``OUT/<name>/`` and write its exports.

    Skips the slide when its done marker matches the job (same slide, model, grid and the
    exports present); otherwise predicts only the cells the store has not done yet.

    Parameters
    ----------
    job
        The slide and the settings.
    progress
        ``progress(done_cells, total_cells, message)``.
    cancel
        Checked between batches; the store keeps what was predicted.

    Returns
    -------
    dict
        The summary row: ``slide, name, status ("done" | "skipped"), cells, predicted,
        time_s, error (None), outputs {export: file name}``.

    Raises
    ------
    StPredictError
        Unreadable slide, bad model, failed export.
    Cancelled
        When ``cancel`` is set.
    """
    t0 = time.perf_counter()
    folder = job.folder
    done = read_done(folder)
    if _is_skippable(job, done):
        assert done is not None
        report(progress, done.get("cells", 0), done.get("cells", 0), "already done")
        return {
            "slide": job.slide,
            "name": job.name,
            "status": "skipped",
            "cells": int(done.get("cells", 0)),
            "predicted": 0,
            "time_s": round(time.perf_counter() - t0, 3),
            "error": None,
            "outputs": done.get("outputs", {}),
            "worker": _worker_name(),
            "model_cached": None,
        }
    folder.mkdir(parents=True, exist_ok=True)
    if done is not None:  # stale marker (other model, grid or exports): it no longer holds
        (folder / DONE_FILE).unlink(missing_ok=True)
    threads = worker_threads()
    if threads:
        import torch

        torch.set_num_threads(threads)
    from napari_stpredict.slide import open_slide

    check_cancel(cancel, job.name)
    report(progress, 0, None, "opening")
    slide = open_slide(job.slide)
    if slide.mpp is None and job.mpp is not None:
        slide.close()
        slide = open_slide(job.slide, mpp=job.mpp)  # --mpp: for slides that do not say
    with slide:
        return _predict_open_slide(job, slide, t0=t0, progress=progress, cancel=cancel)


def _predict_open_slide(
    job: SlideJob,
    slide,
    *,
    t0: float,
    progress: ProgressCallback | None,
    cancel: CancelToken | None,
) -> dict[str, Any]:
    from napari_stpredict.inference import Engine, TileGrid
    from napari_stpredict.slide import tissue_mask

    folder = job.folder
    threads = worker_threads()
    predictor, model_cached = _load_predictor(job)
    grid = TileGrid.for_slide(slide, predictor, stride_um=job.stride_um)
    mask = tissue_mask(slide)
    tissue = grid.tissue_cells(mask, min_fraction=job.min_tissue)
    cells = np.argwhere(tissue)
    store = _open_store(job, slide, grid, predictor)
    total = len(cells)
    todo = int(total - np.count_nonzero(store.done_mask()[tissue]))
    already = total - todo
    report(progress, already, total, "predicting")

    def _progress(done_now: int, _total: int | None, msg: str = "") -> None:
        report(progress, already + int(done_now), total, msg or "predicting")

    with Engine(
        slide,
        predictor,
        grid,
        store,
        tissue=tissue,
        batch_size=job.batch_size,
        read_workers=threads,
    ) as engine:
        run = engine.predict_all_tissue(cancel=cancel, progress=_progress)
    check_cancel(cancel, job.name)
    report(progress, total, total, "exporting" if job.exports else "done")

    outputs = _write_exports(job, slide, store, predictor, tissue, cancel=cancel)
    row = {
        "slide": job.slide,
        "name": job.name,
        "status": "done",
        "cells": total,
        "predicted": int(run.predicted),
        "time_s": round(time.perf_counter() - t0, 3),
        "error": None,
        "outputs": outputs,
        "worker": _worker_name(),
        "model_cached": model_cached,
    }
    marker = {
        **row,
        "config": job.config_key(),
        "grid_shape": list(grid.shape),
        "genes": len(predictor.genes),
        "finished": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "version": __version__,
    }
    (folder / ERROR_FILE).unlink(missing_ok=True)
    _write_json(folder / DONE_FILE, marker)
    return row


def _open_store(job: SlideJob, slide, grid, predictor):
    """``OUT/<name>/predictions.zarr``, emptied first if it holds another slide/model/grid."""
    import shutil

    from napari_stpredict.inference import PredictionStore, model_key, store_key

    identity = store_key(
        slide_fingerprint=slide.fingerprint(), model=model_key(predictor), grid=grid
    )
    root = job.folder
    path = root / f"{STORE_NAME}.zarr"
    attrs = {
        "cohort_identity": identity,
        "slide": {"path": job.slide, "fingerprint": slide.fingerprint()},
        "model": {"path": job.model, "sha256": job.model_sha256},
    }
    for attempt in range(2):
        try:
            store = PredictionStore.open(
                root,
                key=STORE_NAME,
                genes=list(predictor.genes),
                grid=grid,
                attrs=attrs,
                max_bytes=_NO_EVICTION,
            )
        except StPredictError:
            # other genes or grid: the old predictions belong to another model or stride
            if attempt or not path.exists():
                raise
            shutil.rmtree(path)
            continue
        if store.info.get("cohort_identity") == identity:
            return store
        if attempt:
            break
        shutil.rmtree(path)  # same genes and grid, but another slide content or model
    raise StPredictError(f"{path}: cannot reset the prediction store")


def _write_exports(
    job: SlideJob, slide, store, predictor, tissue, *, cancel: CancelToken | None
) -> dict[str, str]:
    """Write the requested exports next to the store; return ``{export: file name}``."""
    if not job.exports:
        return {}
    from napari_stpredict.export import export_predictions

    results = export_predictions(
        store,
        job.folder,
        name=job.name,
        kinds=job.exports,
        slide=slide,
        model=predictor,
        tissue=tissue,
        overwrite=job.overwrite_exports,
        cancel=cancel,
    )
    return {r.kind: Path(r.path).name for r in results}


def _slide_task(
    job: SlideJob,
    *,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> dict[str, Any]:
    """A job for :func:`~napari_stpredict.distributed.run_jobs`: a failure becomes a row."""
    t0 = time.perf_counter()
    try:
        return predict_slide(job, progress=progress, cancel=cancel)
    except Cancelled:
        raise
    except Exception as err:
        return _failed_row(job, err, time.perf_counter() - t0)


def _failed_row(job: SlideJob, err: BaseException, seconds: float) -> dict[str, Any]:
    msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if not isinstance(err, StPredictError):
        msg = f"{type(err).__name__}: {msg}" if msg else type(err).__name__
    try:
        job.folder.mkdir(parents=True, exist_ok=True)
        tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        (job.folder / ERROR_FILE).write_text(tb)
    except OSError:
        pass
    return {
        "slide": job.slide,
        "name": job.name,
        "status": "failed",
        "cells": None,
        "predicted": 0,
        "time_s": round(seconds, 3),
        "error": msg or "failed",
        "outputs": {},
        "worker": None,
        "model_cached": None,
    }


# --------------------------------------------------------------------------------------------
# a cohort


@dataclasses.dataclass
class CohortResult:
    """What :func:`predict_cohort` did.

    Attributes
    ----------
    rows
        One summary row per slide, in input order (see :func:`predict_slide`); status is
        ``"done"``, ``"skipped"``, ``"failed"`` or ``"cancelled"``.
    summary_path
        ``OUT/summary.json``.
    scheduler
        Where it ran.
    wall_s
        Total seconds.
    """

    rows: list[dict[str, Any]]
    summary_path: Path
    scheduler: str
    wall_s: float

    @property
    def n_failed(self) -> int:
        """Slides that failed."""
        return sum(r["status"] == "failed" for r in self.rows)

    @property
    def ok(self) -> bool:
        """True when every slide is done or skipped."""
        return all(r["status"] in ("done", "skipped") for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        """The JSON written to ``summary.json``."""
        counts: dict[str, int] = {}
        for r in self.rows:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        return {
            "slides": self.rows,
            "counts": counts,
            "n_slides": len(self.rows),
            "n_failed": self.n_failed,
            "cells": int(sum(r["cells"] or 0 for r in self.rows)),
            "predicted": int(sum(r["predicted"] or 0 for r in self.rows)),
            "scheduler": self.scheduler,
            "wall_s": round(self.wall_s, 3),
        }


def predict_cohort(
    slides: Sequence[str | os.PathLike],
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    exports: Sequence[str] | str | None = None,
    scheduler: str | SchedulerChoice = "local",
    workers: int | None = None,
    stride_um: float | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    mpp: float | None = None,
    min_tissue: float = 0.2,
    on_slide_progress: JobProgress | None = None,
    on_slide_done: Callable[[dict[str, Any]], None] | None = None,
    on_start: Callable[[list[tuple[Path, str]]], None] | None = None,
    on_cluster: Callable[[str], None] | None = None,
    cancel: CancelToken | None = None,
) -> CohortResult:
    """Predict every slide of a cohort; write ``OUT/<name>/`` per slide and ``OUT/summary.json``.

    Inputs are checked before any work (bad input raises); a slide that fails during the run is
    reported in its row and the others go on. ``summary.json`` is also written when the run is
    cancelled (unfinished slides get ``"cancelled"``) and the cancel is then re-raised.

    Parameters
    ----------
    slides
        Slide files, or folders of slide files.
    model
        Model file (``.safetensors``).
    out
        Output folder (created).
    exports
        Any of :data:`EXPORT_FORMATS` (list or comma-separated string).
    scheduler
        ``"local"`` (a LocalCluster), ``"inline"`` (this process) or a dask scheduler address.
    workers
        LocalCluster workers (default: sized to the machine).
    stride_um
        Grid stride in µm (default: the model's patch size).
    batch_size
        Patches per model call.
    device
        Torch device (``"auto"`` picks CUDA, MPS, then CPU on each worker).
    mpp
        µm per pixel for slides whose files do not record one (JPEG, PNG, some TIFFs).
    min_tissue
        Minimum tissue fraction of a grid cell to predict it.
    on_slide_progress
        ``(name, done_cells, total_cells, message)`` as slides progress.
    on_slide_done
        Called with each summary row as its slide finishes.
    on_start
        Called with the ``(path, name)`` list once inputs are checked.
    on_cluster
        Called with a line describing where the slides run.
    cancel
        Cancels the run (running slides stop after their current batch).

    Returns
    -------
    CohortResult

    Raises
    ------
    StPredictError
        Bad input: no slides, a missing slide, a missing or invalid model, bad options.
    """
    t0 = time.perf_counter()
    choice = scheduler if isinstance(scheduler, SchedulerChoice) else parse_scheduler(scheduler)
    export_names = parse_exports(exports)
    if stride_um is not None and not stride_um > 0:
        raise StPredictError(f"--stride-um {stride_um}: must be positive")
    if batch_size is not None and batch_size < 1:
        raise StPredictError(f"--batch-size {batch_size}: must be at least 1")
    if mpp is not None and not mpp > 0:
        raise StPredictError(f"--mpp {mpp}: must be positive")
    if not 0.0 <= min_tissue <= 1.0:
        raise StPredictError(f"min_tissue {min_tissue}: must be within [0, 1]")
    if not slides:
        raise StPredictError("no slides given")
    model_path = Path(model).expanduser()
    check_model(model_path)
    pairs = collect_slides(slides)
    out_dir = Path(out).expanduser()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StPredictError(
            f"{out_dir}: cannot create the output folder ({err.strerror})"
        ) from err
    if not os.access(out_dir, os.W_OK):
        raise StPredictError(f"{out_dir}: output folder is not writable")
    digest = model_digest(model_path)
    jobs = [
        Job(
            name,
            SlideJob(
                slide=str(path.resolve()),
                name=name,
                model=str(model_path.resolve()),
                model_sha256=digest,
                out=str(out_dir.resolve()),
                exports=export_names,
                stride_um=stride_um,
                batch_size=batch_size,
                device=device,
                mpp=mpp,
                min_tissue=min_tissue,
            ),
        )
        for path, name in pairs
    ]
    if on_start is not None:
        on_start(pairs)
    rows: dict[str, dict[str, Any]] = {}
    # finished slides are skipped here, so a rerun with nothing left starts no cluster
    pending: list[Job] = []
    for j in jobs:
        if _is_skippable(j.payload, read_done(j.payload.folder)):
            row = predict_slide(j.payload)  # reads the marker, returns the "skipped" row
            rows[j.name] = row
            if on_slide_done is not None:
                on_slide_done(row)
        else:
            pending.append(j)
    interrupted: BaseException | None = None
    try:
        for outcome in run_jobs(
            _slide_task,
            pending,
            scheduler=choice,
            workers=workers,
            on_progress=on_slide_progress,
            on_cluster=on_cluster,
            cancel=cancel,
        ):
            if outcome.error is not None:  # the worker died, or the task could not run
                row = _failed_row(outcome.job.payload, outcome.error, 0.0)
            else:
                row = outcome.result
            rows[outcome.job.name] = row
            if on_slide_done is not None:
                on_slide_done(row)
    except (Cancelled, KeyboardInterrupt) as err:
        interrupted = err
    ordered = [
        rows.get(j.name)
        or {
            "slide": j.payload.slide,
            "name": j.name,
            "status": "cancelled",
            "cells": None,
            "predicted": 0,
            "time_s": None,
            "error": None,
            "outputs": {},
            "worker": None,
            "model_cached": None,
        }
        for j in jobs
    ]
    result = CohortResult(
        rows=ordered,
        summary_path=out_dir / SUMMARY_FILE,
        scheduler=str(choice),
        wall_s=time.perf_counter() - t0,
    )
    summary = {
        **result.to_dict(),
        "model": str(model_path.resolve()),
        "model_sha256": digest,
        "exports": list(export_names),
        "stride_um": stride_um,
        "finished": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "version": __version__,
    }
    _write_json(result.summary_path, summary)
    if interrupted is not None:
        raise interrupted
    return result
