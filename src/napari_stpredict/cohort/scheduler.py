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


def _check_options(
    stride_um: float | None, batch_size: int | None, mpp: float | None, min_tissue: float
) -> None:
    if stride_um is not None and not stride_um > 0:
        raise StPredictError(f"--stride-um {stride_um}: must be positive")
    if batch_size is not None and batch_size < 1:
        raise StPredictError(f"--batch-size {batch_size}: must be at least 1")
    if mpp is not None and not mpp > 0:
        raise StPredictError(f"--mpp {mpp}: must be positive")
    if not 0.0 <= min_tissue <= 1.0:
        raise StPredictError(f"min_tissue {min_tissue}: must be within [0, 1]")


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
    on_slide_done: Callable[[SlideRow], None] | None = None,
    on_start: Callable[[list[tuple[Path, str]]], None] | None = None,
    on_cluster: Callable[[str], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    cancel: CancelToken | None = None,
) -> CohortResult:
    """Predict every slide of a cohort; write ``OUT/<name>/`` per slide and ``OUT/summary.json``.

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
    export_names = parse_exports(exports)
    _check_options(stride_um, batch_size, mpp, min_tissue)
    if not slides:
        raise StPredictError("no slides given")
    model_path = Path(model).expanduser()
    metadata = check_model(model_path)
    pairs = collect_slides(slides)
    patch_um = metadata.get("patch_um")
    check_slides(
        pairs,
        mpp=mpp,
        stride_um=stride_um,
        patch_um=float(patch_um) if patch_um else None,
    )
    out_dir = check_output(out, pairs)
    skips = export_skips(export_names, metadata)
    for kind, reason in skips.items():
        if on_note is not None:
            on_note(f"{kind} export will be skipped: {reason}")
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
                skip_exports=tuple(skips.items()),
            ),
        )
        for path, name in pairs
    ]
    if on_start is not None:
        on_start(pairs)
    rows: dict[str, SlideRow] = {}
    # finished slides are skipped here, so a rerun with nothing left starts no cluster
    pending: list[Job] = []
    for j in jobs:
        if is_skippable(j.payload, read_done(j.payload.folder)):
            row = slide_task(j.payload)  # reads the marker, returns the "skipped" row
            rows[j.name] = row
            if on_slide_done is not None:
                on_slide_done(row)
        else:
            pending.append(j)
    interrupted: BaseException | None = None
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
            if on_slide_done is not None:
                on_slide_done(row)
    except (Cancelled, KeyboardInterrupt) as err:
        interrupted = err
    result = CohortResult(
        rows=[rows.get(j.name) or SlideRow.cancelled(j.payload) for j in jobs],
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
    try:
        write_json(result.summary_path, summary)
    except StPredictError:
        if interrupted is None:
            raise
    if interrupted is not None:
        raise interrupted
    return result


__all__ = ["CohortResult", "predict_cohort", "predict_slide"]
