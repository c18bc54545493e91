"""SpatialData in and out (issue 15): pseudo-spots, manifest sections, the ``spatialdata`` export.

Tests that need the optional extra (``pip install 'napari-stpredict[spatialdata]'``) skip with
that reason when it is missing; the pseudo-spot aggregation, the manifest checks and the
"extra missing" messages run everywhere.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from napari_stpredict.errors import DatasetError, StPredictError
from napari_stpredict.st import load_manifest, read_section
from napari_stpredict.st.spatialdata import aggregate_pseudo_spots, have_spatialdata

needs_sd = pytest.mark.skipif(
    not have_spatialdata(),
    reason="spatialdata not installed (pip install 'napari-stpredict[spatialdata]')",
)


# --------------------------------------------------------------------------------------------
# pseudo-spots (no extra needed)


def _brute_force(xy, X, centers, r):
    X = np.asarray(X.todense() if sp.issparse(X) else X)
    out = np.zeros((len(centers), X.shape[1]))
    for k, c in enumerate(centers):
        inside = ((xy - c) ** 2).sum(axis=1) <= r * r + 1e-9
        out[k] = X[inside].sum(axis=0)
    return out


def _xenium_like(rng, n_cells=400, n_genes=12, extent=520.0):
    """Cells with centroids (µm) and counts, and their transcripts (x, y, gene) near the cells."""
    xy = rng.uniform(0, extent, size=(n_cells, 2))
    counts = rng.poisson(1.5, size=(n_cells, n_genes)).astype(np.float32)
    tx, ty, tg = [], [], []
    for c in range(n_cells):
        for g in range(n_genes):
            k = int(counts[c, g])
            tx += list(xy[c, 0] + rng.normal(0, 3.0, k))
            ty += list(xy[c, 1] + rng.normal(0, 3.0, k))
            tg += [g] * k
    txy = np.stack([tx, ty], axis=1)
    onehot = sp.csr_matrix((np.ones(len(tg)), (np.arange(len(tg)), tg)), shape=(len(tg), n_genes))
    return xy, counts, txy, onehot


def test_pseudo_spots_sum_cells_and_transcripts():
    rng = np.random.default_rng(0)
    xy, counts, txy, onehot = _xenium_like(rng)
    for data_xy, data_x in ((xy, counts), (txy, onehot)):
        ps = aggregate_pseudo_spots(data_xy, data_x, spot_um=55, pitch_um=100, origin=(0.0, 0.0))
        # centres on the 100 µm grid, sums = brute force over the 27.5 µm discs
        assert np.allclose(ps.centers % 100, 0)
        expected = _brute_force(data_xy, data_x, ps.centers, 27.5)
        assert np.allclose(ps.X.toarray(), expected)
        # every observation inside a disc is counted once, those between discs are not
        gx, gy = np.round(data_xy[:, 0] / 100) * 100, np.round(data_xy[:, 1] / 100) * 100
        inside = (data_xy[:, 0] - gx) ** 2 + (data_xy[:, 1] - gy) ** 2 <= 27.5**2
        dense = np.asarray(data_x.todense() if sp.issparse(data_x) else data_x)
        assert np.isclose(ps.X.sum(), dense[inside].sum())
        assert ps.X.sum() < dense.sum()  # some fall between the spots
        assert ps.n_members.sum() == inside.sum()
        assert len(ps.ids) == len(set(ps.ids)) == ps.X.shape[0]


def test_pseudo_spots_overlapping_discs_and_bad_input():
    rng = np.random.default_rng(1)
    xy, counts, _, _ = _xenium_like(rng, n_cells=150)
    ps = aggregate_pseudo_spots(xy, counts, spot_um=150, pitch_um=100, origin=(0.0, 0.0))
    assert np.allclose(ps.X.toarray(), _brute_force(xy, counts, ps.centers, 75.0))
    assert ps.X.sum() > counts.sum()  # a cell in the overlap counts for both spots
    with pytest.raises(DatasetError, match="positive"):
        aggregate_pseudo_spots(xy, counts, spot_um=0, pitch_um=100)
    with pytest.raises(DatasetError, match="rows of counts"):
        aggregate_pseudo_spots(xy, counts[:-1])


# --------------------------------------------------------------------------------------------
# manifest checks (no extra needed)


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def test_manifest_spatialdata_fields_are_checked(tmp_path):
    store = tmp_path / "s.zarr"
    store.mkdir()
    m = _write(
        tmp_path / "m.yaml",
        """
        sections:
          - name: S1
            spatialdata: s.zarr
            elements: {table: t, image: he, shapes: spots, coordinate_system: global}
            spot_pitch_um: 100
        """,
    )
    spec = load_manifest(m, check_files=False).section("S1")
    assert spec.kind == "spatialdata" and spec.source == store
    assert spec.elements.table == "t" and spec.elements.coordinate_system == "global"
    assert spec.to_dict()["elements"]["image"] == "he"

    bad = {
        "elements: {tabel: t}": "elements.tabel.*did you mean 'table'",
        "bin_size: 8": "field 'bin_size': does not apply to a spatialdata section",
        "spots: x.tsv": "field 'spots': does not apply",
    }
    for line, msg in bad.items():
        _write(m, f"sections:\n  - name: S1\n    spatialdata: s.zarr\n    {line}\n")
        with pytest.raises(DatasetError, match=msg) as err:
            load_manifest(m, check_files=False)
        assert "\n" not in str(err.value)
    _write(m, "sections:\n  - name: S1\n    spatialdata: s.zarr\n    h5ad: a.h5ad\n")
    with pytest.raises(DatasetError, match=r"exactly one of .*got h5ad, spatialdata"):
        load_manifest(m, check_files=False)
    _write(m, "sections:\n  - name: S1\n    xenium: s.zarr\n    bin_size: 8\n")
    with pytest.raises(DatasetError, match="'bin_size': does not apply to a xenium"):
        load_manifest(m, check_files=False)
    _write(m, "sections:\n  - name: S1\n    visium_hd: s.zarr\n    bin_size: 0\n")
    with pytest.raises(DatasetError, match="'bin_size': expected a positive whole number"):
        load_manifest(m, check_files=False)
    # up-front: a folder that is not a zarr store / not a Xenium bundle
    for key, msg in (
        ("spatialdata", "is not a zarr store"),
        ("xenium", "no experiment.xenium"),
        ("visium_hd", "no binned_outputs"),
    ):
        _write(m, f"sections:\n  - name: S1\n    {key}: s.zarr\n")
        if not have_spatialdata(io=key != "spatialdata"):
            msg = r"napari-stpredict\[spatialdata\]"
        with pytest.raises(DatasetError, match=msg) as err:
            load_manifest(m)
        assert "\n" not in str(err.value) and "S1" in str(err.value)


def test_without_the_extra_one_line_says_what_to_install(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec

    def fake(name, *a, **k):
        if name.split(".")[0] in ("spatialdata", "spatialdata_io"):
            return None
        return real(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    store = tmp_path / "s.zarr"
    store.mkdir()
    (store / "zarr.json").write_text("{}")
    m = _write(tmp_path / "m.yaml", "sections:\n  - name: S1\n    spatialdata: s.zarr\n")
    with pytest.raises(DatasetError, match=r"pip install 'napari-stpredict\[spatialdata\]'") as e:
        load_manifest(m)
    assert "\n" not in str(e.value) and "field 'spatialdata'" in str(e.value)

    from napari_stpredict.cohort import parse_exports
    from napari_stpredict.export import ExportError
    from napari_stpredict.export.spatialdata import export_spatialdata

    with pytest.raises(ExportError, match=r"napari-stpredict\[spatialdata\]"):
        export_spatialdata(object(), tmp_path / "x.zarr")
    with pytest.raises(StPredictError, match=r"napari-stpredict\[spatialdata\]"):
        parse_exports("h5ad,spatialdata")


def test_core_does_not_import_spatialdata():
    code = (
        "import sys, napari_stpredict.st, napari_stpredict.export, napari_stpredict.cohort\n"
        "import napari_stpredict.st.spatialdata, napari_stpredict.export.spatialdata\n"
        "bad = [m for m in ('spatialdata', 'spatialdata_io', 'geopandas') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------------------------
# a SpatialData store built from real HER2ST B4 → manifest → same matrix → trains


def _her2st_b4_sdata(her2st_dir: Path, out: Path) -> Path:
    """B4 as SpatialData: image at half resolution (Scale 2), spot circles in full-res px, table."""
    import anndata as ad
    import geopandas as gpd
    import pandas as pd
    from PIL import Image
    from shapely import points
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    counts = pd.read_csv(her2st_dir / "counts" / "B4.tsv.gz", sep="\t", index_col=0)
    spots = pd.read_csv(her2st_dir / "spots" / "B4_selection.tsv", sep="\t")
    spots = spots[spots["selected"] == 1]
    spots.index = [f"{x}x{y}" for x, y in zip(spots["x"], spots["y"], strict=True)]
    ids = [i for i in counts.index.astype(str) if i in spots.index][::-1]  # another order
    spots = spots.loc[ids]
    n = len(ids)
    circles = gpd.GeoDataFrame(
        {"radius": np.full(n, 72.5)},
        geometry=points(spots[["pixel_x", "pixel_y"]].to_numpy(dtype=float)),
        index=pd.Index(np.arange(100, 100 + n)),
    )
    circles = ShapesModel.parse(circles, transformations={"global": Identity()})
    table = ad.AnnData(
        X=sp.csr_matrix(counts.loc[ids].to_numpy(dtype=np.float32)),
        obs=pd.DataFrame(
            {"region": pd.Categorical(["spots"] * n), "spot_idx": np.arange(100, 100 + n)},
            index=pd.Index(ids),
        ),
        var=pd.DataFrame(index=pd.Index([str(g) for g in counts.columns])),
    )
    table = TableModel.parse(table, region="spots", region_key="region", instance_key="spot_idx")
    with Image.open(her2st_dir / "images" / "B4.jpg") as im:
        half = np.asarray(im.convert("RGB").reduce(2))
    image = Image2DModel.parse(
        half.transpose(2, 0, 1),
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=[2, 2],
        chunks=(3, 1024, 1024),
        transformations={"global": Scale([2.0, 2.0], axes=("y", "x"))},
    )
    sdata = SpatialData(images={"he": image}, shapes={"spots": circles}, tables={"table": table})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata.write(out)
    return out


@pytest.fixture(scope="module")
def b4_store(her2st_dir, tmp_path_factory):
    if not have_spatialdata():
        pytest.skip("spatialdata not installed (pip install 'napari-stpredict[spatialdata]')")
    folder = tmp_path_factory.mktemp("sd_b4")
    _her2st_b4_sdata(her2st_dir, folder / "B4.zarr")
    manifest = _write(
        folder / "data.yaml",
        """
        sections:
          - name: B4
            patient: B
            spatialdata: B4.zarr
            spot_pitch_um: 200
            spot_diameter_um: 100
        """,
    )
    return folder, manifest


@needs_sd
def test_spatialdata_section_same_matrix_as_legacy(b4_store, benchmarks_data_dir):
    _, manifest = b4_store
    legacy = read_section(load_manifest(benchmarks_data_dir / "her2st.yaml").section("B4"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd = read_section(load_manifest(manifest).section("B4"))
    assert sd.uns["stpredict"]["kind"] == "spatialdata"
    assert Path(sd.uns["stpredict"]["image"]).name == "he"  # the image element, read as a slide
    assert sorted(sd.obs_names) == sorted(legacy.obs_names)
    sd = sd[legacy.obs_names]
    assert list(sd.var_names) == list(legacy.var_names)
    assert (sd.X != legacy.X).nnz == 0
    # spot centres: full-res px / 2 = pixels of the half-resolution image element
    assert np.allclose(sd.obsm["spatial"] * 2, legacy.obsm["spatial"], atol=1e-6)
    meta_sd, meta_legacy = sd.uns["stpredict"], legacy.uns["stpredict"]
    assert meta_sd["image_shape"] == [
        (s + 1) // 2 for s in meta_legacy["image_shape"]
    ]  # PIL reduce: ceil
    assert meta_sd["mpp"] == pytest.approx(2 * meta_legacy["mpp"], rel=1e-3)
    assert meta_sd["spot_diameter_px"] == pytest.approx(72.5)


@pytest.fixture(scope="module")
def b4_model(b4_store):
    """A tiny model trained through the SpatialData manifest (frozen backbone, 2 steps, 32 px)."""
    from napari_stpredict.training import TrainConfig, train

    folder, manifest = b4_store
    cfg = TrainConfig(
        method="cmrc",
        backbone="tf_efficientnet_lite0",
        pretrained="offline",
        n_top_genes=40,
        markers="none",
        n_heg_genes=0,
        patch_um=112.0,
        patch_px=32,
        epochs=1,
        max_steps=2,
        batch_size=32,
        val_fraction=0.1,
        device="cpu",
        seed=0,
        num_workers=0,
        train_backbone="none",
        feature_cache_dir=str(folder / "features"),
        tta=1,  # pinned: the defaults (8 views + context) cost 16 passes per spot
        context=0.0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train(manifest, cfg, out=folder / "model.safetensors")


@needs_sd
def test_spatialdata_section_trains_on_the_legacy_expression(b4_model, benchmarks_data_dir):
    from safetensors import safe_open

    from napari_stpredict.st import Normalization

    res = b4_model
    assert res.model_path.exists()
    meta = res.metadata
    genes = list(meta["genes"])
    with safe_open(str(res.model_path), "np") as f:
        bank = f.get_tensor("bank.expression")
    assert bank.shape[1] == len(genes) and bank.shape[0] > 200
    # every bank row is the legacy route's normalised expression of some B4 spot
    legacy = read_section(load_manifest(benchmarks_data_dir / "her2st.yaml").section("B4"))
    lib = np.asarray(legacy.X.sum(axis=1)).ravel()
    x = legacy[:, genes].X
    ref = Normalization.from_dict(meta["normalization"])(x, library_size=lib)
    ref_rows = {np.round(r, 4).tobytes() for r in np.asarray(ref, dtype=np.float32)}
    hits = sum(np.round(r, 4).tobytes() in ref_rows for r in np.asarray(bank, dtype=np.float32))
    assert hits == bank.shape[0]


@needs_sd
def test_spatialdata_section_errors(b4_store, tmp_path):
    folder, _ = b4_store
    m = _write(
        tmp_path / "m.yaml",
        f"""
        sections:
          - name: B4
            spatialdata: {folder / "B4.zarr"}
            elements: {{table: nope}}
        """,
    )
    with pytest.raises(DatasetError, match=r"has no table .nope. \(tables: table\)") as err:
        read_section(load_manifest(m).section("B4"))
    assert "\n" not in str(err.value)
    _write(
        m,
        f"sections:\n  - name: B4\n    spatialdata: {folder / 'B4.zarr'}\n"
        "    elements: {image: x}\n",
    )
    with pytest.raises(DatasetError, match="no image 'x'"):
        load_manifest(m)


@needs_sd
def test_xenium_section_aggregates_cells(tmp_path, monkeypatch):
    """A Xenium-like cell table (centroids in µm) read through the manifest → pseudo-spots."""
    import anndata as ad
    import pandas as pd
    import spatialdata_io
    from spatialdata import SpatialData

    rng = np.random.default_rng(3)
    xy, counts, _, _ = _xenium_like(rng, n_cells=300)
    bundle = tmp_path / "xenium_out"
    bundle.mkdir()
    (bundle / "experiment.xenium").write_text('{"pixel_size": 0.2125}')
    genes = [f"G{k}" for k in range(counts.shape[1])]
    table = ad.AnnData(
        X=sp.csr_matrix(counts),
        obs=pd.DataFrame(index=pd.Index([f"cell{k}" for k in range(len(xy))])),
        var=pd.DataFrame(index=pd.Index(genes)),
    )
    table.obsm["spatial"] = xy

    def fake_xenium(path, **kwargs):
        assert Path(path) == bundle and kwargs["cells_table"]
        return SpatialData(tables={"table": table})

    monkeypatch.setattr(spatialdata_io, "xenium", fake_xenium)
    m = _write(
        tmp_path / "m.yaml",
        "sections:\n  - name: X1\n    xenium: xenium_out\n",
    )
    a = read_section(load_manifest(m).section("X1"), check_image=False)
    ps = aggregate_pseudo_spots(xy, counts)  # defaults: 55 µm every 100 µm
    assert a.n_obs == len(ps.ids) and list(a.var_names) == genes
    assert np.allclose(a.X.toarray(), ps.X.toarray())
    # centres in pixels of the morphology frame (µm / 0.2125), mpp from the bundle
    assert np.allclose(a.obsm["spatial"], ps.centers / 0.2125)
    meta = a.uns["stpredict"]
    assert meta["mpp"] == pytest.approx(0.2125) and meta["mpp_source"] == "data"
    assert meta["spot_diameter_px"] == pytest.approx(55 / 0.2125)
    assert meta["spot_pitch_px"] == pytest.approx(100 / 0.2125)


# --------------------------------------------------------------------------------------------
# export → spatialdata.read_zarr


@pytest.fixture
def svs_store(wsi_dir, tmp_path):
    from napari_stpredict.inference.grid import TileGrid
    from napari_stpredict.inference.store import PredictionStore
    from napari_stpredict.slide import open_slide
    from napari_stpredict.tumor import score_store, threshold_score

    genes = ["ERBB2", "KRT19", "EPCAM", "KRT8", "KRT18", "CDH1", "COL1A1"]
    slide = open_slide(wsi_dir / "cmu_small_region.svs")
    grid = TileGrid(slide.shape, slide.mpp, patch_um=100, patch_px=32)
    st = PredictionStore.open(tmp_path / "cache", key="k", genes=genes, grid=grid, spread=True)
    gh, gw = grid.shape
    ii, jj = np.mgrid[:gh, :gw]
    cells = np.stack([ii.ravel(), jj.ravel()], axis=1)
    blob = np.exp(-((ii - 8) ** 2 + (jj - 6) ** 2) / 10.0).ravel()
    values = np.random.default_rng(0).random((len(cells), len(genes))) * 0.3 + blob[:, None] * 2
    keep = cells[:, 1] < gw - 2  # the last two columns are not predicted
    st.write(cells[keep], values[keep], spread=values[keep] * 0.1)
    stats = {"mean": np.full(len(genes), 0.8), "std": np.full(len(genes), 0.5)}
    tmap = threshold_score(score_store(st, gene_stats=stats), threshold="otsu")
    return slide, grid, st, tmap


@needs_sd
def test_export_round_trips_aligned(svs_store, tmp_path):
    import shapely
    import spatialdata
    from spatialdata.transformations import get_transformation

    from napari_stpredict.export import ExportError
    from napari_stpredict.export.spatialdata import export_spatialdata

    slide, grid, st, tmap = svs_store
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "slide_spatialdata.zarr"
    res = export_spatialdata(st, dst, slide=slide, tumor=tmap)
    assert res.kind == "spatialdata" and "tumour regions" in res.detail
    assert sorted(p.name for p in out.iterdir()) == [dst.name]  # no temporaries left
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd = spatialdata.read_zarr(dst)
    tiles, table, regions = sd.shapes["tiles"], sd.tables["predictions"], sd.shapes["tumor_regions"]
    image = sd.images["slide"]
    attrs = table.uns["spatialdata_attrs"]
    assert attrs["region"] == "tiles" and attrs["instance_key"] == "instance_id"
    done = np.asarray(st.done[...])
    assert table.n_obs == len(tiles) == int(done.sum())
    assert table.uns["stpredict"]["coordinate_units"] == "micrometer"

    # table ↔ store values, uncertainty and tumour score
    i, j = table.obs["i"].to_numpy(), table.obs["j"].to_numpy()
    vals = np.asarray(st.values[...])
    assert np.allclose(table.X, vals[:, i, j].T)
    assert np.allclose(table.layers["spread"], np.asarray(st.spread[...])[:, i, j].T)
    assert np.allclose(table.obs["tumor_score"], tmap.score.score[i, j])
    assert (table.obs["tumor"].to_numpy() == tmap.mask[i, j]).all()

    # a tile's centre lands on the same slide pixel through the transformations
    geom = tiles.loc[table.obs["instance_id"].to_numpy()].geometry
    cx, cy = geom.x.to_numpy(), geom.y.to_numpy()
    to_um = get_transformation(tiles, "global").to_affine_matrix(("x", "y"), ("x", "y"))
    um = np.stack([cx, cy, np.ones_like(cx)]).T @ to_um.T
    yc, xc = np.array([_centre(grid, a, b) for a, b in zip(i, j, strict=True)]).T
    assert np.allclose(um[:, 0], xc * slide.mpp) and np.allclose(um[:, 1], yc * slide.mpp)
    img_to_um = get_transformation(image, "global").to_affine_matrix(("x", "y"), ("x", "y"))
    px = um @ np.linalg.inv(img_to_um).T
    scale0 = (
        np.asarray(image["scale0"]["image"]) if hasattr(image, "children") else np.asarray(image)
    )
    ds = slide.shape[1] / scale0.shape[2], slide.shape[0] / scale0.shape[1]
    col, row = np.floor(px[:, 0]).astype(int), np.floor(px[:, 1]).astype(int)
    assert (col == np.floor(xc / ds[0]).astype(int)).all()
    assert (row == np.floor(yc / ds[1]).astype(int)).all()
    level = int(sd.attrs["stpredict"]["image"]["level"])
    lvl = np.asarray(slide.levels[level])
    assert ds[0] == pytest.approx(slide.shape[1] / lvl.shape[1])  # a stored level, no coarsening
    assert np.array_equal(scale0[:, row, col].T, lvl[row, col])  # same pixel values

    # tumour polygons (same transformation) hold exactly the tumour tiles' centres
    assert get_transformation(regions, "global") == get_transformation(tiles, "global")
    union = shapely.union_all(regions.geometry.to_numpy())
    inside = shapely.contains_xy(union, cx, cy)
    assert (inside == table.obs["tumor"].to_numpy()).all() and inside.any()

    # and back in as a manifest section: same tiles, positions in image-element pixels, mpp
    m = _write(tmp_path / "m.yaml", f"sections:\n  - name: S\n    spatialdata: {dst}\n")
    back = read_section(load_manifest(m).section("S"))
    assert list(back.obs_names) == list(table.obs_names)
    assert np.allclose(back.obsm["spatial"], np.stack([xc / ds[0], yc / ds[1]], axis=1))
    assert back.uns["stpredict"]["mpp"] == pytest.approx(slide.mpp * ds[0], rel=2e-3)  # √det
    assert back.uns["stpredict"]["mpp_source"] == "data"

    with pytest.raises(StPredictError, match="already exists"):
        export_spatialdata(st, dst, slide=slide, tumor=tmap)
    with pytest.raises(ExportError, match=r"must end in \.zarr"):
        export_spatialdata(st, out / "x.sdata", slide=slide)
    res2 = export_spatialdata(st, dst, slide=None, tumor=None, overwrite=True)
    assert "image" not in res2.detail and "tumour" not in res2.detail
    assert sorted(p.name for p in out.iterdir()) == [dst.name]


def _centre(grid, i, j):
    y0, x0, y1, x1 = grid.cell_rect_px(int(i), int(j))
    return (y0 + y1) / 2, (x0 + x1) / 2


@needs_sd
def test_export_through_the_bundle_and_image_choice(svs_store, tmp_path):
    from napari_stpredict.export import ExportError, export_predictions
    from napari_stpredict.export.spatialdata import image_plan

    slide, _, st, _ = svs_store
    assert image_plan(slide) == (2, 1)  # 0.499 µm/px × 4 = 2.0 µm/px ≤ 2
    assert image_plan(slide, image_mpp=1.0) == (1, 1)
    assert image_plan(slide, 0) == (0, 1) and image_plan(slide, None) is None
    with pytest.raises(ExportError, match=r"levels 0\.\.2"):
        image_plan(slide, 7)
    res = export_predictions(st, tmp_path, name="cmu", kinds="spatialdata,csv", slide=slide)
    assert [r.kind for r in res] == ["spatialdata", "csv"]
    assert res[0].path == tmp_path / "cmu_spatialdata.zarr"


@needs_sd
def test_cli_predict_export_spatialdata_no_image(b4_model, wsi_dir, tmp_path):
    import spatialdata

    from napari_stpredict.cli import main

    slide = wsi_dir / "cmu_small_region.svs"
    out = tmp_path / "out"
    args = ["predict", str(slide), "-m", str(b4_model.model_path), "-o", str(out)]
    args += [
        "--export",
        "spatialdata,csv",
        "--no-image",
        "--scheduler",
        "inline",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    store = out / "cmu_small_region" / "cmu_small_region_spatialdata.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd = spatialdata.read_zarr(store)
    assert len(sd.images) == 0 and len(sd.shapes["tiles"]) == sd.tables["predictions"].n_obs > 0
    assert sd.tables["predictions"].uns["stpredict"]["model_name"] == "model.safetensors"
