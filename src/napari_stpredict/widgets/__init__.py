"""napari dock widgets (the only place, with ``_reader``/``_writer``/``_sample_data`` and
``cli.view_cmd``/``cli.demo_cmd``, that imports Qt or napari).

- :class:`~napari_stpredict.widgets.predict.PredictWidget` — "Predict expression": model, slide,
  genes, live heatmaps with colour bars, whole-slide prediction, cache.
- :class:`~napari_stpredict.widgets.tumor.TumorWidget` — "Tumour localization": tumour outlines.
- :class:`~napari_stpredict.widgets.export.ExportWidget` — "Export".

Each dock is a thin Qt view over a Qt-free state object (:mod:`._state`); work runs in workers
(:func:`._common.start_worker`); nothing touches files, zarr or joins threads on the GUI thread.
Widgets talk to each other through layers: a heatmap layer carries
``layer.metadata["stpredict"]`` (see ``docs/architecture.md``).
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["PredictWidget", "guard_llvm_clash"]


def guard_llvm_clash() -> bool:
    """Keep ``import triton`` from crashing a napari process; call before importing the model.

    Mesa's OpenGL drivers (llvmpipe under Xvfb/VMs, radeonsi on AMD) map ``libLLVM`` into the
    process once napari's canvas exists. ``timm`` imports ``torchvision``, which imports
    ``torch._dynamo``, which imports ``triton``, whose own LLVM then clashes with Mesa's and the
    interpreter segfaults. Where ``libLLVM`` is already mapped and triton is not yet imported,
    this makes ``import triton`` raise ImportError instead; torch then runs without triton,
    which inference does not use (it only serves ``torch.compile``).

    Returns
    -------
    bool
        Whether triton was blocked.
    """
    if "triton" in sys.modules or not sys.platform.startswith("linux"):
        return False
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    if "libLLVM" not in maps:
        return False
    sys.modules["triton"] = None  # type: ignore[assignment]
    return True


def __getattr__(name: str):
    # lazy: importing the package must not import Qt (napari scans plugins at start-up)
    if name == "PredictWidget":
        from napari_stpredict.widgets.predict import PredictWidget

        return PredictWidget
    raise AttributeError(f"module 'napari_stpredict.widgets' has no attribute {name!r}")
