"""Validation of tumour scores against pathologist spot labels."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_stpredict.tumor.mask import otsu_threshold
from napari_stpredict.tumor.score import (
    _dense,
    _normalized_columns,
    gene_stats_from_matrix,
    score_matrix,
)
from napari_stpredict.tumor.signature import (
    CANDIDATE_GENE_SETS,
    EXCLUDED_LABELS,
    TUMOR_LABELS,
    Signature,
    TumorError,
)


def tumor_labels_to_binary(
    labels: Sequence[Any],
    *,
    positive: Sequence[str] = TUMOR_LABELS,
    exclude: Sequence[str] = EXCLUDED_LABELS,
) -> tuple[np.ndarray, np.ndarray]:
    """(is_tumour, keep) boolean arrays from pathologist labels.

    Missing labels (None/NaN/empty) and ``exclude`` labels are not kept.
    """
    pos = {p.strip().lower() for p in positive}
    exc = {e.strip().lower() for e in exclude}
    lab = []
    for v in labels:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            lab.append("")
        else:
            lab.append(str(v).strip().lower())
    y = np.array([v in pos for v in lab], dtype=bool)
    keep = np.array([bool(v) and v not in exc and v != "nan" for v in lab], dtype=bool)
    return y, keep


@dataclass(frozen=True)
class TumorMetrics:
    """Agreement of a tumour score with pathologist labels."""

    auroc: float
    average_precision: float
    f1: float
    threshold: float
    threshold_method: str
    n: int
    n_tumor: int
    n_excluded: int
    prevalence: float

    def to_dict(self) -> dict[str, float | int | str]:
        """Plain JSON-friendly dict."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def evaluate_scores(
    scores: np.ndarray,
    labels: Sequence[Any],
    *,
    threshold: float | str | None = "otsu",
    positive: Sequence[str] = TUMOR_LABELS,
    exclude: Sequence[str] = EXCLUDED_LABELS,
) -> TumorMetrics:
    """AUROC, average precision and F1 of a tumour score against spot labels.

    ``invasive cancer`` and ``cancer in situ`` are tumour; every other label is not;
    ``undetermined`` and missing labels (and NaN scores) are left out.

    Parameters
    ----------
    threshold
        The cut for F1: a number, ``"otsu"`` (Otsu on the kept scores — the widget's auto
        threshold) or ``None`` (the same as ``"otsu"``).

    Returns
    -------
    TumorMetrics
        AUROC/AP are NaN when only one class is present.
    """
    from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

    s = np.asarray(scores, dtype=np.float64).ravel()
    if len(s) != len(labels):
        raise TumorError(f"validation: {len(s)} scores for {len(labels)} labels")
    y, keep = tumor_labels_to_binary(labels, positive=positive, exclude=exclude)
    keep &= np.isfinite(s)
    n_excl = int(len(s) - keep.sum())
    s, y = s[keep], y[keep]
    if s.size == 0:
        raise TumorError("validation: no labelled spots with a score")
    if threshold is None or (isinstance(threshold, str) and threshold.lower() == "otsu"):
        thr, how = (otsu_threshold(s) if np.ptp(s) > 0 else float(s[0])), "otsu"
    elif isinstance(threshold, str):
        raise TumorError(f"validation: threshold {threshold!r} must be a number or 'otsu'")
    else:
        thr, how = float(threshold), "given"
    both = 0 < y.sum() < y.size
    auroc = float(roc_auc_score(y, s)) if both else float("nan")
    ap = float(average_precision_score(y, s)) if both else float("nan")
    f1 = float(f1_score(y, s >= thr, zero_division=0.0))
    return TumorMetrics(auroc, ap, f1, thr, how, int(y.size), int(y.sum()), n_excl, float(y.mean()))


def tumor_auroc(
    expression: np.ndarray,
    genes: Sequence[str],
    labels: Sequence[Any],
    *,
    gene_set: Signature | Iterable[str] | Mapping[str, float] | str | None = None,
    weights: Sequence[float] | None = None,
    gene_stats: Mapping[str, Any] | None = None,
    threshold: float | str | None = "otsu",
) -> TumorMetrics:
    """Score (n, G) log-normalised expression and compare it with spot labels.

    The entry point for ``stpredict evaluate``: predicted expression of a held-out section, the
    model's genes and training ``gene_stats``, and the section's pathologist labels.
    """
    s = score_matrix(expression, genes, gene_set=gene_set, weights=weights, gene_stats=gene_stats)
    return evaluate_scores(s, labels, threshold=threshold)


def validate_gene_sets(
    adatas: Sequence[Any] | Mapping[str, Any],
    gene_sets: Mapping[str, Any] | None = None,
    *,
    label_key: str = "label",
    normalization: str | None = "log1p_cpm",
    reference: str = "pooled",
) -> list[dict[str, Any]]:
    """Compare gene sets on measured expression of labelled sections.

    Parameters
    ----------
    adatas
        Labelled sections (``obs[label_key]``), as a list or ``{name: AnnData}``.
    gene_sets
        ``{name: genes | {gene: weight} | Signature | {"genes": ..., "why": ...}}``; default
        :data:`CANDIDATE_GENE_SETS`.
    reference
        ``"pooled"``: z-score against the mean/std of all sections together (like a model's
        training statistics); ``"section"``: each section against its own.

    Returns
    -------
    list of dict
        One row per (gene set, section) and one per gene set with ``section="pooled"`` (all
        spots together) and ``section="mean"`` (mean ± sd of the per-section metrics). Keys:
        ``gene_set, section, genes, missing, auroc, average_precision, f1, threshold, n,
        n_tumor, why`` (+ ``auroc_sd`` on the mean row).
    """
    if reference not in ("pooled", "section"):
        raise TumorError(f"validation: reference {reference!r} must be 'pooled' or 'section'")
    items = _labelled_sections(adatas, label_key)
    sets = CANDIDATE_GENE_SETS if gene_sets is None else gene_sets
    # normalise each section once over the union of all candidate genes
    union: list[str] = []
    for spec in sets.values():
        sig = _as_signature(spec)
        union += [g for g in sig.genes if g not in union]
    mats, seen = _measured(items, union, normalization)
    labels = {name: np.asarray(a.obs[label_key].astype(object)) for name, a in items}
    pooled_stats = (
        gene_stats_from_matrix(np.concatenate(list(mats.values())))
        if reference == "pooled"
        else None
    )
    names = [name for name, _a in items]
    rows: list[dict[str, Any]] = []
    for set_name, spec in sets.items():
        sig = _as_signature(spec)
        why = spec.get("why", "") if isinstance(spec, Mapping) and "genes" in spec else ""
        missing = ", ".join(g for g in sig.genes if g not in seen)
        if len(missing) and all(g not in seen for g in sig.genes):
            continue
        rows += _gene_set_rows(
            set_name, sig, why, missing, names, mats, union, labels, pooled_stats
        )
    return rows


def _labelled_sections(
    adatas: Sequence[Any] | Mapping[str, Any], label_key: str
) -> list[tuple[str, Any]]:
    """``[(name, AnnData)]``; every section must have labels."""
    items = (
        list(adatas.items())
        if isinstance(adatas, Mapping)
        else [(_section_name(a, k), a) for k, a in enumerate(adatas)]
    )
    if not items:
        raise TumorError("validation: no labelled sections")
    for name, a in items:
        if label_key not in a.obs:
            raise TumorError(f"validation: section {name} has no obs[{label_key!r}] labels")
    return items


def _measured(
    items: list[tuple[str, Any]], union: list[str], normalization: str | None
) -> tuple[dict[str, np.ndarray], set[str]]:
    """Each section's (normalised) expression of ``union`` (absent genes = 0 counts) and the
    genes measured in at least one section."""
    mats: dict[str, np.ndarray] = {}
    seen: set[str] = set()
    for name, a in items:
        cols = [str(g) for g in a.var_names]
        pos = {g: i for i, g in enumerate(cols)}
        present = [g for g in union if g in pos]
        seen.update(present)
        idx = np.array([pos[g] for g in present], dtype=np.int64)
        if normalization is not None:
            sub = (
                _normalized_columns(a.X, idx, normalization) if len(idx) else np.zeros((a.n_obs, 0))
            )
        else:
            sub = _dense(a.X[:, idx]).astype(np.float64)
        full = np.zeros((a.n_obs, len(union)))  # a gene absent from a section's table = 0 counts
        full[:, [union.index(g) for g in present]] = sub
        mats[name] = full
    return mats, seen


def _gene_set_rows(
    set_name: str,
    sig: Signature,
    why: str,
    missing: str,
    names: list[str],
    mats: dict[str, np.ndarray],
    union: list[str],
    labels: dict[str, np.ndarray],
    pooled_stats: Any,
) -> list[dict[str, Any]]:
    """One gene set's rows: each section it can score, all spots pooled, the per-section mean."""
    rows: list[dict[str, Any]] = []
    per: list[TumorMetrics] = []
    all_s, all_l = [], []
    for name in names:
        try:
            s = score_matrix(mats[name], union, gene_set=sig, gene_stats=pooled_stats)
        except TumorError:
            continue
        m = evaluate_scores(s, labels[name])
        per.append(m)
        all_s.append(s)
        all_l.append(labels[name])
        rows.append(_row(set_name, name, sig, m, why, missing))
    if not per:
        return rows
    pooled = evaluate_scores(np.concatenate(all_s), np.concatenate(all_l))
    rows.append(_row(set_name, "pooled", sig, pooled, why, missing))
    au = np.array([m.auroc for m in per])
    mean_row = _row(set_name, "mean", sig, pooled, why, missing)
    mean_row.update(
        auroc=float(np.nanmean(au)),
        auroc_sd=float(np.nanstd(au)),
        average_precision=float(np.nanmean([m.average_precision for m in per])),
        f1=float(np.mean([m.f1 for m in per])),
        threshold=float("nan"),
        n=int(sum(m.n for m in per)),
        n_tumor=int(sum(m.n_tumor for m in per)),
    )
    rows.append(mean_row)
    return rows


def _section_name(adata: Any, k: int) -> str:
    meta = adata.uns.get("stpredict", {}) if hasattr(adata, "uns") else {}
    if isinstance(meta, Mapping) and meta.get("section"):
        return str(meta["section"])
    if "section" in getattr(adata, "obs", {}):
        return str(adata.obs["section"].iloc[0])
    return f"section{k}"


def _as_signature(spec: Any) -> Signature:
    if isinstance(spec, Signature):
        return spec
    if isinstance(spec, Mapping) and "genes" in spec:
        return Signature.create(spec["genes"])
    return Signature.create(spec)


def _row(
    set_name: str, section: str, sig: Signature, m: TumorMetrics, why: str, missing: str
) -> dict[str, Any]:
    return {
        "gene_set": set_name,
        "section": section,
        "genes": sig.to_text(),
        "missing": missing,
        "auroc": m.auroc,
        "average_precision": m.average_precision,
        "f1": m.f1,
        "threshold": m.threshold,
        "n": m.n,
        "n_tumor": m.n_tumor,
        "why": why,
    }
