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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_stpredict.export._common import ExportError, ExportResult, expression_units, writing
from napari_stpredict.export._predictions import as_predictions
from napari_stpredict.export.tables import model_provenance
from napari_stpredict.tumor.regions import mask_to_polygons

_MAX_PIXELS = 12000  # longest side of the rendered figure
_AXES_WIDTH = 0.78  # of the figure width (the colour bar takes the rest)


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


@dataclass(frozen=True)
class _View:
    """The figure's region (level-0 px), the grid cells that meet it, and the axis unit.

    The axes' data coordinates are µm (or px without mpp) from the slide's top-left corner.
    """

    y0: float
    x0: float
    y1: float
    x1: float
    i0: int
    j0: int
    i1: int
    j1: int
    k: float  # axis units (µm, or px without mpp) per level-0 px
    unit: str

    @property
    def cells(self) -> tuple[slice, slice]:
        """The ``(rows, columns)`` slices of the grid cells shown."""
        return slice(self.i0, self.i1), slice(self.j0, self.j1)

    @property
    def aspect(self) -> float:
        """Height / width of the region."""
        return (self.y1 - self.y0) / (self.x1 - self.x0)

    @property
    def limits(self) -> tuple[float, float, float, float]:
        """``(left, right, bottom, top)`` in axis units (y grows downwards, as in the slide)."""
        k = self.k
        return self.x0 * k, self.x1 * k, self.y1 * k, self.y0 * k


def _check_options(dpi: Any, width_in: float, alpha: float) -> None:
    if not (isinstance(dpi, int | float) and 10 <= dpi <= 2400):
        raise ExportError(f"dpi {dpi!r}: expected a number between 10 and 2400")
    if not (0 < width_in <= 60):
        raise ExportError(f"figure width {width_in!r} in: expected 0 < width ≤ 60")
    if not 0.0 <= alpha <= 1.0:
        raise ExportError(f"alpha {alpha!r}: expected a value in [0, 1]")


def _view(region: Sequence[float] | None, geo: Any, done: np.ndarray) -> _View:
    """The region and the cells whose heatmap square meets it (some of them predicted)."""
    y0, x0, y1, x1 = _region(region, geo.shape0)
    ia, ja = geo.cell_index(np.array([y0]), np.array([x0]))
    ib, jb = geo.cell_index(np.array([y1 - 1e-6]), np.array([x1 - 1e-6]))
    i0, j0 = max(int(ia[0]), 0), max(int(ja[0]), 0)
    i1, j1 = min(int(ib[0]) + 1, geo.shape[0]), min(int(jb[0]) + 1, geo.shape[1])
    if i1 <= i0 or j1 <= j0 or not done[i0:i1, j0:j1].any():
        raise ExportError(
            f"figure export: no predicted cells in the region {(y0, x0, y1, x1)} (predict it first)"
        )
    unit, k = ("µm", geo.mpp) if geo.mpp else ("px", 1.0)
    return _View(y0, x0, y1, x1, i0, j0, i1, j1, k, unit)


def _region_heat(pred: Any, g: int, done: np.ndarray, view: _View) -> np.ndarray:
    """The gene's values on the cells shown, float32; NaN = not predicted (transparent)."""
    heat = np.asarray(pred.values[g, view.i0 : view.i1, view.j0 : view.j1], dtype=np.float32)
    return np.where(done[view.cells], heat, np.nan)


def _colour_limits(
    heat: np.ndarray, vmin: float | None, vmax: float | None, *, model: Any, gene: str, pred: Any
) -> tuple[float, float]:
    """``vmin``/``vmax`` where given, else the training limits, else the 1st–99th percentile."""
    fixed = training_limits(model, gene, pred) if vmin is None or vmax is None else None
    if fixed is None:
        finite = heat[np.isfinite(heat)]
        fixed = (float(np.percentile(finite, 1)), float(np.percentile(finite, 99)))
    lo = fixed[0] if vmin is None else float(vmin)
    hi = fixed[1] if vmax is None else float(vmax)
    if hi <= lo:
        hi = lo + 1e-6
    return lo, hi


def _figure_height(width_in: float, aspect: float, dpi: float) -> float:
    """Inches: the axes keep the region's aspect, plus margins; refused over the pixel limit."""
    height_in = max(2.0, width_in * _AXES_WIDTH * aspect + 0.8)
    if max(width_in, height_in) * dpi > _MAX_PIXELS:
        raise ExportError(
            f"figure of {width_in:g}×{height_in:.3g} in at {dpi} dpi: larger than {_MAX_PIXELS} px"
        )
    return height_in


def _new_figure(width_in: float, height_in: float, dpi: float) -> tuple[Any, Any]:
    """An Agg figure (no pyplot, no GUI backend) and the axes of the map, left of the colour bar."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.02, 0.4 / height_in, _AXES_WIDTH, (height_in - 0.8) / height_in))
    return fig, ax


def _frame_axes(ax: Any, view: _View) -> None:
    """Axes limits = the region, no ticks (the scale bar gives the size)."""
    left, right, bottom, top = view.limits
    ax.set_xlim(left, right)
    ax.set_ylim(bottom, top)
    ax.set_xticks([])
    ax.set_yticks([])


def _draw_slide(ax: Any, slide: Any, view: _View, axes_px: int) -> None:
    """The H&E of the region, read at the axes' own resolution (white without a slide)."""
    if slide is None:
        ax.set_facecolor("white")
        return
    w0, h0 = view.x1 - view.x0, view.y1 - view.y0
    out_w = max(1, min(axes_px, int(w0)))
    out_h = max(1, round(out_w * view.aspect))
    img = slide.read_resampled(view.y0, view.x0, h0, w0, out_shape=(out_h, out_w))
    ax.imshow(img, extent=view.limits, interpolation="lanczos")


def _draw_heatmap(
    ax: Any,
    heat: np.ndarray,
    extent: tuple[float, float, float, float],
    cmap: str,
    limits: tuple[float, float],
    alpha: float,
) -> Any:
    """The heatmap, one square per cell; unpredicted (NaN) cells are transparent."""
    from matplotlib.colors import Normalize

    return ax.imshow(
        np.ma.masked_invalid(heat),
        extent=extent,
        cmap=cmap,
        norm=Normalize(*limits),
        alpha=alpha,
        interpolation="nearest",
    )


def _heat_extent(geo: Any, view: _View) -> tuple[float, float, float, float]:
    """Axis extent of the heatmap cells: each cell's square is one stride around its centre."""
    s, k = geo.stride_px, view.k
    hy0, hx0 = geo.origin_y + (view.i0 - 0.5) * s, geo.origin_x + (view.j0 - 0.5) * s
    hy1, hx1 = geo.origin_y + (view.i1 - 0.5) * s, geo.origin_x + (view.j1 - 0.5) * s
    return hx0 * k, hx1 * k, hy1 * k, hy0 * k


def _draw_tumor_outlines(ax: Any, tumor: Any, geo: Any, k: float) -> None:
    """Exact cell-edge outlines (the GeoJSON polygons), not marching-squares corners."""
    mask = np.asarray(getattr(tumor, "mask", tumor), dtype=bool)
    for poly in mask_to_polygons(mask, geo):
        for part in getattr(poly, "geoms", [poly]):
            for ring in (part.exterior, *part.interiors):
                xy = np.asarray(ring.coords) * k
                ax.plot(xy[:, 0], xy[:, 1], color="cyan", linewidth=1.2)
    ax.plot([], [], color="cyan", linewidth=1.2, label="tumour regions")
    ax.legend(loc="upper left", fontsize=8, framealpha=0.7)


def _add_scale_bar(ax: Any, view: _View) -> str:
    """A 1-2-5 scale bar in the lower right corner; returns its label."""
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    length = nice_length((view.x1 - view.x0) * view.k)
    unit = view.unit
    label = f"{length:g} {unit}" if length < 1000 or unit != "µm" else f"{length / 1000:g} mm"
    bar = AnchoredSizeBar(
        ax.transData,
        length,
        label,
        "lower right",
        pad=0.4,
        color="black",
        frameon=True,
        size_vertical=(view.y1 - view.y0) * view.k / 150,
        label_top=True,
    )
    bar.patch.set_alpha(0.7)
    ax.add_artist(bar)
    return label


def _add_colour_bar(fig: Any, image: Any, height_in: float, label: str) -> None:
    """The legend: a colour bar right of the axes, 80 % of their height."""
    axes_h = (height_in - 0.8) / height_in
    cax = fig.add_axes((0.83, 0.4 / height_in + 0.1 * axes_h, 0.03, 0.8 * axes_h))
    cb = fig.colorbar(image, cax=cax)
    cb.set_label(label)
    cb.solids.set_alpha(1.0)


def _default_title(gene: str, slide: Any) -> str:
    if slide is None:
        return f"{gene}"
    return f"{gene}" + f" — {Path(str(getattr(slide, 'path', ''))).name}"


def _region_counts(pred: Any, done: np.ndarray, view: _View) -> dict[str, Any]:
    """``n_expected``/``n_missing`` of the region's tissue tiles (empty without tissue)."""
    if pred.tissue is None:
        return {}
    tissue_in = pred.tissue[view.cells]  # "partial" = tissue tiles of the region not predicted
    return {
        "n_expected": int(tissue_in.sum()),
        "n_missing": int((tissue_in & ~done[view.cells]).sum()),
    }


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
    pred = as_predictions(predictions)
    _check_options(dpi, width_in, alpha)
    (g,) = pred.gene_indices([gene])
    done = pred.require("figure export")
    geo = pred.geometry
    view = _view(region, geo, done)
    heat = _region_heat(pred, g, done, view)
    lo, hi = _colour_limits(heat, vmin, vmax, model=model, gene=gene, pred=pred)

    height_in = _figure_height(width_in, view.aspect, dpi)
    fig, ax = _new_figure(width_in, height_in, dpi)
    _draw_slide(ax, slide, view, int(width_in * _AXES_WIDTH * dpi))
    im = _draw_heatmap(
        ax, heat, _heat_extent(geo, view), cmap, (lo, hi), alpha if slide is not None else 1.0
    )
    if tumor is not None:
        _draw_tumor_outlines(ax, tumor, geo, view.k)
    _frame_axes(ax, view)
    label = _add_scale_bar(ax, view)
    units = expression_units(model_provenance(model, pred))
    _add_colour_bar(fig, im, height_in, f"{gene}: predicted {units}")
    heading = title if title is not None else _default_title(gene, slide)
    if heading:
        ax.set_title(heading, fontsize=10)
    with writing(dst, overwrite=overwrite, what="PNG figure") as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    size = f"{round(width_in * dpi)}×{round(height_in * dpi)} px at {dpi:g} dpi"
    return ExportResult(
        Path(dst),
        "png",
        (view.i1 - view.i0) * (view.j1 - view.j0),
        int(done[view.cells].sum()),
        f"{gene}, {size}, scale bar {label}",
        **_region_counts(pred, done, view),
    )
