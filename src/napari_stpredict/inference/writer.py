"""The engine's background store writer: batches in, whole store blocks written off-thread."""

from __future__ import annotations

import queue
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from napari_stpredict.errors import StPredictError
from napari_stpredict.inference.results import EngineStats
from napari_stpredict.inference.store import PredictionStore, WriteBuffer

__all__ = ["BackgroundWriter"]

_Item = tuple[np.ndarray, np.ndarray, np.ndarray | None]


class BackgroundWriter(threading.Thread):
    """Drains queued batches into a :class:`~napari_stpredict.inference.store.WriteBuffer`.

    Parameters
    ----------
    store
        Where the predictions go.
    stats
        The engine's counters (``write_s``, ``blocks_written``, ``write_buffer_peak_bytes``).
    maxsize
        Batches that may wait in the queue (the model blocks beyond that).
    expected
        The cells this run will write (whole blocks are written as soon as they are complete).
    """

    def __init__(
        self,
        store: PredictionStore,
        stats: EngineStats,
        maxsize: int,
        expected: np.ndarray | None = None,
    ) -> None:
        super().__init__(name="stpredict-store-writer", daemon=True)
        self.store = store
        self.stats = stats
        self.buffer = WriteBuffer(store, expected)
        self.queue: queue.Queue[_Item | None] = queue.Queue(maxsize)
        self.error: BaseException | None = None

    def _do(self, fn: Callable[..., Any], *args: Any) -> None:
        if self.error is not None:
            return
        try:
            t0 = time.perf_counter()
            fn(*args)
            self.stats.write_s += time.perf_counter() - t0
        except BaseException as err:  # re-raised in the generator's thread
            self.error = err

    def run(self) -> None:
        """Thread body: add queued batches, flush aged blocks when idle, flush all at the end."""
        while True:
            try:
                item = self.queue.get(timeout=self.buffer.max_age_s / 2)
            except queue.Empty:
                self._do(self.buffer.flush_aged)
                continue
            if item is None:
                break
            self._do(self.buffer.add, *item)
        self._do(self.buffer.flush)
        self.stats.blocks_written += self.buffer.blocks_written
        self.stats.write_buffer_peak_bytes = max(
            self.stats.write_buffer_peak_bytes, self.buffer.peak_bytes
        )

    def put(self, cells: np.ndarray, values: np.ndarray, spread: np.ndarray | None) -> None:
        """Queue one batch (raises a write error of an earlier batch first)."""
        self.raise_error()
        self.queue.put((cells, values, spread))

    def finish(self, *, failed: bool = False) -> None:
        """Flush everything and stop the thread; report a write error.

        With ``failed`` (another error is already on its way) a write error is only warned
        about, so that it neither masks the other error nor goes unseen; otherwise it is raised.
        """
        self.queue.put(None)
        self.join()
        if self.error is not None and failed:
            warnings.warn(
                f"{self.store.path}: some predictions were not stored ({self.error})",
                RuntimeWarning,
                stacklevel=3,
            )
        elif self.error is not None:
            self.raise_error()

    def raise_error(self) -> None:
        """Raise the pending write error (once) as an :class:`StPredictError`."""
        if self.error is not None:
            err, self.error = self.error, None
            if isinstance(err, StPredictError):
                raise err
            raise StPredictError(f"{self.store.path}: cannot write predictions ({err})") from err
