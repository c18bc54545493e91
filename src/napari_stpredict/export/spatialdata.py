"""Predictions as one SpatialData ``.zarr`` (scverse: spatialdata, napari-spatialdata, squidpy).

The store holds, all placed in one coordinate system ``global`` in micrometres (level-0 slide
pixels × mpp; pixels when the slide has no mpp):

=====================  ===================================================================
``shapes/tiles``       one circle per predicted tile, centred on the tile, diameter = the
                       grid stride (the square each prediction stands for); geometry in
                       level-0 slide pixels with a ``Scale(mpp)`` transformation
``tables/predictions`` AnnData annotating ``tiles`` (``region``/``instance_id``): ``X`` the
                       predicted expression, ``obs`` tile id, grid ``i``/``j``, tumour score
                       and call, ``layers["spread"]`` the per-gene uncertainty when the model
                       has it, ``obsm["spatial"]`` tile centres in level-0 px, ``uns`` the
                       model (name, method, SHA-256), slide and grid
``shapes/tumor_regions`` tumour regions as polygons (level-0 px, same transformation), with
                       cells, area and mean tumour score per region
``images/slide``       the slide as a multiscale image at a chosen resolution (default the
                       coarsest ≤ 2 µm/px), ``Scale(mpp × downsample)``
=====================  ===================================================================

Needs the optional extra ``pip install 'napari-stpredict[spatialdata]'``; without it
:func:`export_spatialdata` raises one line saying so. Nothing here imports Qt or napari.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_stpredict import __version__
from napari_stpredict.export._common import (
    ExportError,
    ExportResult,
    expression_units,
    h5_safe,
    json_safe,
    writing,
)
from napari_stpredict.export._predictions import as_predictions
from napari_stpredict.export._spatialdata_image import (  # noqa: F401 (DEFAULT_*: re-exported)
    DEFAULT_IMAGE_MPP,
    DEFAULT_IMAGE_SIDE,
    image_element,
    image_plan,
)
from napari_stpredict.io_utils import MARKER_ATTR, check_free_space, check_target
from napari_stpredict.progress import CancelToken, ProgressCallback, check_cancel, report

#: pip extra that brings spatialdata, spatialdata-io (and napari-spatialdata for viewing)
EXTRA = "spatialdata"
INSTALL_HINT = "pip install 'napari-stpredict[spatialdata]'"
#: element names in the written store
IMAGE, TILES, TUMOR, TABLE = "slide", "tiles", "tumor_regions", "predictions"
#: coordinate system every element is placed in (µm when the slide has an mpp)
COORDINATE_SYSTEM = "global"


def have_spatialdata() -> bool:
    """Whether the optional ``spatialdata`` package is installed (nothing is imported)."""
    from importlib.util import find_spec

    return find_spec("spatialdata") is not None


def missing_extra_message(what: str) -> str:
    """The one line telling which extra to install for ``what``."""
    return f"{what} needs the optional extra: {INSTALL_HINT}"


def require_spatialdata(what: str = "the spatialdata export") -> None:
    """Raise :class:`ExportError` (one line naming the extra) when spatialdata is missing."""
    if not have_spatialdata():
        raise ExportError(missing_extra_message(what))


# --------------------------------------------------------------------------------------------
# build


def predictions_to_spatialdata(
    predictions: Any,
    *,
    genes: Sequence[str] | None = None,
    tumor: Any = None,
    slide: Any = None,
    model: Any = None,
    image: int | str | None = "auto",
    image_mpp: float = DEFAULT_IMAGE_MPP,
    cancel: CancelToken | None = None,
) -> Any:
    """Predictions (+ tumour regions, + slide image) as a ``spatialdata.SpatialData``.

    Parameters
    ----------
    predictions
        A ``PredictionStore``, its path or :class:`~napari_stpredict.export.Predictions`.
    genes
        Genes in the table (default all).
    tumor
        A :class:`~napari_stpredict.tumor.TumorMap` (score column + region polygons), a
        (gh, gw) bool mask, ``None`` or ``"auto"`` (computed with the default tumour signature
        when the model predicts it; left out otherwise).
    slide
        The ``Slide`` for the image element; without it there is no image.
    model
        Predictor, metadata or path (provenance in ``uns``); default: the store's record.
    image, image_mpp
        ``"auto"`` (default: coarsest resolution ≤ ``image_mpp`` µm/px), a stored level
        number, or ``None`` for no image.

    Raises
    ------
    ExportError
        spatialdata not installed, nothing predicted, unknown genes, bad image level.
    """
    require_spatialdata()
    from spatialdata import SpatialData

    from napari_stpredict.export.tables import _gathered, _selection, _tumor_arrays, cell_table

    pred, idx, done, names = _selection(predictions, genes, "spatialdata export")
    geo = pred.geometry
    plan = image_plan(slide, image, image_mpp=image_mpp) if slide is not None else None
    if isinstance(tumor, str):
        if tumor != "auto":
            raise ExportError(f"tumor={tumor!r}: expected a TumorMap, a mask, None or 'auto'")
        tumor = _auto_tumor(pred, model)
    mask, score = _tumor_arrays(tumor, geo.shape)

    cells, x = _gathered(pred, idx, done, cancel, "spatialdata export")
    spread = _spread(pred, idx, cells) if getattr(pred, "path", None) is not None else None
    to_cs = _to_coordinate_system(geo.mpp)
    columns = _table_columns(cells)
    table = cell_table(
        cells, x, names, geo, mask=mask, score=score, columns=columns, index_name="tile"
    )
    if spread is not None:
        table.layers["spread"] = spread
    prov = _provenance(pred, geo, done, model=model, slide=slide, spread=spread, tumor=tumor)
    table.uns["stpredict"] = h5_safe(prov)
    table = _parse_table(table)

    shapes = {TILES: _tiles(cells, geo, to_cs)}
    if mask is not None:
        regions = _tumor_polygons(mask, pred, score)
        if regions is not None:
            shapes[TUMOR] = _shapes(regions, to_cs)
    images, image_info = {}, None
    if plan is not None:
        check_cancel(cancel, "spatialdata export")
        images[IMAGE], image_info = image_element(slide, plan, geo.mpp, COORDINATE_SYSTEM)
    sdata = SpatialData(images=images, shapes=shapes, tables={TABLE: table})
    sdata.attrs[MARKER_ATTR] = json_safe(
        {"owner": "napari-stpredict", "kind": "spatialdata", "version": __version__}
    )
    sdata.attrs["stpredict"] = json_safe({**prov, "image": image_info})
    return sdata


def _to_coordinate_system(mpp: float | None) -> Any:
    """Level-0 px → the coordinate system: µm with an mpp, level-0 pixels without."""
    from spatialdata.transformations import Identity, Scale

    return Scale([mpp, mpp], axes=("x", "y")) if mpp else Identity()


def _shapes(frame: Any, to_cs: Any) -> Any:
    from spatialdata.models import ShapesModel

    return ShapesModel.parse(frame, transformations={COORDINATE_SYSTEM: to_cs})


def _tiles(cells: np.ndarray, geo: Any, to_cs: Any) -> Any:
    """One circle per predicted tile: centred on it, diameter = the grid stride."""
    import geopandas as gpd
    import pandas as pd
    from shapely import points

    n = len(cells)
    yc, xc = geo.centers_px(cells[:, 0], cells[:, 1])
    tiles = gpd.GeoDataFrame(
        {"radius": np.full(n, geo.stride_px / 2.0), "tile_id": [f"{i}_{j}" for i, j in cells]},
        geometry=points(np.stack([xc, yc], axis=1)),
        index=pd.RangeIndex(n, name="instance_id"),
    )
    return _shapes(tiles, to_cs)


def _table_columns(cells: np.ndarray) -> dict[str, Any]:
    """The table's first ``obs`` columns: rows annotate the ``tiles`` shapes by instance id."""
    import pandas as pd

    n = len(cells)
    return {
        "region": pd.Categorical([TILES] * n),
        "instance_id": np.arange(n, dtype=np.int64),
        "tile_id": [f"{i}_{j}" for i, j in cells],
    }


def _parse_table(table: Any) -> Any:
    from spatialdata.models import TableModel

    return TableModel.parse(table, region=TILES, region_key="region", instance_key="instance_id")


def _provenance(
    pred: Any, geo: Any, done: np.ndarray, *, model: Any, slide: Any, spread: Any, tumor: Any
) -> dict[str, Any]:
    """``uns["stpredict"]`` of the table (and the store's attrs): model, slide, grid, units."""
    from napari_stpredict.export.tables import model_provenance, slide_provenance

    mpp = geo.mpp
    model_info = model_provenance(model, pred)
    slide_info = slide_provenance(slide, pred)
    prov: dict[str, Any] = {
        "software": f"napari-stpredict {__version__}",
        "model": model_info,
        "model_name": Path(model_info.get("path") or "model").name,
        "model_sha256": model_info.get("content_sha256", ""),
        "slide": slide_info,
        "grid": geo.source.to_dict() if hasattr(geo.source, "to_dict") else {},
        "store": str(pred.path or ""),
        "units": expression_units(model_info),
        "coordinate_system": COORDINATE_SYSTEM,
        "coordinate_units": "micrometer" if mpp else "level-0 pixel",
        "geometry_units": "level-0 slide pixels (x, y); transformation to the coordinate system",
        "tile_diameter_px": float(geo.stride_px),
        "tile_diameter_um": float(geo.stride_px * mpp) if mpp else None,
        "n_grid_cells": pred.n_cells,
        "n_predicted": int(done.sum()),
        "has_spread": spread is not None,
    }
    if hasattr(tumor, "to_dict"):
        prov["tumor"] = tumor.to_dict()
    return prov


def _auto_tumor(pred: Any, model: Any) -> Any:
    """Best effort: the default tumour map, or ``None`` when the model cannot score it."""
    from napari_stpredict.errors import StPredictError
    from napari_stpredict.tumor import tumor_map_for_store

    try:
        return tumor_map_for_store(pred, model=model, tissue=pred.tissue)
    except (StPredictError, ValueError):
        return None


def _spread(pred: Any, idx: list[int], cells: np.ndarray) -> np.ndarray | None:
    """Per-gene spread of the predicted cells from a store that has it."""
    try:
        from napari_stpredict.inference.store import PredictionStore

        store = PredictionStore.from_path(pred.path)
    except Exception:  # not a store folder (arrays passed in): no spread
        return None
    arr = getattr(store, "spread", None)
    if arr is None:
        return None
    out = np.empty((len(cells), len(idx)), dtype=np.float32)
    for k, g in enumerate(idx):
        plane = np.asarray(arr[g], dtype=np.float32)
        out[:, k] = plane[cells[:, 0], cells[:, 1]]
    return out


def _tumor_polygons(mask: np.ndarray, pred: Any, score: np.ndarray | None) -> Any:
    import geopandas as gpd

    from napari_stpredict.tumor.regions import tumor_regions

    if not mask.any():
        return None
    regs = tumor_regions(mask, pred.grid, score=score)
    if not regs:
        return None
    geoms, rows = [], []
    for r in regs:
        g = r.geometry
        if g.geom_type not in ("Polygon", "MultiPolygon"):
            polys = [p for p in getattr(g, "geoms", []) if p.geom_type == "Polygon"]
            if not polys:
                continue
            from shapely.geometry import MultiPolygon

            g = MultiPolygon(polys)
        geoms.append(g)
        rows.append(
            {
                "region_label": int(r.label),
                "n_tiles": int(r.n_cells),
                "area_um2": float(r.measurements.get("Area µm^2", np.nan)),
                "tumor_score_mean": float(r.measurements.get("Tumor score mean", np.nan)),
            }
        )
    if not geoms:
        return None
    return gpd.GeoDataFrame(rows, geometry=geoms)


# --------------------------------------------------------------------------------------------
# write


def export_spatialdata(
    predictions: Any,
    dst: str | os.PathLike,
    *,
    genes: Sequence[str] | None = None,
    tumor: Any = "auto",
    slide: Any = None,
    model: Any = None,
    image: int | str | None = "auto",
    image_mpp: float = DEFAULT_IMAGE_MPP,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> ExportResult:
    """Write predictions as one SpatialData ``.zarr`` folder (see the module docstring).

    The store is written under a temporary name in the target's folder and renamed; an
    existing target is replaced only with ``overwrite`` and only when we wrote it.

    Raises
    ------
    ExportError
        spatialdata not installed, nothing predicted, unknown genes, bad image level,
        existing target without ``overwrite``, unwritable folder.
    """
    require_spatialdata()
    dst = Path(dst)
    if dst.suffix.lower() != ".zarr":
        raise ExportError(f"{dst}: a SpatialData store must end in .zarr")
    check_target(dst, overwrite=overwrite)
    report(progress, 0, 3, "collecting predictions")
    sdata = predictions_to_spatialdata(
        predictions,
        genes=genes,
        tumor=tumor,
        slide=slide,
        model=model,
        image=image,
        image_mpp=image_mpp,
        cancel=cancel,
    )
    table = sdata.tables[TABLE]
    n_img = 0
    if IMAGE in sdata.images:
        img = sdata.images[IMAGE]
        first = img["scale0"]["image"] if hasattr(img, "children") else img
        n_img = int(np.prod(first.shape))
    report(progress, 1, 3, "writing SpatialData")
    with writing(dst, overwrite=overwrite, what="SpatialData store") as tmp:
        check_free_space(tmp.parent, int(table.X.nbytes * 1.2) + n_img // 2 + (8 << 20), "store")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # spatialdata's own deprecation/format chatter
            sdata.write(tmp, overwrite=False)
        check_cancel(cancel, "spatialdata export")
    report(progress, 3, 3, "SpatialData written")
    st = table.uns["stpredict"]
    parts = [f"{table.n_obs} tiles × {table.n_vars} genes"]
    if TUMOR in sdata.shapes:
        parts.append(f"{len(sdata.shapes[TUMOR])} tumour regions")
    if IMAGE in sdata.images:
        parts.append("image")
    pred = as_predictions(predictions)
    return ExportResult(
        dst,
        "spatialdata",
        int(st["n_grid_cells"]),
        int(st["n_predicted"]),
        ", ".join(parts),
        **pred.result_counts(),
    )
