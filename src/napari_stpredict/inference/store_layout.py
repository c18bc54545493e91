"""On-disk layout of a prediction store and its ownership marker.

Layout of ``<folder>/<key>.zarr`` (a zarr v3 group)::

    values   (genes, gh, gw) float32|float16, NaN = not predicted,
             chunks (≤32 genes, 32, 32): one gene's map reads 1/32 of the store, and the
             engine writes whole 32 × 32 cell blocks at once (all genes, every chunk written
             once, see :class:`~napari_stpredict.inference.store.WriteBuffer`; measured in
             docs/benchmarks.md)
    spread   (optional, same shape and chunks) per-gene spread of the prediction, for
             models with uncertainty (``predictor.has_uncertainty``)
    done     (gh, gw) bool, chunks 128 × 128, set after the values of a cell are written
             (a block write rewrites one small chunk, never the whole mask)
    attrs    {"stpredict_store": {"owner": "napari-stpredict", "version", "genes", "grid",
             "dtype", "slide", "model", ...}} — the ownership marker: only folders carrying
             it are ever deleted or replaced (:func:`is_our_store`)

:func:`create_store` writes a new store aside and renames it into place, so a store folder
is either complete (with its marker) or absent; :func:`read_store_info` reads the marker back.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from napari_stpredict.errors import StPredictError
from napari_stpredict.inference.grid import TileGrid

__all__ = [
    "CELL_CHUNK",
    "DONE_CHUNK",
    "GENE_CHUNK",
    "OWNER",
    "STORE_ATTR",
    "STORE_DTYPES",
    "STORE_VERSION",
    "create_store",
    "is_our_store",
    "read_store_info",
    "remove_store",
]

#: Format version of a store; part of the key so an incompatible layout is never reused.
STORE_VERSION = 1
#: The ownership marker in a store's attributes.
OWNER = "napari-stpredict"
#: Chunk sizes of ``values``: genes per chunk and cells per chunk side.
GENE_CHUNK = 32
CELL_CHUNK = 32
#: Chunk side of the ``done`` mask.
DONE_CHUNK = 128
#: The group attribute holding a store's facts (the ownership marker).
STORE_ATTR = "stpredict_store"
#: The value dtypes a store may have.
STORE_DTYPES = ("float32", "float16")
#: Keys of the marker that :func:`create_store` sets itself (never taken from ``attrs``).
_OWN_KEYS = ("owner", "version", "genes", "grid", "dtype")
_SUBARRAYS = {"values", "done", "spread"}


def read_store_info(path: Path) -> dict[str, Any] | None:
    """The ``stpredict_store`` attributes of a store folder; ``None`` when absent or garbled."""
    try:
        doc = json.loads((path / "zarr.json").read_text())
        info = doc.get("attributes", {}).get(STORE_ATTR)
    except (OSError, ValueError, AttributeError):
        return None
    return info if isinstance(info, dict) else None


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
    ownership marker written at creation), and for a torn store of ours (group metadata gone
    or garbled, only our arrays left). An OME-Zarr slide, any other zarr or folder, or a
    file, is never ours.
    """
    p = Path(path)
    if p.is_symlink() or not p.is_dir():
        return False
    info = read_store_info(p)
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


def create_store(
    path: Path,
    *,
    genes: list[str],
    grid: TileGrid,
    dtype: str,
    attrs: dict[str, Any],
    spread: bool = False,
    gene_chunk: int = GENE_CHUNK,
    cell_chunk: int = CELL_CHUNK,
) -> None:
    """Create an all-NaN, nothing-done store at ``path``, atomically.

    The group is written to a hidden ``.<name>.tmp-<random>`` sibling and renamed into place;
    losing the rename to another process that created the same store is not an error.

    Parameters
    ----------
    path
        The store folder (``<key>.zarr``); must not exist.
    genes, grid, dtype
        The ``values`` axes (genes × ``grid.shape``) and dtype.
    attrs
        Extra JSON facts for the marker (cannot override the keys the layout sets).
    spread
        Also create the ``spread`` array.
    gene_chunk, cell_chunk
        Chunk sizes of ``values`` / ``spread`` (benchmarks try other layouts).

    Raises
    ------
    StPredictError
        When the folder cannot be written.
    """
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        group = zarr.open_group(tmp, mode="w")
        _create_arrays(group, len(genes), grid.shape, dtype, spread, gene_chunk, cell_chunk)
        group.attrs[STORE_ATTR] = {
            "owner": OWNER,
            "version": STORE_VERSION,
            "genes": genes,
            "grid": grid.to_dict(),
            "dtype": dtype,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **{k: v for k, v in attrs.items() if k not in _OWN_KEYS},
        }
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


def _create_arrays(
    group: zarr.Group,
    n_genes: int,
    shape: tuple[int, int],
    dtype: str,
    spread: bool,
    gene_chunk: int,
    cell_chunk: int,
) -> None:
    """The ``values`` (+ ``spread``) and ``done`` arrays of a new store, empty (fill values)."""
    gh, gw = shape
    for name in ("values", "spread") if spread else ("values",):
        group.create_array(
            name,
            shape=(n_genes, gh, gw),
            chunks=(min(n_genes, gene_chunk), min(gh, cell_chunk), min(gw, cell_chunk)),
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
