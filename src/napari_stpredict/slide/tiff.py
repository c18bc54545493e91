"""TIFF-family slides: Aperio SVS, Hamamatsu NDPI, OME-TIFF, generic tiled (pyramidal) TIFF.

Two read paths share tifffile's per-tile decoder:

- ``Slide.levels`` (what napari slices) are ``tifffile`` ``aszarr`` stores → zarr → dask,
  one chunk per native tile, decoded on demand.
- ``read_region``/``read_resampled`` (the training and inference hot path) decode the tiles
  under the request directly: positional reads (``os.pread``, so threads and forked
  DataLoader workers never race on a shared file offset) + ``TiffPage.decode``. zarr-python
  3's per-chunk overhead is about twice the decode time of a 240-px JPEG tile, which this
  path avoids (see docs/benchmarks.md). Tests check both paths against ``TiffPage.asarray``.
"""

from __future__ import annotations

import io
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import tifffile

from napari_stpredict.errors import SlideError, first_line
from napari_stpredict.slide.sources import FILL, LevelSource, check_pixel_type, to_rgb
from napari_stpredict.slide.tiff_metadata import (  # noqa: F401  (names kept importable here)
    _OME_UNITS,
    SUSPECT_MPP,
    _jsonable,
    _mpp_from_ome,
    _mpp_from_resolution,
    _resolution,
    _resolution_downsamples,
    file_metadata,
)

#: Requests touching at least this many tiles are decoded on a thread pool.
_PARALLEL_TILES = 8

_POOL: ThreadPoolExecutor | None = None
_POOL_PID = 0
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    # one pool per process: a pool inherited through fork (DataLoader workers) has no threads
    global _POOL, _POOL_PID
    with _POOL_LOCK:
        if _POOL is None or os.getpid() != _POOL_PID:
            _POOL = ThreadPoolExecutor(
                max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="stpredict-tiff"
            )
            _POOL_PID = os.getpid()
        return _POOL


class _TiffPlane:
    """Direct decoder of the tiles (or strips) of one TIFF page."""

    def __init__(self, page: tifffile.TiffPage, fh: tifffile.FileHandle, path: Path) -> None:
        kf = page.keyframe
        if kf.is_tiled and kf.tiledepth > 1:
            raise SlideError(f"{path}: volumetric (3-D tiled) TIFF pages are not supported")
        self.path = path
        self.h, self.w = int(kf.imagelength), int(kf.imagewidth)
        self.spp = int(kf.samplesperpixel)
        self.planar = kf.planarconfig == 2 and self.spp > 1
        self.th, self.tw = int(kf.chunks[0]), int(kf.chunks[1])
        self.nty = math.ceil(self.h / self.th)
        self.ntx = math.ceil(self.w / self.tw)
        self.offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        self.counts = np.asarray(page.databytecounts, dtype=np.int64)
        self.page = page
        self.decode = kf.decode  # resolved now: raises for an unknown compression
        args: dict[str, Any] = {"_fullsize": True}
        if page.jpegtables is not None:
            args["jpegtables"] = page.jpegtables
        if kf.jpegheader is not None:
            args["jpegheader"] = kf.jpegheader
        self.decode_args = args
        self.fh = fh
        try:
            self.fd: int | None = fh.fileno() if hasattr(os, "pread") and fh.is_file else None
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            self.fd = None
        #: tiles decoded so far (tests and benchmarks count reads with it)
        self.tiles_read = 0

    def _bytes(self, index: int) -> bytes | None:
        if index >= len(self.offsets):
            return None  # e.g. Philips files missing the last row of tiles
        off, n = int(self.offsets[index]), int(self.counts[index])
        if off == 0 or n == 0:
            return None
        if self.fd is not None:
            return os.pread(self.fd, n, off)
        with self.fh.lock:
            self.fh.seek(off)
            return self.fh.read(n)

    def tile(self, ty: int, tx: int) -> np.ndarray:
        """Decoded tile ``(th, tw, spp)`` (edge tiles padded; missing tiles filled with 255)."""
        self.tiles_read += 1
        planes = range(self.spp) if self.planar else range(1)
        parts = []
        for s in planes:
            index = (s * self.nty + ty) * self.ntx + tx if self.planar else ty * self.ntx + tx
            data = self._bytes(index)
            if data is None:
                parts.append(
                    np.full((self.th, self.tw, 1 if self.planar else self.spp), FILL, np.uint8)
                )
                continue
            arr = self.decode(data, index, **self.decode_args)[0]
            parts.append(np.asarray(arr).reshape(self.th, self.tw, -1))
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=2)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """In-bounds rectangle ``(y1-y0, x1-x0, spp)``."""
        if y1 <= y0 or x1 <= x0:
            return np.empty((max(y1 - y0, 0), max(x1 - x0, 0), self.spp), np.uint8)
        ty0, ty1 = y0 // self.th, (y1 - 1) // self.th + 1
        tx0, tx1 = x0 // self.tw, (x1 - 1) // self.tw + 1
        if ty1 - ty0 == 1 and tx1 - tx0 == 1:
            # inside one tile: hand out the freshly decoded tile (no copy when it is all of it)
            tile = self.tile(ty0, tx0)
            gy, gx = ty0 * self.th, tx0 * self.tw
            return np.ascontiguousarray(tile[y0 - gy : y1 - gy, x0 - gx : x1 - gx])
        out = np.empty((y1 - y0, x1 - x0, self.spp), np.uint8)
        jobs = [(ty, tx) for ty in range(ty0, ty1) for tx in range(tx0, tx1)]

        def place(job: tuple[int, int]) -> None:
            ty, tx = job
            tile = self.tile(ty, tx)
            gy0, gx0 = ty * self.th, tx * self.tw
            sy0, sy1 = max(y0, gy0), min(y1, gy0 + self.th)
            sx0, sx1 = max(x0, gx0), min(x1, gx0 + self.tw)
            out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = tile[
                sy0 - gy0 : sy1 - gy0, sx0 - gx0 : sx1 - gx0
            ]

        if len(jobs) >= _PARALLEL_TILES and (os.cpu_count() or 1) > 1:
            list(_pool().map(place, jobs))
        else:
            for job in jobs:
                place(job)
        return out


class TiffLevel(LevelSource):
    """One pyramid level of a TIFF series (one RGB page, or one page per channel)."""

    def __init__(
        self, series: tifffile.TiffPageSeries, index: int, planes: list[_TiffPlane], fill: int
    ) -> None:
        self.series = series
        self.index = index
        self.planes = planes
        self.shape = (planes[0].h, planes[0].w)
        self.chunks = (min(planes[0].th, self.shape[0]), min(planes[0].tw, self.shape[1]))
        self.channels = sum(p.spp for p in planes)
        self._fill = fill

    @property
    def tiles_read(self) -> int:
        """Tiles decoded by the direct path so far."""
        return sum(p.tiles_read for p in self.planes)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        parts = [p.read(y0, y1, x0, x1) for p in self.planes]
        arr = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=2)
        return to_rgb(arr)

    def to_dask(self, name: str) -> da.Array:
        import zarr

        store = self.series.aszarr(level=self.index, fillvalue=self._fill)
        z = zarr.open_array(store=store, mode="r")
        arr = da.from_zarr(z, name=name)
        axes = self.series.levels[self.index].get_axes(True)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        elif axes[0] in "CS" and arr.ndim == 3:
            arr = arr.transpose(1, 2, 0)
        if self.channels != 3:
            arr = arr.map_blocks(
                to_rgb,
                chunks=(*arr.chunks[:2], (3,)),
                dtype=np.uint8,
                meta=np.empty((0, 0, 0), np.uint8),
            )
        return arr


def _main_series(tf: tifffile.TiffFile, path: Path) -> tifffile.TiffPageSeries:
    best, best_px = None, -1
    for s in tf.series:
        if s.name in ("Label", "Macro", "Thumbnail", "Map"):
            continue
        axes = s.get_axes(True)
        shape = s.get_shape(True)
        try:
            px = shape[axes.index("Y")] * shape[axes.index("X")]
        except ValueError:
            continue
        if px > best_px:
            best, best_px = s, px
    if best is None:
        raise SlideError(f"{path}: no 2-D image series in this TIFF")
    return best


def _level_planes(
    level: tifffile.TiffPageSeries, fh: tifffile.FileHandle, path: Path, index: int
) -> list[_TiffPlane]:
    axes = level.get_axes(True)
    shape = level.get_shape(True)
    if 0 in shape:
        raise SlideError(f"{path}: level {index} has zero size {tuple(shape)}")
    pages = [p for p in level.pages if p is not None]
    if axes in ("YX", "YXS", "SYX") and len(pages) == 1:
        page = pages[0]
    elif axes == "CYX" and len(pages) == shape[0]:
        page = None
    else:
        raise SlideError(
            f"{path}: image layout {axes} {tuple(shape)} is not supported "
            "(expected one RGB plane per level; stacks and multichannel images are refused)"
        )
    try:
        if page is not None:
            return [_TiffPlane(page, fh, path)]
        return [_TiffPlane(p, fh, path) for p in pages]
    except SlideError:
        raise
    except Exception as err:
        raise SlideError(f"{path}: unsupported TIFF level {index}: {first_line(err)}") from err


def _probe(level: TiffLevel, path: Path, index: int) -> None:
    """Decode one stored tile so a corrupt file is refused at open, not in the viewer."""
    plane = level.planes[0]
    n = plane.nty * plane.ntx
    for i in range(n):
        if i < len(plane.offsets) and plane.offsets[i] and plane.counts[i]:
            ty, tx = divmod(i, plane.ntx)
            try:
                for p in level.planes:
                    p.tile(ty, tx)
                    p.tiles_read -= 1
            except Exception as err:
                raise SlideError(
                    f"{path}: corrupt image data (level {index}, tile {i}): {first_line(err)}"
                ) from err
            return


def _check_complete(levels: list[TiffLevel], path: Path) -> None:
    """Refuse a truncated file: every tile of every level must lie inside the file.

    An interrupted copy or download keeps its header (so the file opens and the first tiles
    decode) but loses the data at the end; without this check it would be reported whole.
    """
    try:
        size = os.path.getsize(path)
    except OSError:
        return
    for index, level in enumerate(levels):
        for plane in level.planes:
            present = (plane.offsets > 0) & (plane.counts > 0)
            if not present.any():
                continue
            end = int((plane.offsets[present] + plane.counts[present]).max())
            if end > size:
                missing = int(((plane.offsets + plane.counts > size) & present).sum())
                raise SlideError(
                    f"{path}: truncated file: {missing} tile(s) of level {index} lie past its "
                    f"end ({size} of {end} bytes present; an incomplete copy or download?)"
                )


def open_tiff(path: Path) -> dict[str, Any]:
    """Open a TIFF-family slide; return the pieces :class:`~.base.Slide` is built from.

    Returns
    -------
    dict
        ``format``, ``sources``, ``mpp``, ``metadata``, ``closer``.
    """
    try:
        tf = tifffile.TiffFile(path)
    except Exception as err:
        raise SlideError(f"{path}: not a readable TIFF file: {first_line(err)}") from err
    try:
        return _build(tf, path)
    except BaseException:
        tf.close()
        raise


def _build(tf: tifffile.TiffFile, path: Path) -> dict[str, Any]:
    series, levels = _structure(tf, path)
    fmt = "svs" if tf.is_svs else "ndpi" if tf.is_ndpi else "ome-tiff" if tf.is_ome else "tiff"
    _check_pixels(series, path)
    sources = _pyramid(series, levels, tf.filehandle, path)
    _check_complete(sources, path)
    _probe(sources[0], path, 0)
    if len(sources) > 1:
        _probe(sources[-1], path, len(sources) - 1)
    meta, mpp = file_metadata(tf, fmt, series, sources[0].shape)
    return {"format": fmt, "sources": sources, "mpp": mpp, "metadata": meta, "closer": tf.close}


def _structure(
    tf: tifffile.TiffFile, path: Path
) -> tuple[tifffile.TiffPageSeries, list[tifffile.TiffPageSeries]]:
    """The main image series and its levels (finest first)."""
    try:
        series = _main_series(tf, path)
        return series, list(series.levels)
    except SlideError:
        raise
    except Exception as err:
        raise SlideError(f"{path}: cannot parse TIFF structure: {first_line(err)}") from err


def _check_pixels(series: tifffile.TiffPageSeries, path: Path) -> None:
    """Refuse pixels that are not 8-bit grey/RGB(A) brightfield (palette, min-is-white)."""
    page0 = series.keyframe
    axes = series.get_axes(True)
    shape = series.get_shape(True)
    channels = 1
    if "S" in axes:
        channels = shape[axes.index("S")]
    elif "C" in axes:
        channels = shape[axes.index("C")]
    check_pixel_type(path, series.dtype, channels)
    if page0.photometric == tifffile.PHOTOMETRIC.PALETTE:
        raise SlideError(f"{path}: palette (indexed colour) TIFFs are not supported")
    if page0.photometric == tifffile.PHOTOMETRIC.MINISWHITE:
        raise SlideError(f"{path}: inverted (min-is-white) greyscale TIFFs are not supported")


def _pyramid(
    series: tifffile.TiffPageSeries,
    levels: list[tifffile.TiffPageSeries],
    fh: tifffile.FileHandle,
    path: Path,
) -> list[TiffLevel]:
    """The levels that form a pyramid (each no larger than the one before), with the exact
    downsamples the resolution tags give where they agree with the sizes."""
    sources: list[TiffLevel] = []
    for i, level in enumerate(levels):
        planes = _level_planes(level, fh, path, i)
        lv = TiffLevel(series, i, planes, FILL)
        if sources and (lv.shape[0] > sources[-1].shape[0] or lv.shape[1] > sources[-1].shape[1]):
            break  # not a pyramid past this point
        sources.append(lv)
    exact = _resolution_downsamples(sources) if len(sources) > 1 else None
    if exact is not None:
        for lv, ds in zip(sources, exact, strict=True):
            lv.downsample = ds
    return sources
