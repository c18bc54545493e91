"""Checking a reused store and healing it: :func:`verify_store` → :class:`VerifyReport`.

A store reused by ``stpredict predict`` (or a cohort) may hold a chunk torn by a killed
writer or a full disk. Every chunk under predicted cells is decoded; a chunk that cannot be
is reported by path and (with ``heal``) removed, and the cells it covers are marked not done,
so the engine predicts them again.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from napari_stpredict.inference.store_locks import store_write_lock

if TYPE_CHECKING:
    from napari_stpredict.inference.store_arrays import StoreArrays

__all__ = ["VerifyReport", "verify_store"]


@dataclass(frozen=True)
class VerifyReport:
    """What :meth:`PredictionStore.verify` found."""

    broken_chunks: list[str]  #: file paths of chunks that could not be decoded
    cells_reset: int  #: done cells marked not done (to be predicted again)
    cells_done: int  #: done cells before the check


def verify_store(store: StoreArrays, *, heal: bool = True) -> VerifyReport:
    """Check every chunk under predicted cells: decodable, and values where ``done``.

    A chunk that cannot be read (torn, truncated, bad compression) is reported with its file
    path; with ``heal`` it is removed and the cells it covers are marked not done, so the next
    run predicts them again. Done cells whose values are NaN are reset likewise. A broken
    ``done`` chunk is removed (its cells count as not done).
    """
    broken: list[str] = []
    done = _read_done(store, broken, heal=heal)
    reset = _check_predicted_blocks(store, done, broken, heal=heal)
    n_reset = int(reset.sum())
    if heal and n_reset:
        with store_write_lock(store.path):
            store.done[:, :] = done & ~reset
    return VerifyReport(broken_chunks=broken, cells_reset=n_reset, cells_done=int(done.sum()))


def _broken_chunk(
    store: StoreArrays, name: str, coords: tuple[int, ...], broken: list[str], *, heal: bool
) -> None:
    """Report an undecodable chunk in ``broken``; with ``heal``, delete its file."""
    path = store.chunk_path(name, coords)
    broken.append(str(path))
    if heal:
        with contextlib.suppress(OSError):
            path.unlink()


def _read_done(store: StoreArrays, broken: list[str], *, heal: bool) -> np.ndarray:
    """The ``done`` mask, chunk by chunk; an undecodable chunk reads as not done."""
    dh, dw = (int(c) for c in store.done.chunks)
    gh, gw = store.grid.shape
    done = np.zeros((gh, gw), bool)
    for bi in range(-(-gh // dh)):
        for bj in range(-(-gw // dw)):
            sl = (slice(bi * dh, (bi + 1) * dh), slice(bj * dw, (bj + 1) * dw))
            try:
                done[sl] = np.asarray(store.done[sl], dtype=bool)
            except Exception:
                _broken_chunk(store, "done", (bi, bj), broken, heal=heal)
    return done


def _check_predicted_blocks(
    store: StoreArrays, done: np.ndarray, broken: list[str], *, heal: bool
) -> np.ndarray:
    """Decode every ``values`` / ``spread`` chunk of the blocks with done cells.

    Returns the done cells to reset: those under an undecodable chunk, and those whose
    values hold NaN.
    """
    reset = np.zeros(store.grid.shape, bool)
    if not done.any():
        return reset
    gc = int(store.values.chunks[0])
    bh, bw = store.block_shape
    for bi, bj in np.unique(np.argwhere(done) // [bh, bw], axis=0):
        r0, r1, c0, c1 = store.block_bounds(int(bi), int(bj))
        block_done = done[r0:r1, c0:c1]
        for name, arr in (("values", store.values), ("spread", store.spread)):
            if arr is None:
                continue
            for gi in range(-(-len(store.genes) // gc)):
                try:
                    chunk = np.asarray(arr[gi * gc : (gi + 1) * gc, r0:r1, c0:c1])
                except Exception:
                    _broken_chunk(store, name, (gi, int(bi), int(bj)), broken, heal=heal)
                    reset[r0:r1, c0:c1] |= block_done
                    continue
                if name == "values":
                    reset[r0:r1, c0:c1] |= block_done & np.isnan(chunk).any(axis=0)
    return reset
