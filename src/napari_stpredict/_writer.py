"""npe2 writers: *File → Save Selected Layers* for heatmaps and the tumour layer.

- :func:`write_heatmaps_ome_tiff` — selected heatmap Image layers → one pyramidal OME-TIFF
  (one channel per gene) aligned with the slide, read from the prediction store named in the
  layers' ``metadata["stpredict"]`` (not from the screen arrays).
- :func:`write_tumor_geojson` — a tumour Labels layer → QuPath GeoJSON, with the mean
  predicted expression of the store's genes in each region.
- :func:`write_spatialdata` — selected heatmap layers (and optionally their tumour Labels
  layer) → one SpatialData ``.zarr`` (tiles, table, tumour regions, slide image) read from the
  store; needs the optional extra ``napari-stpredict[spatialdata]``.

napari's save dialog has already confirmed overwriting, so the files are replaced (atomically).
Errors are one-line :class:`~napari_stpredict.errors.StPredictError` messages that napari shows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_stpredict.errors import StPredictError


def _stpredict(meta: Mapping[str, Any], kind: str) -> dict[str, Any]:
    m = (meta.get("metadata") or {}).get("stpredict")
    name = meta.get("name", "layer")
    if not isinstance(m, Mapping) or m.get("kind") != kind or not m.get("store"):
        what = {"heatmap": "heatmap", "uncertainty": "heatmap"}.get(kind, "tumour")
        raise StPredictError(
            f"layer {name!r}: not a napari-stpredict {what} layer (no stpredict metadata)"
        )
    return dict(m)


def write_heatmaps_ome_tiff(path: str, layer_data: Sequence[tuple[Any, dict, str]]) -> list[str]:
    """Write selected heatmap layers as a pyramidal OME-TIFF (one channel per gene).

    Parameters
    ----------
    path
        Target ``.ome.tif`` (from napari's save dialog).
    layer_data
        ``(data, meta, layer_type)`` of each selected layer; all must be heatmaps of one store.

    Returns
    -------
    list of str
        The file written.
    """
    from napari_stpredict.export import export_heatmaps_ome_tiff

    metas = [_stpredict(meta, "heatmap") for _data, meta, _kind in layer_data]
    if not metas:
        raise StPredictError(f"{path}: no layer to write")
    stores = {m["store"] for m in metas}
    if len(stores) != 1:
        raise StPredictError(
            f"{path}: the selected heatmaps come from {len(stores)} prediction stores; select one slide's"
        )
    genes = list(dict.fromkeys(str(m["gene"]) for m in metas))
    res = export_heatmaps_ome_tiff(stores.pop(), path, genes=genes, overwrite=True)
    return [str(res.path)]


def write_tumor_geojson(path: str, data: Any, meta: dict) -> list[str]:
    """Write a tumour Labels layer (tumour = label > 0) as QuPath GeoJSON.

    The grid comes from the layer metadata; region measurements (mean predicted expression
    per gene) from the prediction store when it still exists.

    Returns
    -------
    list of str
        The file written.
    """
    from napari_stpredict.export import export_tumor_geojson

    m = _stpredict(meta, "tumor")
    if not m.get("grid"):
        raise StPredictError(
            f"layer {meta.get('name', 'layer')!r}: no grid in its stpredict metadata"
        )
    mask = np.asarray(data) > 0
    predictions = m["store"] if Path(str(m["store"])).is_dir() else None
    provenance = {
        "slide": str(m.get("slide_path", "")),
        "model": str(m.get("model", "")),
        "tumor": {k: m[k] for k in ("genes", "weights", "threshold", "threshold_method") if k in m},
    }
    res = export_tumor_geojson(
        mask, path, grid=m["grid"], predictions=predictions, provenance=provenance, overwrite=True
    )
    return [str(res.path)]


def write_spatialdata(path: str, layer_data: Sequence[tuple[Any, dict, str]]) -> list[str]:
    """Write selected heatmap layers of one store as one SpatialData ``.zarr``.

    The table holds the selected genes, read from the prediction store (not the screen
    arrays); a selected tumour Labels layer of the same store gives the tumour column and
    region polygons (brush edits included), else the default signature is used when the model
    predicts it. The slide (from the layers' metadata) becomes the image element at the
    coarsest level ≤ 2 µm/px.

    Returns
    -------
    list of str
        The ``.zarr`` folder written.

    Raises
    ------
    StPredictError
        The optional extra is missing (one line naming it), no heatmap selected, layers of
        several stores, or what :func:`~napari_stpredict.export.spatialdata.export_spatialdata`
        refuses.
    """
    from napari_stpredict.export.spatialdata import (
        export_spatialdata,
        have_spatialdata,
        missing_extra_message,
    )

    if not have_spatialdata():
        raise StPredictError(missing_extra_message("the SpatialData export"))
    heat, tumors = [], []
    for data, meta, kind in layer_data:
        if kind == "labels":
            tumors.append((data, _stpredict(meta, "tumor")))
            continue
        m = (meta.get("metadata") or {}).get("stpredict") or {}
        # an uncertainty layer stands for its gene too (the spread goes in with every gene)
        heat.append(
            _stpredict(meta, "uncertainty" if m.get("kind") == "uncertainty" else "heatmap")
        )
    if not heat:
        raise StPredictError(f"{path}: select at least one heatmap layer")
    stores = {m["store"] for m in heat} | {m["store"] for _d, m in tumors}
    if len(stores) != 1:
        raise StPredictError(
            f"{path}: the selected layers come from {len(stores)} prediction stores; select one slide's"
        )
    if len(tumors) > 1:
        raise StPredictError(f"{path}: select at most one tumour layer")
    from napari_stpredict.inference.store import PredictionStore

    store = PredictionStore.from_path(stores.pop())
    first = heat[0]
    model = first.get("model") or None
    tumor: Any = "auto"
    if tumors:
        from napari_stpredict.widgets._state import TumorSpec

        data, m = tumors[0]
        tumor = TumorSpec.from_layer(data, m).tumor_map(store, model)
    slide = None
    slide_path = first.get("slide_path")
    if slide_path and Path(str(slide_path)).exists():
        from napari_stpredict.slide import open_slide

        slide = open_slide(slide_path, mpp=store.grid.mpp)
    genes = list(dict.fromkeys(str(m["gene"]) for m in heat))
    try:
        res = export_spatialdata(
            store, path, genes=genes, tumor=tumor, slide=slide, model=model, overwrite=True
        )
    finally:
        if slide is not None:
            slide.close()
    return [str(res.path)]
