"""The "Predict expression" dock: model, slide, genes, live heatmaps, whole slide.

A thin Qt view over :class:`~._state.PredictState` (what the user chose; Qt-free). The work is
done by the core in worker threads (:func:`~._common.start_worker`): loading the model,
opening the session (slide + grid + tissue + store + engine, and the store's done mask),
reading cached planes, clearing the cache. :mod:`._live` schedules the Engine from the camera
and :mod:`._heatmaps` draws; the model part (the Predictor built in a worker, the live view's
test-time augmentation) is :mod:`._predict_model`. The GUI thread never touches the file
system, zarr or a thread join. Every method a button calls is public (``load_model``,
``set_tta``, ``set_slide_layer``, ``set_mpp``, ``set_stride``, ``set_genes``, ``set_live``,
``set_colorbars``, ``set_smooth``, ``set_uncertainty``, ``predict_whole_slide``, ``cancel``,
``clear_cache``), so scripts, ``stpredict view`` and the tests drive the same code as a user.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QTimer, Signal
from qtpy.QtWidgets import QWidget

from napari_stpredict.widgets._common import (
    Failed,
    WorkerSet,
    in_background,
    notify,
    start_worker,
)
from napari_stpredict.widgets._heatmaps import HeatmapSet, model_gene_stats, units_text
from napari_stpredict.widgets._live import (
    LiveScheduler,
    PredictSession,
    open_session,
    wait_ended,
)
from napari_stpredict.widgets._predict_model import ModelMixin
from napari_stpredict.widgets._predict_panel import build_predict_ui
from napari_stpredict.widgets._predict_parts import GenesMixin, SlideMixin, is_slide_layer
from napari_stpredict.widgets._state import (
    N_HEG,
    PRESET_HEG,
    PRESET_MARKERS,
    PRESET_PAM50,
    PredictState,
    preset_genes,
)

if TYPE_CHECKING:
    import napari

__all__ = [
    "N_HEG",
    "PRESET_HEG",
    "PRESET_MARKERS",
    "PRESET_PAM50",
    "PredictWidget",
    "is_slide_layer",
    "preset_genes",
]

#: Heatmaps are redrawn at most this often while batches land (ms).
REFRESH_MS = 100


class PredictWidget(ModelMixin, GenesMixin, SlideMixin, QWidget):
    """Dock widget "Predict expression".

    Parameters
    ----------
    napari_viewer
        The viewer (npe2 passes it).
    cache_dir
        Prediction cache folder; ``None`` = the default (``$STPREDICT_CACHE_DIR`` or the
        user cache dir).
    device
        ``"auto"`` (CUDA > MPS > CPU), ``"cpu"``, ``"cuda"``, ``"mps"``.

    Attributes
    ----------
    state
        The Qt-free :class:`~._state.PredictState`.
    session
        The active :class:`~napari_stpredict.inference.session.PredictSession`.
    heatmaps
        The active :class:`~._heatmaps.HeatmapSet`.
    scheduler
        The :class:`~._live.LiveScheduler` running the engine.
    """

    #: Emitted (GUI thread) when a session is ready: heatmap layers can be made.
    session_ready = Signal(object)
    #: Emitted when a model is loaded (the Predictor).
    model_loaded = Signal(object)

    def __init__(
        self,
        napari_viewer: napari.Viewer,
        *,
        cache_dir: str | os.PathLike | None = None,
        device: str = "auto",
    ) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.device_request = device
        self.state = PredictState()
        self.session: PredictSession | None = None
        self.heatmaps: HeatmapSet | None = None
        self._slide_layer: Any = None
        self._build_seq = 0
        self._model_seq = 0
        self.workers = WorkerSet()
        self._clear_after_cancel = False
        self._loading_planes = 0
        self._closed = False
        # Not a Qt child: it must outlive this widget's C++ side long enough to stop its thread.
        self.scheduler = LiveScheduler(napari_viewer)
        for name, slot in (
            ("batch_landed", self._on_batch),
            ("job_started", self._on_job_started),
            ("job_finished", self._on_job_finished),
            ("progress", self._on_progress),
            ("busy_changed", lambda busy: self.cancel_button.setEnabled(busy)),
            ("message", self._set_status),
            ("error", self._on_error),
        ):
            getattr(self.scheduler, name).connect(slot)
        self._flush_timer = QTimer(self)
        self._flush_timer.setSingleShot(True)
        self._flush_timer.setInterval(REFRESH_MS)
        self._last_flush = 0.0
        self._flush_timer.timeout.connect(self._flush)

        build_predict_ui(self)
        self.state.events.connect("tta", self._on_tta_requested)
        self.state.events.connect("genes", self._on_genes)
        self.state.events.connect("inputs", self._rebuild_session)
        self.state.events.connect("display", self._on_display)
        self.viewer.layers.events.inserted.connect(self._refresh_slide_choices)
        self.viewer.layers.events.removed.connect(self._on_layer_removed)
        self._refresh_slide_choices()

        scheduler = self.scheduler
        # a plain closure (no reference to self): runs when the viewer window deletes us
        self.destroyed.connect(lambda *_: scheduler.shutdown())

    # -- compatibility: the model lives in the state ------------------------------------------
    predictor = property(lambda self: self.state.predictor)
    model_path = property(lambda self: self.state.model_path)

    @property
    def genes(self) -> list[str]:
        """The selected genes (one heatmap layer each)."""
        return list(self.state.genes)

    def _set_status(self, text: str) -> None:
        self.state.set_status(text)
        with contextlib.suppress(RuntimeError):  # the C++ side may be gone with the viewer
            self.status_label.setText(text)

    # =========================================================================== session
    def _drop_session(self, *, remove_layers: bool = True) -> None:
        self._build_seq += 1  # a session being built for the old inputs is discarded
        self.scheduler.set_session(None)
        if self.heatmaps is not None:
            if remove_layers:
                for gene in list(self.heatmaps.layers):
                    self.heatmaps.remove_gene(gene)
                self.heatmaps.remove_spread_layers()
            self.heatmaps.detach()
        self.heatmaps = None
        self.session = None

    def _rebuild_session(self) -> None:
        """(Re)open slide + grid + store + engine for the current inputs, in a worker."""
        self._drop_session()
        with contextlib.suppress(RuntimeError):
            self.slide_warning.hide()
        s, layer = self.state, self._slide_layer
        if self._closed or not s.ready or layer is None:
            return
        seq = self._build_seq
        kwargs = {
            "slide_path": s.slide_path,
            "slide_layer": layer,
            "predictor": s.predictor,
            "model_path": s.model_path,
            "mpp": s.mpp,
            "stride_um": s.stride_um,
            "cache_dir": self.cache_dir,
        }
        self._set_status(f"opening {Path(str(s.slide_path)).name}…")

        def work() -> tuple[PredictSession, np.ndarray]:
            session = open_session(**kwargs)
            try:
                return session, session.done_mask()  # zarr read: here, not on the GUI thread
            except BaseException:
                session.close()
                raise

        start_worker(
            work, returned=lambda result: self._on_session(seq, result), workers=self.workers
        )

    def _on_session(self, seq: int, result: Any) -> None:
        stale = self._closed or seq != self._build_seq
        if isinstance(result, tuple) and (stale or result[0].slide_layer not in self.viewer.layers):
            in_background(result[0].close)  # built for inputs that changed meanwhile
            return
        if stale:
            return
        if isinstance(result, Failed):
            self._on_error(result.text)
            return
        session, done = result
        for text in session.warnings:
            self.slide_warning.setText(f"⚠ {text}")
            self.slide_warning.show()
            notify("warning", text)
        self.session = session
        predictor = session.predictor
        self.heatmaps = HeatmapSet(
            self.viewer,
            slide_layer=session.slide_layer,
            grid=session.grid,
            panel=predictor.genes,
            gene_stats=model_gene_stats(predictor),
            metadata={
                "store": session.store_path,
                "model": str(session.model_path),
                "slide_path": session.slide_path,
                # the tiles that should be predicted: exports say "partial" only when some
                # of these are missing (bool (gh, gw), read-only)
                "tissue": session.tissue,
            },
            read_plane=session.read_plane,
            units=units_text(getattr(predictor, "metadata", None)),
        )
        self.heatmaps.set_display(colorbar=self.state.colorbar, smooth=self.state.smooth)
        if self.state.genes:
            self._show_genes(self.heatmaps, self.state.genes)
        gh, gw = session.grid.shape
        n_tissue = int(session.tissue.sum())
        self._set_status(f"{Path(session.slide_path).name}: {gh}×{gw} tiles, {n_tissue} on tissue")
        self.scheduler.live = self.live_check.isChecked()
        self.scheduler.set_session(session, done)
        self.session_ready.emit(session)

    # =========================================================================== running
    def set_live(self, on: bool) -> None:
        """Turn live prediction of the visible tissue on or off."""
        if self.live_check.isChecked() != bool(on):
            self.live_check.setChecked(bool(on))  # re-enters through the toggled signal
            return
        self.scheduler.live = bool(on)

    def predict_whole_slide(self) -> int:
        """Predict every tissue tile of the slide; returns how many tiles are queued."""
        if self.session is None:
            self._set_status("load a model and pick a slide first")
            return 0
        return self.scheduler.predict_whole_slide()

    def cancel(self) -> None:
        """Stop the running prediction after its current batch."""
        self.scheduler.cancel()
        self._set_status("cancelling…" if self.scheduler.job is not None else "cancelled")

    def clear_cache(self) -> None:
        """Delete every cached prediction (running work is cancelled first; worker thread)."""
        if self.scheduler.job is not None:
            self._clear_after_cancel = True
            self.scheduler.cancel()
            return
        self._clear_after_cancel = False
        from napari_stpredict.inference.store import clear_cache

        self._drop_session()  # nothing may write to the cache while it is deleted
        self._set_status("clearing the cache…")

        def cleared(freed: Any) -> None:
            if isinstance(freed, Failed):
                self._on_error(f"clearing the cache: {freed.text}")
                return
            self._set_status(f"cache cleared ({freed / 2**20:.1f} MB freed)")
            self._rebuild_session()

        start_worker(clear_cache, self.cache_dir, returned=cleared, workers=self.workers)

    @property
    def n_done(self) -> int:
        """Tiles of the active session in the store (in memory; no zarr read)."""
        return self.scheduler.n_done

    def view_complete(self) -> bool:
        """Whether the visible tissue is fully predicted and drawn (no job running)."""
        return (
            self.session is not None
            and self.heatmaps is not None
            and self._loading_planes == 0
            and not self._flush_timer.isActive()
            and not self.heatmaps.dirty
            and self.scheduler.view_complete()
        )

    # -- scheduler signals ---------------------------------------------------------------------
    def _on_batch(self, session: Any, cells: np.ndarray, values: np.ndarray, spread: Any) -> None:
        if session is not self.session or self.heatmaps is None:
            return
        self.heatmaps.update(cells, values, spread)
        if self._flush_timer.isActive():
            return  # a redraw is already due
        wait_ms = REFRESH_MS - 1000 * (time.perf_counter() - self._last_flush)
        if wait_ms <= 0:
            self._flush()  # at most ~10 Hz, but without delaying a redraw that is allowed now
        else:
            self._flush_timer.start(int(wait_ms) + 1)

    def _flush(self) -> None:
        self._last_flush = time.perf_counter()
        if self.heatmaps is not None:
            self.heatmaps.flush()

    def _on_job_started(self, kind: str, total: int) -> None:
        self.cancel_button.setEnabled(True)
        what = "slide" if kind == "slide" else "view"
        self.progress_bar.setFormat(f"%v / %m tiles ({what})")
        self._set_status(f"predicting the {what}: {total} tissue tiles…")

    def _on_progress(self, done: int, total: int) -> None:
        self.state.set_progress(done, total)
        self.progress_bar.setRange(0, max(total, 1))
        self.progress_bar.setValue(done)

    def _on_job_finished(self, kind: str, outcome: Any) -> None:
        self._flush_timer.stop()
        self._flush()
        if self._clear_after_cancel and self.scheduler.job is None:
            self.clear_cache()
            return
        if outcome == "done":
            n = self.scheduler.n_done
            self._set_status(
                f"whole slide done ({n} tiles)" if kind == "slide" else "view predicted"
            )
        elif outcome == "cancelled":
            if self.scheduler.job is None:
                self._set_status("cancelled")
        else:
            self._set_status(f"✗ {outcome}")

    def _on_error(self, text: str) -> None:
        self._set_status(f"✗ {text}")
        if not self._closed:
            notify("error", text)

    # =========================================================================== teardown
    def close_workers(self, *, wait_s: float = 30.0) -> bool:
        """Cancel all work; the widget is inert afterwards.

        With ``wait_s > 0`` it also waits for the worker threads to end — for scripts once the
        event loop is over (``stpredict view``, tests); the dock itself closes with
        ``wait_s=0`` and never blocks the GUI thread. Returns whether no worker is left.
        """
        self._closed = True
        with contextlib.suppress(RuntimeError):  # the C++ side may be gone with the viewer
            self._flush_timer.stop()
        ended = self.scheduler.shutdown()
        with contextlib.suppress(TypeError, ValueError, RuntimeError):
            self.viewer.layers.events.inserted.disconnect(self._refresh_slide_choices)
            self.viewer.layers.events.removed.disconnect(self._on_layer_removed)
        if wait_s <= 0:
            return (ended is None or ended.is_set()) and len(self.workers) == 0
        return wait_ended(ended, wait_s) and self.workers.wait(wait_s)

    def closeEvent(self, event: Any) -> None:
        self.close_workers(wait_s=0)
        super().closeEvent(event)
