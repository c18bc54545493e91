"""Cached predictions: :class:`PredictionStore` and the prediction cache folder.

A store is a zarr (v3) group in the cache folder, named by a key derived from the slide's
content fingerprint, the model (weights + metadata + inference settings) and the grid
geometry, so the same slide with the same model is predicted once: revisiting a region,
re-opening the slide or running ``stpredict predict`` after exploring it in napari costs no
model call.

This module opens stores; the parts live in modules of their own, and every name is
importable from here:

- :mod:`~napari_stpredict.inference.store_layout` — the layout of ``<key>.zarr`` (``values``,
  optional ``spread``, ``done``, chunking), creating it, the ownership marker
  (:func:`is_our_store`, :func:`remove_store`);
- :mod:`~napari_stpredict.inference.store_keys` — :func:`model_key`, :func:`store_key`;
- :mod:`~napari_stpredict.inference.store_cache` — the cache folder, its size bound and LRU
  eviction (:func:`default_cache_dir`, :func:`list_cache`, :func:`evict_cache`,
  :func:`clear_cache`);
- :mod:`~napari_stpredict.inference.store_arrays` — reading and writing an open store
  (:class:`PredictionStore` is a :class:`~.store_arrays.StoreArrays`);
- :mod:`~napari_stpredict.inference.store_verify` — :meth:`PredictionStore.verify`: a chunk
  that cannot be decoded is reported by path, removed, and its cells are marked not done so
  the engine predicts them again (:class:`VerifyReport`);
- :mod:`~napari_stpredict.inference.store_write_buffer` — the engine's :class:`WriteBuffer`;
- :mod:`~napari_stpredict.inference.store_locks` — the per-store write lock and the output
  lock of :meth:`PredictionStore.open_at`.

Stores at a fixed place (``OUT/<name>/predictions.zarr`` of ``stpredict predict``) are opened
with :meth:`PredictionStore.open_at`, which holds an advisory lock
(``predictions.zarr.lock``, :mod:`filelock`) for as long as the store is open, so a second
process waits or refuses in one line. A reused store is checked with
:meth:`PredictionStore.verify`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import zarr

from napari_stpredict.errors import StPredictError
from napari_stpredict.inference.grid import TileGrid
from napari_stpredict.inference.protocol import has_uncertainty
from napari_stpredict.inference.store_arrays import StoreArrays
from napari_stpredict.inference.store_cache import (
    DEFAULT_MAX_BYTES,
    CacheEntry,
    cache_max_bytes,
    clear_cache,
    default_cache_dir,
    evict_cache,
    list_cache,
)
from napari_stpredict.inference.store_keys import model_key, store_key
from napari_stpredict.inference.store_layout import (
    CELL_CHUNK,
    GENE_CHUNK,
    STORE_DTYPES,
    STORE_VERSION,
    create_store,
    is_our_store,
    read_store_info,
    remove_store,
)
from napari_stpredict.inference.store_layout import DONE_CHUNK as DONE_CHUNK  # re-exported
from napari_stpredict.inference.store_layout import OWNER as OWNER  # re-exported
from napari_stpredict.inference.store_locks import acquire_output_lock
from napari_stpredict.inference.store_verify import VerifyReport
from napari_stpredict.inference.store_write_buffer import WriteBuffer

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

# GENE_CHUNK and CELL_CHUNK are read here at each store creation: the one knob of the chunk
# layout (benchmarks/bench_engine.py sets them on this module to compare layouts).

#: Never evict other stores next to a fixed-place store (its folder is an output, not a cache).
_NO_EVICTION = 2**62


class PredictionStore(StoreArrays):
    """Predicted expression of one slide × model × grid, on disk.

    Do not construct directly: use :meth:`open`, :meth:`for_slide`, :meth:`open_at` or
    :meth:`from_path`. Reading and writing: see :class:`~.store_arrays.StoreArrays`
    (``values``, ``spread``, ``done``, :meth:`write`, :meth:`read`, :meth:`verify`, ...).
    """

    def __init__(self, path: Path, group: zarr.Group, info: dict[str, Any]) -> None:
        super().__init__(path, group, info)
        self._file_lock: Any = None  # the output lock of open_at, released by close()

    # ----------------------------------------------------------------- opening
    @classmethod
    def open(
        cls,
        root: str | os.PathLike | None,
        *,
        key: str,
        genes: Sequence[str],
        grid: TileGrid,
        spread: bool = False,
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
        spread
            Create the optional ``spread`` array (a model with uncertainty).
        dtype
            ``"float32"`` or ``"float16"`` (half the disk, about 3 significant digits).
        attrs
            Extra JSON-serialisable facts saved with a new store (slide path, model path).
        max_bytes
            Cache size bound applied after opening; ``None`` = :func:`cache_max_bytes`.

        Raises
        ------
        StPredictError
            Bad dtype, empty gene list, an unwritable cache folder, an existing store
            whose genes or grid differ, or something that is not our store at the path.
        """
        genes = _checked_request(key=key, genes=genes, dtype=dtype)
        root = _writable_folder(root)
        path = root / f"{key}.zarr"
        info = read_store_info(path) if path.is_dir() else None
        if (path.exists() or path.is_symlink()) and info is None:
            # a torn store of ours: the cache is disposable, start afresh; anything else under
            # our name is someone's data: refused, never deleted
            remove_store(path)
        if not path.exists():
            create_store(
                path,
                genes=genes,
                grid=grid,
                dtype=dtype,
                attrs=attrs or {},
                spread=spread,
                gene_chunk=GENE_CHUNK,
                cell_chunk=CELL_CHUNK,
            )
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
            "slide": _slide_facts(slide, fp),
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
        info = read_store_info(path) if path.is_dir() else None
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
        fp = slide.fingerprint()
        identity = store_key(
            slide_fingerprint=fp, model=model_key(predictor), grid=grid, dtype=dtype
        )
        lock = acquire_output_lock(path, lock_timeout)
        try:
            _remove_unless_identity(path, identity)
            if not path.name.endswith(".zarr"):
                raise StPredictError(f"{path}: a prediction store name must end in .zarr")
            meta = dict(attrs or {})
            meta.setdefault("slide", _slide_facts(slide, fp))
            meta["identity"] = identity
            key = path.name.removesuffix(".zarr")
            store = cls._open_for(predictor, path.parent, key, grid, dtype, meta, _NO_EVICTION)
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


def _checked_request(*, key: str, genes: Sequence[str], dtype: str) -> list[str]:
    """The gene names of a store to open, after checking the key, genes and dtype."""
    if dtype not in STORE_DTYPES:
        raise StPredictError(f"dtype={dtype!r}: expected one of {', '.join(STORE_DTYPES)}")
    names = [str(g) for g in genes]
    if not names:
        raise StPredictError("genes: the gene list is empty")
    if len(set(names)) != len(names):
        raise StPredictError("genes: the gene list has duplicates")
    if not key or any(c in key for c in "/\\") or key.startswith("."):
        raise StPredictError(f"key={key!r}: not a valid store name")
    return names


def _writable_folder(root: str | os.PathLike | None) -> Path:
    """The folder of cached stores (``None`` = :func:`default_cache_dir`), made, writable."""
    folder = Path(root) if root is not None else default_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StPredictError(f"{folder}: cannot create the prediction cache ({err})") from None
    if not os.access(folder, os.W_OK):
        raise StPredictError(f"{folder}: prediction cache folder is not writable")
    return folder


def _slide_facts(slide: Any, fingerprint: str) -> dict[str, str]:
    """What a store records of its slide: the path it was read from and its fingerprint."""
    return {"path": str(getattr(slide, "path", "")), "fingerprint": fingerprint}


def _remove_unless_identity(path: Path, identity: str) -> None:
    """Clear a fixed-place store's folder unless it holds the store of ``identity``.

    Raises
    ------
    StPredictError
        When something that is not our store lies at ``path`` (left untouched).
    """
    if not (path.exists() or path.is_symlink()):
        return
    info = read_store_info(path) if path.is_dir() and not path.is_symlink() else None
    same = (
        info is not None
        and is_our_store(path)
        and info.get("identity") == identity
        and int(info.get("version", -1)) == STORE_VERSION
    )
    if not same:
        remove_store(path)  # refuses anything that is not ours
