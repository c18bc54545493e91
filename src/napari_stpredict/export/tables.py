"""Per-cell predictions as AnnData ``.h5ad`` (scanpy / squidpy) and CSV.

One row (observation) per *predicted* grid cell; unpredicted cells are left out. Coordinates
are cell centres in level-0 pixels, ``obsm["spatial"] = [x, y]`` as scanpy and squidpy expect
(the Visium convention: full-resolution image pixels). ``uns["spatial"][library_id]`` holds
Visium-style ``scalefactors`` (and small ``hires``/``lowres`` images of the slide when the
slide is given) so ``sc.pl.spatial`` / ``sq.pl.spatial_scatter`` draw it directly.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict, Unpack

import numpy as np

from napari_stpredict import __version__
from napari_stpredict.export._common import (
    ExportError,
    ExportResult,
    expression_units,
    h5_safe,
    writing,
)
from napari_stpredict.export._predictions import Predictions, as_predictions
from napari_stpredict.io_utils import check_free_space
from napari_stpredict.progress import CancelToken, ProgressCallback, check_cancel, report

_ROW_BLOCK = 32  # grid rows read at a time: memory ~ genes × 32 × grid width
HIRES_MAX = 2000  # Visium hires image size
LOWRES_MAX = 600  # Visium lowres image size

_MODEL_KEYS = (
    "method",
    "backbone",
    "normalization",
    "patch_um",
    "patch_px",
    "top_k",
    "training_sections",
    "package_version",
    "created",
    "content_sha256",
)


def model_provenance(model: Any, pred: Predictions | None = None) -> dict[str, Any]:
    """Facts about the model: a Predictor, its metadata dict, a model file path or ``None``.

    ``None`` falls back to the model path recorded in the prediction store (header read only).
    """
    from napari_stpredict.model.header import model_info

    # provenance is best effort: a moved model file must not stop an export
    info = model_info(
        model, fallback=pred.model_path if pred is not None else None, best_effort=True
    )
    meta, path = info.metadata, info.path
    rec = pred.info.get("model", {}) if pred is not None else {}
    out: dict[str, Any] = {k: meta[k] for k in _MODEL_KEYS if k in meta}
    out["path"] = str(path or (rec.get("path") if isinstance(rec, Mapping) else "") or "")
    if isinstance(rec, Mapping) and rec.get("key"):
        out["key"] = rec["key"]
    return out


def slide_provenance(slide: Any, pred: Predictions | None = None) -> dict[str, Any]:
    """Facts about the slide (a ``Slide`` or ``None`` → what the store recorded)."""
    rec = pred.info.get("slide", {}) if pred is not None else {}
    rec = rec if isinstance(rec, Mapping) else {"path": rec}
    out: dict[str, Any] = {"path": str(rec.get("path", "") or "")}
    if rec.get("fingerprint"):
        out["fingerprint"] = rec["fingerprint"]
    if slide is not None:
        out["path"] = str(getattr(slide, "path", out["path"]))
        for k in ("format", "mpp"):
            v = getattr(slide, k, None)
            if v is not None:
                out[k] = v
        shape = getattr(slide, "shape", None)
        if shape is not None:
            out["shape"] = [int(shape[0]), int(shape[1])]
    if pred is not None:
        geo = pred.geometry
        out.setdefault("shape", list(geo.shape0))
        if geo.mpp:
            out.setdefault("mpp", geo.mpp)
    return out


def _selection(
    predictions: Any, genes: Sequence[str] | None, what: str
) -> tuple[Predictions, list[int], np.ndarray, list[str]]:
    """The predictions, the indices and names of ``genes`` and the predicted-cell mask;
    nothing predicted or an unknown gene is an :class:`ExportError` naming ``what``."""
    pred = as_predictions(predictions)
    idx = pred.gene_indices(genes)
    done = pred.require(what)
    return pred, idx, done, [pred.genes[i] for i in idx]


def _gathered(
    pred: Predictions, idx: list[int], done: np.ndarray, cancel: CancelToken | None, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Every predicted cell ``(n, 2)`` and its values ``(n, len(idx))`` float32 (see
    :func:`_blocks`), checking ``cancel`` between blocks."""
    cells_l, vals_l = [], []
    for cells, vals in _blocks(pred, idx, done):
        check_cancel(cancel, what)
        cells_l.append(cells)
        vals_l.append(vals)
    return np.concatenate(cells_l), np.concatenate(vals_l).astype(np.float32)


def _blocks(
    pred: Predictions, idx: list[int], done: np.ndarray
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(cells (n, 2), values (n, len(idx))) of the predicted cells, a few grid rows at a time."""
    gh, _ = done.shape
    sel = np.asarray(idx)
    contiguous = len(idx) == len(pred.genes) and np.array_equal(sel, np.arange(len(idx)))
    for r0 in range(0, gh, _ROW_BLOCK):
        r1 = min(r0 + _ROW_BLOCK, gh)
        d = done[r0:r1]
        if not d.any():
            continue
        if contiguous:
            block = np.asarray(pred.values[:, r0:r1, :], dtype=np.float32)
        else:
            block = np.stack([np.asarray(pred.values[i, r0:r1, :], dtype=np.float32) for i in idx])
        ii, jj = np.nonzero(d)
        yield np.stack([ii + r0, jj], axis=1), block[:, ii, jj].T


def _tumor_arrays(
    tumor: Any, shape: tuple[int, int]
) -> tuple[np.ndarray | None, np.ndarray | None]:
    if tumor is None:
        return None, None
    mask = np.asarray(getattr(tumor, "mask", tumor), dtype=bool)
    if mask.shape != shape:
        raise ExportError(f"tumour mask: shape {mask.shape} differs from the grid {shape}")
    score = getattr(getattr(tumor, "score", None), "score", None)
    return mask, (np.asarray(score, dtype=np.float32) if score is not None else None)


def predictions_to_anndata(
    predictions: Any,
    *,
    genes: Sequence[str] | None = None,
    tumor: Any = None,
    slide: Any = None,
    model: Any = None,
    library_id: str | None = None,
    images: bool = True,
    cancel: CancelToken | None = None,
) -> Any:
    """Predicted cells as an AnnData (see the module docstring for the layout).

    Parameters
    ----------
    predictions
        A ``PredictionStore``, its path or :class:`Predictions`.
    genes
        Genes to include (default: all).
    tumor
        Optional :class:`~napari_stpredict.tumor.TumorMap` (or bool mask): adds
        ``obs["tumor_score"]`` and ``obs["tumor"]``.
    slide
        Optional ``Slide``: provenance and the ``hires``/``lowres`` images when ``images``.
    model
        Predictor, model metadata dict or model file path (provenance); default: the store's.
    library_id
        Key under ``uns["spatial"]`` (default: the slide file's stem).

    Raises
    ------
    ExportError
        Nothing predicted; unknown genes.
    """
    pred, idx, done, names = _selection(predictions, genes, "h5ad export")
    geo = pred.geometry
    mask, score = _tumor_arrays(tumor, geo.shape)
    cells, x = _gathered(pred, idx, done, cancel, "h5ad export")
    adata = cell_table(cells, x, names, geo, mask=mask, score=score)
    slide_info = slide_provenance(slide, pred)
    model_info = model_provenance(model, pred)
    lib = (
        library_id
        or (Path(slide_info["path"]).stem if slide_info.get("path") else "slide")
        or "slide"
    )
    adata.uns["spatial"] = {lib: _visium_library(slide if images else None, geo.stride_px)}
    provenance = {
        "software": f"napari-stpredict {__version__}",
        "slide": slide_info,
        "model": model_info,
        "grid": geo.source.to_dict()
        if hasattr(geo.source, "to_dict")
        else {"shape": list(geo.shape)},
        "store": str(pred.path or ""),
        "units": expression_units(model_info),
        "coordinates": "obsm['spatial'] = cell centres [x, y] in level-0 slide pixels",
        "n_grid_cells": pred.n_cells,
        "n_predicted": int(done.sum()),
        "partial": pred.n_missing() > 0,
    }
    if pred.tissue is not None:
        provenance["n_expected"] = pred.n_expected()
        provenance["n_missing"] = pred.n_missing()
    if hasattr(tumor, "to_dict"):
        provenance["tumor"] = tumor.to_dict()
    adata.uns["stpredict"] = h5_safe(provenance)
    return adata


def cell_table(
    cells: np.ndarray,
    values: np.ndarray,
    genes: Sequence[str],
    geo: Any,
    *,
    mask: np.ndarray | None,
    score: np.ndarray | None,
    columns: Mapping[str, Any] | None = None,
    index_name: str = "cell",
) -> Any:
    """An AnnData of predicted cells: one row per cell of ``cells`` ``(n, 2)``.

    ``X`` = ``values`` ``(n, len(genes))``; ``obs`` = ``columns`` (first, in order), grid
    ``i``/``j``, then ``tumor_score``/``tumor`` when ``score``/``mask`` are given, indexed by
    ``"{i}_{j}"``; ``obsm["spatial"]`` = cell centres ``[x, y]`` in level-0 px (float64).
    Shared by the h5ad and the SpatialData table.
    """
    import anndata as ad
    import pandas as pd

    ids = [f"{i}_{j}" for i, j in cells]
    obs = pd.DataFrame(
        {**(columns or {}), "i": cells[:, 0].astype(np.int32), "j": cells[:, 1].astype(np.int32)},
        index=pd.Index(ids, name=index_name),
    )
    if score is not None:
        obs["tumor_score"] = score[cells[:, 0], cells[:, 1]].astype(np.float32)
    if mask is not None:
        obs["tumor"] = mask[cells[:, 0], cells[:, 1]]
    adata = ad.AnnData(X=values, obs=obs, var=pd.DataFrame(index=pd.Index(genes, name="gene")))
    yc, xc = geo.centers_px(cells[:, 0], cells[:, 1])
    adata.obsm["spatial"] = np.stack([xc, yc], axis=1).astype(np.float64)
    return adata


def _visium_library(slide: Any, stride_px: float) -> dict[str, Any]:
    """``uns["spatial"][library_id]``: Visium-style scale factors, thumbnails of ``slide``."""
    scalef: dict[str, float] = {"spot_diameter_fullres": float(stride_px)}
    imgs: dict[str, np.ndarray] = {}
    if slide is not None:
        for key, side in (("hires", HIRES_MAX), ("lowres", LOWRES_MAX)):
            img, f = _thumbnail(slide, side)
            imgs[key] = img
            scalef[f"tissue_{key}_scalef"] = f
    else:
        scalef["tissue_hires_scalef"] = 1.0  # images absent; scanpy still finds the key
    return {
        "images": imgs,
        "scalefactors": scalef,
        "metadata": {"source": "napari-stpredict", "software_version": __version__},
    }


def _thumbnail(slide: Any, side: int) -> tuple[np.ndarray, float]:
    h0, w0 = (int(v) for v in slide.shape[:2])
    f = min(1.0, side / max(h0, w0))
    oh, ow = max(1, round(h0 * f)), max(1, round(w0 * f))
    img = np.asarray(slide.read_resampled(0, 0, h0, w0, out_shape=(oh, ow)), dtype=np.uint8)
    return img, ow / w0


class AnnDataOptions(TypedDict, total=False):
    """What :func:`export_h5ad` passes on to :func:`predictions_to_anndata` (defaults there)."""

    genes: Sequence[str] | None
    tumor: Any
    slide: Any
    model: Any
    library_id: str | None
    images: bool
    cancel: CancelToken | None


def export_h5ad(
    predictions: Any,
    dst: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    **options: Unpack[AnnDataOptions],
) -> ExportResult:
    """Write per-cell predictions as ``.h5ad``.

    ``options`` (``genes``, ``tumor``, ``slide``, ``model``, ``library_id``, ``images``,
    ``cancel``) are those of :func:`predictions_to_anndata`.

    Raises
    ------
    ExportError
        Nothing predicted, unknown genes, existing target without ``overwrite``, unwritable
        folder.
    """
    from napari_stpredict.io_utils import check_target

    check_target(dst, overwrite=overwrite)  # fail before the work
    report(progress, 0, 2, "collecting predictions")
    adata = predictions_to_anndata(predictions, **options)
    report(progress, 1, 2, "writing h5ad")
    image = h5ad_bytes(adata)
    with writing(dst, overwrite=overwrite, what="h5ad file") as tmp:
        check_free_space(tmp, len(image) + (1 << 20), "h5ad file")
        with open(tmp, "wb") as fh:
            fh.write(image)
            fh.flush()
            os.fsync(fh.fileno())
    report(progress, 2, 2, "h5ad written")
    st = adata.uns["stpredict"]
    return ExportResult(
        Path(dst),
        "h5ad",
        int(st["n_grid_cells"]),
        int(st["n_predicted"]),
        f"{adata.n_obs} tiles × {adata.n_vars} genes",
        **(
            {"n_expected": int(st["n_expected"]), "n_missing": int(st["n_missing"])}
            if "n_expected" in st
            else {}
        ),
    )


def h5ad_bytes(adata: Any) -> bytes:
    """The ``.h5ad`` file image of ``adata``, built in memory.

    HDF5 crashes the process (segfault) when the disk fills during a write; building the file
    in memory and writing its bytes with plain Python I/O turns a full disk into an ordinary
    ``OSError`` (one line, temporary removed) instead.
    """
    import io

    import h5py
    from anndata.io import write_elem

    adata.strings_to_categoricals()
    bio = io.BytesIO()
    with h5py.File(bio, "w") as f:
        write_elem(f, "/", adata, dataset_kwargs={"compression": "gzip"})
    return bio.getvalue()


def export_csv(
    predictions: Any,
    dst: str | os.PathLike,
    *,
    genes: Sequence[str] | None = None,
    tumor: Any = None,
    overwrite: bool = False,
    float_format: str = "%.6g",
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> ExportResult:
    """Write per-cell predictions as CSV, streaming a few grid rows at a time.

    Columns: ``i, j`` (grid cell), ``x_px, y_px`` (cell centre, level-0 px), ``x_um, y_um``
    (when the slide has an mpp), ``tumor_score, tumor`` (with ``tumor``), then one column per
    gene (predicted log-normalised expression). Only predicted cells are written.
    """
    pred, idx, done, names = _selection(predictions, genes, "CSV export")
    geo = pred.geometry
    mask, score = _tumor_arrays(tumor, geo.shape)
    header = ["i", "j", "x_px", "y_px"]
    if geo.mpp:
        header += ["x_um", "y_um"]
    if score is not None:
        header.append("tumor_score")
    if mask is not None:
        header.append("tumor")
    header += names
    n = 0
    total = int(done.sum())
    with (
        writing(dst, overwrite=overwrite, what="CSV file") as tmp,
        open(tmp, "w", newline="", encoding="utf-8") as fh,
    ):
        w = csv.writer(fh)
        w.writerow(header)
        for cells, vals in _blocks(pred, idx, done):
            check_cancel(cancel, "CSV export")
            yc, xc = geo.centers_px(cells[:, 0], cells[:, 1])
            cols: list[np.ndarray] = [cells[:, 0], cells[:, 1], xc, yc]
            if geo.mpp:
                cols += [xc * geo.mpp, yc * geo.mpp]
            if score is not None:
                cols.append(score[cells[:, 0], cells[:, 1]])
            if mask is not None:
                cols.append(mask[cells[:, 0], cells[:, 1]].astype(np.int8))
            fmt_cols = [_fmt(c, float_format) for c in cols] + [
                _fmt(vals[:, k], float_format) for k in range(vals.shape[1])
            ]
            w.writerows(zip(*fmt_cols, strict=True))
            n += len(cells)
            report(progress, n, total, "writing CSV")
    return ExportResult(
        Path(dst),
        "csv",
        pred.n_cells,
        total,
        f"{n} tiles × {len(names)} genes",
        **pred.result_counts(),
    )


def _fmt(col: np.ndarray, float_format: str) -> list[str]:
    if np.issubdtype(col.dtype, np.integer) or col.dtype == bool:
        return [str(int(v)) for v in col]
    return ["" if not math.isfinite(v) else float_format % v for v in col.tolist()]
