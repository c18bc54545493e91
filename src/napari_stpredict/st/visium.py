"""10x Genomics Space Ranger ``outs`` folders (Visium).

Reads ``filtered_feature_bc_matrix.h5`` (or the ``filtered_feature_bc_matrix/`` MEX folder),
``spatial/tissue_positions.csv`` (Space Ranger ≥ 2, with header) or
``spatial/tissue_positions_list.csv`` (older, no header) and ``spatial/scalefactors_json.json``.
Positions are in full-resolution pixels; ``scale: hires|lowres`` maps them onto the
``tissue_hires_image.png`` / ``tissue_lowres_image.png`` shipped in ``spatial/``.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

from napari_stpredict.errors import DatasetError
from napari_stpredict.st._raw import RawSection
from napari_stpredict.st.manifest import SectionSpec
from napari_stpredict.st.pitch import estimate_spot_pitch

POSITION_COLUMNS = [
    "barcode",
    "in_tissue",
    "array_row",
    "array_col",
    "pxl_row_in_fullres",
    "pxl_col_in_fullres",
]
_POSITION_FILES = ("tissue_positions.csv", "tissue_positions_list.csv")
_IMAGE_FOR_SCALE = {"hires": "tissue_hires_image.png", "lowres": "tissue_lowres_image.png"}


def _matrix_source(outs: Path) -> Path | None:
    for name in ("filtered_feature_bc_matrix.h5", "filtered_feature_bc_matrix"):
        if (outs / name).exists():
            return outs / name
    return None


def _positions_file(outs: Path) -> Path | None:
    for name in _POSITION_FILES:
        if (outs / "spatial" / name).exists():
            return outs / "spatial" / name
    return None


def check_visium_folder(spec: SectionSpec) -> None:
    """Check that a Space Ranger folder has a matrix, positions and (when needed) scale factors."""
    outs = spec.visium
    assert outs is not None
    if _matrix_source(outs) is None:
        raise DatasetError(
            f"{spec.where}: field 'visium': {outs} has no filtered_feature_bc_matrix.h5 "
            "(expected a Space Ranger 'outs' folder)"
        )
    if _positions_file(outs) is None:
        raise DatasetError(
            f"{spec.where}: field 'visium': {outs}/spatial has no tissue_positions.csv "
            "or tissue_positions_list.csv"
        )
    if (
        isinstance(spec.scale, str)
        and spec.scale != "fullres"
        and not (outs / "spatial" / "scalefactors_json.json").exists()
    ):
        raise DatasetError(
            f"{spec.where}: field 'scale': {spec.scale!r} needs {outs}/spatial/scalefactors_json.json"
        )


def default_image(spec: SectionSpec) -> tuple[Path, str] | None:
    """The image used when the manifest names none: hires, else lowres, from ``spatial/``."""
    outs = spec.visium
    assert outs is not None
    for scale, name in _IMAGE_FOR_SCALE.items():
        p = outs / "spatial" / name
        if p.exists():
            return p, scale
    return None


def read_scalefactors(outs: Path, *, where: str) -> dict:
    """``spatial/scalefactors_json.json`` as a dict (empty when absent)."""
    path = outs / "spatial" / "scalefactors_json.json"
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{where}: {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{where}: {path} is not a JSON object")
    return data


def resolve_scale(scale: float | str | None, factors: dict, *, where: str, source: str) -> float:
    """A numeric scale from a number or ``fullres``/``hires``/``lowres`` and the scale factors."""
    if scale is None or scale == "fullres":
        return 1.0
    if isinstance(scale, str):
        key = f"tissue_{scale}_scalef"
        value = factors.get(key)
        if not isinstance(value, int | float) or not value > 0:
            raise DatasetError(f"{where}: field 'scale': {source} has no valid {key}")
        return float(value)
    return float(scale)


def _decode(arr) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in arr]


def read_10x_h5(path: Path, *, where: str, gene_column: str | None = None):
    """Read a 10x ``.h5`` feature-barcode matrix (Cell Ranger ≥ 3 and the older v2 layout).

    Returns
    -------
    X (barcodes × genes, CSR float32), genes, barcodes
    """
    gene_key = gene_column or "name"
    if gene_key not in ("name", "id"):
        raise DatasetError(
            f"{where}: field 'gene_column': expected 'name' or 'id' for a 10x matrix"
        )
    try:
        with h5py.File(path, "r") as f:
            if "matrix" in f:
                g = f["matrix"]
                feat = g["features"]
                genes = _decode(feat[gene_key][:])
                if "feature_type" in feat:
                    types = np.array(_decode(feat["feature_type"][:]))
                    keep = types == "Gene Expression"
                else:
                    keep = np.ones(len(genes), dtype=bool)
            else:  # Cell Ranger 2: one group per genome
                groups = [k for k in f if isinstance(f[k], h5py.Group)]
                if not groups:
                    raise DatasetError(f"{where}: {path} is not a 10x feature-barcode matrix")
                g = f[groups[0]]
                genes = _decode(g["gene_names" if gene_key == "name" else "genes"][:])
                keep = np.ones(len(genes), dtype=bool)
            n_genes, n_bc = (int(v) for v in g["shape"][:])
            barcodes = _decode(g["barcodes"][:])
            data = g["data"][:].astype(np.float32)
            indices = g["indices"][:]
            indptr = g["indptr"][:]
    except DatasetError:
        raise
    except (OSError, KeyError, ValueError) as e:
        raise DatasetError(f"{where}: {path} is not a readable 10x .h5 matrix ({e})") from None
    # the matrix is stored genes × barcodes in CSC order, i.e. barcodes × genes in CSR order
    X = sp.csr_matrix((data, indices, indptr), shape=(n_bc, n_genes))
    if not keep.all():
        X = X[:, np.nonzero(keep)[0]]
        genes = [gname for gname, k in zip(genes, keep, strict=True) if k]
    return X.tocsr(), genes, pd.Index(barcodes)


def _read_mex(folder: Path, *, where: str, gene_column: str | None):
    def find(stem: str) -> Path:
        for name in (f"{stem}.gz", stem):
            if (folder / name).exists():
                return folder / name
        raise DatasetError(f"{where}: {folder} has no {stem}(.gz)")

    mtx = find("matrix.mtx")
    try:
        with gzip.open(mtx) if mtx.suffix == ".gz" else open(mtx, "rb") as fh:
            M = scipy.io.mmread(fh)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{where}: {mtx} is not a readable Matrix Market file ({e})") from None
    feats = pd.read_csv(find("features.tsv"), sep="\t", header=None)
    barcodes = pd.read_csv(find("barcodes.tsv"), sep="\t", header=None)[0].astype(str)
    col = 1 if (gene_column or "name") == "name" and feats.shape[1] > 1 else 0
    genes = feats[col].astype(str).tolist()
    X = sp.csr_matrix(M.T, dtype=np.float32)
    if feats.shape[1] > 2:
        keep = (feats[2] == "Gene Expression").to_numpy()
        X = X[:, np.nonzero(keep)[0]]
        genes = [g for g, k in zip(genes, keep, strict=True) if k]
    return X, genes, pd.Index(barcodes)


def read_positions(path: Path, *, where: str) -> pd.DataFrame:
    """Read tissue positions with or without a header into the Space Ranger 2 column names."""
    try:
        first = path.read_text(encoding="utf-8").split("\n", 1)[0]
        header = 0 if first.lower().startswith("barcode") else None
        df = pd.read_csv(path, header=header)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise DatasetError(f"{where}: {path} cannot be read: {e}") from None
    if df.shape[1] != len(POSITION_COLUMNS):
        raise DatasetError(
            f"{where}: {path} has {df.shape[1]} columns, expected {len(POSITION_COLUMNS)} "
            f"({', '.join(POSITION_COLUMNS)})"
        )
    df.columns = POSITION_COLUMNS
    df["barcode"] = df["barcode"].astype(str)
    return df.set_index("barcode")


def read_visium_section(spec: SectionSpec) -> RawSection:
    """Read a Space Ranger ``outs`` folder into a :class:`RawSection`.

    Spots are the barcodes of the filtered matrix that have a position; spot centres are
    ``(pxl_col_in_fullres, pxl_row_in_fullres) × scale``.
    """
    outs = spec.visium
    assert outs is not None
    where = spec.where
    check_visium_folder(spec)
    src = _matrix_source(outs)
    assert src is not None
    if src.is_dir():
        X, genes, barcodes = _read_mex(src, where=where, gene_column=spec.gene_column)
    else:
        X, genes, barcodes = read_10x_h5(src, where=where, gene_column=spec.gene_column)
    pos_file = _positions_file(outs)
    assert pos_file is not None
    pos = read_positions(pos_file, where=where)
    factors = read_scalefactors(outs, where=where)

    scale_spec = spec.scale
    if scale_spec is None and spec.image is None:
        found = default_image(spec)
        scale_spec = found[1] if found else None
    elif scale_spec is None and spec.image is not None:
        # the images Space Ranger writes next to the positions are downscaled copies
        for name_scale, fname in _IMAGE_FOR_SCALE.items():
            if spec.image.name == fname:
                scale_spec = name_scale
    scale = resolve_scale(scale_spec, factors, where=where, source=str(outs / "spatial"))

    idx = pos.index.get_indexer(barcodes)
    keep = idx >= 0
    if not keep.any():
        raise DatasetError(f"{where}: no barcode of {src} has a position in {pos_file}")
    rows = np.nonzero(keep)[0]
    p = pos.iloc[idx[rows]]
    xy = p[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64) * scale
    all_xy = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)
    pitch = estimate_spot_pitch(all_xy[np.isfinite(all_xy).all(axis=1)])
    diameter = factors.get("spot_diameter_fullres")
    diameter_px = (
        float(diameter) * scale if isinstance(diameter, int | float) and diameter > 0 else None
    )
    return RawSection(
        X=X[rows],
        genes=genes,
        spot_ids=barcodes[rows],
        xy=xy,
        obs=p[["in_tissue", "array_row", "array_col"]].set_axis(barcodes[rows]),
        spot_diameter_px=diameter_px,
        spot_pitch_px=pitch * scale if pitch is not None else None,
        n_dropped=int((~keep).sum()),
    )
