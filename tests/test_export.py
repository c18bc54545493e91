"""Exports: QuPath GeoJSON, OME-TIFF, h5ad, CSV, PNG figure; overwrite and bad-target rules."""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_stpredict.errors import StPredictError
from napari_stpredict.export import (
    ExportError,
    export_csv,
    export_figure,
    export_h5ad,
    export_heatmaps_ome_tiff,
    export_predictions,
    export_tumor_geojson,
    export_tumor_mask_ome_tiff,
)
from napari_stpredict.inference.grid import TileGrid
from napari_stpredict.inference.store import PredictionStore
from napari_stpredict.tumor import GridGeometry, score_store, threshold_score

GENES = ["ERBB2", "KRT19", "EPCAM", "KRT8", "KRT18", "CDH1", "COL1A1"]
STATS = {"mean": np.full(len(GENES), 0.8), "std": np.full(len(GENES), 0.5)}


@pytest.fixture
def store(tmp_path) -> PredictionStore:
    """A 15 × 21 grid (100 µm cells at 0.5 µm/px) with a bright blob; the last 3 columns unpredicted."""
    grid = TileGrid((3000, 4100), 0.5, patch_um=100, patch_px=32)
    st = PredictionStore.open(tmp_path / "cache", key="synthetic", genes=GENES, grid=grid)
    gh, gw = grid.shape
    ii, jj = np.mgrid[:gh, :gw]
    cells = np.stack([ii.ravel(), jj.ravel()], axis=1)
    blob = np.exp(-((ii - 7) ** 2 + (jj - 9) ** 2) / 12.0).ravel()
    rng = np.random.default_rng(0)
    values = rng.random((len(cells), len(GENES))) * 0.3 + blob[:, None] * 2.0
    keep = cells[:, 1] < gw - 3
    st.write(cells[keep], values[keep])
    return st


@pytest.fixture
def tmap(store):
    return threshold_score(score_store(store, gene_stats=STATS), threshold="otsu")


def _ome_channels(path: Path) -> tuple[list[str], float | None]:
    with tifffile.TiffFile(path) as tif:
        root = ET.fromstring(tif.ome_metadata)
    ns = {"ome": root.tag.split("}")[0].strip("{")}
    pixels = root.find(".//ome:Pixels", ns)
    names = [c.get("Name") for c in pixels.findall("ome:Channel", ns)]
    phys = pixels.get("PhysicalSizeX")
    return names, float(phys) if phys else None


# ----------------------------------------------------------------------------- GeoJSON
def _check_qupath_feature_collection(doc: dict, genes: list[str]) -> None:
    assert doc["type"] == "FeatureCollection" and isinstance(doc["features"], list)
    for f in doc["features"]:
        assert f["type"] == "Feature"
        assert f["geometry"]["type"] in ("Polygon", "MultiPolygon")
        props = f["properties"]
        assert props["objectType"] == "annotation"
        cls = props["classification"]
        assert cls["name"] == "Tumor"
        assert isinstance(cls["color"], list) and len(cls["color"]) == 3
        assert all(isinstance(c, int) and 0 <= c <= 255 for c in cls["color"])
        meas = props["measurements"]
        assert isinstance(meas, dict)
        for g in genes:
            assert isinstance(meas[g], float) and np.isfinite(meas[g])
        rings = f["geometry"]["coordinates"]
        rings = rings if f["geometry"]["type"] == "Polygon" else [r for p in rings for r in p]
        for ring in rings:
            assert ring[0] == ring[-1] and len(ring) >= 4  # closed rings
            assert all(len(pt) == 2 for pt in ring)


def test_geojson_follows_qupath_conventions_and_round_trips(store, tmap, tmp_path):
    from shapely.geometry import Point, shape
    from shapely.ops import unary_union

    dst = tmp_path / "tumor.geojson"
    res = export_tumor_geojson(tmap, dst, predictions=store)
    assert res.path == dst and res.kind == "geojson" and res.extra["n_regions"] >= 1
    doc = json.loads(dst.read_text())
    _check_qupath_feature_collection(doc, GENES)
    geoms = [shape(f["geometry"]) for f in doc["features"]]
    assert all(g.is_valid for g in geoms)
    geo = GridGeometry.from_grid(store.grid)
    # area = tumour cells × cell area (no tumour cell at the slide edge here)
    assert unary_union(geoms).area == pytest.approx(tmap.mask.sum() * geo.stride_px**2)
    # level-0 px, [x, y]: every tumour cell centre inside, every other predicted cell outside
    for (i, j), inside in np.ndenumerate(tmap.mask):
        y, x = geo.centers_px(i, j)
        assert any(g.contains(Point(x, y)) for g in geoms) == inside
    # measurements = mean predicted expression over the region's cells
    region = np.argwhere(tmap.mask)
    first = np.asarray(store.values[0])[region[:, 0], region[:, 1]].mean()
    if len(doc["features"]) == 1:
        assert doc["features"][0]["properties"]["measurements"]["ERBB2"] == pytest.approx(
            first, rel=1e-5
        )


def test_geojson_of_an_empty_mask_says_so(store, tmp_path):
    res = export_tumor_geojson(
        np.zeros(store.grid.shape, bool), tmp_path / "e.geojson", predictions=store
    )
    assert json.loads(res.path.read_text())["features"] == []
    assert "no tumour region" in res.message()


# ----------------------------------------------------------------------------- OME-TIFF
def test_heatmap_ome_tiff_reopens_with_shape_mpp_and_channel_names(store, tmp_path):
    dst = tmp_path / "heat.ome.tif"
    res = export_heatmaps_ome_tiff(store, dst, genes=["KRT19", "ERBB2"], pixel_size_um=25.0)
    assert res.partial and "partial" in res.message()
    names, phys = _ome_channels(dst)
    assert names == ["KRT19", "ERBB2"] and phys == pytest.approx(25.0)
    with tifffile.TiffFile(dst) as tif:
        series = tif.series[0]
        assert series.axes == "CYX" and series.dtype == np.float32
        # same physical size as the slide (4100 × 3000 px at 0.5 µm/px = 2050 × 1500 µm)
        assert series.shape == (2, 60, 82)
        assert len(series.levels) >= 1
        data = series.asarray()
    # pixel (r, c) at 25 µm = 50 level-0 px; cell (i, j) = 200 px → 4 × 4 output pixels
    krt19 = np.asarray(store.values[1])
    np.testing.assert_allclose(data[0, 4 * 7 + 1, 4 * 9 + 2], krt19[7, 9], rtol=1e-6)
    assert np.isnan(data[0, 0, -1])  # unpredicted columns stay NaN


def test_heatmap_ome_tiff_is_a_pyramid_for_large_slides(tmp_path):
    grid = TileGrid((40000, 30000), 0.25, patch_um=50, patch_px=32)  # 200 × 150 cells
    st = PredictionStore.open(tmp_path / "c", key="big", genes=["A"], grid=grid)
    st.write(np.array([[0, 0], [199, 149]]), np.array([[1.0], [2.0]]))
    res = export_heatmaps_ome_tiff(st, tmp_path / "big.ome.tif", pixel_size_um=10.0)
    with tifffile.TiffFile(res.path) as tif:
        levels = tif.series[0].levels
        assert [lv.shape[-2:] for lv in levels][:2] == [(1000, 750), (500, 375)]
        assert max(levels[-1].shape[-2:]) <= 256
        assert tif.series[0].asarray()[..., -1, -1] == 2.0


def test_tumor_mask_ome_tiff(store, tmap, tmp_path):
    res = export_tumor_mask_ome_tiff(tmap, tmp_path / "mask.ome.tif", grid=store.grid)
    names, phys = _ome_channels(res.path)
    assert names == ["Tumor"] and phys == pytest.approx(100.0)  # one pixel per cell
    data = tifffile.imread(res.path)
    assert data.dtype == np.uint8 and set(np.unique(data)) <= {0, 1}
    np.testing.assert_array_equal(data[:15, :21], tmap.mask.astype(np.uint8)[:15, :21])


# ----------------------------------------------------------------------------- h5ad / CSV
def test_h5ad_opens_with_anndata_with_level0_coordinates(store, tmap, tmp_path):
    import anndata as ad

    res = export_h5ad(store, tmp_path / "cells.h5ad", tumor=tmap)
    a = ad.read_h5ad(res.path)
    done = np.asarray(store.done[...])
    assert a.n_obs == done.sum() == res.n_predicted and list(a.var_names) == GENES
    centers = store.grid.cell_centers_px(np.stack([a.obs["i"], a.obs["j"]], axis=1))
    np.testing.assert_allclose(a.obsm["spatial"], centers[:, ::-1])  # [x, y] level-0 px
    vals = np.asarray(store.values[...])[:, a.obs["i"], a.obs["j"]].T
    np.testing.assert_allclose(a.X, vals, rtol=1e-6)
    assert a.obs["tumor"].sum() == tmap.mask.sum()
    lib = next(iter(a.uns["spatial"]))
    assert a.uns["spatial"][lib]["scalefactors"]["spot_diameter_fullres"] == pytest.approx(200.0)
    prov = a.uns["stpredict"]
    assert prov["grid"]["mpp"] == 0.5 and bool(prov["partial"])
    assert list(prov["tumor"]["genes"])[:2] == ["ERBB2", "KRT19"]


def test_csv_has_one_row_per_predicted_cell(store, tmap, tmp_path):
    import pandas as pd

    res = export_csv(store, tmp_path / "cells.csv", genes=["ERBB2"], tumor=tmap)
    df = pd.read_csv(res.path)
    assert list(df.columns) == [
        "i",
        "j",
        "x_px",
        "y_px",
        "x_um",
        "y_um",
        "tumor_score",
        "tumor",
        "ERBB2",
    ]
    assert len(df) == np.asarray(store.done[...]).sum()
    row = df[(df.i == 7) & (df.j == 9)].iloc[0]
    assert row.x_px == 9 * 200 + 100 and row.y_um == (7 * 200 + 100) * 0.5
    assert pytest.approx(float(store.values[0, 7, 9]), rel=1e-5) == row.ERBB2
    assert df.tumor.sum() == tmap.mask.sum()


# ----------------------------------------------------------------------------- figure
def test_png_figure_has_the_chosen_dpi(store, tmap, tmp_path):
    res = export_figure(store, tmp_path / "fig.png", gene="ERBB2", dpi=80, width_in=5, tumor=tmap)
    raw = res.path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    width = int.from_bytes(raw[16:20], "big")
    assert width == 400
    assert "scale bar" in res.detail and "µm" in res.detail


# ----------------------------------------------------------------------------- rules
def test_refuses_to_overwrite_unless_asked(store, tmp_path):
    dst = tmp_path / "x.csv"
    export_csv(store, dst)
    before = dst.read_bytes()
    with pytest.raises(StPredictError, match="already exists"):
        export_csv(store, dst, genes=["ERBB2"])
    assert dst.read_bytes() == before
    export_csv(store, dst, genes=["ERBB2"], overwrite=True)
    assert dst.read_bytes() != before
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no temporaries left


def test_read_only_target_is_a_one_line_error(store, tmp_path):
    if os.geteuid() == 0:  # root ignores permission bits: /sys refuses new files even to root
        folder = Path("/sys")
    else:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
    with pytest.raises(StPredictError) as err:
        export_tumor_geojson(
            np.zeros(store.grid.shape, bool), folder / "t.geojson", predictions=store
        )
    assert "\n" not in str(err.value) and "t.geojson" in str(err.value)


def test_nothing_predicted_and_bad_input(tmp_path):
    grid = TileGrid((1000, 1000), 0.5, patch_um=100, patch_px=32)
    empty = PredictionStore.open(tmp_path / "c", key="empty", genes=GENES, grid=grid)
    for fn in (export_h5ad, export_csv, export_heatmaps_ome_tiff):
        with pytest.raises(ExportError, match="nothing is predicted"):
            fn(empty, tmp_path / "out.x")
    assert not list(tmp_path.glob("out.x*"))
    with pytest.raises(ExportError, match="NOPE not predicted"):
        export_heatmaps_ome_tiff(
            tmp_path / "c" / "empty.zarr", tmp_path / "o.ome.tif", genes=["NOPE"]
        )
    with pytest.raises(ExportError, match="unknown"):
        export_predictions(empty, tmp_path, name="s", kinds="pdf")


def test_export_predictions_bundle(store, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ExportError, match="need a tumour map"):
        export_predictions(store, out, name="s", kinds="geojson", tumor=None)
    tm = threshold_score(score_store(store, gene_stats=STATS))
    results = export_predictions(
        store, out, name="slide 1", kinds="h5ad,csv,ome-tiff,geojson,mask,png", tumor=tm
    )
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        [
            "slide_1.h5ad",
            "slide_1.csv",
            "slide_1_heatmaps.ome.tif",
            "slide_1_tumor.geojson",
            "slide_1_tumor_mask.ome.tif",
            "slide_1_ERBB2.png",
        ]
    )
    assert [r.kind for r in results] == [
        "h5ad",
        "csv",
        "ome-tiff",
        "geojson",
        "mask-ome-tiff",
        "png",
    ]
    assert all(re.match(r"wrote .+", r.message()) for r in results)


def test_export_report_keeps_going_past_a_full_disk_and_a_missing_signature(
    store, tmp_path, monkeypatch
):
    import errno

    import napari_stpredict.export as ex
    from napari_stpredict.export import export_report

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ex, "export_h5ad", full)
    out = tmp_path / "out"
    out.mkdir()
    rep = export_report(
        store,
        out,
        name="../../escape",
        kinds="h5ad,csv,geojson",
        skip={"geojson": "tumour signature: none of ERBB2 …"},
    )
    assert [r.kind for r in rep.results] == ["csv"]
    assert rep.failed["h5ad"].startswith("No space left on device (errno 28)")
    assert rep.failed["geojson"] == "tumour signature: none of ERBB2 …"
    # the name cannot leave the folder; nothing but the CSV was written
    assert [p.name for p in out.iterdir()] == ["escape.csv"]
    assert not [p for p in tmp_path.iterdir() if p.name not in ("out", "cache")]
    with pytest.raises(StPredictError, match="No space left"):  # without keep_going: raises
        export_report(store, out, name="s", kinds="h5ad", keep_going=False)


# ----------------------------------------------------------------------------- real data
def test_exports_of_a_real_predicted_slide(real_store, her2st_dir, tmp_path):
    import anndata as ad

    from napari_stpredict.slide import open_slide

    store, model_path = real_store
    slide = open_slide(store.info["slide"]["path"], mpp=store.grid.mpp)
    genes = list(store.genes)[:3]
    tm = threshold_score(score_store(store, gene_set=genes, model=model_path))
    out = tmp_path / "real"
    out.mkdir()
    results = export_predictions(
        store,
        out,
        name="C3",
        kinds="ome-tiff,geojson,h5ad,png",
        genes=genes,
        slide=slide,
        model=model_path,
        tumor=tm,
    )
    by = {r.kind: r for r in results}
    assert all(r.partial for r in results if r.kind != "png")
    # the OME-TIFF covers the slide: physical width ≈ slide width (within one output pixel)
    names, phys = _ome_channels(by["ome-tiff"].path)
    assert names == genes
    with tifffile.TiffFile(by["ome-tiff"].path) as tif:
        _, h, w = tif.series[0].shape
    sh, sw = slide.shape
    assert 0 <= w * phys - sw * slide.mpp < phys and 0 <= h * phys - sh * slide.mpp < phys
    doc = json.loads(by["geojson"].path.read_text())
    _check_qupath_feature_collection(doc, genes)
    assert len(doc["features"]) >= 1
    a = ad.read_h5ad(by["h5ad"].path)
    assert a.n_obs == np.asarray(store.done[...]).sum()
    lib = next(iter(a.uns["spatial"]))
    img = a.uns["spatial"][lib]["images"]["hires"]
    f = a.uns["spatial"][lib]["scalefactors"]["tissue_hires_scalef"]
    assert max(img.shape[:2]) == 2000 and img.dtype == np.uint8
    assert f == pytest.approx(img.shape[1] / sw)
    assert a.uns["stpredict"]["model"]["path"] == str(model_path)
    x, y = a.obsm["spatial"].T
    assert (x < sw).all() and (y < sh).all()
    png = by["png"].path.read_bytes()
    assert png[:4] == b"\x89PNG"
