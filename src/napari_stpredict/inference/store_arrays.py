"""An open prediction store's arrays and how they are read and written: :class:`StoreArrays`.

:class:`~napari_stpredict.inference.store.PredictionStore` is a :class:`StoreArrays` that
also knows where stores live and how they are opened; everything here works on a store that
is already open.

Every chunk file is replaced atomically (written aside, then renamed), so a reader in another
thread or process sees either the old or the new chunk, never a torn one; because ``done`` is
written after ``values``, a cell marked done always has its values. Writers are serialised by
:func:`~napari_stpredict.inference.store_locks.store_write_lock`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from napari_stpredict.errors import StPredictError
from napari_stpredict.inference.grid import TileGrid
from napari_stpredict.inference.store_chunks import DirectChunks
from napari_stpredict.inference.store_locks import store_write_lock
from napari_stpredict.inference.store_verify import VerifyReport, verify_store

__all__ = ["StoreArrays", "as_cells"]

#: Least seconds between two refreshes of a store folder's mtime by writes (LRU clock).
_TOUCH_EVERY_S = 10.0


def as_cells(cells: np.ndarray) -> np.ndarray:
    """``cells`` as an ``(n, 2)`` int64 array of grid indices (an empty one for no cells).

    Raises
    ------
    StPredictError
        When the shape is not ``(n, 2)``.
    """
    arr = np.asarray(cells)
    if arr.size == 0:
        return np.empty((0, 2), np.int64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise StPredictError(f"cells of shape {arr.shape}: expected (n, 2) grid indices")
    return arr.astype(np.int64, copy=False)


class StoreArrays:
    """The ``values`` / ``spread`` / ``done`` arrays of one open store.

    Attributes
    ----------
    path : pathlib.Path
        The store folder.
    key : str
        The cache key (folder name without ``.zarr``).
    info : dict
        The store's ``stpredict_store`` attributes.
    genes : list of str
        Gene names, in ``values`` order.
    grid : TileGrid
        The geometry the cells refer to.
    dtype : str
        ``"float32"`` or ``"float16"``.
    values : zarr.Array
        ``(genes, gh, gw)``; NaN = not predicted.
    spread : zarr.Array or None
        Per-gene spread of the predictions (models with uncertainty), else ``None``.
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
        self.spread: zarr.Array | None = group.get("spread", None)  # type: ignore[assignment]
        self._gene_index = {g: i for i, g in enumerate(self.genes)}
        expected = (len(self.genes), *self.grid.shape)
        if tuple(self.values.shape) != expected or tuple(self.done.shape) != expected[1:]:
            raise StPredictError(
                f"{self.path}: store arrays {self.values.shape}/{self.done.shape} do not match "
                f"{len(self.genes)} genes on a {self.grid.shape} grid"
            )
        self._last_touch = 0.0
        #: per array, the writer of whole chunk files that bypasses zarr's pipeline (None:
        #: that array's layout goes through zarr); empty = every write through zarr
        self.chunk_files: dict[str, DirectChunks | None] = {
            name: DirectChunks.for_array(arr, self.path / name)
            for name, arr in (("values", self.values), ("spread", self.spread), ("done", self.done))
            if arr is not None
        }

    # ----------------------------------------------------------------- bookkeeping
    def touch(self, *, force: bool = False) -> None:
        """Mark the store as recently used (LRU eviction reads the folder's mtime)."""
        now = time.time()
        if force or now - self._last_touch > _TOUCH_EVERY_S:
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

    def check_alive(self) -> None:
        """Raise :class:`StPredictError` when the store folder was removed (cache cleared)."""
        if not (self.path / "zarr.json").exists():
            raise StPredictError(f"{self.path}: prediction store was removed (cache cleared?)")

    def chunk_path(self, name: str, coords: tuple[int, ...]) -> Path:
        """The file of chunk ``coords`` of array ``name`` (``values``, ``spread``, ``done``)."""
        return self.path / name / "c" / Path(*(str(c) for c in coords))

    def verify(self, *, heal: bool = True) -> VerifyReport:
        """Check (and with ``heal`` repair) every chunk under predicted cells.

        See :func:`~napari_stpredict.inference.store_verify.verify_store`.

        Returns
        -------
        VerifyReport
        """
        return verify_store(self, heal=heal)

    # ----------------------------------------------------------------- blocks
    @property
    def block_shape(self) -> tuple[int, int]:
        """``(bh, bw)``: the cells of one ``values`` chunk (the unit of a whole-chunk write)."""
        chunks = self.values.chunks
        return (int(chunks[1]), int(chunks[2]))

    def block_of(self, cells: np.ndarray) -> np.ndarray:
        """``(n, 2)`` block index ``(bi, bj)`` of each cell (see :attr:`block_shape`)."""
        bh, bw = self.block_shape
        cells = as_cells(cells)
        return np.stack([cells[:, 0] // bh, cells[:, 1] // bw], axis=1)

    def block_bounds(self, bi: int, bj: int) -> tuple[int, int, int, int]:
        """``(r0, r1, c0, c1)``: the cells of block ``(bi, bj)``, clipped to the grid."""
        bh, bw = self.block_shape
        gh, gw = self.grid.shape
        return (bi * bh, min((bi + 1) * bh, gh), bj * bw, min((bj + 1) * bw, gw))

    def cells_by_block(self, cells: np.ndarray) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
        """``((bi, bj), idx)`` for each block holding some of ``cells`` (``(n, 2)`` int64).

        ``idx`` are the positions in ``cells`` of that block's cells, in their given order.
        """
        if len(cells) == 0:
            return
        blocks = self.block_of(cells)
        keys = blocks[:, 0] * (self.grid.shape[1] + 1) + blocks[:, 1]
        order = np.argsort(keys, kind="stable")
        cuts = np.flatnonzero(np.diff(keys[order])) + 1
        for idx in np.split(order, cuts):
            yield (int(blocks[idx[0], 0]), int(blocks[idx[0], 1])), idx

    def checked_batch(
        self, cells: np.ndarray, values: np.ndarray, spread: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(cells, values)`` of a batch to write, as arrays, after checking their shapes.

        Raises
        ------
        StPredictError
            ``values`` (or ``spread``) not ``(n, genes)``, or cells outside the grid.
        """
        cells = as_cells(cells)
        values = np.asarray(values)
        if len(cells) == 0:
            return cells, values
        if values.shape != (len(cells), len(self.genes)):
            raise StPredictError(
                f"values of shape {values.shape}: expected ({len(cells)}, {len(self.genes)})"
            )
        if spread is not None and np.shape(spread) != values.shape:
            raise StPredictError(f"spread of shape {np.shape(spread)}: expected {values.shape}")
        gh, gw = self.grid.shape
        if (cells < 0).any() or (cells[:, 0] >= gh).any() or (cells[:, 1] >= gw).any():
            raise StPredictError(f"cells outside the {gh}×{gw} grid")
        return cells, values

    # ----------------------------------------------------------------- writing
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
        cells, values = self.checked_batch(cells, values, spread)
        for (bi, bj), idx in self.cells_by_block(cells):
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
        self.check_alive()
        with store_write_lock(self.path):
            done, done_chunk = self._read_done(r0, r1, c0, c1)
            keep = done & ~mask
            for name, slab in (("values", values), ("spread", spread)):
                arr = self.values if name == "values" else self.spread
                if arr is None or slab is None:
                    continue
                slab = np.asarray(slab, dtype=self.dtype)
                if keep.any():  # cells predicted before, outside this write: keep them
                    old = np.asarray(arr[:, r0:r1, c0:c1])
                    slab = np.where(keep[None], old, slab)
                self._write_slab(name, arr, bi, bj, slab)
            self._write_done(r0, c0, done | mask, done_chunk)
        self.touch()

    def _write_slab(self, name: str, arr: zarr.Array, bi: int, bj: int, slab: np.ndarray) -> None:
        """Write the ``(genes, h, w)`` slab of block ``(bi, bj)``: one chunk per gene group."""
        direct = self.chunk_files.get(name)
        if direct is None:
            r0, r1, c0, c1 = self.block_bounds(bi, bj)
            arr[:, r0:r1, c0:c1] = slab
            return
        step = direct.chunk_shape[0]
        for gi, g0 in enumerate(range(0, slab.shape[0], step)):
            direct.write((gi, bi, bj), slab[g0 : g0 + step])

    def _done_chunk(self, r0: int, c0: int) -> tuple[tuple[int, int], int, int]:
        """The ``done`` chunk holding cell ``(r0, c0)`` and the cell's offset in it."""
        ch, cw = self.done.chunks
        return (r0 // ch, c0 // cw), r0 % ch, c0 % cw

    def _read_done(self, r0: int, r1: int, c0: int, c1: int) -> tuple[np.ndarray, Any]:
        """``done`` over a block as bool, and the whole ``done`` chunk it lies in when that
        chunk file is written directly (for :meth:`_write_done`; else ``None``)."""
        direct = self.chunk_files.get("done")
        if direct is None or not self._in_one_done_chunk(r0, r1, c0, c1):
            return np.asarray(self.done[r0:r1, c0:c1], dtype=bool), None
        coords, i, j = self._done_chunk(r0, c0)
        chunk = direct.read(coords)
        return chunk[i : i + r1 - r0, j : j + c1 - c0].astype(bool), chunk

    def _write_done(self, r0: int, c0: int, block: np.ndarray, chunk: Any) -> None:
        """Set ``done`` over a block: into ``chunk`` (from :meth:`_read_done`) and its file, or
        through zarr."""
        h, w = block.shape
        if chunk is None:
            self.done[r0 : r0 + h, c0 : c0 + w] = block
            return
        coords, i, j = self._done_chunk(r0, c0)
        chunk[i : i + h, j : j + w] = block
        self.chunk_files["done"].write(coords, chunk)

    def _in_one_done_chunk(self, r0: int, r1: int, c0: int, c1: int) -> bool:
        ch, cw = self.done.chunks
        return r0 // ch == (r1 - 1) // ch and c0 // cw == (c1 - 1) // cw

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
        cells = as_cells(cells)
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
        cells = as_cells(cells)
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
            f"{type(self).__name__}({str(self.path)!r}, genes={len(self.genes)}, "
            f"grid={self.grid.shape}, done={self.n_done})"
        )
