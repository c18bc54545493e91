"""The :class:`Slide` object: a lazy multiscale pyramid over level sources.

A slide is a list of *level sources* (:mod:`napari_stpredict.slide.sources`), level 0 first,
built by a backend (``tiff``, ``omezarr``, ``image``). :class:`Slide` adds a lazy pyramid below
the coarsest stored level (so napari never has to show a huge level zoomed out), padding
outside the slide (255, white glass) and resampling (:meth:`Slide.read_resampled`). The level
sources and pixel helpers are imported back here, so ``slide.base`` keeps every name it had.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from napari_stpredict.errors import SlideError
from napari_stpredict.slide.sources import BAND_BYTES as _BAND_BYTES
from napari_stpredict.slide.sources import (
    FILL,
    LAZY_CHUNK,
    ArraySource,
    DownsampledSource,
    LevelSource,
    block_mean,
    check_pixel_type,
    source_to_dask,
    to_rgb,
)

__all__ = [
    "FILL",
    "LAZY_CHUNK",
    "MIN_LEVEL_SIZE",
    "ArraySource",
    "DownsampledSource",
    "LevelSource",
    "Slide",
    "block_mean",
    "check_pixel_type",
    "source_to_dask",
    "to_rgb",
]

#: Lazy levels are added below the coarsest stored level until the longest side is at most this.
MIN_LEVEL_SIZE = 1024
#: A level whose downsample exceeds the wanted output pixel size by less than this factor is
#: still used (stored pyramids have downsamples like 4.0003 for a nominal 4).
_LEVEL_TOLERANCE = 1.01
# _BAND_BYTES: the source window budget of one band in Slide.read_resampled (tests lower it here)


def _fingerprint_path(path: Path) -> str:
    h = hashlib.sha256()
    if path.is_dir():
        # a store folder: its metadata documents (small) plus the names and sizes at top level
        for sub in sorted(path.rglob("*")):
            if sub.name in (".zattrs", ".zarray", ".zgroup", "zarr.json") and sub.is_file():
                h.update(str(sub.relative_to(path)).encode())
                h.update(sub.read_bytes())
        for sub in sorted(path.iterdir()):
            h.update(sub.name.encode())
    else:
        size = path.stat().st_size
        h.update(str(size).encode())
        with open(path, "rb") as fh:
            h.update(fh.read(2**20))
            if size > 2**20:
                fh.seek(max(2**20, size - 2**20))
                h.update(fh.read(2**20))
    return h.hexdigest()[:32]


def _from_array(array: np.ndarray, mpp: float | None, name: str, meta: dict) -> Slide:
    return Slide.from_array(array, mpp=mpp, name=name, metadata=meta)


def _reopen(path: str, mpp: float | None) -> Slide:
    from napari_stpredict.slide.opener import open_slide

    return open_slide(path, mpp=mpp)


class Slide:
    """A whole-slide image: a lazy multiscale pyramid plus its physical scale.

    Do not construct directly; use :func:`napari_stpredict.slide.open_slide` (files) or
    :meth:`Slide.from_array` (an image in memory).

    Attributes
    ----------
    path : pathlib.Path
        The file (or store folder).
    format : str
        ``"svs"``, ``"ndpi"``, ``"tiff"``, ``"ome-tiff"``, ``"ome-zarr"``, ``"image"``, or
        ``"array"`` (:meth:`from_array`).
    levels : list of dask.array.Array
        ``(h, w, 3) uint8`` levels, level 0 first, chunked on the native tiles. Levels after
        the stored ones (see ``metadata["stored_levels"]``) are computed on read.
    mpp : float or None
        Micrometres per level-0 pixel.
    downsamples : list of float
        Level-0 pixels per level pixel (mean of both axes).
    metadata : dict
        JSON-serialisable facts about the file (vendor properties, compression, tile size).
    """

    def __init__(
        self,
        path: Path,
        *,
        format: str,
        sources: list[LevelSource],
        mpp: float | None,
        metadata: dict[str, Any] | None = None,
        mpp_override: float | None = None,
        closer: Callable[[], None] | None = None,
    ) -> None:
        if not sources:
            raise SlideError(f"{path}: no image levels")
        for i, src in enumerate(sources):
            if src.shape[0] <= 0 or src.shape[1] <= 0:
                raise SlideError(f"{path}: level {i} has zero size {src.shape}")
        self.path = Path(path)
        self.format = format
        self.mpp = mpp
        self._mpp_override = mpp_override
        self._closer = closer
        self._closed = False
        self._n_stored = len(sources)
        self._sources = list(sources)
        base = self._sources[-1]
        while max(base.shape) > MIN_LEVEL_SIZE and min(base.shape) >= 4:
            base = DownsampledSource(base, 2)
            self._sources.append(base)
        h0, w0 = self._sources[0].shape
        # per-axis downsample: a stored level covers the whole slide, so its size sets it
        self._axis_ds: list[tuple[float, float]] = []
        for i, src in enumerate(self._sources):
            if i < self._n_stored:
                ds = src.downsample or (h0 / src.shape[0], w0 / src.shape[1])
                self._axis_ds.append((float(ds[0]), float(ds[1])))
            else:
                py, px = self._axis_ds[i - 1]
                self._axis_ds.append((py * 2, px * 2))
        self.downsamples = [float((dy + dx) / 2) for dy, dx in self._axis_ds]
        self.shape: tuple[int, int] = (int(h0), int(w0))
        meta = dict(metadata or {})
        meta.setdefault("stored_levels", self._n_stored)
        meta["tile"] = list(self._sources[0].chunks)
        self.metadata: dict[str, Any] = meta
        self._fingerprint: str | None = None
        self._lock = threading.Lock()
        self.levels: list[da.Array] = self._make_levels()

    @classmethod
    def from_array(
        cls,
        array: np.ndarray,
        *,
        mpp: float | None = None,
        name: str = "array",
        metadata: dict[str, Any] | None = None,
    ) -> Slide:
        """A slide over an in-memory image (tests, synthetic data; no file needed).

        Like TIAToolbox's ``VirtualWSIReader``: the array is level 0 with the same 2× pyramid
        a JPEG/PNG file gets, so every reading method returns what it would for that file.

        Parameters
        ----------
        array
            ``(h, w)``, ``(h, w, 1..4)`` uint8 (grey and alpha converted as for files).
        mpp
            Micrometres per pixel, or ``None`` when unknown.
        name
            Stands in for the file name in messages and ``Slide.path``.
        metadata
            Extra entries for :attr:`metadata`.

        Raises
        ------
        SlideError
            For non-uint8 data, bad channel counts or an empty array.
        """
        arr = np.asarray(array)
        if arr.ndim not in (2, 3) or arr.shape[0] == 0 or arr.shape[1] == 0:
            raise SlideError(f"{name}: expected a non-empty (h, w[, c]) image, got {arr.shape}")
        check_pixel_type(name, arr.dtype, 1 if arr.ndim == 2 else arr.shape[2])
        if mpp is not None and not (isinstance(mpp, (int, float)) and 0 < mpp < math.inf):
            raise SlideError(f"{name}: mpp must be a positive number, got {mpp!r}")
        meta = {"vendor": "array", "mpp_source": "user" if mpp is not None else None}
        meta.update(metadata or {})
        from napari_stpredict.slide.image import _half, _pyramid_shapes

        rgb = np.ascontiguousarray(to_rgb(arr))
        # the same stored 2× pyramid as a JPEG/PNG file, so both read identical pixels
        sources: list[LevelSource] = [ArraySource(rgb)]
        level = rgb
        for k in range(1, len(_pyramid_shapes(*rgb.shape[:2]))):
            level = _half(level)
            sources.append(ArraySource(level, downsample=(2.0**k, 2.0**k)))
        return cls(
            Path(name), format="array", sources=sources,
            mpp=None if mpp is None else float(mpp), metadata=meta, mpp_override=mpp,
        )  # fmt: skip

    def _make_levels(self) -> list[da.Array]:
        token = hashlib.sha1(f"{self.path.resolve()}|{id(self)}".encode()).hexdigest()[:16]
        return [src.to_dask(f"stpredict-slide-{token}-{i}") for i, src in enumerate(self._sources)]

    # ----------------------------------------------------------------- properties
    @property
    def layer_scale(self) -> tuple[float, float]:
        """napari layer scale: ``(mpp, mpp)`` when mpp is known, else ``(1, 1)``."""
        return (self.mpp, self.mpp) if self.mpp else (1.0, 1.0)

    @property
    def units(self) -> str:
        """Layer units: ``"µm"`` when mpp is known, else ``"px"``."""
        return "µm" if self.mpp else "px"

    @property
    def level_shapes(self) -> list[tuple[int, int]]:
        """``(h, w)`` of every level."""
        return [src.shape for src in self._sources]

    def fingerprint(self) -> str:
        """A content key for caches: hash of the file size and its first and last MiB."""
        if self._fingerprint is None:
            if self.format == "array":  # the pixels themselves
                arr = self._sources[0].array  # type: ignore[attr-defined]
                h = hashlib.sha256(str(arr.shape).encode())
                h.update(memoryview(np.ascontiguousarray(arr)).cast("B"))
                self._fingerprint = h.hexdigest()[:32]
            else:
                self._fingerprint = _fingerprint_path(self.path)
        return self._fingerprint

    # ----------------------------------------------------------------- reading
    def read_region(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Read a rectangle of one level.

        Parameters
        ----------
        level
            Level index (0 = full resolution).
        y, x
            Top-left corner **in that level's pixel grid** (may be negative or past the end).
        h, w
            Size in that level's pixels.

        Returns
        -------
        numpy.ndarray
            ``(h, w, 3) uint8``; pixels outside the level are 255.
        """
        self._check_open()
        if not 0 <= level < len(self._sources):
            raise SlideError(
                f"{self.path}: level {level} does not exist ({len(self._sources)} levels)"
            )
        y, x, h, w = int(y), int(x), int(h), int(w)
        if h < 0 or w < 0:
            raise SlideError(f"{self.path}: negative region size {h}x{w}")
        src = self._sources[level]
        lh, lw = src.shape
        iy0, iy1 = max(y, 0), min(y + h, lh)
        ix0, ix1 = max(x, 0), min(x + w, lw)
        if iy0 == y and ix0 == x and iy1 == y + h and ix1 == x + w:
            return self._read_source(src, iy0, iy1, ix0, ix1)
        out = np.full((h, w, 3), FILL, np.uint8)
        if iy1 > iy0 and ix1 > ix0:
            out[iy0 - y : iy1 - y, ix0 - x : ix1 - x] = self._read_source(src, iy0, iy1, ix0, ix1)
        return out

    def _read_source(self, src: LevelSource, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        try:
            return src.read(y0, y1, x0, x1)
        except SlideError:
            raise
        except Exception as err:  # a codec error in one tile: name the file and the place
            msg = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise SlideError(
                f"{self.path}: cannot decode region y={y0}:{y1} x={x0}:{x1}: {msg}"
            ) from err

    def best_level(self, downsample: float, *, stored_only: bool = True) -> int:
        """The coarsest level whose pixels are at most ``downsample`` level-0 px (≥ resolution)."""
        n = self._n_stored if stored_only else len(self._sources)
        best = 0
        for i in range(n):
            dy, dx = self._axis_ds[i]
            if max(dy, dx) <= downsample * _LEVEL_TOLERANCE:
                best = i
        return best

    def read_resampled(
        self,
        y0: float,
        x0: float,
        h: float,
        w: float,
        *,
        out_shape: tuple[int, int],
        region_reader: Callable[[int, int, int, int, int], np.ndarray] | None = None,
    ) -> np.ndarray:
        """Read a level-0 rectangle resized to ``out_shape``, anti-aliased and pixel-registered.

        The rectangle ``[y0, y0 + h) × [x0, x0 + w)`` is in continuous level-0 pixel
        coordinates (pixel ``(i, j)`` covers ``[i, i+1) × [j, j+1)``); it may be fractional
        and may extend past the slide (outside = 255). Output pixel ``(i, j)`` is centred on
        level-0 point ``(y0 + (i + ½)·h/oh, x0 + (j + ½)·w/ow)``. The pixels come from the
        coarsest stored level that still has at least the output resolution, resampled with
        an anti-aliased bilinear filter (Pillow); a request at the level's own scale and
        integer offsets returns the stored pixels unchanged. Only the tiles under the
        rectangle are decoded; large requests are processed in bands (bounded memory).

        Parameters
        ----------
        y0, x0, h, w
            The level-0 rectangle (``h``, ``w`` > 0).
        out_shape
            ``(oh, ow)`` of the result.
        region_reader
            Replaces :meth:`read_region` (same signature and result), e.g. the decoded-tile
            cache of :mod:`napari_stpredict.slide.patches`; the pixels are the same either way.

        Returns
        -------
        numpy.ndarray
            ``(oh, ow, 3) uint8``.
        """
        self._check_open()
        oh, ow = int(out_shape[0]), int(out_shape[1])
        if oh <= 0 or ow <= 0 or not (h > 0 and w > 0):
            raise SlideError(f"{self.path}: empty resample request {h}x{w} -> {oh}x{ow}")
        read_region = self.read_region if region_reader is None else region_reader
        level = self.best_level(min(h / oh, w / ow))
        dy, dx = self._axis_ds[level]
        # the rectangle in the chosen level's continuous pixel frame
        ly0, lx0 = y0 / dy, x0 / dx
        lh, lw = h / dy, w / dx
        sy, sx = lh / oh, lw / ow  # level px per output px
        if sy == 1.0 and sx == 1.0 and ly0 == int(ly0) and lx0 == int(lx0):
            return read_region(level, int(ly0), int(lx0), oh, ow)
        from PIL import Image

        my = math.ceil(max(sy, 1.0)) + 2  # filter support + rounding margin
        mx = math.ceil(max(sx, 1.0)) + 2
        wx0 = math.floor(lx0) - mx
        wx1 = math.ceil(lx0 + lw) + mx
        out = np.empty((oh, ow, 3), np.uint8)
        row_bytes = (wx1 - wx0) * 3
        band = max(1, int((_BAND_BYTES // row_bytes - 2 * my) / max(sy, 1e-9)))
        band = min(band, oh)
        for i0 in range(0, oh, band):
            i1 = min(i0 + band, oh)
            by0 = ly0 + i0 * sy
            by1 = ly0 + i1 * sy
            wy0 = math.floor(by0) - my
            wy1 = math.ceil(by1) + my
            window = read_region(level, wy0, wx0, wy1 - wy0, wx1 - wx0)
            box = (lx0 - wx0, by0 - wy0, lx0 + lw - wx0, by1 - wy0)
            img = Image.fromarray(window).resize((ow, i1 - i0), Image.Resampling.BILINEAR, box=box)
            out[i0:i1] = np.asarray(img)
        return out

    # ----------------------------------------------------------------- life cycle
    def _check_open(self) -> None:
        if self._closed:
            raise SlideError(f"{self.path}: slide is closed")

    def close(self) -> None:
        """Release the file handles (the dask levels become unusable)."""
        with self._lock:
            if not self._closed and self._closer is not None:
                self._closer()
            self._closed = True

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        if self.format == "array":  # no file: the pixels travel
            src = self._sources[0]
            assert isinstance(src, ArraySource)
            return (_from_array, (src.array, self.mpp, str(self.path), self.metadata))
        # file handles do not travel: a copy in another process re-opens the file
        return (_reopen, (str(self.path), self._mpp_override))

    def __repr__(self) -> str:
        mpp = f"{self.mpp:.4g} µm/px" if self.mpp else "mpp unknown"
        return (
            f"Slide({str(self.path)!r}, format={self.format!r}, shape={self.shape}, "
            f"levels={len(self.levels)}, {mpp})"
        )
