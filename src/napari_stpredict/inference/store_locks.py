"""The locks of prediction stores.

- :func:`store_write_lock` — held around every write of a store's arrays: a lock per store
  in this process, plus an advisory ``fcntl`` lock on ``<store>/.lock`` between processes
  (POSIX only), so writers of one store never interleave.
- :func:`acquire_output_lock` — the lock of a store at a fixed place
  (:meth:`~napari_stpredict.inference.store.PredictionStore.open_at`): ``<store>.lock``
  (:mod:`filelock`), held for as long as the store is open, so a second process opening
  the same output waits or refuses in one line.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from napari_stpredict.errors import StPredictError

__all__ = ["acquire_output_lock", "store_write_lock"]

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _thread_lock(path: Path) -> threading.Lock:
    """The one in-process lock of the store at ``path``."""
    key = str(path.resolve())
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


@contextlib.contextmanager
def store_write_lock(path: Path) -> Iterator[None]:
    """Exclusive write access to the store at ``path`` (threads and, on POSIX, processes)."""
    with _thread_lock(path):
        try:
            import fcntl
        except ImportError:  # Windows: in-process lock only
            yield
            return
        fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def acquire_output_lock(path: Path, timeout: float | None) -> Any:
    """An exclusive advisory lock on ``<path>.lock``; one line when another process holds it.

    Parameters
    ----------
    path
        The store folder (need not exist; its parent is created).
    timeout
        Seconds to wait; ``None`` = ``$STPREDICT_LOCK_TIMEOUT`` or 0 (refuse at once).

    Returns
    -------
    filelock.FileLock
        Held; call ``release()`` when done.

    Raises
    ------
    napari_stpredict.io_utils.OutputBusyError
        When another process holds the lock past ``timeout``.
    StPredictError
        When the lock file cannot be made.
    """
    from filelock import FileLock, Timeout

    if timeout is None:
        try:
            timeout = float(os.environ.get("STPREDICT_LOCK_TIMEOUT", "0") or 0)
        except ValueError:
            timeout = 0.0
    lock_path = path.with_name(path.name + ".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(lock_path, thread_local=False, is_singleton=False)
        lock.acquire(timeout=max(float(timeout), 0.0))
    except Timeout:
        from napari_stpredict.io_utils import OutputBusyError

        raise OutputBusyError(
            f"{path}: in use by another stpredict process (lock {lock_path.name}); wait for "
            "it to finish or choose another output folder"
        ) from None
    except OSError as err:
        raise StPredictError(f"{lock_path}: cannot lock the output ({err})") from None
    return lock
