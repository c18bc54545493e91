"""Cross-validated evaluation of CMRCNet and its baselines (the paper's protocol).

``evaluate(manifest, methods=..., cv=..., config=TrainConfig(...))`` trains each method on each
fold with identical settings and scores the held-out sections; ``score_model(path, manifest,
test_sections=[...])`` scores an existing model file. Metrics (per-gene PCC over HEG/HVG/MG/all
genes, MSE, MAE, gene–gene correlation, tumour AUROC) live in :mod:`.metrics`; the Markdown/PNG
report in :mod:`.report`.
"""

from __future__ import annotations

from napari_stpredict.evaluation.folds import (
    CV_MODES,
    Fold,
    LeakageError,
    check_no_leakage,
    make_folds,
)
from napari_stpredict.evaluation.markers import (
    BREAST_CANCER_MARKERS,
    PAM50,
    TUMOR_MARKERS,
    load_markers,
    match_genes,
)
from napari_stpredict.evaluation.metrics import (
    auroc,
    gene_gene_corr,
    mae,
    mse,
    pearson_per_gene,
    select_heg,
    select_hvg,
)
from napari_stpredict.evaluation.protocol import METHODS, evaluate, score_model
from napari_stpredict.evaluation.report import write_report
from napari_stpredict.evaluation.results import (
    METRIC_KEYS,
    EvaluationResult,
    FoldResult,
    MethodResult,
    SectionPrediction,
)
from napari_stpredict.evaluation.scoring import score_section

__all__ = [
    "BREAST_CANCER_MARKERS",
    "CV_MODES",
    "METHODS",
    "METRIC_KEYS",
    "PAM50",
    "TUMOR_MARKERS",
    "EvaluationResult",
    "Fold",
    "FoldResult",
    "LeakageError",
    "MethodResult",
    "SectionPrediction",
    "auroc",
    "check_no_leakage",
    "evaluate",
    "gene_gene_corr",
    "load_markers",
    "mae",
    "make_folds",
    "match_genes",
    "mse",
    "pearson_per_gene",
    "score_model",
    "score_section",
    "select_heg",
    "select_hvg",
    "write_report",
]
