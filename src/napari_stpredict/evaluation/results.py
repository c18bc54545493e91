"""Result containers of an evaluation and their JSON form (a contract scripts rely on).

``EvaluationResult.to_dict()`` gives::

    {"methods": {NAME: {"mean": {"pcc_heg", "pcc_hvg", "pcc_mg", "pcc_all", "mse", "mae",
                                 "gene_gene_corr", ["tumor_auroc", "tumor_auroc_measured"]},
                        "sd": {same keys},
                        "folds": [{"test": [sections], "train": [...], same keys, ...}],
                        "n_folds": int, "n_failed": int}},
     "config": {...}, "versions": {...}, "wall_time_s": float, ...}

Means and standard deviations are over the folds that succeeded (sd with ``ddof=1``, 0 for a
single fold). A failed fold keeps its ``test`` list and carries ``"error"`` instead of numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "METRIC_KEYS",
    "OPTIONAL_KEYS",
    "EvaluationResult",
    "FoldResult",
    "MethodResult",
    "SectionPrediction",
]

METRIC_KEYS: tuple[str, ...] = (
    "pcc_heg",
    "pcc_hvg",
    "pcc_mg",
    "pcc_all",
    "mse",
    "mae",
    "gene_gene_corr",
)
# present only when a held-out section carries pathologist labels
OPTIONAL_KEYS: tuple[str, ...] = ("tumor_auroc", "tumor_auroc_measured")


@dataclass
class SectionPrediction:
    """Measured and predicted expression of one held-out section (kept for the report)."""

    section: str
    genes: list[str]
    xy: np.ndarray  # (n, 2) spot centres, image px
    true: np.ndarray  # (n, G) log-normalised
    pred: np.ndarray  # (n, G)
    pcc: np.ndarray  # (G,) per-gene PCC
    heg: np.ndarray  # indices
    hvg: np.ndarray
    mg: np.ndarray
    metrics: dict[str, float]
    labels: np.ndarray | None = None  # per-spot label strings, if any


@dataclass
class FoldResult:
    """One method trained on one fold and scored on its held-out sections."""

    test: list[str]
    train: list[str]
    metrics: dict[str, float] = field(default_factory=dict)
    sections: list[SectionPrediction] = field(default_factory=list)
    error: str | None = None
    model_path: str | None = None
    train_wall_s: float | None = None
    score_wall_s: float | None = None
    training: dict[str, Any] | None = None  # best epoch, steps, validation scores of the run

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"test": list(self.test), "train": list(self.train)}
        if self.error is not None:
            d["error"] = self.error
            return d
        d.update({k: _num(v) for k, v in self.metrics.items()})
        d["sections"] = {
            s.section: {
                "n_spots": int(s.true.shape[0]),
                **{k: _num(v) for k, v in s.metrics.items()},
                # which markers pcc_mg averaged on this section (10.4)
                "n_mg": len(s.mg),
                "mg_genes": [s.genes[int(i)] for i in s.mg],
            }
            for s in self.sections
        }
        if self.model_path is not None:
            d["model"] = self.model_path
        if self.train_wall_s is not None:
            d["train_wall_s"] = round(self.train_wall_s, 2)
        if self.score_wall_s is not None:
            d["score_wall_s"] = round(self.score_wall_s, 2)
        if self.training:
            d["training"] = {
                k: _num(v) if isinstance(v, float) else v for k, v in self.training.items()
            }
        return d


@dataclass
class MethodResult:
    """All folds of one method."""

    name: str
    folds: list[FoldResult] = field(default_factory=list)

    def _values(self, key: str) -> list[float]:
        vals = [f.metrics.get(key) for f in self.folds if f.ok]
        return [float(v) for v in vals if v is not None and math.isfinite(float(v))]

    def metric_keys(self) -> list[str]:
        """Metric keys this method reports (the fixed ones, plus the tumour AUROCs if any)."""
        keys = list(METRIC_KEYS)
        keys += [k for k in OPTIONAL_KEYS if self._values(k)]
        return keys

    def mean(self) -> dict[str, float]:
        """Mean over the successful folds (NaN if none)."""
        return {
            k: float(np.mean(v)) if (v := self._values(k)) else float("nan")
            for k in self.metric_keys()
        }

    def sd(self) -> dict[str, float]:
        """Sample standard deviation over the successful folds (0 for one fold)."""
        out: dict[str, float] = {}
        for k in self.metric_keys():
            v = self._values(k)
            out[k] = float(np.std(v, ddof=1)) if len(v) > 1 else (0.0 if v else float("nan"))
        return out

    def mg_genes(self) -> list[str]:
        """The marker genes ``pcc_mg`` was computed on (union over the held-out sections)."""
        out: dict[str, None] = {}
        for f in self.folds:
            for s in f.sections:
                out.update(dict.fromkeys(s.genes[int(i)] for i in s.mg))
        return list(out)

    def to_dict(self) -> dict[str, Any]:
        mg = self.mg_genes()
        return {
            "mean": {k: _num(v) for k, v in self.mean().items()},
            "sd": {k: _num(v) for k, v in self.sd().items()},
            "folds": [f.to_dict() for f in self.folds],
            "n_folds": len(self.folds),
            "n_failed": sum(not f.ok for f in self.folds),
            "pcc_mg_n": len(mg),
            "pcc_mg_genes": mg,
        }


@dataclass
class EvaluationResult:
    """Everything one ``evaluate`` run produced."""

    methods: dict[str, MethodResult]
    config: dict[str, Any]
    versions: dict[str, str] = field(default_factory=dict)
    wall_time_s: float = 0.0
    genes: list[str] = field(default_factory=list)
    markers_used: list[str] = field(default_factory=list)
    markers_missing: list[str] = field(default_factory=list)

    @property
    def n_failed(self) -> int:
        return sum(not f.ok for m in self.methods.values() for f in m.folds)

    def to_dict(self) -> dict[str, Any]:
        return {
            "methods": {name: m.to_dict() for name, m in self.methods.items()},
            "config": self.config,
            "versions": dict(self.versions),
            "wall_time_s": round(self.wall_time_s, 2),
            "n_genes": len(self.genes),
            "markers": {"used": list(self.markers_used), "missing": list(self.markers_missing)},
        }


def _num(v: Any) -> float | None:
    """A JSON-safe float: NaN/inf become null (strict JSON has no NaN)."""
    if v is None:
        return None
    f = float(v)
    return f if math.isfinite(f) else None
