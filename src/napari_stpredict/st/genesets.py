"""Named gene sets, the default tumour signature and the default training panel — one place.

Training (the default panel), evaluation (the MG marker list), the tumour score (the default
signature) and the widget presets all read their genes from here.

* **Marker sets.** A small registry of named sets (:data:`MARKER_SETS`): ``breast`` (PAM50, the
  tumour signature, the HER2/17q12 amplicon, luminal, epithelial, proliferation, immune and
  stromal markers), ``pan-cancer`` (proliferation, epithelial, immune, stromal, hypoxia) and
  ``none``. :func:`marker_set` takes a NAME or a gene list FILE (any format of
  :func:`~napari_stpredict.st.genes.load_gene_list`).
* **Tumour signature.** :data:`DEFAULT_TUMOR_GENES`: fixed in code, chosen among pre-declared
  candidates on sections that the reported AUROC never uses (see ``docs/tumor_export.md``).
  :func:`resolve_signature` matches it to a model's genes and refuses (one line) when fewer than
  :data:`MIN_SIGNATURE_GENES` remain; :func:`tumour_support` says whether a model file can
  make a tumour layer, from its header alone.
* **Panel.** :func:`~napari_stpredict.st.panel.build_panel` (in :mod:`napari_stpredict.st.panel`,
  re-exported here): markers ∪ top-N highly expressed genes (HEG) ∪ the union of per-section
  highly variable genes (HVG), each gene kept only when measured in every section (and
  detected in the training sections), old symbols resolved.

Nothing here imports torch, Qt or napari.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_stpredict.errors import DatasetError, StPredictError

__all__ = [
    "BREAST_CANCER_MARKERS",
    "DEFAULT_MARKER_SET",
    "DEFAULT_TUMOR_GENES",
    "HER2_AMPLICON",
    "MARKER_SETS",
    "MIN_SIGNATURE_GENES",
    "PAM50",
    "TUMOR_MARKERS",
    "MarkerSet",
    "SignatureError",
    "marker_set",
    "match_genes",
    "model_signature",
    "resolve_signature",
    "tumour_support",
]


class SignatureError(StPredictError):
    """A tumour signature cannot be resolved against a model's genes."""


# --------------------------------------------------------------------------------------------
# gene groups (current HGNC symbols; old ones are resolved by st.genes.resolve_aliases)

#: PAM50 (genefu's ``pam50`` model; CDCA1→NUF2, KNTC2→NDC80, ORC6L→ORC6 updated).
PAM50: tuple[str, ...] = (
    "ACTR3B", "ANLN", "BAG1", "BCL2", "BIRC5", "BLVRA", "CCNB1", "CCNE1", "CDC20", "CDC6",
    "NUF2", "CDH3", "CENPF", "CEP55", "CXXC5", "EGFR", "ERBB2", "ESR1", "EXO1", "FGFR4",
    "FOXA1", "FOXC1", "GPR160", "GRB7", "KIF2C", "NDC80", "KRT14", "KRT17", "KRT5", "MAPT",
    "MDM2", "MELK", "MIA", "MKI67", "MLPH", "MMP11", "MYBL2", "MYC", "NAT1", "ORC6",
    "PGR", "PHGDH", "PTTG1", "RRM2", "SFRP1", "SLC39A6", "TMEM45B", "TYMS", "UBE2C", "UBE2T",
)  # fmt: skip

#: The 17q12 (ERBB2) amplicon: genes co-amplified with HER2.
HER2_AMPLICON: tuple[str, ...] = (
    "ERBB2", "GRB7", "PGAP3", "STARD3", "MIEN1", "PNMT", "TCAP", "PSMD3",
)  # fmt: skip

_LUMINAL: tuple[str, ...] = (
    "GATA3", "XBP1", "TFF1", "TFF3", "AGR2", "SPDEF", "MUC1", "SCGB2A2", "PIP", "MUCL1", "CALML5",
)  # fmt: skip
_BREAST_EPITHELIAL: tuple[str, ...] = (
    "KRT7", "KRT8", "KRT18", "KRT19", "EPCAM", "CDH1", "CLDN3", "CLDN4", "S100A14",
)  # fmt: skip
_BREAST_METABOLISM: tuple[str, ...] = ("FASN", "SCD", "GNAS", "TOP2A")
_BREAST_IMMUNE: tuple[str, ...] = ("PTPRC", "CD74", "CD68", "IGKC")
_BREAST_STROMAL: tuple[str, ...] = (
    "COL1A1", "COL3A1", "FN1", "POSTN", "SPARC", "VIM", "LUM", "ACTA2", "VWF",
)  # fmt: skip

#: Default tumour signature (breast carcinoma): ERBB2 and its co-amplified GRB7 (HER2+
#: disease), the luminal cytokeratins KRT8/KRT18/KRT19 and the epithelial adhesion genes EPCAM
#: and CDH1 — tumour epithelium versus stroma, fat and immune cells. Selected among the
#: pre-declared candidates of ``napari_stpredict.tumor.CANDIDATE_GENE_SETS`` by mean AUROC on
#: the labelled HER2ST sections B1, C1, D1 only; AUROC is reported on E1, F1, G2, H1, which
#: took no part in the choice (benchmarks/tumor_validation.py, docs/benchmarks.md).
DEFAULT_TUMOR_GENES: tuple[str, ...] = ("ERBB2", "GRB7", "KRT19", "EPCAM", "KRT8", "KRT18", "CDH1")

#: A tumour score needs at least this many signature genes in a model (a default signature
#: resolved to fewer is refused: one or two predicted genes are too noisy a tumour map).
MIN_SIGNATURE_GENES = 3

#: Genes up in breast tumour epithelium relative to stroma, fat and immune cells (the wider
#: list behind evaluation's fallback tumour score).
TUMOR_MARKERS: tuple[str, ...] = (
    "ERBB2", "GRB7", "STARD3", "PGAP3", "MIEN1", "KRT19", "KRT18", "KRT8", "KRT7", "EPCAM",
    "CDH1", "CLDN4", "CLDN3", "S100A14", "MUC1", "AGR2", "TFF3", "GATA3", "FASN", "SCD", "GNAS",
    "MKI67", "TOP2A",
)  # fmt: skip


def _union(*groups: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(g for grp in groups for g in grp))


#: The ``breast`` marker set: PAM50, the tumour signature, the HER2 amplicon, luminal and
#: epithelial markers, tumour metabolism/proliferation, immune and stromal markers (the MG list
#: of ``stpredict evaluate``).
BREAST_CANCER_MARKERS: tuple[str, ...] = _union(
    PAM50,
    DEFAULT_TUMOR_GENES,
    HER2_AMPLICON,
    _LUMINAL,
    _BREAST_EPITHELIAL,
    _BREAST_METABOLISM,
    _BREAST_IMMUNE,
    _BREAST_STROMAL,
)

_PROLIFERATION: tuple[str, ...] = (
    "MKI67", "TOP2A", "CCNB1", "BIRC5", "CDK1", "MCM2", "PCNA", "TYMS", "UBE2C", "CENPF",
    "RRM2", "AURKA",
)  # fmt: skip
_EPITHELIAL: tuple[str, ...] = (
    "EPCAM", "KRT8", "KRT18", "KRT19", "KRT7", "CDH1", "CLDN4", "CLDN7", "ELF3",
)  # fmt: skip
_IMMUNE: tuple[str, ...] = (
    "PTPRC", "CD3E", "CD3D", "CD8A", "CD4", "CD74", "CD68", "CD163", "LYZ", "MS4A1", "CD79A",
    "IGKC", "JCHAIN", "HLA-DRA", "NKG7", "GZMB",
)  # fmt: skip
_STROMAL: tuple[str, ...] = (
    "COL1A1", "COL1A2", "COL3A1", "DCN", "LUM", "FN1", "POSTN", "SPARC", "VIM", "ACTA2",
    "PDGFRB", "FAP", "PECAM1", "VWF",
)  # fmt: skip
_HYPOXIA: tuple[str, ...] = (
    "VEGFA", "CA9", "SLC2A1", "PGK1", "LDHA", "BNIP3", "NDRG1", "ADM", "ENO1", "P4HA1",
    "ANKRD37", "EGLN3",
)  # fmt: skip
#: Carcinoma epithelium without HER2: the tumour signature of the ``pan-cancer`` set.
CARCINOMA_SIGNATURE: tuple[str, ...] = ("EPCAM", "KRT8", "KRT18", "KRT19", "CDH1", "CLDN4")


@dataclass(frozen=True)
class MarkerSet:
    """A named marker set.

    Attributes
    ----------
    name
        Registry name, or the file path for a set read from a file.
    genes
        Marker genes (current symbols, set order, unique).
    tumor_signature
        The genes of the tumour signature that goes with the set (always part of the panel
        the set builds).
    groups
        ``{group: genes}`` for display (e.g. ``"HER2 amplicon"``).
    """

    name: str
    genes: tuple[str, ...]
    tumor_signature: tuple[str, ...] = DEFAULT_TUMOR_GENES
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def panel_genes(self) -> tuple[str, ...]:
        """The genes this set asks the panel for: its markers and its tumour signature."""
        return _union(self.genes, self.tumor_signature) if self.genes else ()


MARKER_SETS: dict[str, MarkerSet] = {
    "breast": MarkerSet(
        "breast",
        BREAST_CANCER_MARKERS,
        DEFAULT_TUMOR_GENES,
        {
            "PAM50": PAM50,
            "tumour signature": DEFAULT_TUMOR_GENES,
            "HER2 amplicon": HER2_AMPLICON,
            "luminal": _LUMINAL,
            "epithelial": _BREAST_EPITHELIAL,
            "metabolism/proliferation": _BREAST_METABOLISM,
            "immune": _BREAST_IMMUNE,
            "stromal": _BREAST_STROMAL,
        },
    ),
    "pan-cancer": MarkerSet(
        "pan-cancer",
        _union(_PROLIFERATION, _EPITHELIAL, _IMMUNE, _STROMAL, _HYPOXIA),
        CARCINOMA_SIGNATURE,
        {
            "proliferation": _PROLIFERATION,
            "epithelial": _EPITHELIAL,
            "immune": _IMMUNE,
            "stromal": _STROMAL,
            "hypoxia": _HYPOXIA,
        },
    ),
    "none": MarkerSet("none", (), DEFAULT_TUMOR_GENES, {}),
}
DEFAULT_MARKER_SET = "breast"


def marker_set(spec: str | os.PathLike | MarkerSet | None = None) -> MarkerSet:
    """A marker set by NAME (``breast``, ``pan-cancer``, ``none``) or from a gene list FILE.

    A file's genes have their old symbols resolved; its tumour signature is the default one.
    ``None`` is the default set (``breast``).

    Raises
    ------
    DatasetError
        Neither a known name nor an existing file; an unreadable or empty file.
    """
    from napari_stpredict.st.genes import load_gene_list, resolve_aliases

    if isinstance(spec, MarkerSet):
        return spec
    if spec is None:
        spec = DEFAULT_MARKER_SET
    text = str(spec)
    key = text.strip().lower().replace("_", "-")
    if key in MARKER_SETS and not isinstance(spec, os.PathLike):
        return MARKER_SETS[key]
    path = Path(text)
    if not path.is_file():
        raise DatasetError(
            f"markers {text!r}: neither a marker set ({', '.join(MARKER_SETS)}) nor a gene list file"
        )
    genes = tuple(dict.fromkeys(resolve_aliases(load_gene_list(path))))
    return MarkerSet(str(path), genes, DEFAULT_TUMOR_GENES, {path.name: genes})


def match_genes(panel: Sequence[str], wanted: Sequence[str]) -> tuple[list[int], list[str]]:
    """Indices into ``panel`` of the genes in ``wanted`` (case-insensitive), and the missing ones.

    Returns
    -------
    (indices, missing)
        ``indices`` in the order of ``wanted``; ``missing`` lists the genes not in ``panel``.

    Examples
    --------
    >>> match_genes(["A", "ESR1", "ERBB2"], ["erbb2", "NOPE"])
    ([2], ['NOPE'])
    """
    lookup: dict[str, int] = {}
    for i, g in enumerate(panel):
        lookup.setdefault(str(g).upper(), i)
    idx: list[int] = []
    missing: list[str] = []
    for g in dict.fromkeys(wanted):
        i = lookup.get(str(g).upper())
        if i is None:
            missing.append(g)
        elif i not in idx:
            idx.append(i)
    return idx, missing


# --------------------------------------------------------------------------------------------
# the tumour signature against a model


def resolve_signature(
    available: Sequence[str],
    signature: Sequence[str] | None = None,
    *,
    min_genes: int = MIN_SIGNATURE_GENES,
) -> tuple[list[str], list[str]]:
    """Match a (default) tumour signature to a model's genes: every signature gene it has.

    Parameters
    ----------
    available
        The model's genes.
    signature
        Signature genes; default :data:`DEFAULT_TUMOR_GENES`.
    min_genes
        Fewer matched genes than this is an error.

    Returns
    -------
    (used, missing)
        ``used`` spelled as in ``available``, in signature order; ``missing`` the others.

    Raises
    ------
    SignatureError
        One line, when fewer than ``min_genes`` signature genes are among ``available``.
    """
    sig = list(DEFAULT_TUMOR_GENES if signature is None else signature)
    idx, missing = match_genes(available, sig)
    used = [str(available[i]) for i in idx]
    if len(used) < min_genes:
        have = f"only {', '.join(used)}" if used else "none"
        raise SignatureError(
            f"tumour signature: {have} of {', '.join(sig)} among the model's {len(available)} "
            f"genes (needs at least {min_genes}; train with the default --markers, or give a "
            "gene set the model predicts)"
        )
    return used, missing


def tumour_support(header: Mapping[str, Any] | str | os.PathLike | Any) -> tuple[bool, str]:
    """Whether a model can make the default tumour layer, and why not.

    Parameters
    ----------
    header
        Model metadata (:func:`~napari_stpredict.model.header.read_model_header`), a model file
        path or a Predictor.

    Returns
    -------
    (ok, reason)
        ``reason`` is ``""`` when ``ok``; else one line (for ``summary.json``/the table).

    Examples
    --------
    >>> tumour_support({"genes": ["ERBB2", "KRT19", "EPCAM", "VIM"]})
    (True, '')
    >>> tumour_support({"genes": ["VIM", "CD74"]})[1][:32]
    'tumour signature: none of ERBB2,'
    """
    if not isinstance(header, Mapping):
        from napari_stpredict.model.header import model_info

        header = model_info(header).metadata
    genes = [str(g) for g in header.get("genes") or []]
    recorded = header.get("tumor_signature")
    try:
        resolve_signature(genes, _signature_genes(recorded) or None)
    except SignatureError as err:
        return False, str(err)
    return True, ""


def _signature_genes(recorded: Any) -> list[str]:
    """Genes of a recorded ``metadata["tumor_signature"]`` (a list, or ``{"genes": [...]}``)."""
    if isinstance(recorded, Mapping):
        recorded = recorded.get("genes")
    if isinstance(recorded, list | tuple):
        return [str(g) for g in recorded]
    return []


def model_signature(header: Mapping[str, Any]) -> list[str]:
    """The default tumour signature of a model: what it recorded at training, else the default.

    Old model files have no ``tumor_signature``: :data:`DEFAULT_TUMOR_GENES` is used.
    """
    return _signature_genes(header.get("tumor_signature")) or list(DEFAULT_TUMOR_GENES)


_PANEL_NAMES = ("Panel", "build_panel", "describe_panel", "highly_expressed_genes", "marker_report")


def __getattr__(name: str) -> Any:
    # the panel builder lives in st/panel.py (it imports this module): re-exported lazily
    if name in _PANEL_NAMES:
        from napari_stpredict.st import panel

        return getattr(panel, name)
    raise AttributeError(f"module 'napari_stpredict.st.genesets' has no attribute {name!r}")
