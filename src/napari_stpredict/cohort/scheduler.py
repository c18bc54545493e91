"""A cohort run: check every input up front, run the slides on a scheduler, write the summary."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from napari_stpredict import __version__
from napari_stpredict.cohort.inputs import (
    check_model,
    check_options,
    check_output,
    check_slides,
    collect_slides,
    export_skips,
    model_digest,
    parse_exports,
)
from napari_stpredict.cohort.rows import SUMMARY_FILE, SlideJob, SlideRow, read_done, write_json
from napari_stpredict.cohort.slide import is_skippable, predict_slide, slide_task
from napari_stpredict.distributed import (
    Job,
    JobProgress,
    SchedulerChoice,
    parse_scheduler,
    run_jobs,
)
from napari_stpredict.errors import Cancelled, StPredictError
from napari_stpredict.progress import CancelToken


@dataclasses.dataclass
class CohortResult:
    """What :func:`predict_cohort` did.

    Attributes
    ----------
    rows
        One :class:`SlideRow` per slide, in input order; status is ``"done"``, ``"skipped"``,
        ``"failed"`` or ``"cancelled"``.
    summary_path
        ``OUT/summary.json``.
    scheduler
        Where it ran.
    wall_s
        Total seconds.
    """

    rows: list[SlideRow]
    summary_path: Path
    scheduler: str
    wall_s: float

    @property
    def n_failed(self) -> int:
        """Slides that failed."""
        return sum(r.status == "failed" for r in self.rows)

    @property
    def ok(self) -> bool:
        """True when every slide is done or skipped."""
        return all(r.status in ("done", "skipped") for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        """The JSON written to ``summary.json``."""
        counts: dict[str, int] = {}
        for r in self.rows:
            counts[r.status] = counts.get(r.status, 0) + 1
        return {
            "slides": [r.to_dict() for r in self.rows],
            "counts": counts,
            "n_slides": len(self.rows),
            "n_failed": self.n_failed,
            "export_errors": sum(len(r.export_errors) for r in self.rows),
            "cells": int(sum(r.cells or 0 for r in self.rows)),
            "predicted": int(sum(r.predicted or 0 for r in self.rows)),
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
    tta: int | None = None,
    on_slide_progress: JobProgress | None = None,
    on_slide_done: Callable[[SlideRow], None] | None = None,
    on_start: Callable[[list[tuple[Path, str]]], None] | None = None,
    on_cluster: Callable[[str], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    cancel: CancelToken | None = None,
) -> CohortResult:
    """Predict every slide of a cohort; write ``OUT/<name>/`` per slide and ``OUT/summary.json``.

    Long because its docstring lists every option; the body reads top to bottom: check the
    inputs and make the jobs (:func:`_plan_jobs`), run them (:func:`_run_pending`), write the
    summary (:func:`_write_summary`).

    Inputs are checked before any work (bad input raises): options, the model, every slide's
    output name and location (never outside ``OUT``, never over an input), each slide's µm/px
    and grid size, and what the exports need. A slide that fails during the run is reported in
    its row and the others go on; an export that cannot be made is listed in its slide's row
    (``export_errors``) and the slide is done. ``summary.json`` is also written when the run is
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
        µm per pixel for slides whose files do not record one (JPEG, PNG, some TIFFs);
        required when such a slide is given.
    min_tissue
        Minimum tissue fraction of a grid tile to predict it.
    tta
        Test-time augmentation for every slide (1, 2, 4 or 8 symmetries averaged); ``None``:
        the model file's.
    on_slide_progress
        ``(name, done_tiles, total_tiles, message)`` as slides progress.
    on_slide_done
        Called with each :class:`SlideRow` as its slide finishes.
    on_start
        Called with the ``(path, name)`` list once inputs are checked.
    on_cluster
        Called with a line describing where the slides run.
    on_note
        Called with a line for each up-front warning (an export this model cannot make).
    cancel
        Cancels the run (running slides stop after their current batch).

    Returns
    -------
    CohortResult

    Raises
    ------
    StPredictError
        Bad input: no slides, a missing slide, a missing or invalid model, bad options, a slide
        without µm/px and no ``--mpp``, a grid too fine, an output over an input.
    """
    t0 = time.perf_counter()
    choice = scheduler if isinstance(scheduler, SchedulerChoice) else parse_scheduler(scheduler)
    check_options(
        stride_um=stride_um, batch_size=batch_size, mpp=mpp, min_tissue=min_tissue, tta=tta
    )
    if not slides:
        raise StPredictError("no slides given")
    settings = dict(
        stride_um=stride_um, batch_size=batch_size, device=device, mpp=mpp, min_tissue=min_tissue
    )
    plan = _plan_jobs(slides, model, out, exports, settings, tta=tta, on_note=on_note)
    if on_start is not None:
        on_start(plan.pairs)
    rows, interrupted = _run_pending(
        plan.jobs,
        choice,
        workers=workers,
        on_slide_progress=on_slide_progress,
        on_slide_done=on_slide_done,
        on_cluster=on_cluster,
        cancel=cancel,
    )
    result = CohortResult(
        rows=[rows.get(j.name) or SlideRow.cancelled(j.payload) for j in plan.jobs],
        summary_path=plan.out_dir / SUMMARY_FILE,
        scheduler=str(choice),
        wall_s=time.perf_counter() - t0,
    )
    _write_summary(result, plan, stride_um=stride_um, interrupted=interrupted)
    if interrupted is not None:
        raise interrupted
    return result


@dataclasses.dataclass(frozen=True)
class _CohortPlan:
    """The checked inputs of a run: one job per slide, in input order.

    Attributes
    ----------
    jobs
        :class:`~napari_stpredict.distributed.Job` of a :class:`SlideJob` per slide.
    pairs
        ``(path, output name)`` per slide.
    out_dir
        The output folder.
    model_path, digest
        The model file (resolved) and its SHA-256.
    exports
        The export names asked for.
    """

    jobs: list[Job]
    pairs: list[tuple[Path, str]]
    out_dir: Path
    model_path: Path
    digest: str
    exports: tuple[str, ...]


def _plan_jobs(
    slides: Sequence[str | os.PathLike],
    model: str | os.PathLike,
    out: str | os.PathLike,
    exports: Sequence[str] | str | None,
    settings: dict[str, Any],
    *,
    tta: int | None,
    on_note: Callable[[str], None] | None,
) -> _CohortPlan:
    """Check the model, every slide and the output, announce exports this model cannot make,
    and make one :class:`SlideJob` per slide (``settings``: its grid and device fields)."""
    export_names = parse_exports(exports)
    model_path = Path(model).expanduser()
    metadata = check_model(model_path)
    pairs = collect_slides(slides)
    patch_um = metadata.get("patch_um")
    check_slides(
        pairs,
        mpp=settings["mpp"],
        stride_um=settings["stride_um"],
        patch_um=float(patch_um) if patch_um else None,
    )
    out_dir = check_output(out, pairs)
    skips = export_skips(export_names, metadata)
    for kind, reason in skips.items():
        if on_note is not None:
            on_note(f"{kind} export will be skipped: {reason}")
    digest = model_digest(model_path)
    common = dict(
        model=str(model_path.resolve()),
        model_sha256=digest,
        out=str(out_dir.resolve()),
        exports=export_names,
        skip_exports=tuple(skips.items()),
        tta=tta,
        **settings,
    )
    jobs = [
        Job(name, SlideJob(slide=str(path.resolve()), name=name, **common)) for path, name in pairs
    ]
    return _CohortPlan(jobs, pairs, out_dir, model_path, digest, export_names)


def _run_pending(
    jobs: list[Job],
    choice: SchedulerChoice,
    *,
    workers: int | None,
    on_slide_progress: JobProgress | None,
    on_slide_done: Callable[[SlideRow], None] | None,
    on_cluster: Callable[[str], None] | None,
    cancel: CancelToken | None,
) -> tuple[dict[str, SlideRow], BaseException | None]:
    """Skip the finished slides, run the others on the scheduler; ``(rows by job name, the
    interruption)`` — a cancel or Ctrl-C is returned, so the summary is still written."""
    done = on_slide_done or (lambda _row: None)
    rows: dict[str, SlideRow] = {}
    # finished slides are skipped here, so a rerun with nothing left starts no cluster
    pending: list[Job] = []
    for j in jobs:
        if is_skippable(j.payload, read_done(j.payload.folder)):
            rows[j.name] = slide_task(j.payload)  # reads the marker, returns the "skipped" row
            done(rows[j.name])
        else:
            pending.append(j)
    try:
        for outcome in run_jobs(
            slide_task,
            pending,
            scheduler=choice,
            workers=workers,
            on_progress=on_slide_progress,
            on_cluster=on_cluster,
            cancel=cancel,
        ):
            if outcome.error is not None:  # the worker died, or the task could not run
                row = SlideRow.failed(outcome.job.payload, outcome.error, 0.0)
            else:
                row = outcome.result
            rows[outcome.job.name] = row
            done(row)
    except (Cancelled, KeyboardInterrupt) as err:
        return rows, err
    return rows, None


def _write_summary(
    result: CohortResult,
    plan: _CohortPlan,
    *,
    stride_um: float | None,
    interrupted: BaseException | None,
) -> None:
    """``OUT/summary.json``; a write error is raised unless the run was interrupted (the
    interruption is what the caller reports then)."""
    summary = {
        **result.to_dict(),
        "model": str(plan.model_path.resolve()),
        "model_sha256": plan.digest,
        "exports": list(plan.exports),
        "stride_um": stride_um,
        "finished": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "version": __version__,
    }
    try:
        write_json(result.summary_path, summary)
    except StPredictError:
        if interrupted is None:
            raise


__all__ = ["CohortResult", "predict_cohort", "predict_slide"]
