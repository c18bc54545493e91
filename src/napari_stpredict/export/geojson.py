"""Tumour regions as QuPath GeoJSON annotations.

QuPath (≥ 0.4) imports a GeoJSON ``FeatureCollection`` by drag-and-drop or *File → Import
objects*. Each feature is one connected tumour region: a ``Polygon`` (with holes) or
``MultiPolygon`` in level-0 pixel coordinates ``[x, y]`` (QuPath's image coordinates), with
``properties.objectType = "annotation"``, ``properties.classification = {"name": "Tumor",
"color": [r, g, b]}`` and ``properties.measurements`` = mean predicted expression per gene in
the region (plus cell count, area and mean tumour score).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict, Unpack

import numpy as np

from napari_stpredict.export._common import ExportError, ExportResult, json_safe, writing
from napari_stpredict.export._predictions import as_predictions
from napari_stpredict.tumor.regions import GridGeometry, tumor_regions

#: QuPath's colour for the "Tumor" class (packed RGB 200, 0, 0).
TUMOR_COLOR = (200, 0, 0)


def _coords(geom: Any, ndigits: int) -> Any:
    from shapely.geometry import mapping
    from shapely.geometry.polygon import orient

    if geom.geom_type == "Polygon":
        geom = orient(geom, sign=1.0)
    elif geom.geom_type == "MultiPolygon":
        from shapely.geometry import MultiPolygon

        geom = MultiPolygon([orient(p, sign=1.0) for p in geom.geoms])
    else:  # clipping can leave lines/points of zero area: keep polygons only
        from shapely.geometry import MultiPolygon

        polys = [g for g in getattr(geom, "geoms", []) if g.geom_type == "Polygon"]
        geom = MultiPolygon([orient(p, sign=1.0) for p in polys])
    m = mapping(geom)

    def rnd(v: Any) -> Any:
        if isinstance(v, (tuple, list)) and v and isinstance(v[0], (int, float)):
            return [round(float(c), ndigits) for c in v]
        return [rnd(c) for c in v]

    return {"type": m["type"], "coordinates": rnd(m["coordinates"])}


def tumor_geojson(
    tumor: Any,
    *,
    grid: Any = None,
    predictions: Any = None,
    genes: Sequence[str] | None = None,
    name: str = "Tumor",
    color: Sequence[int] = TUMOR_COLOR,
    provenance: dict[str, Any] | None = None,
    ndigits: int = 2,
) -> dict[str, Any]:
    """Build the QuPath GeoJSON ``FeatureCollection`` of tumour regions.

    Parameters
    ----------
    tumor
        A :class:`~napari_stpredict.tumor.TumorMap` (mask + score) or a (gh, gw) bool mask.
    grid
        The ``TileGrid``; default: the predictions' grid.
    predictions
        Store/:class:`Predictions` for the per-region mean expression (optional).
    genes
        Genes measured (default: all predicted genes).
    name, color
        QuPath class name and RGB colour.
    provenance
        Extra facts stored in the collection's ``"stpredict"`` member (ignored by QuPath).

    Returns
    -------
    dict
        A GeoJSON FeatureCollection (one feature per 4-connected region).
    """
    pred = as_predictions(predictions) if predictions is not None else None
    if grid is None:
        if pred is None:
            raise ExportError("GeoJSON export: give grid= or predictions=")
        grid = pred.grid
    geo = GridGeometry.from_grid(grid)
    mask = np.asarray(getattr(tumor, "mask", tumor), dtype=bool)
    if mask.shape != geo.shape:
        raise ExportError(f"tumour mask: shape {mask.shape} differs from the grid {geo.shape}")
    rgb = [int(c) for c in color]
    if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
        raise ExportError(f"colour {tuple(color)!r}: expected three values in 0..255")
    score = getattr(getattr(tumor, "score", None), "score", None)
    values = gnames = None
    if pred is not None:
        idx = pred.gene_indices(genes)
        gnames = [pred.genes[i] for i in idx]
        values = _Subset(pred, idx)
    regions = tumor_regions(mask, geo, values=values, genes=gnames, score=score)
    features = []
    for k, r in enumerate(regions, start=1):
        features.append(
            {
                "type": "Feature",
                "id": str(uuid.uuid4()),
                "geometry": _coords(r.geometry, ndigits),
                "properties": {
                    "objectType": "annotation",
                    "name": f"{name} {k}",
                    "classification": {"name": name, "color": rgb},
                    "isLocked": False,
                    # a region without predicted cells has no mean: the key is left out
                    "measurements": {
                        key: round(float(v), 6)
                        for key, v in r.measurements.items()
                        if np.isfinite(v)
                    },
                },
            }
        )
    meta = {"units": "level-0 pixels (x, y)", "grid": _grid_dict(geo)}
    if hasattr(tumor, "to_dict"):
        meta["tumor"] = tumor.to_dict()
    if provenance:
        meta.update(provenance)
    return {"type": "FeatureCollection", "features": features, "stpredict": json_safe(meta)}


class _Subset:
    """A gene subset of predictions, read one plane at a time (chunk-cached)."""

    def __init__(self, pred: Any, idx: list[int]) -> None:
        self._pred, self._idx = pred, idx
        self.shape = (len(idx), *tuple(pred.values.shape)[1:])

    def __getitem__(self, g: int) -> np.ndarray:
        return self._pred.plane(self._idx[g])


def _grid_dict(geo: GridGeometry) -> dict[str, Any]:
    src = geo.source
    if src is not None and hasattr(src, "to_dict"):
        return src.to_dict()
    return {
        "shape": list(geo.shape),
        "stride_px": geo.stride_px,
        "shape0": list(geo.shape0),
        "mpp": geo.mpp,
    }


class GeoJSONOptions(TypedDict, total=False):
    """What :func:`export_tumor_geojson` passes on to :func:`tumor_geojson` (defaults there)."""

    genes: Sequence[str] | None
    name: str
    color: Sequence[int]
    provenance: dict[str, Any] | None


def export_tumor_geojson(
    tumor: Any,
    dst: str | os.PathLike,
    *,
    grid: Any = None,
    predictions: Any = None,
    overwrite: bool = False,
    **options: Unpack[GeoJSONOptions],
) -> ExportResult:
    """Write tumour regions as QuPath GeoJSON (see :func:`tumor_geojson`).

    ``options`` (``genes``, ``name``, ``color``, ``provenance``) are those of
    :func:`tumor_geojson`. An empty mask writes an empty FeatureCollection (and says so).

    Raises
    ------
    ExportError
        Mask/grid mismatch, nothing predicted in ``predictions``, existing target without
        ``overwrite``, unwritable folder.
    """
    pred = as_predictions(predictions) if predictions is not None else None
    n_pred = int(pred.require("GeoJSON export").sum()) if pred is not None else None
    doc = tumor_geojson(tumor, grid=grid, predictions=pred, **options)
    text = json.dumps(doc, ensure_ascii=False, allow_nan=False)
    with writing(dst, overwrite=overwrite, what="GeoJSON") as tmp:
        tmp.write_text(text, encoding="utf-8")
    geo = GridGeometry.from_grid(grid if grid is not None else pred.grid)  # type: ignore[union-attr]
    n_cells = geo.shape[0] * geo.shape[1]
    scored = getattr(getattr(tumor, "score", None), "predicted", None)
    if n_pred is None:
        n_pred = int(np.asarray(scored).sum()) if scored is not None else n_cells
    n = len(doc["features"])
    detail = (
        f"{n} tumour region{'s' if n != 1 else ''}" if n else "no tumour region above the threshold"
    )
    return ExportResult(Path(dst), "geojson", n_cells, n_pred, detail, {"n_regions": n})
