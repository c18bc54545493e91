"""Cached predictions: :class:`PredictionStore` and the prediction cache folder.

A store is a zarr (v3) group in the cache folder, named by a key derived from the slide's
content fingerprint, the model (weights + metadata) and the grid geometry, so the same slide
with the same model is predicted once: revisiting a region, re-opening the slide or running
``stpredict predict`` after exploring it in napari costs no model call.

Layout of ``<cache>/<key>.zarr``::

    values   (genes, gh, gw) float32|float16, NaN = not predicted,
             chunks (≤32 genes, 32, 32): one gene's map reads 1/32 of the store, and the
             engine writes whole 32 × 32 cell blocks at once (all genes, every chunk written
             once, see :class:`WriteBuffer`; measured in docs/benchmarks.md)
    spread   (optional, same shape and chunks) per-gene spread of the prediction, for
             models with uncertainty (``predictor.has_uncertainty``)
    done     (gh, gw) bool, chunks 128 × 128, set after the values of a cell are written
             (a block write rewrites one small chunk, never the whole mask)
    attrs    {"stpredict_store": {"owner": "napari-stpredict", "version", "genes", "grid",
             "dtype", "slide", "model", ...}} — the ownership marker: only folders carrying
             it are ever deleted or replaced (:func:`is_our_store`)

Stores at a fixed place (``OUT/<name>/predictions.zarr`` of ``stpredict predict``) are opened
with :meth:`PredictionStore.open_at`, which holds an advisory lock
(``predictions.zarr.lock``, :mod:`filelock`) for as long as the store is open, so a second
process waits or refuses in one line. A reused store is checked with
:meth:`PredictionStore.verify`: a chunk that cannot be decoded is reported by path, removed,
and its cells are marked not done so the engine predicts them again.

Every chunk file is replaced atomically (written aside, then renamed), so a reader in another
thread or process sees either the old or the new chunk, never a torn one; because ``done`` is
written after ``values``, a cell marked done always has its values. Writers in one process are
serialised by a lock per store; writers in different processes by an advisory file lock
(POSIX only).

Cache location and size
-----------------------
``STPREDICT_CACHE_DIR`` or ``platformdirs.user_cache_dir("napari-stpredict")/predictions``
(see :func:`default_cache_dir`). The folder is bounded by ``STPREDICT_CACHE_MAX_GB`` (default
:data:`DEFAULT_MAX_BYTES`): when a store is opened, the least recently used stores (by folder
modification time, refreshed on open and write) are removed until the total fits.
:func:`clear_cache` removes every store. Only folders that are recognisably ours (a
``*.zarr`` folder whose ``zarr.json`` carries ``stpredict_store``) are ever deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from napari_stpredict.errors import StPredictError
from napari_stpredict.inference.grid import TileGrid
from napari_stpredict.inference.protocol import has_uncertainty

__all__ = [
    "DEFAULT_MAX_BYTES",
    "STORE_VERSION",
    "CacheEntry",
    "PredictionStore",
    "VerifyReport",
    "WriteBuffer",
    "cache_max_bytes",
    "clear_cache",
    "default_cache_dir",
    "evict_cache",
    "is_our_store",
    "list_cache",
    "model_key",
    "remove_store",
    "store_key",
]

#: Format version of a store; part of the key so an incompatible layout is never reused.
STORE_VERSION = 1
#: The ownership marker in a store's attributes.
OWNER = "napari-stpredict"
#: Default bound of the cache folder (overridden by ``STPREDICT_CACHE_MAX_GB``).
DEFAULT_MAX_BYTES = 4 * 2**30
#: Chunk sizes of ``values``: genes per chunk and cells per chunk side.
GENE_CHUNK = 32
CELL_CHUNK = 32
#: Chunk side of the ``done`` mask.
DONE_CHUNK = 128
_ATTR = "stpredict_store"
_DTYPES = ("float32", "float16")
_STALE_TMP_S = 3600.0

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _thread_lock(path: Path) -> threading.Lock:
    key = str(path.resolve())
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


@contextlib.contextmanager
def _write_lock(path: Path) -> Iterator[None]:
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


# --------------------------------------------------------------------------- cache folder
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


def _read_info(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads((path / "zarr.json").read_text())
        info = doc.get("attributes", {}).get(_ATTR)
    except (OSError, ValueError, AttributeError):
        return None
    return info if isinstance(info, dict) else None


_SUBARRAYS = {"values", "done", "spread"}


def _is_torn_store(path: Path) -> bool:
    """A store folder whose group metadata is gone or garbled (a writer was interrupted, or a
    cache clear raced a writer): recognisably ours by its layout, unusable."""
    try:
        names = set(os.listdir(path))
        subs = names & _SUBARRAYS
        if not subs or not names <= _SUBARRAYS | {".lock", "zarr.json"}:
            return False
        if "zarr.json" in names:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                doc = json.loads((path / "zarr.json").read_text())
                if isinstance(doc, dict) and doc.get("attributes"):
                    return False  # readable metadata of someone else (e.g. an OME-Zarr)
        return all(set(os.listdir(path / sub)) <= {"c", "zarr.json"} for sub in subs)
    except OSError:
        return False


def is_our_store(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a prediction store made by napari-stpredict (safe to delete).

    True for a folder whose ``zarr.json`` carries our ``stpredict_store`` attributes (the
    ownership marker written at creation), and for a torn store of ours (see above). An
    OME-Zarr slide, any other zarr or folder, or a file, is never ours.
    """
    p = Path(path)
    if p.is_symlink() or not p.is_dir():
        return False
    info = _read_info(p)
    if info is not None:
        return info.get("owner", OWNER) == OWNER and "genes" in info and "grid" in info
    return _is_torn_store(p)


def remove_store(path: str | os.PathLike) -> None:
    """Delete a prediction store — only if it is ours (:func:`is_our_store`).

    Raises
    ------
    StPredictError
        If something else lies at ``path`` (it is left untouched).
    """
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        return
    if not is_our_store(p):
        raise StPredictError(
            f"{p}: exists and is not a napari-stpredict prediction store; refusing to "
            "replace it (move it away or choose another output folder)"
        )
    shutil.rmtree(p)


def _folder_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(dirpath, name)).st_size
    return total


def _remove_stale_tmp(root: Path, *, older_than: float) -> None:
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
        info = _read_info(p) or {}
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


# --------------------------------------------------------------------------- keys
def model_key(predictor: Any) -> str:
    """A content key of a model: hash of its metadata (which holds the weights' SHA-256).

    Falls back to hashing the model file when the metadata has no ``content_sha256``.
    """
    meta = dict(getattr(predictor, "metadata", None) or {})
    blob = json.dumps(meta, sort_keys=True, default=str).encode()
    h = hashlib.sha256(blob)
    if "content_sha256" not in meta:
        path = getattr(predictor, "path", None)
        if path is None or not Path(path).is_file():
            raise StPredictError(
                f"{type(predictor).__name__}: cannot key the prediction cache (no "
                "metadata['content_sha256'] and no model file path)"
            )
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(2**22), b""):
                h.update(block)
    h.update(json.dumps(list(getattr(predictor, "genes", []))).encode())
    return h.hexdigest()[:32]


def store_key(*, slide_fingerprint: str, model: str, grid: TileGrid, dtype: str = "float32") -> str:
    """The cache key of a store: slide content + model + grid geometry + dtype + layout version."""
    blob = json.dumps(
        {
            "slide": slide_fingerprint,
            "model": model,
            "grid": grid.to_dict(),
            "dtype": dtype,
            "store": STORE_VERSION,
        },
        sort_keys=True,
    ).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


# --------------------------------------------------------------------------- output locks
#: Never evict other stores next to a fixed-place store (its folder is an output, not a cache).
_NO_EVICTION = 2**62


def _acquire_output_lock(path: Path, timeout: float | None) -> Any:
    """An exclusive advisory lock on ``<path>.lock``; one line when another process holds it."""
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


@dataclass(frozen=True)
class VerifyReport:
    """What :meth:`PredictionStore.verify` found."""

    broken_chunks: list[str]  #: file paths of chunks that could not be decoded
    cells_reset: int  #: done cells marked not done (to be predicted again)
    cells_done: int  #: done cells before the check


# --------------------------------------------------------------------------- the store
def _as_cells(cells: np.ndarray) -> np.ndarray:
    arr = np.asarray(cells)
    if arr.size == 0:
        return np.empty((0, 2), np.int64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise StPredictError(f"cells of shape {arr.shape}: expected (n, 2) grid indices")
    return arr.astype(np.int64, copy=False)


class PredictionStore:
    """Predicted expression of one slide × model × grid, on disk.

    Do not construct directly: use :meth:`open`, :meth:`for_slide` or :meth:`from_path`.

    Attributes
    ----------
    path : pathlib.Path
        The store folder.
    key : str
        The cache key (folder name without ``.zarr``).
    genes : list of str
        Gene names, in ``values`` order.
    grid : TileGrid
        The geometry the cells refer to.
    dtype : str
        ``"float32"`` or ``"float16"``.
    values : zarr.Array
        ``(genes, gh, gw)``; NaN = not predicted.
    done : zarr.Array
        ``(gh, gw)`` bool; True once a cell's values are written.
    """

    def __init__(self, path: Path, group: zarr.Group, info: dict[str, Any]) -> None:
        self.path = Path(path)
        self.key = self.path.name.removesuffix(".zarr")
        self._group = group
        self.info = info
        self.genes: list[str] = list(info["genes"])
        self.grid = TileGrid.from_dict(info["grid"])
        self.dtype: str = info["dtype"]
        self.values: zarr.Array = group["values"]  # type: ignore[assignment]
        self.done: zarr.Array = group["done"]  # type: ignore[assignment]
        #: per-gene spread of the predictions (models with uncertainty), else ``None``
        self.spread: zarr.Array | None = group.get("spread", None)  # type: ignore[assignment]
        self._file_lock: Any = None
        self._gene_index = {g: i for i, g in enumerate(self.genes)}
        expected = (len(self.genes), *self.grid.shape)
        if tuple(self.values.shape) != expected or tuple(self.done.shape) != expected[1:]:
            raise StPredictError(
                f"{self.path}: store arrays {self.values.shape}/{self.done.shape} do not match "
                f"{len(self.genes)} genes on a {self.grid.shape} grid"
            )
        self._last_touch = 0.0

    # ----------------------------------------------------------------- opening
    @classmethod
    def open(
        cls,
        root: str | os.PathLike | None,
        *,
        key: str,
        genes: Sequence[str],
        grid: TileGrid,
        dtype: str = "float32",
        attrs: dict[str, Any] | None = None,
        max_bytes: int | None = None,
        spread: bool = False,
    ) -> PredictionStore:
        """Open the store ``<root>/<key>.zarr``, creating it (all NaN) when absent.

        Parameters
        ----------
        root
            Cache folder (created if needed); ``None`` = :func:`default_cache_dir`.
        key
            Store key, e.g. from :func:`store_key`.
        genes
            Gene names (the ``values`` axis 0).
        grid
            The tile grid (sets ``gh × gw``).
        dtype
            ``"float32"`` or ``"float16"`` (half the disk, about 3 significant digits).
        attrs
            Extra JSON-serialisable facts saved with a new store (slide path, model path).
        max_bytes
            Cache size bound applied after opening; ``None`` = :func:`cache_max_bytes`.
        spread
            Create the optional ``spread`` array (a model with uncertainty).

        Raises
        ------
        StPredictError
            Bad dtype, empty gene list, an unwritable cache folder, an existing store
            whose genes or grid differ, or something that is not our store at the path.
        """
        if dtype not in _DTYPES:
            raise StPredictError(f"dtype={dtype!r}: expected one of {', '.join(_DTYPES)}")
        genes = [str(g) for g in genes]
        if not genes:
            raise StPredictError("genes: the gene list is empty")
        if len(set(genes)) != len(genes):
            raise StPredictError("genes: the gene list has duplicates")
        if not key or any(c in key for c in "/\\") or key.startswith("."):
            raise StPredictError(f"key={key!r}: not a valid store name")
        root = Path(root) if root is not None else default_cache_dir()
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StPredictError(f"{root}: cannot create the prediction cache ({err})") from None
        if not os.access(root, os.W_OK):
            raise StPredictError(f"{root}: prediction cache folder is not writable")
        path = root / f"{key}.zarr"
        info = _read_info(path) if path.is_dir() else None
        if (path.exists() or path.is_symlink()) and info is None:
            # a torn store of ours: the cache is disposable, start afresh; anything else under
            # our name is someone's data: refused, never deleted
            remove_store(path)
        if not path.exists():
            cls._create(path, genes=genes, grid=grid, dtype=dtype, attrs=attrs or {}, spread=spread)
        store = cls.from_path(path)
        if store.genes != genes or store.grid != grid or store.dtype != dtype:
            raise StPredictError(
                f"{path}: existing prediction store has other genes/grid/dtype than requested"
            )
        store.touch(force=True)
        evict_cache(root, max_bytes=max_bytes, keep=[path])
        return store

    @classmethod
    def for_slide(
        cls,
        slide: Any,
        predictor: Any,
        grid: TileGrid,
        *,
        cache_dir: str | os.PathLike | None = None,
        dtype: str = "float32",
        max_bytes: int | None = None,
    ) -> PredictionStore:
        """The cached store of ``predictor`` on ``slide`` with ``grid`` (created when new).

        Parameters
        ----------
        slide
            A :class:`~napari_stpredict.slide.Slide` (keyed by ``slide.fingerprint()``).
        predictor
            A :class:`~napari_stpredict.model.Predictor` (keyed by :func:`model_key`).
        grid
            The tile grid (normally ``TileGrid.for_slide(slide, predictor, ...)``).
        cache_dir
            Cache folder; ``None`` = :func:`default_cache_dir`.
        dtype, max_bytes
            See :meth:`open`.
        """
        mkey = model_key(predictor)
        fp = slide.fingerprint()
        key = store_key(slide_fingerprint=fp, model=mkey, grid=grid, dtype=dtype)
        meta = getattr(predictor, "metadata", {}) or {}
        attrs = {
            "slide": {"path": str(getattr(slide, "path", "")), "fingerprint": fp},
            "model": {
                "key": mkey,
                "path": str(getattr(predictor, "path", "") or ""),
                "method": meta.get("method"),
            },
        }
        return cls._open_for(predictor, cache_dir, key, grid, dtype, attrs, max_bytes)

    @classmethod
    def _open_for(
        cls,
        predictor: Any,
        folder: str | os.PathLike | None,
        key: str,
        grid: TileGrid,
        dtype: str,
        attrs: dict[str, Any],
        max_bytes: int | None,
    ) -> PredictionStore:
        """:meth:`open` a store of ``predictor``'s genes (with a spread array when it has one)."""
        return cls.open(
            folder,
            key=key,
            genes=list(predictor.genes),
            grid=grid,
            dtype=dtype,
            attrs=attrs,
            max_bytes=max_bytes,
            spread=has_uncertainty(predictor),
        )

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> PredictionStore:
        """Open an existing store folder (e.g. from a heatmap layer's metadata).

        Raises
        ------
        StPredictError
            If the folder is missing or not a prediction store.
        """
        path = Path(path)
        info = _read_info(path) if path.is_dir() else None
        if info is None:
            raise StPredictError(f"{path}: not a prediction store (missing or removed)")
        if int(info.get("version", -1)) != STORE_VERSION:
            raise StPredictError(
                f"{path}: prediction store version {info.get('version')} not supported"
            )
        try:
            group = zarr.open_group(path, mode="r+")
            return cls(path, group, info)
        except StPredictError:
            raise
        except Exception as err:
            raise StPredictError(f"{path}: cannot open prediction store ({err})") from None

    @classmethod
    def open_at(
        cls,
        path: str | os.PathLike,
        *,
        slide: Any,
        predictor: Any,
        grid: TileGrid,
        attrs: dict[str, Any] | None = None,
        dtype: str = "float32",
        lock_timeout: float | None = None,
    ) -> PredictionStore:
        """The store at a fixed place (``OUT/<name>/predictions.zarr``), locked while open.

        Reused when it holds this slide + model + grid; replaced when it is one of our stores
        for something else (another model, stride or slide content); refused when anything
        else lies there (e.g. an OME-Zarr slide) — that is never deleted. An advisory lock
        (``<path>.lock``) is held until :meth:`close`, so a second process opening the same
        output waits ``lock_timeout`` seconds and then refuses in one line.

        Parameters
        ----------
        path
            The store folder.
        slide, predictor, grid
            What the store predicts (its identity: slide fingerprint + :func:`model_key` +
            grid).
        attrs
            Extra JSON facts saved with a new store.
        dtype
            See :meth:`open`.
        lock_timeout
            Seconds to wait for another process holding the output; ``None`` =
            ``$STPREDICT_LOCK_TIMEOUT`` or 0 (refuse at once).
        """
        path = Path(path)
        identity = store_key(
            slide_fingerprint=slide.fingerprint(),
            model=model_key(predictor),
            grid=grid,
            dtype=dtype,
        )
        lock = _acquire_output_lock(path, lock_timeout)
        try:
            if path.exists() or path.is_symlink():
                info = _read_info(path) if path.is_dir() and not path.is_symlink() else None
                same = (
                    info is not None
                    and is_our_store(path)
                    and info.get("identity") == identity
                    and int(info.get("version", -1)) == STORE_VERSION
                )
                if not same:
                    remove_store(path)  # refuses anything that is not ours
            meta = dict(attrs or {})
            meta.setdefault(
                "slide",
                {"path": str(getattr(slide, "path", "")), "fingerprint": slide.fingerprint()},
            )
            meta["identity"] = identity
            store = (
                cls._open_for(
                    predictor,
                    path.parent,
                    path.name.removesuffix(".zarr"),
                    grid,
                    dtype,
                    meta,
                    _NO_EVICTION,
                )
                if path.name.endswith(".zarr")
                else None
            )
            if store is None:
                raise StPredictError(f"{path}: a prediction store name must end in .zarr")
        except BaseException:
            lock.release()
            raise
        store._file_lock = lock
        return store

    def close(self) -> None:
        """Release the output lock of :meth:`open_at` (idempotent; the store stays readable)."""
        lock, self._file_lock = self._file_lock, None
        if lock is not None:
            with contextlib.suppress(Exception):
                lock.release()

    def __enter__(self) -> PredictionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- verification
    def _chunk_path(self, name: str, coords: tuple[int, ...]) -> Path:
        return self.path / name / "c" / Path(*(str(c) for c in coords))

    def verify(self, *, heal: bool = True) -> VerifyReport:
        """Check every chunk under predicted cells: decodable, and values where ``done``.

        A chunk that cannot be read (torn, truncated, bad compression) is reported with its
        file path; with ``heal`` it is removed and the cells it covers are marked not done, so
        the next run predicts them again. Done cells whose values are NaN are reset likewise.
        A broken ``done`` chunk is removed (its cells count as not done).

        Returns
        -------
        VerifyReport
        """
        broken: list[str] = []
        reset = np.zeros(self.grid.shape, bool)
        dh, dw = (int(c) for c in self.done.chunks)
        gh, gw = self.grid.shape
        done = np.zeros((gh, gw), bool)
        for bi in range(-(-gh // dh)):
            for bj in range(-(-gw // dw)):
                sl = (slice(bi * dh, (bi + 1) * dh), slice(bj * dw, (bj + 1) * dw))
                try:
                    done[sl] = np.asarray(self.done[sl], dtype=bool)
                except Exception:
                    broken.append(str(self._chunk_path("done", (bi, bj))))
                    if heal:
                        with contextlib.suppress(OSError):
                            self._chunk_path("done", (bi, bj)).unlink()
        if done.any():
            gc = int(self.values.chunks[0])
            bh, bw = self.block_shape
            for bi, bj in np.unique(np.argwhere(done) // [bh, bw], axis=0):
                r0, r1, c0, c1 = self.block_bounds(int(bi), int(bj))
                block_done = done[r0:r1, c0:c1]
                for name in ("values", "spread"):
                    arr = getattr(self, name)
                    if arr is None:
                        continue
                    for gi in range(-(-len(self.genes) // gc)):
                        try:
                            chunk = np.asarray(arr[gi * gc : (gi + 1) * gc, r0:r1, c0:c1])
                        except Exception:
                            broken.append(str(self._chunk_path(name, (gi, int(bi), int(bj)))))
                            reset[r0:r1, c0:c1] |= block_done
                            if heal:
                                with contextlib.suppress(OSError):
                                    self._chunk_path(name, (gi, int(bi), int(bj))).unlink()
                            continue
                        if name == "values":
                            reset[r0:r1, c0:c1] |= block_done & np.isnan(chunk).any(axis=0)
        n_reset = int(reset.sum())
        if heal and n_reset:
            with _write_lock(self.path):
                self.done[:, :] = done & ~reset
        return VerifyReport(broken_chunks=broken, cells_reset=n_reset, cells_done=int(done.sum()))

    @staticmethod
    def _create(
        path: Path,
        *,
        genes: list[str],
        grid: TileGrid,
        dtype: str,
        attrs: dict[str, Any],
        spread: bool = False,
    ) -> None:
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            group = zarr.open_group(tmp, mode="w")
            gh, gw = grid.shape
            for name in ("values", "spread") if spread else ("values",):
                group.create_array(
                    name,
                    shape=(len(genes), gh, gw),
                    chunks=(
                        min(len(genes), GENE_CHUNK),
                        min(gh, CELL_CHUNK),
                        min(gw, CELL_CHUNK),
                    ),
                    dtype=dtype,
                    fill_value=np.nan,
                    compressors=[ZstdCodec(level=1)],
                )
            group.create_array(
                "done",
                shape=(gh, gw),
                chunks=(min(gh, DONE_CHUNK), min(gw, DONE_CHUNK)),
                dtype="bool",
                fill_value=False,
                compressors=[ZstdCodec(level=1)],
            )
            info = {
                "owner": OWNER,
                "version": STORE_VERSION,
                "genes": genes,
                "grid": grid.to_dict(),
                "dtype": dtype,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                **{
                    k: v
                    for k, v in attrs.items()
                    if k not in ("owner", "version", "genes", "grid", "dtype")
                },
            }
            group.attrs[_ATTR] = info
            try:
                os.rename(tmp, path)
            except OSError:
                if not path.is_dir():  # not a lost race with another creator
                    raise
        except OSError as err:
            raise StPredictError(f"{path}: cannot create prediction store ({err})") from None
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    # ----------------------------------------------------------------- bookkeeping
    def touch(self, *, force: bool = False) -> None:
        """Mark the store as recently used (LRU eviction reads the folder's mtime)."""
        now = time.time()
        if force or now - self._last_touch > 10.0:
            with contextlib.suppress(OSError):
                os.utime(self.path)
            self._last_touch = now

    def gene_index(self, gene: str | int) -> int:
        """Index of a gene (name or index) in ``values``.

        Raises
        ------
        StPredictError
            If the gene is not in the model's panel.
        """
        if isinstance(gene, (int, np.integer)):
            if not 0 <= int(gene) < len(self.genes):
                raise StPredictError(f"gene index {gene}: out of range 0..{len(self.genes) - 1}")
            return int(gene)
        try:
            return self._gene_index[gene]
        except KeyError:
            raise StPredictError(f"gene {gene!r}: not predicted by this model") from None

    def _check_alive(self) -> None:
        if not (self.path / "zarr.json").exists():
            raise StPredictError(f"{self.path}: prediction store was removed (cache cleared?)")

    # ----------------------------------------------------------------- writing
    @property
    def block_shape(self) -> tuple[int, int]:
        """``(bh, bw)``: the cells of one ``values`` chunk (the unit of a whole-chunk write)."""
        chunks = self.values.chunks
        return (int(chunks[1]), int(chunks[2]))

    def block_of(self, cells: np.ndarray) -> np.ndarray:
        """``(n, 2)`` block index ``(bi, bj)`` of each cell (see :attr:`block_shape`)."""
        bh, bw = self.block_shape
        cells = _as_cells(cells)
        return np.stack([cells[:, 0] // bh, cells[:, 1] // bw], axis=1)

    def block_bounds(self, bi: int, bj: int) -> tuple[int, int, int, int]:
        """``(r0, r1, c0, c1)``: the cells of block ``(bi, bj)``, clipped to the grid."""
        bh, bw = self.block_shape
        gh, gw = self.grid.shape
        return (bi * bh, min((bi + 1) * bh, gh), bj * bw, min((bj + 1) * bw, gw))

    def write(
        self, cells: np.ndarray, values: np.ndarray, spread: np.ndarray | None = None
    ) -> None:
        """Store predictions of some cells and mark them done.

        The cells are grouped by block (:attr:`block_shape`) and every block is written once,
        all genes at a time (:meth:`write_block`).

        Parameters
        ----------
        cells
            ``(n, 2)`` int grid indices ``(i, j)``; must be unique.
        values
            ``(n, genes)`` predictions (cast to the store dtype).
        spread
            Optional ``(n, genes)`` spread (stored when the store has a ``spread`` array).
        """
        cells = _as_cells(cells)
        values = np.asarray(values)
        if len(cells) == 0:
            return
        if values.shape != (len(cells), len(self.genes)):
            raise StPredictError(
                f"values of shape {values.shape}: expected ({len(cells)}, {len(self.genes)})"
            )
        if spread is not None and np.shape(spread) != values.shape:
            raise StPredictError(f"spread of shape {np.shape(spread)}: expected {values.shape}")
        gh, gw = self.grid.shape
        if (cells < 0).any() or (cells[:, 0] >= gh).any() or (cells[:, 1] >= gw).any():
            raise StPredictError(f"cells outside the {gh}×{gw} grid")
        blocks = self.block_of(cells)
        keys = blocks[:, 0] * (gw + 1) + blocks[:, 1]
        order = np.argsort(keys, kind="stable")
        bounds = np.flatnonzero(np.diff(keys[order])) + 1
        for idx in np.split(order, bounds):
            bi, bj = (int(v) for v in blocks[idx[0]])
            r0, r1, c0, c1 = self.block_bounds(bi, bj)
            slab = np.full((len(self.genes), r1 - r0, c1 - c0), np.nan, self.dtype)
            mask = np.zeros((r1 - r0, c1 - c0), bool)
            ii, jj = cells[idx, 0] - r0, cells[idx, 1] - c0
            slab[:, ii, jj] = values[idx].T
            mask[ii, jj] = True
            sp = None
            if spread is not None and self.spread is not None:
                sp = np.full_like(slab, np.nan)
                sp[:, ii, jj] = np.asarray(spread)[idx].T
            self.write_block(bi, bj, slab, mask, sp)

    def write_block(
        self,
        bi: int,
        bj: int,
        values: np.ndarray,
        mask: np.ndarray,
        spread: np.ndarray | None = None,
    ) -> None:
        """Write the cells ``mask`` of block ``(bi, bj)`` in one go and mark them done.

        ``values`` (and ``spread``) are ``(genes, h, w)`` slabs over the block's cells
        (:meth:`block_bounds`); cells outside ``mask`` keep what the store has (read once, only
        when the block already has predicted cells). Each chunk of the block is written once.
        """
        r0, r1, c0, c1 = self.block_bounds(bi, bj)
        mask = np.asarray(mask, dtype=bool)
        if not mask.any():
            return
        self._check_alive()
        with _write_lock(self.path):
            done = np.asarray(self.done[r0:r1, c0:c1], dtype=bool)
            keep = done & ~mask
            for arr, slab in ((self.values, values), (self.spread, spread)):
                if arr is None or slab is None:
                    continue
                slab = np.asarray(slab, dtype=self.dtype)
                if keep.any():  # cells predicted before, outside this write: keep them
                    old = np.asarray(arr[:, r0:r1, c0:c1])
                    slab = np.where(keep[None], old, slab)
                arr[:, r0:r1, c0:c1] = slab
            self.done[r0:r1, c0:c1] = done | mask
        self.touch()

    # ----------------------------------------------------------------- reading
    def read(
        self, gene: str | int, *, rows: slice | None = None, cols: slice | None = None
    ) -> np.ndarray:
        """One gene over a block of cells: ``(h, w)`` float32, NaN where not predicted.

        Parameters
        ----------
        gene
            Gene name or index.
        rows, cols
            Cell slices (default: the whole grid). Only the chunks under the block are read.
        """
        g = self.gene_index(gene)
        out = self.values[g, rows or slice(None), cols or slice(None)]
        return np.asarray(out, dtype=np.float32)

    def read_cells(self, cells: np.ndarray, genes: Sequence[str | int] | None = None) -> np.ndarray:
        """Values of some cells: ``(n, len(genes))`` float32 (all genes by default)."""
        cells = _as_cells(cells)
        idx = (
            np.arange(len(self.genes))
            if genes is None
            else np.array([self.gene_index(g) for g in genes], dtype=np.int64)
        )
        if len(cells) == 0:
            return np.empty((0, len(idx)), np.float32)
        out = self.values.vindex[idx[:, None], cells[None, :, 0], cells[None, :, 1]]
        return np.asarray(out, dtype=np.float32).T

    def done_mask(self, *, rows: slice | None = None, cols: slice | None = None) -> np.ndarray:
        """Which cells are predicted: bool ``(h, w)`` over a block (default: the whole grid)."""
        return np.asarray(self.done[rows or slice(None), cols or slice(None)], dtype=bool)

    def is_done(self, cells: np.ndarray) -> np.ndarray:
        """``(n,)`` bool: whether each cell is predicted."""
        cells = _as_cells(cells)
        if len(cells) == 0:
            return np.zeros(0, bool)
        i0, j0 = cells.min(axis=0)
        i1, j1 = cells.max(axis=0) + 1
        block = self.done_mask(rows=slice(int(i0), int(i1)), cols=slice(int(j0), int(j1)))
        return block[cells[:, 0] - i0, cells[:, 1] - j0]

    @property
    def n_done(self) -> int:
        """Number of predicted cells."""
        return int(self.done_mask().sum())

    def __repr__(self) -> str:
        return (
            f"PredictionStore({str(self.path)!r}, genes={len(self.genes)}, "
            f"grid={self.grid.shape}, done={self.n_done})"
        )


# --------------------------------------------------------------------------- buffered writes
class WriteBuffer:
    """Collects predicted batches and writes whole blocks (all genes) to a store.

    Used by the engine's writer thread. A block (:attr:`PredictionStore.block_shape` cells,
    one ``values`` chunk per gene group) is written once when every cell of it that the run
    asked for is predicted; blocks still open are written when the buffer holds more than
    ``max_bytes``, when a block has waited ``max_age_s`` (so a viewer sees progress), and at
    :meth:`flush`. Every chunk is thus written about once per run instead of once per batch.

    Parameters
    ----------
    store
        The store.
    expected
        ``(n, 2)`` cells the run will write (completion counts per block); ``None`` = flush
        only by size, age and :meth:`flush`.
    max_bytes
        Bound of the buffered slabs.
    max_age_s
        Oldest a buffered block gets before it is written.
    """

    def __init__(
        self,
        store: PredictionStore,
        expected: np.ndarray | None = None,
        *,
        max_bytes: int = 256 * 2**20,
        max_age_s: float = 10.0,
    ) -> None:
        self.store = store
        self.max_bytes = int(max_bytes)
        self.max_age_s = float(max_age_s)
        self._want: dict[tuple[int, int], int] = {}
        if expected is not None and len(expected):
            blocks, counts = np.unique(store.block_of(expected), axis=0, return_counts=True)
            self._want = {
                (int(b[0]), int(b[1])): int(c) for b, c in zip(blocks, counts, strict=True)
            }
        self._open: dict[tuple[int, int], list[Any]] = {}
        self._bytes = 0
        self.blocks_written = 0
        self.peak_bytes = 0

    @property
    def nbytes(self) -> int:
        """Bytes buffered now."""
        return self._bytes

    def add(self, cells: np.ndarray, values: np.ndarray, spread: np.ndarray | None = None) -> None:
        """Buffer predictions (``(n, 2)`` cells, ``(n, genes)`` values); write full blocks."""
        store = self.store
        cells = _as_cells(cells)
        if len(cells) == 0:
            return
        values = np.asarray(values)
        if values.shape != (len(cells), len(store.genes)):
            raise StPredictError(
                f"values of shape {values.shape}: expected ({len(cells)}, {len(store.genes)})"
            )
        gh, gw = store.grid.shape
        if (cells < 0).any() or (cells[:, 0] >= gh).any() or (cells[:, 1] >= gw).any():
            raise StPredictError(f"cells outside the {gh}×{gw} grid")
        store._check_alive()  # a cleared cache fails the run now, not at the last flush
        with_spread = spread is not None and store.spread is not None
        blocks = store.block_of(cells)
        keys = blocks[:, 0] * (gw + 1) + blocks[:, 1]
        order = np.argsort(keys, kind="stable")
        cuts = np.flatnonzero(np.diff(keys[order])) + 1
        now = time.monotonic()
        for idx in np.split(order, cuts):
            key = (int(blocks[idx[0], 0]), int(blocks[idx[0], 1]))
            entry = self._open.get(key)
            r0, r1, c0, c1 = store.block_bounds(*key)
            if entry is None:
                shape = (len(store.genes), r1 - r0, c1 - c0)
                slab = np.full(shape, np.nan, store.dtype)
                sp = np.full(shape, np.nan, store.dtype) if store.spread is not None else None
                entry = [slab, sp, np.zeros(shape[1:], bool), 0, now]
                self._open[key] = entry
                self._bytes += slab.nbytes * (2 if sp is not None else 1)
                self.peak_bytes = max(self.peak_bytes, self._bytes)
            ii, jj = cells[idx, 0] - r0, cells[idx, 1] - c0
            entry[0][:, ii, jj] = values[idx].T
            if with_spread and entry[1] is not None:
                entry[1][:, ii, jj] = np.asarray(spread)[idx].T
            entry[2][ii, jj] = True
            entry[3] += len(idx)
            if entry[3] >= self._want.get(key, 1 << 62):
                self._write(key)
        while self._bytes > self.max_bytes and self._open:
            self._write(next(iter(self._open)))  # the oldest open block
        self.flush_aged()

    def flush_aged(self) -> None:
        """Write the blocks that waited longer than ``max_age_s``."""
        now = time.monotonic()
        for key in [k for k, e in self._open.items() if now - e[4] > self.max_age_s]:
            self._write(key)

    def _write(self, key: tuple[int, int]) -> None:
        slab, sp, mask, count, _ = self._open.pop(key)
        self._bytes -= slab.nbytes * (2 if sp is not None else 1)
        if key in self._want:  # a block written early completes on its remaining cells
            self._want[key] -= count
        self.store.write_block(key[0], key[1], slab, mask, sp)
        self.blocks_written += 1

    def flush(self) -> None:
        """Write every buffered block."""
        for key in list(self._open):
            self._write(key)
