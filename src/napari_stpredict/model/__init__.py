"""Models: timm encoders, CMRCNet + baselines, the model file and the Predictor.

Heavy imports (torch, timm) happen when the names are first used, so importing the package is
cheap for napari's plugin scan.
"""

from __future__ import annotations

from napari_stpredict._lazy import lazy_getattr

__all__ = [
    "ModelFile",
    "Predictor",
    "STModel",
    "build_model",
    "create_encoder",
    "list_methods",
    "load_model_file",
    "save_model_file",
]

_LAZY = {
    "ModelFile": "napari_stpredict.model.checkpoint",
    "load_model_file": "napari_stpredict.model.checkpoint",
    "save_model_file": "napari_stpredict.model.checkpoint",
    "Predictor": "napari_stpredict.model.predictor",
    "STModel": "napari_stpredict.model.methods",
    "build_model": "napari_stpredict.model.methods",
    "list_methods": "napari_stpredict.model.methods",
    "create_encoder": "napari_stpredict.model.encoders",
}


__getattr__ = lazy_getattr(__name__, _LAZY)
