"""A thresholded tumour map: score + settings + mask, the unit the exports consume."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_stpredict.tumor.mask import (
    TumorArea,
    otsu_threshold,
    smooth_score,
    tumor_area,
    tumor_mask,
)
from napari_stpredict.tumor.score import TumorScore, score_store
from napari_stpredict.tumor.signature import Signature, TumorError


@dataclass
class TumorMap:
    """A tumour score thresholded into a mask on the prediction grid.

    Attributes
    ----------
    score
        The raw score (kept so a new threshold needs no model call).
    threshold
        The cut applied to the (smoothed) score.
    mask
        (gh, gw) bool, tumour cells.
    method
        ``"otsu"`` or ``"manual"``.
    smooth, min_size
        Gaussian sigma (cells) applied before the threshold; smallest region kept (cells).
    tissue
        (gh, gw) bool cells counted as tissue, or ``None`` (= scored cells).
    """

    score: TumorScore
    threshold: float
    mask: np.ndarray
    method: str = "manual"
    smooth: float = 0.0
    min_size: int = 0
    tissue: np.ndarray | None = None

    def tissue_cells(self) -> np.ndarray:
        """Cells counted as tissue: scored cells, within ``tissue`` when given."""
        t = self.score.predicted
        return t if self.tissue is None else t & np.asarray(self.tissue, dtype=bool)

    def area(self, grid: Any) -> TumorArea:
        """Tumour and tissue area on ``grid``."""
        return tumor_area(self.mask, grid, tissue=self.tissue_cells())

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly settings (provenance for exports and layer metadata)."""
        return {
            "genes": list(self.score.genes),
            "weights": list(self.score.weights),
            "missing_genes": list(self.score.missing),
            "reference": self.score.reference,
            "threshold": float(self.threshold),
            "threshold_method": self.method,
            "smooth_sigma_cells": float(self.smooth),
            "min_size_cells": int(self.min_size),
            "n_tumor_cells": int(self.mask.sum()),
        }


def threshold_score(
    score: TumorScore,
    *,
    threshold: float | str = "otsu",
    tissue: np.ndarray | None = None,
    smooth: float = 0.0,
    min_size: int = 0,
) -> TumorMap:
    """Threshold a :class:`TumorScore` (``threshold="otsu"``: Otsu on scored tissue cells).

    Raises
    ------
    TumorError
        A manual threshold outside the score range, nothing scored, bad options.
    """
    if isinstance(threshold, str):
        if threshold.lower() not in ("otsu", "auto"):
            raise TumorError(f"threshold: {threshold!r} must be a number or 'otsu'")
        s = smooth_score(score.score, smooth) if smooth else score.score
        t = score.predicted if tissue is None else score.predicted & np.asarray(tissue, bool)
        thr, method = otsu_threshold(s, tissue=t), "otsu"
    else:
        thr, method = float(threshold), "manual"
    mask = tumor_mask(score.score, thr, tissue=tissue, smooth=smooth, min_size=min_size)
    return TumorMap(score, thr, mask, method, float(smooth), int(min_size), tissue)


def tumor_map_for_store(
    store: Any,
    *,
    gene_set: Signature | Iterable[str] | Mapping[str, float] | str | None = None,
    weights: Sequence[float] | None = None,
    threshold: float | str = "otsu",
    tissue: np.ndarray | None = None,
    smooth: float = 0.0,
    min_size: int = 0,
    gene_stats: Mapping[str, Any] | None = None,
    model: Any = None,
) -> TumorMap:
    """Score a prediction store and threshold it in one call (CLI, scripts).

    See :func:`~napari_stpredict.tumor.score_store` and :func:`threshold_score`.
    """
    sc = score_store(store, gene_set=gene_set, weights=weights, gene_stats=gene_stats, model=model)
    return threshold_score(sc, threshold=threshold, tissue=tissue, smooth=smooth, min_size=min_size)
