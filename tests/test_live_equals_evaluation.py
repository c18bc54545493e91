"""A tile in the live view gets the evaluation's prediction for the same pixels (issue 11).

The model is shaped like the training default (BLEEP, test-time views, a 3× context field):
the view's session (slide → grid → store → engine, as the Predict dock opens it) and
``stpredict evaluate``'s per-spot prediction (``evaluation.data.predict_section`` on spots
centred where the grid's tiles are) must give the same numbers, with the TTA and context read
from the model file on both sides.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest


@pytest.fixture(scope="module")
def default_shaped_model(benchmarks_data_dir, tiny_model_config, tmp_path_factory):
    """A BLEEP model with test-time views and a 3× context field (frozen backbone, 64 px, B4).

    ``tta = 2``, not the default 8: the same code path at a quarter of the backbone passes.
    """
    from napari_stpredict.training import train

    manifest = benchmarks_data_dir / "her2st.yaml"
    if not manifest.exists():
        pytest.skip(f"dataset manifest {manifest} not found")
    config = dataclasses.replace(
        tiny_model_config, method="bleep", tta=2, context=3.0, train_backbone="none"
    )
    out = tmp_path_factory.mktemp("default_shaped") / "bleep_tta2_ctx3.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dropped genes of the panel
        train(manifest, config, out=out, sections=["B4"])
    return out


def test_live_view_tile_equals_evaluation_prediction(
    her2st_dir, her2st_mpp, default_shaped_model, tmp_path
):
    from napari_stpredict.evaluation.data import SectionData, predict_section
    from napari_stpredict.inference.session import open_session
    from napari_stpredict.model import Predictor

    predictor = Predictor(default_shaped_model, device="cpu")
    assert predictor.tta == 2 and predictor.n_fields == 2  # read from the model file
    image = her2st_dir / "images" / "C3.jpg"
    mpp = her2st_mpp("C3")
    session = open_session(predictor=predictor, slide_path=image, mpp=mpp, cache_dir=tmp_path)
    try:
        tissue = session.tissue_cell_list()
        assert len(tissue) > 20
        cells = tissue[np.random.default_rng(0).permutation(len(tissue))[:12]]
        for _batch in session.engine.run(cells):  # what the view does for tiles in sight
            pass
        stored = session.store.read_cells(cells)  # what the heatmaps display
        centres = []
        for i, j in cells:
            y0, x0, y1, x1 = session.grid.cell_rect_px(int(i), int(j))
            centres.append(((x0 + x1) / 2, (y0 + y1) / 2))
    finally:
        session.close()
    section = SectionData(
        name="C3",
        adata=None,
        xy=np.asarray(centres, dtype=np.float64),
        image=str(image),
        mpp=mpp,
        labels=None,
    )
    evaluated = predict_section(predictor, section, batch_size=5)  # other batches than the view's
    assert np.isfinite(evaluated).all() and evaluated.std() > 0
    np.testing.assert_allclose(stored, evaluated, rtol=1e-5, atol=1e-5)
