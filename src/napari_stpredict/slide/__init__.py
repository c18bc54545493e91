"""Whole-slide images: lazy multiscale pyramids, pyramid writers and a tissue mask.

>>> from napari_stpredict.slide import open_slide  # doctest: +SKIP
>>> with open_slide("CMU-1.svs") as slide:  # doctest: +SKIP
...     patch = slide.read_resampled(1000, 2000, 224, 224, out_shape=(224, 224))
"""

from __future__ import annotations

from napari_stpredict._lazy import lazy_getattr
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


# writers and the tissue mask pull in scikit-image/zarr writing code: imported on first use
__getattr__ = lazy_getattr(
    __name__,
    {
        "write_ome_tiff": "napari_stpredict.slide.writers",
        "write_ome_zarr": "napari_stpredict.slide.writers",
        "tissue_mask": "napari_stpredict.slide.tissue",
        "TissueMask": "napari_stpredict.slide.tissue",
    },
)
