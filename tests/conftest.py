"""Shared fixtures: the real data in ../shared/data and a tiny trained model.

Tests that need the real data skip with a reason when the folder is absent. The folder can be
moved with the environment variable ``STPREDICT_SHARED_DATA``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("STPREDICT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real test data not found at {path} (set STPREDICT_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real public data (``../shared/data``)."""
    return _need(SHARED_DATA)


@pytest.fixture(scope="session")
def wsi_dir(shared_data: Path) -> Path:
    """Real slide files for reader tests."""
    return _need(shared_data / "wsi")


@pytest.fixture(scope="session")
def her2st_dir(shared_data: Path) -> Path:
    """HER2ST legacy ST sections (counts, spots, images, labels)."""
    return _need(shared_data / "her2st")


@pytest.fixture(scope="session")
def mob_dir(shared_data: Path) -> Path:
    """STUtility mouse olfactory bulb sections."""
    return _need(shared_data / "mob")


@pytest.fixture(scope="session")
def benchmarks_data_dir() -> Path:
    """The manifests under benchmarks/data (they point at ../shared/data)."""
    return REPO_ROOT / "benchmarks" / "data"


def _her2st_mpp(her2st_dir: Path, section: str) -> float:
    """µm/px of a HER2ST image from its spot grid (legacy ST: 200 µm array pitch)."""
    import numpy as np
    import pandas as pd

    d = pd.read_csv(her2st_dir / "spots" / f"{section}_selection.tsv", sep="\t")
    fit_x = np.polyfit(d["x"], d["pixel_x"], 1)[0]
    fit_y = np.polyfit(d["y"], d["pixel_y"], 1)[0]
    px_per_step = (fit_x + fit_y) / 2
    return 200.0 / px_per_step


@pytest.fixture(scope="session")
def real_store(tmp_path_factory, her2st_dir: Path, tiny_model_file):
    """``(store, model_path)``: HER2ST C2 (real H&E) with a block of tissue cells predicted.

    The tiny model predicts a 12 × 12 block of cells around the middle of the slide (tissue
    cells only, like the live view), so the store is partially predicted, as in real use.
    """
    import numpy as np

    from napari_stpredict.inference.engine import Engine
    from napari_stpredict.inference.grid import TileGrid
    from napari_stpredict.inference.store import PredictionStore
    from napari_stpredict.model import Predictor
    from napari_stpredict.slide import open_slide

    slide = open_slide(her2st_dir / "images" / "C2.jpg", mpp=_her2st_mpp(her2st_dir, "C2"))
    predictor = Predictor(tiny_model_file, device="cpu")
    grid = TileGrid.for_slide(slide, predictor)
    store = PredictionStore.for_slide(
        slide, predictor, grid, cache_dir=tmp_path_factory.mktemp("real_store")
    )
    gh, gw = grid.shape
    ii, jj = np.mgrid[gh // 2 - 6 : gh // 2 + 6, gw // 2 - 6 : gw // 2 + 6]
    engine = Engine(slide, predictor, grid, store)
    try:
        for _ in engine.run(np.stack([ii.ravel(), jj.ravel()], axis=1)):
            pass
    finally:
        engine.close()
    return store, Path(tiny_model_file)
