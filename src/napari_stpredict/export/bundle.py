"""Several exports of one slide's predictions into one folder (the CLI and cohort runs)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict, Unpack

from napari_stpredict.errors import Cancelled, StPredictError
from napari_stpredict.export._common import ExportError, ExportResult
from napari_stpredict.export._predictions import as_predictions
from napari_stpredict.io_utils import check_target, confined, safe_name
from napari_stpredict.progress import CancelToken, ProgressCallback, check_cancel, report

#: Export kinds and their file names (``{name}`` = the slide's name).
EXPORT_KINDS: dict[str, str] = {
    "h5ad": "{name}.h5ad",
    "csv": "{name}.csv",
    "ome-tiff": "{name}_heatmaps.ome.tif",
    "geojson": "{name}_tumor.geojson",
    "mask-ome-tiff": "{name}_tumor_mask.ome.tif",
    "png": "{name}_{gene}.png",
    "spatialdata": "{name}_spatialdata.zarr",
    "spatialdata-no-image": "{name}_spatialdata.zarr",
}
_TUMOR_KINDS = ("geojson", "mask-ome-tiff")


#: other spellings of export names (``--export tiff`` = ``ome-tiff``)
EXPORT_ALIASES = {
    "ome-tif": "ome-tiff",
    "ometiff": "ome-tiff",
    "tiff": "ome-tiff",
    "figure": "png",
    "mask": "mask-ome-tiff",
}


def parse_kinds(
    kinds: str | Iterable[str], known: Iterable[str], unknown: Callable[[str], Exception]
) -> list[str]:
    """Export names from ``"h5ad, tiff"`` or a list: canonical, unique, in order.

    ``unknown(raw)`` builds the error raised for a name not in ``known`` (the CLI and the API
    word it differently).
    """
    known = tuple(known)
    items = kinds.split(",") if isinstance(kinds, str) else list(kinds)
    out: list[str] = []
    for raw in items:
        k = raw.strip().lower().replace("_", "-")
        k = EXPORT_ALIASES.get(k, k)
        if not k:
            continue
        if k not in known:
            raise unknown(raw.strip())
        if k not in out:
            out.append(k)
    return out


def _kinds(kinds: str | Iterable[str]) -> list[str]:
    out = parse_kinds(
        kinds,
        EXPORT_KINDS,
        lambda raw: ExportError(f"export {raw!r}: unknown (choose from {', '.join(EXPORT_KINDS)})"),
    )
    if not out:
        raise ExportError("exports: nothing to export (empty list)")
    return out


@dataclass
class ExportReport:
    """What :func:`export_report` wrote and what it could not.

    Attributes
    ----------
    results
        One :class:`ExportResult` per export written, in the order asked.
    failed
        ``{kind: reason}`` for each export that could not be made (one line each).
    """

    results: list[ExportResult] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


class ExportOptions(TypedDict, total=False):
    """The options :func:`export_predictions` passes on to :func:`export_report` (defaults there)."""

    kinds: str | Iterable[str]
    genes: Sequence[str] | None
    slide: Any
    model: Any
    tumor: Any
    gene_set: Any
    threshold: float | str
    tissue: Any
    figure_gene: str | None
    dpi: int
    overwrite: bool
    progress: ProgressCallback | None
    cancel: CancelToken | None


def export_targets(
    out_dir: str | os.PathLike, name: str, kinds: Iterable[str], gene: str = "gene"
) -> dict[str, Path]:
    """``{kind: path}`` of each export: sanitised names, proven to lie inside ``out_dir``."""
    safe = safe_name(name)
    return {
        k: confined(
            out_dir, EXPORT_KINDS[k].format(name=safe, gene=safe_name(gene, default="gene"))
        )
        for k in kinds
    }


def export_predictions(
    predictions: Any,
    out_dir: str | os.PathLike,
    *,
    name: str,
    **options: Unpack[ExportOptions],
) -> list[ExportResult]:
    """Write the requested exports of one slide into ``out_dir``.

    Parameters
    ----------
    predictions
        ``PredictionStore``, its path or :class:`Predictions`.
    out_dir
        Existing, writable folder.
    name
        File name stem (see :data:`EXPORT_KINDS`); sanitised (``..`` or ``a/b`` never leave
        ``out_dir``).
    kinds
        Any of ``h5ad, csv, ome-tiff, geojson, mask-ome-tiff, png`` (list or comma-separated;
        default ``h5ad, ome-tiff, geojson``). Every option and its default: :func:`export_report`.
    genes
        Genes in the h5ad/CSV/OME-TIFF (default all) and measured in the GeoJSON.
    slide, model
        The ``Slide`` (thumbnails, figure background, provenance) and model (Predictor,
        metadata or path; default: the store's record) — model statistics z-score the tumour.
    tumor
        A :class:`~napari_stpredict.tumor.TumorMap`, ``None`` (no tumour columns) or ``"auto"``:
        computed with ``gene_set``/``threshold``/``tissue`` when a tumour export (GeoJSON,
        mask) is requested, and then also added to the h5ad/CSV.
    tissue
        (gh, gw) bool of the tissue tiles: exports are "partial" only when some are missing.
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
    return export_report(predictions, out_dir, name=name, keep_going=False, **options).results


def export_report(
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
    keep_going: bool = True,
    skip: Mapping[str, str] | None = None,
) -> ExportReport:
    """:func:`export_predictions`, but an export that cannot be made does not stop the others.

    With ``keep_going`` each failing export (a tumour export with a model lacking the
    signature genes, a full disk) is recorded in ``failed`` with its one-line reason and the
    next one is written; ``skip`` names exports already known not to be possible (checked up
    front) with their reason. Cancelling still raises.
    """
    todo = _kinds(kinds)
    pred = as_predictions(predictions)
    pred.set_tissue(tissue)
    pred.require("export")
    folder = Path(out_dir)
    if not folder.is_dir():
        raise ExportError(f"{folder}: output folder does not exist")
    gene_for_fig = figure_gene or (genes[0] if genes else pred.genes[0])
    targets = export_targets(folder, name, todo, gene_for_fig)
    for t in targets.values():
        check_target(t, overwrite=overwrite)
    out = ExportReport(failed={k: why for k, why in (skip or {}).items() if k in todo})
    tumor = _tumor_map(
        tumor,
        todo,
        pred,
        out,
        gene_set=gene_set,
        threshold=threshold,
        tissue=tissue,
        model=model,
        keep_going=keep_going,
    )
    write_options: dict[str, Any] = {
        "genes": genes,
        "slide": slide,
        "model": model,
        "tumor": tumor,
        "gene": gene_for_fig,
        "dpi": dpi,
        "overwrite": overwrite,
        "cancel": cancel,
    }
    for n, k in enumerate(todo):
        check_cancel(cancel, "export")
        if k in out.failed:
            continue
        report(progress, n, len(todo), f"exporting {k}")
        res = _write_one(k, pred, targets[k], out, keep_going, write_options)
        if res is not None:
            out.results.append(res)
    report(progress, len(todo), len(todo), "exports written")
    return out


def _write_one(
    kind: str,
    pred: Any,
    dst: Path,
    out: ExportReport,
    keep_going: bool,
    options: dict[str, Any],
) -> ExportResult | None:
    """Write one export; with ``keep_going`` a failure is recorded in ``out`` (``None`` back).

    Without it, our errors are raised as they are and an ``OSError`` as one line naming the
    target. Results lacking tissue counts get those of the predictions.
    """
    try:
        res = _one(kind, pred, dst, **options)
    except Cancelled:
        raise
    except (StPredictError, OSError) as err:
        if keep_going:
            out.failed[kind] = _reason(err)
            return None
        if isinstance(err, StPredictError):
            raise
        raise ExportError(f"{dst}: cannot write the {kind} export ({_reason(err)})") from None
    if pred.tissue is not None and res.n_missing is None:
        res = dataclasses.replace(res, **pred.result_counts())
    return res


def _tumor_map(
    tumor: Any,
    todo: list[str],
    pred: Any,
    out: ExportReport,
    *,
    gene_set: Any,
    threshold: float | str,
    tissue: Any,
    model: Any,
    keep_going: bool,
) -> Any:
    """The tumour map the exports use: ``tumor`` as given, or computed for ``"auto"``.

    ``"auto"`` computes it only when a tumour export is asked for (and not skipped); when it
    cannot be computed, with ``keep_going`` each tumour export is recorded as failed in ``out``.
    """
    if not isinstance(tumor, str):
        if tumor is None and any(k in _TUMOR_KINDS for k in todo):
            raise ExportError("tumour exports need a tumour map (pass tumor= or 'auto')")
        return tumor
    if tumor != "auto":
        raise ExportError(f"tumor={tumor!r}: expected a TumorMap, None or 'auto'")
    wanted = [k for k in todo if k in _TUMOR_KINDS and k not in out.failed]
    if not wanted:
        return None
    from napari_stpredict.tumor import tumor_map_for_store

    try:
        return tumor_map_for_store(
            pred, gene_set=gene_set, threshold=threshold, tissue=tissue, model=model
        )
    except (StPredictError, OSError) as err:
        if not keep_going:
            raise
        for k in wanted:
            out.failed[k] = _reason(err)
        return None


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and not isinstance(err, StPredictError):
        from napari_stpredict.io_utils import describe_os_error

        return describe_os_error(err)
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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
    if kind in ("spatialdata", "spatialdata-no-image"):
        from napari_stpredict.export.spatialdata import export_spatialdata

        return export_spatialdata(
            pred,
            dst,
            genes=genes,
            slide=slide,
            model=model,
            tumor=tumor if tumor is not None else "auto",
            image=None if kind == "spatialdata-no-image" else "auto",
            overwrite=overwrite,
            cancel=cancel,
        )
    return ex.export_figure(
        pred, dst, gene=gene, slide=slide, tumor=tumor, model=model, dpi=dpi, overwrite=overwrite
    )
