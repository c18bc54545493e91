"""One slide of a cohort: lock its output folder, predict its tissue, write its exports.

:func:`predict_slide` runs in a worker (any process). It holds an advisory lock on
``OUT/<name>`` for the whole slide (a second ``predict`` to the same output refuses in one line),
writes only inside that folder (proven by :func:`~napari_stpredict.io_utils.confined`), and
builds the slide → grid → tissue → store → engine recipe through the one prediction session of
:mod:`napari_stpredict.inference.session`.
"""

from __future__ import annotations

import datetime as _dt
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from napari_stpredict import __version__
from napari_stpredict.cohort.rows import (
    DONE_FILE,
    ERROR_FILE,
    STORE_NAME,
    SlideJob,
    SlideRow,
    read_done,
    write_json,
)
from napari_stpredict.distributed import worker_cache, worker_cache_contains, worker_threads
from napari_stpredict.errors import Cancelled, StPredictError
from napari_stpredict.io_utils import (
    confined,
    is_ours,
    mark_ours,
    output_lock,
)
from napari_stpredict.progress import CancelToken, ProgressCallback, check_cancel, report


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
        job.tta,
    )
    cached = worker_cache_contains(key)
    predictor = worker_cache(
        key,
        lambda: Predictor(job.model, device=job.device, batch_size=job.batch_size, tta=job.tta),
    )
    return predictor, cached


def store_path(job: SlideJob) -> Path:
    """``OUT/<name>/predictions.zarr``."""
    return job.folder / f"{STORE_NAME}.zarr"


def store_is_complete(job: SlideJob, marker: dict[str, Any]) -> bool:
    """The store a done marker vouches for is there, readable and holds its tiles.

    Uses the store's own verification (done mask vs values, every chunk readable) when the
    store offers it; a broken store makes the slide run again (and be healed).
    """
    path = store_path(job)
    if not path.is_dir() or path.is_symlink():
        return False
    from napari_stpredict.inference.store import PredictionStore

    try:
        store = PredictionStore.from_path(path)
        verify = getattr(store, "verify", None)
        if verify is not None:
            rep = verify(heal=False)
            if getattr(rep, "broken_chunks", None) or getattr(rep, "cells_reset", 0):
                return False
            if getattr(rep, "ok", True) is False:
                return False
        return store.n_done >= int(marker.get("cells", 0))
    except Exception:  # any unreadable store: predict again (and heal)
        return False


def is_skippable(job: SlideJob, done: dict[str, Any] | None) -> bool:
    """A finished slide: same slide, model and grid, exports present, store verified."""
    if not done or done.get("status") != "done":
        return False
    if done.get("config") != job.config_key():
        return False
    outputs = done.get("outputs", {})
    if not all(e in outputs and (job.folder / outputs[e]).exists() for e in job.exports):
        return False
    return store_is_complete(job, done)


def _claim_folder(job: SlideJob, folder: Path) -> None:
    """Create ``OUT/<name>`` (marked as ours), or accept it when it is ours already."""
    if folder.is_symlink():
        raise StPredictError(f"{folder}: is a symbolic link; refusing to write through it")
    if folder.exists():
        if not folder.is_dir():
            raise StPredictError(f"{folder}: exists and is not a folder (refusing to replace it)")
        legacy = (  # written by a version without the marker
            (folder / DONE_FILE).is_file()
            or (folder / ERROR_FILE).is_file()
            or is_ours(store_path(job))
        )
        if not is_ours(folder) and not legacy and any(folder.iterdir()):
            raise StPredictError(
                f"{folder}: exists and was not written by stpredict predict "
                "(move it away or choose another --out)"
            )
    folder.mkdir(exist_ok=True)
    if not is_ours(folder):
        mark_ours(folder, slide=job.slide)


def predict_slide(
    job: SlideJob,
    *,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> SlideRow:
    """Predict the tissue of one slide into ``OUT/<name>/`` and write its exports.

    Skips the slide when its done marker matches the job (same slide, model, grid, the exports
    present) and its store verifies; otherwise predicts only the tiles the store lacks. An
    export that cannot be made is listed in the row (``export_errors``); the slide is done.

    Parameters
    ----------
    job
        The slide and the settings.
    progress
        ``progress(done_tiles, total_tiles, message)``.
    cancel
        Checked between batches; the store keeps what was predicted.

    Returns
    -------
    SlideRow
        Status ``"done"`` or ``"skipped"``.

    Raises
    ------
    StPredictError
        Unreadable slide, bad model, output busy or not ours.
    Cancelled
        When ``cancel`` is set.
    """
    t0 = time.perf_counter()
    folder = confined(job.out, job.name)
    with output_lock(folder, what="slide's predictions"):
        done = read_done(folder)
        if is_skippable(job, done):
            assert done is not None
            report(progress, done.get("cells", 0), done.get("cells", 0), "already done")
            return SlideRow.skipped(job, done, time.perf_counter() - t0)
        _claim_folder(job, folder)
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
        if slide.mpp is None:
            slide.close()
            if job.mpp is None:
                raise StPredictError(
                    f"{job.slide}: the file records no pixel size (µm/px); pass --mpp"
                )
            slide = open_slide(job.slide, mpp=job.mpp)  # --mpp: for slides that do not say
        with slide:
            return _predict_open_slide(job, slide, t0=t0, progress=progress, cancel=cancel)


def _session(job: SlideJob, slide: Any, predictor: Any):
    """The prediction session of this slide with its store at ``OUT/<name>/predictions.zarr``."""
    from napari_stpredict.inference.session import open_session

    attrs = {
        "slide": {"path": job.slide, "fingerprint": slide.fingerprint()},
        "model": {"path": job.model, "sha256": job.model_sha256},
    }
    common = dict(
        predictor=predictor,
        slide=slide,
        model_path=job.model,
        stride_um=job.stride_um,
        min_tissue=job.min_tissue,
        batch_size=job.batch_size,
        read_workers=worker_threads(),
    )
    with warnings.catch_warnings(record=True) as caught:  # notes go to the row, not stderr
        warnings.simplefilter("always", RuntimeWarning)
        session = open_session(store_path=store_path(job), store_attrs=attrs, **common)
    for w in caught:
        text = str(w.message)
        if text not in session.warnings:
            session.warnings.append(text)
    return session


def _predict_open_slide(
    job: SlideJob,
    slide: Any,
    *,
    t0: float,
    progress: ProgressCallback | None,
    cancel: CancelToken | None,
) -> SlideRow:
    folder = job.folder
    predictor, model_cached = _load_predictor(job)
    session = _session(job, slide, predictor)
    try:
        tissue = session.tissue
        total = int(np.count_nonzero(tissue))
        already = int(np.count_nonzero(session.done_mask()[tissue]))
        notes = list(session.warnings)
        report(progress, already, total, "predicting")

        def _progress(done_now: int, _total: int | None, msg: str = "") -> None:
            report(progress, already + int(done_now), total, msg or "predicting")

        run = session.predict_all_tissue(cancel=cancel, progress=_progress)
        check_cancel(cancel, job.name)
        report(progress, total, total, "exporting" if job.exports else "done")
        outputs, export_errors = _write_exports(job, slide, session, cancel=cancel)
        grid_shape = list(session.grid.shape)
    finally:
        session.close()  # also releases the store's output lock
    row = SlideRow.done(
        job,
        cells=total,
        predicted=int(run.predicted),
        seconds=time.perf_counter() - t0,
        outputs=outputs,
        export_errors=export_errors,
        model_cached=model_cached,
        notes=notes,
    )
    marker = {
        **row.to_dict(),
        "config": job.config_key(),
        "grid_shape": grid_shape,
        "genes": len(predictor.genes),
        "finished": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "version": __version__,
    }
    (folder / ERROR_FILE).unlink(missing_ok=True)
    write_json(folder / DONE_FILE, marker)
    return row


def _write_exports(
    job: SlideJob, slide: Any, session: Any, *, cancel: CancelToken | None
) -> tuple[dict[str, str], dict[str, str]]:
    """Write the requested exports next to the store.

    Returns ``({export: file name}, {export: reason})``: an export that cannot be made (a model
    without the tumour signature, a full disk) is reported, never fails the slide.
    """
    if not job.exports:
        return {}, {}
    from napari_stpredict.export import export_report

    try:
        rep = export_report(
            session.store,
            job.folder,
            name=job.name,
            kinds=job.exports,
            slide=slide,
            model=session.predictor,
            tissue=session.tissue,
            overwrite=job.overwrite_exports,
            cancel=cancel,
            keep_going=True,
            skip=dict(job.skip_exports),
        )
    except Cancelled:
        raise
    except StPredictError as err:  # nothing predicted (no tissue), a folder problem
        reason = str(err).strip().splitlines()[0]
        return {}, dict.fromkeys(job.exports, reason)
    return {r.kind: Path(r.path).name for r in rep.results}, dict(rep.failed)


def slide_task(
    job: SlideJob,
    *,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> SlideRow:
    """A job for :func:`~napari_stpredict.distributed.run_jobs`: a failure becomes a row."""
    t0 = time.perf_counter()
    try:
        return predict_slide(job, progress=progress, cancel=cancel)
    except Cancelled:
        raise
    except Exception as err:
        return SlideRow.failed(job, err, time.perf_counter() - t0)
