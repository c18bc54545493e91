"""Tumour and Export widgets and the npe2 writers in a real napari viewer (run under xvfb-run).

The prediction store is real (HER2ST C3 predicted by the tiny model, ``real_store``); heatmap
layers are made with the Predict widget's own HeatmapSet so they carry the documented metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gui

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


@pytest.fixture
def scene(c3_scene):
    """The C3 slide with ERBB2 (shown) and KRT8 (hidden) heatmaps of the real store; the
    predicted block travels as the session's tissue, as the Predict dock passes it, so an
    export of it is complete, not "partial"."""
    s = c3_scene(size=(1500, 950), hidden=("KRT8",), tissue=True)
    return s.viewer, s.store, s.model_path, s.heat


def test_slider_changes_labels_without_model_call(
    scene, qtbot, monkeypatch, tmp_path, look_at_predictions
):
    from napari_stpredict.model.predictor import Predictor
    from napari_stpredict.tumor import otsu_threshold
    from napari_stpredict.widgets import tumor as tumor_widget
    from napari_stpredict.widgets.export import ExportWidget
    from napari_stpredict.widgets.tumor import TumorWidget

    viewer, store, _model_path, heat = scene
    calls = {"predict": 0, "score": 0}
    real_predict, real_score = Predictor.predict, tumor_widget.score_store

    def counting_predict(self, patches):
        calls["predict"] += 1
        return real_predict(self, patches)

    def counting_score(*args, **kwargs):
        calls["score"] += 1
        return real_score(*args, **kwargs)

    monkeypatch.setattr(Predictor, "predict", counting_predict)
    monkeypatch.setattr(tumor_widget, "score_store", counting_score)

    tw = TumorWidget(viewer)
    viewer.window.add_dock_widget(tw, name="Tumour localization", area="right")
    tw.set_source(str(store.path))
    tw.set_gene_set(None)  # the default signature; genes the model lacks are reported
    tw.compute()
    qtbot.waitUntil(lambda: tw.layer is not None, timeout=60_000)
    layer = tw.layer
    genes = list(tw.score.genes)
    assert calls["score"] == 1 and "ERBB2" in genes
    assert ("not in the model" in tw.genes_info.text()) == bool(tw.score.missing)
    # registered like the heatmaps and described for the other widgets
    ref = heat.layers["ERBB2"]
    np.testing.assert_allclose(layer.scale[-2:], ref.scale[-2:])
    np.testing.assert_allclose(layer.translate[-2:], ref.translate[-2:])
    meta = layer.metadata["stpredict"]
    assert meta["kind"] == "tumor" and meta["genes"] == genes and meta["store"] == str(store.path)
    assert tw.threshold == pytest.approx(otsu_threshold(tw.score.score), abs=1e-6)
    assert "mm²" in tw.readout.text()

    counts = []
    for step in (50, 500, 950):
        tw.slider.setValue(step)
        counts.append(int((layer.data == 1).sum()))
        assert layer.metadata["stpredict"]["threshold"] == pytest.approx(tw.threshold)
    assert counts[0] > counts[1] > counts[2]  # a higher threshold marks fewer cells
    assert calls == {"predict": 0, "score": 1}  # no model call, no store read: the kept score
    tw.set_min_size(2)
    tw.set_smoothing(0.5)
    tw.auto_button.click()
    assert calls == {"predict": 0, "score": 1}
    assert 0 < int(layer.data.sum()) < int(tw.score.predicted.sum())
    ARTIFACTS.mkdir(exist_ok=True)
    look_at_predictions(viewer, store, qtbot)
    viewer.window.screenshot(str(ARTIFACTS / "tumor_widget.png"), canvas_only=False)
    assert (ARTIFACTS / "tumor_widget.png").stat().st_size > 10_000

    # the Export widget finds store, grid and tumour mask through the layers
    ew = ExportWidget(viewer)
    viewer.window.add_dock_widget(ew, name="Export", area="right", tabify=True)
    ew.set_source(str(store.path))
    ew.set_folder(tmp_path)
    ew.name_edit.setText("c3")
    ew.set_kinds(["ome-tiff", "geojson", "h5ad", "csv", "png"])
    ew.export()
    qtbot.waitUntil(lambda: not ew.busy, timeout=120_000)
    text = ew.report.toPlainText()
    assert "error" not in text, text
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(
        ["c3_heatmaps.ome.tif", "c3_tumor.geojson", "c3.h5ad", "c3.csv", "c3_ERBB2.png"]
    )
    assert all(f"wrote {tmp_path / n}" in text for n in written)
    # every tissue tile is predicted: no export says "partial" (tiles off the tissue don't count)
    assert not any(r.partial for r in ew.results) and "partial" not in text, text
    doc = json.loads((tmp_path / "c3_tumor.geojson").read_text())
    assert len(doc["features"]) >= 1

    ARTIFACTS.mkdir(exist_ok=True)
    look_at_predictions(viewer, store, qtbot)
    viewer.window.screenshot(str(ARTIFACTS / "export_widget.png"), canvas_only=False)
    assert (ARTIFACTS / "export_widget.png").stat().st_size > 10_000

    # a second export without "overwrite" refuses and says so
    ew.export()
    qtbot.waitUntil(lambda: not ew.busy, timeout=60_000)
    assert "already exists" in ew.report.toPlainText()
    # one tissue tile not predicted: the export is "partial", counting tissue tiles only
    tissue = np.asarray(store.done_mask(), bool)
    tissue[tuple(np.argwhere(~tissue)[0])] = True
    for lyr in heat.layers.values():
        lyr.metadata["stpredict"]["tissue"] = tissue
    ew.overwrite_check.setChecked(True)
    ew.set_kinds(["csv"])
    ew.export()
    qtbot.waitUntil(lambda: not ew.busy, timeout=60_000)
    (res,) = ew.results
    assert res.partial and (res.n_missing, res.n_expected) == (1, int(tissue.sum()))
    assert f"partial: 1 of {int(tissue.sum())} tissue tiles" in ew.report.toPlainText()
    # bad input: one-line message in the widget, the layer stays as it was
    before = layer.data.copy()
    tw.set_gene_set("NOT_A_GENE")
    tw.compute(background=False)
    assert "not among the model" in tw.readout.text()
    np.testing.assert_array_equal(layer.data, before)
    tw.set_gene_set("")
    tw.compute(background=False)
    assert "empty" in tw.readout.text()


def test_npe2_writers_use_layer_metadata(scene, qtbot, tmp_path):
    import tifffile

    from napari_stpredict._writer import write_heatmaps_ome_tiff, write_tumor_geojson
    from napari_stpredict.errors import StPredictError
    from napari_stpredict.widgets.tumor import TumorWidget

    viewer, store, _model_path, heat = scene
    tw = TumorWidget(viewer)
    tw.set_source(str(store.path))
    tw.compute(background=False)
    layer = tw.layer
    # through napari's own save machinery (npe2 picks our writer by extension)
    viewer.layers.selection = {layer}
    out = tmp_path / "tumor.geojson"
    viewer.layers.save(str(out), selected=True, plugin="napari-stpredict")
    doc = json.loads(out.read_text())
    assert doc["type"] == "FeatureCollection"
    assert (
        sum(f["properties"]["measurements"]["Cells"] for f in doc["features"]) == layer.data.sum()
    )
    assert all(f["properties"]["classification"]["name"] == "Tumor" for f in doc["features"])

    heat_layers = [heat.layers[g] for g in heat.genes]
    (path,) = write_heatmaps_ome_tiff(
        str(tmp_path / "h.ome.tif"), [lyr.as_layer_data_tuple() for lyr in heat_layers]
    )
    with tifffile.TiffFile(path) as tif:
        assert tif.series[0].shape[0] == 2 and tif.series[0].axes == "CYX"
    with pytest.raises(StPredictError, match="not a napari-stpredict tumour layer"):
        slide_layer = viewer.layers["C3"]
        write_tumor_geojson(
            str(tmp_path / "x.geojson"),
            np.zeros((2, 2)),
            {"name": slide_layer.name, "metadata": {}},
        )
