"""Several exports of one slide's predictions into one folder (the CLI and cohort runs)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from napari_stpredict.export._common import ExportError, ExportResult
from napari_stpredict.export._predictions import as_predictions
from napari_stpredict.progress import CancelToken, ProgressCallback, check_cancel, report

#: Export kinds and their file names (``{name}`` = the slide's name).
EXPORT_KINDS: dict[str, str] = {
    "h5ad": "{name}.h5ad",
    "csv": "{name}.csv",
    "ome-tiff": "{name}_heatmaps.ome.tif",
    "geojson": "{name}_tumor.geojson",
    "mask-ome-tiff": "{name}_tumor_mask.ome.tif",
    "png": "{name}_{gene}.png",
}
_TUMOR_KINDS = ("geojson", "mask-ome-tiff")


def _kinds(kinds: str | Iterable[str]) -> list[str]:
    items = kinds.split(",") if isinstance(kinds, str) else list(kinds)
    out: list[str] = []
    for raw in items:
        k = raw.strip().lower().replace("_", "-")
        k = {
            "ome-tif": "ome-tiff",
            "tiff": "ome-tiff",
            "figure": "png",
            "mask": "mask-ome-tiff",
        }.get(k, k)
        if not k:
            continue
        if k not in EXPORT_KINDS:
            raise ExportError(
                f"export {raw.strip()!r}: unknown (choose from {', '.join(EXPORT_KINDS)})"
            )
        if k not in out:
            out.append(k)
    if not out:
        raise ExportError("exports: nothing to export (empty list)")
    return out


def export_predictions(
    predictions: Any,
    out_dir: str | os.PathLike,
    *,
    name: str,
    kinds: str | Iterable[str] = ("h5ad", "ome-tiff", "geojson"),
    genes: Sequence[str] | None = None,
    slide: Any = None,
    model: Any = None,
    tumor: Any = "auto",
    gene_set: Any = None,
    threshold: float | str = "otsu",
    tissue: Any = None,
    figure_gene: str | None = None,
    dpi: int = 150,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> list[ExportResult]:
    """Write the requested exports of one slide into ``out_dir``.

    Parameters
    ----------
    predictions
        ``PredictionStore``, its path or :class:`Predictions`.
    out_dir
        Existing, writable folder.
    name
        File name stem (see :data:`EXPORT_KINDS`).
    kinds
        Any of ``h5ad, csv, ome-tiff, geojson, mask-ome-tiff, png`` (list or comma-separated).
    genes
        Genes in the h5ad/CSV/OME-TIFF (default all) and measured in the GeoJSON.
    slide, model
        The ``Slide`` (thumbnails, figure background, provenance) and model (Predictor,
        metadata or path; default: the store's record) — model statistics z-score the tumour.
    tumor
        A :class:`~napari_stpredict.tumor.TumorMap`, ``None`` (no tumour columns) or ``"auto"``:
        computed with ``gene_set``/``threshold``/``tissue`` when a tumour export (GeoJSON,
        mask) is requested, and then also added to the h5ad/CSV.
    figure_gene
        Gene of the PNG figure (default: the first of ``genes`` or of the model).

    Returns
    -------
    list of ExportResult
        One per export, in the order asked.

    Raises
    ------
    ExportError
        Unknown kind, nothing predicted, an existing file without ``overwrite`` (checked for
        every target before anything is written), unwritable folder.
    """
    from napari_stpredict.io_utils import check_target

    todo = _kinds(kinds)
    pred = as_predictions(predictions)
    pred.require("export")
    folder = Path(out_dir)
    if not folder.is_dir():
        raise ExportError(f"{folder}: output folder does not exist")
    safe = re.sub(r"[^\w.\-]+", "_", name).strip("._") or "slide"
    gene_for_fig = figure_gene or (genes[0] if genes else pred.genes[0])
    targets = {
        k: folder / EXPORT_KINDS[k].format(name=safe, gene=re.sub(r"[^\w.\-]+", "_", gene_for_fig))
        for k in todo
    }
    for t in targets.values():
        check_target(t, overwrite=overwrite)
    if isinstance(tumor, str):
        if tumor != "auto":
            raise ExportError(f"tumor={tumor!r}: expected a TumorMap, None or 'auto'")
        tumor = None
        if any(k in _TUMOR_KINDS for k in todo):
            from napari_stpredict.tumor import tumor_map_for_store

            tumor = tumor_map_for_store(
                pred, gene_set=gene_set, threshold=threshold, tissue=tissue, model=model
            )
    elif tumor is None and any(k in _TUMOR_KINDS for k in todo):
        raise ExportError("tumour exports need a tumour map (pass tumor= or 'auto')")
    results: list[ExportResult] = []
    for n, k in enumerate(todo):
        check_cancel(cancel, "export")
        report(progress, n, len(todo), f"exporting {k}")
        dst = targets[k]
        results.append(
            _one(
                k,
                pred,
                dst,
                genes=genes,
                slide=slide,
                model=model,
                tumor=tumor,
                gene=gene_for_fig,
                dpi=dpi,
                overwrite=overwrite,
                cancel=cancel,
            )
        )
    report(progress, len(todo), len(todo), "exports written")
    return results


def _one(
    kind: str,
    pred: Any,
    dst: Path,
    *,
    genes,
    slide,
    model,
    tumor,
    gene: str,
    dpi: int,
    overwrite: bool,
    cancel,
) -> ExportResult:
    from napari_stpredict import export as ex

    if kind == "h5ad":
        return ex.export_h5ad(
            pred,
            dst,
            genes=genes,
            tumor=tumor,
            slide=slide,
            model=model,
            overwrite=overwrite,
            cancel=cancel,
        )
    if kind == "csv":
        return ex.export_csv(
            pred, dst, genes=genes, tumor=tumor, overwrite=overwrite, cancel=cancel
        )
    if kind == "ome-tiff":
        return ex.export_heatmaps_ome_tiff(
            pred, dst, genes=genes, slide=slide, overwrite=overwrite, cancel=cancel
        )
    if kind == "geojson":
        prov: Mapping[str, Any] = {
            "slide": pred.slide_path or str(getattr(slide, "path", "") or "")
        }
        return ex.export_tumor_geojson(
            tumor, dst, predictions=pred, genes=genes, provenance=dict(prov), overwrite=overwrite
        )
    if kind == "mask-ome-tiff":
        return ex.export_tumor_mask_ome_tiff(
            tumor, dst, grid=pred.grid, overwrite=overwrite, cancel=cancel
        )
    return ex.export_figure(
        pred, dst, gene=gene, slide=slide, tumor=tumor, model=model, dpi=dpi, overwrite=overwrite
    )
