"""The one rich progress adapter of the CLI: named bars fed by ``progress(done, total, msg)``.

Every command that reports progress (``predict``, ``convert``, ``train``, ``evaluate``,
``demo``) builds a :class:`Bars` and hands :meth:`Bars.callback` to the core, which only knows
the package's ``ProgressCallback`` protocol. Bars are thread-safe (a cohort's slides report from
worker threads) and go to stderr, so ``--json`` output on stdout stays clean.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any

from napari_stpredict.progress import ProgressCallback


class Bars:
    """A rich ``Progress`` with one bar per key.

    Parameters
    ----------
    console
        A ``rich.console.Console`` (default: one on stderr).
    unit
        Shown after the counts (``"tile rows"``, ``"slides"``).
    enabled
        False: nothing is drawn (the callbacks still work).
    transient
        Remove the bars when done.
    """

    def __init__(
        self,
        console: Any = None,
        *,
        unit: str = "",
        enabled: bool = True,
        transient: bool = False,
    ) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = console or Console(stderr=True)
        self.unit = unit
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not enabled,
            transient=transient,
        )
        self._tasks: dict[Hashable, Any] = {}
        self._lock = threading.Lock()
        self._entered = False
        self._started = False

    def __enter__(self) -> Bars:
        # the display starts with the first bar: an error raised before any progress leaves
        # stderr one line (no empty progress render before "stpredict: error: ...")
        self._entered = True
        return self

    def __exit__(self, *exc: Any) -> None:
        with self._lock:
            started, self._started, self._entered = self._started, False, False
        if started:
            self.progress.__exit__(*exc)

    def update(
        self,
        key: Hashable,
        done: int,
        total: int | None,
        message: str = "",
        *,
        label: str | None = None,
    ) -> None:
        """Create or move the bar ``key`` (its label defaults to ``str(key)``)."""
        note = f"{message} ({self.unit})" if message and self.unit else message
        with self._lock:
            task = self._tasks.get(key)
            if task is None:
                if self._entered and not self._started:
                    self._started = True
                    self.progress.start()
                task = self.progress.add_task(label or str(key), total=total, note=note)
                self._tasks[key] = task
            self.progress.update(task, completed=done, total=total, note=note)

    def advance(self, key: Hashable, step: int = 1) -> None:
        """Advance the bar ``key`` by ``step``."""
        with self._lock:
            task = self._tasks.get(key)
            if task is not None:
                self.progress.advance(task, step)

    def remove(self, key: Hashable) -> None:
        """Drop the bar ``key`` (no-op when absent)."""
        with self._lock:
            task = self._tasks.pop(key, None)
            if task is not None:
                self.progress.remove_task(task)

    def print(self, text: str) -> None:
        """A line above the bars (rich markup allowed)."""
        with self._lock:
            self.progress.console.print(text, highlight=False)

    def callback(self, key: Hashable, label: str | None = None) -> ProgressCallback:
        """``progress(done, total, message)`` feeding the bar ``key``."""

        def progress(done: int, total: int | None, message: str = "") -> None:
            self.update(key, done, total, message, label=label)

        return progress

    def keyed(self) -> Callable[[str, int, int | None, str], None]:
        """``progress(key, done, total, message)``: one bar per key (a cohort's slides)."""

        def progress(key: str, done: int, total: int | None, message: str = "") -> None:
            self.update(key, done, total, message, label=f"  {key}")

        return progress


STATUS_STYLE = {"done": "green", "skipped": "cyan", "failed": "red"}


def status_markup(status: str) -> str:
    """``[green]done[/green]``: a row status in its colour."""
    style = STATUS_STYLE.get(status, "yellow")
    return f"[{style}]{status}[/{style}]"
