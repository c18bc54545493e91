"""The order in which the engine predicts cells: nearest a centre first, optionally by block."""

from __future__ import annotations

import numpy as np

from napari_stpredict.inference.grid import TileGrid

__all__ = ["order_cells"]


def order_cells(
    cells: np.ndarray,
    grid: TileGrid,
    center: tuple[float, float] | None,
    *,
    block: tuple[int, int] | None = None,
) -> np.ndarray:
    """Sort cells by the distance of their centres to ``center`` (level-0 px ``(y, x)``).

    ``None`` centres on the mean of the cells. Ties are broken by row, then column, so the
    order is deterministic. With ``block=(bh, bw)`` the cells are grouped in blocks of
    ``bh × bw`` cells, nearest block (by its centre) first, row-major inside a block.

    Parameters
    ----------
    cells
        ``(n, 2)`` grid indices ``(i, j)``.
    grid
        The grid the cells belong to (for their centres in level-0 px).
    center
        Level-0 ``(y, x)`` to start from; ``None`` = the mean of the cells' centres.
    block
        ``(bh, bw)`` cells per block (the store's block shape), or ``None`` = cell by cell.

    Returns
    -------
    numpy.ndarray
        ``(n, 2)`` int64, the same cells in prediction order.
    """
    cells = np.asarray(cells, dtype=np.int64).reshape(-1, 2)
    if len(cells) <= 1:
        return cells
    centers = grid.cell_centers_px(cells)
    c = centers.mean(axis=0) if center is None else np.asarray(center, dtype=np.float64)
    if block is not None:
        bh, bw = block
        bi, bj = cells[:, 0] // bh, cells[:, 1] // bw
        bc = grid.cell_centers_px(np.stack([bi * bh + (bh - 1) / 2, bj * bw + (bw - 1) / 2], 1))
        d2 = ((bc - c) ** 2).sum(axis=1)
        order = np.lexsort((cells[:, 1], cells[:, 0], bj, bi, d2))
        return cells[order]
    d2 = ((centers - c) ** 2).sum(axis=1)
    order = np.lexsort((cells[:, 1], cells[:, 0], d2))
    return cells[order]
