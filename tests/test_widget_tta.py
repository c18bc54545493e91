"""The live view's test-time augmentation (issue 11): the Predict dock's "Test-time
augmentation" choice, on a real slide with the real tiny model re-saved with ``tta = 8``.

Run under ``xvfb-run -a`` (GUI tests need a display).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

# Import torch/timm (and through them triton) now, at collection, before any OpenGL context
# exists in this process: see napari_stpredict.widgets.guard_llvm_clash.
pytest.importorskip("timm")
pytest.importorskip("napari")

from napari_stpredict.widgets._live import camera_of

pytestmark = pytest.mark.gui

WAIT_MS = 120_000


@pytest.fixture(scope="module")
def tta8_model_file(tiny_model_file, tmp_path_factory) -> Path:
    """The tiny model (real weights, real bank) saved again with ``metadata["input"]["tta"] = 8``:
    what ``stpredict train`` writes by default once TTA pays (issue 11)."""
    from napari_stpredict.model.checkpoint import load_model_file, save_model_file
    from napari_stpredict.model.preprocess import InputSpec

    mf = load_model_file(tiny_model_file)
    meta = dict(mf.metadata)
    meta["input"] = InputSpec.from_metadata(meta).replace(tta=8).to_dict()
    out = tmp_path_factory.mktemp("tta8") / "tiny_cmrc_tta8.safetensors"
    save_model_file(
        out,
        mf.build_model(),
        bank_embeddings=mf.bank_embeddings,
        bank_expression=mf.bank_expression,
        bank_section_index=mf.bank_section_index,
        metadata=meta,
    )
    return out


@pytest.fixture
def dock(make_napari_viewer, wsi_dir, tmp_path, qtbot):
    """A shown viewer with the CMU slide (µm layer) and the Predict dock on the CPU, live off."""
    from napari_stpredict.widgets.predict import PredictWidget

    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1100, 800)
    (layer,) = viewer.open(str(wsi_dir / "cmu_small_region.svs"), plugin="napari-stpredict")
    widget = PredictWidget(viewer, cache_dir=tmp_path / "cache", device="cpu")
    viewer.window.add_dock_widget(widget, name="Predict expression", area="right")
    widget.set_live(False)
    yield viewer, widget, layer
    assert widget.close_workers(wait_s=60), "a prediction thread outlived the widget"


def _wait_for_session(widget, qtbot, tta: int) -> None:
    qtbot.waitUntil(
        lambda: widget.session is not None and widget.session.predictor.tta == tta,
        timeout=WAIT_MS,
    )


def test_tta_defaults_to_one_view_on_a_cpu_and_the_choice_rebuilds_the_session(
    dock, tta8_model_file, qtbot
):
    from napari_stpredict.model.predictor import live_view_tta

    _, widget, _ = dock
    assert live_view_tta(8, "cpu") == 1  # the policy (the model's own on CUDA)
    widget.load_model(tta8_model_file)
    _wait_for_session(widget, qtbot, 1)
    # the model file says 8 views; the live view on a CPU uses 1 (the Predictor the dock built)
    assert widget.predictor.tta == 1 and widget.session.predictor is widget.predictor
    assert (widget.state.model_tta, widget.state.tta) == (8, 1)
    combo = widget.tta_combo
    items = [(combo.itemText(k), combo.itemData(k)) for k in range(combo.count())]
    assert items == [("1 view (fast)", 1), ("8 views (as predict)", 8)]
    assert combo.currentData() == 1 and combo.isVisibleTo(widget)
    assert widget.tta_note.text() == "8 views: 8× slower per tile"
    assert widget.tta_note.isVisibleTo(widget)

    # choosing 8 views (as the user would, through the menu) rebuilds the Predictor with 8
    # views off the GUI thread and opens a new session with it
    old_session = widget.session
    combo.setCurrentIndex(1)
    combo.activated.emit(1)
    _wait_for_session(widget, qtbot, 8)
    assert widget.session is not old_session and widget.predictor.tta == 8
    assert widget.session.store.path != old_session.store.path  # cached apart from 1 view
    assert widget.predictor.has_uncertainty and widget.state.tta == 8
    assert widget.tta_combo.currentData() == 8
    # ... and back to 1 view
    widget.set_tta(1)
    _wait_for_session(widget, qtbot, 1)
    assert widget.tta_combo.currentData() == 1
    # a Predictor handed over keeps its TTA; asked for another, it is rebuilt with its settings
    from napari_stpredict.model import Predictor

    given = Predictor(tta8_model_file, device="cpu", batch_size=7, tta=1)
    widget.set_predictor(given, tta8_model_file, tta=8)
    _wait_for_session(widget, qtbot, 8)
    assert widget.predictor is not given and widget.predictor.batch_size == 7
    with pytest.raises(Exception, match="1, 2, 4 or 8"):
        widget.set_tta(3)


def test_a_model_without_tta_shows_no_choice(dock, tiny_model_file, qtbot):
    from napari_stpredict.model.header import read_model_header
    from napari_stpredict.model.preprocess import InputSpec

    _, widget, _ = dock

    if InputSpec.from_metadata(read_model_header(tiny_model_file)).tta != 1:
        pytest.skip("the tiny model has test-time augmentation")
    widget.load_model(tiny_model_file)
    _wait_for_session(widget, qtbot, 1)
    assert not widget.tta_combo.isVisibleTo(widget) and not widget.tta_note.isVisibleTo(widget)


def test_the_viewer_shows_the_predictor_with_the_same_tta(dock, tta8_model_file, qtbot):
    """The value of a tile in the viewer is ``Predictor(path, tta=8)`` on that tile's pixels as
    the evaluation reads them (``Slide.read_resampled``) — also after the same view was first
    predicted with 1 view (no stale cached value survives the switch)."""
    from napari_stpredict.model import Predictor

    viewer, widget, layer = dock
    # colour bars on: a TTA switch over shown heatmaps removes them and draws new ones, which
    # crashed napari 0.9.2 before widgets._common.keep_text_alive
    widget.set_colorbars(True)
    widget.load_model(tta8_model_file)  # the CPU default: 1 view
    _wait_for_session(widget, qtbot, 1)
    session = widget.session
    grid, tissue = session.grid, session.tissue
    genes = widget.predictor.genes
    gene = next((g for g in ("ERBB2", "KRT19", "EPCAM") if g in genes), genes[0])
    widget.set_genes([gene])
    mpp = float(layer.scale[-1])
    i, j = np.argwhere(tissue)[len(np.argwhere(tissue)) // 2]
    centre = grid.cell_center_px(i, j)
    camera_of(viewer).center = ((centre[0] - 0.5) * mpp, (centre[1] - 0.5) * mpp)
    camera_of(viewer).zoom = float(min(viewer.canvas.size)) / (3 * grid.stride_px * mpp)
    widget.set_live(True)
    qtbot.waitUntil(widget.view_complete, timeout=WAIT_MS)
    assert session.store.done_mask().any()
    widget.set_tta(8)  # the same view, now averaged over 8 views
    _wait_for_session(widget, qtbot, 8)
    session = widget.session
    qtbot.waitUntil(widget.view_complete, timeout=WAIT_MS)

    done = session.store.done_mask()
    assert done.any()
    hm = widget.heatmaps.layers[gene]
    p8 = Predictor(tta8_model_file, device="cpu", tta=8)
    p1 = Predictor(tta8_model_file, device="cpu", tta=1)
    g = p8.genes.index(gene)
    shown, by_8, by_1 = [], [], []
    for i, j in np.argwhere(done)[:3]:
        y0, x0 = i * grid.stride_um / mpp, j * grid.stride_um / mpp
        side = grid.patch_um / mpp
        crop = session.slide.read_resampled(y0, x0, side, side, out_shape=(p8.patch_px,) * 2)
        centre_world = np.array([y0 + side / 2 - 0.5, x0 + side / 2 - 0.5]) * mpp
        shown.append(hm.get_value(centre_world, world=True))
        by_8.append(p8.predict(crop[None])[0, g])
        by_1.append(p1.predict(crop[None])[0, g])
    np.testing.assert_allclose(shown, by_8, rtol=1e-4, atol=1e-4)
    assert not np.allclose(shown, by_1, rtol=1e-4, atol=1e-4), "8 views should differ from 1"
