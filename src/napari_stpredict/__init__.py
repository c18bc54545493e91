"""napari-stpredict: spatial gene expression predicted from H&E whole-slide images.

The core (``slide``, ``st``, ``model``, ``inference``, ``tumor``, ``export``) is plain Python;
``widgets`` and ``cli`` are thin faces over it.
"""

from __future__ import annotations

__version__ = "0.1.0"

from napari_stpredict._lazy import lazy_getattr
from napari_stpredict.errors import StPredictError

__all__ = ["StPredictError", "__version__", "open_slide"]


# open_slide is imported lazily so that ``import napari_stpredict`` (napari scans plugins at
# start-up) stays cheap.
__getattr__ = lazy_getattr(__name__, {"open_slide": "napari_stpredict.slide"})
