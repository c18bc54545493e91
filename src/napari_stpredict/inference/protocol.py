"""What the engine and the store need from a model: :class:`PredictorProtocol`.

:class:`napari_stpredict.model.Predictor` satisfies it; tests and benchmarks pass lighter
objects (a zero-cost model, a fake). Only the attributes listed here are read by
``inference/`` — :func:`~napari_stpredict.inference.store.model_key` included.

Optional parts (checked with ``getattr``, so older predictors keep working):

- ``input_spec`` — a :class:`napari_stpredict.model.preprocess.InputSpec`; its ``fields()``
  lists every field of view the model wants per tile (the patch first, then e.g. a wider
  context field). Without it the model gets one field of ``patch_um`` / ``patch_px``.
- ``has_uncertainty`` + ``predict(x, return_spread=True)`` — the per-gene spread is stored in
  the store's optional ``spread`` array.
- ``batch_size`` — the engine's default batch size.
- ``input_spec.tta``, ``top_k``, ``weighting``, ``temperature`` — part of the store's cache key
  (``store_keys.inference_settings``), so a view scored with 1 test-time view and a ``predict``
  run with 8 never share cached values.
"""

from __future__ import annotations

from os import PathLike
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["PredictorProtocol", "fields_of", "has_uncertainty"]


@runtime_checkable
class PredictorProtocol(Protocol):
    """The model as the engine, the store and the session see it."""

    genes: list[str]
    patch_um: float | None
    patch_px: int
    metadata: dict[str, Any]
    #: the model file (keys the prediction cache when the metadata has no content hash)
    path: str | PathLike[str]
    device: Any

    def predict(self, patches: np.ndarray) -> np.ndarray:
        """``(N, P, P, 3)`` or ``(N, F, P, P, 3)`` uint8 → ``(N, G)`` float32."""
        ...


def fields_of(predictor: Any, *, patch_um: float) -> list[tuple[float, int]]:
    """The fields of view ``(side µm, side px)`` to read per tile, the patch first.

    Uses ``predictor.input_spec.fields()`` when the predictor has one; a field without a
    physical size (``None``) is taken as ``patch_um`` scaled like the patch. Without an input
    spec: one field, ``(patch_um, patch_px)``.
    """
    px = int(predictor.patch_px)
    spec = getattr(predictor, "input_spec", None)
    fields_fn = getattr(spec, "fields", None)
    if fields_fn is None:
        return [(float(patch_um), px)]
    out: list[tuple[float, int]] = []
    raw = list(fields_fn())
    base_um = raw[0][0] if raw and raw[0][0] is not None else None
    for k, (um, fpx) in enumerate(raw):
        if um is None:  # a model without a physical size: fields are multiples of the patch
            um = patch_um * (float(getattr(spec, "context", 0.0) or 1.0) if k else 1.0)
        elif base_um is not None and base_um != patch_um:
            um = float(um) * patch_um / float(base_um)  # the grid's patch size wins
        out.append((float(um), int(fpx)))
    return out or [(float(patch_um), px)]


def has_uncertainty(predictor: Any) -> bool:
    """Whether ``predictor.predict(x, return_spread=True)`` is available."""
    return bool(getattr(predictor, "has_uncertainty", False))
