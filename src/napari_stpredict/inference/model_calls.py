"""Calling the model on a batch: chunks, shape checks, halving the batch on out-of-memory."""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np

from napari_stpredict.errors import StPredictError
from napari_stpredict.inference.results import EngineStats

__all__ = ["ModelCaller", "free_device_memory", "is_oom"]


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` is a (CUDA) out-of-memory error."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def free_device_memory() -> None:
    """Release cached GPU memory (best effort)."""
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # best effort only
        pass


def _host_tensor(x: Any) -> bool:
    """A torch tensor in host memory (pinned or not), which could be handed over as numpy."""
    return not isinstance(x, np.ndarray) and str(getattr(x, "device", "cpu")) == "cpu"


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


class ModelCaller:
    """``predictor.predict`` over a batch in chunks of ``bs``, as the engine calls it.

    Parameters
    ----------
    predictor
        The model (``predict(patches[, return_spread=True])``).
    n_genes
        Columns expected from the model.
    with_spread
        Ask for the per-gene spread too.
    stats
        The engine's counters (``model_calls``, ``predict_s``, ``oom_halvings``).
    device
        The predictor's device, for messages.

    Attributes
    ----------
    pinned_refused : bool
        The model refused a (pinned) torch tensor once: hand it numpy from now on.
    oom_batch : int | None
        The batch size after the last out-of-memory halving (``None``: none happened).
    """

    def __init__(
        self, predictor: Any, *, n_genes: int, with_spread: bool, stats: EngineStats, device: str
    ) -> None:
        self.predictor = predictor
        self.n_genes = n_genes
        self.with_spread = with_spread
        self.stats = stats
        self.device = device
        self.pinned_refused = False
        self.oom_batch: int | None = None

    def predict(self, patches: Any, bs: int) -> tuple[np.ndarray, np.ndarray | None, int]:
        """Predict ``patches`` in chunks of ``bs``; return values, spread and the batch size."""
        out: list[np.ndarray] = []
        spreads: list[np.ndarray] = []
        start = 0
        while start < len(patches):
            chunk = patches[start : start + bs]
            try:
                values, spread = self._call(chunk)
            except Exception as err:
                if _host_tensor(chunk) and not is_oom(err):
                    self.pinned_refused = True  # the model refused a torch tensor: numpy now
                    patches = patches.numpy()
                    continue
                bs = self._halve(err, bs)
                continue
            out.append(self._checked(values, len(chunk)))
            if spread is not None:
                spreads.append(np.asarray(spread, dtype=np.float32).reshape(out[-1].shape))
            start += len(chunk)
        spread_all = _joined(spreads) if spreads and len(spreads) == len(out) else None
        return _joined(out), spread_all, bs

    def _call(self, chunk: Any) -> tuple[Any, Any]:
        self.stats.model_calls += 1
        t0 = time.perf_counter()
        try:
            if self.with_spread:
                return self.predictor.predict(chunk, return_spread=True)
            return self.predictor.predict(chunk), None
        finally:
            self.stats.predict_s += time.perf_counter() - t0

    def _checked(self, values: Any, n: int) -> np.ndarray:
        values = np.asarray(values, dtype=np.float32)
        if values.shape != (n, self.n_genes):
            raise StPredictError(
                f"predictor returned shape {values.shape}, expected ({n}, {self.n_genes})"
            )
        return values

    def _halve(self, err: Exception, bs: int) -> int:
        """After ``err``: the next batch size (out of memory), or raise it."""
        if not is_oom(err):
            raise err
        free_device_memory()
        if bs == 1:
            raise StPredictError(f"out of memory on {self.device} even with batch size 1") from None
        old, bs = bs, max(1, bs // 2)
        self.oom_batch = bs
        self.stats.oom_halvings += 1
        warnings.warn(
            f"out of memory on {self.device} at batch size {old}; continuing with {bs}",
            RuntimeWarning,
            stacklevel=4,
        )
        return bs
