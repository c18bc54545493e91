"""npe2 reader: open a whole-slide image as one lazy multiscale RGB Image layer.

The layer is registered in micrometres (``scale = (mpp, mpp)``, units µm) when the slide's
resolution is known, in pixels otherwise; contrast limits are fixed to (0, 255) so napari never
scans the lazy pyramid. Files we claim but cannot read produce a notification with the
one-line reason and no layer (never a crash, never a half-open layer).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from napari_stpredict.errors import StPredictError
from napari_stpredict.slide.opener import SLIDE_SUFFIXES as SUFFIXES  # the one list

LayerData = tuple[Any, ...]


def _single_path(path: str | list[str]) -> Path | None:
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None  # stacks of slides are not a thing
        path = path[0]
    return Path(path)


def _claims(p: Path) -> bool:
    if p.is_dir():
        from napari_stpredict.slide.omezarr import is_zarr_dir

        return is_zarr_dir(p)
    return p.suffix.lower() in SUFFIXES


def napari_get_reader(path: str | list[str]) -> Callable[..., list[LayerData]] | None:
    """Return a reader for whole-slide images, or ``None`` for paths this plugin does not handle.

    Parameters
    ----------
    path
        A path (or a one-element list of paths) from napari.

    Returns
    -------
    callable or None
        The reader function.
    """
    p = _single_path(path)
    if p is None or not _claims(p):
        return None
    return read_slide_layer


def layer_name(path: Path) -> str:
    """Layer name: the file name without its (multi-part) slide extension."""
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def slide_layer_data(slide: Any) -> LayerData:
    """The ``(data, kwargs, "image")`` tuple for an open :class:`~napari_stpredict.slide.Slide`."""
    info = {
        "path": str(slide.path),
        "mpp": slide.mpp,
        "format": slide.format,
        "shape": list(slide.shape),
        "downsamples": list(slide.downsamples),
        "metadata": slide.metadata,
    }
    kwargs: dict[str, Any] = {
        "name": layer_name(slide.path),
        "multiscale": True,
        "rgb": True,
        "contrast_limits": (0, 255),
        "metadata": {"stpredict_slide": info},
    }
    if slide.mpp:
        kwargs["scale"] = (slide.mpp, slide.mpp)
        kwargs["units"] = ("µm", "µm")
    return (list(slide.levels), kwargs, "image")


def read_slide_layer(path: str | list[str]) -> list[LayerData]:
    """Open the slide and return one Image layer tuple (or the no-layer sentinel on error).

    On a bad file napari gets ``[(None,)]`` ("handled, nothing to add") after an error
    notification: returning nothing would make npe2 raise a second, vaguer error.
    """
    from napari_stpredict.slide import open_slide

    p = _single_path(path)
    assert p is not None
    try:
        slide = open_slide(p)
        return [slide_layer_data(slide)]
    except StPredictError as err:
        reason = str(err)
    except Exception as err:  # a reader must never take napari down
        reason = f"{p}: cannot open: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    from napari.utils.notifications import show_error

    show_error(reason)
    return [(None,)]
