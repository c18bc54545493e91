"""Marker gene lists for the MG metric and the tumour score.

The default list (:data:`BREAST_CANCER_MARKERS`) is the PAM50 signature (genefu's
``pam50`` model, with the old symbols CDCA1→NUF2, KNTC2→NDC80, ORC6L→ORC6 updated) plus
well-known breast-tumour and tumour-microenvironment markers: the HER2 amplicon (ERBB2, GRB7,
STARD3, PGAP3, MIEN1, PSMD3, PNMT, TCAP), luminal and epithelial markers (ESR1, PGR, GATA3,
XBP1, TFF1, TFF3, AGR2, SPDEF, MUC1, SCGB2A2, PIP, MUCL1, CALML5, KRT7, KRT8, KRT18, KRT19,
EPCAM, CDH1, CLDN3, CLDN4, S100A14), tumour metabolism and proliferation (FASN, SCD, GNAS,
MKI67, TOP2A) and the stroma / immune compartments (PTPRC, CD74, CD68, IGKC, COL1A1, COL3A1,
FN1, POSTN, SPARC, VIM, LUM, ACTA2, VWF). Genes that a model's panel lacks are skipped and
reported.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

from napari_stpredict.errors import StPredictError

__all__ = [
    "BREAST_CANCER_MARKERS",
    "PAM50",
    "TUMOR_MARKERS",
    "load_markers",
    "match_genes",
]

PAM50: tuple[str, ...] = (
    "ACTR3B", "ANLN", "BAG1", "BCL2", "BIRC5", "BLVRA", "CCNB1", "CCNE1", "CDC20", "CDC6",
    "NUF2", "CDH3", "CENPF", "CEP55", "CXXC5", "EGFR", "ERBB2", "ESR1", "EXO1", "FGFR4",
    "FOXA1", "FOXC1", "GPR160", "GRB7", "KIF2C", "NDC80", "KRT14", "KRT17", "KRT5", "MAPT",
    "MDM2", "MELK", "MIA", "MKI67", "MLPH", "MMP11", "MYBL2", "MYC", "NAT1", "ORC6",
    "PGR", "PHGDH", "PTTG1", "RRM2", "SFRP1", "SLC39A6", "TMEM45B", "TYMS", "UBE2C", "UBE2T",
)  # fmt: skip

_EXTRA: tuple[str, ...] = (
    # HER2 amplicon
    "STARD3", "PGAP3", "MIEN1", "PSMD3", "PNMT", "TCAP",
    # luminal / secretory epithelium
    "GATA3", "XBP1", "TFF1", "TFF3", "AGR2", "SPDEF", "MUC1", "SCGB2A2", "PIP", "MUCL1",
    "CALML5",
    # epithelium
    "KRT7", "KRT8", "KRT18", "KRT19", "EPCAM", "CDH1", "CLDN3", "CLDN4", "S100A14",
    # tumour metabolism and proliferation
    "FASN", "SCD", "GNAS", "TOP2A",
    # immune and stroma
    "PTPRC", "CD74", "CD68", "IGKC", "COL1A1", "COL3A1", "FN1", "POSTN", "SPARC", "VIM",
    "LUM", "ACTA2", "VWF",
)  # fmt: skip

BREAST_CANCER_MARKERS: tuple[str, ...] = PAM50 + tuple(g for g in _EXTRA if g not in PAM50)

# Genes up in breast tumour epithelium relative to stroma, fat and immune cells: the fallback
# tumour score (mean z-score) when napari_stpredict.tumor is not available.
TUMOR_MARKERS: tuple[str, ...] = (
    "ERBB2", "GRB7", "STARD3", "PGAP3", "MIEN1", "KRT19", "KRT18", "KRT8", "KRT7", "EPCAM",
    "CDH1", "CLDN4", "CLDN3", "S100A14", "MUC1", "AGR2", "TFF3", "GATA3", "FASN", "SCD", "GNAS",
    "MKI67", "TOP2A",
)  # fmt: skip


def load_markers(path: str | os.PathLike) -> list[str]:
    """Read a marker list: one gene per line (``#`` comments), or a CSV/TSV whose first column
    (or a column named ``gene``/``symbol``/``probe``) holds the gene names.

    Raises
    ------
    StPredictError
        If the file is missing, unreadable or lists no gene.
    """
    p = Path(path)
    if not p.is_file():
        raise StPredictError(f"{p}: marker file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise StPredictError(f"{p}: cannot read marker file ({err})") from err
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    genes: list[str] = []
    if lines and ("," in lines[0] or "\t" in lines[0]):
        delim = "\t" if "\t" in lines[0] else ","
        rows = list(csv.reader(lines, delimiter=delim))
        header = [h.strip().lower() for h in rows[0]]
        col = next((header.index(k) for k in ("gene", "symbol", "probe") if k in header), None)
        if col is None:
            col, body = 0, rows
        else:
            body = rows[1:]
        genes = [r[col].strip() for r in body if len(r) > col and r[col].strip()]
    else:
        genes = [ln.strip() for ln in lines]
    # keep the file's order, drop duplicates
    genes = list(dict.fromkeys(genes))
    if not genes:
        raise StPredictError(f"{p}: marker file lists no gene")
    return genes


def match_genes(panel: Sequence[str], wanted: Sequence[str]) -> tuple[list[int], list[str]]:
    """Indices into ``panel`` of the genes in ``wanted`` (case-insensitive), and the missing ones.

    Returns
    -------
    (indices, missing)
        ``indices`` in the order of ``wanted``; ``missing`` lists the genes not in ``panel``.
    """
    lookup = {g.upper(): i for i, g in enumerate(panel)}
    idx: list[int] = []
    missing: list[str] = []
    for g in dict.fromkeys(wanted):
        i = lookup.get(g.upper())
        if i is None:
            missing.append(g)
        elif i not in idx:
            idx.append(i)
    return idx, missing
