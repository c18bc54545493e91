"""A publication figure of a slide region: H&E, a heatmap, a colour bar and a scale bar.

The colour bar is the legend: gene name and unit (``ln(1 + counts per 10,000)``), with limits
fixed by default to the gene's 1st–99th percentile in the model's training data (as in the
napari viewer), so the same colour means the same value in every figure of every slide.

Rendered with matplotlib's Agg canvas (no pyplot, no GUI backend: safe in worker threads and
on headless servers). The slide is read at the figure's own resolution
(:meth:`Slide.read_resampled`), so memory is bounded by the figure, not the slide.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_stpredict.export._common import ExportError, ExportResult, expression_units, writing
from napari_stpredict.export._predictions import as_predictions
from napari_stpredict.export.tables import model_provenance
from napari_stpredict.tumor.regions import mask_to_polygons

_MAX_PIXELS = 12000  # longest side of the rendered figure


def nice_length(span: float) -> float:
    """A 1-2-5 × 10^k length close to a fifth of ``span`` (scale bar length)."""
    if not (span > 0 and math.isfinite(span)):
        return 1.0
    target = span / 5
    k = math.floor(math.log10(target))
    for m in (5, 2, 1):
        if m * 10**k <= target:
            return float(m * 10**k)
    return float(10**k)


def training_limits(model: Any, gene: str, pred: Any = None) -> tuple[float, float] | None:
    """The gene's ``(p01, p99)`` in the model's training data, or ``None`` when unknown."""
    from napari_stpredict.model.header import model_info

    fallback = getattr(pred, "model_path", None) if pred is not None else None
    try:
        info = model_info(model, fallback=fallback, best_effort=True)
        stats, genes = info.gene_stats(), info.genes
    except Exception:  # provenance is best effort: fall back to the figure's own values
        return None
    if not stats or gene not in genes or "p01" not in stats or "p99" not in stats:
        return None
    i = genes.index(gene)
    lo, hi = float(stats["p01"][i]), float(stats["p99"][i])
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return None
    return lo, hi


def _region(
    region: Sequence[float] | None, shape0: tuple[int, int]
) -> tuple[float, float, float, float]:
    if region is None:
        return 0.0, 0.0, float(shape0[0]), float(shape0[1])
    try:
        y0, x0, y1, x1 = (float(v) for v in region)
    except (TypeError, ValueError):
        raise ExportError(
            f"figure region {region!r}: expected (y0, x0, y1, x1) in level-0 px"
        ) from None
    y0, y1 = sorted((max(0.0, y0), min(float(shape0[0]), y1)))
    x0, x1 = sorted((max(0.0, x0), min(float(shape0[1]), x1)))
    if y1 - y0 < 1 or x1 - x0 < 1:
        raise ExportError(f"figure region {tuple(region)}: empty or outside the slide {shape0}")
    return y0, x0, y1, x1


def export_figure(
    predictions: Any,
    dst: str | os.PathLike,
    *,
    gene: str,
    slide: Any = None,
    region: Sequence[float] | None = None,
    dpi: int = 150,
    width_in: float = 7.0,
    cmap: str = "inferno",  # as the napari heatmaps
    alpha: float = 0.6,
    vmin: float | None = None,
    vmax: float | None = None,
    tumor: Any = None,
    title: str | None = None,
    model: Any = None,
    overwrite: bool = False,
) -> ExportResult:
    """Write a PNG figure of a slide region with one gene's heatmap.

    Parameters
    ----------
    predictions
        ``PredictionStore``, its path or :class:`Predictions`.
    gene
        The gene drawn.
    slide
        The ``Slide`` drawn underneath (optional: heatmap only without it).
    region
        ``(y0, x0, y1, x1)`` level-0 px (e.g. the napari view); default: the whole slide.
    dpi, width_in
        Output resolution and figure width in inches.
    cmap, alpha, vmin, vmax
        Heatmap colours (default limits: the gene's 1st–99th percentile in the model's training
        data; without those, of the predicted tiles shown).
    tumor
        Optional :class:`~napari_stpredict.tumor.TumorMap` or bool mask: regions outlined in
        cyan.

    Raises
    ------
    ExportError
        Nothing predicted in the region, unknown gene, bad dpi/region, existing target.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    pred = as_predictions(predictions)
    if not (isinstance(dpi, int | float) and 10 <= dpi <= 2400):
        raise ExportError(f"dpi {dpi!r}: expected a number between 10 and 2400")
    if not (0 < width_in <= 60):
        raise ExportError(f"figure width {width_in!r} in: expected 0 < width ≤ 60")
    if not 0.0 <= alpha <= 1.0:
        raise ExportError(f"alpha {alpha!r}: expected a value in [0, 1]")
    (g,) = pred.gene_indices([gene])
    done = pred.require("figure export")
    geo = pred.geometry
    y0, x0, y1, x1 = _region(region, geo.shape0)
    # cells whose heatmap square meets the region
    ia, ja = geo.cell_index(np.array([y0]), np.array([x0]))
    ib, jb = geo.cell_index(np.array([y1 - 1e-6]), np.array([x1 - 1e-6]))
    i0, j0 = max(int(ia[0]), 0), max(int(ja[0]), 0)
    i1, j1 = min(int(ib[0]) + 1, geo.shape[0]), min(int(jb[0]) + 1, geo.shape[1])
    if i1 <= i0 or j1 <= j0 or not done[i0:i1, j0:j1].any():
        raise ExportError(
            f"figure export: no predicted cells in the region {(y0, x0, y1, x1)} (predict it first)"
        )
    heat = np.asarray(pred.values[g, i0:i1, j0:j1], dtype=np.float32)
    heat = np.where(done[i0:i1, j0:j1], heat, np.nan)
    finite = heat[np.isfinite(heat)]
    fixed = training_limits(model, gene, pred) if vmin is None or vmax is None else None
    if fixed is None:
        fixed = (float(np.percentile(finite, 1)), float(np.percentile(finite, 99)))
    lo = fixed[0] if vmin is None else float(vmin)
    hi = fixed[1] if vmax is None else float(vmax)
    if hi <= lo:
        hi = lo + 1e-6

    mpp = geo.mpp
    unit, k = ("µm", mpp) if mpp else ("px", 1.0)
    # axes data coordinates: µm (or px) from the slide's top-left corner
    s = geo.stride_px
    hy0, hx0 = geo.origin_y + (i0 - 0.5) * s, geo.origin_x + (j0 - 0.5) * s
    hy1, hx1 = geo.origin_y + (i1 - 0.5) * s, geo.origin_x + (j1 - 0.5) * s
    aspect = (y1 - y0) / (x1 - x0)
    ax_w = width_in * 0.78
    height_in = max(2.0, ax_w * aspect + 0.8)
    if max(width_in, height_in) * dpi > _MAX_PIXELS:
        raise ExportError(
            f"figure of {width_in:g}×{height_in:.3g} in at {dpi} dpi: larger than {_MAX_PIXELS} px"
        )
    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.02, 0.4 / height_in, 0.78, (height_in - 0.8) / height_in))
    if slide is not None:
        out_w = max(1, min(int(ax_w * dpi), int(x1 - x0)))
        out_h = max(1, round(out_w * aspect))
        img = slide.read_resampled(y0, x0, y1 - y0, x1 - x0, out_shape=(out_h, out_w))
        ax.imshow(img, extent=(x0 * k, x1 * k, y1 * k, y0 * k), interpolation="lanczos")
    else:
        ax.set_facecolor("white")
    norm = Normalize(lo, hi)
    im = ax.imshow(
        np.ma.masked_invalid(heat),
        extent=(hx0 * k, hx1 * k, hy1 * k, hy0 * k),
        cmap=cmap,
        norm=norm,
        alpha=alpha if slide is not None else 1.0,
        interpolation="nearest",
    )
    if tumor is not None:
        # exact cell-edge outlines (the GeoJSON polygons), not marching-squares corners
        mask = np.asarray(getattr(tumor, "mask", tumor), dtype=bool)
        for poly in mask_to_polygons(mask, geo):
            for part in getattr(poly, "geoms", [poly]):
                for ring in (part.exterior, *part.interiors):
                    xy = np.asarray(ring.coords) * k
                    ax.plot(xy[:, 0], xy[:, 1], color="cyan", linewidth=1.2)
        ax.plot([], [], color="cyan", linewidth=1.2, label="tumour regions")
        ax.legend(loc="upper left", fontsize=8, framealpha=0.7)
    ax.set_xlim(x0 * k, x1 * k)
    ax.set_ylim(y1 * k, y0 * k)
    ax.set_xticks([])
    ax.set_yticks([])
    length = nice_length((x1 - x0) * k)
    label = f"{length:g} {unit}" if length < 1000 or unit != "µm" else f"{length / 1000:g} mm"
    bar = AnchoredSizeBar(
        ax.transData,
        length,
        label,
        "lower right",
        pad=0.4,
        color="black",
        frameon=True,
        size_vertical=(y1 - y0) * k / 150,
        label_top=True,
    )
    bar.patch.set_alpha(0.7)
    ax.add_artist(bar)
    cax = fig.add_axes(
        (
            0.83,
            0.4 / height_in + 0.1 * (height_in - 0.8) / height_in,
            0.03,
            0.8 * (height_in - 0.8) / height_in,
        )
    )
    cb = fig.colorbar(im, cax=cax)
    units = expression_units(model_provenance(model, pred))
    cb.set_label(f"{gene}: predicted {units}")
    cb.solids.set_alpha(1.0)
    name = (
        title
        if title is not None
        else f"{gene}"
        + (f" — {Path(str(getattr(slide, 'path', ''))).name}" if slide is not None else "")
    )
    if name:
        ax.set_title(name, fontsize=10)
    with writing(dst, overwrite=overwrite, what="PNG figure") as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    n_in = int(done[i0:i1, j0:j1].sum())
    px = (round(width_in * dpi), round(height_in * dpi))
    counts: dict[str, Any] = {}
    if pred.tissue is not None:  # "partial" = tissue tiles of the region not predicted
        tissue_in = pred.tissue[i0:i1, j0:j1]
        counts = {
            "n_expected": int(tissue_in.sum()),
            "n_missing": int((tissue_in & ~done[i0:i1, j0:j1]).sum()),
        }
    return ExportResult(
        Path(dst),
        "png",
        (i1 - i0) * (j1 - j0),
        n_in,
        f"{gene}, {px[0]}×{px[1]} px at {dpi:g} dpi, scale bar {label}",
        **counts,
    )
