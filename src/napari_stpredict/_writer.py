"""npe2 writers: *File → Save Selected Layers* for heatmaps and the tumour layer.

- :func:`write_heatmaps_ome_tiff` — selected heatmap Image layers → one pyramidal OME-TIFF
  (one channel per gene) aligned with the slide, read from the prediction store named in the
  layers' ``metadata["stpredict"]`` (not from the screen arrays).
- :func:`write_tumor_geojson` — a tumour Labels layer → QuPath GeoJSON, with the mean
  predicted expression of the store's genes in each region.

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
        what = "heatmap" if kind == "heatmap" else "tumour"
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
