"""Live scheduling: predict the visible tissue cells as the user pans and zooms.

The :class:`LiveScheduler` listens to the camera (``viewer.camera.events``), the canvas size and
the slide layer's ``loaded`` event (a new data level / corner pixels), debounces them
(:data:`DEBOUNCE_MS`), and asks the session's Engine for the visible tissue cells plus a margin
that are not predicted yet, nearest to the view centre first. One job runs at a time in a
``napari.qt.threading`` generator worker that yields per batch; a new view cancels the running
job (it stops after its current batch, whose results are kept: they are in the store) and
starts once that job has ended. Every job carries its session (slide + model + grid): a batch
of a session that is no longer active is dropped on arrival, so a late result never lands on
another slide.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.qt.threading import GeneratorWorker
from qtpy.QtCore import QObject, QTimer, Signal

from napari_stpredict.errors import Cancelled, StPredictError
from napari_stpredict.progress import CancelToken
from napari_stpredict.widgets._heatmaps import world_to_level0

if TYPE_CHECKING:
    import napari

#: Quiet time after the last camera event before the visible cells are requested.
DEBOUNCE_MS = 150
#: Extra cells requested around the view on every side (prefetch for small pans).
MARGIN = 1
#: Above this many missing visible cells, live mode waits (zoom in, or predict whole slide).
MAX_LIVE_CELLS = 5_000
#: Minimum tissue fraction of a cell's footprint for the cell to be predicted.
MIN_TISSUE = 0.2


def camera_of(viewer: Any) -> Any:
    """The viewer's camera (``viewer.scene.camera`` since napari 0.9, ``viewer.camera`` before)."""
    scene = getattr(viewer, "scene", None)
    camera = getattr(scene, "camera", None) if scene is not None else None
    return camera if camera is not None else viewer.camera


# ------------------------------------------------------------------------------------ session
@dataclass(eq=False)
class PredictSession:
    """Everything needed to predict one slide with one model on one grid.

    A session is immutable once built; changing slide, model, µm/px or stride builds a new one.
    Built off the GUI thread by :func:`open_session`.
    """

    slide: Any
    slide_layer: Any
    predictor: Any
    model_path: Path
    grid: Any
    store: Any
    engine: Any
    tissue: np.ndarray  # bool (gh, gw)
    key: str
    warnings: list[str] = field(default_factory=list)
    retired: bool = False  #: no longer active: close the engine once its last job ends
    _close_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def slide_path(self) -> str:
        """The slide file."""
        return str(getattr(self.slide, "path", ""))

    @property
    def store_path(self) -> str:
        """Where the prediction cache of this session lives."""
        for attr in ("path", "root"):
            value = getattr(self.store, attr, None)
            if value is not None:
                return str(value)
        return ""

    def done_mask(self) -> np.ndarray:
        """bool ``(gh, gw)``: cells already predicted (in the store)."""
        return np.asarray(self.store.done_mask(), dtype=bool)

    def view_cells(self, rect_px: Sequence[float], *, margin: int = MARGIN) -> np.ndarray:
        """Tissue cells intersecting the level-0 rectangle ``(y0, x0, y1, x1)`` plus ``margin``."""
        cells = self.grid.cells_in_view(*rect_px, units="px", margin=margin)
        if len(cells) == 0:
            return cells
        keep = self.tissue[cells[:, 0], cells[:, 1]]
        return cells[keep]

    def missing(self, cells: np.ndarray) -> np.ndarray:
        """The cells of ``cells`` not predicted yet (reads only their block of the done mask)."""
        if len(cells) == 0:
            return cells
        return cells[~np.asarray(self.store.is_done(cells), dtype=bool)]

    def tissue_cell_list(self) -> np.ndarray:
        """All tissue cells, ``(n, 2)``."""
        return np.argwhere(self.tissue).astype(np.int64)

    def read_plane(self, gene_index: int) -> np.ndarray:
        """Stored values of one gene, ``(gh, gw)`` float32, NaN where not predicted."""
        plane = np.array(self.store.read(gene_index), dtype=np.float32)
        plane[~self.done_mask()] = np.nan  # a cell is trusted once marked done
        return plane

    def close(self) -> None:
        """Stop the engine's reader threads and close the slide (once no job of this session
        runs). Idempotent."""
        with self._close_lock:
            self.engine.close()
            self.slide.close()


def _minus(cells: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Rows of ``cells`` not in ``other`` (both ``(n, 2)`` grid indices), order kept."""
    if len(cells) == 0 or len(other) == 0:
        return cells
    width = int(max(cells[:, 1].max(), other[:, 1].max())) + 1
    keep = ~np.isin(cells[:, 0] * width + cells[:, 1], other[:, 0] * width + other[:, 1])
    return cells[keep]


def slide_source(layer: Any) -> tuple[str, float | None]:
    """The slide file and µm/px behind a napari Image layer.

    Raises
    ------
    StPredictError
        If the layer has no file behind it (e.g. an array added from the console).
    """
    meta = (getattr(layer, "metadata", None) or {}).get("stpredict_slide") or {}
    path = meta.get("path")
    mpp = meta.get("mpp")
    if not path:
        source = getattr(layer, "source", None)
        path = getattr(source, "path", None)
    if not path:
        raise StPredictError(
            f"layer {layer.name!r}: no slide file behind it; open the slide with File > Open "
            "(napari-stpredict reader)"
        )
    return str(path), (float(mpp) if mpp else None)


def open_session(
    *,
    slide_path: str,
    slide_layer: Any,
    predictor: Any,
    model_path: str | Path,
    mpp: float | None,
    stride_um: float | None,
    cache_dir: str | Path | None,
) -> PredictSession:
    """Open the slide, its tissue mask, the grid, the prediction store and the engine.

    Slow (reads the slide's coarse level): run it in a worker thread. Core only, no Qt.

    Parameters
    ----------
    slide_path
        The slide file of the slide layer.
    slide_layer
        The napari layer (kept on the session to register heatmaps; not touched here).
    predictor
        A loaded :class:`~napari_stpredict.model.Predictor`.
    model_path
        The predictor's model file (recorded in layer metadata).
    mpp
        µm per level-0 pixel; ``None`` = the file's value, or the model's scale when unknown.
    stride_um
        Grid stride in µm; ``None`` = the patch size.
    cache_dir
        Folder of the prediction cache; ``None`` = the default cache location.
    """
    from napari_stpredict.inference.engine import Engine
    from napari_stpredict.inference.grid import TileGrid
    from napari_stpredict.inference.store import PredictionStore
    from napari_stpredict.slide import open_slide, tissue_mask

    slide = open_slide(slide_path, mpp=mpp)
    try:
        warnings: list[str] = []
        grid = TileGrid.for_slide(slide, predictor, stride_um=stride_um)
        if grid.mpp_assumed:
            warnings.append(
                f"{Path(slide_path).name}: no µm/px in the file; assuming the model's scale "
                f"({grid.effective_mpp:.3g} µm/px). Set the slide's µm/px if known."
            )
        mask = tissue_mask(slide)
        tissue = np.asarray(grid.tissue_cells(mask, MIN_TISSUE), dtype=bool)
        store = PredictionStore.for_slide(slide, predictor, grid, cache_dir=cache_dir)
        engine = Engine(slide, predictor, grid, store, tissue=tissue, min_tissue=MIN_TISSUE)
    except BaseException:
        slide.close()
        raise
    key = f"{slide.fingerprint()}:{Path(model_path).resolve()}:{grid.key()}"
    return PredictSession(
        slide=slide,
        slide_layer=slide_layer,
        predictor=predictor,
        model_path=Path(model_path),
        grid=grid,
        store=store,
        engine=engine,
        tissue=tissue,
        key=key,
        warnings=warnings,
    )


def batch_cells_values(batch: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(cells (n, 2), values (n, G))`` of one batch yielded by the Engine."""
    if isinstance(batch, tuple):
        cells, values = batch[0], batch[1]
    else:
        cells, values = batch.cells, batch.values
    return np.asarray(cells, dtype=np.int64).reshape(-1, 2), np.asarray(values)


def _predict_job(
    session: PredictSession,
    parts: Sequence[np.ndarray],
    center: tuple[float, float] | None,
    token: CancelToken,
    ended: threading.Event,
) -> Iterator[Any]:
    """The worker body: yield each batch the Engine predicts; return how it ended.

    ``parts`` are cell sets in priority order (the visible cells, then the prefetch margin);
    each is run nearest ``center`` first. Cancelling goes through ``token`` only (never
    ``worker.quit()``): the Engine then stops before its next batch and closes its store
    writer in this thread.
    """
    try:
        for cells in parts:
            run = session.engine.run(cells, center=center, cancel=token)
            with contextlib.closing(run) as batches:
                for batch in batches:
                    yield batch
                    if token.cancelled:
                        return "cancelled"
    except Cancelled:
        return "cancelled"
    except StPredictError as err:
        return Failed(err)
    finally:
        if session.retired:
            session.close()
        ended.set()
    return "cancelled" if token.cancelled else "done"


class Failed:
    """An expected failure returned by a worker as a value (superqt would treat a returned
    exception as a crash and show a traceback)."""

    def __init__(self, error: StPredictError) -> None:
        self.error = error

    def __str__(self) -> str:
        return str(self.error)


class EngineWorker(GeneratorWorker):
    """A generator worker whose ``quit()`` cancels the Engine instead of abandoning it.

    napari (``wait_for_workers_to_quit`` at application exit) and other code call ``quit()``
    on every worker; a plain GeneratorWorker would then stop resuming the generator and leave
    the Engine's writer thread running and its last batch unflushed until garbage collection.
    Cancelling the token lets the Engine end after its current batch, in its own thread, with
    every finished batch stored.
    """

    def __init__(self, func: Any, *args: Any, token: CancelToken) -> None:
        super().__init__(func, *args)
        self._token = token

    def quit(self) -> None:
        self._token.cancel()


@dataclass(eq=False)
class Job:
    """One run of the Engine in a worker thread."""

    id: int
    kind: str  # "view" or "slide"
    session: PredictSession
    parts: list[np.ndarray]  # cell sets in priority order
    center: tuple[float, float] | None
    token: CancelToken = field(default_factory=CancelToken)
    ended: threading.Event = field(default_factory=threading.Event)
    worker: Any = None
    done: int = 0
    started: float = 0.0
    outcome: Any = None

    @property
    def cells(self) -> np.ndarray:
        """All cells asked for, ``(n, 2)``."""
        return np.concatenate(self.parts) if self.parts else np.empty((0, 2), np.int64)

    @property
    def total(self) -> int:
        """Number of cells asked for."""
        return sum(len(p) for p in self.parts)


# ---------------------------------------------------------------------------------- scheduler
class LiveScheduler(QObject):
    """Runs the Engine for the visible cells (live) or the whole slide, one job at a time.

    Signals
    -------
    batch_landed(session, cells, values)
        A batch of the active session was predicted (GUI thread).
    job_started(kind, total), job_finished(kind, outcome)
        A job of the active session started / ended; ``outcome`` is ``"done"``,
        ``"cancelled"`` or an error message.
    busy_changed(busy)
        Whether a job (of any session) is running.
    progress(done, total)
        Cells predicted by the running job.
    message(text)
        Something to show the user (not an error).
    error(text)
        A one-line error (also shown as a napari notification by the widget).
    """

    batch_landed = Signal(object, object, object)
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
        self._live = True
        self._job: Job | None = None
        self._pending: tuple[str, list[np.ndarray], tuple[float, float] | None] | None = None
        self._seq = 0
        self._jobs_started = 0
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
    def jobs_started(self) -> int:
        """How many jobs were started so far (for tests and benchmarks)."""
        return self._jobs_started

    def set_session(self, session: PredictSession | None) -> None:
        """Make ``session`` the active one; running work of the previous session is cancelled."""
        if session is self._session:
            return
        self._pending = None
        if self._job is not None:
            self._job.token.cancel()
        self._retire(self._session)
        self._disconnect_layer()
        self._session = session
        self._paused = False
        if session is not None:
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
            session.close()
        # else: the job's worker (or _on_finished) closes it when the job ends

    def _disconnect_layer(self) -> None:
        layer, self._connected_layer = self._connected_layer, None
        if layer is not None:
            with contextlib.suppress(TypeError, ValueError, RuntimeError):
                layer.events.loaded.disconnect(self._on_layer_loaded)

    # -- view geometry -----------------------------------------------------------------------
    def visible_rect_px(self) -> tuple[float, float, float, float] | None:
        """The canvas' view of the slide as a level-0 rectangle ``(y0, x0, y1, x1)``."""
        session = self._session
        if session is None:
            return None
        center = np.asarray(camera_of(self.viewer).center, dtype=float)[-2:]
        zoom = float(camera_of(self.viewer).zoom)
        size = np.asarray(self.viewer.canvas.size, dtype=float)[-2:]  # (h, w) screen px
        if zoom <= 0 or not np.all(size > 0):
            return None
        half = size / (2.0 * zoom)
        a = world_to_level0(session.slide_layer, center - half)
        b = world_to_level0(session.slide_layer, center + half)
        return (float(a[0]), float(a[1]), float(b[0]), float(b[1]))

    def visible_cells(self) -> np.ndarray:
        """Tissue cells in view (plus the margin), predicted or not."""
        rect = self.visible_rect_px()
        if rect is None or self._session is None:
            return np.empty((0, 2), np.int64)
        return self._session.view_cells(rect, margin=self.margin)

    def view_complete(self) -> bool:
        """Whether every visible tissue cell is predicted and no job is running."""
        if self._session is None or self.busy:
            return False
        return len(self._session.missing(self.visible_cells())) == 0

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
        """Request the missing visible tissue cells now; returns how many were asked for."""
        self._timer.stop()
        session = self._session
        if self._closed or session is None or not self._live:
            return 0
        if self._job is not None and self._job.kind == "slide" and not self._job.token.cancelled:
            return 0  # the whole-slide job covers the view (and started from its centre)
        rect = self.visible_rect_px()
        if rect is None:
            return 0
        # the visible cells first, then the prefetch margin around them
        core = session.missing(session.view_cells(rect, margin=0))
        ring = session.missing(_minus(session.view_cells(rect, margin=self.margin), core))
        n = len(core) + len(ring)
        if n == 0:
            if self._job is not None and self._job.kind == "view":
                self._cancel_job()  # its cells left the view
            self._pending = None
            return 0
        if n > self.max_live_cells:
            self.message.emit(f"{n} cells in view: zoom in, or use 'Predict whole slide'")
            return 0
        self._submit("view", [p for p in (core, ring) if len(p)], self._view_center_px())
        return n

    def predict_whole_slide(self) -> int:
        """Predict every tissue cell not predicted yet, from the view centre outward."""
        session = self._session
        if self._closed or session is None:
            return 0
        cells = session.missing(session.tissue_cell_list())
        if len(cells) == 0:
            self.message.emit("every tissue cell is already predicted")
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
        job = self._job
        if job is not None:
            job.token.cancel()

    def cancel(self) -> None:
        """Stop the running job after its current batch and drop the waiting one.

        Live prediction pauses until the camera moves again.
        """
        self._paused = True
        self._timer.stop()
        self._pending = None
        self._cancel_job()

    def _start(
        self, kind: str, parts: list[np.ndarray], center: tuple[float, float] | None
    ) -> None:
        session = self._session
        assert session is not None
        self._seq += 1
        self._jobs_started += 1
        job = Job(self._seq, kind, session, parts, center, started=time.perf_counter())
        worker = EngineWorker(
            _predict_job, session, parts, center, job.token, job.ended, token=job.token
        )
        job.worker = worker
        worker.yielded.connect(lambda batch, job=job: self._on_batch(job, batch))
        worker.returned.connect(lambda value, job=job: setattr(job, "outcome", value))
        worker.errored.connect(lambda exc, job=job: setattr(job, "outcome", exc))
        worker.finished.connect(lambda job=job: self._on_finished(job))
        self._job = job
        self.job_started.emit(kind, job.total)
        self.busy_changed.emit(True)
        self.progress.emit(0, job.total)
        worker.start()

    def _on_batch(self, job: Job, batch: Any) -> None:
        if self._closed or job.session is not self._session:
            self.dropped_batches += 1  # a late batch of another slide/model: in its store only
            return
        cells, values = batch_cells_values(batch)
        job.done += len(cells)
        self.batch_landed.emit(job.session, cells, values)
        self.progress.emit(min(job.done, job.total), job.total)

    def _on_finished(self, job: Job) -> None:
        if job is self._job:
            self._job = None
        if job.session.retired:
            job.session.close()
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
                parts = [p for p in (self._session.missing(p) for p in parts) if len(p)]
            if self._session is not None and parts:
                self._start(kind, parts, center)
            elif self._session is not None:
                self.schedule()
        elif self._job is None and job.session is not self._session:
            self.schedule()

    # -- teardown ----------------------------------------------------------------------------
    def shutdown(self, *, wait_s: float = 30.0) -> bool:
        """Cancel everything and wait (up to ``wait_s``) for the worker thread to end.

        Returns whether no worker is left running.
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
        if job is None:
            return True
        return job.ended.wait(wait_s)
