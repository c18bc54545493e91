"""One prediction session: slide + grid + tissue + store + engine, built in one place.

Every caller that predicts a slide — the napari Predict widget, ``stpredict predict`` /
cohort, ``stpredict demo``, ``stpredict view`` and the benchmarks — opens a
:class:`PredictSession` with :func:`open_session` instead of wiring the pieces itself, so the
recipe (grid from the model, tissue mask, cached store, engine) is written once. Qt-free.

>>> s = open_session(slide_path="slide.ome.tif", predictor=p)      # doctest: +SKIP
>>> with s:                                                          # doctest: +SKIP
...     s.engine.predict_all_tissue()
"""

from __future__ import annotations

import threading
import warnings as _warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_stpredict.errors import StPredictError
from napari_stpredict.inference.grid import TileGrid
from napari_stpredict.inference.store import PredictionStore
from napari_stpredict.slide import open_slide, tissue_mask

__all__ = ["MARGIN", "MIN_TISSUE", "PredictSession", "open_session"]

#: Minimum tissue fraction of a cell's footprint for the cell to be predicted.
MIN_TISSUE = 0.2
#: Extra cells requested around a view on every side (prefetch for small pans).
MARGIN = 1


@dataclass(eq=False)
class PredictSession:
    """Everything needed to predict one slide with one model on one grid.

    A session is immutable once built; changing slide, model, µm/px or stride builds a new one.
    Built off the GUI thread by :func:`open_session`. Closing it stops the engine's threads and
    closes the slide when the session opened it.
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
    owns_slide: bool = True  #: close the slide with the session
    _close_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _closed: bool = field(default=False, repr=False)

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

    def predict_all_tissue(self, **kwargs: Any) -> Any:
        """Predict every tissue cell not stored yet (see :meth:`Engine.predict_all_tissue`)."""
        return self.engine.predict_all_tissue(**kwargs)

    def close(self) -> None:
        """Release everything the session opened: stop the engine's reader threads, release
        the store's output lock (:meth:`PredictionStore.open_at`; the store stays readable)
        and close the slide when the session opened it. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            try:
                self.engine.close()
            finally:
                try:
                    close_store = getattr(self.store, "close", None)
                    if close_store is not None:
                        close_store()
                finally:
                    if self.owns_slide:
                        self.slide.close()

    def __enter__(self) -> PredictSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_session(
    *,
    predictor: Any,
    slide_path: str | Path | None = None,
    slide: Any = None,
    slide_layer: Any = None,
    model_path: str | Path | None = None,
    mpp: float | None = None,
    stride_um: float | None = None,
    cache_dir: str | Path | None = None,
    store_path: str | Path | None = None,
    store_attrs: dict[str, Any] | None = None,
    tissue: np.ndarray | None = None,
    min_tissue: float = MIN_TISSUE,
    batch_size: int | None = None,
    read_workers: int | None = None,
    verify_store: bool = True,
) -> PredictSession:
    """Open the slide, its tissue mask, the grid, the prediction store and the engine.

    Long because its docstring documents sixteen keyword options; the body is a short recipe
    of helpers (grid, tissue, store, engine) that reads top to bottom.

    Slow (reads the slide's coarse level): run it in a worker thread in a GUI. Core only, no Qt.

    Parameters
    ----------
    predictor
        A loaded :class:`~napari_stpredict.model.Predictor` (or anything satisfying
        :class:`~napari_stpredict.inference.protocol.PredictorProtocol`).
    slide_path
        The slide file; opened here (with ``mpp``) and closed with the session.
    slide
        An already open :class:`~napari_stpredict.slide.Slide` instead of ``slide_path``; the
        caller keeps closing it.
    slide_layer
        The napari layer (kept on the session to register heatmaps; not touched here).
    model_path
        The predictor's model file (default: ``predictor.path``).
    mpp
        µm per level-0 pixel for ``slide_path``; ``None`` = the file's value, or the model's
        scale when unknown (a warning is recorded in :attr:`PredictSession.warnings`).
    stride_um
        Grid stride in µm; ``None`` = the patch size.
    cache_dir
        Folder of the prediction cache (store keyed by slide + model + grid); ``None`` = the
        default cache location. Ignored when ``store_path`` is given.
    store_path
        A fixed store location (``OUT/<name>/predictions.zarr`` of ``stpredict predict``):
        reused when it holds this slide + model + grid, replaced when it is one of our stores
        for something else, refused when it is anything else
        (:meth:`PredictionStore.open_at`).
    store_attrs
        Extra JSON facts saved with a new store at ``store_path``.
    tissue
        A bool ``(gh, gw)`` tissue mask to use instead of computing one.
    min_tissue
        Minimum tissue fraction of a cell's footprint.
    batch_size, read_workers
        Passed to the :class:`~napari_stpredict.inference.Engine`.
    verify_store
        Check a reused store (done mask vs values) and heal broken chunks
        (:meth:`PredictionStore.verify`).
    """
    from napari_stpredict.inference.engine import Engine  # looked up now (tests replace it)

    if (slide is None) == (slide_path is None):
        raise StPredictError("open_session: give exactly one of slide_path and slide")
    owns = slide is None
    if owns:
        slide = open_slide(slide_path, mpp=mpp)
    model_path = Path(model_path if model_path is not None else getattr(predictor, "path", ""))
    store = None
    notes: list[str] = []
    try:
        grid = _grid_for(slide, predictor, stride_um, notes)
        if tissue is None:
            tissue = grid.tissue_cells(tissue_mask(slide), min_tissue)
        tissue = np.asarray(tissue, dtype=bool)
        store = _open_store(slide, predictor, grid, store_path, store_attrs, cache_dir)
        if verify_store:
            _verify(store, notes)
        engine = Engine(
            slide,
            predictor,
            grid,
            store,
            tissue=tissue,
            min_tissue=min_tissue,
            batch_size=batch_size,
            read_workers=read_workers,
        )
    except BaseException:
        if store is not None:  # release the output lock taken by open_at
            store.close()
        if owns:
            slide.close()
        raise
    return PredictSession(
        slide=slide,
        slide_layer=slide_layer,
        predictor=predictor,
        model_path=model_path,
        grid=grid,
        store=store,
        engine=engine,
        tissue=tissue,
        key=f"{slide.fingerprint()}:{model_path.resolve()}:{grid.key()}",
        warnings=notes,
        owns_slide=owns,
    )


def _grid_for(slide: Any, predictor: Any, stride_um: float | None, notes: list[str]) -> TileGrid:
    """The model's grid over the slide; a note when the slide's µm/px had to be assumed."""
    grid = TileGrid.for_slide(slide, predictor, stride_um=stride_um)
    if grid.mpp_assumed:
        notes.append(
            f"{Path(str(slide.path)).name}: no µm/px in the file; assuming the model's "
            f"scale ({grid.effective_mpp:.3g} µm/px). Set the slide's µm/px if known."
        )
    return grid


def _open_store(
    slide: Any,
    predictor: Any,
    grid: TileGrid,
    store_path: str | Path | None,
    store_attrs: dict[str, Any] | None,
    cache_dir: str | Path | None,
) -> PredictionStore:
    """The store at ``store_path`` (an output), or the cache's store for slide + model + grid."""
    if store_path is not None:
        return PredictionStore.open_at(
            store_path, slide=slide, predictor=predictor, grid=grid, attrs=store_attrs
        )
    return PredictionStore.for_slide(slide, predictor, grid, cache_dir=cache_dir)


def _verify(store: PredictionStore, notes: list[str]) -> None:
    """Check a reused store and heal broken chunks; a note (and a warning) when any were."""
    report = store.verify(heal=True)
    if report.broken_chunks:
        more = ", …" if len(report.broken_chunks) > 1 else ""
        text = (
            f"{store.path}: {len(report.broken_chunks)} broken chunk(s) "
            f"({report.broken_chunks[0]}{more}); {report.cells_reset} tile(s) will be predicted again"
        )
        notes.append(text)
        _warnings.warn(text, RuntimeWarning, stacklevel=3)
