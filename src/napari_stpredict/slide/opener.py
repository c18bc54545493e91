"""``open_slide``: pick the backend from the file's content, build a :class:`Slide`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from napari_stpredict.errors import SlideError
from napari_stpredict.slide.base import Slide

TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
#: The one list of extensions :func:`open_slide` reads (the napari reader, cohort folder scans
#: and the CLI use it); other files are "unknown format". ``.ome.tif``, ``.ome.tiff`` and
#: ``.ome.zarr`` end in one of these.
SLIDE_SUFFIXES = (".svs", ".ndpi", ".tif", ".tiff", ".zarr", ".jpg", ".jpeg", ".png")


def is_slide_path(path: str | os.PathLike) -> bool:
    """True when ``path``'s extension is one :func:`open_slide` reads (case-insensitive)."""
    return Path(path).suffix.lower() in SLIDE_SUFFIXES


def open_slide(
    path: str | os.PathLike,
    *,
    mpp: float | None = None,
    max_image_pixels: int | Literal["default"] | None = "default",
) -> Slide:
    """Open a whole-slide image lazily.

    Parameters
    ----------
    path
        An Aperio ``.svs``, Hamamatsu ``.ndpi``, (OME-)TIFF, OME-Zarr folder, or a JPEG/PNG.
        The format is recognised from the content, not the extension.
    mpp
        Micrometres per level-0 pixel; overrides what the file says (or supplies it).
    max_image_pixels
        JPEG/PNG only (they cannot be read tile by tile): reading pixels of a larger image
        raises a :class:`SlideError` advising ``stpredict convert``. ``"default"`` =
        :data:`napari_stpredict.slide.image.MAX_PIXELS`; ``None`` = no limit (``convert``).
        Opening parses the header only, so ``info`` works on any size.

    Returns
    -------
    Slide

    Raises
    ------
    SlideError
        Missing file, unknown format, corrupt data, unsupported pixels (16-bit, float,
        multichannel, stacks) or zero-sized levels; the message is one line naming the file.
    """
    p = Path(path).expanduser()
    if mpp is not None and not (isinstance(mpp, (int, float)) and 0 < mpp < float("inf")):
        raise SlideError(f"{p}: mpp must be a positive number, got {mpp!r}")
    if not p.exists():
        raise SlideError(f"{p}: no such file or folder")
    parts = _open_store(p) if p.is_dir() else _open_file(p, max_image_pixels)
    file_mpp = parts["mpp"]
    meta = parts["metadata"]
    if mpp is not None:
        meta["mpp_file"] = file_mpp
        meta["mpp_source"] = "user"
    try:
        return Slide(
            p,
            format=parts["format"],
            sources=parts["sources"],
            mpp=float(mpp) if mpp is not None else file_mpp,
            metadata=meta,
            mpp_override=mpp,
            closer=parts["closer"],
        )
    except BaseException:
        if parts["closer"] is not None:
            parts["closer"]()
        raise


def _open_store(p: Path) -> dict[str, Any]:
    """The pieces of a slide stored as a folder (OME-Zarr)."""
    from napari_stpredict.slide.omezarr import is_zarr_dir, open_omezarr

    if not is_zarr_dir(p):
        raise SlideError(f"{p}: folder is not an OME-Zarr store")
    return open_omezarr(p)


def _open_file(p: Path, max_image_pixels: int | Literal["default"] | None) -> dict[str, Any]:
    """The pieces of a slide file, the backend chosen from its first bytes."""
    try:
        with open(p, "rb") as fh:
            head = fh.read(16)
    except OSError as err:
        raise SlideError(f"{p}: cannot read: {err.strerror or err}") from err
    if not head:
        raise SlideError(f"{p}: empty file")
    if head[:4] in TIFF_MAGICS:
        from napari_stpredict.slide.tiff import open_tiff

        return open_tiff(p)
    from napari_stpredict.slide.image import JPEG_MAGIC, PNG_MAGIC, open_image

    if head.startswith(JPEG_MAGIC) or head.startswith(PNG_MAGIC):
        if max_image_pixels == "default":
            return open_image(p, head)
        return open_image(p, head, max_pixels=max_image_pixels)
    if p.suffix.lower() in SLIDE_SUFFIXES:
        raise SlideError(
            f"{p}: corrupt or not a {p.suffix.lstrip('.').upper()} file "
            f"(unrecognised header {head[:4]!r})"
        )
    raise SlideError(
        f"{p}: unknown format (supported: SVS, NDPI, TIFF/OME-TIFF, OME-Zarr, JPEG, PNG)"
    )
