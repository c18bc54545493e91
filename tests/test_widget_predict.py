"""The "Predict expression" widget in a real napari viewer, on a real slide, with the real tiny
model: live prediction of exactly the visible tissue, heatmap registration, cache reuse,
cancel, responsiveness, slide switching and bad input.

Run under ``xvfb-run -a`` (GUI tests need a display).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

# Import torch/timm (and through them triton) now, at collection, before any OpenGL context
# exists in this process: see napari_stpredict.widgets.guard_llvm_clash.
pytest.importorskip("timm")
pytest.importorskip("napari")

from napari_stpredict.widgets._live import MARGIN, camera_of

pytestmark = pytest.mark.gui

ARTIFACTS = Path(__file__).parent / "artifacts"
WAIT_MS = 120_000


@pytest.fixture(scope="module")
def predictor(tiny_model_file):
    from napari_stpredict.model import Predictor

    return Predictor(tiny_model_file, device="cpu")


@pytest.fixture(scope="module")
def cmu_path(wsi_dir):
    return wsi_dir / "cmu_small_region.svs"


def _open_layer(viewer, path: Path):
    layers = viewer.open(str(path), plugin="napari-stpredict")
    assert len(layers) == 1
    return layers[0]


@pytest.fixture
def env(make_napari_viewer, predictor, tiny_model_file, cmu_path, tmp_path, qtbot):
    """A shown viewer with the CMU slide (µm layer), the widget docked and the model set."""
    from napari_stpredict.widgets.predict import PredictWidget

    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1100, 800)
    layer = _open_layer(viewer, cmu_path)
    widget = PredictWidget(viewer, cache_dir=tmp_path / "cache")
    viewer.window.add_dock_widget(widget, name="Predict expression", area="right")
    widget.set_live(False)
    widget.set_predictor(predictor, tiny_model_file)
    qtbot.waitUntil(lambda: widget.session is not None, timeout=WAIT_MS)
    yield viewer, widget, layer
    assert widget.close_workers(wait_s=60), "a prediction thread outlived the widget"


def _gene(predictor, preferred=("ERBB2", "KRT19", "EPCAM", "COL1A1")) -> str:
    for g in preferred:
        if g in predictor.genes:
            return g
    return predictor.genes[0]


def _expected_cells(viewer, layer, grid, tissue) -> np.ndarray:
    """Tissue cells that the canvas shows (plus the margin), from the camera alone."""
    mpp = float(layer.scale[-1])
    center = np.asarray(camera_of(viewer).center)[-2:]
    half = np.asarray(viewer.canvas.size)[-2:] / (2 * camera_of(viewer).zoom)
    # world (µm, napari pixel centres on integers) -> continuous level-0 px
    a = (center - half) / mpp + 0.5
    b = (center + half) / mpp + 0.5
    cells = grid.cells_in_view(a[0], a[1], b[0], b[1], units="px", margin=MARGIN)
    mask = np.zeros(grid.shape, bool)
    mask[cells[:, 0], cells[:, 1]] = True
    return mask & tissue


def _border_view(grid, tissue, half=2):
    """Centre (level-0 px) of a tissue cell near background, so a view holds both kinds."""
    ii, jj = np.nonzero(tissue)
    best, best_score = (ii[0], jj[0]), 1.0
    for i, j in zip(ii, jj, strict=True):
        block = tissue[max(i - half, 0) : i + half + 1, max(j - half, 0) : j + half + 1]
        score = abs(block.mean() - 0.6)
        if (
            score < best_score
            and half <= i < grid.shape[0] - half
            and half <= j < grid.shape[1] - half
        ):
            best, best_score = (i, j), score
    return grid.cell_center_px(*best)


def _show_cells(viewer, layer, centre_px, n_cells, grid):
    """Point the camera at level-0 ``centre_px`` with about ``n_cells`` cells across."""
    mpp = float(layer.scale[-1])
    camera_of(viewer).center = ((centre_px[0] - 0.5) * mpp, (centre_px[1] - 0.5) * mpp)
    width_um = n_cells * grid.stride_px * mpp
    camera_of(viewer).zoom = float(min(viewer.canvas.size)) / width_um


def test_live_view_predicts_exactly_the_visible_tissue(env, predictor, qtbot):
    viewer, widget, layer = env
    gene = _gene(predictor)
    widget.set_genes([gene])
    widget.set_live(True)
    session = widget.session
    grid, tissue = session.grid, session.tissue
    assert 0 < tissue.sum() < tissue.size, "the CMU slide has tissue and background"

    _show_cells(viewer, layer, _border_view(grid, tissue), 5, grid)
    qtbot.waitUntil(widget.view_complete, timeout=WAIT_MS)

    # exactly the visible tissue cells (+ margin) were predicted, nothing else
    expected = _expected_cells(viewer, layer, grid, tissue)
    done = session.store.done_mask()
    assert expected.sum() >= 4
    assert (expected & ~tissue).sum() == 0
    np.testing.assert_array_equal(done, expected)
    # ... and all of it lies in what napari itself loaded for the view (the slide layer's
    # corner pixels, computed by vispy and rounded out to tiles), plus the margin
    ds = layer.downsample_factors[layer.data_level][-2:]
    (r0, c0), (r1, c1) = np.asarray(layer.corner_pixels)[:, -2:] * ds
    loaded = grid.cells_in_view(r0, c0, r1 + ds[0], c1 + ds[1], units="px", margin=MARGIN)
    allowed = np.zeros(grid.shape, bool)
    allowed[loaded[:, 0], loaded[:, 1]] = True
    assert not (done & ~allowed).any()

    # the heatmap shows exactly the predicted cells
    hm = widget.heatmaps.layers[gene]
    assert hm.name == f"{gene} (predicted)"
    np.testing.assert_array_equal(~np.isnan(np.asarray(hm.data)), done)
    meta = hm.metadata["stpredict"]
    assert meta["kind"] == "heatmap" and meta["gene"] == gene
    assert Path(meta["store"]) == session.store.path
    assert meta["slide_layer"] == layer.name and Path(meta["slide_path"]) == session.slide.path
    assert meta["grid"] == grid.to_dict()
    # the session's tissue tiles travel with the layers (the Export dock's "partial" test)
    np.testing.assert_array_equal(meta["tissue"], session.tissue)
    # contrast limits come from the training data, not from the (partial) map
    g = predictor.genes.index(gene)
    p01, p99 = predictor.gene_stats["p01"][g], predictor.gene_stats["p99"][g]
    if p99 > p01:
        np.testing.assert_allclose(hm.contrast_limits, (p01, p99), rtol=1e-5)

    # registration: the layer value at a cell centre (world µm, computed here from the µm grid
    # definition) is the Predictor's output on that cell's crop
    mpp = float(layer.scale[-1])
    cells = np.argwhere(done)[:3]
    rows = []
    for i, j in cells:
        y0, x0 = i * grid.stride_um / mpp, j * grid.stride_um / mpp
        side = grid.patch_um / mpp
        crop = session.slide.read_resampled(
            y0, x0, side, side, out_shape=(predictor.patch_px, predictor.patch_px)
        )
        rows.append(crop)
        centre_world = np.array([y0 + side / 2 - 0.5, x0 + side / 2 - 0.5]) * mpp
        value = hm.get_value(centre_world, world=True)
        expect = predictor.predict(crop[None])[0, g]
        np.testing.assert_allclose(value, expect, rtol=1e-4, atol=1e-4)
        # a point 0.45 stride away is still this cell; 0.55 stride away is the next one
        near = centre_world + np.array([0.45, 0.0]) * grid.stride_um
        far = centre_world + np.array([0.55, 0.0]) * grid.stride_um
        assert hm.get_value(near, world=True) == pytest.approx(value)
        if i + 1 < grid.shape[0] and done[i + 1, j]:
            assert hm.get_value(far, world=True) == pytest.approx(hm.data[i + 1, j])

    # the status bar shows the heatmap value under the cursor
    status = hm.get_status(centre_world, world=True)
    assert status["layer_name"] == hm.name
    shown_value = float(status["coordinates"].rsplit(":", 1)[1])
    assert shown_value == pytest.approx(float(value), rel=0.01, abs=0.01)

    ARTIFACTS.mkdir(exist_ok=True)
    shot = viewer.screenshot(path=str(ARTIFACTS / "predict_widget_heatmap.png"), canvas_only=True)
    assert shot.shape[0] > 100 and shot.shape[1] > 100

    # a second visit costs no model call; so does adding a gene on predicted cells
    calls = session.engine.stats.model_calls
    centre = np.asarray(camera_of(viewer).center)[-2:]
    zoom = camera_of(viewer).zoom
    undone = np.argwhere(tissue & ~session.store.done_mask())
    far_cell = undone[np.argmax(((grid.cell_centers_px(undone) * mpp - centre) ** 2).sum(1))]
    _show_cells(viewer, layer, grid.cell_center_px(*far_cell), 3, grid)
    qtbot.waitUntil(widget.view_complete, timeout=WAIT_MS)
    calls_away = session.engine.stats.model_calls
    assert calls_away > calls, "the new region needed predictions"
    camera_of(viewer).center = tuple(centre)
    camera_of(viewer).zoom = zoom
    qtbot.wait(400)  # longer than the debounce
    qtbot.waitUntil(widget.view_complete, timeout=WAIT_MS)
    assert session.engine.stats.model_calls == calls_away
    other = next(x for x in predictor.genes if x != gene)
    widget.set_genes([gene, other])
    qtbot.waitUntil(widget.view_complete, timeout=WAIT_MS)
    assert session.engine.stats.model_calls == calls_away
    done = session.store.done_mask()
    data = np.asarray(widget.heatmaps.layers[other].data)
    np.testing.assert_array_equal(~np.isnan(data), done)
    np.testing.assert_allclose(data[done], session.store.read(other)[done])


def test_event_loop_stays_responsive_while_predicting(env, qtbot):
    """The GUI thread never works more than 100 ms at a stretch while a prediction runs.

    A 10 ms QTimer ticks on the event loop; between two ticks the loop was busy. The busy time
    is measured as the GUI thread's CPU time (``time.thread_time``), which, unlike wall time,
    does not grow when other processes share the CPU; the wall-clock gaps are reported by
    ``benchmarks/bench_view_latency.py``.
    """
    from qtpy.QtCore import QTimer

    viewer, widget, layer = env
    widget.set_genes([_gene(widget.predictor)])
    session = widget.session
    session.engine.batch_size = 8
    ticks: list[tuple[float, float]] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append((time.perf_counter(), time.thread_time())))
    window: dict[str, float] = {}
    widget.scheduler.job_started.connect(lambda *a: window.setdefault("start", time.perf_counter()))
    widget.scheduler.job_finished.connect(lambda *a: window.setdefault("end", time.perf_counter()))
    timer.start()
    try:
        widget.set_live(True)
        _show_cells(viewer, layer, _border_view(session.grid, session.tissue, 3), 8, session.grid)
        qtbot.waitUntil(lambda: "end" in window, timeout=WAIT_MS)
        qtbot.wait(50)
    finally:
        timer.stop()
    assert session.engine.stats.batches >= 3, "several batches ran while the loop was measured"
    busy = np.array([c for w, c in ticks if window["start"] <= w <= window["end"] + 0.05])
    assert len(busy) > 10, "the event loop ticked while predicting"
    longest = np.diff(busy).max()
    assert longest < 0.100, f"the GUI thread worked {longest * 1000:.0f} ms without a break"


def test_whole_slide_cancel_stops_within_one_batch(env, qtbot):
    _viewer, widget, _layer = env
    widget.set_genes([_gene(widget.predictor)])
    session = widget.session
    engine = session.engine
    engine.batch_size = 4
    n_tissue = int(session.tissue.sum())
    assert n_tissue > 20
    queued = widget.predict_whole_slide()
    assert queued == n_tissue
    assert widget.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: engine.stats.batches >= 1, timeout=WAIT_MS)
    widget.cancel()
    calls_at_cancel = engine.stats.model_calls
    qtbot.waitUntil(lambda: widget.scheduler.job is None, timeout=WAIT_MS)
    assert engine.stats.model_calls - calls_at_cancel <= 1
    done = session.store.done_mask()
    assert 0 < done.sum() < n_tissue
    qtbot.wait(300)  # a slide-layer refresh after cancel must not restart the work
    assert widget.scheduler.job is None
    hm = widget.heatmaps.layers[widget.genes[0]]
    np.testing.assert_array_equal(~np.isnan(np.asarray(hm.data)), done)
    assert widget.status_label.text() == "cancelled"
    # the progress bar counted cells of the whole-slide job
    assert widget.progress_bar.maximum() == n_tissue


def test_switching_slides_drops_late_results(env, mob_dir, qtbot):
    viewer, widget, layer_a = env
    gene = _gene(widget.predictor)
    widget.set_genes([gene])
    session_a = widget.session
    session_a.engine.batch_size = 4
    layer_b = _open_layer(viewer, mob_dir / "MOB1.jpg")  # a real image without µm/px
    widget.set_slide_layer(layer_a)
    assert widget.session is session_a

    switched = {}

    def switch(*_):
        if not switched:
            switched["at"] = session_a.engine.stats.batches
            widget.set_slide_layer(layer_b)

    widget.scheduler.batch_landed.connect(switch)
    widget.predict_whole_slide()
    qtbot.waitUntil(
        lambda: widget.session is not None and widget.session is not session_a, timeout=WAIT_MS
    )
    qtbot.waitUntil(lambda: widget.scheduler.job is None, timeout=WAIT_MS)
    assert switched
    assert widget.scheduler.dropped_batches >= 1, (
        "the late batch of slide A arrived and was dropped"
    )
    assert session_a.engine.stats.batches <= switched["at"] + 1
    assert session_a.retired and session_a.engine._closed
    # A's heatmaps are gone; B's show only B's predictions
    assert all(
        lyr.metadata.get("stpredict", {}).get("slide_layer") != layer_a.name
        for lyr in viewer.layers
    )
    session_b = widget.session
    assert session_b.slide_layer is layer_b
    assert session_b.grid.mpp_assumed
    assert not widget.slide_warning.isHidden() and "µm/px" in widget.slide_warning.text()
    widget.set_live(True)
    viewer.reset_view()
    qtbot.waitUntil(widget.view_complete, timeout=WAIT_MS)
    hm = widget.heatmaps.layers[gene]
    assert hm.metadata["stpredict"]["slide_layer"] == layer_b.name
    assert hm.data.shape == session_b.grid.shape
    np.testing.assert_array_equal(~np.isnan(np.asarray(hm.data)), session_b.store.done_mask())
    # the pixel-unit slide gets pixel-unit heatmaps over it
    assert tuple(hm.scale) == pytest.approx((session_b.grid.stride_px,) * 2)


def test_slide_layer_removed_while_predicting(env, qtbot):
    viewer, widget, layer = env
    widget.set_genes([_gene(widget.predictor)])
    session = widget.session
    session.engine.batch_size = 4
    widget.predict_whole_slide()
    qtbot.waitUntil(lambda: session.engine.stats.batches >= 1, timeout=WAIT_MS)
    job = widget.scheduler.job
    viewer.layers.remove(layer)
    assert widget.session is None and widget.heatmaps is None
    qtbot.waitUntil(job.ended.is_set, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: widget.scheduler.job is None, timeout=WAIT_MS)
    assert session.engine._closed
    assert widget.status_label.text() == "slide layer removed"
    qtbot.waitUntil(lambda: all("stpredict" not in lyr.metadata for lyr in viewer.layers))
    # the viewer is still usable
    viewer.add_image(np.zeros((8, 8), np.float32), name="still alive")
    camera_of(viewer).zoom *= 2
    qtbot.wait(300)
    assert widget.scheduler.job is None


def test_bad_model_files_are_refused(make_napari_viewer, tmp_path, cmu_path, qtbot):
    from napari_stpredict.widgets.predict import PredictWidget

    viewer = make_napari_viewer()
    _open_layer(viewer, cmu_path)
    widget = PredictWidget(viewer, cache_dir=tmp_path / "cache")
    junk = tmp_path / "not_a_model.safetensors"
    junk.write_bytes(b"\x00\x01 this is not a safetensors file" * 10)
    for path in (junk, tmp_path / "missing.safetensors"):
        widget.load_model(path)
        qtbot.waitUntil(lambda: widget.model_info.text().startswith("✗"), timeout=WAIT_MS)
        assert widget.predictor is None and widget.session is None
        assert path.name in widget.model_info.text()
        assert "\n" not in widget.model_info.text()
    assert widget.close_workers(wait_s=30)


def test_presets_come_from_the_model(env):
    from napari_stpredict.evaluation.markers import PAM50
    from napari_stpredict.widgets.predict import PRESET_HEG, PRESET_PAM50, preset_genes

    _viewer, widget, _layer = env
    p = widget.predictor
    heg = preset_genes(PRESET_HEG, p.genes, p.gene_stats)
    mean = np.asarray(p.gene_stats["mean"])
    assert heg[0] == p.genes[int(np.argmax(mean))]
    assert all(mean[p.genes.index(g)] >= mean[p.genes.index(heg[-1])] for g in heg)
    pam50 = preset_genes(PRESET_PAM50, p.genes, p.gene_stats)
    assert set(pam50) == {g for g in p.genes if g.upper() in set(PAM50)}
    index = widget.preset_combo.findText(PRESET_HEG)
    widget._on_preset(index)
    assert widget.genes == heg
    assert set(widget.heatmaps.layers) == set(heg)
    assert sum(layer.visible for layer in widget.heatmaps.layers.values()) == 1


def test_closing_the_viewer_mid_prediction_leaves_no_thread(env, qtbot):
    viewer, widget, _layer = env
    session = widget.session
    session.engine.batch_size = 4
    widget.predict_whole_slide()
    qtbot.waitUntil(lambda: session.engine.stats.batches >= 1, timeout=WAIT_MS)
    job = widget.scheduler.job
    viewer.close()
    qtbot.waitUntil(job.ended.is_set, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: session.engine._closed, timeout=WAIT_MS)

    # the engine's reader pool and store writer threads are gone too (the slide backend's
    # process-wide decode pool, "stpredict-tiff", is shared by all slides and stays)
    def ours():
        names = [t.name for t in threading.enumerate()]
        return [n for n in names if n.startswith(("stpredict-read", "stpredict-store-writer"))]

    try:
        qtbot.waitUntil(lambda: not ours(), timeout=WAIT_MS)
    except Exception:
        raise AssertionError(f"threads left: {ours()}") from None
