"""One manifest section → one :class:`anndata.AnnData`, checked and in the common form.

* ``X``: raw counts, CSR float32, spots × genes; ``var_names``: gene symbols (old symbols
  resolved, then made unique).
* ``obsm["spatial"]``: spot centres ``(x, y)`` in full-resolution pixels of the section image.
* ``obs["section"]``; ``obs["label"]`` when labels are given.
* ``uns["stpredict"]``: ``image``, ``mpp``, ``mpp_source``, ``spot_diameter_px``,
  ``spot_pitch_px``, ``section``, ``patient``, ``image_shape``.

Pixel size (µm per image pixel), first found wins: the manifest's ``mpp``; the image's own
metadata (via :func:`napari_stpredict.slide.open_slide`; JPEG/PNG carry none); the spot grid,
when the technology's centre-to-centre pitch is known (``spot_pitch_um``, default 100 µm for
Visium): ``mpp = spot_pitch_um / pitch_px``, see :func:`estimate_spot_pitch`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from napari_stpredict.errors import DatasetError, SlideError
from napari_stpredict.progress import CancelToken, ProgressCallback, check_cancel, report
from napari_stpredict.st._raw import RawSection
from napari_stpredict.st._tables import check_unique, format_ids, read_table, template_fields
from napari_stpredict.st.genes import make_unique, resolve_aliases
from napari_stpredict.st.manifest import Manifest, SectionSpec, load_manifest
from napari_stpredict.st.pitch import estimate_spot_pitch

#: Centre-to-centre spot distance of 10x Visium (µm), used when a Visium section gives none.
VISIUM_PITCH_UM = 100.0
#: Spot diameter / pitch when neither the data nor the manifest gives a diameter
#: (legacy ST: 100 µm spots on a 200 µm grid; Visium: 55 on 100).
DIAMETER_PER_PITCH = {
    "table": 0.5,
    "h5ad": 0.55,
    "visium": 0.55,
    "spatialdata": 0.55,
    "visium_hd": 0.55,
    "xenium": 0.55,
}


def image_info(path: Path, *, where: str) -> tuple[tuple[int, int], float | None]:
    """``((h, w), mpp)`` of an image without decoding its pixels.

    JPEG/PNG headers are parsed directly (they carry no trustworthy physical scale, the same
    rule as :func:`~napari_stpredict.slide.open_slide`); every other format is opened with
    ``open_slide``, which is lazy.
    """
    from napari_stpredict.slide.image import JPEG_MAGIC, PNG_MAGIC, image_header

    try:
        head = b""
        if not path.is_dir():  # an OME-Zarr folder goes straight to open_slide
            with open(path, "rb") as fh:
                head = fh.read(8)
    except OSError as e:
        raise DatasetError(
            f"{where}: field 'image': cannot read {path}: {e.strerror or e}"
        ) from None
    if head.startswith(JPEG_MAGIC) or head.startswith(PNG_MAGIC):
        try:
            w, h, _ = image_header(path, head)
        except SlideError as e:
            reason = e.__cause__ or e
            raise DatasetError(
                f"{where}: field 'image': {path}: corrupt image header ({reason})"
            ) from None
        return (int(h), int(w)), None
    from napari_stpredict.slide import open_slide

    try:
        with open_slide(path) as slide:
            return slide.shape, slide.mpp
    except SlideError as e:
        raise DatasetError(f"{where}: field 'image': {e}") from None


def _read_raw(spec: SectionSpec) -> RawSection:
    if spec.kind == "table":
        from napari_stpredict.st.legacy import read_table_section

        return read_table_section(spec)
    if spec.kind == "visium":
        from napari_stpredict.st.visium import read_visium_section

        return read_visium_section(spec)
    if spec.kind in ("spatialdata", "visium_hd", "xenium"):
        from napari_stpredict.st.spatialdata import read_spatialdata_section

        return read_spatialdata_section(spec)
    from napari_stpredict.st.h5ad import read_h5ad_section

    return read_h5ad_section(spec)


def _image_path(spec: SectionSpec) -> Path | None:
    if spec.image is None and spec.kind == "spatialdata":
        from napari_stpredict.st.spatialdata import image_element_path

        return image_element_path(spec)
    if spec.image is None and spec.kind == "visium_hd":
        hires = spec.source / "spatial" / "tissue_hires_image.png"
        return hires if hires.exists() else None
    if spec.image is not None or spec.kind != "visium":
        return spec.image
    from napari_stpredict.st.visium import default_image

    found = default_image(spec)
    return found[0] if found else None


def _check_counts(raw: RawSection, spec: SectionSpec) -> None:
    data = raw.X.data
    if data.size and not np.isfinite(data).all():
        raise DatasetError(f"{spec.where}: counts contain NaN or infinite values ({spec.source})")
    if data.size and (data < 0).any():
        raise DatasetError(f"{spec.where}: counts contain negative values ({spec.source})")
    if raw.X.shape[0] == 0:
        raise DatasetError(f"{spec.where}: no spots ({spec.source})")
    if raw.X.shape[1] == 0:
        raise DatasetError(f"{spec.where}: no genes ({spec.source})")
    if raw.X.nnz == 0:
        raise DatasetError(f"{spec.where}: every count is zero ({spec.source})")


def _check_inside(
    xy: np.ndarray, ids: pd.Index, shape: tuple[int, int], spec: SectionSpec, image: Path
) -> None:
    h, w = shape
    outside = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= w) | (xy[:, 1] >= h)
    if outside.any():
        i = int(np.nonzero(outside)[0][0])
        raise DatasetError(
            f"{spec.where}: {int(outside.sum())} of {len(xy)} spots lie outside the image "
            f"{image.name} ({w} x {h} px), e.g. spot {ids[i]!r} at x={xy[i, 0]:.1f}, y={xy[i, 1]:.1f}; "
            "check pixel_columns and scale"
        )


def _join_labels(spec: SectionSpec, ids: pd.Index) -> pd.Series:
    assert spec.labels is not None
    where = spec.where
    what = f"labels table {spec.labels}"
    df = read_table(spec.labels, where=where, what="labels table")
    if spec.label_column not in df.columns:
        cols = ", ".join(map(str, list(df.columns)[:12]))
        raise DatasetError(
            f"{where}: {what} has no label_column {spec.label_column!r} (columns: {cols})"
        )
    template = spec.labels_spot_id or (spec.spot_id if spec.kind == "table" else None)
    if template is None:
        df = df.loc[df.iloc[:, 0].notna()]
        keys = pd.Index(df.iloc[:, 0].astype(str))
    else:
        # label rows without coordinates cannot be placed on a spot: skip them
        used = [f for f in template_fields(template) if f in df.columns]
        df = df.loc[df[used].notna().all(axis=1)]
        keys = format_ids(df, template, where=where, what=what)
    check_unique(keys, where=where, what=what)
    pos = keys.get_indexer(ids)
    if not (pos >= 0).any():
        raise DatasetError(
            f"{where}: no spot matches {what} (spot ids like {ids[0]!r}, label ids like {keys[0]!r}; "
            "set labels_spot_id)"
        )
    values = df[spec.label_column].astype("string").to_numpy()
    out = pd.Series(pd.NA, index=ids, dtype="string")
    hit = pos >= 0
    out.iloc[np.nonzero(hit)[0]] = values[pos[hit]]
    return out


def read_section(spec: SectionSpec, *, check_image: bool = True) -> ad.AnnData:
    """Read one section into the common AnnData form.

    Parameters
    ----------
    spec
        A section of a loaded :class:`~napari_stpredict.st.manifest.Manifest`.
    check_image
        Open the image header to take its size and mpp and to check that every spot centre
        lies inside it (default). Without it the image is not touched and the mpp comes from
        the manifest or the spot grid only.

    Returns
    -------
    anndata.AnnData

    Raises
    ------
    DatasetError
        Unreadable tables, NaN/negative counts, no matching spots, spots outside the image,
        bad labels; one line naming the manifest and the section.
    """
    raw = _read_raw(spec)
    _check_counts(raw, spec)

    genes = make_unique(resolve_aliases(raw.genes))
    ids = pd.Index([str(i) for i in raw.spot_ids])
    check_unique(ids, where=spec.where, what="section")
    xy = np.asarray(raw.xy, dtype=np.float64)

    image = raw.image or _image_path(spec)
    shape: tuple[int, int] | None = None
    file_mpp: float | None = None
    if image is not None and check_image:
        shape, file_mpp = image_info(image, where=spec.where)
        _check_inside(xy, ids, shape, spec, image)

    mpp, mpp_source, pitch_px, diameter = _scale(spec, raw, xy, file_mpp)
    meta: dict[str, Any] = {
        "section": spec.name,
        "patient": spec.patient,
        "kind": spec.kind,
        "source": str(spec.source),
        "image": str(image) if image is not None else None,
        "image_shape": [int(shape[0]), int(shape[1])] if shape is not None else None,
        "mpp": mpp,
        "mpp_source": mpp_source,
        "spot_pitch_px": pitch_px,
        "spot_diameter_px": diameter,
        "n_dropped_spots": int(raw.n_dropped),
    }
    adata = ad.AnnData(
        X=sp.csr_matrix(raw.X, dtype=np.float32),
        obs=_obs(spec, raw, ids),
        var=pd.DataFrame(index=pd.Index(genes)),
    )
    adata.obsm["spatial"] = xy
    adata.uns["stpredict"] = meta
    return adata


def _scale(
    spec: SectionSpec, raw: RawSection, xy: np.ndarray, file_mpp: float | None
) -> tuple[float | None, str | None, float | None, float]:
    """mpp (and where it came from), spot pitch and spot diameter (px) of a section.

    The mpp is the manifest's, else the data's, else the image's, else the spot grid's (known
    pitch in µm over measured pitch in px); a grid that disagrees with a given mpp is warned of.
    """
    pitch_px = raw.spot_pitch_px or estimate_spot_pitch(xy)
    pitch_um = spec.spot_pitch_um or (VISIUM_PITCH_UM if spec.kind == "visium" else None)
    if spec.mpp is not None:
        mpp, mpp_source = spec.mpp, "manifest"
    elif raw.mpp:
        mpp, mpp_source = float(raw.mpp), "data"
    elif file_mpp:
        mpp, mpp_source = float(file_mpp), "image"
    elif pitch_um is not None and pitch_px:
        mpp, mpp_source = pitch_um / pitch_px, "spot_grid"
    else:
        mpp, mpp_source = None, None
    grid_mpp = pitch_um / pitch_px if pitch_um is not None and pitch_px else None
    if (
        grid_mpp is not None
        and mpp_source in ("manifest", "image")
        and not (0.8 < grid_mpp / mpp < 1.25)
    ):
        # coordinates in another frame than the image, or a wrong pitch/mpp: say so early
        warnings.warn(
            f"{spec.where}: the spot grid gives {grid_mpp:.3g} µm/px but the {mpp_source} says "
            f"{mpp:.3g}; check scale, spot_pitch_um and mpp",
            stacklevel=3,
        )

    if raw.spot_diameter_px is not None:
        diameter = float(raw.spot_diameter_px)
    elif spec.spot_diameter_um is not None and mpp is not None:
        diameter = spec.spot_diameter_um / mpp
    elif pitch_px:
        diameter = DIAMETER_PER_PITCH[spec.kind] * pitch_px
    else:
        diameter = float("nan")
    return mpp, mpp_source, pitch_px, diameter


def _obs(spec: SectionSpec, raw: RawSection, ids: pd.Index) -> pd.DataFrame:
    """Per-spot table: the reader's columns, the section name and the labels (if any)."""
    obs = raw.obs.copy() if len(raw.obs.columns) else pd.DataFrame(index=ids)
    obs.index = ids
    obs = obs.drop(columns=[c for c in ("section", "label") if c in obs.columns])
    obs.columns = [str(c) for c in obs.columns]
    obs["section"] = pd.Categorical([spec.name] * len(ids))
    labels = None
    if spec.labels is not None:
        labels = _join_labels(spec, ids)
    elif raw.labels is not None:
        labels = raw.labels.set_axis(ids)
    if labels is not None:
        obs["label"] = pd.Categorical(labels.to_numpy(dtype=object, na_value=None))
    return obs


def read_sections(
    manifest: Manifest | SectionSpec | Sequence[SectionSpec] | str | os.PathLike,
    *,
    sections: Sequence[str] | None = None,
    require_images: bool = False,
    check_image: bool = True,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> list[ad.AnnData]:
    """Read and check several sections (all of a manifest by default).

    Parameters
    ----------
    manifest
        A manifest (object or path), or section specs.
    sections
        Names to read, in that order (default: all, in file order).
    require_images
        Refuse sections without an image (training needs patches).
    check_image, progress, cancel
        See :func:`read_section`; progress counts sections.

    Raises
    ------
    DatasetError
        The first problem found, before anything is trained.
    """
    if isinstance(manifest, str | os.PathLike):
        manifest = load_manifest(manifest)
    if isinstance(manifest, Manifest):
        specs = manifest.select(list(sections) if sections is not None else None)
    else:
        specs = [manifest] if isinstance(manifest, SectionSpec) else list(manifest)
        if sections is not None:
            by_name = {s.name: s for s in specs}
            missing = [n for n in sections if n not in by_name]
            if missing:
                raise DatasetError(f"no section {missing[0]!r} (sections: {', '.join(by_name)})")
            specs = [by_name[n] for n in sections]
    if not specs:
        raise DatasetError("no sections to read")
    if require_images:
        for s in specs:
            if _image_path(s) is None:
                raise DatasetError(
                    f"{s.where}: field 'image': missing; training needs an H&E image per section "
                    "(sections without one can only be used on measured expression)"
                )
    out = []
    for i, s in enumerate(specs):
        check_cancel(cancel, "reading sections")
        report(progress, i, len(specs), f"reading {s.name}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ad.ImplicitModificationWarning)
            out.append(read_section(s, check_image=check_image))
    report(progress, len(specs), len(specs), "sections read")
    return out
