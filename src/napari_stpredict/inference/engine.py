"""The inference engine: cells in, cached predictions out.

:class:`Engine` serves the napari widget, ``stpredict predict`` and the tests alike. Given a set
of grid cells it

1. drops background cells (tissue mask) and cells already in the store,
2. orders the rest from a centre (the view centre) outward — cell by cell for a view, store
   block by store block (32 × 32 cells, nearest block first, rows inside) for large runs, so
   slide tiles and store chunks are each touched about once (:mod:`.ordering`),
3. reads every field of view the model asks for (``predictor.input_spec.fields()``: the patch,
   and e.g. a wider context field) with :func:`napari_stpredict.slide.patches.read_patch_rects`
   in a thread pool, a bounded number of batches ahead of the model (:mod:`.batch_reader`); all
   readers share one :class:`~napari_stpredict.slide.patches.TileCache`, so each slide tile is
   decoded once per region (pixels bit-identical to per-patch :meth:`Slide.read_resampled`);
   memory is bounded by the batches in flight plus the cache, never by the slide; on CUDA the
   batch is read into pinned memory and copied without blocking,
4. runs the predictor batch by batch (halving the batch size on a GPU out-of-memory error,
   :mod:`.model_calls`), with ``return_spread=True`` when the model has uncertainty,
5. hands each batch to a background writer (:mod:`.writer`) that buffers it and writes whole
   store blocks (:class:`~napari_stpredict.inference.store.WriteBuffer`), and yields it to the
   caller so a view can refresh at once.

Between batches it reports progress and honours a :class:`~napari_stpredict.progress.CancelToken`.
The result types live in :mod:`.results`; every name is importable from here as before.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np

from napari_stpredict.errors import StPredictError
from napari_stpredict.inference.batch_reader import BatchReader, ReadAhead, tile_cache_bytes
from napari_stpredict.inference.grid import TileGrid
from napari_stpredict.inference.model_calls import ModelCaller
from napari_stpredict.inference.ordering import order_cells
from napari_stpredict.inference.protocol import fields_of, has_uncertainty
from napari_stpredict.inference.results import BatchResult, EngineStats, RunSummary
from napari_stpredict.inference.store import PredictionStore
from napari_stpredict.inference.writer import BackgroundWriter
from napari_stpredict.progress import CancelToken, ProgressCallback, report
from napari_stpredict.slide.patches import TileCache

__all__ = ["BatchResult", "Engine", "EngineStats", "RunSummary", "order_cells"]

#: Batch size when neither the caller nor the predictor sets one.
DEFAULT_BATCH_CPU = 32
DEFAULT_BATCH_GPU = 128
#: Runs with more cells than this are ordered block by block (tile and chunk locality).
BLOCK_ORDER_MIN = 1024


class Engine:
    """Batched, cached, cancellable prediction of grid cells.

    Parameters
    ----------
    slide
        The :class:`~napari_stpredict.slide.Slide` (uses ``read_resampled``).
    predictor
        A :class:`~napari_stpredict.model.Predictor` (uses ``predict``, ``genes``,
        ``patch_px``, ``patch_um`` and optionally ``batch_size``/``device``).
    grid
        The tile grid; must match the store's.
    store
        Where predictions go (and are looked up: stored cells are never predicted again).
    tissue
        ``"auto"`` (default): background cells are dropped using
        :func:`napari_stpredict.slide.tissue_mask` (computed once, lazily);
        a ``TissueMask`` or a bool ``(gh, gw)`` array: that mask; ``None``: no filtering.
    min_tissue
        Minimum tissue fraction of a cell for ``"auto"``/``TissueMask``.
    batch_size
        Default batch size; ``None`` = the predictor's ``batch_size`` or 32 (CPU) / 128 (GPU).
    read_workers
        Threads decoding patches; ``None`` = ``min(16, cpu_count)``.
    prefetch
        Batches read ahead of the model (memory ≈ (prefetch + 1) × batch × patch bytes).
    cache_bytes
        Bound of the decoded-tile cache shared by the reader threads; ``None`` = the tiles
        under 1.5 store blocks of cells (:func:`~.batch_reader.tile_cache_bytes`), between
        :data:`~napari_stpredict.slide.patches.DEFAULT_CACHE_BYTES` (64 MiB) and
        :data:`~.batch_reader.MAX_CACHE_BYTES` (256 MiB).
    resize_on_device
        Resize patches on the predictor's device (:mod:`.device_resize`: the same pixels as
        Pillow, bit for bit) instead of with Pillow in the reader threads; ``None`` = on CUDA
        devices only.

    Attributes
    ----------
    stats : EngineStats
        Counters, including ``model_calls``.
    batch_size : int
        Current batch size (halved after a GPU out-of-memory error, for the engine's lifetime).
    """

    def __init__(
        self,
        slide: Any,
        predictor: Any,
        grid: TileGrid,
        store: PredictionStore,
        *,
        tissue: np.ndarray | Any | Literal["auto"] | None = "auto",
        min_tissue: float = 0.2,
        batch_size: int | None = None,
        read_workers: int | None = None,
        prefetch: int = 2,
        cache_bytes: int | None = None,
        resize_on_device: bool | None = None,
    ) -> None:
        if store.grid != grid:
            raise StPredictError(f"{store.path}: store grid {store.grid} differs from {grid}")
        genes = list(getattr(predictor, "genes", []))
        if genes != store.genes:
            raise StPredictError(f"{store.path}: store genes differ from the model's gene panel")
        model_um = getattr(predictor, "patch_um", None)
        if int(predictor.patch_px) != grid.patch_px or (
            model_um is not None and not math.isclose(float(model_um), grid.patch_um, rel_tol=1e-6)
        ):
            raise StPredictError(
                f"grid patch {grid.patch_um:g} µm / {grid.patch_px} px differs from the model's "
                f"{predictor.patch_um:g} µm / {predictor.patch_px} px"
            )
        if prefetch < 0:
            raise StPredictError(f"prefetch={prefetch!r}: must be ≥ 0")
        self.slide, self.predictor, self.grid, self.store = slide, predictor, grid, store
        self.min_tissue = float(min_tissue)
        self.prefetch = int(prefetch)
        self.stats = EngineStats()
        self.batch_size = self._check_batch(batch_size) if batch_size else self._default_batch()
        self._tissue_src = tissue
        self._tissue: np.ndarray | None = None
        self._tissue_lock = threading.Lock()
        self._closed = False
        #: fields of view per tile ``(side µm, side px)``, the patch first
        self.fields = fields_of(predictor, patch_um=grid.patch_um)
        if any(px != grid.patch_px for _, px in self.fields):
            raise StPredictError(
                f"fields of view {self.fields}: every field must be {grid.patch_px} px"
            )
        self.with_spread = has_uncertainty(predictor) and store.spread is not None
        self._reader = BatchReader(
            slide,
            grid,
            self.fields,
            stats=self.stats,
            workers=int(read_workers or min(16, os.cpu_count() or 1)),
            cache_bytes=cache_bytes or self._cache_bytes(),
            pinned=self.device.startswith("cuda"),
            spare_buffers=self.prefetch + 2,
            resize_device=self._resize_device(resize_on_device),
        )
        self._model = ModelCaller(
            predictor,
            n_genes=len(store.genes),
            with_spread=self.with_spread,
            stats=self.stats,
            device=self.device,
        )

    def _resize_device(self, on_device: bool | None) -> str | None:
        """Where patches are resized: the CUDA device by default, else Pillow in the readers."""
        if on_device is None:
            on_device = self.device.startswith("cuda")
        return self.device if on_device else None

    def _cache_bytes(self) -> int:
        """The default tile cache bound: one store block's tiles (bounded)."""
        widest = max(um for um, _ in self.fields) / self.grid.patch_um
        return tile_cache_bytes(
            self.slide, self.grid, self.store.block_shape, field_factor=max(widest, 1.0)
        )

    @property
    def resize_device(self) -> str | None:
        """The torch device that resizes patches (``None``: Pillow in the reader threads)."""
        return self._reader.resize_device

    @property
    def tile_cache(self) -> TileCache:
        """Decoded slide tiles shared by the reader threads (each decoded once per region)."""
        return self._reader.tile_cache

    # ----------------------------------------------------------------- configuration
    @staticmethod
    def _check_batch(batch_size: int) -> int:
        if int(batch_size) != batch_size or int(batch_size) < 1:
            raise StPredictError(f"batch_size={batch_size!r}: must be a positive integer")
        return int(batch_size)

    def _default_batch(self) -> int:
        own = getattr(self.predictor, "batch_size", None)
        if own:
            return int(own)
        device = str(getattr(self.predictor, "device", "cpu"))
        return DEFAULT_BATCH_CPU if device.startswith("cpu") else DEFAULT_BATCH_GPU

    @property
    def device(self) -> str:
        """The predictor's device, as text (``"cpu"``, ``"cuda:0"``, ``"mps"``)."""
        return str(getattr(self.predictor, "device", "cpu"))

    @property
    def tissue(self) -> np.ndarray | None:
        """Bool ``(gh, gw)``: cells that may be predicted (``None`` = no filtering)."""
        if self._tissue is None and self._tissue_src is not None:
            with self._tissue_lock:
                if self._tissue is None:
                    self._tissue = self._resolve_tissue(self._tissue_src)
        return self._tissue

    def _resolve_tissue(self, src: Any) -> np.ndarray:
        if isinstance(src, str):
            if src != "auto":
                raise StPredictError(f"tissue={src!r}: expected 'auto', a mask or None")
            from napari_stpredict.slide import tissue_mask

            src = tissue_mask(self.slide)
        if isinstance(src, np.ndarray):
            if src.shape != self.grid.shape:
                raise StPredictError(
                    f"tissue mask of shape {src.shape}: expected the grid shape {self.grid.shape}"
                )
            return src.astype(bool, copy=False)
        return self.grid.tissue_cells(src, self.min_tissue)

    # ----------------------------------------------------------------- selection
    def pending(self, cells: np.ndarray) -> np.ndarray:
        """The cells :meth:`run` would predict: in the grid, on tissue, not yet stored.

        Parameters
        ----------
        cells
            ``(n, 2)`` grid indices or a bool ``(gh, gw)`` mask.

        Returns
        -------
        numpy.ndarray
            ``(m, 2)`` int64 unique cells, row-major order.
        """
        return self._select(cells, count=False)

    def _select(self, cells: np.ndarray, *, count: bool) -> np.ndarray:
        gh, gw = self.grid.shape
        arr = np.asarray(cells)
        if arr.dtype == bool:
            if arr.shape != (gh, gw):
                raise StPredictError(f"cell mask of shape {arr.shape}: expected {(gh, gw)}")
            arr = np.argwhere(arr)
        if arr.size == 0:
            return np.empty((0, 2), np.int64)
        if arr.ndim != 2 or arr.shape[1] != 2:
            raise StPredictError(f"cells of shape {arr.shape}: expected (n, 2) grid indices")
        arr = arr.astype(np.int64, copy=False)
        if (arr < 0).any() or (arr[:, 0] >= gh).any() or (arr[:, 1] >= gw).any():
            raise StPredictError(f"cells outside the {gh}×{gw} grid")
        arr = np.unique(arr, axis=0)
        tissue = self.tissue
        if tissue is not None:
            keep = tissue[arr[:, 0], arr[:, 1]]
            if count:
                self.stats.cells_background += int((~keep).sum())
            arr = arr[keep]
        if len(arr):
            done = self.store.is_done(arr)
            if count:
                self.stats.cells_cached += int(done.sum())
            arr = arr[~done]
        return arr

    # ----------------------------------------------------------------- running
    def _read_patch(self, cell: np.ndarray) -> np.ndarray:
        """The model input of one cell (all fields), as the engine reads it."""
        return self._reader.read_one(cell)

    def _predict(self, patches: Any, bs: int) -> tuple[np.ndarray, np.ndarray | None, int]:
        """Predict ``patches`` in chunks of ``bs``; return values, spread and the batch size."""
        values, spread, bs = self._model.predict(patches, bs)
        if self._model.pinned_refused:
            self._reader.pin = False
        if self._model.oom_batch is not None:
            self.batch_size = min(self.batch_size, self._model.oom_batch)
        return values, spread, bs

    def run(
        self,
        cells: np.ndarray,
        *,
        center: tuple[float, float] | None = None,
        cancel: CancelToken | None = None,
        progress: ProgressCallback | None = None,
        batch_size: int | None = None,
    ) -> Iterator[BatchResult]:
        """Predict the cells that are not stored yet, nearest to ``center`` first.

        A generator: nothing happens until it is iterated. Close it (or let it finish) to stop;
        pending reads are dropped and every yielded batch is flushed to the store before it
        returns.

        Parameters
        ----------
        cells
            ``(n, 2)`` grid indices or a bool ``(gh, gw)`` mask (e.g. from
            :meth:`TileGrid.cells_in_view`). Background and stored cells are skipped.
        center
            Level-0 px ``(y, x)`` to start from (the view centre); ``None`` = the cells' mean.
        cancel
            Checked between batches; when set, the run stops after the batch in progress and
            raises :class:`~napari_stpredict.errors.Cancelled` (finished batches are kept).
        progress
            Called as ``progress(done, total, message)`` after every batch.
        batch_size
            Cells per batch for this run; ``None`` = :attr:`batch_size`. After a GPU
            out-of-memory error the run goes on with half, and :attr:`batch_size` is lowered
            to at most that for later runs.

        Yields
        ------
        BatchResult
            Each predicted batch.
        """
        if self._closed:
            raise StPredictError("engine is closed")
        bs = self.batch_size if batch_size is None else self._check_batch(batch_size)
        todo = self._plan(cells, center)
        report(progress, 0, len(todo), "predicting")
        if len(todo):
            yield from self._run_batches(todo, bs, cancel=cancel, progress=progress)

    def _plan(self, cells: np.ndarray, center: tuple[float, float] | None) -> np.ndarray:
        """The cells a run predicts, in order: block by block for large runs."""
        selected = self._select(cells, count=True)
        block = self.store.block_shape if len(selected) > BLOCK_ORDER_MIN else None
        return order_cells(selected, self.grid, center, block=block)

    def _run_batches(
        self,
        todo: np.ndarray,
        bs: int,
        *,
        cancel: CancelToken | None,
        progress: ProgressCallback | None,
    ) -> Iterator[BatchResult]:
        """Read ahead, predict, hand to the writer and yield, batch by batch (see :meth:`run`)."""
        total = len(todo)
        writer = BackgroundWriter(self.store, self.stats, maxsize=self.prefetch + 2, expected=todo)
        writer.start()
        reads = ReadAhead(self._reader, todo, self.prefetch)
        cache = self.tile_cache
        hits0, misses0 = cache.hits, cache.misses
        done = 0
        failed = False
        try:
            while done < total:
                reads.fill(bs)  # keep the model fed: this batch plus `prefetch` more
                if cancel is not None:
                    cancel.raise_if_cancelled("prediction")
                batch, waited = reads.take()
                self.stats.wait_s += waited
                cells = batch.cells
                values, spread, bs = self._predict(self._reader.model_input(batch), bs)
                self._reader.release(batch.handle)
                del batch  # the buffer is free (or back in the pinned pool) while we yield
                writer.put(cells, values, spread)
                done += len(cells)
                self.stats.cells_predicted += len(cells)
                self.stats.batches += 1
                report(progress, done, total, f"predicted {done}/{total} cells")
                yield BatchResult(cells, values, done, total, bs, spread)
        except BaseException:
            failed = True
            raise
        finally:
            reads.cancel()
            self.stats.tiles_decoded += cache.misses - misses0
            self.stats.tiles_reused += cache.hits - hits0
            self.stats.tile_cache_peak_bytes = cache.peak_bytes
            writer.finish(failed=failed)

    def predict_all_tissue(
        self,
        *,
        center: tuple[float, float] | None = None,
        cancel: CancelToken | None = None,
        progress: ProgressCallback | None = None,
        batch_size: int | None = None,
    ) -> RunSummary:
        """Predict every tissue cell of the slide (every cell when ``tissue=None``).

        Parameters are those of :meth:`run`. Returns when done; raises
        :class:`~napari_stpredict.errors.Cancelled` if cancelled (finished batches are kept).
        """
        t0 = time.perf_counter()
        calls0 = self.stats.model_calls
        tissue = self.tissue
        mask = np.ones(self.grid.shape, bool) if tissue is None else tissue
        n_tissue = int(mask.sum())
        predicted = 0
        cached0 = self.stats.cells_cached
        for batch in self.run(
            mask, center=center, cancel=cancel, progress=progress, batch_size=batch_size
        ):
            predicted = batch.done
        return RunSummary(
            predicted=predicted,
            cached=self.stats.cells_cached - cached0,
            tissue=n_tissue,
            model_calls=self.stats.model_calls - calls0,
            seconds=time.perf_counter() - t0,
        )

    # ----------------------------------------------------------------- life cycle
    def close(self) -> None:
        """Stop the reader threads (pending reads are dropped). Idempotent."""
        if not self._closed:
            self._closed = True
            self._reader.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Engine(grid={self.grid.shape}, genes={len(self.store.genes)}, device={self.device}, "
            f"batch_size={self.batch_size}, model_calls={self.stats.model_calls})"
        )
