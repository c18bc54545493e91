"""Threshold a grid score into a tumour mask; Otsu; smoothing; area."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_stpredict.tumor.regions import GridGeometry
from napari_stpredict.tumor.signature import TumorError


def score_range(score: np.ndarray, *, tissue: np.ndarray | None = None) -> tuple[float, float]:
    """(min, max) of the finite score (within ``tissue`` if given).

    Raises
    ------
    TumorError
        Nothing scored.
    """
    s = np.asarray(score, dtype=np.float64)
    ok = np.isfinite(s) if tissue is None else np.isfinite(s) & np.asarray(tissue, bool)
    if not ok.any():
        raise TumorError("tumour score: no scored cells (nothing predicted yet)")
    v = s[ok]
    return float(v.min()), float(v.max())


def otsu_threshold(
    score: np.ndarray, *, tissue: np.ndarray | None = None, nbins: int = 256
) -> float:
    """Otsu's threshold of the finite scores on tissue cells.

    Raises
    ------
    TumorError
        Fewer than two distinct scored values.
    """
    from skimage.filters import threshold_otsu

    s = np.asarray(score, dtype=np.float64)
    ok = np.isfinite(s) if tissue is None else np.isfinite(s) & np.asarray(tissue, bool)
    v = s[ok]
    if v.size < 2 or np.ptp(v) == 0:
        raise TumorError(
            f"auto threshold: needs at least two different scores ({v.size} scored cells)"
        )
    return float(threshold_otsu(v, nbins=nbins))


def smooth_score(score: np.ndarray, sigma: float) -> np.ndarray:
    """NaN-aware Gaussian smoothing of a grid score (``sigma`` in cells; 0 = unchanged).

    Unscored cells stay NaN and do not pull their neighbours towards zero.
    """
    s = np.asarray(score, dtype=np.float32)
    if sigma <= 0:
        return s
    if sigma < 0 or not math.isfinite(sigma):
        raise TumorError(f"smoothing: sigma {sigma} must be a finite number ≥ 0")
    from scipy.ndimage import gaussian_filter

    ok = np.isfinite(s)
    num = gaussian_filter(np.where(ok, s, 0).astype(np.float64), sigma, mode="constant")
    den = gaussian_filter(ok.astype(np.float64), sigma, mode="constant")
    with np.errstate(invalid="ignore", divide="ignore"):
        out = num / den
    out[~ok] = np.nan
    return out.astype(np.float32)


def tumor_mask(
    score: np.ndarray,
    threshold: float,
    *,
    tissue: np.ndarray | None = None,
    smooth: float = 0.0,
    min_size: int = 0,
    check_range: bool = True,
) -> np.ndarray:
    """Cells whose score is ≥ ``threshold``.

    Parameters
    ----------
    score
        (gh, gw) score, NaN = not scored (never tumour).
    threshold
        Must lie within the score range (see :func:`score_range`) when ``check_range``.
    tissue
        Optional (gh, gw) bool: only tissue cells can be tumour.
    smooth
        Gaussian sigma in cells applied to the score before thresholding.
    min_size
        Connected regions (4-connectivity) smaller than this many cells are dropped.

    Returns
    -------
    numpy.ndarray
        (gh, gw) bool.

    Raises
    ------
    TumorError
        Threshold outside the score range or not finite; negative ``min_size``.
    """
    if not isinstance(threshold, int | float | np.floating | np.integer) or not math.isfinite(
        float(threshold)
    ):
        raise TumorError(f"threshold: {threshold!r} is not a finite number")
    if min_size < 0:
        raise TumorError(f"minimum region size: {min_size} must be ≥ 0")
    s = smooth_score(score, smooth) if smooth else np.asarray(score, dtype=np.float32)
    if tissue is not None:
        tissue = np.asarray(tissue, dtype=bool)
        if tissue.shape != s.shape:
            raise TumorError(
                f"tissue mask: shape {tissue.shape} differs from the score grid {s.shape}"
            )
    if check_range:
        lo, hi = score_range(s, tissue=tissue)
        if not lo <= float(threshold) <= hi:
            raise TumorError(
                f"threshold: {float(threshold):.4g} is outside the score range [{lo:.4g}, {hi:.4g}]"
            )
    with np.errstate(invalid="ignore"):
        mask = np.isfinite(s) & (s >= float(threshold))
    if tissue is not None:
        mask &= tissue
    if min_size > 1:
        from skimage.morphology import remove_small_objects

        mask = remove_small_objects(mask, max_size=min_size - 1, connectivity=1)
    return mask


@dataclass(frozen=True)
class TumorArea:
    """Tumour and tissue area of a mask."""

    tumor_mm2: float
    tissue_mm2: float
    tumor_cells: int
    tissue_cells: int
    units: str = "mm²"  # "px²" when the slide has no mpp

    @property
    def fraction(self) -> float:
        """Tumour / tissue (0..1); NaN with no tissue."""
        return self.tumor_cells / self.tissue_cells if self.tissue_cells else float("nan")

    @property
    def percent(self) -> float:
        """Tumour as % of tissue."""
        return 100.0 * self.fraction

    def text(self) -> str:
        """One-line readout for a widget or the CLI."""
        return f"tumour {self.tumor_mm2:.3g} {self.units} = {self.percent:.1f}% of {self.tissue_mm2:.3g} {self.units} tissue"


def tumor_area(mask: np.ndarray, grid: Any, *, tissue: np.ndarray | None) -> TumorArea:
    """Area of the tumour mask and of the tissue.

    Parameters
    ----------
    tissue
        (gh, gw) bool tissue cells (e.g. scored cells on tissue); ``None`` = every grid cell.

    A grid cell counts for stride × stride (cells tile the slide at the stride pitch).
    """
    geo = GridGeometry.from_grid(grid)
    m = np.asarray(mask, dtype=bool)
    t = np.ones(geo.shape, dtype=bool) if tissue is None else np.asarray(tissue, dtype=bool)
    if m.shape != geo.shape or t.shape != geo.shape:
        raise TumorError(
            f"tumour mask: shape {m.shape} / tissue {t.shape} differs from the grid {geo.shape}"
        )
    n_tumor, n_tissue = int((m & t).sum()), int(t.sum())
    if geo.mpp:
        cell, units = (geo.stride_px * geo.mpp) ** 2 / 1e6, "mm²"
    else:
        cell, units = geo.stride_px**2, "px²"
    return TumorArea(n_tumor * cell, n_tissue * cell, n_tumor, n_tissue, units)
