"""Marker gene lists for the MG metric: a thin view of :mod:`napari_stpredict.st.genesets`.

The default MG list (:data:`BREAST_CANCER_MARKERS`) is the ``breast`` marker set: PAM50
(genefu, old symbols updated), the tumour signature, the HER2 amplicon, luminal/epithelial,
metabolism/proliferation, immune and stromal markers. Genes that a model's panel lacks are
skipped and reported. ``stpredict evaluate --markers FILE`` reads a list with
:func:`load_markers`.
"""

from __future__ import annotations

import os

from napari_stpredict.errors import DatasetError, StPredictError
from napari_stpredict.st.genes import load_gene_list
from napari_stpredict.st.genesets import BREAST_CANCER_MARKERS, PAM50, TUMOR_MARKERS, match_genes

__all__ = [
    "BREAST_CANCER_MARKERS",
    "PAM50",
    "TUMOR_MARKERS",
    "load_markers",
    "match_genes",
]


def load_markers(path: str | os.PathLike) -> list[str]:
    """Read a marker list (any gene list format: ``.txt`` one gene per line with ``#``
    comments, ``.csv``/``.tsv`` with a gene/symbol/probe column, ``.json``, ``.npy``).

    Names are kept as written (matching is case-insensitive; see :func:`match_genes`).

    Raises
    ------
    StPredictError
        If the file is missing, unreadable or lists no gene.
    """
    try:
        return load_gene_list(path)
    except DatasetError as err:
        raise StPredictError(str(err).replace("gene list", "marker file")) from None
