"""Metrics of the paper's protocol: per-gene PCC, HEG/HVG selection, gene–gene correlation.

All functions take ``true`` and ``pred`` as ``(n_spots, n_genes)`` arrays of log-normalised
expression of one held-out section. They follow the CMRCNet/BLEEP evaluation code: correlations
are Pearson's r across the spots of the section, and an undefined correlation (a constant gene,
a NaN in the data) counts as 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata

__all__ = [
    "auroc",
    "gene_gene_corr",
    "mae",
    "mse",
    "pearson_per_gene",
    "select_heg",
    "select_hvg",
]


def _as_2d(name: str, a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (spots, genes) array, got shape {a.shape}")
    return a


def _check_pair(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t, p = _as_2d("true", true), _as_2d("pred", pred)
    if t.shape != p.shape:
        raise ValueError(f"true and pred differ in shape: {t.shape} vs {p.shape}")
    return t, p


def _column_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of matching columns of ``a`` and ``b``; undefined (constant, NaN) → 0."""
    ac = a - a.mean(axis=0)
    bc = b - b.mean(axis=0)
    num = (ac * bc).sum(axis=0)
    den = np.sqrt((ac * ac).sum(axis=0) * (bc * bc).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / den
    # float rounding can put |r| a hair above 1 for identical columns
    r = np.clip(r, -1.0, 1.0)
    # a constant column is "undefined" even when rounding leaves a tiny non-zero spread
    constant = (np.ptp(a, axis=0) == 0) | (np.ptp(b, axis=0) == 0)
    r[~np.isfinite(r) | constant] = 0.0
    return r


def pearson_per_gene(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Pearson correlation of each gene across spots.

    Parameters
    ----------
    true, pred
        ``(n_spots, n_genes)`` measured and predicted log-normalised expression.

    Returns
    -------
    numpy.ndarray
        ``(n_genes,)`` float64; genes whose correlation is undefined (constant in ``true`` or
        ``pred``, fewer than two spots, a NaN value) get 0, as in the paper's code.

    Examples
    --------
    >>> t = np.array([[1.0, 1.0], [2.0, 1.0], [3.0, 1.0]])
    >>> pearson_per_gene(t, t).tolist()
    [1.0, 0.0]
    """
    t, p = _check_pair(true, pred)
    if t.shape[0] < 2:
        return np.zeros(t.shape[1])
    return _column_corr(t, p)


def _top_n(values: np.ndarray, n: int) -> np.ndarray:
    if n < 1:
        raise ValueError(f"n={n}: must be at least 1")
    values = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=-np.inf)
    # stable sort on the negated values: ties keep gene order, so the selection is deterministic
    order = np.argsort(-values, kind="stable")
    return np.sort(order[: min(n, values.size)])


def select_heg(true: np.ndarray, n: int = 50) -> np.ndarray:
    """Indices of the ``n`` highly expressed genes: largest total expression over the spots.

    Returns the indices sorted ascending (gene order); all genes if there are fewer than ``n``.
    """
    return _top_n(np.nansum(_as_2d("true", true), axis=0), n)


def select_hvg(true: np.ndarray, n: int = 50) -> np.ndarray:
    """Indices of the ``n`` highly variable genes: largest variance over the spots."""
    return _top_n(np.nanvar(_as_2d("true", true), axis=0), n)


def mse(true: np.ndarray, pred: np.ndarray) -> float:
    """Mean squared error over all spots and genes (NaNs in ``true`` ignored)."""
    t, p = _check_pair(true, pred)
    return float(np.nanmean((t - p) ** 2))


def mae(true: np.ndarray, pred: np.ndarray) -> float:
    """Mean absolute error over all spots and genes (NaNs in ``true`` ignored)."""
    t, p = _check_pair(true, pred)
    return float(np.nanmean(np.abs(t - p)))


def _gene_corr_matrix(x: np.ndarray) -> np.ndarray:
    xc = x - x.mean(axis=0)
    norm = np.sqrt((xc * xc).sum(axis=0))
    norm[np.ptp(x, axis=0) == 0] = np.inf  # constant genes correlate with nothing
    with np.errstate(invalid="ignore", divide="ignore"):
        c = (xc.T @ xc) / np.outer(norm, norm)
    c[~np.isfinite(c)] = 0.0
    return c


def gene_gene_corr(true: np.ndarray, pred: np.ndarray, genes: Sequence[int] | None = None) -> float:
    """How well the prediction preserves gene–gene correlations.

    Pearson r between the upper triangles (diagonal excluded) of the gene–gene correlation
    matrices of ``true`` and of ``pred`` over the genes ``genes`` (all genes if ``None``; the
    protocol uses the HVG set). Undefined entries (constant genes) count as 0; an undefined
    result (fewer than 3 genes, or a constant triangle) is 0.
    """
    t, p = _check_pair(true, pred)
    if genes is not None:
        idx = np.asarray(genes, dtype=int)
        t, p = t[:, idx], p[:, idx]
    g = t.shape[1]
    if g < 3 or t.shape[0] < 2:
        return 0.0
    t = np.nan_to_num(t)
    p = np.nan_to_num(p)
    iu = np.triu_indices(g, k=1)
    a = _gene_corr_matrix(t)[iu][:, None]
    b = _gene_corr_matrix(p)[iu][:, None]
    return float(_column_corr(a, b)[0])


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the boolean ``positive``.

    Mann–Whitney form with average ranks for ties. Returns NaN when one class is empty
    (AUROC undefined); NaN scores are dropped.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(positive, dtype=bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.size} vs {y.size}")
    keep = np.isfinite(s)
    s, y = s[keep], y[keep]
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
