"""Pyramid writers: tiled OME-TIFF (levels as SubIFDs) and OME-Zarr (NGFF 0.4 multiscales).

Both stream one row of tiles at a time, so memory is bounded by ``tile × width`` pixels, not by
the slide. Each level is the 2× block mean of the one above it. For OME-TIFF the coarser levels
go to a temporary zarr store in the target folder while the finer level is written (a TIFF is
written level after level, level 0 first); OME-Zarr reads them back from the output itself.
Outputs appear under their final name only when complete (``io_utils.atomic_path``): a full
disk is one line naming the output, the temporary and the scratch levels are removed, and a
killed run's leftovers (``.stpredict-tmp-<output>-*``) are swept by the next run to the same
output. An output is locked while it is written (a second ``convert`` to it refuses), an
OME-Zarr output carries our marker (only a marked folder is ever replaced), and an output that
is or contains its own source is refused.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from napari_stpredict.errors import StPredictError
from napari_stpredict.io_utils import (
    MARKER_ATTR,
    atomic_path,
    check_not_inside,
    output_lock,
    sweep_legacy_scratch,
    temp_name,
)
from napari_stpredict.progress import CancelToken, ProgressCallback, check_cancel, report
from napari_stpredict.slide.base import FILL, Slide, block_mean

COMPRESSIONS = ("jpeg", "deflate")
JPEG_QUALITY = 90

# A strip reader returns rows [y0, y1) of a level at full width as (h, w, 3) uint8.
StripReader = Callable[[int, int], np.ndarray]


def _check_options(
    tile: int, compression: str, mpp: float | None, allowed: tuple[str, ...]
) -> None:
    if not isinstance(tile, int) or tile < 16 or tile % 16:
        raise StPredictError(f"tile size {tile!r} must be a multiple of 16 (e.g. 256, 512)")
    if compression not in allowed:
        raise StPredictError(
            f"compression {compression!r} not supported here (choose from {', '.join(allowed)})"
        )
    if mpp is not None and not (isinstance(mpp, (int, float)) and 0 < mpp < float("inf")):
        raise StPredictError(f"mpp {mpp!r} must be a positive number")


def pyramid_shapes(shape: tuple[int, int], tile: int) -> list[tuple[int, int]]:
    """Level shapes: halve (floor) until the longest side fits in one tile."""
    shapes = [shape]
    while max(shapes[-1]) > tile and min(shapes[-1]) >= 2:
        h, w = shapes[-1]
        shapes.append((h // 2, w // 2))
    return shapes


def _slide_strip_reader(slide: Slide) -> StripReader:
    w = slide.shape[1]
    return lambda y0, y1: slide.read_region(0, y0, 0, y1 - y0, w)


def _tiles(strip: np.ndarray, tile: int) -> Iterator[np.ndarray]:
    """Full-size tiles of a strip, left to right; edges padded with white (no JPEG ringing)."""
    w = strip.shape[1]
    for x in range(0, w, tile):
        t = strip[:, x : x + tile]
        if t.shape[0] != tile or t.shape[1] != tile:
            pad = np.full((tile, tile, 3), FILL, np.uint8)
            pad[: t.shape[0], : t.shape[1]] = t
            t = pad
        yield np.ascontiguousarray(t)


class _Progress:
    def __init__(self, progress: ProgressCallback | None, cancel: CancelToken | None, total: int):
        self.progress, self.cancel, self.total, self.done = progress, cancel, total, 0

    def step(self, message: str) -> None:
        check_cancel(self.cancel, "convert")
        self.done += 1
        report(self.progress, self.done, self.total, message)


def _zlib_codec(level: int = 6) -> Any:
    """numcodecs' ``zlib`` codec, encoding with libdeflate (imagecodecs): same stream format
    and codec id (any zarr reader decodes it), about twice as fast as zlib at equal size."""
    import imagecodecs
    import numcodecs

    class FastZlib(numcodecs.Zlib):
        def encode(self, buf: Any) -> bytes:
            return imagecodecs.deflate_encode(np.ascontiguousarray(buf), level=self.level)

    return FastZlib(level=level)


def _temp_level(folder: Path, index: int, shape: tuple[int, int], tile: int) -> Any:
    import zarr
    from zarr.codecs import BloscCodec

    return zarr.create_array(
        store=str(folder / f"level{index}"),
        shape=(*shape, 3),
        chunks=(tile // 2, tile * 4, 3),
        dtype="uint8",
        fill_value=FILL,
        compressors=BloscCodec(cname="lz4", clevel=1, shuffle="noshuffle"),
    )


def _check_source(slide: Slide, dst: str | os.PathLike) -> None:
    """Refuse an output that would replace or lie inside its own source (before any work)."""
    src = getattr(slide, "path", None)
    if src:
        check_not_inside([src], dst, "output")


def _plan(
    slide: Slide,
    dst: str | os.PathLike,
    tile: int,
    compression: str,
    mpp: float | None,
    allowed: tuple[str, ...],
    progress: ProgressCallback | None,
    cancel: CancelToken | None,
) -> tuple[float | None, list[tuple[int, int]], _Progress]:
    """Check the options and the output (before any work): the µm/px to record, the level
    shapes and the progress over the tile rows of all levels."""
    _check_options(tile, compression, mpp, allowed)
    mpp = float(mpp) if mpp is not None else slide.mpp
    shapes = pyramid_shapes(slide.shape, tile)
    prog = _Progress(progress, cancel, sum(math.ceil(h / tile) for h, _ in shapes))
    _check_source(slide, dst)
    return mpp, shapes, prog


@contextlib.contextmanager
def _scratch(dst: Path) -> Iterator[Path]:
    """A scratch folder for coarser levels, named as a temporary of ``dst`` (swept if killed)."""
    sweep_legacy_scratch(dst.parent)
    folder = temp_name(dst, "pyramid")
    folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_ome_tiff(
    slide: Slide,
    dst: str | os.PathLike,
    *,
    tile: int = 512,
    compression: str = "jpeg",
    mpp: float | None = None,
    quality: int = JPEG_QUALITY,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> Path:
    """Write a slide as a tiled pyramidal OME-TIFF (sub-resolutions in SubIFDs).

    Parameters
    ----------
    slide
        The source (any readable slide).
    dst
        Output path (``.ome.tif``/``.ome.tiff`` by convention).
    tile
        Tile side in pixels (multiple of 16).
    compression
        ``"jpeg"`` (lossy, YCbCr 4:2:0 at ``quality``) or ``"deflate"`` (lossless).
    mpp
        µm per level-0 pixel to record; default: the slide's own (omitted when unknown).
    quality
        JPEG quality (1–100).
    overwrite
        Replace an existing ``dst``.
    progress, cancel
        Progress callback (units: tile rows of all levels) and cancel token.

    Returns
    -------
    pathlib.Path
        ``dst``.
    """
    import tifffile

    mpp, shapes, prog = _plan(slide, dst, tile, compression, mpp, COMPRESSIONS, progress, cancel)
    options = {**_tiff_compression(compression, quality), "tile": (tile, tile)}
    with (
        output_lock(dst, what="conversion"),
        atomic_path(dst, overwrite=overwrite) as tmp,
        _scratch(Path(dst)) as scratch,
        tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tw,
    ):
        metadata = _ome_metadata(_image_name(dst), mpp)
        reader = _slide_strip_reader(slide)
        for k, (h, w) in enumerate(shapes):
            nxt = _temp_level(scratch, k + 1, shapes[k + 1], tile) if k + 1 < len(shapes) else None
            tw.write(
                _level_tiles(reader, (h, w), tile, nxt, prog, f"level {k}"),
                shape=(h, w, 3),
                dtype=np.uint8,
                subifds=len(shapes) - 1 if k == 0 else None,
                subfiletype=1 if k else 0,
                metadata=metadata if k == 0 else None,
                maxworkers=os.cpu_count() or 1,
                # encode about one strip at a time: memory bounded by the strip
                buffersize=max(2**20, tile * w * 3),
                **options,
                **_tiff_resolution(mpp, 2**k),
            )
            if k > 0:
                shutil.rmtree(scratch / f"level{k}", ignore_errors=True)
            if nxt is not None:
                reader = lambda y0, y1, a=nxt: np.asarray(a[y0:y1])  # noqa: E731
    return Path(dst)


def _image_name(dst: str | os.PathLike) -> str:
    """The image name recorded in the metadata: the output's name before its first dot."""
    return Path(dst).name.split(".")[0]


def _tiff_compression(compression: str, quality: int) -> dict[str, Any]:
    """tifffile's compression options for ``"jpeg"`` (YCbCr, at ``quality``) or ``"deflate"``."""
    if compression == "jpeg":
        return {
            "compression": "jpeg",
            "compressionargs": {"level": int(quality)},
            # RGB input: tifffile stores it as YCbCr JPEG (chroma subsampled)
            "photometric": "rgb",
        }
    return {
        "compression": "zlib",
        "compressionargs": {"level": 6},
        "photometric": "rgb",
        "predictor": 2,
    }


def _ome_metadata(name: str, mpp: float | None) -> dict[str, Any]:
    """The OME metadata of level 0: axes, name and, when known, the physical pixel size."""
    metadata: dict[str, Any] = {"axes": "YXS", "Name": name}
    if mpp:
        metadata.update(
            PhysicalSizeX=mpp, PhysicalSizeXUnit="µm", PhysicalSizeY=mpp, PhysicalSizeYUnit="µm"
        )
    return metadata


def _tiff_resolution(mpp: float | None, downsample: int) -> dict[str, Any]:
    """The resolution tags of a level: every level records its own, so readers get exact 2^k
    downsamples (relative, unit-less ones when the physical scale is unknown)."""
    if mpp:
        px_per_cm = 1e4 / (mpp * downsample)
        return {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
    return {"resolution": (1 / downsample, 1 / downsample), "resolutionunit": "NONE"}


def _level_tiles(
    reader: StripReader,
    shape: tuple[int, int],
    tile: int,
    nxt: Any,
    prog: _Progress,
    label: str,
) -> Iterator[np.ndarray]:
    """Yield the tiles of one level row by row; feed the 2× reduced strip to ``nxt``."""
    h, _ = shape
    for y in range(0, h, tile):
        strip = reader(y, min(y + tile, h))
        prog.step(label)
        # before yielding: the TIFF writer stops pulling once it has all tiles, so code after
        # the last yield would never run
        if nxt is not None:
            small = block_mean(strip, 2)
            y2 = y // 2
            rows = min(small.shape[0], nxt.shape[0] - y2)
            if rows > 0:
                nxt[y2 : y2 + rows] = small[:rows, : nxt.shape[1]]
        yield from _tiles(strip, tile)


def write_ome_zarr(
    slide: Slide,
    dst: str | os.PathLike,
    *,
    tile: int = 512,
    compression: str = "deflate",
    mpp: float | None = None,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> Path:
    """Write a slide as an OME-Zarr image (zarr v2, OME-NGFF 0.4 multiscales, axes c, y, x).

    Parameters
    ----------
    dst
        Output folder (``.zarr`` by convention).
    tile
        Chunk side in pixels (multiple of 16); one chunk holds the three channels of a tile.
    compression
        ``"deflate"`` (zlib, lossless). JPEG chunks are not part of the OME-Zarr standard and
        are refused.
    slide, mpp, overwrite, progress, cancel
        As for :func:`write_ome_tiff`.

    Returns
    -------
    pathlib.Path
        ``dst``, a folder carrying our marker.
    """
    import zarr

    mpp, shapes, prog = _plan(slide, dst, tile, compression, mpp, ("deflate",), progress, cancel)
    with output_lock(dst, what="conversion"), atomic_path(dst, overwrite=overwrite) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        root.attrs[MARKER_ATTR] = {"writer": "napari-stpredict convert", "source": str(slide.path)}
        arrays = [_zarr_level(root, k, shape, tile) for k, shape in enumerate(shapes)]
        root.attrs["multiscales"] = _multiscales(_image_name(dst), mpp, len(shapes))
        root.attrs["omero"] = _OMERO_RGB
        reader = _slide_strip_reader(slide)
        for k, (h, _w) in enumerate(shapes):
            out = arrays[k]
            for y in range(0, h, tile):
                strip = reader(y, min(y + tile, h))
                out[:, y : y + strip.shape[0], :] = strip.transpose(2, 0, 1)
                prog.step(f"level {k}")
            if k + 1 < len(shapes):
                reader = _half_strip_reader(out, shapes[k + 1][1])
    return Path(dst)


#: OME-NGFF ``omero`` rendering settings of an RGB image.
_OMERO_RGB = {
    "rdefs": {"model": "color"},
    "channels": [
        {
            "label": c,
            "color": col,
            "window": {"start": 0, "end": 255, "min": 0, "max": 255},
            "active": True,
        }
        for c, col in (("R", "FF0000"), ("G", "00FF00"), ("B", "0000FF"))
    ],
}


def _zarr_level(root: Any, index: int, shape: tuple[int, int], tile: int) -> Any:
    """The empty ``(3, h, w)`` array of one level, chunked on ``tile`` (deflate)."""
    return root.create_array(
        str(index),
        shape=(3, *shape),
        chunks=(3, tile, tile),
        dtype="uint8",
        fill_value=FILL,
        compressors=_zlib_codec(6),
        chunk_key_encoding={"name": "v2", "separator": "/"},
    )


def _multiscales(name: str, mpp: float | None, n_levels: int) -> list[dict[str, Any]]:
    """OME-NGFF 0.4 ``multiscales``: axes c, y, x (µm when ``mpp`` is known), 2^k scales."""
    unit = {"unit": "micrometer"} if mpp else {}
    px = mpp or 1.0
    return [
        {
            "version": "0.4",
            "name": name,
            "axes": [
                {"name": "c", "type": "channel"},
                {"name": "y", "type": "space", **unit},
                {"name": "x", "type": "space", **unit},
            ],
            "datasets": [
                {
                    "path": str(k),
                    "coordinateTransformations": [
                        {"type": "scale", "scale": [1.0, px * 2**k, px * 2**k]}
                    ],
                }
                for k in range(n_levels)
            ],
            "type": "mean",
        }
    ]


def _half_strip_reader(level: Any, width: int) -> StripReader:
    """Strips of the next level down, read back from ``level`` (``(3, h, w)``) as it was written."""

    def reader(y0: int, y1: int) -> np.ndarray:
        # rows [y0, y1) of the next level = 2× block mean of rows [2y0, 2y1) here
        block = np.asarray(level[:, 2 * y0 : 2 * y1, : 2 * width]).transpose(1, 2, 0)
        return block_mean(np.ascontiguousarray(block), 2)

    return reader
