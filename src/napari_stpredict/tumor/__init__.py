"""Tumour localization from predicted (or measured) biomarker expression.

A tumour score is a signature score: the weighted mean of per-gene z-scores of log-normalised
expression over a small gene set. The z-scores use a fixed reference distribution (by default
the model's training spots, ``Predictor.gene_stats``), so the same score means the same thing on
every slide. The score is thresholded into a mask (manually or by Otsu on tissue cells),
optionally smoothed and cleaned of small regions, measured (mm², % of tissue) and turned into
polygons in level-0 pixels.

The same score works on measured expression (:func:`score_adata`) so it can be validated
against pathologists' spot labels (:func:`evaluate_scores`, :func:`validate_gene_sets`).

Nothing here imports Qt or napari. The package is split by job: :mod:`.signature` (gene sets), :mod:`.score`, :mod:`.mask`
(threshold, Otsu, area), :mod:`.regions` (grid geometry, polygons) and :mod:`.validation`.
"""

from __future__ import annotations

from napari_stpredict.tumor.mask import (
    TumorArea,
    otsu_threshold,
    score_range,
    smooth_score,
    tumor_area,
    tumor_mask,
)
from napari_stpredict.tumor.regions import (
    GridGeometry,
    TumorRegion,
    mask_to_polygons,
    tumor_regions,
)
from napari_stpredict.tumor.score import (
    TumorScore,
    gene_stats_from_matrix,
    model_gene_stats,
    read_model_metadata,
    score_adata,
    score_matrix,
    score_predictions,
    score_store,
)
from napari_stpredict.tumor.signature import (
    CANDIDATE_GENE_SETS,
    DEFAULT_TUMOR_GENES,
    EXCLUDED_LABELS,
    TUMOR_LABELS,
    Signature,
    TumorError,
    parse_gene_set,
)
from napari_stpredict.tumor.tumor_map import TumorMap, threshold_score, tumor_map_for_store
from napari_stpredict.tumor.validation import (
    TumorMetrics,
    evaluate_scores,
    tumor_auroc,
    tumor_labels_to_binary,
    validate_gene_sets,
)

__all__ = [
    "CANDIDATE_GENE_SETS",
    "DEFAULT_TUMOR_GENES",
    "EXCLUDED_LABELS",
    "TUMOR_LABELS",
    "GridGeometry",
    "Signature",
    "TumorArea",
    "TumorError",
    "TumorMap",
    "TumorMetrics",
    "TumorRegion",
    "TumorScore",
    "evaluate_scores",
    "gene_stats_from_matrix",
    "mask_to_polygons",
    "model_gene_stats",
    "otsu_threshold",
    "parse_gene_set",
    "read_model_metadata",
    "score_adata",
    "score_matrix",
    "score_predictions",
    "score_range",
    "score_store",
    "smooth_score",
    "threshold_score",
    "tumor_area",
    "tumor_auroc",
    "tumor_labels_to_binary",
    "tumor_map_for_store",
    "tumor_mask",
    "tumor_regions",
    "validate_gene_sets",
]
