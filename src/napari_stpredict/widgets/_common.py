"""What every dock shares: the one ``Failed`` value, the one notification helper, the one view
rectangle, and the one worker helper.

Workers
-------
:func:`start_worker` runs a function or a generator in a ``napari.qt.threading`` worker
(stardist-napari's pattern: a generator yields progress or partial results, the GUI thread only
receives them) or, with ``inline=True``, in the calling thread (scripts and tests get the same
callbacks, in the same order). Expected failures travel as :class:`Failed` values (superqt would
treat a returned exception as a crash). :class:`WorkerSet` keeps the running workers of a dock so
it can cancel them and, in scripts after the event loop, wait for them without a sleep loop.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_stpredict.errors import StPredictError

__all__ = [
    "Failed",
    "WorkerSet",
    "camera_of",
    "in_background",
    "notify",
    "on_main_thread",
    "slide_source",
    "start_worker",
    "view_rect_px",
]


@dataclass(frozen=True)
class Failed:
    """A worker's error, returned as a value (reaches ``returned``, not ``errored``)."""

    error: BaseException

    @property
    def text(self) -> str:
        """One line for the dock and the notification."""
        e = self.error
        return str(e) if isinstance(e, StPredictError) else f"{type(e).__name__}: {e}"

    def __str__(self) -> str:
        return self.text


def notify(kind: str, text: str) -> None:
    """A napari notification: ``kind`` is ``error``, ``warning`` or ``info``."""
    from napari.utils.notifications import show_error, show_info, show_warning

    {"error": show_error, "warning": show_warning, "info": show_info}[kind](text)


def on_main_thread() -> bool:
    """Whether the caller runs on the interpreter's main (GUI) thread."""
    return threading.current_thread() is threading.main_thread()


def camera_of(viewer: Any) -> Any:
    """The viewer's camera (``viewer.scene.camera`` since napari 0.9, ``viewer.camera`` before)."""
    scene = getattr(viewer, "scene", None)
    camera = getattr(scene, "camera", None) if scene is not None else None
    return camera if camera is not None else viewer.camera


def view_rect_px(viewer: Any, slide_layer: Any) -> tuple[float, float, float, float] | None:
    """The canvas' view of ``slide_layer`` as a level-0 rectangle ``(y0, x0, y1, x1)``.

    ``None`` when the canvas has no size yet. The one place that turns camera + canvas into
    slide pixels (live prediction, figure export and ``view`` all use it).
    """
    from napari_stpredict.widgets._heatmaps import world_to_level0

    if viewer is None or slide_layer is None:
        return None
    camera = camera_of(viewer)
    center = np.asarray(camera.center, dtype=float)[-2:]
    zoom = float(camera.zoom)
    size = np.asarray(viewer.canvas.size, dtype=float)[-2:]  # (h, w) screen px
    if zoom <= 0 or not np.all(size > 0):
        return None
    half = size / (2.0 * zoom)
    a = world_to_level0(slide_layer, center - half)
    b = world_to_level0(slide_layer, center + half)
    return (float(a[0]), float(a[1]), float(b[0]), float(b[1]))


#: Key of the canvas overlay of :func:`keep_text_alive`.
TEXT_KEEPALIVE_KEY = "stpredict_text_keepalive"


def keep_text_alive(viewer: Any) -> None:
    """Keep one drawn text visual on ``viewer``'s canvas for as long as the viewer lives.

    napari 0.9.2 with vispy 0.17 (seen under Xvfb with Mesa) segfaults in ``glDrawArrays`` when
    the last text visual on the canvas goes — a heatmap's colour bar or legend removed with its
    layer — and any layer is drawn afterwards (reproduced with plain napari, no plugin code). A
    canvas text overlay that is always drawn (one space, fully transparent) keeps the shared
    text resources alive, so removing heatmaps is safe. Idempotent; does nothing on a napari
    without ``viewer.canvas.overlays``.
    """
    overlays = getattr(getattr(viewer, "canvas", None), "overlays", None)
    if overlays is None or TEXT_KEEPALIVE_KEY in overlays:
        return
    with contextlib.suppress(Exception):  # a napari whose overlay API moved: nothing to keep
        from napari.components.overlays import TextOverlay

        overlays[TEXT_KEEPALIVE_KEY] = TextOverlay(visible=True, text=" ", opacity=0.0, font_size=1)


def slide_source(layer: Any) -> tuple[str, float | None]:
    """The slide file and µm/px behind a napari Image layer.

    Raises
    ------
    StPredictError
        If the layer has no file behind it (e.g. an array added from the console).
    """
    meta = (getattr(layer, "metadata", None) or {}).get("stpredict_slide") or {}
    path = meta.get("path")
    mpp = meta.get("mpp")
    if not path:
        source = getattr(layer, "source", None)
        path = getattr(source, "path", None)
    if not path:
        raise StPredictError(
            f"layer {layer.name!r}: no slide file behind it; open the slide with File > Open "
            "(napari-stpredict reader)"
        )
    return str(path), (float(mpp) if mpp else None)


def _guarded(func: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``func`` so expected (and unexpected) errors come back as :class:`Failed`."""
    if inspect.isgeneratorfunction(func):

        def gen(*args: Any, **kwargs: Any) -> Any:
            try:
                return (yield from func(*args, **kwargs))
            except Exception as err:  # reported by the dock, never lost in the thread
                return Failed(err)

        return gen

    def plain(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except Exception as err:
            return Failed(err)

    return plain


class WorkerSet:
    """The running workers of one dock: cancel them all, or wait for them (scripts only)."""

    def __init__(self) -> None:
        self._ended: dict[Any, threading.Event] = {}

    def add(self, worker: Any, ended: threading.Event) -> None:
        self._ended[worker] = ended

    def discard(self, worker: Any) -> None:
        self._ended.pop(worker, None)

    def __len__(self) -> int:
        return sum(not e.is_set() for e in self._ended.values())

    def quit_all(self) -> None:
        """Ask every worker to stop (generators stop at their next yield)."""
        for worker in list(self._ended):
            with contextlib.suppress(RuntimeError, AttributeError):
                worker.quit()

    def wait(self, timeout: float) -> bool:
        """Wait until every worker's thread body has ended; ``False`` on timeout.

        Blocks: call it only from scripts once the event loop is over (never from a slot).
        """
        import time

        deadline = time.monotonic() + max(timeout, 0.0)
        for ended in list(self._ended.values()):
            if not ended.wait(max(deadline - time.monotonic(), 0.0)):
                return False
        return True


def start_worker(
    func: Callable[..., Any],
    *args: Any,
    returned: Callable[[Any], None] | None = None,
    yielded: Callable[[Any], None] | None = None,
    finished: Callable[[], None] | None = None,
    workers: WorkerSet | None = None,
    inline: bool = False,
    **kwargs: Any,
) -> Any:
    """Run ``func(*args, **kwargs)`` off the GUI thread and call back on it.

    Parameters
    ----------
    func
        A function, or a generator function whose yields go to ``yielded`` (progress, partial
        results) and whose ``return`` value goes to ``returned``.
    returned, yielded, finished
        Callbacks, run on the GUI thread (or in the caller's thread when ``inline``). Any
        exception of ``func`` reaches ``returned`` as a :class:`Failed`.
    workers
        A :class:`WorkerSet` that keeps the worker until it ends.
    inline
        Run now in this thread (tests, scripts): same callbacks, same order.

    Returns
    -------
    The napari worker (``None`` when ``inline``).
    """
    body = _guarded(func)
    if inline:
        if inspect.isgeneratorfunction(func):
            gen = body(*args, **kwargs)
            while True:
                try:
                    item = next(gen)
                except StopIteration as stop:
                    value = stop.value
                    break
                if yielded is not None:
                    yielded(item)
        else:
            value = body(*args, **kwargs)
        if returned is not None:
            returned(value)
        if finished is not None:
            finished()
        return None

    from napari.qt.threading import create_worker

    ended = threading.Event()
    if inspect.isgeneratorfunction(func):

        def run(*a: Any, **k: Any) -> Any:
            try:
                return (yield from body(*a, **k))
            finally:
                ended.set()

    else:

        def run(*a: Any, **k: Any) -> Any:
            try:
                return body(*a, **k)
            finally:
                ended.set()

    worker = create_worker(run, *args, _start_thread=False, _ignore_errors=True, **kwargs)
    if returned is not None:
        worker.returned.connect(returned)
    if yielded is not None and hasattr(worker, "yielded"):
        worker.yielded.connect(yielded)
    if workers is not None:
        workers.add(worker, ended)
        worker.finished.connect(lambda: workers.discard(worker))
    if finished is not None:
        worker.finished.connect(finished)
    worker.start()
    return worker


def in_background(func: Callable[..., Any], *args: Any, name: str = "stpredict-bg") -> None:
    """Fire and forget: ``func(*args)`` in a daemon thread (closing, joining, deleting).

    For work whose result the GUI does not wait for (closing a retired session joins its
    reader pool; that join must not stall the event loop).
    """
    threading.Thread(target=func, args=args, name=name, daemon=True).start()


def first_visible(layers: Sequence[Any]) -> Any:
    """The top-most visible layer of ``layers`` (in layer-list order), else the first."""
    for layer in reversed(list(layers)):
        if getattr(layer, "visible", False):
            return layer
    return layers[0] if layers else None
