"""Scoring one model file on a fold's held-out sections, with each section read once.

:class:`SectionCache` keeps each section, its spot patches (per patch geometry) and its
measured expression (per gene panel and normalization), so every method of an evaluation is
scored on the same data without reading it again. :func:`score_model_on` refuses a model that
has seen a held-out section before computing any number.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from napari_stpredict.evaluation.data import (
    ModelInfo,
    SectionData,
    load_section,
    measured_expression,
    predict_section,
    section_patches,
)
from napari_stpredict.evaluation.folds import Fold, check_no_leakage
from napari_stpredict.evaluation.results import FoldResult
from napari_stpredict.evaluation.scoring import score_section
from napari_stpredict.progress import CancelToken, ProgressCallback, check_cancel

__all__ = ["TUMOR_SCORE_DOC", "SectionCache", "score_model_on", "tumor_score_fn"]

#: Patches kept in memory across methods at most (bytes); beyond, they are read per model.
PATCH_CACHE_BYTES = 2 << 30
#: How the tumour AUROC's score is computed (recorded in the results' config).
TUMOR_SCORE_DOC = (
    "napari_stpredict.tumor.score_matrix (default signature, z-scores over the section); "
    "mean z-score of evaluation.markers.TUMOR_MARKERS when the panel has none of its genes"
)


def tumor_score_fn() -> Callable[[np.ndarray, Sequence[str]], np.ndarray]:
    """The tumour module's default signature score; the marker z-score where it has no gene."""
    from napari_stpredict.evaluation.scoring import marker_zscore
    from napari_stpredict.tumor import TumorError, score_matrix

    def _score(expr: np.ndarray, genes: Sequence[str]) -> np.ndarray:
        try:
            # z-scores over the section's own spots: the AUROC only needs a ranking within it
            return np.asarray(score_matrix(expr, list(genes)), dtype=np.float64)
        except TumorError:
            return marker_zscore(expr, genes)

    return _score


class SectionCache:
    """Reads each section once; measured expression cached per (gene panel, normalization)."""

    def __init__(self, manifest: Any) -> None:
        self._specs = {str(s.name): s for s in manifest.sections}
        self._data: dict[str, SectionData] = {}
        self._truth: dict[tuple, np.ndarray] = {}
        self._patches: dict[tuple, np.ndarray] = {}

    def get(self, name: str) -> SectionData:
        """The section called ``name``, read on first use."""
        if name not in self._data:
            self._data[name] = load_section(self._specs[name])
        return self._data[name]

    def patches(self, name: str, predictor: Any, *, cancel: CancelToken | None) -> np.ndarray:
        """The section's spot patches at the predictor's scale, read once for all methods."""
        key = (
            name,
            predictor.patch_um,
            predictor.patch_px,
            repr(predictor.metadata.get("config", {}).get("patch_px_level0")),
            tuple(getattr(getattr(predictor, "input_spec", None), "scales", (1.0,))),
        )
        if key not in self._patches:
            arr = section_patches(predictor, self.get(name), cancel=cancel)
            # bounded: a cohort whose patches would not fit is read again per model instead
            if sum(a.nbytes for a in self._patches.values()) + arr.nbytes <= PATCH_CACHE_BYTES:
                self._patches[key] = arr
            return arr
        return self._patches[key]

    def truth(self, name: str, genes: Sequence[str], normalization: Any) -> np.ndarray:
        """The section's measured expression of ``genes``, normalised like the model."""
        key = (name, tuple(genes), repr(normalization))
        if key not in self._truth:
            self._truth[key] = measured_expression(self.get(name), genes, normalization)
        return self._truth[key]


def score_model_on(
    info: ModelInfo,
    fold: Fold,
    sections: SectionCache,
    *,
    markers: Sequence[str],
    n_top: int,
    device: str,
    tumor_score: Any,
    progress: ProgressCallback | None,
    cancel: CancelToken | None,
    predictor_options: dict[str, Any] | None = None,
) -> FoldResult:
    """Score the model file of ``info`` on the fold's test sections (after the leakage check).

    A fold's numbers are the means over its held-out sections (the paper's code does the
    same); non-finite section values are left out of a mean.
    """
    from napari_stpredict.model import Predictor

    # the guard: no number is ever computed on a section the model has seen
    check_no_leakage(
        fold.test,
        training_sections=info.training_sections,
        bank_sections=info.bank_sections,
        what=f"{info.path}",
    )
    t0 = time.perf_counter()
    predictor = Predictor(info.path, device=device, **(predictor_options or {}))
    result = FoldResult(test=list(fold.test), train=list(info.training_sections or fold.train))
    for name in fold.test:
        check_cancel(cancel, "evaluation")
        sec = sections.get(name)
        patches = sections.patches(name, predictor, cancel=cancel)
        pred = predict_section(predictor, sec, patches=patches, progress=progress, cancel=cancel)
        true = sections.truth(name, predictor.genes, info.normalization)
        result.sections.append(
            score_section(
                true,
                pred,
                predictor.genes,
                section=name,
                markers=markers,
                xy=sec.xy,
                n_top=n_top,
                labels=sec.labels,
                tumor_score=tumor_score,
            )
        )
    result.metrics.update(_fold_means(result))
    result.model_path = info.path
    result.score_wall_s = time.perf_counter() - t0
    return result


def _fold_means(result: FoldResult) -> dict[str, float]:
    """Each metric's mean over the fold's sections (NaN when no section has a finite value)."""
    out: dict[str, float] = {}
    for k in dict.fromkeys(k for s in result.sections for k in s.metrics):
        vals = [
            s.metrics[k] for s in result.sections if k in s.metrics and np.isfinite(s.metrics[k])
        ]
        out[k] = float(np.mean(vals)) if vals else float("nan")
    return out
