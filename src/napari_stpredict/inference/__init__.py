"""Inference core shared by the napari widget and ``stpredict predict``.

- :class:`TileGrid` — the slide cut into model patches; cells ↔ level-0 px ↔ µm; view and
  tissue selection; heatmap registration (see ``docs/inference.md``).
- :class:`PredictionStore` — cached predictions on disk (zarr, genes × grid, NaN = not
  predicted), keyed by slide + model + grid; :func:`clear_cache`, :func:`default_cache_dir`.
- :class:`Engine` — batched, cached, cancellable prediction of cells, nearest to the view
  centre first.
- :func:`open_session` / :class:`PredictSession` — slide + grid + tissue + store + engine in one
  object: the one recipe used by the widget, ``stpredict predict``, the demo and benchmarks.
- :class:`PredictorProtocol` — what all of the above need from a model;
  :func:`layer_placement` — the one placement of grid-shaped layers on the slide.

>>> from napari_stpredict.inference import Engine, PredictionStore, TileGrid  # doctest: +SKIP
>>> grid = TileGrid.for_slide(slide, predictor)                                # doctest: +SKIP
>>> store = PredictionStore.for_slide(slide, predictor, grid)                  # doctest: +SKIP
>>> with Engine(slide, predictor, grid, store) as engine:                      # doctest: +SKIP
...     for batch in engine.run(grid.cells_in_view(y0, x0, y1, x1, units="layer")):
...         refresh(batch.cells, batch.values)
"""

from __future__ import annotations

from napari_stpredict.inference import store as _store
from napari_stpredict.inference.engine import (
    BatchResult,
    Engine,
    EngineStats,
    RunSummary,
    order_cells,
)
from napari_stpredict.inference.grid import TileGrid, layer_placement
from napari_stpredict.inference.protocol import PredictorProtocol
from napari_stpredict.inference.session import PredictSession, open_session
from napari_stpredict.inference.store import *  # noqa: F403 — the names of store.__all__

__all__ = [
    "BatchResult",
    "Engine",
    "EngineStats",
    "PredictSession",
    "PredictorProtocol",
    "RunSummary",
    "TileGrid",
    "layer_placement",
    "open_session",
    "order_cells",
]
__all__ += _store.__all__  # PredictionStore, WriteBuffer, the cache folder, keys, ...
