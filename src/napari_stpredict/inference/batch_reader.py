"""Reading the model input of grid cells ahead of the model, in threads, into batch buffers.

:class:`BatchReader` owns the reader threads, the decoded-tile cache they share and the
(pinned, on CUDA) batch buffers — on CUDA the threads cut the stored windows and the GPU
resizes them (:mod:`.device_resize`, bit-identical to Pillow); :class:`ReadAhead` keeps a bounded number of batches of one
run being read while the model works on the current one.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_stpredict.errors import first_line
from napari_stpredict.inference.device_resize import (
    WindowPlan,
    plan_windows,
    read_windows,
    resize_windows,
)
from napari_stpredict.inference.grid import TileGrid
from napari_stpredict.inference.model_calls import is_oom
from napari_stpredict.inference.results import EngineStats
from napari_stpredict.slide.patches import (
    DEFAULT_CACHE_BYTES,
    TileCache,
    field_rects,
    read_patch_rects,
)

__all__ = ["MAX_CACHE_BYTES", "BatchReader", "PendingBatch", "ReadAhead", "tile_cache_bytes"]

#: Upper bound of the tile cache sized by :func:`tile_cache_bytes`.
MAX_CACHE_BYTES = 256 * 2**20


def tile_cache_bytes(
    slide: Any, grid: TileGrid, block: tuple[int, int], *, field_factor: float = 1.0
) -> int:
    """A tile cache bound that holds the slide tiles under 1.5 store blocks of cells.

    Large runs go block by block (:func:`~napari_stpredict.inference.ordering.order_cells`);
    a cache that holds a block's tiles and more keeps the tiles on the edge shared with the
    next block, so each tile is decoded about once. Bounded by ``[DEFAULT_CACHE_BYTES,
    MAX_CACHE_BYTES]``: memory stays independent of the slide's size.

    Parameters
    ----------
    slide
        The slide (``best_level``, ``downsamples``, ``levels`` chunks); anything else gets
        the default bound.
    grid
        The tile grid (cell size and stride in level-0 px).
    block
        ``(bh, bw)`` cells of a store block.
    field_factor
        Side of the widest field of view ÷ the patch's (context fields read wider).

    Returns
    -------
    int
        Bytes.
    """
    try:
        level = slide.best_level(grid.cell_px / grid.patch_px)
        ds = float(slide.downsamples[level])
        th, tw = (int(v) for v in slide.levels[level].chunksize[:2])
    except (AttributeError, IndexError, TypeError):
        return DEFAULT_CACHE_BYTES
    extra = grid.cell_px * field_factor
    tiles_y = math.ceil((block[0] * grid.stride_px + extra) / ds / th) + 1
    tiles_x = math.ceil((block[1] * grid.stride_px + extra) / ds / tw) + 1
    # × 1.5: the LRU holds the previous block's edge tiles while the next block is cut
    # (measured, 2,048 cells of the 4 × 4 mosaic: 1 block 326 decodes, 1.5 blocks 300, all 294)
    need = 1.5 * tiles_y * tiles_x * th * tw * 3
    return int(min(max(need, DEFAULT_CACHE_BYTES), MAX_CACHE_BYTES))


class BatchReader:
    """The fields of view of grid cells, read in a thread pool through one tile cache.

    Parameters
    ----------
    slide
        The :class:`~napari_stpredict.slide.Slide`.
    grid
        The tile grid (cell rectangles, patch size).
    fields
        ``[(side µm, side px)]`` per cell, the patch first (``InputSpec.fields()``).
    stats
        The engine's counters (``read_s``).
    workers
        Reader threads.
    cache_bytes
        Bound of the decoded-tile cache.
    pinned
        Hand CUDA models pinned host buffers (``False`` for other devices).
    spare_buffers
        Pinned buffers kept for reuse.
    resize_device
        Resize on this torch device (e.g. ``"cuda:0"``): the threads only cut the stored
        windows and :func:`~.device_resize.resize_windows` resizes them there, bit-identical
        to Pillow. ``None`` = Pillow in the reader threads.
    """

    def __init__(
        self,
        slide: Any,
        grid: TileGrid,
        fields: list[tuple[float, int]],
        *,
        stats: EngineStats,
        workers: int,
        cache_bytes: int,
        pinned: bool,
        spare_buffers: int,
        resize_device: str | None = None,
    ) -> None:
        self.slide, self.grid, self.fields, self.stats = slide, grid, fields, stats
        self.workers = int(workers)
        self.pool = ThreadPoolExecutor(
            max_workers=self.workers, thread_name_prefix="stpredict-read"
        )
        #: decoded slide tiles shared by the reader threads (each tile decoded once per region)
        self.tile_cache = TileCache(slide, max_bytes=cache_bytes)
        #: hand out pinned buffers (cleared when the model refuses a torch tensor)
        self.pin = pinned
        self._spare_buffers = spare_buffers
        self._pinned: list[Any] = []  # free pinned host buffers
        self._lock = threading.Lock()
        self.resize_device = resize_device

    def buffer(self, n: int) -> tuple[np.ndarray, Any]:
        """``(numpy view, what to hand the model)`` for ``n`` cells: pinned memory on CUDA."""
        p = self.grid.patch_px
        nf = len(self.fields)
        return self._buffer((n, p, p, 3) if nf == 1 else (n, nf, p, p, 3))

    def _buffer(self, shape: tuple[int, ...]) -> tuple[np.ndarray, Any]:
        if not self.pin:
            arr = np.empty(shape, np.uint8)
            return arr, arr
        import torch

        with self._lock:
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

    def release(self, handle: Any) -> None:
        """Give a buffer from :meth:`buffer` back (pinned ones are reused)."""
        if not isinstance(handle, np.ndarray):
            with self._lock:
                if len(self._pinned) < self._spare_buffers:
                    self._pinned.append(handle)

    def read_into(self, out: np.ndarray, cells: np.ndarray) -> None:
        """Read the fields of ``cells`` into ``out`` (a slice of a batch buffer)."""
        t0 = time.perf_counter()
        rects = self._rects(cells)
        p = self.grid.patch_px
        for k, (um, _px) in enumerate(self.fields):
            dst = out if len(self.fields) == 1 else out[:, k]
            scaled = field_rects(rects, um / self.grid.patch_um) if k else rects
            read_patch_rects(self.slide, scaled, p, cache=self.tile_cache, out=dst)
        with self._lock:
            self.stats.read_s += time.perf_counter() - t0

    def submit(self, cells: np.ndarray) -> PendingBatch:
        """Start reading ``cells`` into a new buffer (windows when resizing on the device)."""
        plan = self._plan(cells) if self.resize_device else None
        if plan is not None:
            h, w = plan.max_window
            view, handle = self._buffer((len(plan.windows), -(-h // 8) * 8, -(-w // 8) * 8, 3))
            read, per_cell = self._read_windows, len(self.fields)
        else:
            view, handle = self.buffer(len(cells))
            read, per_cell = self.read_into, 1
        # a few groups per reader: contiguous cells share tiles; enough groups to balance
        step = max(1, math.ceil(len(cells) / (2 * self.workers)))
        futures = [
            self.pool.submit(
                read, view[lo * per_cell : (lo + step) * per_cell], cells[lo : lo + step]
            )
            for lo in range(0, len(cells), step)
        ]
        return PendingBatch(cells, view, handle, futures, plan)

    def _plan(self, cells: np.ndarray) -> WindowPlan | None:
        """The stored windows of every field of ``cells``, cell by cell (``None``: use Pillow)."""
        rects = self._rects(cells)
        p = self.grid.patch_px
        plans = []
        for k, (um, _px) in enumerate(self.fields):
            plan = plan_windows(
                self.slide, field_rects(rects, um / self.grid.patch_um) if k else rects, p
            )
            if plan is None:
                return None
            plans.append(plan)
        return WindowPlan(
            levels=np.stack([q.levels for q in plans], 1).reshape(-1),
            windows=np.stack([q.windows for q in plans], 1).reshape(-1, 4),
            boxes=np.stack([q.boxes for q in plans], 1).reshape(-1, 4),
            out_px=p,
        )

    def _read_windows(self, out: np.ndarray, cells: np.ndarray) -> None:
        """Read the stored windows of ``cells`` (all fields) into ``out``."""
        t0 = time.perf_counter()
        plan = self._plan(cells)
        assert plan is not None  # the batch's plan covered these cells
        read_windows(plan, self.tile_cache.read_region, out)
        with self._lock:
            self.stats.read_s += time.perf_counter() - t0

    def model_input(self, batch: PendingBatch) -> Any:
        """What the model gets for a read batch: the buffer, or the windows resized on the device.

        Should the device resize fail, the batch is read with Pillow here instead (and, unless
        the device was only out of memory, every later batch too), with a warning.
        """
        if batch.plan is None:
            return batch.handle
        if self.resize_device is not None:
            try:
                return self._resize_on_device(batch)
            except Exception as err:
                if not is_oom(err):
                    self.resize_device = None
                warnings.warn(
                    f"resizing patches on the device failed ({first_line(err)}); using Pillow",
                    RuntimeWarning,
                    stacklevel=2,
                )
        view, handle = self.buffer(len(batch.cells))
        self.read_into(view, batch.cells)
        return handle

    def _resize_on_device(self, batch: PendingBatch) -> Any:
        import torch

        plan = batch.plan
        assert plan is not None
        windows = torch.as_tensor(batch.handle).to(self.resize_device, non_blocking=True)
        patches = resize_windows(windows, plan.windows[:, 2:], plan.boxes, (plan.out_px,) * 2)
        p, nf = plan.out_px, len(self.fields)
        return patches if nf == 1 else patches.reshape(len(batch.cells), nf, p, p, 3)

    def _rects(self, cells: np.ndarray) -> np.ndarray:
        """Level-0 ``(y0, x0, h, w)`` of the cells' patches."""
        rects = self.grid.cell_rects_px(cells)
        rects[:, 2:] -= rects[:, :2]
        return rects

    def read_one(self, cell: np.ndarray) -> np.ndarray:
        """The model input of one cell (all fields), in this thread."""
        view, _ = self.buffer(1)
        view = np.array(view)
        self.read_into(view, np.asarray(cell, dtype=np.int64).reshape(1, 2))
        return view[0]

    def close(self) -> None:
        """Stop the threads (pending reads are dropped) and free the cache and buffers."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.tile_cache.clear()
        self._pinned.clear()


@dataclass
class PendingBatch:
    """A batch being read: its cells, the buffer (view + handle), the read futures and, when
    resizing on the device, the plan of the stored windows being read."""

    cells: np.ndarray
    view: np.ndarray
    handle: Any
    futures: list[Future[None]]
    plan: WindowPlan | None = None


class ReadAhead:
    """The cells of one run, read a bounded number of batches ahead of the model.

    Parameters
    ----------
    reader
        Where batches are read.
    todo
        ``(n, 2)`` cells in prediction order.
    depth
        Batches read ahead of the one the model takes next (the engine's ``prefetch``).
    """

    def __init__(self, reader: BatchReader, todo: np.ndarray, depth: int) -> None:
        self.reader = reader
        self.todo = todo
        self.depth = depth
        self.next_cell = 0
        self.inflight: deque[PendingBatch] = deque()

    def fill(self, bs: int) -> None:
        """Submit batches of ``bs`` cells until ``depth + 1`` are being read (or none is left)."""
        while self.next_cell < len(self.todo) and len(self.inflight) <= self.depth:
            cells = self.todo[self.next_cell : self.next_cell + bs]
            self.inflight.append(self.reader.submit(cells))
            self.next_cell += len(cells)

    def take(self) -> tuple[PendingBatch, float]:
        """The oldest batch once read, and the seconds spent waiting for it."""
        batch = self.inflight.popleft()
        t0 = time.perf_counter()
        for f in batch.futures:
            f.result()
        return batch, time.perf_counter() - t0

    def cancel(self) -> None:
        """Drop the reads not started; wait for running ones (they still fill their buffer)."""
        for batch in self.inflight:
            for f in batch.futures:
                f.cancel()
        for batch in self.inflight:
            for f in batch.futures:
                if not f.cancelled():
                    with contextlib.suppress(BaseException):
                        f.result()
