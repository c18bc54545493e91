"""Exports that other tools open: QuPath, scanpy/squidpy, any OME reader, figures.

=================================  =============================================================
:func:`export_heatmaps_ome_tiff`   predicted expression, pyramidal OME-TIFF over the slide
:func:`export_tumor_mask_ome_tiff` tumour mask (uint8) OME-TIFF over the slide
:func:`export_tumor_geojson`       tumour regions as QuPath GeoJSON annotations
:func:`export_h5ad`                per-cell AnnData (``obsm["spatial"]`` level-0 px)
:func:`export_csv`                 per-cell table
:func:`export_figure`              PNG: slide + heatmap + colour bar + scale bar
:func:`export_predictions`         several of the above into one folder (CLI, cohorts)
:func:`export_report`              the same, an export that cannot be made listed, not raised
=================================  =============================================================

Every export writes to a temporary file and renames it, refuses to overwrite unless
``overwrite=True``, and returns an :class:`ExportResult` saying what it wrote. Predictions come
from a ``PredictionStore`` (or its path); a store with nothing predicted is an
:class:`ExportError`, a partially predicted one is exported as it is (``result.partial``).
Nothing here imports Qt or napari.
"""

from __future__ import annotations

from napari_stpredict.export._common import ExportError, ExportResult
from napari_stpredict.export._predictions import Predictions, as_predictions
from napari_stpredict.export.bundle import (
    EXPORT_KINDS,
    ExportReport,
    export_predictions,
    export_report,
    export_targets,
)
from napari_stpredict.export.figure import export_figure
from napari_stpredict.export.geojson import TUMOR_COLOR, export_tumor_geojson, tumor_geojson
from napari_stpredict.export.ome_tiff import (
    export_heatmaps_ome_tiff,
    export_tumor_mask_ome_tiff,
    write_grid_ome_tiff,
)
from napari_stpredict.export.tables import export_csv, export_h5ad, predictions_to_anndata

__all__ = [
    "EXPORT_KINDS",
    "TUMOR_COLOR",
    "ExportError",
    "ExportReport",
    "ExportResult",
    "Predictions",
    "as_predictions",
    "export_csv",
    "export_figure",
    "export_h5ad",
    "export_heatmaps_ome_tiff",
    "export_predictions",
    "export_report",
    "export_targets",
    "export_tumor_geojson",
    "export_tumor_mask_ome_tiff",
    "predictions_to_anndata",
    "tumor_geojson",
    "write_grid_ome_tiff",
]
