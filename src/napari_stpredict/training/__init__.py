"""Training: a dataset manifest → a model file (CMRCNet, BLEEP or direct regression).

Plain PyTorch, read top to bottom in :func:`train` (:mod:`.run`):

* :mod:`.config` — :class:`TrainConfig` (every option) and :class:`TrainResult`;
* :mod:`.data` — sections read and checked before anything trains (one-line
  :class:`~napari_stpredict.errors.DatasetError` otherwise), the gene panel, normalised
  expression, the train/validation split, and uint8 patches read ahead in threads through the
  engine's reader (:func:`napari_stpredict.slide.patches.read_patches`), kept in memory when
  they fit;
* :mod:`.auto` — what ``train_backbone="auto"`` becomes (``all`` on CUDA; ``last`` or
  ``none`` on a CPU by measured cost) and the time per epoch, printed before the first epoch;
* :mod:`.features` — frozen-backbone features, computed once per spot (``none``);
* :mod:`.loop` — one epoch of training, one validation pass (the evaluation's Pearson r);
* :mod:`.state` — the resumable state file, rewritten atomically after every epoch;
* :mod:`.bank` — the reference bank (training spots only) and the model file's metadata.

Pixels become encoder input only through :func:`napari_stpredict.model.preprocess.encoder_input`
with the backbone's own mean/std (recorded in the model file as ``metadata["input"]``), the
same function the Predictor and the engine use.
"""

from __future__ import annotations

from napari_stpredict._lazy import lazy_getattr

__all__ = ["TrainConfig", "TrainResult", "state_path_for", "train"]

# torch is imported when training starts, not with the package: ``stpredict train --help``
# shows TrainConfig's defaults without it.
_LAZY = {
    "TrainConfig": "napari_stpredict.training.config",
    "TrainResult": "napari_stpredict.training.config",
    "state_path_for": "napari_stpredict.training.state",
    "train": "napari_stpredict.training.run",
    "input_spec_for": "napari_stpredict.training.run",
}


__getattr__ = lazy_getattr(__name__, _LAZY)
