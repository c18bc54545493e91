"""Batched patch reading: each slide tile decoded once per region, pixels as one-by-one.

:func:`read_patches` (square patches around centres, used by training data) and
:func:`read_patch_rects` (level-0 rectangles, used by the inference engine) return exactly the
pixels of per-patch :meth:`Slide.read_resampled <napari_stpredict.slide.Slide.read_resampled>`
calls — they *are* those calls — but every read of the slide goes through a
:class:`TileCache`: a bounded, thread-safe LRU of decoded native tiles. Neighbouring patches
share tiles (a 512-px JPEG tile holds several 112-µm patches), so each tile is decoded once
instead of once per patch that overlaps it, and threads that want the same tile at the same
time wait for one decode instead of doing two.

Memory is bounded by the cache (:data:`DEFAULT_CACHE_BYTES`, plus the tiles of the patches
being cut at that moment), never by the slide or the batch.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Any

import numpy as np

__all__ = ["DEFAULT_CACHE_BYTES", "TileCache", "read_patch_rects", "read_patches"]

#: Default bound of a :class:`TileCache` (decoded RGB bytes).
DEFAULT_CACHE_BYTES = 64 * 2**20
#: Cache blocks never exceed this side (a striped TIFF's "tile" may be a whole row band).
_MAX_BLOCK = 2048
#: Pixels outside the slide (as :meth:`Slide.read_region`).
_FILL = 255


class _Pending:
    """A block being decoded by one thread; others wait on it."""

    __slots__ = ("error", "event", "value")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.value: np.ndarray | None = None
        self.error: BaseException | None = None


class TileCache:
    """Bounded LRU of decoded slide blocks (native tiles), shared by reader threads.

    Parameters
    ----------
    slide
        The :class:`~napari_stpredict.slide.Slide` (``read_region``, ``levels``,
        ``level_shapes``).
    max_bytes
        Bound of the decoded bytes held (least recently used blocks are dropped first).

    Attributes
    ----------
    hits, misses : int
        Block lookups served from the cache / decoded.
    peak_bytes : int
        Most bytes held at once.
    """

    def __init__(self, slide: Any, *, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.slide = slide
        self.max_bytes = int(max_bytes)
        self._blocks: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._pending: dict[tuple[int, int, int], _Pending] = {}
        self._lock = threading.Lock()
        self._bytes = 0
        self._shapes = [tuple(int(v) for v in s) for s in slide.level_shapes]
        self._block_shape: dict[int, tuple[int, int]] = {}
        self.hits = 0
        self.misses = 0
        self.peak_bytes = 0

    @property
    def nbytes(self) -> int:
        """Decoded bytes held now."""
        return self._bytes

    def block_shape(self, level: int) -> tuple[int, int]:
        """``(bh, bw)`` of the cache blocks of a level: its native tile, at most 2048 a side."""
        shape = self._block_shape.get(level)
        if shape is None:
            chunks = self.slide.levels[level].chunksize
            bh, bw = int(chunks[0]), int(chunks[1])
            shape = (min(bh, _MAX_BLOCK), min(bw, _MAX_BLOCK))
            self._block_shape[level] = shape
        return shape

    def _get(self, level: int, by: int, bx: int) -> np.ndarray:
        key = (level, by, bx)
        with self._lock:
            block = self._blocks.get(key)
            if block is not None:
                self._blocks.move_to_end(key)
                self.hits += 1
                return block
            pending = self._pending.get(key)
            owner = pending is None
            if owner:
                pending = _Pending()
                self._pending[key] = pending
                self.misses += 1
        assert pending is not None
        if not owner:
            pending.event.wait()
            if pending.error is not None:
                raise pending.error
            assert pending.value is not None
            return pending.value
        try:
            bh, bw = self.block_shape(level)
            lh, lw = self._shapes[level]
            y0, x0 = by * bh, bx * bw
            block = self.slide.read_region(level, y0, x0, min(bh, lh - y0), min(bw, lw - x0))
            block.setflags(write=False)
            pending.value = block
        except BaseException as err:
            pending.error = err
            raise
        finally:
            with self._lock:
                self._pending.pop(key, None)
                if pending.value is not None:
                    self._blocks[key] = pending.value
                    self._bytes += pending.value.nbytes
                    self.peak_bytes = max(self.peak_bytes, self._bytes)
                    while self._bytes > self.max_bytes and len(self._blocks) > 1:
                        _, old = self._blocks.popitem(last=False)
                        self._bytes -= old.nbytes
            pending.event.set()
        return block

    def read_region(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """:meth:`Slide.read_region` through the cache (same arguments, same pixels)."""
        y, x, h, w = int(y), int(x), int(h), int(w)
        lh, lw = self._shapes[level]
        bh, bw = self.block_shape(level)
        iy0, iy1 = max(y, 0), min(y + h, lh)
        ix0, ix1 = max(x, 0), min(x + w, lw)
        if iy1 <= iy0 or ix1 <= ix0:
            return np.full((max(h, 0), max(w, 0), 3), _FILL, np.uint8)
        by0, by1 = iy0 // bh, (iy1 - 1) // bh + 1
        bx0, bx1 = ix0 // bw, (ix1 - 1) // bw + 1
        inside = iy0 == y and ix0 == x and iy1 == y + h and ix1 == x + w
        if by1 - by0 == 1 and bx1 - bx0 == 1 and inside:
            block = self._get(level, by0, bx0)
            gy, gx = by0 * bh, bx0 * bw
            return block[y - gy : y - gy + h, x - gx : x - gx + w].copy()
        out = np.empty((h, w, 3), np.uint8) if inside else np.full((h, w, 3), _FILL, np.uint8)
        for by in range(by0, by1):
            gy = by * bh
            sy0, sy1 = max(iy0, gy), min(iy1, gy + bh)
            for bx in range(bx0, bx1):
                gx = bx * bw
                sx0, sx1 = max(ix0, gx), min(ix1, gx + bw)
                block = self._get(level, by, bx)
                out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = block[
                    sy0 - gy : sy1 - gy, sx0 - gx : sx1 - gx
                ]
        return out

    def clear(self) -> None:
        """Drop every cached block."""
        with self._lock:
            self._blocks.clear()
            self._bytes = 0


def _read_one(slide: Any, rect: np.ndarray, out_px: int, cache: TileCache | None) -> np.ndarray:
    y0, x0, h, w = (float(v) for v in rect)
    reader = cache.read_region if cache is not None else None
    return slide.read_resampled(y0, x0, h, w, out_shape=(out_px, out_px), region_reader=reader)


def read_patch_rects(
    slide: Any,
    rects: np.ndarray | Sequence[Sequence[float]],
    out_px: int,
    *,
    executor: Executor | None = None,
    cache: TileCache | None = None,
    out: np.ndarray | None = None,
    group: int = 8,
) -> np.ndarray:
    """Read level-0 rectangles ``(y0, x0, h, w)`` resized to ``out_px`` squares.

    Patch ``k`` is bit-identical to
    ``slide.read_resampled(y0, x0, h, w, out_shape=(out_px, out_px))``.

    Parameters
    ----------
    slide
        The :class:`~napari_stpredict.slide.Slide`.
    rects
        ``(n, 4)`` float level-0 ``y0, x0, h, w``.
    out_px
        Side of each output patch.
    executor
        Threads to read in (groups of ``group`` patches per task); ``None`` = this thread.
    cache
        A shared :class:`TileCache`; ``None`` = a private one for this call.
    out
        Optional ``(n, out_px, out_px, 3)`` uint8 buffer to fill (e.g. pinned memory).

    Returns
    -------
    numpy.ndarray
        ``(n, out_px, out_px, 3)`` uint8.
    """
    arr = np.asarray(rects, dtype=np.float64).reshape(-1, 4)
    n = len(arr)
    if out is None:
        out = np.empty((n, out_px, out_px, 3), np.uint8)
    if n == 0:
        return out
    if cache is None:
        cache = TileCache(slide)

    def work(lo: int, hi: int) -> None:
        for k in range(lo, hi):
            out[k] = _read_one(slide, arr[k], out_px, cache)

    step = max(1, int(group))
    spans = [(lo, min(lo + step, n)) for lo in range(0, n, step)]
    if executor is None or len(spans) == 1:
        for lo, hi in spans:
            work(lo, hi)
    else:
        for f in [executor.submit(work, lo, hi) for lo, hi in spans]:
            f.result()
    return out


def read_patches(
    slide: Any,
    centres_xy: np.ndarray | Sequence[Sequence[float]],
    side_level0_px: float | Sequence[float] | np.ndarray,
    out_px: int,
    *,
    executor: Executor | None = None,
    cache: TileCache | None = None,
) -> np.ndarray:
    """Square patches centred on level-0 points, resized to ``out_px``.

    Patch ``k`` is bit-identical to ``slide.read_resampled(y - s/2, x - s/2, s, s,
    out_shape=(out_px, out_px))`` with ``(x, y) = centres_xy[k]`` and ``s`` the side.

    Parameters
    ----------
    slide
        The :class:`~napari_stpredict.slide.Slide`.
    centres_xy
        ``(n, 2)`` level-0 ``(x, y)`` centres (the ST spot convention).
    side_level0_px
        Side of the square in level-0 px: one number, or one per patch.
    out_px
        Side of each output patch (the model's input size).
    executor, cache
        See :func:`read_patch_rects`.

    Returns
    -------
    numpy.ndarray
        ``(n, out_px, out_px, 3)`` uint8.
    """
    c = np.asarray(centres_xy, dtype=np.float64).reshape(-1, 2)
    side = np.broadcast_to(np.asarray(side_level0_px, dtype=np.float64), (len(c),))
    if len(c) and not (np.isfinite(side).all() and (side > 0).all()):
        from napari_stpredict.errors import SlideError

        raise SlideError(f"{getattr(slide, 'path', 'slide')}: patch side must be positive")
    rects = np.stack([c[:, 1] - side / 2, c[:, 0] - side / 2, side, side], axis=1)
    return read_patch_rects(slide, rects, int(out_px), executor=executor, cache=cache)


def field_rects(rects: np.ndarray, factor: float) -> np.ndarray:
    """Rectangles ``(y0, x0, h, w)`` scaled by ``factor`` about their centres (context fields)."""
    r = np.asarray(rects, dtype=np.float64).reshape(-1, 4)
    if math.isclose(factor, 1.0):
        return r
    cy, cx = r[:, 0] + r[:, 2] / 2, r[:, 1] + r[:, 3] / 2
    h, w = r[:, 2] * factor, r[:, 3] * factor
    return np.stack([cy - h / 2, cx - w / 2, h, w], axis=1)
