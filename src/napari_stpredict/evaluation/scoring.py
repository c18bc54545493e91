"""Score one held-out section: the paper's metrics plus the tumour-localization AUROC."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from napari_stpredict.evaluation import metrics
from napari_stpredict.evaluation.markers import TUMOR_MARKERS, match_genes
from napari_stpredict.evaluation.results import SectionPrediction
from napari_stpredict.tumor.signature import EXCLUDED_LABELS
from napari_stpredict.tumor.signature import TUMOR_LABELS as _TUMOR_LABELS

__all__ = ["TUMOR_LABELS", "marker_zscore", "score_section", "tumor_positive"]

# the tumour module's vocabulary: which labels are tumour, which say nothing (left out)
TUMOR_LABELS: frozenset[str] = frozenset(_TUMOR_LABELS)
_IGNORED_LABELS: frozenset[str] = frozenset({"", "nan", "none", *EXCLUDED_LABELS})

TumorScoreFn = Callable[[np.ndarray, Sequence[str]], np.ndarray]


def tumor_positive(labels: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """``(keep, positive)`` boolean masks from pathologist spot labels.

    ``keep`` drops unlabelled and ``undetermined`` spots; ``positive`` marks tumour labels
    (:data:`TUMOR_LABELS`, case-insensitive).
    """
    lab = np.array(["" if v is None else str(v).strip().lower() for v in labels], dtype=object)
    keep = np.array([v not in _IGNORED_LABELS for v in lab], dtype=bool)
    positive = np.array([v in TUMOR_LABELS for v in lab], dtype=bool)
    return keep, positive


def marker_zscore(
    expr: np.ndarray, genes: Sequence[str], markers: Sequence[str] = TUMOR_MARKERS
) -> np.ndarray:
    """Mean z-score (across spots) of the ``markers`` found in ``genes``; NaN if none is found.

    The fallback biomarker score when :mod:`napari_stpredict.tumor` offers none.
    """
    idx, _ = match_genes(genes, markers)
    x = np.asarray(expr, dtype=np.float64)
    if not idx or x.shape[0] == 0:
        return np.full(x.shape[0], np.nan)
    sub = x[:, idx]
    sd = sub.std(axis=0)
    sd[sd == 0] = 1.0
    return ((sub - sub.mean(axis=0)) / sd).mean(axis=1)


def score_section(
    true: np.ndarray,
    pred: np.ndarray,
    genes: Sequence[str],
    *,
    section: str,
    markers: Sequence[str],
    xy: np.ndarray | None = None,
    n_top: int = 50,
    labels: Sequence | None = None,
    tumor_score: TumorScoreFn | None = None,
) -> SectionPrediction:
    """All metrics of one held-out section.

    Parameters
    ----------
    true, pred
        ``(n_spots, n_genes)`` measured and predicted log-normalised expression.
    genes
        Gene names of the columns.
    section
        The section's name.
    markers
        The MG list; genes absent from ``genes`` are skipped (``pcc_mg`` is NaN if none is left).
    xy
        Spot centres (for the report's spatial maps).
    n_top
        Size of the HEG and HVG sets, chosen on ``true`` of this section.
    labels
        Per-spot pathologist labels; when given (and both classes occur), ``tumor_auroc``
        (score of ``pred``) and ``tumor_auroc_measured`` (score of ``true``) are added.
    tumor_score
        ``f(expr, genes) -> (n_spots,)`` biomarker score; default :func:`marker_zscore`.

    Returns
    -------
    SectionPrediction
    """
    true = np.asarray(true, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    pcc = metrics.pearson_per_gene(true, pred)
    heg = metrics.select_heg(true, n_top)
    hvg = metrics.select_hvg(true, n_top)
    mg = np.asarray(match_genes(genes, markers)[0], dtype=int)
    m: dict[str, float] = {
        "pcc_heg": float(pcc[heg].mean()),
        "pcc_hvg": float(pcc[hvg].mean()),
        "pcc_mg": float(pcc[mg].mean()) if mg.size else float("nan"),
        "pcc_all": float(pcc.mean()),
        "mse": metrics.mse(true, pred),
        "mae": metrics.mae(true, pred),
        "gene_gene_corr": metrics.gene_gene_corr(true, pred, hvg),
    }
    lab_arr = None
    if labels is not None:
        lab_arr = np.asarray(labels, dtype=object)
        keep, pos = tumor_positive(lab_arr)
        if keep.any() and 0 < pos[keep].sum() < keep.sum():
            fn = tumor_score or marker_zscore
            m["tumor_auroc"] = metrics.auroc(np.asarray(fn(pred, genes))[keep], pos[keep])
            m["tumor_auroc_measured"] = metrics.auroc(np.asarray(fn(true, genes))[keep], pos[keep])
    return SectionPrediction(
        section=section,
        genes=list(genes),
        xy=np.zeros((true.shape[0], 2)) if xy is None else np.asarray(xy, dtype=np.float64),
        true=true.astype(np.float32),
        pred=pred.astype(np.float32),
        pcc=pcc,
        heg=heg,
        hvg=hvg,
        mg=mg,
        metrics=m,
        labels=lab_arr,
    )
