"""Tumour gene sets: the default signature, candidates and :class:`Signature`."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_stpredict.errors import StPredictError
from napari_stpredict.st.genesets import (  # the default signature is defined (and argued) there
    DEFAULT_TUMOR_GENES,
    MIN_SIGNATURE_GENES,
    SignatureError,
    resolve_signature,
)


class TumorError(StPredictError):
    """Bad input to the tumour score, threshold or validation."""


#: Pathologist labels counted as tumour (HER2ST vocabulary; compared case-insensitively).
TUMOR_LABELS: tuple[str, ...] = ("invasive cancer", "cancer in situ")
#: Labels left out of validation: the pathologist could not decide.
EXCLUDED_LABELS: tuple[str, ...] = ("undetermined",)

_EPI_ERBB2 = ("ERBB2", "KRT19", "EPCAM", "KRT8", "KRT18", "CDH1")

#: Candidate signatures compared in benchmarks/tumor_validation.py, each with its rationale,
#: declared before any was scored (the default is picked among them on B1, C1, D1 only).
#: Weights are +1 unless given; a negative weight marks a gene expected to be low in tumour.
CANDIDATE_GENE_SETS: dict[str, dict[str, Any]] = {
    "ERBB2 + epithelial (ERBB2, KRT19, EPCAM, KRT8, KRT18, CDH1)": {
        "genes": dict.fromkeys(_EPI_ERBB2, 1.0),
        "why": "HER2 plus luminal cytokeratins and epithelial adhesion: carcinoma epithelium",
    },
    "ERBB2": {
        "genes": {"ERBB2": 1.0},
        "why": "HER2 alone: the defining amplicon of HER2+ disease (no signal in HER2- tumours)",
    },
    "HER2 amplicon (ERBB2, GRB7, STARD3, PGAP3)": {
        "genes": dict.fromkeys(("ERBB2", "GRB7", "STARD3", "PGAP3"), 1.0),
        "why": "17q12 genes co-amplified with ERBB2",
    },
    "cytokeratins (KRT8, KRT18, KRT19)": {
        "genes": dict.fromkeys(("KRT8", "KRT18", "KRT19"), 1.0),
        "why": "luminal epithelial keratins (also in normal ducts)",
    },
    "epithelial (EPCAM, CDH1, CLDN4)": {
        "genes": dict.fromkeys(("EPCAM", "CDH1", "CLDN4"), 1.0),
        "why": "epithelial adhesion / tight-junction genes",
    },
    "ERBB2 + GRB7 + epithelial (ERBB2, GRB7, KRT19, EPCAM, KRT8, KRT18, CDH1)": {
        "genes": dict.fromkeys(("ERBB2", "GRB7", *_EPI_ERBB2[1:]), 1.0),
        "why": "the first set plus the main ERBB2 co-amplified gene",
    },
    "proliferation (MKI67, TOP2A, CCNB1)": {
        "genes": dict.fromkeys(("MKI67", "TOP2A", "CCNB1"), 1.0),
        "why": "cycling cells; tumours proliferate more than stroma",
    },
    "ERBB2 + epithelial minus stroma (COL1A1, COL1A2, COL3A1 at -1)": {
        "genes": {
            **dict.fromkeys(_EPI_ERBB2, 1.0),
            **dict.fromkeys(("COL1A1", "COL1A2", "COL3A1"), -1.0),
        },
        "why": "epithelium up, fibrillar collagens (stroma) down",
    },
}


@dataclass(frozen=True)
class Signature:
    """A gene set with one weight per gene.

    Examples
    --------
    >>> Signature.create(["ERBB2", "KRT19"]).weights
    (1.0, 1.0)
    """

    genes: tuple[str, ...]
    weights: tuple[float, ...]

    @classmethod
    def create(
        cls,
        genes: Iterable[str] | Mapping[str, float] | str | None = None,
        weights: Sequence[float] | None = None,
    ) -> Signature:
        """Build and validate a signature.

        Parameters
        ----------
        genes
            Gene symbols, a ``{gene: weight}`` mapping, a text such as ``"ERBB2, COL1A1:-1"``
            (see :func:`parse_gene_set`), or ``None`` for :data:`DEFAULT_TUMOR_GENES`.
        weights
            One weight per gene (default 1). Ignored when ``genes`` carries weights.

        Raises
        ------
        TumorError
            Empty gene set, duplicate genes, weights of the wrong length, non-finite weights or
            weights summing to zero in absolute value.
        """
        if genes is None:
            genes = DEFAULT_TUMOR_GENES
        if isinstance(genes, str):
            sig = parse_gene_set(genes)
            names, w = list(sig.genes), list(sig.weights)
        elif isinstance(genes, Mapping):
            names = [str(g) for g in genes]
            w = [float(v) for v in genes.values()]
        else:
            names = [str(g).strip() for g in genes]
            w = [1.0] * len(names) if weights is None else [float(v) for v in weights]
        names = [g.strip() for g in names]
        if not names or any(not g for g in names):
            raise TumorError("gene set: empty (give at least one gene symbol)")
        if len(w) != len(names):
            raise TumorError(f"gene set: {len(w)} weights for {len(names)} genes")
        dup = sorted({g for g in names if names.count(g) > 1})
        if dup:
            raise TumorError(f"gene set: duplicate genes {', '.join(dup)}")
        if not all(math.isfinite(v) for v in w) or sum(abs(v) for v in w) == 0:
            raise TumorError(f"gene set: weights {w} must be finite and not all zero")
        return cls(tuple(names), tuple(w))

    def to_text(self) -> str:
        """The text form accepted by :func:`parse_gene_set` (weights shown when not 1)."""
        return ", ".join(
            g if w == 1.0 else f"{g}:{w:g}" for g, w in zip(self.genes, self.weights, strict=True)
        )

    def resolve(self, available: Sequence[str], *, strict: bool = True) -> _Resolved:
        """Match the genes to ``available`` (e.g. the model's genes).

        With ``strict`` any missing gene is an error; otherwise (the default set) missing genes
        are dropped and reported, and it is an error when fewer than
        :data:`~napari_stpredict.st.genesets.MIN_SIGNATURE_GENES` are left.
        """
        index = {g: i for i, g in enumerate(available)}
        upper = {g.upper(): i for i, g in enumerate(available)}
        idx, w, used, missing = [], [], [], []
        for g, wt in zip(self.genes, self.weights, strict=True):
            i = index.get(g, upper.get(g.upper()))
            if i is None:
                missing.append(g)
                continue
            idx.append(i)
            w.append(wt)
            used.append(available[i])
        if missing and strict:
            raise TumorError(
                f"gene set: {', '.join(missing)} not among the model's {len(available)} genes"
            )
        if not strict and len(used) < MIN_SIGNATURE_GENES:
            try:  # the one message for a default signature the model cannot support
                resolve_signature(available, self.genes)
            except SignatureError as err:
                raise TumorError(str(err)) from None
        if not used:
            raise TumorError(
                f"gene set: none of {', '.join(self.genes)} is among the {len(available)} genes "
                "(choose genes the model predicts)"
            )
        return _Resolved(
            np.asarray(idx, dtype=np.int64),
            np.asarray(w, dtype=np.float64),
            tuple(used),
            tuple(missing),
        )


@dataclass(frozen=True)
class _Resolved:
    index: np.ndarray
    weights: np.ndarray
    genes: tuple[str, ...]
    missing: tuple[str, ...]


_ITEM = re.compile(
    r"^([A-Za-z0-9][A-Za-z0-9._\-/]*)(?:[:=]([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?))?$"
)


def parse_gene_set(text: str) -> Signature:
    """Parse ``"ERBB2, KRT19 KRT8:0.5; COL1A1=-1"`` into a :class:`Signature`.

    Genes are separated by commas, semicolons, spaces or new lines; an optional weight follows
    ``:`` or ``=``.

    Raises
    ------
    TumorError
        Empty text or an unreadable item.
    """
    compact = re.sub(r"\s*([:=])\s*", r"\1", text or "")
    genes: list[str] = []
    weights: list[float] = []
    for item in (t for t in re.split(r"[,;\s]+", compact) if t):
        m = _ITEM.match(item)
        if not m:
            raise TumorError(f"gene set: cannot read {item!r} (use GENE or GENE:WEIGHT)")
        genes.append(m.group(1))
        weights.append(float(m.group(2)) if m.group(2) is not None else 1.0)
    if not genes:
        raise TumorError("gene set: empty (give at least one gene symbol)")
    return Signature.create(genes, weights)


def _signature(
    gene_set: Signature | Iterable[str] | Mapping[str, float] | str | None, weights
) -> tuple[Signature, bool]:
    """The signature and whether it is strict (user-given: missing genes are an error)."""
    if isinstance(gene_set, Signature):
        return gene_set, True
    return Signature.create(gene_set, weights), gene_set is not None
