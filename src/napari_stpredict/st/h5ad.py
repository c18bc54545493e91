"""AnnData ``.h5ad`` files in the scanpy/squidpy convention.

``obsm["spatial"]`` holds spot centres (x, y) in full-resolution image pixels; squidpy-style
``uns["spatial"][library_id]["scalefactors"]`` gives ``tissue_hires_scalef`` etc. for
``scale: hires|lowres`` and ``spot_diameter_fullres``. Raw counts come from ``X`` (default),
``layers[layer]`` or ``raw`` (``layer: raw``).
"""

from __future__ import annotations

import warnings
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from napari_stpredict.errors import DatasetError, first_line
from napari_stpredict.st._raw import RawSection
from napari_stpredict.st.manifest import SectionSpec
from napari_stpredict.st.visium import resolve_scale


def _scalefactors(adata: ad.AnnData) -> dict:
    spatial = adata.uns.get("spatial")
    if not isinstance(spatial, dict) or len(spatial) != 1:
        return {}
    lib = next(iter(spatial.values()))
    factors = lib.get("scalefactors", {}) if isinstance(lib, dict) else {}
    return {k: float(np.asarray(v)) for k, v in factors.items() if np.asarray(v).size == 1}


def counts_and_genes(adata: Any, spec: SectionSpec, what: str) -> tuple[sp.csr_matrix, list[str]]:
    """The counts (``spec.layer``: ``None`` = ``X``, ``"raw"`` or a layer name) and gene names
    (``spec.gene_column`` of ``var``, else its index) of an AnnData table.

    ``what`` names the table in errors (a path, or "the table in STORE").

    Raises
    ------
    DatasetError
        Missing ``.raw``, layer, expression matrix or gene column.
    """
    where = spec.where
    if spec.layer is None:
        X, var = adata.X, adata.var
    elif spec.layer == "raw":
        if adata.raw is None:
            raise DatasetError(f"{where}: field 'layer': {what} has no .raw")
        X, var = adata.raw.X, adata.raw.var
    else:
        if spec.layer not in adata.layers:
            raise DatasetError(
                f"{where}: field 'layer': {what} has no layer {spec.layer!r} "
                f"(layers: {', '.join(adata.layers.keys()) or 'none'})"
            )
        X, var = adata.layers[spec.layer], adata.var
    if X is None:
        raise DatasetError(f"{where}: {what} has no expression matrix")
    if spec.gene_column is None:
        genes = [str(g) for g in var.index]
    elif spec.gene_column not in var.columns:
        raise DatasetError(
            f"{where}: field 'gene_column': {what} has no var column {spec.gene_column!r} "
            f"(columns: {', '.join(map(str, var.columns)) or 'none'})"
        )
    else:
        genes = var[spec.gene_column].astype(str).tolist()
    return sp.csr_matrix(X, dtype=np.float32), genes


def read_h5ad_section(spec: SectionSpec) -> RawSection:
    """Read an ``.h5ad`` section into a :class:`RawSection`.

    Raises
    ------
    DatasetError
        Not an AnnData file, no ``obsm[spatial_key]``, missing layer or gene column.
    """
    path = spec.h5ad
    assert path is not None
    where = spec.where
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adata = ad.read_h5ad(path)
    except Exception as e:  # h5py/anndata raise many types for a foreign or corrupt file
        raise DatasetError(
            f"{where}: {path} is not a readable .h5ad file ({first_line(e)})"
        ) from None

    key = spec.spatial_key
    if key not in adata.obsm:
        raise DatasetError(
            f"{where}: {path} has no obsm[{key!r}] with spot pixel coordinates "
            f"(obsm keys: {', '.join(adata.obsm.keys()) or 'none'})"
        )
    xy = np.asarray(adata.obsm[key], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise DatasetError(f"{where}: {path} obsm[{key!r}] is not an (n, 2) array")
    xy = xy[:, :2]

    X, genes = counts_and_genes(adata, spec, str(path))

    factors = _scalefactors(adata)
    scale = resolve_scale(spec.scale, factors, where=where, source=f"{path} uns['spatial']")
    diameter = factors.get("spot_diameter_fullres")
    labels = None
    if spec.labels is None and spec.label_column in adata.obs.columns:
        labels = adata.obs[spec.label_column].astype("string").set_axis(adata.obs_names)
    return RawSection(
        X=X,
        genes=genes,
        spot_ids=pd.Index([str(i) for i in adata.obs_names]),
        xy=xy * scale,
        obs=pd.DataFrame(index=pd.Index([str(i) for i in adata.obs_names])),
        spot_diameter_px=float(diameter) * scale if diameter and diameter > 0 else None,
        labels=labels,
    )
