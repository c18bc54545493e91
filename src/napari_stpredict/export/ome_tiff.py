"""Grid maps (heatmaps, tumour mask) as pyramidal OME-TIFFs that overlay the slide.

The image covers the slide's level-0 extent: output pixel ``(r, c)`` at pixel size ``p``
(level-0 px) covers level-0 ``[r p, (r+1) p) × [c p, (c+1) p)`` and takes the value of the grid
cell whose heatmap square (one stride around the cell centre) holds the pixel centre. With the
physical pixel size ``p × mpp`` in the OME metadata, QuPath, napari or any OME reader places it
exactly over the slide. Tiles are generated on the fly from the (small) cell grid, so memory is
bounded by a tile and a grid plane, never by the slide.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypedDict, Unpack

import numpy as np

from napari_stpredict.export._common import ExportError, ExportResult, writing
from napari_stpredict.export._predictions import as_predictions
from napari_stpredict.progress import CancelToken, ProgressCallback, check_cancel, report
from napari_stpredict.tumor.regions import GridGeometry

TILE = 256
_MAX_SUBDIVISION = 8


def default_pixel_px(geo: GridGeometry) -> float:
    """Coarsest output pixel (level-0 px) whose pixel edges fall on the heatmap cell edges.

    Cell squares start at ``origin - stride/2``; with ``k`` output pixels per stride the edges
    line up when that offset is a multiple of ``stride / k``. For the default grid (stride =
    patch) ``k = 1``: one output pixel per cell.
    """
    s = geo.stride_px
    for k in range(1, _MAX_SUBDIVISION + 1):
        ok = True
        for o in (geo.origin_y, geo.origin_x):
            q = (o - s / 2) / (s / k)
            ok &= abs(q - round(q)) < 1e-6
        if ok:
            return s / k
    return s / _MAX_SUBDIVISION


def _levels(shape0: tuple[int, int], pixel_px: float, tile: int) -> list[tuple[float, int, int]]:
    """(pixel size in level-0 px, height, width) of each pyramid level, full resolution first."""
    out = []
    p = pixel_px
    while True:
        h, w = math.ceil(shape0[0] / p - 1e-9), math.ceil(shape0[1] / p - 1e-9)
        out.append((p, max(h, 1), max(w, 1)))
        if max(h, w) <= tile:
            return out
        p *= 2


def _tiles(
    planes: Callable[[int], np.ndarray],
    n_channels: int,
    geo: GridGeometry,
    level: tuple[float, int, int],
    *,
    dtype: np.dtype,
    fill: float,
    tile: int,
    tick: Callable[[], None],
) -> Iterator[np.ndarray]:
    """Tiles of one level, channel by channel, row-major (tifffile's order)."""
    p, h, w = level
    gh, gw = geo.shape
    for c in range(n_channels):
        plane = planes(c)
        for ty in range(0, h, tile):
            ys = (np.arange(ty, min(ty + tile, h)) + 0.5) * p
            ii, _ = geo.cell_index(ys, np.zeros_like(ys))
            iv = (ii >= 0) & (ii < gh)
            for tx in range(0, w, tile):
                tick()
                xs = (np.arange(tx, min(tx + tile, w)) + 0.5) * p
                _, jj = geo.cell_index(np.zeros_like(xs), xs)
                jv = (jj >= 0) & (jj < gw)
                out = np.full((tile, tile), fill, dtype=dtype)
                block = plane[np.ix_(np.clip(ii, 0, gh - 1), np.clip(jj, 0, gw - 1))]
                block = np.where(iv[:, None] & jv[None, :], block, fill)
                out[: len(ys), : len(xs)] = block
                yield out


class GridTiffOptions(TypedDict, total=False):
    """How the OME-TIFF exports write (defaults: :func:`write_grid_ome_tiff`).

    ``pixel_size_um``: output pixel size (default: the coarsest aligned with the cell edges,
    :func:`default_pixel_px`); ``overwrite``: replace an existing target; ``progress``,
    ``cancel``: as everywhere.
    """

    pixel_size_um: float | None
    overwrite: bool
    progress: ProgressCallback | None
    cancel: CancelToken | None


def write_grid_ome_tiff(
    dst: str | os.PathLike,
    planes: Callable[[int], np.ndarray],
    channel_names: Sequence[str],
    grid: Any,
    *,
    dtype: Any = np.float32,
    fill: float = np.nan,
    pixel_size_um: float | None = None,
    name: str = "stpredict",
    description: str = "",
    overwrite: bool = False,
    tile: int = TILE,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> dict[str, Any]:
    """Write grid planes as a tiled, pyramidal OME-TIFF covering the slide.

    Parameters
    ----------
    dst
        Target ``.ome.tif`` path (written atomically).
    planes
        ``planes(c)`` → (gh, gw) array of channel ``c`` (called once per channel and level).
    channel_names
        One name per channel (OME ``Channel/@Name``).
    grid
        The ``TileGrid`` the planes live on.
    pixel_size_um
        Output pixel size; default: the coarsest one aligned with the cell edges
        (:func:`default_pixel_px`).

    Returns
    -------
    dict
        ``shape`` (C, H, W), ``levels``, ``pixel_size_um`` (None without mpp), ``pixel_px``.
    """
    import tifffile

    geo = GridGeometry.from_grid(grid)
    mpp = geo.mpp
    pixel_px = _pixel_px(geo, pixel_size_um)
    levels = _levels(geo.shape0, pixel_px, tile)
    if levels[0][1] * levels[0][2] > 2**31:
        raise ExportError(
            f"pixel size {pixel_px * (mpp or 1):g}: output of {levels[0][1:]} px is too large"
        )
    n = len(channel_names)
    dtype = np.dtype(dtype)
    total = sum(n * math.ceil(h / tile) * math.ceil(w / tile) for _, h, w in levels)
    tick = _ticker(total, progress, cancel)
    phys = pixel_px * mpp if mpp else None
    meta = _ome_metadata(channel_names, name, description, phys)
    opts: dict[str, Any] = {
        "tile": (tile, tile),
        "dtype": dtype,
        "photometric": "minisblack",
        "compression": "zlib",
    }
    with (
        writing(dst, overwrite=overwrite, what="OME-TIFF") as tmp,
        tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif,
    ):
        for k, level in enumerate(levels):
            if phys:  # pixels per cm of this level
                opts.update(resolution=(1e4 / (level[0] * mpp),) * 2, resolutionunit="CENTIMETER")
            data = _tiles(planes, n, geo, level, dtype=dtype, fill=fill, tile=tile, tick=tick)
            shape = (n, level[1], level[2])
            if k == 0:  # full resolution: the OME metadata, the coarser levels as SubIFDs
                tif.write(data, shape=shape, subifds=len(levels) - 1, metadata=meta, **opts)
            else:
                tif.write(data, shape=shape, subfiletype=1, metadata=None, **opts)
    report(progress, total, total, "OME-TIFF written")
    return {
        "shape": (n, levels[0][1], levels[0][2]),
        "levels": len(levels),
        "pixel_size_um": phys,
        "pixel_px": pixel_px,
    }


def _pixel_px(geo: GridGeometry, pixel_size_um: float | None) -> float:
    """The output pixel size in level-0 px: ``pixel_size_um`` (needs an mpp) or the default."""
    if pixel_size_um is None:
        return default_pixel_px(geo)
    if not (
        isinstance(pixel_size_um, int | float)
        and math.isfinite(pixel_size_um)
        and pixel_size_um > 0
    ):
        raise ExportError(f"pixel size {pixel_size_um!r} µm: must be a positive number")
    if not geo.mpp:
        raise ExportError("pixel size in µm: the slide has no pixel size (mpp); leave it unset")
    return pixel_size_um / geo.mpp


def _ticker(
    total: int, progress: ProgressCallback | None, cancel: CancelToken | None
) -> Callable[[], None]:
    """Called once per tile: every 64 tiles, checks ``cancel`` and reports progress."""
    done = [0]

    def tick() -> None:
        done[0] += 1
        if done[0] % 64 == 0:
            check_cancel(cancel, "OME-TIFF export")
            report(progress, done[0], total, "writing OME-TIFF")

    return tick


def _ome_metadata(
    channel_names: Sequence[str], name: str, description: str, phys: float | None
) -> dict[str, Any]:
    """tifffile's OME metadata: axes, image name, channel names, physical pixel size (µm)."""
    meta: dict[str, Any] = {"axes": "CYX", "Name": name, "Channel": {"Name": list(channel_names)}}
    if phys:
        meta.update(
            PhysicalSizeX=phys, PhysicalSizeXUnit="µm", PhysicalSizeY=phys, PhysicalSizeYUnit="µm"
        )
    if description:
        meta["Description"] = description
    return meta


def export_heatmaps_ome_tiff(
    predictions: Any,
    dst: str | os.PathLike,
    *,
    genes: Sequence[str] | None = None,
    slide: Any = None,
    **options: Unpack[GridTiffOptions],
) -> ExportResult:
    """Predicted expression as a pyramidal float32 OME-TIFF, one channel per gene.

    Parameters
    ----------
    predictions
        A ``PredictionStore``, its path, or :class:`~napari_stpredict.export.Predictions`.
    dst
        Target ``.ome.tif``.
    genes
        Channels to write (default: every gene of the model).
    slide
        Unused except as provenance (name); geometry comes from the store's grid.
    **options
        ``pixel_size_um`` (default: one pixel per grid cell when the grid allows it),
        ``overwrite``, ``progress``, ``cancel`` (:class:`GridTiffOptions`).

    Returns
    -------
    ExportResult
        Unpredicted cells are NaN; ``partial`` says whether there are any.

    Raises
    ------
    ExportError
        Nothing predicted, unknown genes, existing target without ``overwrite``, unwritable folder.
    """
    pred = as_predictions(predictions)
    idx = pred.gene_indices(genes)
    mask = pred.require("OME-TIFF export")
    names = [pred.genes[i] for i in idx]
    title = Path(str(getattr(slide, "path", "") or pred.slide_path or "slide")).name
    info = write_grid_ome_tiff(
        dst,
        lambda c: pred.plane(idx[c]),
        names,
        pred.grid,
        dtype=np.float32,
        fill=np.nan,
        name=f"{title} predicted expression",
        description="napari-stpredict predicted log-normalised expression; NaN = not predicted",
        **options,
    )
    c, h, w = info["shape"]
    px = f"{info['pixel_size_um']:.4g} µm/px" if info["pixel_size_um"] else "no mpp"
    return ExportResult(
        Path(dst),
        "ome-tiff",
        pred.n_cells,
        int(mask.sum()),
        f"{c} genes, {w}×{h} px at {px}, {info['levels']} levels",
        info,
    )


def export_tumor_mask_ome_tiff(
    tumor: Any,
    dst: str | os.PathLike,
    *,
    grid: Any,
    **options: Unpack[GridTiffOptions],
) -> ExportResult:
    """The tumour mask as a uint8 OME-TIFF (1 = tumour, 0 = not) aligned with the slide.

    Parameters
    ----------
    tumor
        A :class:`~napari_stpredict.tumor.TumorMap` or a (gh, gw) bool mask.
    grid
        The ``TileGrid`` of the mask.
    **options
        ``pixel_size_um``, ``overwrite``, ``progress``, ``cancel`` (:class:`GridTiffOptions`).
    """
    mask = np.asarray(getattr(tumor, "mask", tumor), dtype=bool)
    geo = GridGeometry.from_grid(grid)
    if mask.shape != geo.shape:
        raise ExportError(f"tumour mask: shape {mask.shape} differs from the grid {geo.shape}")
    scored = getattr(getattr(tumor, "score", None), "predicted", None)
    n_pred = int(np.asarray(scored).sum()) if scored is not None else mask.size
    info = write_grid_ome_tiff(
        dst,
        lambda _c: mask.astype(np.uint8),
        ["Tumor"],
        grid,
        dtype=np.uint8,
        fill=0,
        name="tumour mask",
        description="napari-stpredict tumour mask: 1 = tumour",
        **options,
    )
    _, h, w = info["shape"]
    return ExportResult(
        Path(dst),
        "mask-ome-tiff",
        mask.size,
        n_pred,
        f"{int(mask.sum())} tumour cells, {w}×{h} px",
        info,
    )
