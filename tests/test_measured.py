"""Measured vs predicted (issue 12.4): the core module and the dock, on real HER2ST C3."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from napari_stpredict.errors import DatasetError
from napari_stpredict.st.measured import compare, load_measured, spot_cells
from napari_stpredict.widgets._common import camera_of

GENE = "ERBB2"


@pytest.fixture(scope="module")
def c3_spot_store(tmp_path_factory, her2st_dir: Path, tiny_model_file, her2st_mpp):
    """HER2ST C3 with the tiles under about two thirds of its spots predicted by the tiny model."""
    from napari_stpredict.inference.engine import Engine
    from napari_stpredict.inference.grid import TileGrid
    from napari_stpredict.inference.store import PredictionStore
    from napari_stpredict.model import Predictor
    from napari_stpredict.slide import open_slide

    sel = pd.read_csv(her2st_dir / "spots" / "C3_selection.tsv", sep="\t")
    slide = open_slide(her2st_dir / "images" / "C3.jpg", mpp=her2st_mpp("C3"))
    predictor = Predictor(tiny_model_file, device="cpu")
    grid = TileGrid.for_slide(slide, predictor)
    store = PredictionStore.for_slide(
        slide, predictor, grid, cache_dir=tmp_path_factory.mktemp("measured_store")
    )
    cells = spot_cells(grid, sel[["pixel_x", "pixel_y"]].to_numpy())
    cells = np.unique(cells[sel["pixel_y"].to_numpy() < np.percentile(sel["pixel_y"], 67)], axis=0)
    engine = Engine(slide, predictor, grid, store)
    try:
        for _ in engine.run(cells):
            pass
    finally:
        engine.close()
    yield slide, store, Path(tiny_model_file)
    slide.close()


def test_measured_is_normalised_like_the_model(
    benchmarks_data_dir: Path, her2st_dir: Path, tiny_model_file
) -> None:
    from napari_stpredict.model.header import read_model_header

    meta = read_model_header(tiny_model_file)
    m = load_measured(
        benchmarks_data_dir / "her2st.yaml", section="C3", model=tiny_model_file,
        slide_shape=(9911, 9911),
    )  # fmt: skip
    assert m.n_spots == 180 and m.has(GENE) and m.normalization == meta["normalization"]
    # independent check on the raw table: log1p(count / library size over ALL genes × 1e4)
    with gzip.open(her2st_dir / "counts" / "C3.tsv.gz", "rt") as fh:
        raw = pd.read_csv(fh, sep="\t", index_col=0)
    spot = m.spot_ids[7]
    expect = np.log1p(
        raw.loc[spot, GENE] / raw.loc[spot].sum() * meta["normalization"]["target_sum"]
    )
    assert m.gene(GENE)[7] == pytest.approx(expect, rel=1e-5)
    # spot centres are the selection table's pixel columns (the slide's level-0 pixels)
    sel = pd.read_csv(her2st_dir / "spots" / "C3_selection.tsv", sep="\t")
    sel.index = [f"{x}x{y}" for x, y in zip(sel["x"], sel["y"], strict=True)]
    assert np.allclose(m.xy[7], sel.loc[spot, ["pixel_x", "pixel_y"]].to_numpy(float))
    # restricting genes keeps library sizes over all genes
    sub = load_measured(benchmarks_data_dir / "her2st.yaml", section="C3", genes=[GENE, "GRB7"])
    assert sub.genes == [GENE, "GRB7"] or sorted(sub.genes) == sorted([GENE, "GRB7"])
    assert np.allclose(sub.gene(GENE), m.gene(GENE))


def test_pearson_at_the_spots_matches_an_independent_computation(
    c3_spot_store, benchmarks_data_dir: Path
) -> None:
    slide, store, model = c3_spot_store
    m = load_measured(
        benchmarks_data_dir / "her2st.yaml", section="C3", model=model, genes=store.genes,
        slide_shape=slide.shape,
    )  # fmt: skip
    c = compare(m, store)
    assert GENE in c.genes and 60 < c.n_spots < 180  # about two thirds predicted
    # independently: the heatmap pixel under each spot (TileGrid.cell_at), read from the store
    heat = store.read(GENE)
    pred = []
    for x, y in m.xy:
        i, j = store.grid.cell_at(y, x)
        pred.append(heat[i, j])
    pred = np.asarray(pred)
    ok = np.isfinite(pred)
    assert ok.sum() == c.n_spots
    assert np.allclose(c.predicted[:, c.index(GENE)][ok], pred[ok])
    r = np.corrcoef(m.gene(GENE)[ok], pred[ok])[0, 1]
    assert c.r[GENE] == pytest.approx(r, abs=1e-5)
    assert len(c.missing_cells()) > 10  # the tiles under the rest of the spots
    with pytest.raises(DatasetError, match="not both measured and predicted"):
        c.index("NOT_A_GENE")


def test_bad_inputs_are_refused_in_one_line(
    tmp_path: Path, benchmarks_data_dir: Path, shared_data: Path, c3_spot_store
) -> None:
    _, store, _ = c3_spot_store
    with pytest.raises(DatasetError, match="no such file"):
        load_measured(tmp_path / "nothing.h5ad")
    with pytest.raises(DatasetError, match="name the section"):
        load_measured(benchmarks_data_dir / "her2st.yaml")
    with pytest.raises(DatasetError, match="not a Space Ranger outs folder"):
        load_measured(tmp_path)
    with pytest.raises(DatasetError, match="spots lie outside the slide"):
        load_measured(benchmarks_data_dir / "her2st.yaml", section="C3", slide_shape=(500, 500))
    # Space Ranger outs: reads, but shares no gene with a breast-cancer panel? then one line
    vis = load_measured(shared_data / "visium_tiny")
    assert vis.n_spots == 100 and vis.values.shape == (100, len(vis.genes))
    if not set(vis.genes) & set(store.genes):
        with pytest.raises(DatasetError, match="no gene is both measured and predicted"):
            compare(vis, store)


def test_dock_loads_spots_shows_r_and_flips(
    make_napari_viewer, qtbot, c3_spot_store, benchmarks_data_dir: Path
) -> None:
    from napari_stpredict.inference.grid import layer_placement
    from napari_stpredict.widgets.measured import MeasuredWidget, spot_colours

    slide, store, model = c3_spot_store
    viewer = make_napari_viewer(show=True)  # shown: canvas screenshots need a realised canvas
    viewer.add_image(
        slide.levels, multiscale=True, rgb=True, scale=slide.layer_scale, name="C3",
        contrast_limits=(0, 255),
    )  # fmt: skip
    from napari_stpredict.model import Predictor
    from napari_stpredict.widgets._heatmaps import contrast_limits, model_gene_stats

    scale, translate = layer_placement(store.grid, slide_scale=slide.layer_scale)
    pred = Predictor(model, device="cpu")  # the dock's limits: the model's training p01–p99
    lo, hi = contrast_limits(model_gene_stats(pred), pred.genes.index(GENE), GENE)
    heat = viewer.add_image(
        store.read(GENE), scale=scale, translate=translate, colormap="inferno",
        contrast_limits=(lo, hi), opacity=0.65, name=f"{GENE} (predicted)",
        metadata={"stpredict": {
            "kind": "heatmap", "gene": GENE, "store": str(store.path), "model": str(model),
            "slide_layer": "C3", "slide_path": str(slide.path), "grid": store.grid.to_dict(),
        }},
    )  # fmt: skip
    w = MeasuredWidget(viewer, inline=True)
    viewer.window.add_dock_widget(w, name="Measured vs predicted")
    assert w.heatmap_combo.currentText() == heat.name
    w.set_source(benchmarks_data_dir / "her2st.yaml", "C3")
    assert w.section_combo.currentText() == "C3"
    w.load()
    pts = w.points
    assert pts is not None and pts in viewer.layers and len(pts.data) == 180
    meta = pts.metadata["stpredict"]
    assert meta["kind"] == "measured" and meta["gene"] == GENE and meta["showing"] == "measured"
    c = w.comparison
    assert f"r = {c.r[GENE]:.2f}" in w.r_label.text() and f"{c.n_spots} of 180" in w.r_label.text()
    # spots sit on the slide where the table says (level-0 px → world through the slide layer)
    x, y = w.measured.xy[0]
    assert np.allclose(pts.data[0], (np.array([y, x]) - 0.5) * slide.mpp)
    # coloured by the heatmap's colormap and limits: measured, then predicted
    k = c.index(GENE)
    assert np.allclose(pts.face_color, spot_colours(c.measured[:, k], heat), atol=1e-6)
    w.flip_button.setChecked(True)
    assert pts.metadata["stpredict"]["showing"] == "predicted"
    assert np.allclose(pts.face_color, spot_colours(c.predicted[:, k], heat), atol=1e-6)
    unpredicted = np.isnan(c.predicted[:, k])
    assert unpredicted.any() and np.allclose(pts.face_color[unpredicted, 3], 0.0)  # hollow
    # the same contrast limits as the heatmap, also when the user changes them
    heat.contrast_limits = (lo, (lo + hi) / 2)
    assert np.allclose(pts.face_color, spot_colours(c.predicted[:, k], heat), atol=1e-6)
    heat.contrast_limits = (lo, hi)
    viewer.window._qt_window.resize(1500, 950)  # room for the canvas (test viewers are small)
    qtbot.wait(50)
    lo_w, hi_w = pts.data.min(axis=0), pts.data.max(axis=0)
    camera_of(viewer).center = tuple((lo_w + hi_w) / 2)
    canvas_h = viewer.window._qt_viewer.canvas.size[0]
    camera_of(viewer).zoom = canvas_h / float(np.max(hi_w - lo_w) * 1.2)
    qtbot.wait(200)
    shots = {"predicted": viewer.screenshot(canvas_only=True, flash=False)}
    # looked at: spots over the heatmap, hollow where no tile is predicted (docs/images)
    shot_dir = os.environ.get("STPREDICT_SCREENSHOT_DIR")
    w.flip_button.setChecked(False)
    assert np.allclose(pts.face_color, spot_colours(c.measured[:, k], heat), atol=1e-6)
    shots["measured"] = viewer.screenshot(canvas_only=True, flash=False)
    assert not np.array_equal(shots["measured"], shots["predicted"])  # the flip is visible
    if shot_dir:
        from PIL import Image

        both = np.concatenate([shots["measured"], shots["predicted"]], axis=1)
        Image.fromarray(both).save(Path(shot_dir) / "measured_vs_predicted.png")
        dock = viewer.screenshot(canvas_only=False, flash=False)
        Image.fromarray(dock).save(Path(shot_dir) / "measured_dock.png")
    viewer.layers.remove(pts)  # deleting the layer is fine; loading again re-adds it
    w.load()
    assert w.points in viewer.layers


def test_h5ad_gives_the_same_spots_as_the_manifest(
    tmp_path: Path, benchmarks_data_dir: Path
) -> None:
    from napari_stpredict.st import load_manifest, read_section

    adata = read_section(load_manifest(benchmarks_data_dir / "her2st.yaml").section("C3"))
    del adata.uns["stpredict"]
    adata.obs = adata.obs.drop(columns=[c for c in adata.obs.columns if c != "section"])
    path = tmp_path / "c3.h5ad"
    adata.write_h5ad(path)
    a = load_measured(path, genes=[GENE, "GRB7", "KRT8"])
    b = load_measured(
        benchmarks_data_dir / "her2st.yaml", section="C3", genes=[GENE, "GRB7", "KRT8"]
    )
    assert a.spot_ids == b.spot_ids and np.allclose(a.xy, b.xy)
    assert sorted(a.genes) == sorted(b.genes)
    for g in a.genes:
        assert np.allclose(a.gene(g), b.gene(g))
    # coordinates in another frame are scaled onto the slide
    half = load_measured(path, scale=0.5, genes=[GENE])
    assert np.allclose(half.xy, a.xy * 0.5)
