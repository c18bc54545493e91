"""The prediction cache folder: where cached stores live and how it stays bounded.

``STPREDICT_CACHE_DIR`` or ``platformdirs.user_cache_dir("napari-stpredict")/predictions``
(see :func:`default_cache_dir`). The folder is bounded by ``STPREDICT_CACHE_MAX_GB`` (default
:data:`DEFAULT_MAX_BYTES`): when a store is opened, the least recently used stores (by folder
modification time, refreshed on open and write) are removed until the total fits
(:func:`evict_cache`). :func:`clear_cache` removes every store. Only folders that are
recognisably ours (:func:`~napari_stpredict.inference.store_layout.is_our_store`) are ever
deleted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari_stpredict.errors import StPredictError
from napari_stpredict.inference.store_layout import is_our_store, read_store_info

__all__ = [
    "DEFAULT_MAX_BYTES",
    "CacheEntry",
    "cache_max_bytes",
    "clear_cache",
    "default_cache_dir",
    "evict_cache",
    "list_cache",
]

#: Default bound of the cache folder (overridden by ``STPREDICT_CACHE_MAX_GB``).
DEFAULT_MAX_BYTES = 4 * 2**30
#: Age after which a half-created store (``.<key>.zarr.tmp-*``) counts as left by a dead run.
_STALE_TMP_S = 3600.0


def default_cache_dir() -> Path:
    """The prediction cache folder.

    ``$STPREDICT_CACHE_DIR`` when set, else ``<user cache dir>/napari-stpredict/predictions``
    (``~/.cache/napari-stpredict/predictions`` on Linux, ``~/Library/Caches/...`` on macOS,
    ``%LOCALAPPDATA%\\napari-stpredict\\Cache\\...`` on Windows).
    """
    env = os.environ.get("STPREDICT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("napari-stpredict", appauthor=False)) / "predictions"


def cache_max_bytes() -> int:
    """Size bound of the cache: ``$STPREDICT_CACHE_MAX_GB`` (GiB, float) or the default."""
    env = os.environ.get("STPREDICT_CACHE_MAX_GB")
    if not env:
        return DEFAULT_MAX_BYTES
    try:
        value = float(env)
    except ValueError:
        raise StPredictError(f"STPREDICT_CACHE_MAX_GB={env!r}: not a number") from None
    if value < 0:
        raise StPredictError(f"STPREDICT_CACHE_MAX_GB={env!r}: must be ≥ 0")
    return int(value * 2**30)


@dataclass(frozen=True)
class CacheEntry:
    """One store in the cache folder (see :func:`list_cache`)."""

    path: Path
    size: int  #: bytes on disk
    mtime: float  #: last use (folder modification time, seconds since the epoch)
    info: dict[str, Any]  #: the store's ``stpredict_store`` attributes (``{}`` for a torn one)


def _folder_size(path: Path) -> int:
    """Bytes of the files under ``path`` (files vanishing meanwhile count 0)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(dirpath, name)).st_size
    return total


def _remove_stale_tmp(root: Path, *, older_than: float) -> None:
    """Remove half-created stores older than ``older_than`` seconds."""
    now = time.time()
    for p in root.glob(".*.zarr.tmp-*"):
        with contextlib.suppress(OSError):
            if now - p.stat().st_mtime > older_than:
                shutil.rmtree(p, ignore_errors=True)


def list_cache(root: str | os.PathLike | None = None) -> list[CacheEntry]:
    """The stores in a cache folder, least recently used first.

    Parameters
    ----------
    root
        Cache folder; ``None`` = :func:`default_cache_dir`.
    """
    root = Path(root) if root is not None else default_cache_dir()
    if not root.is_dir():
        return []
    out = []
    for p in root.glob("*.zarr"):
        if not is_our_store(p):
            continue  # not ours: never touched
        info = read_store_info(p) or {}
        with contextlib.suppress(OSError):
            out.append(CacheEntry(p, _folder_size(p), p.stat().st_mtime, info))
    out.sort(key=lambda e: e.mtime)
    return out


def evict_cache(
    root: str | os.PathLike | None = None,
    *,
    max_bytes: int | None = None,
    keep: Sequence[str | os.PathLike] = (),
) -> list[Path]:
    """Remove least recently used stores until the cache folder fits ``max_bytes``.

    Parameters
    ----------
    root
        Cache folder; ``None`` = :func:`default_cache_dir`.
    max_bytes
        Size bound; ``None`` = :func:`cache_max_bytes`.
    keep
        Store folders never removed (e.g. the one being opened).

    Returns
    -------
    list of pathlib.Path
        The removed store folders.
    """
    root = Path(root) if root is not None else default_cache_dir()
    limit = cache_max_bytes() if max_bytes is None else int(max_bytes)
    if not root.is_dir():
        return []
    _remove_stale_tmp(root, older_than=_STALE_TMP_S)
    keep_set = {Path(k).resolve() for k in keep}
    entries = list_cache(root)
    total = sum(e.size for e in entries)
    removed = []
    for e in entries:
        if total <= limit:
            break
        if e.path.resolve() in keep_set:
            continue
        shutil.rmtree(e.path, ignore_errors=True)
        total -= e.size
        removed.append(e.path)
    return removed


def clear_cache(root: str | os.PathLike | None = None) -> int:
    """Remove every prediction store in the cache folder.

    Stores opened in this process become unusable (reopen them); cancel running predictions
    first. Folders that are not prediction stores are left alone.

    Parameters
    ----------
    root
        Cache folder; ``None`` = :func:`default_cache_dir`.

    Returns
    -------
    int
        Bytes freed.
    """
    root = Path(root) if root is not None else default_cache_dir()
    if not root.is_dir():
        return 0
    freed = 0
    for e in list_cache(root):
        shutil.rmtree(e.path, ignore_errors=True)
        freed += e.size
    _remove_stale_tmp(root, older_than=0.0)
    return freed
