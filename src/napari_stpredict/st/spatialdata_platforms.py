"""Visium HD and Xenium sections: platform folders read with ``spatialdata_io``, → pseudo-spots.

* ``visium_hd: DIR`` — a Space Ranger Visium HD ``outs`` folder, ``bin_size`` µm bins (default
  8) summed into pseudo-spots; the H&E is ``image`` (full-resolution pixels, times ``scale``)
  or the folder's hires/lowres image.
* ``xenium: DIR`` — a Xenium output bundle, cells (centroids in µm) summed into pseudo-spots;
  the H&E is ``image`` in morphology-image pixels (times ``scale``).

Both need the optional extra (``spatialdata-io``), imported when a section is read.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from napari_stpredict.errors import DatasetError
from napari_stpredict.st._raw import RawSection
from napari_stpredict.st.pseudo_spots import (
    PSEUDO_PITCH_UM,
    PSEUDO_SPOT_UM,
    aggregate_pseudo_spots,
)
from napari_stpredict.st.spatialdata_elements import (
    affine_to,
    apply_affine,
    coordinate_systems,
    element_names,
    read_quietly,
    shape_centres,
    table_counts,
)

#: Visium HD bin used by default (µm)
VISIUM_HD_BIN_UM = 8
#: The Xenium reader's switches: the cells table only (no boundaries, labels or images).
_XENIUM_CELLS_ONLY = {
    "cells_boundaries": False,
    "nucleus_boundaries": False,
    "cells_as_circles": False,
    "cells_labels": False,
    "nucleus_labels": False,
    "transcripts": False,
    "morphology_mip": False,
    "morphology_focus": False,
    "aligned_images": False,
    "cells_table": True,
}


def pseudo_spot_section(
    spec: Any,
    xy_um: np.ndarray,
    X: sp.csr_matrix,
    genes: list[str],
    *,
    um_to_img: np.ndarray,
    image: Path | None,
    mpp: float | None,
) -> RawSection:
    """Aggregate to pseudo-spots (µm) and map their centres into image pixels."""
    spot_um = spec.spot_diameter_um or PSEUDO_SPOT_UM
    pitch_um = spec.spot_pitch_um or PSEUDO_PITCH_UM
    ps = aggregate_pseudo_spots(xy_um, X, spot_um=spot_um, pitch_um=pitch_um)
    xy = apply_affine(um_to_img, ps.centers)
    scale = math.sqrt(abs(np.linalg.det(um_to_img[:2, :2])))
    obs = pd.DataFrame(
        {"array_row": ps.rows, "array_col": ps.cols, "n_members": ps.n_members},
        index=pd.Index(ps.ids),
    )
    return RawSection(
        X=ps.X,
        genes=genes,
        spot_ids=pd.Index(ps.ids),
        xy=xy,
        obs=obs,
        spot_diameter_px=spot_um * scale,
        spot_pitch_px=pitch_um * scale,
        image=image,
        mpp=mpp,
    )


def read_visium_hd(spec: Any) -> RawSection:
    """Visium HD: ``bin_size`` µm bins → pseudo-spots, H&E = ``image`` (full-res) or hires."""
    from napari_stpredict.st.spatialdata import require_extra

    where = spec.where
    folder = Path(spec.visium_hd)
    require_extra(where, "visium_hd", io=True)
    from spatialdata_io import visium_hd

    bin_um = int(spec.bin_size or VISIUM_HD_BIN_UM)
    sdata = read_quietly(
        lambda: visium_hd(folder, bin_size=bin_um, load_all_images=False),
        f"{where}: field 'visium_hd': {folder} cannot be read",
    )
    tables = element_names(sdata.tables)
    if not tables:
        raise DatasetError(f"{where}: field 'visium_hd': {folder} has no {bin_um} µm bins")
    table = sdata.tables[tables[0]]
    xy_px, keep = _bin_centres_px(sdata, table)
    factors = _scalefactors(folder, bin_um)
    mpp_full = float(factors.get("microns_per_pixel") or 0) or None
    if mpp_full is None:
        raise DatasetError(
            f"{where}: field 'visium_hd': {folder} scalefactors give no microns_per_pixel"
        )
    X, genes = table_counts(table, spec, folder)
    X = X[np.nonzero(keep)[0]]
    image, s = _visium_hd_image(spec, folder, factors)
    # µm → image px: full-res px / mpp, times scale (hires/lowres images)
    um_to_img = np.diag([s / mpp_full, s / mpp_full, 1.0])
    return pseudo_spot_section(
        spec, xy_px * mpp_full, X, genes, um_to_img=um_to_img, image=image, mpp=mpp_full / s
    )


def _bin_centres_px(sdata: Any, table: Any) -> tuple[np.ndarray, np.ndarray]:
    """Full-resolution pixel centres of the bins the table annotates, and which rows have one."""
    region = table.uns.get("spatialdata_attrs", {}).get("region")
    region = region if isinstance(region, str) else next(iter(region))
    shapes = sdata.shapes[region]
    centres, _ = shape_centres(shapes)
    inst = table.obs[table.uns["spatialdata_attrs"]["instance_key"]].to_numpy()
    pos = pd.Index(shapes.index).get_indexer(inst)
    keep = pos >= 0
    systems = coordinate_systems(shapes)
    cs = "global" if "global" in systems else systems[0]
    return apply_affine(affine_to(shapes, cs), centres[pos[keep]]), keep


def _visium_hd_image(spec: Any, folder: Path, factors: dict) -> tuple[Path | None, float]:
    """The H&E and its scale relative to full-resolution pixels: ``image`` (times ``scale``),
    else the folder's hires or lowres image (times its scale factor)."""
    if spec.image is not None:
        return spec.image, float(spec.scale) if isinstance(spec.scale, (int, float)) else 1.0
    for key, name in (("hires", "tissue_hires_image.png"), ("lowres", "tissue_lowres_image.png")):
        p = folder / "spatial" / name
        if p.exists():
            return p, float(factors.get(f"tissue_{key}_scalef", 1.0))
    return None, 1.0


def _scalefactors(folder: Path, bin_um: int) -> dict:
    for p in (
        folder / "binned_outputs" / f"square_{bin_um:03d}um" / "spatial" / "scalefactors_json.json",
        folder / "spatial" / "scalefactors_json.json",
    ):
        if p.is_file():
            try:
                return json.loads(p.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
    return {}


def read_xenium(spec: Any) -> RawSection:
    """Xenium: cells (centroids in µm) → pseudo-spots; H&E = ``image`` in morphology pixels."""
    from napari_stpredict.st.spatialdata import require_extra

    where = spec.where
    folder = Path(spec.xenium)
    require_extra(where, "xenium", io=True)
    from spatialdata_io import xenium

    try:
        meta = json.loads((folder / "experiment.xenium").read_text(encoding="utf-8"))
        pixel_size = float(meta["pixel_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DatasetError(
            f"{where}: field 'xenium': {folder}/experiment.xenium gives no pixel_size ({e})"
        ) from None
    sdata = read_quietly(
        lambda: xenium(folder, **_XENIUM_CELLS_ONLY),
        f"{where}: field 'xenium': {folder} cannot be read",
    )
    tables = element_names(sdata.tables)
    if not tables:
        raise DatasetError(f"{where}: field 'xenium': {folder} has no cells table")
    table = sdata.tables[tables[0]]
    if "spatial" in table.obsm:
        xy_um = np.asarray(table.obsm["spatial"], dtype=np.float64)[:, :2]
    elif {"x_centroid", "y_centroid"} <= set(table.obs.columns):
        xy_um = table.obs[["x_centroid", "y_centroid"]].to_numpy(dtype=np.float64)
    else:
        raise DatasetError(f"{where}: field 'xenium': {folder} cells have no centroids")
    X, genes = table_counts(table, spec, folder)
    # the H&E (`image`) is taken in the morphology image frame (µm / pixel_size), times scale
    s = float(spec.scale) if isinstance(spec.scale, (int, float)) else 1.0
    um_to_img = np.diag([s / pixel_size, s / pixel_size, 1.0])
    return pseudo_spot_section(
        spec, xy_um, X, genes, um_to_img=um_to_img, image=spec.image, mpp=pixel_size / s
    )
