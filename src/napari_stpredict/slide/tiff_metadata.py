"""What a TIFF-family slide says about itself: vendor properties, µm per pixel, level scales.

Read from the tags and descriptions only (no pixels): the Aperio ``ImageDescription``
properties, the Hamamatsu NDPI tags, OME-XML ``PhysicalSizeX``, and the TIFF resolution tags
(also used for exact per-level downsamples). :func:`file_metadata` gathers them for
:func:`napari_stpredict.slide.tiff.open_tiff`.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING, Any

import numpy as np
import tifffile

if TYPE_CHECKING:
    from napari_stpredict.slide.tiff import TiffLevel

#: Resolution tags claiming pixels larger than this (µm) are probably placeholders (72 dpi =
#: 352.8 µm/px); they are still used, as OpenSlide and QuPath do, but flagged in the metadata.
SUSPECT_MPP = 50.0


def file_metadata(
    tf: tifffile.TiffFile, fmt: str, series: tifffile.TiffPageSeries, shape0: tuple[int, int]
) -> tuple[dict[str, Any], float | None]:
    """The slide's JSON-able metadata and its µm per level-0 pixel (``None`` when unknown).

    Parameters
    ----------
    tf
        The open file.
    fmt
        ``"svs"``, ``"ndpi"``, ``"ome-tiff"`` or ``"tiff"``.
    series
        The main image series (its key frame is level 0).
    shape0
        Level-0 ``(h, w)``, to find the matching OME ``Pixels`` element.

    Returns
    -------
    tuple
        ``(metadata, mpp)``; ``metadata["mpp_source"]`` says where the mpp came from, and
        ``metadata["mpp_suspect"]`` flags a screen-resolution placeholder.
    """
    page0 = series.keyframe
    meta: dict[str, Any] = {
        "vendor": {"svs": "aperio", "ndpi": "hamamatsu"}.get(fmt, "generic"),
        "compression": _compression_name(page0.compression),
        "series": series.name,
        "axes": series.get_axes(True),
    }
    mpp, mpp_source = _vendor_mpp(tf, fmt, page0, shape0, meta)
    if mpp is None:
        mpp = _mpp_from_resolution(page0)
        mpp_source = "TIFF resolution tags" if mpp else None
    if mpp is not None and not (0 < mpp < float("inf")):
        mpp, mpp_source = None, None
    meta["mpp_source"] = mpp_source
    if mpp is not None and mpp > SUSPECT_MPP:
        meta["mpp_suspect"] = (
            f"{mpp:.1f} µm/px looks like a default screen resolution, not a scan; "
            "pass the real mpp if known"
        )
    return meta, mpp


def _compression_name(code: int) -> str | int:
    if code in tifffile.COMPRESSION.__members__.values():
        return tifffile.COMPRESSION(code).name.lower()
    return int(code)


def _vendor_mpp(
    tf: tifffile.TiffFile,
    fmt: str,
    page0: tifffile.TiffPage,
    shape0: tuple[int, int],
    meta: dict[str, Any],
) -> tuple[float | None, str | None]:
    """The mpp the vendor's own fields give (``(None, None)`` if none); vendor properties and
    objective power are added to ``meta``."""
    if fmt == "svs":
        try:
            props = tifffile.tifffile.svs_description_metadata(page0.description)
        except ValueError:
            props = {}
        meta["properties"] = _jsonable(props)
        if "AppMag" in props:
            meta["objective_power"] = _jsonable(props["AppMag"])
        try:
            mpp = float(props["MPP"]) if "MPP" in props else None
        except (TypeError, ValueError):
            return None, None
        return mpp, "svs MPP" if mpp else None
    if fmt == "ndpi":
        ndpi = page0.ndpi_tags or {}
        meta["properties"] = _jsonable({k: v for k, v in ndpi.items() if k != "McuStarts"})
        if "Magnification" in ndpi:
            meta["objective_power"] = _jsonable(ndpi["Magnification"])
    elif fmt == "ome-tiff":
        mpp = _mpp_from_ome(tf.ome_metadata or "", shape0)
        return mpp, "OME PhysicalSizeX" if mpp else None
    return None, None


def _mpp_from_resolution(page: tifffile.TiffPage) -> float | None:
    tags = page.tags
    xres = tags.valueof("XResolution")
    unit = tags.valueof("ResolutionUnit")
    if xres is None or unit is None:
        return None
    try:
        num, den = xres
        px_per_unit = num / den
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if not px_per_unit > 0:
        return None
    unit = int(unit)
    um_per_unit = {2: 25400.0, 3: 10000.0}.get(unit)  # inch, centimetre
    if um_per_unit is None:
        return None
    return um_per_unit / px_per_unit


_OME_UNITS = {
    "pm": 1e-6, "Å": 1e-4, "nm": 1e-3, "µm": 1.0, "um": 1.0, "μm": 1.0, "mm": 1e3,
    "cm": 1e4, "dm": 1e5, "m": 1e6, "in": 25400.0, "mil": 25.4,
}  # fmt: skip


def _resolution(page: tifffile.TiffPage) -> tuple[float, float, int] | None:
    tags = page.tags
    try:
        xn, xd = tags.valueof("XResolution")
        yn, yd = tags.valueof("YResolution")
        return xn / xd, yn / yd, int(tags.valueof("ResolutionUnit") or 1)
    except (TypeError, ValueError, ZeroDivisionError):
        return None


def _resolution_downsamples(levels: list[TiffLevel]) -> list[tuple[float, float]] | None:
    """Exact per-level downsamples from resolution tags, if every level has consistent ones.

    Our writer (and others) record each level's resolution; many files instead copy level 0's
    tags to every level, so ratios are used only where they agree with the level sizes.
    """
    res = [_resolution(lv.planes[0].page) for lv in levels]
    if any(r is None or not (r[0] > 0 and r[1] > 0) for r in res) or len({r[2] for r in res}) != 1:
        return None
    h0, w0 = levels[0].shape
    out = []
    for lv, r in zip(levels, res, strict=True):
        dy, dx = res[0][1] / r[1], res[0][0] / r[0]
        if abs(h0 / dy - lv.shape[0]) >= 1.0 or abs(w0 / dx - lv.shape[1]) >= 1.0:
            return None
        out.append((dy, dx))
    return out


def _mpp_from_ome(xml: str, shape: tuple[int, int]) -> float | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    candidates = [el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"]
    matching = [
        el
        for el in candidates
        if el.get("SizeY") == str(shape[0]) and el.get("SizeX") == str(shape[1])
    ]
    for el in matching or candidates:
        size = el.get("PhysicalSizeX")
        if size is None:
            continue
        factor = _OME_UNITS.get(el.get("PhysicalSizeXUnit", "µm"))
        try:
            mpp = float(size) * factor if factor is not None else None
        except ValueError:
            mpp = None
        if mpp and mpp > 0:
            return mpp
    return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("latin-1", "replace")
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value] if len(value) <= 16 else f"<{len(value)} values>"
    if isinstance(value, np.ndarray):
        return value.tolist() if value.size <= 16 else f"<array {value.shape}>"
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)
