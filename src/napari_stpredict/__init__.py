"""napari-stpredict: spatial gene expression predicted from H&E whole-slide images.

The core (``slide``, ``st``, ``model``, ``inference``, ``tumor``, ``export``) is plain Python;
``widgets`` and ``cli`` are thin faces over it.
"""

from __future__ import annotations

__version__ = "0.1.0"

from napari_stpredict.errors import StPredictError

__all__ = ["StPredictError", "__version__", "open_slide"]


def __getattr__(name: str):
    # open_slide is imported lazily so that ``import napari_stpredict`` (napari scans plugins at
    # start-up) stays cheap.
    if name == "open_slide":
        from napari_stpredict.slide import open_slide

        return open_slide
    raise AttributeError(f"module 'napari_stpredict' has no attribute {name!r}")
