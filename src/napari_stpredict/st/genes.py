"""Gene names and gene panels (normalization is re-exported from its own module).

* **Aliases.** Old HGNC symbols are mapped to current ones (``CDCA1`` → ``NUF2``) in section
  var_names and in gene lists alike, so that data sets and panels of different ages meet.
* **Normalization** lives in :mod:`napari_stpredict.st.normalization` (re-exported here).
* **Panels.** The union over sections of each section's top-N highly variable genes, restricted
  to genes measured in every section (the choice of BLEEP/CMRCNet), or a gene list file.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from napari_stpredict.errors import DatasetError
from napari_stpredict.st.normalization import (
    Normalization,
    NormalizationMethod,
    _row_sums,
    library_size,
    normalize,
)

__all__ = [
    "GENE_ALIASES",
    "Normalization",
    "NormalizationMethod",
    "check_genes",
    "common_genes",
    "highly_variable_genes",
    "library_size",
    "load_gene_list",
    "make_unique",
    "normalize",
    "resolve_aliases",
    "select_genes",
]

# Previous HGNC symbol → current approved symbol. Only renames (not loose aliases) of genes seen
# in breast cancer and H&E-prediction panels: PAM50 (genefu still uses CDCA1/KNTC2/ORC6L), the
# HER2 amplicon (C17orf37, PERLD1), proliferation (KIAA0101) and frequent HVGs of the HER2ST
# counts, which use pre-2019 symbols (MARS, SEPT7, H2AFZ, ...).
GENE_ALIASES: dict[str, str] = {
    # PAM50
    "CDCA1": "NUF2",
    "KNTC2": "NDC80",
    "ORC6L": "ORC6",
    # HER2 (ERBB2) amplicon neighbours
    "C17orf37": "MIEN1",
    "PERLD1": "PGAP3",
    # proliferation / cell cycle
    "KIAA0101": "PCLAF",
    "FAM64A": "PIMREG",
    "HN1": "JPT1",
    # histones (2020 histone nomenclature)
    "H2AFZ": "H2AZ1",
    "H2AFX": "H2AX",
    "H2AFV": "H2AZ2",
    "H3F3A": "H3-3A",
    "H3F3B": "H3-3B",
    "HIST1H4C": "H4C3",
    "HIST1H1C": "H1-2",
    "HIST1H2BK": "H2BC12",
    # aminoacyl-tRNA synthetases (2019–2020 "1" suffix)
    "MARS": "MARS1",
    "WARS": "WARS1",
    "KARS": "KARS1",
    "QARS": "QARS1",
    "IARS": "IARS1",
    "LARS": "LARS1",
    "YARS": "YARS1",
    "TARS": "TARS1",
    "HARS": "HARS1",
    "SARS": "SARS1",
    "CARS": "CARS1",
    "DARS": "DARS1",
    "EPRS": "EPRS1",
    # septins
    "SEPT2": "SEPTIN2",
    "SEPT7": "SEPTIN7",
    "SEPT9": "SEPTIN9",
    # ATP synthase subunits
    "ATP5A1": "ATP5F1A",
    "ATP5B": "ATP5F1B",
    "ATP5C1": "ATP5F1C",
    "ATP5O": "ATP5PO",
    # stroma / matrix (CCN family renamed 2018)
    "CTGF": "CCN2",
    "CYR61": "CCN1",
    "NOV": "CCN3",
    "WISP1": "CCN4",
    "WISP2": "CCN5",
    # others frequent in tumour panels
    "C10orf54": "VSIR",
    "FAM46C": "TENT5C",
    "FAM132A": "C1QTNF12",
    "GPR56": "ADGRG1",
    "TCEB1": "ELOC",
    "TCEB2": "ELOB",
    "ERO1L": "ERO1A",
    "NGFRAP1": "BEX3",
    "TMEM2": "CEMIP2",
    "KIAA1199": "CEMIP",
}


def resolve_aliases(names: Iterable[str], *, aliases: Mapping[str, str] | None = None) -> list[str]:
    """Map old gene symbols to current ones.

    A name is renamed only when its current symbol is not itself among ``names``, so a table
    that has both keeps both columns and nothing is merged silently.

    Parameters
    ----------
    names
        Gene names (symbols, or ids that are left untouched).
    aliases
        Old → new table; defaults to :data:`GENE_ALIASES`.

    Examples
    --------
    >>> resolve_aliases(["CDCA1", "ERBB2", "KNTC2"])
    ['NUF2', 'ERBB2', 'NDC80']
    """
    table = GENE_ALIASES if aliases is None else aliases
    names = [str(n) for n in names]
    present = set(names)
    return [table[n] if n in table and table[n] not in present else n for n in names]


def make_unique(names: Sequence[str]) -> list[str]:
    """Append ``-1``, ``-2`` … to repeated names (the scanpy convention)."""
    seen: dict[str, int] = {}
    taken = set(names)
    out = []
    for n in names:
        if n not in seen:
            seen[n] = 0
            out.append(n)
            continue
        k = seen[n]
        while True:
            k += 1
            cand = f"{n}-{k}"
            if cand not in taken:
                break
        seen[n] = k
        taken.add(cand)
        out.append(cand)
    return out


def load_gene_list(path: str | os.PathLike, *, column: str | None = None) -> list[str]:
    """Read a gene list file.

    ``.txt`` one gene per line (blank lines and ``#`` comments skipped); ``.csv``/``.tsv`` a
    column (``column``, else the first of gene/genes/symbol/gene_symbol/name/probe, else the
    first column; ``#`` comment lines skipped); ``.npy`` a 1-D array of strings (loaded without
    pickle); ``.json`` a list of strings. Aliases are not applied here (see
    :func:`select_genes`).

    Raises
    ------
    DatasetError
        Missing, unreadable or empty file, object arrays in ``.npy``, unknown column.
    """
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"{p}: gene list not found")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            try:
                arr = np.load(p, allow_pickle=False)
            except ValueError:
                raise DatasetError(
                    f"{p}: gene list .npy holds Python objects; save it as a string array "
                    "(np.save(path, np.array(genes, dtype=str)))"
                ) from None
            if arr.dtype.kind not in "US" or arr.ndim != 1:
                raise DatasetError(
                    f"{p}: gene list .npy must be a 1-D array of strings, got {arr.dtype} {arr.shape}"
                )
            genes = [g.decode() if isinstance(g, bytes) else str(g) for g in arr.tolist()]
        elif suffix in (".csv", ".tsv"):
            df = pd.read_csv(p, sep="," if suffix == ".csv" else "\t", comment="#", dtype=str)
            if column is None:
                lower = {str(c).lower(): c for c in df.columns}
                pick = next(
                    (
                        lower[k]
                        for k in ("gene", "genes", "symbol", "gene_symbol", "name", "probe")
                        if k in lower
                    ),
                    df.columns[0],
                )
            elif column in df.columns:
                pick = column
            else:
                raise DatasetError(
                    f"{p}: gene list has no column {column!r} (columns: {', '.join(map(str, df.columns))})"
                )
            genes = df[pick].dropna().astype(str).str.strip().tolist()
        elif suffix == ".json":
            data = json.loads(p.read_text(encoding="utf-8"))
            if not isinstance(data, list) or not all(isinstance(g, str) for g in data):
                raise DatasetError(f"{p}: gene list .json must be a list of strings")
            genes = list(data)
        else:
            lines = p.read_text(encoding="utf-8").splitlines()
            genes = [ln.split("#", 1)[0].strip() for ln in lines]
    except DatasetError:
        raise
    except (
        OSError,
        UnicodeDecodeError,
        ValueError,
        pd.errors.ParserError,
        pd.errors.EmptyDataError,
    ) as e:
        raise DatasetError(f"{p}: gene list cannot be read ({e})") from None
    genes = [g for g in genes if g]
    if not genes:
        raise DatasetError(f"{p}: gene list is empty (no gene)")
    return list(dict.fromkeys(genes))


def common_genes(adatas: Sequence) -> list[str]:
    """Genes measured in every section, in the first section's order.

    Raises
    ------
    DatasetError
        If the sections share no gene name.
    """
    if not adatas:
        raise DatasetError("no sections given")
    shared = set(adatas[0].var_names)
    for a in adatas[1:]:
        shared &= set(a.var_names)
    if not shared:
        names = [_section_name(a) for a in adatas]
        examples = ", ".join(
            f"{n} has {a.var_names[0]!r}" for n, a in zip(names, adatas, strict=True)
        )
        raise DatasetError(
            f"sections {', '.join(names)} share no gene names ({examples}); use the same naming "
            "(symbols vs ids) in every section"
        )
    return [g for g in adatas[0].var_names if g in shared]


def _section_name(adata) -> str:
    return str(adata.uns.get("stpredict", {}).get("section", "?"))


def highly_variable_genes(
    X,
    *,
    n_top: int,
    genes: Sequence[str],
    target_sum: float = 1e4,
    library_size: np.ndarray | None = None,
) -> list[str]:
    """Top ``n_top`` highly variable genes of one section (scanpy's ``seurat`` flavour).

    Counts are library-size normalized to ``target_sum``; per gene, the dispersion
    ``var / mean`` is log-transformed and z-scored within 20 bins of ``log1p(mean)``; genes
    are ranked by that normalized dispersion. Genes never detected are not ranked.

    Parameters
    ----------
    X
        Counts, spots × genes (sparse or dense), columns matching ``genes``.
    library_size
        Per-spot totals (default: row sums of ``X``); pass the totals over all genes when ``X``
        holds a subset of them.
    """
    Xs = sp.csr_matrix(X, dtype=np.float64)
    lib = _row_sums(Xs) if library_size is None else np.asarray(library_size, dtype=np.float64)
    factor = np.divide(target_sum, lib, out=np.zeros_like(lib), where=lib > 0)
    N = sp.diags(factor) @ Xs
    n = N.shape[0]
    mean = np.asarray(N.mean(axis=0)).ravel()
    mean_sq = np.asarray(N.multiply(N).mean(axis=0)).ravel()
    var = (mean_sq - mean**2) * (n / max(n - 1, 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        disp = np.log(var / mean)
    ok = (mean > 0) & np.isfinite(disp)
    log_mean = np.log1p(mean)
    frame = pd.DataFrame({"m": log_mean[ok], "d": disp[ok]})
    if len(frame) == 0:
        return []
    frame["bin"] = pd.cut(frame["m"], bins=20)
    grp = frame.groupby("bin", observed=True)["d"]
    bmean, bstd = grp.transform("mean"), grp.transform("std")
    norm = ((frame["d"] - bmean) / bstd).to_numpy(copy=True)  # pandas 3: views are read-only
    single = ~np.isfinite(bstd.to_numpy())
    norm[single] = 1.0  # a gene alone in its bin (scanpy does the same)
    norm = np.nan_to_num(norm, nan=0.0)
    idx = np.nonzero(ok)[0]
    order = np.argsort(-norm, kind="stable")[:n_top]
    return [genes[i] for i in idx[order]]


def select_genes(
    adatas: Sequence,
    *,
    n_top: int = 1000,
    gene_list: str | os.PathLike | Sequence[str] | None = None,
    missing: Literal["error", "drop"] = "error",
    aliases: Mapping[str, str] | None = None,
) -> list[str]:
    """Choose the gene panel for training.

    Parameters
    ----------
    adatas
        Sections from :func:`~napari_stpredict.st.read_section` (aliases already resolved).
    n_top
        Without ``gene_list``: the union over sections of each section's top ``n_top`` highly
        variable genes among the genes measured in every section, sorted by name.
    gene_list
        A gene list file (see :func:`load_gene_list`) or a sequence of names; aliases are
        resolved and the order kept.
    missing
        Genes of the list not measured in every section: ``"error"`` (default) raises,
        ``"drop"`` drops them with a warning.

    Returns
    -------
    list of str

    Raises
    ------
    DatasetError
        Sections with no shared genes; unknown genes in the list (``missing="error"``, with a
        few named); an empty panel.
    """
    shared = common_genes(adatas)
    if gene_list is None:
        if n_top < 1:
            raise DatasetError(f"n_top {n_top}: expected a positive number of genes")
        shared_set = set(shared)
        union: set[str] = set()
        for a in adatas:
            cols = [i for i, g in enumerate(a.var_names) if g in shared_set]
            X = sp.csr_matrix(a.X)
            union.update(
                highly_variable_genes(
                    X[:, cols],
                    n_top=n_top,
                    genes=[a.var_names[i] for i in cols],
                    library_size=library_size(X),  # whole-spot totals, not just shared genes
                )
            )
        if not union:
            raise DatasetError(
                "no highly variable genes: every shared gene is zero in every section"
            )
        return sorted(union)

    source = str(gene_list) if isinstance(gene_list, str | os.PathLike) else "gene list"
    names = (
        load_gene_list(gene_list)
        if isinstance(gene_list, str | os.PathLike)
        else [str(g) for g in gene_list]
    )
    names = list(dict.fromkeys(resolve_aliases(names, aliases=aliases)))
    return check_genes(adatas, names, missing=missing, source=source, shared=shared)


def check_genes(
    adatas: Sequence,
    genes: Sequence[str],
    *,
    missing: Literal["error", "drop"] = "error",
    source: str = "gene list",
    shared: Sequence[str] | None = None,
) -> list[str]:
    """Check that every gene is measured in every section; drop or raise for the others."""
    shared_set = set(common_genes(adatas) if shared is None else shared)
    absent = [g for g in genes if g not in shared_set]
    if absent and missing == "error":
        any_names = set().union(*(set(a.var_names) for a in adatas))
        nowhere = [g for g in absent if g not in any_names]
        some = [g for g in absent if g in any_names]
        parts = []
        if nowhere:
            parts.append(
                f"{len(nowhere)} in no section ({', '.join(nowhere[:5])}{', …' if len(nowhere) > 5 else ''})"
            )
        if some:
            g = some[0]
            lacking = [_section_name(a) for a in adatas if g not in set(a.var_names)]
            parts.append(
                f"{len(some)} missing from some sections ({', '.join(some[:5])}"
                f"{', …' if len(some) > 5 else ''}; e.g. {g!r} not in {', '.join(lacking[:3])})"
            )
        raise DatasetError(
            f"{source}: {len(absent)} of {len(genes)} genes are not measured in every section: "
            f"{'; '.join(parts)} (remove them from the list, or pass missing='drop')"
        )
    if absent:
        warnings.warn(
            f"{source}: dropping {len(absent)} of {len(genes)} genes not measured in every section "
            f"({', '.join(absent[:5])}{', …' if len(absent) > 5 else ''})",
            stacklevel=2,
        )
    kept = [g for g in genes if g in shared_set]
    if not kept:
        raise DatasetError(f"{source}: none of its {len(genes)} genes is measured in every section")
    return kept
