"""The engine's write buffer: :class:`WriteBuffer` turns predicted batches into block writes.

A batch of the engine covers a few cells of many blocks; writing it at once would rewrite
each chunk it touches (all genes) once per batch. The buffer keeps a slab per block instead
and writes each block once, when the run has predicted all of it (or on size, age, flush).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from napari_stpredict.inference.store_arrays import StoreArrays

__all__ = ["WriteBuffer"]

#: A count no block reaches: blocks the run did not announce are written by size or age.
_NEVER = 1 << 62


@dataclass
class _OpenBlock:
    """The buffered predictions of one block not yet written."""

    values: np.ndarray  #: (genes, h, w) slab, NaN where not predicted
    spread: np.ndarray | None  #: same, when the store keeps a spread
    mask: np.ndarray  #: (h, w) bool, the cells predicted
    since: float = field(default_factory=time.monotonic)  #: when the block was opened
    count: int = 0  #: cells added

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + (self.spread.nbytes if self.spread is not None else 0)


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

    Attributes
    ----------
    blocks_written : int
        Block writes so far.
    peak_bytes : int
        Most bytes buffered at once.
    """

    def __init__(
        self,
        store: StoreArrays,
        expected: np.ndarray | None = None,
        *,
        max_bytes: int = 256 * 2**20,
        max_age_s: float = 10.0,
    ) -> None:
        self.store = store
        self.max_bytes = int(max_bytes)
        self.max_age_s = float(max_age_s)
        #: cells still to come per block of ``expected``
        self._want: dict[tuple[int, int], int] = {}
        if expected is not None and len(expected):
            blocks, counts = np.unique(store.block_of(expected), axis=0, return_counts=True)
            self._want = {
                (int(b[0]), int(b[1])): int(c) for b, c in zip(blocks, counts, strict=True)
            }
        self._open: dict[tuple[int, int], _OpenBlock] = {}  # oldest first
        self.blocks_written = 0
        self.peak_bytes = 0

    @property
    def nbytes(self) -> int:
        """Bytes buffered now."""
        return sum(block.nbytes for block in self._open.values())

    def add(self, cells: np.ndarray, values: np.ndarray, spread: np.ndarray | None = None) -> None:
        """Buffer predictions (``(n, 2)`` cells, ``(n, genes)`` values); write full blocks."""
        store = self.store
        cells, values = store.checked_batch(cells, values, spread)
        if len(cells) == 0:
            return
        store.check_alive()  # a cleared cache fails the run now, not at the last flush
        for key, idx in store.cells_by_block(cells):
            block = self._open.get(key) or self._open_block(key)
            r0, _, c0, _ = store.block_bounds(*key)
            ii, jj = cells[idx, 0] - r0, cells[idx, 1] - c0
            block.values[:, ii, jj] = values[idx].T
            if spread is not None and block.spread is not None:
                block.spread[:, ii, jj] = np.asarray(spread)[idx].T
            block.mask[ii, jj] = True
            block.count += len(idx)
            if block.count >= self._want.get(key, _NEVER):
                self._write(key)
        while self._open and self.nbytes > self.max_bytes:
            self._write(next(iter(self._open)))  # the oldest open block
        self.flush_aged()

    def flush_aged(self) -> None:
        """Write the blocks that waited longer than ``max_age_s``."""
        now = time.monotonic()
        for key in [k for k, b in self._open.items() if now - b.since > self.max_age_s]:
            self._write(key)

    def flush(self) -> None:
        """Write every buffered block."""
        for key in list(self._open):
            self._write(key)

    def _open_block(self, key: tuple[int, int]) -> _OpenBlock:
        """A new all-NaN slab for block ``key``, buffered."""
        store = self.store
        r0, r1, c0, c1 = store.block_bounds(*key)
        shape = (len(store.genes), r1 - r0, c1 - c0)
        block = _OpenBlock(
            values=np.full(shape, np.nan, store.dtype),
            spread=np.full(shape, np.nan, store.dtype) if store.spread is not None else None,
            mask=np.zeros(shape[1:], bool),
        )
        self._open[key] = block
        self.peak_bytes = max(self.peak_bytes, self.nbytes)
        return block

    def _write(self, key: tuple[int, int]) -> None:
        """Write the buffered block ``key`` to the store and forget it."""
        block = self._open.pop(key)
        if key in self._want:  # a block written early completes on its remaining cells
            self._want[key] -= block.count
        self.store.write_block(key[0], key[1], block.values, block.mask, block.spread)
        self.blocks_written += 1
