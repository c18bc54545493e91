"""Level sources: the pyramid levels a :class:`~napari_stpredict.slide.base.Slide` is built from.

A *level source* reads an in-bounds rectangle of its level as ``(h, w, 3) uint8`` and presents
itself as a dask array chunked on its native tiles. Backends (``tiff``, ``omezarr``, ``image``)
subclass :class:`LevelSource`; :class:`ArraySource` holds a level in memory and
:class:`DownsampledSource` computes a lazy 2× level on read. The pixel helpers every backend
shares live here too: :func:`block_mean`, :func:`to_rgb`, :func:`check_pixel_type`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import dask.array as da
import numpy as np

from napari_stpredict.errors import SlideError

#: Value of pixels outside the slide (white, like glass without tissue).
FILL = 255
#: Chunk side of lazy (downsampled-on-read) levels.
LAZY_CHUNK = 512
#: Source window budget of one band of a banded read (bytes): :class:`DownsampledSource` and
#: :meth:`Slide.read_resampled <napari_stpredict.slide.base.Slide.read_resampled>`.
BAND_BYTES = 64 * 2**20


def block_mean(arr: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor × factor`` blocks of an ``(h, w, c)`` uint8 array (trailing rows cut).

    Parameters
    ----------
    arr
        ``(h, w, c)`` uint8 image.
    factor
        Integer reduction factor (≥ 1).

    Returns
    -------
    numpy.ndarray
        ``(h // factor, w // factor, c)`` uint8, rounded to nearest.
    """
    if factor == 1:
        return arr
    h, w, _ = arr.shape
    oh, ow = h // factor, w // factor
    # strided adds: numpy reductions over the inner axes of a reshaped view are ~10x slower
    acc = np.zeros((oh, ow, arr.shape[2]), np.uint16 if factor <= 16 else np.uint32)
    for dy in range(factor):
        for dx in range(factor):
            acc += arr[dy : oh * factor : factor, dx : ow * factor : factor]
    n = factor * factor
    acc += n // 2
    acc //= n
    return acc.astype(np.uint8)


def to_rgb(arr: np.ndarray) -> np.ndarray:
    """Convert an 8-bit ``(h, w)``/``(h, w, 1..4)`` array to ``(h, w, 3)`` RGB.

    Grey is repeated over the three channels; an alpha channel is composited over white
    (transparent = background glass).
    """
    if arr.ndim == 2:
        arr = arr[:, :, None]
    c = arr.shape[2]
    if c == 3:
        return arr
    if c == 1:
        return np.repeat(arr, 3, axis=2)
    colour = arr[:, :, :1] if c == 2 else arr[:, :, :3]
    alpha = arr[:, :, -1:].astype(np.uint16)
    mixed = (colour.astype(np.uint16) * alpha + FILL * (255 - alpha) + 127) // 255
    out = mixed.astype(np.uint8)
    return np.repeat(out, 3, axis=2) if c == 2 else out


def check_pixel_type(path: Path | str, dtype: np.dtype, channels: int, what: str = "") -> None:
    """Refuse pixel types that are not 8-bit grey/RGB(A) brightfield images.

    Raises
    ------
    SlideError
        For non-uint8 data or a channel count other than 1–4.
    """
    where = f" ({what})" if what else ""
    if np.dtype(dtype) != np.uint8:
        raise SlideError(
            f"{path}: {np.dtype(dtype)} pixels{where} are not supported; expected an 8-bit RGB "
            "brightfield slide (convert 16-bit/float images to 8-bit RGB first)"
        )
    if channels not in (1, 2, 3, 4):
        raise SlideError(
            f"{path}: {channels} channels{where} are not supported; expected an RGB brightfield "
            "slide (multichannel/fluorescence images are refused)"
        )


class LevelSource(ABC):
    """One pyramid level: reads in-bounds rectangles and exposes a dask array.

    Attributes
    ----------
    shape
        ``(h, w)`` of the level.
    chunks
        ``(th, tw)``: the native tile (chunk) size.
    """

    shape: tuple[int, int]
    chunks: tuple[int, int]
    #: ``(dy, dx)`` level-0 px per level px when the file states it exactly; ``None`` = the
    #: level covers the whole slide, so the downsample follows from the shapes
    downsample: tuple[float, float] | None = None

    @abstractmethod
    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Return the in-bounds rectangle ``[y0, y1) × [x0, x1)`` as ``(h, w, 3) uint8``."""

    @abstractmethod
    def to_dask(self, name: str) -> da.Array:
        """Return the level as a lazy ``(h, w, 3) uint8`` dask array chunked on native tiles."""


class _ArrayLike:
    """Minimal array protocol over a :class:`LevelSource` for ``dask.array.from_array``."""

    def __init__(self, source: LevelSource) -> None:
        self.source = source
        self.shape = (*source.shape, 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        ys, xs = key[0], key[1]
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        out = self.source.read(y0, y1, x0, x1)
        return out[(slice(None), slice(None), *key[2:3])] if len(key) > 2 else out


def source_to_dask(source: LevelSource, name: str) -> da.Array:
    """Wrap a :class:`LevelSource` as a dask array chunked on ``source.chunks``."""
    th, tw = source.chunks
    return da.from_array(
        _ArrayLike(source),
        chunks=(th, tw, 3),
        name=name,
        asarray=False,
        fancy=False,
        lock=False,
        meta=np.empty((0, 0, 0), np.uint8),
    )


class ArraySource(LevelSource):
    """A level held in memory (decoded JPEG/PNG and its pre-computed pyramid)."""

    def __init__(
        self,
        array: np.ndarray,
        *,
        chunks: tuple[int, int] = (LAZY_CHUNK, LAZY_CHUNK),
        downsample: tuple[float, float] | None = None,
    ) -> None:
        self.array = array
        self.downsample = downsample
        self.shape = (int(array.shape[0]), int(array.shape[1]))
        self.chunks = (min(chunks[0], self.shape[0]), min(chunks[1], self.shape[1]))

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return np.ascontiguousarray(self.array[y0:y1, x0:x1])

    def to_dask(self, name: str) -> da.Array:
        # not da.from_array(ndarray): dask copies NumPy inputs into its graph (2x memory)
        return source_to_dask(self, name)


class DownsampledSource(LevelSource):
    """A lazy level: ``factor × factor`` block means of ``base``, computed on read.

    Reads are done in bands so memory stays bounded by the band, not by the request.
    """

    def __init__(self, base: LevelSource, factor: int = 2) -> None:
        self.base = base
        self.factor = factor
        self.shape = (base.shape[0] // factor, base.shape[1] // factor)
        self.chunks = (min(LAZY_CHUNK, self.shape[0]), min(LAZY_CHUNK, self.shape[1]))

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        f = self.factor
        out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
        row_bytes = max(1, (x1 - x0) * f * f * 3)
        band = max(1, BAND_BYTES // 4 // row_bytes)
        for by in range(y0, y1, band):
            by1 = min(by + band, y1)
            src = self.base.read(by * f, by1 * f, x0 * f, x1 * f)
            out[by - y0 : by1 - y0] = block_mean(src, f)
        return out

    def to_dask(self, name: str) -> da.Array:
        return source_to_dask(self, name)
