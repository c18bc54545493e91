"""The inference engine: cells in, cached predictions out.

:class:`Engine` serves the napari widget, ``stpredict predict`` and the tests alike. Given a set
of grid cells it

1. drops background cells (tissue mask) and cells already in the store,
2. orders the rest from a centre (the view centre) outward — cell by cell for a view, store
   block by store block (32 × 32 cells, nearest block first, rows inside) for large runs, so
   slide tiles and store chunks are each touched about once,
3. reads every field of view the model asks for (``predictor.input_spec.fields()``: the patch,
   and e.g. a wider context field) with :func:`napari_stpredict.slide.patches.read_patch_rects`
   in a thread pool, a bounded number of batches ahead of the model; all readers share one
   :class:`~napari_stpredict.slide.patches.TileCache`, so each slide tile is decoded once per
   region (pixels bit-identical to per-patch :meth:`Slide.read_resampled`); memory is bounded
   by the batches in flight plus the cache, never by the slide; on CUDA the batch is read into
   pinned memory and copied without blocking,
4. runs the predictor batch by batch (halving the batch size on a GPU out-of-memory error),
   with ``return_spread=True`` when the model has uncertainty,
5. hands each batch to a background writer that buffers it and writes whole store blocks
   (:class:`~napari_stpredict.inference.store.WriteBuffer`), and yields it to the caller so
   a view can refresh at once.

Between batches it reports progress and honours a :class:`~napari_stpredict.progress.CancelToken`.
"""

from __future__ import annotations

import contextlib
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
from napari_stpredict.inference.protocol import fields_of, has_uncertainty
from napari_stpredict.inference.store import PredictionStore, WriteBuffer
from napari_stpredict.progress import CancelToken, ProgressCallback, report
from napari_stpredict.slide.patches import (
    DEFAULT_CACHE_BYTES,
    TileCache,
    field_rects,
    read_patch_rects,
)

__all__ = ["BatchResult", "Engine", "EngineStats", "RunSummary", "order_cells"]

#: Batch size when neither the caller nor the predictor sets one.
DEFAULT_BATCH_CPU = 32
DEFAULT_BATCH_GPU = 128
#: Runs with more cells than this are ordered block by block (tile and chunk locality).
BLOCK_ORDER_MIN = 1024


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
    spread
        ``(n, genes)`` float32 per-gene spread when the model has uncertainty, else ``None``.
    """

    cells: np.ndarray
    values: np.ndarray
    done: int
    total: int
    batch_size: int
    spread: np.ndarray | None = None


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
    tiles_decoded: int = 0  #: slide tiles decoded (tile cache misses)
    tiles_reused: int = 0  #: slide tile reads served by the tile cache
    tile_cache_peak_bytes: int = 0
    write_buffer_peak_bytes: int = 0
    blocks_written: int = 0  #: whole store blocks written


@dataclass(frozen=True)
class RunSummary:
    """What :meth:`Engine.predict_all_tissue` did."""

    predicted: int  #: cells predicted by this call
    cached: int  #: tissue cells already in the store
    tissue: int  #: tissue cells in the grid
    model_calls: int  #: model calls made by this call
    seconds: float


def order_cells(
    cells: np.ndarray,
    grid: TileGrid,
    center: tuple[float, float] | None,
    *,
    block: tuple[int, int] | None = None,
) -> np.ndarray:
    """Sort cells by the distance of their centres to ``center`` (level-0 px ``(y, x)``).

    ``None`` centres on the mean of the cells. Ties are broken by row, then column, so the
    order is deterministic. With ``block=(bh, bw)`` the cells are grouped in blocks of
    ``bh × bw`` cells, nearest block (by its centre) first, row-major inside a block.
    """
    cells = np.asarray(cells, dtype=np.int64).reshape(-1, 2)
    if len(cells) <= 1:
        return cells
    centers = grid.cell_centers_px(cells)
    c = centers.mean(axis=0) if center is None else np.asarray(center, dtype=np.float64)
    if block is not None:
        bh, bw = block
        bi, bj = cells[:, 0] // bh, cells[:, 1] // bw
        bc = grid.cell_centers_px(np.stack([bi * bh + (bh - 1) / 2, bj * bw + (bw - 1) / 2], 1))
        d2 = ((bc - c) ** 2).sum(axis=1)
        order = np.lexsort((cells[:, 1], cells[:, 0], bj, bi, d2))
        return cells[order]
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
    """Background store writer: drains queued batches into a :class:`WriteBuffer`."""

    def __init__(
        self,
        store: PredictionStore,
        stats: EngineStats,
        maxsize: int,
        expected: np.ndarray | None = None,
    ) -> None:
        super().__init__(name="stpredict-store-writer", daemon=True)
        self.store = store
        self.stats = stats
        self.buffer = WriteBuffer(store, expected)
        self.queue: queue.Queue[tuple[np.ndarray, np.ndarray, np.ndarray | None] | None] = (
            queue.Queue(maxsize)
        )
        self.error: BaseException | None = None

    def _do(self, fn: Any, *args: Any) -> None:
        if self.error is not None:
            return
        try:
            t0 = time.perf_counter()
            fn(*args)
            self.stats.write_s += time.perf_counter() - t0
        except BaseException as err:  # re-raised in the generator's thread
            self.error = err

    def run(self) -> None:
        while True:
            try:
                item = self.queue.get(timeout=self.buffer.max_age_s / 2)
            except queue.Empty:
                self._do(self.buffer.flush_aged)
                continue
            if item is None:
                break
            self._do(self.buffer.add, *item)
        self._do(self.buffer.flush)
        self.stats.blocks_written += self.buffer.blocks_written
        self.stats.write_buffer_peak_bytes = max(
            self.stats.write_buffer_peak_bytes, self.buffer.peak_bytes
        )

    def put(self, cells: np.ndarray, values: np.ndarray, spread: np.ndarray | None) -> None:
        self.raise_error()
        self.queue.put((cells, values, spread))

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
    cache_bytes
        Bound of the decoded-tile cache shared by the reader threads.

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
        cache_bytes: int = DEFAULT_CACHE_BYTES,
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
        self._workers = int(workers)
        #: decoded slide tiles shared by the reader threads (each tile decoded once per region)
        self.tile_cache = TileCache(slide, max_bytes=cache_bytes)
        #: fields of view per tile ``(side µm, side px)``, the patch first
        self.fields = fields_of(predictor, patch_um=grid.patch_um)
        if any(px != grid.patch_px for _, px in self.fields):
            raise StPredictError(
                f"fields of view {self.fields}: every field must be {grid.patch_px} px"
            )
        self.with_spread = has_uncertainty(predictor) and store.spread is not None
        self._pinned: list[Any] = []  # free pinned host buffers (CUDA)
        self._pin = True
        self._pinned_lock = threading.Lock()

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
    # ----------------------------------------------------------------- reading
    def _batch_buffer(self, n: int) -> tuple[np.ndarray, Any]:
        """``(numpy view, what to hand the model)`` for ``n`` tiles: pinned memory on CUDA."""
        p = self.grid.patch_px
        nf = len(self.fields)
        shape = (n, p, p, 3) if nf == 1 else (n, nf, p, p, 3)
        if not (self._pin and self.device.startswith("cuda")):
            arr = np.empty(shape, np.uint8)
            return arr, arr
        import torch

        with self._pinned_lock:
            for k, t in enumerate(self._pinned):
                if tuple(t.shape) == shape:
                    t = self._pinned.pop(k)
                    return t.numpy(), t
        try:
            t = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
        except RuntimeError:  # pinning refused (e.g. no driver): pageable memory
            arr = np.empty(shape, np.uint8)
            return arr, arr
        return t.numpy(), t

    def _release_buffer(self, handle: Any) -> None:
        if not isinstance(handle, np.ndarray):
            with self._pinned_lock:
                if len(self._pinned) < self.prefetch + 2:
                    self._pinned.append(handle)

    def _read_into(self, out: np.ndarray, cells: np.ndarray) -> None:
        """Read the fields of ``cells`` into ``out`` (a slice of the batch buffer)."""
        t0 = time.perf_counter()
        rects = self.grid.cell_rects_px(cells)
        rects[:, 2:] -= rects[:, :2]  # (y0, x0, h, w)
        p = self.grid.patch_px
        for k, (um, _px) in enumerate(self.fields):
            dst = out if len(self.fields) == 1 else out[:, k]
            read_patch_rects(
                self.slide,
                field_rects(rects, um / self.grid.patch_um) if k else rects,
                p,
                cache=self.tile_cache,
                out=dst,
            )
        with self._stats_lock:
            self.stats.read_s += time.perf_counter() - t0

    def _submit_batch(self, chunk: np.ndarray) -> tuple[np.ndarray, Any, list[Future[None]]]:
        view, handle = self._batch_buffer(len(chunk))
        # a few groups per reader: contiguous cells share tiles; enough groups to balance
        step = max(1, math.ceil(len(chunk) / (2 * self._workers)))
        futures = [
            self._pool.submit(self._read_into, view[lo : lo + step], chunk[lo : lo + step])
            for lo in range(0, len(chunk), step)
        ]
        return view, handle, futures

    def _read_patch(self, cell: np.ndarray) -> np.ndarray:
        """The model input of one cell (all fields), as the engine reads it."""
        view, _ = self._batch_buffer(1)
        view = np.array(view)
        self._read_into(view, np.asarray(cell, dtype=np.int64).reshape(1, 2))
        return view[0]

    def _predict(self, patches: Any, bs: int) -> tuple[np.ndarray, np.ndarray | None, int]:
        """Predict ``patches`` in chunks of ``bs``; return values, spread and the batch size."""
        out = []
        spreads = []
        start = 0
        n = len(patches)
        while start < n:
            chunk = patches[start : start + bs]
            self.stats.model_calls += 1
            t0 = time.perf_counter()
            spread = None
            try:
                if self.with_spread:
                    values, spread = self.predictor.predict(chunk, return_spread=True)
                else:
                    values = self.predictor.predict(chunk)
            except Exception as err:
                if not isinstance(chunk, np.ndarray) and not _is_oom(err):
                    # the model refused a (pinned) torch tensor: numpy from now on
                    self._pin = False
                    patches = patches.numpy()
                    continue
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
            if spread is not None:
                spreads.append(np.asarray(spread, dtype=np.float32).reshape(values.shape))
            start += len(chunk)
        spread_all = None
        if spreads and len(spreads) == len(out):
            spread_all = np.concatenate(spreads) if len(spreads) > 1 else spreads[0]
        return (np.concatenate(out) if len(out) > 1 else out[0]), spread_all, bs

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
        selected = self._select(cells, count=True)
        block = self.store.block_shape if len(selected) > BLOCK_ORDER_MIN else None
        todo = order_cells(selected, self.grid, center, block=block)
        total = len(todo)
        report(progress, 0, total, "predicting")
        if total == 0:
            return
        writer = _Writer(self.store, self.stats, maxsize=self.prefetch + 2, expected=todo)
        writer.start()
        inflight: deque[tuple[np.ndarray, np.ndarray, Any, list[Future[None]]]] = deque()
        next_cell = 0
        done = 0
        failed = False
        hits0, misses0 = self.tile_cache.hits, self.tile_cache.misses
        try:
            while done < total:
                # keep the model fed: the next batch plus `prefetch` more are being read
                while next_cell < total and len(inflight) <= self.prefetch:
                    chunk = todo[next_cell : next_cell + bs]
                    inflight.append((chunk, *self._submit_batch(chunk)))
                    next_cell += len(chunk)
                if cancel is not None:
                    cancel.raise_if_cancelled("prediction")
                chunk, view, handle, futures = inflight.popleft()
                t0 = time.perf_counter()
                for f in futures:
                    f.result()
                self.stats.wait_s += time.perf_counter() - t0
                values, spread, bs = self._predict(handle, bs)
                self._release_buffer(handle)
                del view, handle
                writer.put(chunk, values, spread)
                done += len(chunk)
                self.stats.cells_predicted += len(chunk)
                self.stats.batches += 1
                report(progress, done, total, f"predicted {done}/{total} cells")
                yield BatchResult(chunk, values, done, total, bs, spread)
        except BaseException:
            failed = True
            raise
        finally:
            for _, _, _, futures in inflight:
                for f in futures:
                    f.cancel()
            for _, _, _, futures in inflight:  # a running read still fills its buffer
                for f in futures:
                    if not f.cancelled():
                        with contextlib.suppress(BaseException):
                            f.result()
            self.stats.tiles_decoded += self.tile_cache.misses - misses0
            self.stats.tiles_reused += self.tile_cache.hits - hits0
            self.stats.tile_cache_peak_bytes = self.tile_cache.peak_bytes
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
            self.tile_cache.clear()
            self._pinned.clear()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Engine(grid={self.grid.shape}, genes={len(self.store.genes)}, device={self.device}, "
            f"batch_size={self.batch_size}, model_calls={self.stats.model_calls})"
        )
