"""SpatialData from the Export dock and the npe2 writer, in a real napari viewer (xvfb-run).

The prediction store is real (HER2ST C3 predicted by the tiny model, ``real_store``); heatmap
layers come from the Predict widget's own HeatmapSet, the tumour layer from the Tumour widget.
The round trips need the optional extra (``pip install 'napari-stpredict[spatialdata]'``) and
skip without it; the "extra missing" behaviour is tested everywhere.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from napari_stpredict.export.spatialdata import have_spatialdata

pytestmark = pytest.mark.gui

needs_sd = pytest.mark.skipif(
    not have_spatialdata(),
    reason="spatialdata not installed (pip install 'napari-stpredict[spatialdata]')",
)


@pytest.fixture
def scene(c3_scene):
    """The C3 slide with ERBB2 + KRT8 heatmaps of the real store."""
    s = c3_scene()
    return s.viewer, s.store, s.slide, s.heat


def _read(path):
    import spatialdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return spatialdata.read_zarr(path)


def _centre(grid, i, j):
    y0, x0, y1, x1 = grid.cell_rect_px(int(i), int(j))
    return (y0 + y1) / 2, (x0 + x1) / 2


def _check_aligned(sd, store, slide) -> tuple[np.ndarray, np.ndarray]:
    """Tiles ↔ table ↔ store values, and a tile centre on the same slide pixel via the image.

    Returns the table's grid rows and columns.
    """
    from spatialdata.transformations import get_transformation

    tiles, table = sd.shapes["tiles"], sd.tables["predictions"]
    assert table.uns["spatialdata_attrs"]["region"] == "tiles"
    done = np.asarray(store.done[...])
    assert table.n_obs == len(tiles) == int(done.sum()) > 0
    i, j = table.obs["i"].to_numpy(), table.obs["j"].to_numpy()
    assert done[i, j].all()
    vals = np.asarray(store.values[...])
    idx = [store.genes.index(g) for g in table.var_names]
    assert list(table.var_names) == ["ERBB2", "KRT8"]  # the genes shown
    assert np.allclose(table.X, vals[idx][:, i, j].T)

    geom = tiles.loc[table.obs["instance_id"].to_numpy()].geometry
    cx, cy = geom.x.to_numpy(), geom.y.to_numpy()
    to_um = get_transformation(tiles, "global").to_affine_matrix(("x", "y"), ("x", "y"))
    um = np.stack([cx, cy, np.ones_like(cx)]).T @ to_um.T
    yc, xc = np.array([_centre(store.grid, a, b) for a, b in zip(i, j, strict=True)]).T
    assert np.allclose(um[:, 0], xc * slide.mpp) and np.allclose(um[:, 1], yc * slide.mpp)
    if "slide" in sd.images:
        image = sd.images["slide"]
        img_to_um = get_transformation(image, "global").to_affine_matrix(("x", "y"), ("x", "y"))
        px = um @ np.linalg.inv(img_to_um).T
        scale0 = image["scale0"]["image"] if hasattr(image, "children") else image
        ds_x = slide.shape[1] / scale0.shape[2]
        ds_y = slide.shape[0] / scale0.shape[1]
        assert ds_x * slide.mpp <= 2.0 * 1.001  # the "auto" copy is at most 2 µm/px
        col, row = np.floor(px[:, 0]).astype(int), np.floor(px[:, 1]).astype(int)
        assert (col == np.floor(xc / ds_x).astype(int)).all()
        assert (row == np.floor(yc / ds_y).astype(int)).all()
    return i, j


@needs_sd
def test_export_dock_writes_spatialdata(scene, qtbot, tmp_path):
    import shapely

    from napari_stpredict.widgets.export import ExportWidget
    from napari_stpredict.widgets.tumor import TumorWidget

    viewer, store, slide, _heat = scene
    tw = TumorWidget(viewer)
    tw.set_source(str(store.path))
    tw.compute(background=False)
    layer = tw.layer
    assert layer is not None
    # a brush edit: one predicted, non-tumour cell painted as tumour must reach the export
    done = np.asarray(store.done[...])
    free = np.argwhere(done & (np.asarray(layer.data) == 0))
    assert len(free)
    bi, bj = free[0]
    data = np.asarray(layer.data).copy()
    data[bi, bj] = 1
    layer.data = data

    ew = ExportWidget(viewer)
    viewer.window.add_dock_widget(ew, name="Export", area="right")
    assert ew.sd_extra_label.isHidden()  # the extra is installed: nothing to say
    ew.set_source(str(store.path))
    ew.set_folder(tmp_path)
    ew.name_edit.setText("c3")
    ew.set_kinds(["spatialdata", "geojson"])
    assert ew.sd_image_combo.isEnabled()
    ew.export()  # worker thread, like the other exports
    qtbot.waitUntil(lambda: not ew.busy, timeout=180_000)
    text = ew.report.toPlainText()
    assert "error" not in text, text
    dst = tmp_path / "c3_spatialdata.zarr"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([dst.name, "c3_tumor.geojson"])
    assert f"wrote {dst}" in text

    sd = _read(dst)
    assert set(sd.images) == {"slide"}
    i, j = _check_aligned(sd, store, slide)
    table = sd.tables["predictions"]
    mask = np.asarray(layer.data) > 0
    assert (table.obs["tumor"].to_numpy() == mask[i, j]).all()
    k = int(np.flatnonzero((i == bi) & (j == bj))[0])
    assert bool(table.obs["tumor"].iloc[k])  # the brush edit is in
    tiles = sd.shapes["tiles"].loc[table.obs["instance_id"].to_numpy()]
    union = shapely.union_all(sd.shapes["tumor_regions"].geometry.to_numpy())
    inside = shapely.contains_xy(union, tiles.geometry.x.to_numpy(), tiles.geometry.y.to_numpy())
    assert (inside == mask[i, j]).all() and inside.any()
    assert table.uns["stpredict"]["model_name"].endswith(".safetensors")

    # no slide image, replacing the first store
    ew.set_kinds(["spatialdata"])
    ew.set_spatialdata_image(None)
    ew.overwrite_check.setChecked(True)
    ew.export()
    qtbot.waitUntil(lambda: not ew.busy, timeout=120_000)
    assert "error" not in ew.report.toPlainText(), ew.report.toPlainText()
    sd = _read(dst)
    assert len(sd.images) == 0 and len(sd.shapes["tiles"]) == sd.tables["predictions"].n_obs


@needs_sd
def test_npe2_spatialdata_writer(scene, qtbot, tmp_path):
    from napari_stpredict._writer import write_spatialdata
    from napari_stpredict.errors import StPredictError

    viewer, store, slide, heat = scene
    # through napari's own save machinery: npe2 picks our writer by the .zarr extension
    viewer.layers.selection = {heat.layers["ERBB2"], heat.layers["KRT8"]}
    out = tmp_path / "sel.zarr"
    viewer.layers.save(str(out), selected=True, plugin="napari-stpredict")
    sd = _read(out)
    assert set(sd.images) == {"slide"}
    _check_aligned(sd, store, slide)
    with pytest.raises(StPredictError, match="select at least one heatmap"):
        write_spatialdata(str(tmp_path / "x.zarr"), [])
    slide_layer = viewer.layers["C3"]
    with pytest.raises(StPredictError, match="not a napari-stpredict heatmap layer"):
        write_spatialdata(str(tmp_path / "y.zarr"), [slide_layer.as_layer_data_tuple()])
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "y.zarr").exists()


def test_without_the_extra_dock_and_writer_say_what_to_install(scene, qtbot, tmp_path, monkeypatch):
    from napari_stpredict._writer import write_spatialdata
    from napari_stpredict.errors import StPredictError
    from napari_stpredict.export import spatialdata as sd_export
    from napari_stpredict.widgets.export import ExportWidget

    monkeypatch.setattr(sd_export, "have_spatialdata", lambda: False)
    viewer, store, _slide, heat = scene
    hint = "pip install 'napari-stpredict[spatialdata]'"
    ew = ExportWidget(viewer)
    viewer.window.add_dock_widget(ew, name="Export", area="right")
    assert not ew.sd_extra_label.isHidden() and hint in ew.sd_extra_label.text()
    ew.set_source(str(store.path))
    ew.set_folder(tmp_path)
    ew.set_kinds(["spatialdata", "csv"])
    ew.export()
    qtbot.waitUntil(lambda: not ew.busy, timeout=60_000)
    text = ew.report.toPlainText()
    assert text.startswith("error: ") and hint in text and "\n" not in text
    assert list(tmp_path.iterdir()) == []  # refused before any work
    tuples = [heat.layers[g].as_layer_data_tuple() for g in ("ERBB2", "KRT8")]
    with pytest.raises(StPredictError, match=r"napari-stpredict\[spatialdata\]"):
        write_spatialdata(str(tmp_path / "w.zarr"), tuples)
    assert list(tmp_path.iterdir()) == []
