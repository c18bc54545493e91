"""Grid geometry and tumour regions as polygons in level-0 pixels."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_stpredict.tumor.signature import TumorError


@dataclass(frozen=True)
class GridGeometry:
    """Where the cells of a prediction grid lie on the slide.

    Cell ``(i, j)`` is centred at level-0 pixel ``(origin_y + i * stride_px,
    origin_x + j * stride_px)`` and stands for the stride × stride square around that centre
    (the heatmap registration of ``TileGrid``).
    """

    shape: tuple[int, int]
    stride_px: float
    origin_y: float
    origin_x: float
    shape0: tuple[int, int]
    mpp: float | None = None
    cell_px: float | None = None
    source: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_grid(cls, grid: Any) -> GridGeometry:
        """From a ``TileGrid``, its ``to_dict()`` or a :class:`GridGeometry`."""
        if isinstance(grid, GridGeometry):
            return grid
        if isinstance(grid, Mapping):
            from napari_stpredict.inference import TileGrid

            grid = TileGrid.from_dict(dict(grid))
        try:
            gh, gw = (int(v) for v in grid.shape)
            stride = grid.stride_px
            y0, x0, y1, x1 = (float(v) for v in grid.cell_rect_px(0, 0))
            shape0 = tuple(int(v) for v in grid.shape0)
        except AttributeError as err:
            raise TumorError(
                f"prediction grid: {type(grid).__name__} is not a TileGrid ({err})"
            ) from None
        stride = float(np.mean(stride)) if np.ndim(stride) else float(stride)
        cell = getattr(grid, "cell_px", None)
        cell = (
            float(np.mean(cell))
            if cell is not None and np.ndim(cell)
            else (float(cell) if cell is not None else None)
        )
        mpp = getattr(grid, "mpp", None)
        return cls(
            (gh, gw),
            stride,
            (y0 + y1) / 2,
            (x0 + x1) / 2,
            (shape0[0], shape0[1]),
            float(mpp) if mpp else None,
            cell,
            grid,
        )

    def centers_px(self, i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Level-0 (y, x) pixel centres of cells ``(i, j)``."""
        return self.origin_y + np.asarray(i) * self.stride_px, self.origin_x + np.asarray(
            j
        ) * self.stride_px

    def cell_index(self, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The cell (i, j) whose stride square holds level-0 point (y, x); may be out of range."""
        i = np.floor((np.asarray(y) - self.origin_y) / self.stride_px + 0.5).astype(np.int64)
        j = np.floor((np.asarray(x) - self.origin_x) / self.stride_px + 0.5).astype(np.int64)
        return i, j


def mask_to_polygons(mask: np.ndarray, grid: Any, *, clip: bool = True) -> list[Any]:
    """Each 4-connected region of a cell mask as a shapely polygon in level-0 pixels.

    Boundaries follow cell edges exactly (no marching-squares corner cutting); holes are kept.
    Coordinates are ``(x, y)`` level-0 pixels (GeoJSON / QuPath order), clipped to the slide.

    Returns
    -------
    list of shapely.Polygon | shapely.MultiPolygon
        One geometry per region, in label order.
    """
    return [
        r.geometry
        for r in _regions(np.asarray(mask, dtype=bool), GridGeometry.from_grid(grid), clip=clip)
    ]


@dataclass
class TumorRegion:
    """One connected tumour region."""

    label: int
    geometry: Any  # shapely Polygon/MultiPolygon, level-0 px (x, y)
    cells: np.ndarray  # (n, 2) int grid (i, j)
    measurements: dict[str, float] = field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        """Number of grid cells in the region."""
        return len(self.cells)


def _regions(mask: np.ndarray, geo: GridGeometry, *, clip: bool) -> list[TumorRegion]:
    from skimage.measure import label

    if mask.shape != geo.shape:
        raise TumorError(f"tumour mask: shape {mask.shape} differs from the grid {geo.shape}")
    lab = label(mask, connectivity=1)
    return _regions_of_labels(lab, geo, clip=clip)


def _regions_of_labels(lab: np.ndarray, geo: GridGeometry, *, clip: bool) -> list[TumorRegion]:
    import shapely
    from shapely import affinity

    bounds = shapely.box(0, 0, geo.shape0[1], geo.shape0[0]) if clip else None
    out: list[TumorRegion] = []
    # one pass over the rows collects the runs of every region (bounded by the grid, not the slide)
    runs: dict[int, list[tuple[int, int, int]]] = {}
    for i in range(lab.shape[0]):
        row = lab[i]
        if not row.any():
            continue
        change = np.flatnonzero(np.diff(np.concatenate(([0], row, [0]))) != 0)
        for a, b in itertools.pairwise(change):
            v = int(row[a])
            if v:
                runs.setdefault(v, []).append((i, int(a), int(b)))
    s = geo.stride_px
    # grid-unit polygon (cell (i, j) = [j, j+1) × [i, i+1)) → level-0 px
    matrix = [s, 0, 0, s, geo.origin_x - s / 2, geo.origin_y - s / 2]
    # cells of every label in one sort (not one full-grid scan per region)
    flat = lab.ravel()
    order = np.argsort(flat, kind="stable")
    starts = np.searchsorted(flat[order], np.arange(lab.max() + 2))
    for v in sorted(runs):
        boxes = [shapely.box(a, i, b, i + 1) for i, a, b in runs[v]]
        g = shapely.union_all(boxes).simplify(0)
        g = affinity.affine_transform(g, matrix)
        if bounds is not None:
            g = g.intersection(bounds)
        if g.is_empty:
            continue
        idx = order[starts[v] : starts[v + 1]]
        cells = np.stack(np.unravel_index(idx, lab.shape), axis=1)
        out.append(TumorRegion(v, g, cells))
    return out


def tumor_regions(
    mask: np.ndarray,
    grid: Any,
    *,
    values: Any = None,
    genes: Sequence[str] | None = None,
    score: np.ndarray | None = None,
    clip: bool = True,
) -> list[TumorRegion]:
    """Connected tumour regions with polygons and measurements.

    Parameters
    ----------
    values, genes
        Optional (G, gh, gw) predictions: each region gets the mean predicted expression per gene
        over its predicted cells (``measurements[gene]``).
    score
        Optional (gh, gw) tumour score: adds ``"Tumor score mean"``.

    Measurements always include ``"Cells"`` and ``"Area µm^2"`` (or ``"Area px^2"``).
    """
    geo = GridGeometry.from_grid(grid)
    regs = _regions(np.asarray(mask, dtype=bool), geo, clip=clip)
    if not regs:
        return regs
    for r in regs:
        r.measurements["Cells"] = float(r.n_cells)
        if geo.mpp:
            r.measurements["Area µm^2"] = float(r.geometry.area * geo.mpp**2)
        else:
            r.measurements["Area px^2"] = float(r.geometry.area)
    # per-region means with one bincount per plane (a region clipped away keeps its label)
    lab = np.zeros(geo.shape, dtype=np.int64)
    for k, r in enumerate(regs, start=1):
        lab[r.cells[:, 0], r.cells[:, 1]] = k
    planes: list[tuple[str, Callable[[], Any]]] = []
    if score is not None:
        planes.append(("Tumor score mean", lambda: score))
    if values is not None:
        if genes is None or len(genes) != values.shape[0]:
            raise TumorError("tumour regions: give one gene name per predicted plane")
        # read one gene plane at a time (values may be a zarr array)
        planes += [(str(name), lambda g=g: values[g]) for g, name in enumerate(genes)]
    flat = lab.ravel()
    for name, read in planes:
        v = np.asarray(read(), dtype=np.float64).ravel()
        ok = np.isfinite(v) & (flat > 0)
        sums = np.bincount(flat[ok], weights=v[ok], minlength=len(regs) + 1)
        counts = np.bincount(flat[ok], minlength=len(regs) + 1)
        for k, r in enumerate(regs, start=1):
            r.measurements[name] = float(sums[k] / counts[k]) if counts[k] else float("nan")
    return regs
