"""Progress reporting and cancellation shared by the core, the CLI and the widgets.

The core never draws a progress bar: it calls a :class:`ProgressCallback` and checks a
:class:`CancelToken`. The CLI adapts these to rich progress bars, the widgets to napari progress
and a worker's quit flag.
"""

from __future__ import annotations

import threading
from typing import Protocol

from napari_stpredict.errors import Cancelled


class ProgressCallback(Protocol):
    """Called as ``progress(done, total, message)``; ``total`` may be ``None`` if unknown."""

    def __call__(self, done: int, total: int | None, message: str = "") -> None: ...


class CancelToken:
    """A thread-safe cancel flag checked between units of work.

    Examples
    --------
    >>> token = CancelToken()
    >>> token.cancel()
    >>> token.cancelled
    True
    """

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        """Ask the work to stop at its next check."""
        self._event.set()

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._event.is_set()

    def raise_if_cancelled(self, what: str = "work") -> None:
        """Raise :class:`~napari_stpredict.errors.Cancelled` if cancelled."""
        if self._event.is_set():
            raise Cancelled(f"{what} cancelled")


def check_cancel(cancel: CancelToken | None, what: str = "work") -> None:
    """Raise if ``cancel`` is set; a ``None`` token never cancels."""
    if cancel is not None:
        cancel.raise_if_cancelled(what)


def report(
    progress: ProgressCallback | None, done: int, total: int | None, message: str = ""
) -> None:
    """Call ``progress`` if given."""
    if progress is not None:
        progress(done, total, message)
