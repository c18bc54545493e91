"""A uniform view of predictions on a grid, whatever holds them (store, path, arrays)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_stpredict.export._common import ExportError
from napari_stpredict.tumor.regions import GridGeometry


@dataclass
class Predictions:
    """Predicted expression on a tile grid.

    Attributes
    ----------
    values
        (G, gh, gw) array-like (zarr, numpy); NaN = not predicted. Read one gene at a time.
    genes
        Gene names, in ``values`` order.
    grid
        The ``TileGrid`` (or :class:`~napari_stpredict.tumor.GridGeometry`).
    done
        (gh, gw) bool of predicted cells, or ``None`` (= cells where the first gene is finite).
    info
        Provenance: ``{"slide": {...}, "model": {...}, ...}`` (a store's attributes).
    path
        The store folder, when there is one.
    tissue
        (gh, gw) bool of the tiles that should be predicted (tissue), when known: exports are
        "partial" only when some of these are missing.
    """

    values: Any
    genes: list[str]
    grid: Any
    done: Any = None
    info: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    tissue: Any = None
    _block: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    _block_start: int = field(default=-1, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.genes = [str(g) for g in self.genes]
        shape = tuple(self.values.shape)
        if len(shape) != 3 or shape[0] != len(self.genes):
            raise ExportError(
                f"predictions: shape {shape} does not match {len(self.genes)} genes × grid"
            )
        if shape[1:] != self.geometry.shape:
            raise ExportError(
                f"predictions: grid {shape[1:]} differs from the tile grid {self.geometry.shape}"
            )

    @property
    def geometry(self) -> GridGeometry:
        """Cell positions on the slide."""
        return GridGeometry.from_grid(self.grid)

    @property
    def n_cells(self) -> int:
        """Number of grid cells."""
        gh, gw = self.geometry.shape
        return gh * gw

    def set_tissue(self, tissue: Any) -> None:
        """Record which tiles should be predicted (ignored when the shape does not match)."""
        if tissue is None:
            return
        mask = np.asarray(tissue, dtype=bool)
        if mask.shape == self.geometry.shape:
            self.tissue = mask

    def n_expected(self) -> int:
        """Tiles that should be predicted: the tissue tiles when known, else every grid tile."""
        if self.tissue is not None:
            return int(np.count_nonzero(self.tissue))
        return self.n_cells

    def n_missing(self) -> int:
        """Tiles that should be predicted and are not."""
        done = self.predicted()
        if self.tissue is not None:
            return int(np.count_nonzero(self.tissue & ~done))
        return int(done.size - np.count_nonzero(done))

    def result_counts(self) -> dict[str, int | None]:
        """``n_expected``/``n_missing`` for an :class:`ExportResult` (None without tissue)."""
        if self.tissue is None:
            return {"n_expected": None, "n_missing": None}
        return {"n_expected": self.n_expected(), "n_missing": self.n_missing()}

    def predicted(self) -> np.ndarray:
        """(gh, gw) bool: cells with predictions."""
        if self.done is not None:
            return np.asarray(self.done[...], dtype=bool)
        return np.isfinite(np.asarray(self.values[0], dtype=np.float32))

    def require(self, what: str) -> np.ndarray:
        """The predicted mask; raises if nothing is predicted."""
        mask = self.predicted()
        if not mask.any():
            where = f" {self.path}" if self.path else ""
            raise ExportError(
                f"{what}: nothing is predicted yet in the prediction store{where} (run the prediction first)"
            )
        return mask

    def gene_indices(self, genes: Sequence[str] | None) -> list[int]:
        """Indices of ``genes`` (all when ``None``); one-line error naming unknown genes."""
        if genes is None:
            return list(range(len(self.genes)))
        if isinstance(genes, str):
            genes = [genes]
        if not genes:
            raise ExportError("genes: empty selection")
        pos = {g: i for i, g in enumerate(self.genes)}
        missing = [g for g in genes if g not in pos]
        if missing:
            raise ExportError(f"genes: {', '.join(missing)} not predicted by this model")
        return [pos[g] for g in genes]

    def plane(self, index: int) -> np.ndarray:
        """(gh, gw) float32 of one gene.

        A zarr store is chunked over several genes at a time, so the whole gene chunk holding
        ``index`` is read once and kept until a gene of another chunk is asked for (memory:
        one gene chunk × the grid).
        """
        index = int(index)
        chunks = getattr(self.values, "chunks", None)
        step = int(chunks[0]) if chunks else 1
        start = index - index % step
        if self._block is None or self._block_start != start:
            self._block = np.asarray(self.values[start : start + step], dtype=np.float32)
            self._block_start = start
        return self._block[index - start]

    @property
    def model_path(self) -> str | None:
        """The model file the predictions came from, if recorded."""
        m = self.info.get("model")
        p = m.get("path") if isinstance(m, Mapping) else m
        return str(p) if p else None

    @property
    def slide_path(self) -> str | None:
        """The slide the predictions came from, if recorded."""
        s = self.info.get("slide")
        p = s.get("path") if isinstance(s, Mapping) else s
        return str(p) if p else None


def as_predictions(obj: Any, *, grid: Any = None) -> Predictions:
    """Wrap a ``PredictionStore``, a store path or :class:`Predictions`.

    Raises
    ------
    ExportError
        Not predictions, or a path that is not a prediction store.
    """
    if isinstance(obj, Predictions):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        from napari_stpredict.inference.store import PredictionStore

        obj = PredictionStore.from_path(obj)
    if hasattr(obj, "values") and hasattr(obj, "genes"):
        g = grid if grid is not None else getattr(obj, "grid", None)
        if g is None:
            raise ExportError(f"{type(obj).__name__}: predictions without a tile grid (pass grid=)")
        path = getattr(obj, "path", None)
        return Predictions(
            obj.values,
            list(obj.genes),
            g,
            getattr(obj, "done", None),
            dict(getattr(obj, "info", {}) or {}),
            Path(path) if path else None,
        )
    raise ExportError(f"{type(obj).__name__}: not a prediction store")
