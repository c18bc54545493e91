"""SpatialData, Visium HD and Xenium sections (optional extra ``napari-stpredict[spatialdata]``).

Three section kinds of the manifest read through the scverse ``spatialdata`` stack:

* ``spatialdata: PATH.zarr`` — any SpatialData store (read here). A table annotating a shapes
  element gives the spots (circles or polygons; their centroids), an image element the H&E.
  The table, image, shapes and coordinate system are chosen automatically when there is one of
  each (``elements: {table, image, shapes, coordinate_system}`` names them otherwise). Spot
  centres are mapped through the transformations into level-0 pixels of the image element,
  which is read like any OME-Zarr slide (``PATH.zarr/images/NAME``).
* ``visium_hd: DIR`` and ``xenium: DIR`` — platform folders read with ``spatialdata_io``
  (:mod:`napari_stpredict.st.spatialdata_platforms`).

Visium HD bins and Xenium cells are summed into spot-sized **pseudo-spots** on a regular square
grid (:func:`aggregate_pseudo_spots`, :mod:`napari_stpredict.st.pseudo_spots`): discs of
``spot_diameter_um`` (default 55) every ``spot_pitch_um`` (default 100), like Visium, so the
model trains on the same kind of target. The aggregation is plain numpy/scipy and works
without the extra. Element helpers: :mod:`napari_stpredict.st.spatialdata_elements`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from napari_stpredict.errors import DatasetError
from napari_stpredict.st._raw import RawSection
from napari_stpredict.st.pseudo_spots import (
    PSEUDO_PITCH_UM,
    PSEUDO_SPOT_UM,
    PseudoSpots,
    aggregate_pseudo_spots,
)
from napari_stpredict.st.spatialdata_elements import affine_to as _affine
from napari_stpredict.st.spatialdata_elements import apply_affine as _apply
from napari_stpredict.st.spatialdata_elements import coordinate_systems as _coordinate_systems
from napari_stpredict.st.spatialdata_elements import element_names as _names
from napari_stpredict.st.spatialdata_elements import pick_element as _pick
from napari_stpredict.st.spatialdata_elements import read_quietly
from napari_stpredict.st.spatialdata_elements import shape_centres as _centroids
from napari_stpredict.st.spatialdata_elements import table_counts as _table_counts
from napari_stpredict.st.spatialdata_platforms import VISIUM_HD_BIN_UM
from napari_stpredict.st.spatialdata_platforms import read_visium_hd as _read_visium_hd
from napari_stpredict.st.spatialdata_platforms import read_xenium as _read_xenium

__all__ = [
    "INSTALL_HINT",
    "PSEUDO_PITCH_UM",
    "PSEUDO_SPOT_UM",
    "SPATIALDATA_KINDS",
    "VISIUM_HD_BIN_UM",
    "PseudoSpots",
    "aggregate_pseudo_spots",
    "check_platform_folder",
    "check_spatialdata_store",
    "have_spatialdata",
    "image_element_path",
    "read_spatialdata_section",
    "require_extra",
]

INSTALL_HINT = "pip install 'napari-stpredict[spatialdata]'"
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


#: what marks a platform folder: the entry inside it, whether that is a folder, what to expect
_PLATFORM_MARKERS = {
    "visium_hd": ("binned_outputs", True, "a Space Ranger Visium HD 'outs' folder"),
    "xenium": ("experiment.xenium", False, "a Xenium output bundle"),
}


def check_platform_folder(spec: Any) -> None:
    """Up-front checks of a ``visium_hd`` or ``xenium`` folder."""
    kind = "visium_hd" if spec.kind == "visium_hd" else "xenium"
    folder = Path(getattr(spec, kind))
    require_extra(spec.where, kind, io=True)
    entry, is_folder, expected = _PLATFORM_MARKERS[kind]
    marker = folder / entry
    if not (marker.is_dir() if is_folder else marker.is_file()):
        shown = f"{entry}/" if is_folder else entry
        raise DatasetError(
            f"{spec.where}: field {kind!r}: {folder} has no {shown} (expected {expected})"
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
    """A ``spatialdata`` section: the table's rows that annotate the spot shapes, their
    centres mapped into the image element's pixels (or an external image's, times ``scale``)."""
    where = spec.where
    path = Path(spec.spatialdata)
    require_extra(where, "spatialdata")
    import spatialdata

    sdata = read_quietly(
        lambda: spatialdata.read_zarr(path),
        f"{where}: {path} is not a readable SpatialData store",
    )
    el = spec.elements
    table_name = _pick("table", _names(sdata.tables), getattr(el, "table", None), where, path)
    if table_name is None:
        raise DatasetError(f"{where}: {path} has no table")
    table = sdata.tables[table_name]
    shapes_name = _shapes_name(sdata, table, el, where, path)
    shapes = sdata.shapes[shapes_name]
    rows, pos, n_dropped = _annotated_rows(table, table_name, shapes, shapes_name, where, path)
    image_name = None
    if spec.image is None:
        ip = image_element_path(spec)
        image_name = ip.name if ip is not None else None
    cs = _coordinate_system(sdata, shapes, shapes_name, image_name, el, where, path)
    xy, diameter, mpp = _spot_positions(sdata, shapes, pos, cs, image_name, spec)
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


def _table_regions(table: Any) -> tuple[list[str], Any, Any]:
    """``(regions, region_key, instance_key)`` of a table's ``spatialdata_attrs``."""
    attrs = table.uns.get("spatialdata_attrs", {}) or {}
    regions = attrs.get("region")
    regions = [regions] if isinstance(regions, str) else list(regions or [])
    return regions, attrs.get("region_key"), attrs.get("instance_key")


def _shapes_name(sdata: Any, table: Any, el: Any, where: str, path: Path) -> str:
    """The shapes element with the spots: named, else the one the table annotates, else the
    only one."""
    regions, _, _ = _table_regions(table)
    wanted = getattr(el, "shapes", None)
    candidates = [r for r in regions if r in sdata.shapes] or _names(sdata.shapes)
    if wanted is None and len(candidates) == 1:
        wanted = candidates[0]
    name = _pick("shapes", _names(sdata.shapes), wanted, where, path)
    if name is None:
        raise DatasetError(f"{where}: {path} has no shapes element with the spot positions")
    return name


def _annotated_rows(
    table: Any, table_name: str, shapes: Any, shapes_name: str, where: str, path: Path
) -> tuple[np.ndarray, np.ndarray, int]:
    """``(rows, positions, n_dropped)``: the table rows that annotate ``shapes``, the position
    of each one's shape (matched by instance id), and how many rows matched no shape."""
    regions, region_key, instance_key = _table_regions(table)
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
    if not keep.any():
        raise DatasetError(
            f"{where}: no row of table {table_name!r} matches a shape of {shapes_name!r} in {path}"
        )
    return rows[keep], pos[keep], int((~keep).sum())


def _coordinate_system(
    sdata: Any,
    shapes: Any,
    shapes_name: str,
    image_name: str | None,
    el: Any,
    where: str,
    path: Path,
) -> str:
    """The coordinate system: named, else the one the shapes (and image) share."""
    common = _coordinate_systems(shapes)
    if image_name is not None:
        cs_image = _coordinate_systems(sdata.images[image_name])
        common = [c for c in common if c in cs_image]
    wanted = getattr(el, "coordinate_system", None)
    if wanted is not None:
        if wanted not in common:
            raise DatasetError(
                f"{where}: field 'elements.coordinate_system': {wanted!r} is not shared by the "
                f"shapes{' and image' if image_name else ''} of {path} "
                f"(shared: {', '.join(common) or 'none'})"
            )
        return wanted
    if len(common) == 1:
        return common[0]
    if not common:
        raise DatasetError(
            f"{where}: shapes {shapes_name!r} and image {image_name!r} of {path} share no "
            "coordinate system"
        )
    raise DatasetError(
        f"{where}: {path} has several coordinate systems ({', '.join(common)}); "
        "name one with elements: {coordinate_system: NAME}"
    )


def _spot_positions(
    sdata: Any, shapes: Any, pos: np.ndarray, cs: str, image_name: str | None, spec: Any
) -> tuple[np.ndarray, float | None, float | None]:
    """``(xy, diameter, mpp)``: spot centres in image pixels, the median circle diameter in
    image pixels (``None`` for polygons) and the image's µm/px when the store says so."""
    centres, diam = _centroids(shapes)
    m_shapes = _affine(shapes, cs)
    xy_cs = _apply(m_shapes, centres[pos])
    lin = m_shapes[:2, :2]
    shape_scale = math.sqrt(abs(np.linalg.det(lin))) if lin.size else 1.0
    mpp = None
    if image_name is not None:
        to_img = np.linalg.inv(_affine(sdata.images[image_name], cs))
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
    return xy, diameter, mpp
