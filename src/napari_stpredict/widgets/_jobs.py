"""One Engine job of the live view in a worker thread (used by :mod:`._live`).

- :func:`predict_job` — the worker body: yields each batch the Engine predicts, returns how it
  ended (``"done"``, ``"cancelled"`` or a :class:`~._common.Failed`); closes a retired session;
- :class:`EngineWorker` — a generator worker whose ``quit()`` cancels the Engine;
- :class:`Job` — the record of one run (kind, session, tile sets, progress, outcome);
- :func:`wait_ended` — wait for a job's end (scripts after the event loop, never a slot).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from napari.qt.threading import GeneratorWorker

from napari_stpredict.errors import Cancelled, StPredictError
from napari_stpredict.inference.session import PredictSession
from napari_stpredict.progress import CancelToken
from napari_stpredict.widgets._common import Failed

__all__ = ["EngineWorker", "Job", "batch_cells_values", "predict_job", "wait_ended"]


def batch_cells_values(batch: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(cells (n, 2), values (n, G))`` of one batch yielded by the Engine."""
    if isinstance(batch, tuple):
        cells, values = batch[0], batch[1]
    else:
        cells, values = batch.cells, batch.values
    return np.asarray(cells, dtype=np.int64).reshape(-1, 2), np.asarray(values)


def predict_job(
    session: PredictSession,
    parts: Sequence[np.ndarray],
    center: tuple[float, float] | None,
    token: CancelToken,
    ended: threading.Event,
) -> Iterator[Any]:
    """The worker body: yield each batch the Engine predicts; return how it ended.

    ``parts`` are tile sets in priority order (the visible tiles, then the prefetch margin);
    each is run nearest ``center`` first. Cancelling goes through ``token`` only (never
    ``worker.quit()``): the Engine then stops before its next batch and closes its store
    writer in this thread.
    """
    try:
        for cells in parts:
            run = session.engine.run(cells, center=center, cancel=token)
            with contextlib.closing(run) as batches:
                for batch in batches:
                    yield batch
                    if token.cancelled:
                        return "cancelled"
    except Cancelled:
        return "cancelled"
    except StPredictError as err:
        return Failed(err)
    finally:
        if session.retired:
            session.close()
        ended.set()
    return "cancelled" if token.cancelled else "done"


class EngineWorker(GeneratorWorker):
    """A generator worker whose ``quit()`` cancels the Engine instead of abandoning it.

    napari (``wait_for_workers_to_quit`` at exit) calls ``quit()`` on every worker; cancelling
    the token lets the Engine end after its current batch, in its own thread, with every
    finished batch stored.
    """

    def __init__(self, func: Any, *args: Any, token: CancelToken) -> None:
        super().__init__(func, *args)
        self._token = token

    def quit(self) -> None:
        self._token.cancel()


@dataclass(eq=False)
class Job:
    """One run of the Engine in a worker thread."""

    id: int
    kind: str  # "view" or "slide"
    session: PredictSession
    parts: list[np.ndarray]  # tile sets in priority order
    center: tuple[float, float] | None
    shown_total: int = 0  #: tiles the progress bar counts (in view, or the slide's tissue)
    shown_done: int = 0  #: of those, predicted before the job started
    token: CancelToken = field(default_factory=CancelToken)
    ended: threading.Event = field(default_factory=threading.Event)
    worker: Any = None
    done: int = 0
    outcome: Any = None

    @property
    def total(self) -> int:
        """Number of tiles asked for."""
        return sum(len(p) for p in self.parts)


def wait_ended(event: threading.Event | None, timeout: float) -> bool:
    """Wait for a job's end (scripts after the event loop; never from a slot)."""
    return True if event is None else event.wait(timeout)
