"""Live scheduling: predict the visible tissue tiles as the user pans and zooms.

The :class:`LiveScheduler` listens to the camera, the canvas size and the slide layer's
``loaded`` event, debounces them (:data:`DEBOUNCE_MS`), and asks the session's Engine for the
visible tissue tiles plus a margin that are not predicted yet, nearest to the view centre first.
One job runs at a time in a generator worker that yields per batch; a new view cancels the
running job (it stops after its current batch, whose results are kept: they are in the store)
and starts once that job has ended. Every job carries its session: a batch of a session that is
no longer active is dropped on arrival, so a late result never lands on another slide.

Nothing here touches the file system, zarr or a thread join on the GUI thread: which tiles are
predicted is kept in memory (:attr:`LiveScheduler.done`, read from the store once, in the worker
that opened the session, and updated as batches land); a retired session is closed (its reader
pool joined) in a background thread. One job (its worker body, its worker, its record) is
:mod:`._jobs`.
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QObject, QTimer, Signal

from napari_stpredict.errors import StPredictError
from napari_stpredict.inference.session import MARGIN, MIN_TISSUE, PredictSession, open_session
from napari_stpredict.widgets._common import (
    Failed,
    camera_of,
    in_background,
    slide_source,
    view_rect_px,
)
from napari_stpredict.widgets._jobs import (
    EngineWorker,
    Job,
    batch_cells_values,
    predict_job,
    wait_ended,
)

if TYPE_CHECKING:
    import napari

__all__ = [
    "DEBOUNCE_MS",
    "MARGIN",
    "MAX_LIVE_CELLS",
    "MIN_TISSUE",
    "EngineWorker",
    "Failed",
    "Job",
    "LiveScheduler",
    "PredictSession",
    "batch_cells_values",
    "camera_of",
    "open_session",
    "slide_source",
    "wait_ended",
]

#: Quiet time after the last camera event before the visible tiles are requested.
DEBOUNCE_MS = 150
#: Above this many missing visible tiles, live mode waits (zoom in, or predict whole slide).
MAX_LIVE_CELLS = 5_000


def _minus(cells: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Rows of ``cells`` not in ``other`` (both ``(n, 2)`` grid indices), order kept."""
    if len(cells) == 0 or len(other) == 0:
        return cells
    width = int(max(cells[:, 1].max(), other[:, 1].max())) + 1
    keep = ~np.isin(cells[:, 0] * width + cells[:, 1], other[:, 0] * width + other[:, 1])
    return cells[keep]


class LiveScheduler(QObject):
    """Runs the Engine for the visible tiles (live) or the whole slide, one job at a time.

    Signals
    -------
    batch_landed(session, cells, values, spread)
        A batch of the active session was predicted (``spread`` is ``None`` unless the engine
        yields one).
    job_started(kind, total), job_finished(kind, outcome)
        A job of the active session started / ended; ``outcome`` is ``"done"``,
        ``"cancelled"`` or an error message.
    busy_changed(busy)
    progress(done, total)
        Tiles predicted of the tiles the job is about: the tissue tiles in view (with the
        margin) for a live job, every tissue tile for the whole slide — already cached ones
        included, so the bar matches what the heatmap shows.
    message(text), error(text)
    """

    batch_landed = Signal(object, object, object, object)
    job_started = Signal(str, int)
    job_finished = Signal(str, object)
    busy_changed = Signal(bool)
    progress = Signal(int, int)
    message = Signal(str)
    error = Signal(str)

    def __init__(
        self,
        viewer: napari.Viewer,
        *,
        debounce_ms: int = DEBOUNCE_MS,
        margin: int = MARGIN,
        max_live_cells: int = MAX_LIVE_CELLS,
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.margin = margin
        self.max_live_cells = max_live_cells
        self._session: PredictSession | None = None
        #: bool (gh, gw): tiles of the active session in the store (kept in memory)
        self.done: np.ndarray | None = None
        self._live = True
        self._job: Job | None = None
        self._pending: tuple[str, list[np.ndarray], tuple[float, float] | None] | None = None
        self._seq = 0
        self._closed = False
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(debounce_ms)
        self._timer.timeout.connect(self.request_view)
        self._connected_layer: Any = None
        self._paused = False  # after cancel: wait for the user to move the camera
        #: batches that arrived for a session that is no longer active (dropped, not drawn)
        self.dropped_batches = 0
        camera_of(viewer).events.center.connect(self._on_camera)
        camera_of(viewer).events.zoom.connect(self._on_camera)
        viewer.canvas.events.size.connect(self._on_camera)

    # -- state -------------------------------------------------------------------------------
    @property
    def session(self) -> PredictSession | None:
        """The active session (``None`` until a slide and a model are set)."""
        return self._session

    @property
    def live(self) -> bool:
        """Whether camera moves trigger predictions."""
        return self._live

    @live.setter
    def live(self, value: bool) -> None:
        self._live = bool(value)
        if self._live:
            self._paused = False
            self.schedule()
        else:
            self._timer.stop()
            if self._job is not None and self._job.kind == "view":
                self.cancel()

    @property
    def busy(self) -> bool:
        """Whether a job is running or waiting."""
        return self._job is not None or self._pending is not None

    @property
    def job(self) -> Job | None:
        """The running job, if any."""
        return self._job

    @property
    def n_done(self) -> int:
        """Tiles of the active session in the store (from memory)."""
        return int(self.done.sum()) if self.done is not None else 0

    def set_session(self, session: PredictSession | None, done: np.ndarray | None = None) -> None:
        """Make ``session`` the active one (``done``: its store's done mask, read off the GUI
        thread); running work of the previous session is cancelled."""
        if session is self._session:
            return
        self._pending = None
        if self._job is not None:
            self._job.token.cancel()
        self._retire(self._session)
        self._disconnect_layer()
        self._session = session
        self.done = None
        self._paused = False
        if session is not None:
            shape = tuple(session.grid.shape)
            self.done = (
                np.array(done, dtype=bool) if done is not None else np.zeros(shape, dtype=bool)
            )
            loaded = getattr(session.slide_layer.events, "loaded", None)
            if loaded is not None:
                loaded.connect(self._on_layer_loaded)
                self._connected_layer = session.slide_layer
            self.schedule()

    def _retire(self, session: PredictSession | None) -> None:
        if session is None:
            return
        session.retired = True
        if self._job is None or self._job.session is not session:
            in_background(session.close, name="stpredict-close")  # joins the reader pool
        # else: the job's worker closes it when the job ends

    def _disconnect_layer(self) -> None:
        layer, self._connected_layer = self._connected_layer, None
        if layer is not None:
            with contextlib.suppress(TypeError, ValueError, RuntimeError):
                layer.events.loaded.disconnect(self._on_layer_loaded)

    def missing(self, cells: np.ndarray) -> np.ndarray:
        """The tiles of ``cells`` not predicted yet (in-memory done mask: no zarr read)."""
        if len(cells) == 0 or self.done is None:
            return cells
        return cells[~self.done[cells[:, 0], cells[:, 1]]]

    # -- view geometry -----------------------------------------------------------------------
    def visible_rect_px(self) -> tuple[float, float, float, float] | None:
        """The canvas' view of the slide as a level-0 rectangle ``(y0, x0, y1, x1)``."""
        session = self._session
        return None if session is None else view_rect_px(self.viewer, session.slide_layer)

    def visible_cells(self) -> np.ndarray:
        """Tissue tiles in view (plus the margin), predicted or not."""
        rect = self.visible_rect_px()
        if rect is None or self._session is None:
            return np.empty((0, 2), np.int64)
        return self._session.view_cells(rect, margin=self.margin)

    def view_complete(self) -> bool:
        """Whether every visible tissue tile is predicted and no job is running."""
        if self._session is None or self.busy:
            return False
        return len(self.missing(self.visible_cells())) == 0

    def _view_center_px(self) -> tuple[float, float] | None:
        rect = self.visible_rect_px()
        if rect is None:
            return None
        return ((rect[0] + rect[2]) / 2.0, (rect[1] + rect[3]) / 2.0)

    # -- scheduling --------------------------------------------------------------------------
    def _on_camera(self, event: Any = None) -> None:
        self._paused = False
        self.schedule()

    def _on_layer_loaded(self, event: Any = None) -> None:
        if not self._paused:
            self.schedule()

    def schedule(self, event: Any = None) -> None:
        """(Re)start the debounce timer; the view is requested when it stays still."""
        if self._closed or not self._live or self._session is None:
            return
        self._timer.start()

    def request_view(self) -> int:
        """Request the missing visible tissue tiles now; returns how many were asked for."""
        self._timer.stop()
        session = self._session
        if self._closed or session is None or not self._live:
            return 0
        if self._job is not None and self._job.kind == "slide" and not self._job.token.cancelled:
            return 0  # the whole-slide job covers the view (and started from its centre)
        rect = self.visible_rect_px()
        if rect is None:
            return 0
        # the visible tiles first, then the prefetch margin around them
        in_view = session.view_cells(rect, margin=self.margin)
        core = self.missing(session.view_cells(rect, margin=0))
        ring = self.missing(_minus(in_view, core))
        n = len(core) + len(ring)
        if n == 0:
            if self._job is not None and self._job.kind == "view":
                self._cancel_job()  # its tiles left the view
            self._pending = None
            return 0
        if n > self.max_live_cells:
            self.message.emit(f"{n} tiles in view: zoom in, or use 'Predict whole slide'")
            return 0
        self._submit("view", [p for p in (core, ring) if len(p)], self._view_center_px())
        return n

    def predict_whole_slide(self) -> int:
        """Predict every tissue tile not predicted yet, from the view centre outward."""
        session = self._session
        if self._closed or session is None:
            return 0
        cells = self.missing(session.tissue_cell_list())
        if len(cells) == 0:
            self.message.emit("every tissue tile is already predicted")
            return 0
        self._submit("slide", [cells], self._view_center_px())
        return len(cells)

    def _submit(
        self, kind: str, parts: list[np.ndarray], center: tuple[float, float] | None
    ) -> None:
        if self._job is not None:
            self._cancel_job()
            self._pending = (kind, parts, center)
        else:
            self._start(kind, parts, center)

    def _cancel_job(self) -> None:
        if self._job is not None:
            self._job.token.cancel()

    def cancel(self) -> None:
        """Stop the running job after its current batch and drop the waiting one.

        Live prediction pauses until the camera moves again.
        """
        self._paused = True
        self._timer.stop()
        self._pending = None
        self._cancel_job()

    def _shown(self, kind: str) -> tuple[int, int]:
        """(predicted, total) tiles the progress bar is about (see the ``progress`` signal)."""
        session = self._session
        if session is None or self.done is None:
            return 0, 0
        if kind == "slide":
            tissue = session.tissue
            return int((self.done & tissue).sum()), int(tissue.sum())
        cells = self.visible_cells()
        if len(cells) == 0:
            return 0, 0
        return int(self.done[cells[:, 0], cells[:, 1]].sum()), len(cells)

    def _start(
        self, kind: str, parts: list[np.ndarray], center: tuple[float, float] | None
    ) -> None:
        session = self._session
        assert session is not None
        self._seq += 1
        job = Job(self._seq, kind, session, parts, center)
        job.shown_done, job.shown_total = self._shown(kind)
        job.shown_total = max(job.shown_total, job.shown_done + job.total)
        worker = EngineWorker(
            predict_job, session, parts, center, job.token, job.ended, token=job.token
        )
        job.worker = worker
        worker.yielded.connect(lambda batch, job=job: self._on_batch(job, batch))
        worker.returned.connect(lambda value, job=job: setattr(job, "outcome", value))
        worker.errored.connect(lambda exc, job=job: setattr(job, "outcome", exc))
        worker.finished.connect(lambda job=job: self._on_finished(job))
        self._job = job
        self.job_started.emit(kind, job.shown_total)
        self.busy_changed.emit(True)
        self.progress.emit(job.shown_done, job.shown_total)
        worker.start()

    def _on_batch(self, job: Job, batch: Any) -> None:
        if self._closed or job.session is not self._session:
            self.dropped_batches += 1  # a late batch of another slide/model: in its store only
            return
        cells, values = batch_cells_values(batch)
        if self.done is not None and len(cells):
            self.done[cells[:, 0], cells[:, 1]] = True
        job.done += len(cells)
        self.batch_landed.emit(job.session, cells, values, getattr(batch, "spread", None))
        done = min(job.shown_done + job.done, job.shown_total)
        self.progress.emit(done, job.shown_total)

    def _on_finished(self, job: Job) -> None:
        if job is self._job:
            self._job = None
        if job.session.retired:
            in_background(job.session.close, name="stpredict-close")
        outcome = job.outcome
        if outcome is None:
            outcome = "cancelled" if job.token.cancelled else "done"
        if isinstance(outcome, (BaseException, Failed)):
            text = (
                str(outcome)
                if isinstance(outcome, (StPredictError, Failed))
                else f"prediction failed: {type(outcome).__name__}: {outcome}"
            )
            if job.session is self._session and not self._closed:
                self.error.emit(text)
            outcome = text
        if not self._closed and job.session is self._session:
            self.job_finished.emit(job.kind, outcome)
        if not self._closed:
            self.busy_changed.emit(self._job is not None)
        if self._closed:
            return
        if self._pending is not None and self._job is None:
            kind, parts, center = self._pending
            self._pending = None
            if self._session is not None:
                parts = [p for p in (self.missing(p) for p in parts) if len(p)]
            if self._session is not None and parts:
                self._start(kind, parts, center)
            elif self._session is not None:
                self.schedule()
        elif self._job is None and job.session is not self._session:
            self.schedule()

    # -- teardown ----------------------------------------------------------------------------
    def shutdown(self) -> threading.Event | None:
        """Cancel everything; returns the running job's ``ended`` event (``None``: no job).

        Never waits: the caller decides whether to (scripts after the event loop only).
        """
        self._closed = True
        with contextlib.suppress(RuntimeError):  # at interpreter exit Qt may be gone already
            self._timer.stop()
        self._pending = None
        job = self._job
        self._cancel_job()
        self._disconnect_layer()
        viewer = self.viewer
        if viewer is not None:
            for emitter in (
                camera_of(viewer).events.center,
                camera_of(viewer).events.zoom,
                viewer.canvas.events.size,
            ):
                with contextlib.suppress(TypeError, ValueError, RuntimeError):
                    emitter.disconnect(self._on_camera)
        self._retire(self._session)
        self._session = None
        self.viewer = None  # do not keep a closed viewer (and its Qt widgets) alive
        return None if job is None else job.ended
