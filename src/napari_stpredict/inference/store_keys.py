"""Cache keys of prediction stores: :func:`model_key` and :func:`store_key`.

A store is named by a key of everything its values depend on — the slide's content, the
model (weights, metadata, genes and the inference settings it runs with), the grid geometry,
the dtype and the layout version — so two runs share a store exactly when they would
predict the same numbers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from napari_stpredict.errors import StPredictError
from napari_stpredict.inference.grid import TileGrid
from napari_stpredict.inference.store_layout import STORE_VERSION

__all__ = ["inference_settings", "model_key", "store_key"]


def inference_settings(predictor: Any) -> dict[str, Any]:
    """The settings a predictor runs with that change its predictions, where it has them.

    ``tta`` (``predictor.input_spec.tta``: symmetries averaged per patch), and for retrieval
    ``top_k``, ``weighting`` and ``temperature``: the effective values, i.e. the model
    file's unless the :class:`~napari_stpredict.model.Predictor` was made with overrides.
    Read with ``getattr``: a setting a (duck-typed) predictor lacks, or that is ``None``, is
    left out.
    """
    found = {
        "tta": getattr(getattr(predictor, "input_spec", None), "tta", None),
        "top_k": getattr(predictor, "top_k", None),
        "weighting": getattr(predictor, "weighting", None),
        "temperature": getattr(predictor, "temperature", None),
    }
    return {name: value for name, value in found.items() if value is not None}


def model_key(predictor: Any) -> str:
    """A content key of a model as it predicts: its metadata, genes and inference settings.

    The metadata holds the weights' SHA-256 (``content_sha256``); without it the model file
    is hashed instead. The effective :func:`inference_settings` are part of the key, so a
    predictor made with other settings than the file's (``Predictor(path, tta=1)``,
    ``top_k=``, ``weighting=``, ``temperature=``) never shares cached predictions with one
    using the file's.

    Raises
    ------
    StPredictError
        With neither ``metadata["content_sha256"]`` nor a model file to hash.
    """
    meta = dict(getattr(predictor, "metadata", None) or {})
    blob = json.dumps(meta, sort_keys=True, default=str).encode()
    h = hashlib.sha256(blob)
    if "content_sha256" not in meta:
        path = getattr(predictor, "path", None)
        if path is None or not Path(path).is_file():
            raise StPredictError(
                f"{type(predictor).__name__}: cannot key the prediction cache (no "
                "metadata['content_sha256'] and no model file path)"
            )
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(2**22), b""):
                h.update(block)
    h.update(json.dumps(list(getattr(predictor, "genes", []))).encode())
    settings = inference_settings(predictor)
    if settings:  # absent for predictors without settings: their keys stay as they were
        h.update(json.dumps({"inference": settings}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def store_key(*, slide_fingerprint: str, model: str, grid: TileGrid, dtype: str = "float32") -> str:
    """The cache key of a store: slide content + model + grid geometry + dtype + layout version."""
    blob = json.dumps(
        {
            "slide": slide_fingerprint,
            "model": model,
            "grid": grid.to_dict(),
            "dtype": dtype,
            "store": STORE_VERSION,
        },
        sort_keys=True,
    ).encode()
    return hashlib.sha256(blob).hexdigest()[:32]
