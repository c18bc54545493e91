"""Cached predictions: :class:`PredictionStore` and the prediction cache folder.

A store is a zarr (v3) group in the cache folder, named by a key derived from the slide's
content fingerprint, the model (weights + metadata) and the grid geometry, so the same slide
with the same model is predicted once: revisiting a region, re-opening the slide or running
``stpredict predict`` after exploring it in napari costs no model call.

Layout of ``<cache>/<key>.zarr``::

    values   (genes, gh, gw) float32|float16, NaN = not predicted,
             chunks (≤32 genes, 32, 32): a batch write touches few chunks and one gene's
             region reads only that gene block
    done     (gh, gw) bool, set after the values of a cell are written
    attrs    {"stpredict_store": {"version", "genes", "grid", "dtype", "slide", "model", ...}}

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

__all__ = [
    "DEFAULT_MAX_BYTES",
    "STORE_VERSION",
    "CacheEntry",
    "PredictionStore",
    "cache_max_bytes",
    "clear_cache",
    "default_cache_dir",
    "evict_cache",
    "list_cache",
    "model_key",
    "store_key",
]

#: Format version of a store; part of the key so an incompatible layout is never reused.
STORE_VERSION = 1
#: Default bound of the cache folder (overridden by ``STPREDICT_CACHE_MAX_GB``).
DEFAULT_MAX_BYTES = 4 * 2**30
#: Chunk sizes of ``values``: genes per chunk and cells per chunk side.
GENE_CHUNK = 32
CELL_CHUNK = 32
#: Single chunk side of the ``done`` mask.
DONE_CHUNK = 512
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


def _is_torn_store(path: Path) -> bool:
    """A store folder whose metadata is gone (removed while a writer was busy): ours, unusable."""
    try:
        names = set(os.listdir(path))
        if not names or not names <= {".lock", "values", "done"}:
            return False
        return all(set(os.listdir(path / sub)) <= {"c", "zarr.json"} for sub in names - {".lock"})
    except OSError:
        return False


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
        info = _read_info(p) if p.is_dir() else None
        if info is None and p.is_dir() and _is_torn_store(p):
            info = {}
        if info is None:
            continue  # not ours: never touched
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
        path = getattr(predictor, "model_path", None) or getattr(predictor, "path", None)
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

        Raises
        ------
        StPredictError
            Bad dtype, empty gene list, an unwritable cache folder, or an existing store
            whose genes or grid differ.
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
        if path.exists() and info is None:
            # a torn or foreign folder under our key: the cache is disposable, start afresh
            shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            cls._create(path, genes=genes, grid=grid, dtype=dtype, attrs=attrs or {})
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
                "path": str(
                    getattr(predictor, "model_path", None) or getattr(predictor, "path", "") or ""
                ),
                "method": meta.get("method"),
            },
        }
        return cls.open(
            cache_dir,
            key=key,
            genes=list(predictor.genes),
            grid=grid,
            dtype=dtype,
            attrs=attrs,
            max_bytes=max_bytes,
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

    @staticmethod
    def _create(
        path: Path, *, genes: list[str], grid: TileGrid, dtype: str, attrs: dict[str, Any]
    ) -> None:
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            group = zarr.open_group(tmp, mode="w")
            gh, gw = grid.shape
            group.create_array(
                "values",
                shape=(len(genes), gh, gw),
                chunks=(min(len(genes), GENE_CHUNK), min(gh, CELL_CHUNK), min(gw, CELL_CHUNK)),
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
                "version": STORE_VERSION,
                "genes": genes,
                "grid": grid.to_dict(),
                "dtype": dtype,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                **{
                    k: v for k, v in attrs.items() if k not in ("version", "genes", "grid", "dtype")
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
    def write(self, cells: np.ndarray, values: np.ndarray) -> None:
        """Store predictions of some cells and mark them done.

        Parameters
        ----------
        cells
            ``(n, 2)`` int grid indices ``(i, j)``; must be unique.
        values
            ``(n, genes)`` predictions (cast to the store dtype).
        """
        cells = _as_cells(cells)
        values = np.asarray(values)
        if len(cells) == 0:
            return
        if values.shape != (len(cells), len(self.genes)):
            raise StPredictError(
                f"values of shape {values.shape}: expected ({len(cells)}, {len(self.genes)})"
            )
        gh, gw = self.grid.shape
        if (cells < 0).any() or (cells[:, 0] >= gh).any() or (cells[:, 1] >= gw).any():
            raise StPredictError(f"cells outside the {gh}×{gw} grid")
        self._check_alive()
        ii, jj = cells[:, 0], cells[:, 1]
        g = np.arange(len(self.genes))[:, None]
        vals = values.astype(self.dtype, copy=False).T
        with _write_lock(self.path):
            self.values.vindex[g, ii[None, :], jj[None, :]] = vals
            self.done.vindex[ii, jj] = True
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
