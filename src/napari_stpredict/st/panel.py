"""The default training panel: markers ∪ highly expressed genes ∪ highly variable genes.

:func:`build_panel` (what ``stpredict train`` uses without ``--genes``), :func:`describe_panel`
(the marker report of a given panel) and :func:`marker_report` (the lines printed at the end of
training, from a model's metadata). The gene sets themselves live in
:mod:`napari_stpredict.st.genesets`, which re-exports these names.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from napari_stpredict.errors import DatasetError
from napari_stpredict.st.genesets import (
    DEFAULT_MARKER_SET,
    MIN_SIGNATURE_GENES,
    MarkerSet,
    SignatureError,
    _signature_genes,
    _union,
    marker_set,
    match_genes,
    resolve_signature,
)

__all__ = ["Panel", "build_panel", "describe_panel", "highly_expressed_genes", "marker_report"]


@dataclass(frozen=True)
class Panel:
    """A gene panel and what it says about the markers.

    Attributes
    ----------
    genes
        The panel, in model column order: markers first, then HEG, then HVG (by name).
    marker_set
        The marker set's name (or file).
    requested
        Marker genes asked for (set markers, its tumour signature and ``add_genes``).
    in_panel, missing
        Requested genes that are in the panel / that are not (not measured in every section,
        or never detected in the training sections, or absent from a given gene list).
    tumor_signature
        The signature genes in the panel (empty when fewer than :data:`MIN_SIGNATURE_GENES`).
    counts
        ``{"markers", "heg", "hvg"}``: genes each source contributed (a gene counts once, for
        the first source that brought it).
    source
        ``"default"`` (built by :func:`build_panel`) or ``"gene list"`` (given; the markers
        are only reported).
    """

    genes: list[str]
    marker_set: str
    requested: tuple[str, ...]
    in_panel: tuple[str, ...]
    missing: tuple[str, ...]
    tumor_signature: tuple[str, ...]
    counts: Mapping[str, int] = field(default_factory=dict)
    source: str = "default"

    def metadata(self) -> dict[str, Any]:
        """The model-file metadata keys ``markers`` and ``tumor_signature``."""
        return {
            "markers": {
                "set": self.marker_set,
                "in_panel": list(self.in_panel),
                "missing": list(self.missing),
                "panel": self.source,
            },
            "tumor_signature": list(self.tumor_signature),
        }

    def summary(self) -> list[str]:
        """Lines for the end of ``stpredict train`` (see :func:`marker_report`)."""
        return marker_report({"genes": self.genes, **self.metadata()})


def marker_report(metadata: Mapping[str, Any]) -> list[str]:
    """What a model can and cannot do, from its metadata: markers in the panel, markers asked
    for but not measured, the tumour signature (printed at the end of ``stpredict train``).

    Old model files without ``markers`` give one line saying so.
    """
    genes = metadata.get("genes") or []
    rec = metadata.get("markers")
    if not isinstance(rec, Mapping):
        return [f"markers: not recorded in this model file ({len(genes)} genes)"]
    in_panel = [str(g) for g in rec.get("in_panel") or []]
    missing = [str(g) for g in rec.get("missing") or []]
    lines = [
        f"markers ({rec.get('set', '?')}): {len(in_panel)} of {len(in_panel) + len(missing)} "
        f"in the {len(genes)}-gene panel" + (f": {', '.join(in_panel)}" if in_panel else "")
    ]
    if missing:
        why = (
            "not in the given gene list"
            if rec.get("panel") == "gene list"
            else "not measured in every section"
        )
        lines.append(f"markers requested but {why} ({len(missing)}): {', '.join(missing)}")
    sig = _signature_genes(metadata.get("tumor_signature"))
    if sig:
        lines.append(f"tumour signature: {', '.join(sig)}")
    else:
        lines.append(
            f"tumour signature: fewer than {MIN_SIGNATURE_GENES} signature genes in the panel: "
            "this model cannot make the default tumour layer"
        )
    return lines


def highly_expressed_genes(
    adatas: Sequence, n_top: int, *, genes: Sequence[str] | None = None, target_sum: float = 1e4
) -> list[str]:
    """Top ``n_top`` genes by mean log1p-CPM over all spots of ``adatas`` (the paper's HEG).

    ``genes`` restricts the ranking (default: the genes of every section). Descending order.
    """
    from napari_stpredict.st.genes import common_genes

    genes = list(common_genes(adatas) if genes is None else genes)
    if n_top <= 0 or not genes:
        return []
    total = np.zeros(len(genes))
    n = 0
    for a in adatas:
        pos = {g: i for i, g in enumerate(a.var_names)}
        X = sp.csr_matrix(a.X, dtype=np.float64)
        lib = np.asarray(X.sum(axis=1)).ravel()
        f = np.divide(target_sum, lib, out=np.zeros_like(lib), where=lib > 0)
        sub = (sp.diags(f) @ X[:, [pos[g] for g in genes]]).tocsr()
        sub.data = np.log1p(sub.data)
        total += np.asarray(sub.sum(axis=0)).ravel()
        n += X.shape[0]
    mean = total / max(n, 1)
    order = np.argsort(-mean, kind="stable")[:n_top]
    return [genes[i] for i in order if mean[i] > 0]


def describe_panel(
    genes: Sequence[str],
    markers: str | os.PathLike | MarkerSet | None = DEFAULT_MARKER_SET,
    *,
    add_genes: Iterable[str] | None = None,
    counts: Mapping[str, int] | None = None,
    source: str = "gene list",
) -> Panel:
    """The marker report of a given panel (e.g. one from a ``--genes`` file)."""
    from napari_stpredict.st.genes import resolve_aliases

    ms = marker_set(markers)
    extra = resolve_aliases([str(g) for g in (add_genes or ())])
    requested = _union(ms.panel_genes(), extra)
    idx, missing = match_genes(genes, requested)
    in_panel = tuple(str(genes[i]) for i in idx)
    try:
        sig, _ = resolve_signature(genes, ms.tumor_signature)
    except SignatureError:
        sig = []
    return Panel(
        list(genes),
        ms.name,
        requested,
        in_panel,
        tuple(missing),
        tuple(sig),
        dict(counts or {}),
        source,
    )


def build_panel(
    adatas: Sequence,
    *,
    markers: str | os.PathLike | MarkerSet | None = DEFAULT_MARKER_SET,
    add_genes: Iterable[str] | None = None,
    n_heg: int = 250,
    n_hvg: int = 1000,
    measured_in: Sequence | None = None,
) -> Panel:
    """The default training panel: markers ∪ top-``n_heg`` HEG ∪ union of per-section HVGs.

    Parameters
    ----------
    adatas
        The training sections (from :func:`~napari_stpredict.st.read_section`: raw counts,
        current symbols). They alone choose the HEG and HVG.
    markers
        Marker set name, gene list file or :class:`MarkerSet` (``"none"``: no markers).
    add_genes
        More genes to include (old symbols resolved), reported like markers.
    n_heg, n_hvg
        Highly expressed genes over all training spots; highly variable genes per section
        (their union is taken). 0 turns a source off.
    measured_in
        Other sections (e.g. validation) every panel gene must also be measured in.

    Returns
    -------
    Panel
        A marker is kept when every section has it and the training sections detect it (some
        count); the others are listed in ``Panel.missing``.

    Raises
    ------
    DatasetError
        Sections sharing no gene; an empty panel.
    """
    from napari_stpredict.st.genes import common_genes, resolve_aliases, select_genes

    if n_heg < 0 or n_hvg < 0:
        raise DatasetError(f"n_heg={n_heg}, n_hvg={n_hvg}: expected numbers of genes ≥ 0")
    ms = marker_set(markers)
    extra = resolve_aliases([str(g) for g in (add_genes or ())])
    requested = _union(ms.panel_genes(), extra)
    everywhere = [*adatas, *(measured_in or [])]
    shared = common_genes(everywhere)
    shared_set = set(shared)
    detected = _detected(adatas, requested)
    idx, _ = match_genes(shared, requested)
    marker_genes = [shared[i] for i in idx if shared[i] in detected]
    heg = highly_expressed_genes(adatas, n_heg, genes=shared) if n_heg else []
    hvg = [g for g in select_genes(adatas, n_top=n_hvg) if g in shared_set] if n_hvg else []
    panel = list(dict.fromkeys([*marker_genes, *heg, *hvg]))
    if not panel:
        raise DatasetError(
            "gene panel: empty (no requested marker is measured in every section; turn on HEG or HVG)"
        )
    n_mark = len(marker_genes)
    n_heg_new = len(set(heg) - set(marker_genes))
    counts = {"markers": n_mark, "heg": n_heg_new, "hvg": len(panel) - n_mark - n_heg_new}
    return describe_panel(panel, ms, add_genes=extra, counts=counts, source="default")


def _detected(adatas: Sequence, genes: Sequence[str]) -> set[str]:
    """The genes with a non-zero count somewhere in ``adatas`` (case-insensitive match)."""
    out: set[str] = set()
    for a in adatas:
        names = [str(g) for g in a.var_names]
        idx, _ = match_genes(names, genes)
        if not idx:
            continue
        sums = np.asarray(sp.csr_matrix(a.X)[:, idx].sum(axis=0)).ravel()
        out.update(names[i] for i, s in zip(idx, sums, strict=True) if s > 0)
    return out
