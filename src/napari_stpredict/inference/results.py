"""What the inference engine hands back: one batch, its lifetime counters, a whole-slide run.

:class:`BatchResult` is yielded by :meth:`Engine.run <napari_stpredict.inference.Engine.run>`
for every predicted batch; :class:`EngineStats` counts over an engine's lifetime (tests and
benchmarks read it); :class:`RunSummary` is what
:meth:`Engine.predict_all_tissue <napari_stpredict.inference.Engine.predict_all_tissue>` returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["BatchResult", "EngineStats", "RunSummary"]


@dataclass(frozen=True)
class BatchResult:
    """One predicted batch, yielded by :meth:`Engine.run`.

    The values are handed to the store's background writer at the same time; every yielded
    batch is in the store once :meth:`Engine.run` has finished (normally, cancelled or closed).

    Attributes
    ----------
    cells
        ``(n, 2)`` int64 grid indices ``(i, j)``.
    values
        ``(n, genes)`` float32 predictions, columns in ``store.genes`` order.
    done
        Cells predicted so far in this run (including this batch).
    total
        Cells this run predicts (after dropping background and already stored cells).
    batch_size
        The batch size in use (smaller than requested after a GPU out-of-memory error).
    spread
        ``(n, genes)`` float32 per-gene spread when the model has uncertainty, else ``None``.
    """

    cells: np.ndarray
    values: np.ndarray
    done: int
    total: int
    batch_size: int
    spread: np.ndarray | None = None


@dataclass
class EngineStats:
    """Counters over the engine's lifetime (tests assert on ``model_calls``)."""

    model_calls: int = 0  #: calls of ``predictor.predict`` (including ones that ran out of memory)
    cells_predicted: int = 0
    cells_cached: int = 0  #: requested cells found in the store
    cells_background: int = 0  #: requested cells dropped by the tissue mask
    batches: int = 0
    oom_halvings: int = 0
    read_s: float = 0.0  #: summed time of patch reads (in worker threads)
    wait_s: float = 0.0  #: time the model waited for patches
    predict_s: float = 0.0
    write_s: float = 0.0  #: time in store writes (background thread)
    tiles_decoded: int = 0  #: slide tiles decoded (tile cache misses)
    tiles_reused: int = 0  #: slide tile reads served by the tile cache
    tile_cache_peak_bytes: int = 0
    write_buffer_peak_bytes: int = 0
    blocks_written: int = 0  #: whole store blocks written


@dataclass(frozen=True)
class RunSummary:
    """What :meth:`Engine.predict_all_tissue` did."""

    predicted: int  #: cells predicted by this call
    cached: int  #: tissue cells already in the store
    tissue: int  #: tissue cells in the grid
    model_calls: int  #: model calls made by this call
    seconds: float
