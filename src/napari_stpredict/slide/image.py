"""Plain JPEG/PNG images: decoded once into memory, with a pre-computed 2× block-mean pyramid.

These files cannot be read tile by tile, so memory grows with the image. They are fine for
sections of a few thousand pixels (e.g. legacy ST H&E JPEGs); convert big ones to a tiled
pyramid with ``stpredict convert`` once and open the result instead. JPEG/PNG resolution
fields (dpi) are not trusted as a physical scale: pass ``mpp=`` to :func:`open_slide`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from napari_stpredict.errors import SlideError
from napari_stpredict.slide.base import (
    MIN_LEVEL_SIZE,
    ArraySource,
    LevelSource,
    block_mean,
    check_pixel_type,
    to_rgb,
)

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: Refuse to decode images needing more than this fraction of the available memory.
_MEMORY_FRACTION = 0.5

_MODE_CHANNELS = {"1": 1, "L": 1, "LA": 2, "RGB": 3, "RGBA": 4, "P": 3, "PA": 4, "CMYK": 3}


def _header(path: Path, head: bytes) -> tuple[int, int, str]:
    """Width, height and Pillow mode, parsed from the header only (no decode)."""
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


def open_image(path: Path, head: bytes) -> dict[str, Any]:
    """Open a JPEG or PNG file; return the pieces :class:`~.base.Slide` is built from."""
    width, height, mode = _header(path, head)
    if width <= 0 or height <= 0:
        raise SlideError(f"{path}: image has zero size {height}x{width}")
    if mode not in _MODE_CHANNELS:
        raise SlideError(
            f"{path}: {mode} pixels are not supported; expected an 8-bit RGB brightfield image "
            "(16-bit/float images are refused)"
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
            f"{avail / 2**30:.1f} GiB is free; save it as a tiled pyramidal TIFF instead"
        )
    try:
        arr = _decode(path, head, mode)
    except Exception as err:
        text = str(err).strip().splitlines()
        raise SlideError(
            f"{path}: corrupt image data: {text[0] if text else type(err).__name__}"
        ) from err
    if (arr.ndim == 3 and arr.shape[2] == 0) or arr.size == 0:
        raise SlideError(f"{path}: image has zero size")
    check_pixel_type(path, arr.dtype, 1 if arr.ndim == 2 else arr.shape[2])
    rgb = np.ascontiguousarray(to_rgb(arr))
    del arr
    sources: list[LevelSource] = [ArraySource(rgb)]
    level, factor = rgb, 1
    while max(level.shape[:2]) > MIN_LEVEL_SIZE and min(level.shape[:2]) >= 4:
        level = _half(level)
        factor *= 2
        sources.append(ArraySource(level, downsample=(float(factor), float(factor))))
    meta = {
        "vendor": "generic",
        "compression": "jpeg" if head.startswith(JPEG_MAGIC) else "png",
        "mode": mode,
        "mpp_source": None,
    }
    return {"format": "image", "sources": sources, "mpp": None, "metadata": meta, "closer": None}
