"""SpatialData, Visium HD and Xenium sections (optional extra ``napari-stpredict[spatialdata]``).

Three section kinds of the manifest read through the scverse ``spatialdata`` stack:

* ``spatialdata: PATH.zarr`` — any SpatialData store. A table annotating a shapes element
  gives the spots (circles or polygons; their centroids), an image element the H&E. The table,
  image, shapes and coordinate system are chosen automatically when there is one of each
  (``elements: {table, image, shapes, coordinate_system}`` names them otherwise). Spot centres
  are mapped through the transformations into level-0 pixels of the image element, which is
  read like any OME-Zarr slide (``PATH.zarr/images/NAME``).
* ``visium_hd: DIR`` — a Space Ranger Visium HD ``outs`` folder, read with
  ``spatialdata_io.visium_hd`` (``bin_size`` µm bins, default 8).
* ``xenium: DIR`` — a Xenium output bundle, read with ``spatialdata_io.xenium`` (cells table).

Visium HD bins and Xenium cells are summed into spot-sized **pseudo-spots** on a regular square
grid (:func:`aggregate_pseudo_spots`): discs of ``spot_diameter_um`` (default 55) every
``spot_pitch_um`` (default 100), like Visium, so the model trains on the same kind of target.

The aggregation itself is plain numpy/scipy and works without the extra.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from napari_stpredict.errors import DatasetError
from napari_stpredict.st._raw import RawSection

INSTALL_HINT = "pip install 'napari-stpredict[spatialdata]'"
#: pseudo-spot defaults (Visium: 55 µm spots, 100 µm centre to centre)
PSEUDO_SPOT_UM = 55.0
PSEUDO_PITCH_UM = 100.0
#: Visium HD bin used by default (µm)
VISIUM_HD_BIN_UM = 8
#: the kinds read here
SPATIALDATA_KINDS = ("spatialdata", "visium_hd", "xenium")


def have_spatialdata(io: bool = False) -> bool:
    """Whether spatialdata (and spatialdata-io with ``io``) is installed; nothing is imported."""
    from importlib.util import find_spec

    if find_spec("spatialdata") is None:
        return False
    return not io or find_spec("spatialdata_io") is not None


def require_extra(where: str, field: str, *, io: bool = False) -> None:
    """One-line :class:`DatasetError` naming the extra when the packages are missing."""
    if not have_spatialdata(io=io):
        what = "spatialdata-io" if io else "spatialdata"
        raise DatasetError(
            f"{where}: field {field!r}: reading it needs {what}, in the optional extra: "
            f"{INSTALL_HINT}"
        )


# --------------------------------------------------------------------------------------------
# pseudo-spots


@dataclass
class PseudoSpots:
    """Observations (bins, cells, transcripts) summed into spots on a square grid.

    Attributes
    ----------
    X
        (n_spots, genes) CSR float32, the summed counts.
    centers
        (n_spots, 2) spot centres ``(x, y)`` in the input's units (µm).
    rows, cols
        Grid row/column of each spot.
    n_members
        Observations summed into each spot.
    ids
        ``"r{row}_c{col}"`` per spot.
    """

    X: sp.csr_matrix
    centers: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    n_members: np.ndarray
    ids: list[str]


def aggregate_pseudo_spots(
    xy_um: np.ndarray,
    X: Any,
    *,
    spot_um: float = PSEUDO_SPOT_UM,
    pitch_um: float = PSEUDO_PITCH_UM,
    origin: tuple[float, float] | None = None,
    min_members: int = 1,
) -> PseudoSpots:
    """Sum observations into discs of ``spot_um`` centred every ``pitch_um`` on a square grid.

    An observation (bin, cell or transcript at ``xy_um``) belongs to every disc whose centre is
    within ``spot_um / 2`` of it (discs overlap when ``spot_um > pitch_um``); observations
    between discs are left out, as on a Visium array. Grid centres are
    ``origin + (col, row) × pitch_um``; ``origin`` defaults to the lower-left corner of the
    data plus half a spot.

    Parameters
    ----------
    xy_um
        (n, 2) positions ``(x, y)`` in µm.
    X
        (n, genes) counts (dense or sparse); transcripts: one-hot rows.
    min_members
        Spots with fewer observations are dropped.

    Raises
    ------
    DatasetError
        Bad sizes, shapes that do not match, or no spot with ``min_members`` observations.
    """
    xy = np.asarray(xy_um, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise DatasetError(f"pseudo-spots: positions must be (n, 2), got {xy.shape}")
    if not (spot_um > 0 and pitch_um > 0 and math.isfinite(spot_um) and math.isfinite(pitch_um)):
        raise DatasetError(
            f"pseudo-spots: size {spot_um!r} and pitch {pitch_um!r} must be positive µm"
        )
    Xs = sp.csr_matrix(X, dtype=np.float32)
    if Xs.shape[0] != len(xy):
        raise DatasetError(f"pseudo-spots: {len(xy)} positions but {Xs.shape[0]} rows of counts")
    ok = np.isfinite(xy).all(axis=1)
    r = spot_um / 2.0
    if origin is None:
        lo = xy[ok].min(axis=0) if ok.any() else np.zeros(2)
        origin = (float(lo[0] + r), float(lo[1] + r))
    ox, oy = origin
    gx = (xy[:, 0] - ox) / pitch_um
    gy = (xy[:, 1] - oy) / pitch_um
    reach = math.ceil(r / pitch_um)
    obs_l, row_l, col_l = [], [], []
    gx = np.where(ok, gx, np.nan)
    gy = np.where(ok, gy, np.nan)
    for dr in range(-reach, reach + 1):
        for dc in range(-reach, reach + 1):
            with np.errstate(invalid="ignore"):
                c = np.floor(gx + 0.5) + dc
                rr = np.floor(gy + 0.5) + dr
                d2 = ((gx - c) ** 2 + (gy - rr) ** 2) * pitch_um**2
                hit = ok & (d2 <= r * r + 1e-9)
            idx = np.nonzero(hit)[0]
            obs_l.append(idx)
            row_l.append(rr[idx].astype(np.int64))
            col_l.append(c[idx].astype(np.int64))
    obs = np.concatenate(obs_l)
    rows = np.concatenate(row_l)
    cols = np.concatenate(col_l)
    if not len(obs):
        raise DatasetError(
            f"pseudo-spots: no observation lies within {spot_um:g} µm spots every {pitch_um:g} µm"
        )
    keys = np.stack([rows, cols], axis=1)
    uniq, spot_of = np.unique(keys, axis=0, return_inverse=True)
    spot_of = spot_of.ravel()
    A = sp.csr_matrix(
        (np.ones(len(obs), dtype=np.float32), (spot_of, obs)), shape=(len(uniq), len(xy))
    )
    n_members = np.asarray(A.sum(axis=1)).ravel().astype(np.int64)
    keep = n_members >= int(min_members)
    if not keep.any():
        raise DatasetError(f"pseudo-spots: no spot has {min_members} or more observations")
    A = A[keep]
    uniq = uniq[keep]
    Y = sp.csr_matrix(A @ Xs, dtype=np.float32)
    centers = np.stack([ox + uniq[:, 1] * pitch_um, oy + uniq[:, 0] * pitch_um], axis=1)
    ids = [f"r{a}_c{b}" for a, b in uniq]
    return PseudoSpots(Y, centers, uniq[:, 0], uniq[:, 1], n_members[keep], ids)


# --------------------------------------------------------------------------------------------
# SpatialData helpers


def _names(container: Any) -> list[str]:
    return [str(k) for k in container]


def _pick(kind: str, names: list[str], wanted: str | None, where: str, source: Path) -> str | None:
    """The element called ``wanted``, else the only one; ``None`` when there is none."""
    if wanted is not None:
        if wanted not in names:
            raise DatasetError(
                f"{where}: field 'elements.{kind}': {source} has no {kind} {wanted!r} "
                f"({kind}s: {', '.join(names) or 'none'})"
            )
        return wanted
    if not names:
        return None
    if len(names) > 1:
        raise DatasetError(
            f"{where}: {source} has several {kind}s ({', '.join(names)}); "
            f"name one with elements: {{{kind}: NAME}}"
        )
    return names[0]


def _affine(element: Any, cs: str) -> np.ndarray:
    """3 × 3 affine ``(x, y, 1)`` of an element into coordinate system ``cs``."""
    from spatialdata.transformations import get_transformation

    t = get_transformation(element, to_coordinate_system=cs)
    return np.asarray(
        t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=np.float64
    )


def _coordinate_systems(element: Any) -> list[str]:
    from spatialdata.transformations import get_transformation

    return list(get_transformation(element, get_all=True))


def _apply(m: np.ndarray, xy: np.ndarray) -> np.ndarray:
    return xy @ m[:2, :2].T + m[:2, 2]


def _centroids(shapes: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """Centres ``(n, 2)`` (x, y) of a shapes element and circle diameters (else None)."""
    geom = shapes.geometry
    if "radius" in shapes.columns and (geom.geom_type == "Point").all():
        return np.stack([geom.x.to_numpy(), geom.y.to_numpy()], axis=1), 2.0 * shapes[
            "radius"
        ].to_numpy(dtype=np.float64)
    c = geom.centroid
    return np.stack([c.x.to_numpy(), c.y.to_numpy()], axis=1), None


def _table_counts(table: Any, spec: Any, source: Path) -> tuple[sp.csr_matrix, list[str]]:
    from napari_stpredict.st.h5ad import counts_and_genes

    return counts_and_genes(table, spec, f"the table in {source}")


def image_element_path(spec: Any) -> Path | None:
    """The image element of a ``spatialdata`` section as a path ``open_slide`` reads.

    Found without importing spatialdata (listing ``PATH.zarr/images``): the one named in
    ``elements.image`` or the only one. ``None`` when the store has no image.
    """
    store = spec.spatialdata
    if store is None:
        return None
    folder = Path(store) / "images"
    names = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    wanted = getattr(spec.elements, "image", None) if spec.elements is not None else None
    name = _pick("image", names, wanted, spec.where, Path(store))
    return folder / name if name is not None else None


def check_spatialdata_store(spec: Any) -> None:
    """Up-front checks of a ``spatialdata`` section (extra installed, a zarr store, elements)."""
    where = spec.where
    path = Path(spec.spatialdata)
    require_extra(where, "spatialdata")
    if not any((path / m).is_file() for m in ("zarr.json", ".zgroup", ".zattrs")):
        raise DatasetError(f"{where}: field 'spatialdata': {path} is not a zarr store")
    if not (path / "tables").is_dir():
        raise DatasetError(
            f"{where}: field 'spatialdata': {path} has no table (an AnnData of spot counts)"
        )
    if spec.image is None:
        image_element_path(spec)  # several images and none named: say so now


def check_platform_folder(spec: Any) -> None:
    """Up-front checks of a ``visium_hd`` or ``xenium`` folder."""
    where = spec.where
    if spec.kind == "visium_hd":
        folder = Path(spec.visium_hd)
        require_extra(where, "visium_hd", io=True)
        if not (folder / "binned_outputs").is_dir():
            raise DatasetError(
                f"{where}: field 'visium_hd': {folder} has no binned_outputs/ "
                "(expected a Space Ranger Visium HD 'outs' folder)"
            )
    else:
        folder = Path(spec.xenium)
        require_extra(where, "xenium", io=True)
        if not (folder / "experiment.xenium").is_file():
            raise DatasetError(
                f"{where}: field 'xenium': {folder} has no experiment.xenium "
                "(expected a Xenium output bundle)"
            )


# --------------------------------------------------------------------------------------------
# readers


def read_spatialdata_section(spec: Any) -> RawSection:
    """Read a ``spatialdata``, ``visium_hd`` or ``xenium`` section into a :class:`RawSection`.

    Raises
    ------
    DatasetError
        Extra missing, unreadable store, ambiguous or missing elements, no common coordinate
        system, a table that does not annotate the shapes.
    """
    if spec.kind == "spatialdata":
        return _read_store(spec)
    if spec.kind == "visium_hd":
        return _read_visium_hd(spec)
    return _read_xenium(spec)


def _read_store(spec: Any) -> RawSection:
    where = spec.where
    path = Path(spec.spatialdata)
    require_extra(where, "spatialdata")
    import warnings

    import spatialdata

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sdata = spatialdata.read_zarr(path)
    except Exception as e:  # a foreign or corrupt store raises many kinds of errors
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DatasetError(
            f"{where}: {path} is not a readable SpatialData store ({reason})"
        ) from None
    el = spec.elements
    table_name = _pick("table", _names(sdata.tables), getattr(el, "table", None), where, path)
    if table_name is None:
        raise DatasetError(f"{where}: {path} has no table")
    table = sdata.tables[table_name]
    attrs = table.uns.get("spatialdata_attrs", {}) or {}
    regions = attrs.get("region")
    regions = [regions] if isinstance(regions, str) else list(regions or [])
    region_key, instance_key = attrs.get("region_key"), attrs.get("instance_key")
    wanted_shapes = getattr(el, "shapes", None)
    candidates = [r for r in regions if r in sdata.shapes] or _names(sdata.shapes)
    if wanted_shapes is None and len(candidates) == 1:
        wanted_shapes = candidates[0]
    shapes_name = _pick("shapes", _names(sdata.shapes), wanted_shapes, where, path)
    if shapes_name is None:
        raise DatasetError(f"{where}: {path} has no shapes element with the spot positions")
    shapes = sdata.shapes[shapes_name]

    # rows of the table that annotate this shapes element, matched by instance id
    rows = np.arange(table.n_obs)
    if region_key in table.obs.columns:
        rows = np.nonzero((table.obs[region_key].astype(str) == shapes_name).to_numpy())[0]
        if not len(rows):
            raise DatasetError(
                f"{where}: table {table_name!r} in {path} annotates {', '.join(regions) or 'no element'}, "
                f"not shapes {shapes_name!r}"
            )
    if instance_key in table.obs.columns:
        inst = table.obs[instance_key].to_numpy()[rows]
        pos = pd.Index(shapes.index).get_indexer(inst)
    else:
        if len(rows) != len(shapes):
            raise DatasetError(
                f"{where}: table {table_name!r} ({len(rows)} rows) and shapes {shapes_name!r} "
                f"({len(shapes)}) do not match and the table has no instance key"
            )
        pos = np.arange(len(rows))
    keep = pos >= 0
    n_dropped = int((~keep).sum())
    rows, pos = rows[keep], pos[keep]
    if not len(rows):
        raise DatasetError(
            f"{where}: no row of table {table_name!r} matches a shape of {shapes_name!r} in {path}"
        )

    image_name = None
    if spec.image is None:
        ip = image_element_path(spec)
        image_name = ip.name if ip is not None else None
    # the coordinate system: named, else the one the shapes (and image) share
    cs_shapes = _coordinate_systems(shapes)
    common = list(cs_shapes)
    if image_name is not None:
        cs_image = _coordinate_systems(sdata.images[image_name])
        common = [c for c in cs_shapes if c in cs_image]
    wanted_cs = getattr(el, "coordinate_system", None)
    if wanted_cs is not None:
        if wanted_cs not in common:
            raise DatasetError(
                f"{where}: field 'elements.coordinate_system': {wanted_cs!r} is not shared by the "
                f"shapes{' and image' if image_name else ''} of {path} "
                f"(shared: {', '.join(common) or 'none'})"
            )
        cs = wanted_cs
    elif len(common) == 1:
        cs = common[0]
    elif not common:
        raise DatasetError(
            f"{where}: shapes {shapes_name!r} and image {image_name!r} of {path} share no "
            "coordinate system"
        )
    else:
        raise DatasetError(
            f"{where}: {path} has several coordinate systems ({', '.join(common)}); "
            "name one with elements: {coordinate_system: NAME}"
        )

    centres, diam = _centroids(shapes)
    m_shapes = _affine(shapes, cs)
    xy_cs = _apply(m_shapes, centres[pos])
    lin = m_shapes[:2, :2]
    shape_scale = math.sqrt(abs(np.linalg.det(lin))) if lin.size else 1.0
    mpp = None
    if image_name is not None:
        m_img = _affine(sdata.images[image_name], cs)
        to_img = np.linalg.inv(m_img)
        xy = _apply(to_img, xy_cs)
        img_scale = math.sqrt(abs(np.linalg.det(to_img[:2, :2])))
        # a store we wrote says its coordinate system is in µm: the image's mpp follows
        ours = sdata.attrs.get("stpredict") if isinstance(sdata.attrs, dict) else None
        if isinstance(ours, dict) and ours.get("coordinate_units") == "micrometer":
            mpp = 1.0 / img_scale
    else:
        # an external image: coordinates in the coordinate system, times `scale`
        xy = xy_cs * float(spec.scale or 1.0)
        img_scale = float(spec.scale or 1.0)
    diameter = None
    if diam is not None:
        d = diam[pos] * shape_scale * img_scale
        diameter = float(np.median(d)) if len(d) and np.isfinite(d).all() else None

    X, genes = _table_counts(table, spec, path)
    X = X[rows]
    obs_names = [str(i) for i in table.obs_names[rows]]
    labels = None
    if spec.labels is None and spec.label_column in table.obs.columns:
        labels = (
            table.obs[spec.label_column].iloc[rows].astype("string").set_axis(pd.Index(obs_names))
        )
    return RawSection(
        X=X,
        genes=genes,
        spot_ids=pd.Index(obs_names),
        xy=xy,
        obs=pd.DataFrame(index=pd.Index(obs_names)),
        spot_diameter_px=diameter,
        labels=labels,
        n_dropped=n_dropped,
        image=(Path(spec.spatialdata) / "images" / image_name) if image_name else None,
        mpp=mpp,
    )


def _pseudo_raw(
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
    xy = _apply(um_to_img, ps.centers)
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


def _read_visium_hd(spec: Any) -> RawSection:
    """Visium HD: ``bin_size`` µm bins → pseudo-spots, H&E = ``image`` (full-res) or hires."""
    where = spec.where
    folder = Path(spec.visium_hd)
    require_extra(where, "visium_hd", io=True)
    import warnings

    from spatialdata_io import visium_hd

    bin_um = int(spec.bin_size or VISIUM_HD_BIN_UM)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sdata = visium_hd(folder, bin_size=bin_um, load_all_images=False)
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DatasetError(
            f"{where}: field 'visium_hd': {folder} cannot be read ({reason})"
        ) from None
    tables = _names(sdata.tables)
    if not tables:
        raise DatasetError(f"{where}: field 'visium_hd': {folder} has no {bin_um} µm bins")
    table = sdata.tables[tables[0]]
    region = table.uns.get("spatialdata_attrs", {}).get("region")
    region = region if isinstance(region, str) else next(iter(region))
    shapes = sdata.shapes[region]
    centres, _ = _centroids(shapes)
    inst = table.obs[table.uns["spatialdata_attrs"]["instance_key"]].to_numpy()
    pos = pd.Index(shapes.index).get_indexer(inst)
    keep = pos >= 0
    cs = "global" if "global" in _coordinate_systems(shapes) else _coordinate_systems(shapes)[0]
    xy_px = _apply(_affine(shapes, cs), centres[pos[keep]])  # full-resolution pixels
    factors = _scalefactors(folder, bin_um)
    mpp_full = float(factors.get("microns_per_pixel") or 0) or None
    if mpp_full is None:
        raise DatasetError(
            f"{where}: field 'visium_hd': {folder} scalefactors give no microns_per_pixel"
        )
    X, genes = _table_counts(table, spec, folder)
    X = X[np.nonzero(keep)[0]]
    # µm → image px: full-res px / mpp, times scale (hires/lowres images)
    image = spec.image
    s = 1.0
    if image is None:
        for key, name in (
            ("hires", "tissue_hires_image.png"),
            ("lowres", "tissue_lowres_image.png"),
        ):
            p = folder / "spatial" / name
            if p.exists():
                image, s = p, float(factors.get(f"tissue_{key}_scalef", 1.0))
                break
    elif isinstance(spec.scale, (int, float)):
        s = float(spec.scale)
    um_to_img = np.diag([s / mpp_full, s / mpp_full, 1.0])
    return _pseudo_raw(
        spec, xy_px * mpp_full, X, genes, um_to_img=um_to_img, image=image, mpp=mpp_full / s
    )


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


def _read_xenium(spec: Any) -> RawSection:
    """Xenium: cells (centroids in µm) → pseudo-spots; H&E = ``image`` in morphology pixels."""
    where = spec.where
    folder = Path(spec.xenium)
    require_extra(where, "xenium", io=True)
    import warnings

    from spatialdata_io import xenium

    try:
        meta = json.loads((folder / "experiment.xenium").read_text(encoding="utf-8"))
        pixel_size = float(meta["pixel_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DatasetError(
            f"{where}: field 'xenium': {folder}/experiment.xenium gives no pixel_size ({e})"
        ) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sdata = xenium(
                folder,
                cells_boundaries=False,
                nucleus_boundaries=False,
                cells_as_circles=False,
                cells_labels=False,
                nucleus_labels=False,
                transcripts=False,
                morphology_mip=False,
                morphology_focus=False,
                aligned_images=False,
                cells_table=True,
            )
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DatasetError(f"{where}: field 'xenium': {folder} cannot be read ({reason})") from None
    tables = _names(sdata.tables)
    if not tables:
        raise DatasetError(f"{where}: field 'xenium': {folder} has no cells table")
    table = sdata.tables[tables[0]]
    if "spatial" in table.obsm:
        xy_um = np.asarray(table.obsm["spatial"], dtype=np.float64)[:, :2]
    elif {"x_centroid", "y_centroid"} <= set(table.obs.columns):
        xy_um = table.obs[["x_centroid", "y_centroid"]].to_numpy(dtype=np.float64)
    else:
        raise DatasetError(f"{where}: field 'xenium': {folder} cells have no centroids")
    X, genes = _table_counts(table, spec, folder)
    # the H&E (`image`) is taken in the morphology image frame (µm / pixel_size), times scale
    s = float(spec.scale) if isinstance(spec.scale, (int, float)) else 1.0
    um_to_img = np.diag([s / pixel_size, s / pixel_size, 1.0])
    return _pseudo_raw(
        spec, xy_um, X, genes, um_to_img=um_to_img, image=spec.image, mpp=pixel_size / s
    )
