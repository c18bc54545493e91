"""The slide image of a SpatialData export: which resolution, and the multiscale element.

Part of :mod:`napari_stpredict.export.spatialdata` (the names are importable from there); the
``spatialdata`` imports happen inside the functions (optional extra).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from napari_stpredict.export._common import ExportError

#: default resolution of the image copy: the coarsest resolution at or below this (µm/px)
DEFAULT_IMAGE_MPP = 2.0
#: without mpp: the image copy's longest side is at most this (px)
DEFAULT_IMAGE_SIDE = 8192
_MIN_PYRAMID_SIDE = 512


def _level_shapes(slide: Any) -> list[tuple[int, int]]:
    return [(int(a.shape[0]), int(a.shape[1])) for a in slide.levels]


def image_plan(
    slide: Any, image: int | str | None = "auto", *, image_mpp: float = DEFAULT_IMAGE_MPP
) -> tuple[int, int] | None:
    """``(level, extra integer downsample)`` of the image copy, or ``None`` for no image.

    ``image="auto"``: the coarsest stored level whose resolution is ≤ ``image_mpp`` µm/px,
    further coarsened by the largest integer factor that keeps it ≤ ``image_mpp`` (a slide
    without mpp: longest side ≤ :data:`DEFAULT_IMAGE_SIDE`). An integer picks that stored level
    as it is.
    """
    if image is None or image is False or (isinstance(image, str) and image.lower() == "none"):
        return None
    shapes = _level_shapes(slide)
    h0, w0 = shapes[0]
    if isinstance(image, bool):  # True = auto
        image = "auto"
    if isinstance(image, str) and image.lower() != "auto":
        try:
            image = int(image)
        except ValueError:
            raise ExportError(
                f"image {image!r}: expected 'auto', 'none' or a slide level number"
            ) from None
    if isinstance(image, (int, np.integer)):
        if not 0 <= int(image) < len(shapes):
            raise ExportError(
                f"image level {int(image)}: the slide has levels 0..{len(shapes) - 1}"
            )
        return int(image), 1
    if not (image_mpp > 0 and math.isfinite(image_mpp)):
        raise ExportError(f"image_mpp {image_mpp!r}: expected a positive number")
    mpp = getattr(slide, "mpp", None)
    best = 0
    for k, (h, w) in enumerate(shapes):
        ds = max(h0 / h, w0 / w)
        ok = (mpp * ds <= image_mpp * 1.001) if mpp else (max(h, w) >= DEFAULT_IMAGE_SIDE)
        if ok or k == 0:
            best = k
    h, w = shapes[best]
    ds = max(h0 / h, w0 / w)
    if mpp:
        factor = max(1, math.floor(image_mpp / (mpp * ds) * 1.001))
    else:
        factor = max(1, math.ceil(max(h, w) / DEFAULT_IMAGE_SIDE))
    return best, factor


def _image_element(
    slide: Any, level: int, factor: int, mpp: float | None, coordinate_system: str
) -> Any:
    import dask.array as da
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale

    h0, w0 = _level_shapes(slide)[0]
    arr = slide.levels[level]
    h, w = int(arr.shape[0]), int(arr.shape[1])
    dsy, dsx = h0 / h, w0 / w
    if factor > 1:
        arr = da.coarsen(np.mean, arr, {0: factor, 1: factor}, trim_excess=True).astype(np.uint8)
        dsy, dsx = dsy * factor, dsx * factor
    arr = arr.rechunk((1024, 1024, 3)).transpose(2, 0, 1)  # (c, y, x)
    unit = mpp or 1.0
    side = max(arr.shape[1:])
    scale_factors = []
    while side / 2 >= _MIN_PYRAMID_SIDE and len(scale_factors) < 8:
        scale_factors.append(2)
        side /= 2
    return Image2DModel.parse(
        arr,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=scale_factors or None,
        transformations={coordinate_system: Scale([dsy * unit, dsx * unit], axes=("y", "x"))},
    ), (level, factor, dsy, dsx)


def image_element(
    slide: Any, plan: tuple[int, int], mpp: float | None, coordinate_system: str
) -> tuple[Any, dict[str, Any]]:
    """The image element of ``plan`` (see :func:`image_plan`) and what it is.

    Returns the ``Image2DModel`` placed in ``coordinate_system`` (µm with an mpp) and
    ``{"level", "coarsen", "downsample", "mpp"}``.
    """
    element, (lvl, factor, dsy, dsx) = _image_element(
        slide, plan[0], plan[1], mpp, coordinate_system
    )
    return element, {
        "level": lvl,
        "coarsen": factor,
        "downsample": [dsy, dsx],
        "mpp": [dsy * mpp, dsx * mpp] if mpp else None,
    }
