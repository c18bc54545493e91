"""Whole-slide images: lazy multiscale pyramids, pyramid writers and a tissue mask.

>>> from napari_stpredict.slide import open_slide  # doctest: +SKIP
>>> with open_slide("CMU-1.svs") as slide:  # doctest: +SKIP
...     patch = slide.read_resampled(1000, 2000, 224, 224, out_shape=(224, 224))
"""

from __future__ import annotations

from napari_stpredict.errors import SlideError
from napari_stpredict.slide.base import Slide
from napari_stpredict.slide.opener import SLIDE_SUFFIXES, is_slide_path, open_slide

__all__ = [
    "SLIDE_SUFFIXES",
    "Slide",
    "SlideError",
    "TissueMask",
    "is_slide_path",
    "open_slide",
    "tissue_mask",
    "write_ome_tiff",
    "write_ome_zarr",
]


def __getattr__(name: str):
    # writers and the tissue mask pull in scikit-image/zarr writing code: import on first use
    if name in ("write_ome_tiff", "write_ome_zarr"):
        from napari_stpredict.slide import writers

        return getattr(writers, name)
    if name in ("tissue_mask", "TissueMask"):
        from napari_stpredict.slide import tissue

        return getattr(tissue, name)
    raise AttributeError(f"module 'napari_stpredict.slide' has no attribute {name!r}")
