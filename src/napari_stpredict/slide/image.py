"""Plain JPEG/PNG images: decoded once into memory, with a pre-computed 2× block-mean pyramid.

These files cannot be read tile by tile, so memory grows with the image. They are fine for
sections of a few thousand pixels (e.g. legacy ST H&E JPEGs); convert big ones to a tiled
pyramid with ``stpredict convert`` once and open the result instead. JPEG/PNG resolution
fields (dpi) are not trusted as a physical scale: pass ``mpp=`` to :func:`open_slide`.

Opening parses the header only; the pixels are decoded on first read (at open for images of
at most :data:`EAGER_PIXELS`, so a corrupt small file is still refused at open). So
``stpredict info`` on any JPEG/PNG needs no memory for pixels. Reading pixels of an image
over :data:`MAX_PIXELS` is refused with a hint to ``convert`` (which lifts the limit: it
streams the decoded image into a tiled pyramid once).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from napari_stpredict.errors import SlideError
from napari_stpredict.slide.base import (
    LAZY_CHUNK,
    MIN_LEVEL_SIZE,
    LevelSource,
    block_mean,
    check_pixel_type,
    source_to_dask,
    to_rgb,
)

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: Refuse to decode images needing more than this fraction of the available memory.
_MEMORY_FRACTION = 0.5
#: Images up to this many pixels are decoded at open (corrupt data refused at once).
EAGER_PIXELS = 2**27  # 134 Mpx, ≈ 0.5 GB decoded with its pyramid
#: Reading pixels of a larger image is refused (hint: ``stpredict convert``), unless the
#: caller lifts the limit (``open_slide(..., max_image_pixels=None)``, as ``convert`` does).
MAX_PIXELS = 2**28  # 268 Mpx, e.g. 16,384 × 16,384

_MODE_CHANNELS = {"1": 1, "L": 1, "LA": 2, "RGB": 3, "RGBA": 4, "P": 3, "PA": 4, "CMYK": 3}


def image_header(path: Path, head: bytes) -> tuple[int, int, str]:
    """Width, height and Pillow mode of a JPEG/PNG, parsed from the header only (no decode).

    Parameters
    ----------
    path
        The file.
    head
        Its first bytes (:data:`JPEG_MAGIC` or :data:`PNG_MAGIC` says which format).

    Raises
    ------
    SlideError
        A corrupt or unsupported header (the decoder's error is its ``__cause__``).
    """
    from PIL import JpegImagePlugin, PngImagePlugin

    # the plugin classes parse the header without Pillow's decompression-bomb limit, which
    # would refuse legitimate whole-slide-sized images
    cls = (
        JpegImagePlugin.JpegImageFile
        if head.startswith(JPEG_MAGIC)
        else PngImagePlugin.PngImageFile
    )
    try:
        with cls(str(path)) as im:
            return int(im.size[0]), int(im.size[1]), str(im.mode)
    except Exception as err:
        raise SlideError(f"{path}: corrupt or unsupported image header: {err}") from err


def _decode(path: Path, head: bytes, mode: str) -> np.ndarray:
    import imagecodecs

    data = path.read_bytes()
    if mode in ("L", "LA", "RGB", "RGBA"):
        decode = imagecodecs.jpeg8_decode if head.startswith(JPEG_MAGIC) else imagecodecs.png_decode
        return decode(data)
    # palette, bilevel and CMYK images: let Pillow expand them to RGB(A)
    from PIL import JpegImagePlugin, PngImagePlugin

    cls = (
        JpegImagePlugin.JpegImageFile
        if head.startswith(JPEG_MAGIC)
        else PngImagePlugin.PngImageFile
    )
    with cls(str(path)) as im:
        target = "RGBA" if (mode == "PA" or "transparency" in im.info) else "RGB"
        return np.asarray(im.convert(target))


def _half(img: np.ndarray, band: int = 1024) -> np.ndarray:
    """2× block mean computed in bands of rows (small temporaries)."""
    out = np.empty((img.shape[0] // 2, img.shape[1] // 2, 3), np.uint8)
    for y in range(0, out.shape[0], band // 2):
        out[y : y + band // 2] = block_mean(img[2 * y : 2 * y + band], 2)[: out.shape[0] - y]
    return out


class _Pixels:
    """The decoded image and its pyramid, made once on first use (thread-safe)."""

    def __init__(
        self, path: Path, head: bytes, width: int, height: int, mode: str, max_pixels: int | None
    ) -> None:
        self.path, self.head, self.mode = path, head, mode
        self.width, self.height = width, height
        self.max_pixels = max_pixels
        self._levels: list[np.ndarray] | None = None
        self._lock = threading.Lock()

    def levels(self) -> list[np.ndarray]:
        if self._levels is None:
            with self._lock:
                if self._levels is None:
                    self._levels = self._decode_all()
        return self._levels

    def _decode_all(self) -> list[np.ndarray]:
        path, width, height, mode = self.path, self.width, self.height, self.mode
        if self.max_pixels is not None and width * height > self.max_pixels:
            raise SlideError(
                f"{path}: {width} x {height} px JPEG/PNG is too large to decode in memory "
                f"(limit {self.max_pixels / 1e6:.0f} Mpx); convert it once to a tiled pyramid: "
                f"stpredict convert {path.name} {path.stem}.ome.tif --mpp <µm/px>"
            )
        need = width * height * (_MODE_CHANNELS[mode] + 3)
        try:
            import psutil

            avail = psutil.virtual_memory().available
        except Exception:  # psutil missing or no /proc: do not guess
            avail = None
        if avail is not None and need > _MEMORY_FRACTION * avail:
            raise SlideError(
                f"{path}: {width}x{height} image needs {need / 2**30:.1f} GiB to decode but only "
                f"{avail / 2**30:.1f} GiB is free; save it as a tiled pyramidal TIFF instead "
                "(stpredict convert)"
            )
        try:
            arr = _decode(path, self.head, mode)
        except Exception as err:
            text = str(err).strip().splitlines()
            raise SlideError(
                f"{path}: corrupt image data: {text[0] if text else type(err).__name__}"
            ) from err
        if (arr.ndim == 3 and arr.shape[2] == 0) or arr.size == 0:
            raise SlideError(f"{path}: image has zero size")
        check_pixel_type(path, arr.dtype, 1 if arr.ndim == 2 else arr.shape[2])
        if arr.shape[:2] != (height, width):
            raise SlideError(
                f"{path}: decoded {arr.shape[1]}x{arr.shape[0]} px but the header says "
                f"{width}x{height}"
            )
        rgb = np.ascontiguousarray(to_rgb(arr))
        del arr
        out = [rgb]
        level = rgb
        while len(out) < len(_pyramid_shapes(height, width)):
            level = _half(level)
            out.append(level)
        return out


def _pyramid_shapes(height: int, width: int) -> list[tuple[int, int]]:
    """Shapes of the stored 2× pyramid of an image (level 0 first)."""
    shapes = [(height, width)]
    h, w = height, width
    while max(h, w) > MIN_LEVEL_SIZE and min(h, w) >= 4:
        h, w = h // 2, w // 2
        shapes.append((h, w))
    return shapes


class ImageLevel(LevelSource):
    """One level of a JPEG/PNG pyramid; the pixels are decoded on first read."""

    def __init__(self, pixels: _Pixels, index: int, shape: tuple[int, int]) -> None:
        self.pixels = pixels
        self.index = index
        self.shape = shape
        self.chunks = (min(LAZY_CHUNK, shape[0]), min(LAZY_CHUNK, shape[1]))
        f = float(2**index)
        self.downsample = (f, f) if index else None

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return np.ascontiguousarray(self.pixels.levels()[self.index][y0:y1, x0:x1])

    def to_dask(self, name: str) -> da.Array:
        return source_to_dask(self, name)


def open_image(path: Path, head: bytes, *, max_pixels: int | None = MAX_PIXELS) -> dict[str, Any]:
    """Open a JPEG or PNG file; return the pieces :class:`~.base.Slide` is built from.

    Only the header is parsed here (plus a full decode for images of at most
    :data:`EAGER_PIXELS`); ``max_pixels`` (``None`` = no limit) bounds what may be decoded.
    """
    width, height, mode = image_header(path, head)
    if width <= 0 or height <= 0:
        raise SlideError(f"{path}: image has zero size {height}x{width}")
    if mode not in _MODE_CHANNELS:
        raise SlideError(
            f"{path}: {mode} pixels are not supported; expected an 8-bit RGB brightfield image "
            "(16-bit/float images are refused)"
        )
    pixels = _Pixels(path, head, width, height, mode, max_pixels)
    if width * height <= EAGER_PIXELS:
        pixels.levels()  # small: decode now, so corrupt data is refused at open
    sources: list[LevelSource] = [
        ImageLevel(pixels, i, shape) for i, shape in enumerate(_pyramid_shapes(height, width))
    ]
    meta = {
        "vendor": "generic",
        "compression": "jpeg" if head.startswith(JPEG_MAGIC) else "png",
        "mode": mode,
        "mpp_source": None,
        "decoded": "at open" if width * height <= EAGER_PIXELS else "on first read",
    }
    return {"format": "image", "sources": sources, "mpp": None, "metadata": meta, "closer": None}
