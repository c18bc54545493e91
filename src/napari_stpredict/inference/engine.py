"""The inference engine: cells in, cached predictions out.

:class:`Engine` serves the napari widget, ``stpredict predict`` and the tests alike. Given a set
of grid cells it

1. drops background cells (tissue mask) and cells already in the store,
2. orders the rest from a centre (the view centre) outward,
3. reads their patches with :meth:`Slide.read_resampled` in a thread pool, a bounded number
   of batches ahead of the model (decode overlaps compute; memory is bounded by the batch,
   never by the slide),
4. runs the predictor batch by batch (halving the batch size on a GPU out-of-memory error),
5. hands each batch to a background writer that stores it (coalescing batches when the disk is
   slower than the model), and yields it to the caller so a view can refresh at once.

Between batches it reports progress and honours a :class:`~napari_stpredict.progress.CancelToken`.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from napari_stpredict.errors import StPredictError
from napari_stpredict.inference.grid import TileGrid
from napari_stpredict.inference.store import PredictionStore
from napari_stpredict.progress import CancelToken, ProgressCallback, report

__all__ = ["BatchResult", "Engine", "EngineStats", "RunSummary", "order_cells"]

#: Batch size when neither the caller nor the predictor sets one.
DEFAULT_BATCH_CPU = 32
DEFAULT_BATCH_GPU = 128


@dataclass(frozen=True)
class BatchResult:
    """One predicted batch, yielded by :meth:`Engine.run`.

    The values are handed to the store's background writer at the same time; every yielded
    batch is in the store once :meth:`Engine.run` has finished (normally, cancelled or closed).

    Attributes
    ----------
    cells
        ``(n, 2)`` int64 grid indices ``(i, j)``.
    values
        ``(n, genes)`` float32 predictions, columns in ``store.genes`` order.
    done
        Cells predicted so far in this run (including this batch).
    total
        Cells this run predicts (after dropping background and already stored cells).
    batch_size
        The batch size in use (smaller than requested after a GPU out-of-memory error).
    """

    cells: np.ndarray
    values: np.ndarray
    done: int
    total: int
    batch_size: int


@dataclass
class EngineStats:
    """Counters over the engine's lifetime (tests assert on ``model_calls``)."""

    model_calls: int = 0  #: calls of ``predictor.predict`` (including ones that ran out of memory)
    cells_predicted: int = 0
    cells_cached: int = 0  #: requested cells found in the store
    cells_background: int = 0  #: requested cells dropped by the tissue mask
    batches: int = 0
    oom_halvings: int = 0
    read_s: float = 0.0  #: summed time of patch reads (in worker threads)
    wait_s: float = 0.0  #: time the model waited for patches
    predict_s: float = 0.0
    write_s: float = 0.0  #: time in store writes (background thread)


@dataclass(frozen=True)
class RunSummary:
    """What :meth:`Engine.predict_all_tissue` did."""

    predicted: int  #: cells predicted by this call
    cached: int  #: tissue cells already in the store
    tissue: int  #: tissue cells in the grid
    model_calls: int  #: model calls made by this call
    seconds: float


def order_cells(
    cells: np.ndarray, grid: TileGrid, center: tuple[float, float] | None
) -> np.ndarray:
    """Sort cells by the distance of their centres to ``center`` (level-0 px ``(y, x)``).

    ``None`` centres on the mean of the cells. Ties are broken by row, then column, so the
    order is deterministic.
    """
    cells = np.asarray(cells, dtype=np.int64).reshape(-1, 2)
    if len(cells) <= 1:
        return cells
    centers = grid.cell_centers_px(cells)
    c = centers.mean(axis=0) if center is None else np.asarray(center, dtype=np.float64)
    d2 = ((centers - c) ** 2).sum(axis=1)
    order = np.lexsort((cells[:, 1], cells[:, 0], d2))
    return cells[order]


def _is_oom(err: BaseException) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def _free_device_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # best effort only
        pass


class _Writer(threading.Thread):
    """Background store writer: drains queued batches and writes them in one go."""

    def __init__(self, store: PredictionStore, stats: EngineStats, maxsize: int) -> None:
        super().__init__(name="stpredict-store-writer", daemon=True)
        self.store = store
        self.stats = stats
        self.queue: queue.Queue[tuple[np.ndarray, np.ndarray] | None] = queue.Queue(maxsize)
        self.error: BaseException | None = None

    def run(self) -> None:
        stop = False
        while not stop:
            items = [self.queue.get()]
            while True:  # coalesce whatever else is waiting
                try:
                    items.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            if items[-1] is None or None in items:
                stop = True
            batches = [it for it in items if it is not None]
            if not batches or self.error is not None:
                continue
            try:
                t0 = time.perf_counter()
                cells = np.concatenate([b[0] for b in batches])
                values = np.concatenate([b[1] for b in batches])
                self.store.write(cells, values)
                self.stats.write_s += time.perf_counter() - t0
            except BaseException as err:  # re-raised in the generator's thread
                self.error = err

    def put(self, cells: np.ndarray, values: np.ndarray) -> None:
        self.raise_error()
        self.queue.put((cells, values))

    def finish(self) -> None:
        self.queue.put(None)
        self.join()

    def raise_error(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            if isinstance(err, StPredictError):
                raise err
            raise StPredictError(f"{self.store.path}: cannot write predictions ({err})") from err


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
        self.slide = slide
        self.predictor = predictor
        self.grid = grid
        self.store = store
        self.min_tissue = float(min_tissue)
        self.prefetch = int(prefetch)
        self.stats = EngineStats()
        self._stats_lock = threading.Lock()
        self.batch_size = self._check_batch(batch_size) if batch_size else self._default_batch()
        workers = read_workers or min(16, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(
            max_workers=int(workers), thread_name_prefix="stpredict-read"
        )
        self._tissue_src = tissue
        self._tissue: np.ndarray | None = None
        self._tissue_lock = threading.Lock()
        self._closed = False

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
        t0 = time.perf_counter()
        y0, x0, _, _ = self.grid.cell_rect_px(int(cell[0]), int(cell[1]))
        side = self.grid.cell_px
        p = self.grid.patch_px
        patch = self.slide.read_resampled(y0, x0, side, side, out_shape=(p, p))
        with self._stats_lock:
            self.stats.read_s += time.perf_counter() - t0
        return patch

    def _predict(self, patches: np.ndarray, bs: int) -> tuple[np.ndarray, int]:
        """Predict ``patches`` in chunks of ``bs``; return the values and the batch size in use."""
        out = []
        start = 0
        n = len(patches)
        while start < n:
            chunk = patches[start : start + bs]
            self.stats.model_calls += 1
            t0 = time.perf_counter()
            try:
                values = self.predictor.predict(chunk)
            except Exception as err:
                if not _is_oom(err):
                    raise
                _free_device_memory()
                if bs == 1:
                    raise StPredictError(
                        f"out of memory on {self.device} even with batch size 1"
                    ) from None
                old, bs = bs, max(1, bs // 2)
                self.batch_size = min(self.batch_size, bs)
                self.stats.oom_halvings += 1
                warnings.warn(
                    f"out of memory on {self.device} at batch size {old}; continuing with {bs}",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            finally:
                self.stats.predict_s += time.perf_counter() - t0
            values = np.asarray(values, dtype=np.float32)
            if values.shape != (len(chunk), len(self.store.genes)):
                raise StPredictError(
                    f"predictor returned shape {values.shape}, expected "
                    f"({len(chunk)}, {len(self.store.genes)})"
                )
            out.append(values)
            start += len(chunk)
        return (np.concatenate(out) if len(out) > 1 else out[0]), bs

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
        todo = order_cells(self._select(cells, count=True), self.grid, center)
        total = len(todo)
        report(progress, 0, total, "predicting")
        if total == 0:
            return
        writer = _Writer(self.store, self.stats, maxsize=self.prefetch + 2)
        writer.start()
        inflight: deque[tuple[np.ndarray, list[Future[np.ndarray]]]] = deque()
        next_cell = 0
        done = 0
        failed = False
        try:
            while done < total:
                # keep the model fed: the next batch plus `prefetch` more are being read
                while next_cell < total and len(inflight) <= self.prefetch:
                    chunk = todo[next_cell : next_cell + bs]
                    futures = [self._pool.submit(self._read_patch, c) for c in chunk]
                    inflight.append((chunk, futures))
                    next_cell += len(chunk)
                if cancel is not None:
                    cancel.raise_if_cancelled("prediction")
                chunk, futures = inflight.popleft()
                t0 = time.perf_counter()
                patches = np.stack([f.result() for f in futures])
                self.stats.wait_s += time.perf_counter() - t0
                values, bs = self._predict(patches, bs)
                del patches
                writer.put(chunk, values)
                done += len(chunk)
                self.stats.cells_predicted += len(chunk)
                self.stats.batches += 1
                report(progress, done, total, f"predicted {done}/{total} cells")
                yield BatchResult(chunk, values, done, total, bs)
        except BaseException:
            failed = True
            raise
        finally:
            for _, futures in inflight:
                for f in futures:
                    f.cancel()
            writer.finish()
            if writer.error is not None and failed:
                # another error is already on its way: do not mask it, but do not hide this one
                warnings.warn(
                    f"{self.store.path}: some predictions were not stored ({writer.error})",
                    RuntimeWarning,
                    stacklevel=2,
                )
            elif writer.error is not None:
                writer.raise_error()

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
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Engine(grid={self.grid.shape}, genes={len(self.store.genes)}, device={self.device}, "
            f"batch_size={self.batch_size}, model_calls={self.stats.model_calls})"
        )
