"""Section readers on the real data: legacy ST tables, Space Ranger outs, h5ad; bad input."""

from __future__ import annotations

import gzip
import json
import shutil
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
from PIL import Image

from napari_stpredict.errors import DatasetError
from napari_stpredict.st import estimate_spot_pitch, load_manifest, read_section, read_sections

HER2ST_SPOTS = {"B4": 283, "C2": 187, "C3": 180, "C4": 184, "A2": 323}
MOB_SPOTS = {"MOB1": 379, "MOB2": 407, "MOB3": 438}


@pytest.fixture(scope="module")
def her2st(her2st_dir, benchmarks_data_dir):
    return read_sections(benchmarks_data_dir / "her2st.yaml")


@pytest.fixture(scope="module")
def mob(mob_dir, benchmarks_data_dir):
    return read_sections(benchmarks_data_dir / "mob.yaml")


def _small_image(path: str, max_side: int = 1200) -> tuple[np.ndarray, float]:
    """Grey image decoded at a reduced scale (JPEG draft mode) and its factor to full size."""
    Image.MAX_IMAGE_PIXELS = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        im = Image.open(path)
        full_w = im.size[0]
        im.draft("RGB", (max_side, max_side))
        im = im.convert("L")
        if max(im.size) > max_side:
            im.thumbnail((max_side, max_side))
    return np.asarray(im, dtype=np.float64), im.size[0] / full_w


def _spot_means(img: np.ndarray, xy: np.ndarray, radius: float) -> np.ndarray:
    r = max(1, int(radius))
    out = []
    for x, y in xy:
        xi, yi = int(x), int(y)
        out.append(img[max(yi - r, 0) : yi + r + 1, max(xi - r, 0) : xi + r + 1].mean())
    return np.array(out)


# ---------------------------------------------------------------- legacy ST: HER2ST


def test_her2st_sections(her2st, her2st_dir):
    assert [a.uns["stpredict"]["section"] for a in her2st] == list(HER2ST_SPOTS)
    for a in her2st:
        meta = a.uns["stpredict"]
        name = meta["section"]
        assert a.n_obs == HER2ST_SPOTS[name]
        assert a.n_vars > 15000
        assert sp.isspmatrix_csr(a.X) and a.X.dtype == np.float32
        assert np.all(a.X.data == np.round(a.X.data)) and a.X.data.min() > 0  # raw UMI counts
        assert a.var_names.is_unique and a.obs_names.is_unique
        assert a.obsm["spatial"].shape == (a.n_obs, 2)
        assert list(a.obs["section"].unique()) == [name]
        assert "label" not in a.obs
        h, w = meta["image_shape"]
        xy = a.obsm["spatial"]
        assert (xy[:, 0] >= 0).all() and (xy[:, 0] < w).all() and (xy[:, 1] < h).all()
        assert meta["mpp_source"] == "spot_grid"
        assert meta["patient"] == {"B4": "B", "C2": "C", "C3": "C", "C4": "C", "A2": "A"}[name]
        # legacy ST spots are 100 µm wide
        assert meta["spot_diameter_px"] * meta["mpp"] == pytest.approx(100.0)
    full = {a.uns["stpredict"]["section"]: a.uns["stpredict"]["mpp"] for a in her2st}
    for name in ("B4", "C2", "C3", "C4"):  # full-resolution scans, about 0.69 µm/px
        assert 0.6 < full[name] < 0.8
    # A2 is a copy of its full-size scan downscaled by 6966 / 2000
    sel = pd.read_csv(her2st_dir / "spots" / "A2_selection.tsv", sep="\t")
    full_mpp = 200 / estimate_spot_pitch(sel[["pixel_x", "pixel_y"]].to_numpy())
    assert full["A2"] == pytest.approx(full_mpp * 6966 / 2000, rel=0.02)


def test_her2st_joins_counts_rows_to_spot_table(her2st, her2st_dir):
    b4 = her2st[0]
    sel = pd.read_csv(her2st_dir / "spots" / "B4_selection.tsv", sep="\t")
    row = sel.iloc[5]
    spot = f"{int(row.x)}x{int(row.y)}"
    i = b4.obs_names.get_loc(spot)
    assert b4.obsm["spatial"][i] == pytest.approx([row.pixel_x, row.pixel_y])
    counts = pd.read_csv(her2st_dir / "counts" / "B4.tsv.gz", sep="\t", index_col=0, nrows=40)
    gene = "ERBB2"
    if spot in counts.index:
        assert b4[spot, gene].X.toarray().item() == counts.loc[spot, gene]
    first = counts.index[0]
    j = b4.obs_names.get_loc(first)
    assert b4.X[j].sum() == pytest.approx(counts.loc[first].sum())


@pytest.mark.parametrize("name", ["B4", "C2", "C3", "C4"])
def test_her2st_spots_land_on_tissue(her2st, name):
    a = next(a for a in her2st if a.uns["stpredict"]["section"] == name)
    img, f = _small_image(a.uns["stpredict"]["image"])
    spots = _spot_means(img, a.obsm["spatial"] * f, a.uns["stpredict"]["spot_diameter_px"] * f / 2)
    band = max(3, img.shape[1] // 30)
    background = np.concatenate([img[:band].ravel(), img[-band:].ravel()]).mean()
    assert spots.mean() < background - 25, (spots.mean(), background)


def test_a2_registered_coordinates_land_on_tissue(her2st, her2st_dir):
    a2 = her2st[4]
    # 325 count rows, 323 of them in the registered cluster annotation
    assert a2.n_obs == 323 and a2.uns["stpredict"]["n_dropped_spots"] == 2
    img, f = _small_image(a2.uns["stpredict"]["image"], max_side=4000)
    assert f == 1.0
    on = _spot_means(img, a2.obsm["spatial"], 4) > 40  # background is masked black
    assert on.mean() > 0.98
    # the selection file's own pixel columns are in the unregistered frame: worse
    sel = pd.read_csv(her2st_dir / "spots" / "A2_selection.tsv", sep="\t")
    naive = sel[["pixel_x", "pixel_y"]].to_numpy() * 2000 / 6966
    inside = (naive[:, 0] < img.shape[1] - 5) & (naive[:, 1] < img.shape[0] - 5)
    assert (_spot_means(img, naive[inside], 4) > 40).mean() < on.mean() - 0.1


def test_labelled_sections(her2st_dir, benchmarks_data_dir):
    adatas = read_sections(benchmarks_data_dir / "her2st_labelled.yaml", sections=["B1", "G2"])
    b1, g2 = adatas
    assert b1.n_obs == 295 and g2.n_obs == 467
    for a in adatas:
        assert a.uns["stpredict"]["image"] is None
        assert a.uns["stpredict"]["mpp_source"] == "spot_grid"
        assert a.obs["label"].notna().all()
        assert "invasive cancer" in set(a.obs["label"])
    assert set(g2.obs["label"].cat.categories) == {
        "invasive cancer",
        "cancer in situ",
        "connective tissue",
        "immune infiltrate",
        "breast glands",
        "adipose tissue",
        "undetermined",
    }
    # the label file row of spot 7x11 (x=7.0.., y=11.0..) carries its label onto that spot
    lab = pd.read_csv(her2st_dir / "labels" / "B1_labeled_coordinates.tsv", sep="\t")
    row = lab.iloc[10]
    spot = f"{round(row.x)}x{round(row.y)}"
    assert b1.obs.loc[spot, "label"] == row.label
    # patches cannot be asked from them
    with pytest.raises(DatasetError, match=r"section 'B1': field 'image': missing"):
        read_sections(
            benchmarks_data_dir / "her2st_labelled.yaml", sections=["B1"], require_images=True
        )


# ---------------------------------------------------------------- legacy ST: MOB


def test_mob_sections(mob, mob_dir):
    assert [a.uns["stpredict"]["section"] for a in mob] == list(MOB_SPOTS)
    for a in mob:
        name = a.uns["stpredict"]["section"]
        assert a.n_obs == MOB_SPOTS[name]  # selected == 1 only
        assert a.n_vars == 1000
        assert all(g.startswith("ENSMUSG") for g in a.var_names)
        table = pd.read_csv(mob_dir / f"alignment_table_{name}.tsv", sep="\t")
        selected = {f"{x}x{y}" for x, y in table.loc[table.selected == 1, ["x", "y"]].to_numpy()}
        assert set(a.obs_names) <= selected
        assert 4.0 < a.uns["stpredict"]["mpp"] < 5.0  # about 4.4 µm/px
        img, f = _small_image(a.uns["stpredict"]["image"])
        spots = _spot_means(
            img, a.obsm["spatial"] * f, a.uns["stpredict"]["spot_diameter_px"] * f / 2
        )
        band = max(3, img.shape[1] // 30)
        background = np.concatenate([img[:band].ravel(), img[-band:].ravel()]).mean()
        assert spots.mean() < background - 25


# ---------------------------------------------------------------- Visium


def test_visium_tiny(shared_data, benchmarks_data_dir):
    (a,) = read_sections(benchmarks_data_dir / "visium_tiny.yaml")
    meta = a.uns["stpredict"]
    factors = json.loads(
        (shared_data / "visium_tiny" / "spatial" / "scalefactors_json.json").read_text()
    )
    assert a.shape == (100, 100)
    assert a.obs_names[0].endswith("-1")
    assert (a.obs["in_tissue"] == 1).all()
    assert meta["spot_diameter_px"] == pytest.approx(
        factors["spot_diameter_fullres"] * factors["tissue_hires_scalef"]
    )
    assert meta["image_shape"] == [2000, 2000]
    pos = pd.read_csv(
        shared_data / "visium_tiny" / "spatial" / "tissue_positions_list.csv",
        header=None,
        index_col=0,
    )
    bc = a.obs_names[3]
    assert a.obsm["spatial"][3] == pytest.approx(
        pos.loc[bc, [5, 4]].to_numpy(float) * factors["tissue_hires_scalef"]
    )
    # Visium pitch of 100 µm measured on the whole array (hires px)
    assert meta["mpp_source"] == "spot_grid"
    assert meta["spot_pitch_px"] == pytest.approx(
        estimate_spot_pitch(pos[[5, 4]].to_numpy(float)) * factors["tissue_hires_scalef"]
    )
    with h5py.File(shared_data / "visium_tiny" / "filtered_feature_bc_matrix.h5") as f:
        total = f["matrix/data"][:].sum()
    assert a.X.sum() == pytest.approx(total)


def _copy_visium(shared_data: Path, dst: Path) -> Path:
    outs = dst / "outs"
    shutil.copytree(shared_data / "visium_tiny", outs)
    return outs


def test_visium_header_positions_and_mex(shared_data, tmp_path):
    outs = _copy_visium(shared_data, tmp_path)
    # Space Ranger 2 layout: tissue_positions.csv with a header
    old = outs / "spatial" / "tissue_positions_list.csv"
    pos = pd.read_csv(old, header=None)
    pos.columns = [
        "barcode",
        "in_tissue",
        "array_row",
        "array_col",
        "pxl_row_in_fullres",
        "pxl_col_in_fullres",
    ]
    pos.to_csv(outs / "spatial" / "tissue_positions.csv", index=False)
    old.unlink()
    m = tmp_path / "v.yaml"
    m.write_text("sections:\n  - {name: V, visium: outs}\n")
    (a,) = read_sections(m)
    assert a.shape == (100, 100)
    assert a.uns["stpredict"]["image"].endswith("tissue_hires_image.png")  # default image
    # MEX folder instead of the .h5
    mex = outs / "filtered_feature_bc_matrix"
    mex.mkdir()
    scipy.io.mmwrite(str(mex / "matrix.mtx"), sp.csr_matrix(a.X.T.astype(np.int64)))
    with gzip.open(mex / "features.tsv.gz", "wt") as fh:
        for g in a.var_names:
            fh.write(f"{g}\t{g}\tGene Expression\n")
    with gzip.open(mex / "barcodes.tsv.gz", "wt") as fh:
        fh.write("\n".join(a.obs_names) + "\n")
    (outs / "filtered_feature_bc_matrix.h5").unlink()
    (b,) = read_sections(m)
    assert (b.X != a.X).nnz == 0 and list(b.obs_names) == list(a.obs_names)


# ---------------------------------------------------------------- h5ad


def test_h5ad_roundtrip(shared_data, benchmarks_data_dir, tmp_path):
    (v,) = read_sections(benchmarks_data_dir / "visium_tiny.yaml")
    factors = json.loads(
        (shared_data / "visium_tiny" / "spatial" / "scalefactors_json.json").read_text()
    )
    s = factors["tissue_hires_scalef"]
    h = ad.AnnData(
        X=np.log1p(v.X.toarray()),  # a processed X; raw counts in a layer
        obs=pd.DataFrame(
            {"region": ["tumour" if i % 3 else "stroma" for i in range(v.n_obs)]}, index=v.obs_names
        ),
        var=pd.DataFrame({"symbol": [f"G{i}" for i in range(v.n_vars)]}, index=v.var_names),
    )
    h.layers["counts"] = v.X.copy()
    h.obsm["spatial"] = v.obsm["spatial"] / s  # squidpy: full-resolution pixels
    h.uns["spatial"] = {"lib": {"scalefactors": factors}}
    h.write_h5ad(tmp_path / "sec.h5ad")
    (tmp_path / "hires.png").symlink_to(
        shared_data / "visium_tiny" / "spatial" / "tissue_hires_image.png"
    )
    m = tmp_path / "h.yaml"
    m.write_text(
        "sections:\n"
        "  - {name: H, h5ad: sec.h5ad, image: hires.png, scale: hires, layer: counts,\n"
        "     gene_column: symbol, label_column: region, spot_pitch_um: 100}\n"
    )
    (a,) = read_sections(m)
    assert (a.X != v.X).nnz == 0
    assert a.var_names[0] == "G0"
    assert a.obsm["spatial"] == pytest.approx(v.obsm["spatial"])
    assert a.uns["stpredict"]["spot_diameter_px"] == pytest.approx(
        v.uns["stpredict"]["spot_diameter_px"]
    )
    assert list(a.obs["label"][:3]) == ["stroma", "tumour", "tumour"]
    m.write_text("sections:\n  - {name: H, h5ad: sec.h5ad, spatial_key: xy}\n")
    with pytest.raises(DatasetError, match=r"section 'H': .*has no obsm\['xy'\]"):
        read_sections(m)
    m.write_text("sections:\n  - {name: H, h5ad: sec.h5ad, layer: raw_counts}\n")
    with pytest.raises(
        DatasetError, match=r"field 'layer': .* has no layer 'raw_counts' \(layers: counts\)"
    ):
        read_sections(m)
    (tmp_path / "bad.h5ad").write_text("not hdf5")
    m.write_text("sections:\n  - {name: H, h5ad: bad.h5ad}\n")
    with pytest.raises(DatasetError, match=r"bad\.h5ad is not a readable \.h5ad file"):
        read_sections(m)


# ---------------------------------------------------------------- pixel size


def test_mpp_priority_manifest_then_image_then_grid(wsi_dir, tmp_path):
    """An SVS knows its mpp (0.499): it beats the spot grid; the manifest's mpp beats both."""
    rng = np.random.default_rng(0)
    xs, ys = np.meshgrid(np.arange(5), np.arange(5))
    xy = np.c_[xs.ravel(), ys.ravel()] * 400.0 + 300  # 200 µm at 0.5 µm/px
    counts = pd.DataFrame(
        rng.poisson(3, (25, 4)),
        columns=["A", "B", "C", "D"],
        index=[f"{x}x{y}" for x, y in zip(xs.ravel(), ys.ravel(), strict=True)],
    )
    counts.to_csv(tmp_path / "c.tsv", sep="\t")
    pd.DataFrame(
        {"x": xs.ravel(), "y": ys.ravel(), "pixel_x": xy[:, 0], "pixel_y": xy[:, 1]}
    ).to_csv(tmp_path / "s.tsv", sep="\t", index=False)
    svs = wsi_dir / "cmu_small_region.svs"
    m = tmp_path / "m.yaml"
    base = "{name: S, counts: c.tsv, spots: s.tsv, spot_pitch_um: 200"
    m.write_text(f"sections:\n  - {base}, image: {svs}}}\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # grid (0.5) and file (0.499) agree: no warning
        (a,) = read_sections(m)
    assert a.uns["stpredict"]["mpp_source"] == "image"
    assert a.uns["stpredict"]["mpp"] == pytest.approx(0.499, abs=1e-3)
    m.write_text(f"sections:\n  - {base}, image: {svs}, mpp: 0.25}}\n")
    with pytest.warns(UserWarning, match=r"spot grid gives 0\.5 µm/px but the manifest says 0\.25"):
        assert read_sections(m)[0].uns["stpredict"]["mpp"] == 0.25
    m.write_text(f"sections:\n  - {base}}}\n")
    (a,) = read_sections(m)
    assert a.uns["stpredict"]["mpp_source"] == "spot_grid"
    assert a.uns["stpredict"]["mpp"] == pytest.approx(200 / 400)
    m.write_text("sections:\n  - {name: S, counts: c.tsv, spots: s.tsv}\n")
    (a,) = read_sections(m)
    assert a.uns["stpredict"]["mpp"] is None and a.uns["stpredict"]["mpp_source"] is None


@pytest.mark.parametrize("kind", ["square", "hex"])
def test_estimate_spot_pitch_on_noisy_grids(kind):
    rng = np.random.default_rng(1)
    pitch = 137.0
    if kind == "square":  # legacy ST: rows and columns one pitch apart
        gx, gy = np.meshgrid(np.arange(30), np.arange(30))
        xy = np.c_[gx.ravel(), gy.ravel()] * pitch
    else:  # Visium: rows √3/2 pitch apart, odd rows shifted by half a pitch
        rows, cols = np.meshgrid(np.arange(30), np.arange(30), indexing="ij")
        xy = np.c_[(cols + 0.5 * (rows % 2)).ravel() * pitch, rows.ravel() * pitch * np.sqrt(3) / 2]
    noisy = xy + rng.normal(0, 0.06 * pitch, xy.shape)
    assert estimate_spot_pitch(xy) == pytest.approx(pitch)
    assert estimate_spot_pitch(noisy) == pytest.approx(pitch, rel=0.02)
    assert estimate_spot_pitch(xy[:2]) is None


# ---------------------------------------------------------------- bad input


@pytest.fixture
def small_b4(her2st_dir, tmp_path):
    """A small real table pair (30 spots × 50 genes of B4) in tmp_path, and a manifest writer."""
    counts = pd.read_csv(her2st_dir / "counts" / "B4.tsv.gz", sep="\t", index_col=0, nrows=30).iloc[
        :, :50
    ]
    spots = pd.read_csv(her2st_dir / "spots" / "B4_selection.tsv", sep="\t")
    image = her2st_dir / "images" / "B4.jpg"

    def write(counts=counts, spots=spots, extra: str = "", image=image) -> Path:
        counts.to_csv(tmp_path / "c.tsv", sep="\t")
        spots.to_csv(tmp_path / "s.tsv", sep="\t", index=False)
        img = f", image: {image}" if image else ""
        m = tmp_path / "m.yaml"
        m.write_text(f"sections:\n  - {{name: B4, counts: c.tsv, spots: s.tsv{img}{extra}}}\n")
        return m

    return counts, spots, write


def test_small_table_reads(small_b4):
    counts, _, write = small_b4
    (a,) = read_sections(write())
    assert a.shape == (30, 50)
    assert a.X.sum() == counts.to_numpy().sum()


def test_nan_and_negative_counts(small_b4):
    counts, _, write = small_b4
    bad = counts.astype(float).copy()
    bad.iloc[3, 4] = np.nan
    with pytest.raises(
        DatasetError,
        match=r"m\.yaml: section 'B4': counts .*c\.tsv has NaN/empty or infinite values \(spot '.+'\)",
    ):
        read_sections(write(counts=bad))
    bad = counts.copy()
    bad.iloc[2, 1] = -3
    with pytest.raises(DatasetError, match=r"section 'B4': counts .* has negative values"):
        read_sections(write(counts=bad))
    bad = counts.astype(object).copy()
    bad.iloc[0, 0] = "many"
    with pytest.raises(DatasetError, match=r"counts .* has non-numeric values"):
        read_sections(write(counts=bad))


def test_spots_outside_image(small_b4):
    _, _, write = small_b4
    with pytest.raises(
        DatasetError,
        match=r"section 'B4': \d+ of 30 spots lie outside the image B4\.jpg \(9272 x 9923 px\).*check pixel_columns and scale",
    ):
        read_sections(write(extra=", scale: 3.0"))


def test_no_matching_spot_ids(small_b4):
    _, _, write = small_b4
    with pytest.raises(
        DatasetError,
        match=r"no counts row matches the spots table \(counts ids like '\d+x\d+', spot ids like '\d+-\d+'",
    ):
        read_sections(write(extra=", spot_id: '{x}-{y}'"))
    with pytest.raises(
        DatasetError, match=r"spots table .* has no column 'col' used by the id template"
    ):
        read_sections(write(extra=", spot_id: '{col}x{y}'"))
    with pytest.raises(DatasetError, match=r"has no pixel column 'px'"):
        read_sections(write(extra=", pixel_columns: [px, pixel_y]"))
    with pytest.raises(DatasetError, match=r"has no selected_column 'keep'"):
        read_sections(write(extra=", selected_column: keep"))


def test_duplicate_and_missing_coordinates(small_b4):
    _, spots, write = small_b4
    dup = pd.concat([spots, spots.iloc[:1]])
    with pytest.raises(DatasetError, match=r"has duplicate spot id '9x13'"):
        read_sections(write(spots=dup))
    noid = spots.astype({"x": float}).copy()
    noid.loc[3, "x"] = np.nan
    with pytest.raises(
        DatasetError, match=r"spots table .* has 1 row\(s\) with empty id columns \(x, y\)"
    ):
        read_sections(write(spots=noid))
    nan = spots.copy()
    nan.loc[0, "pixel_x"] = np.nan
    with pytest.raises(
        DatasetError, match=r"1 spot\(s\) with missing or non-finite pixel coordinates"
    ):
        read_sections(write(spots=nan))


def test_check_image_false_does_not_open(small_b4, tmp_path):
    _, _, write = small_b4
    m = write(extra=", scale: 3.0")
    spec = load_manifest(m).sections[0]
    a = read_section(spec, check_image=False)  # no image check: no error, no shape
    assert a.uns["stpredict"]["image_shape"] is None
    (tmp_path / "fake.jpg").write_bytes(b"\xff\xd8\xffnot a jpeg")
    m = write(image=tmp_path / "fake.jpg")
    with pytest.raises(DatasetError, match=r"field 'image': .*fake\.jpg: corrupt image header"):
        read_sections(m)
