"""Tumour score, threshold, regions and validation: synthetic checks and real data."""

from __future__ import annotations

import numpy as np
import pytest
from shapely.geometry import Point

from napari_stpredict.errors import StPredictError
from napari_stpredict.inference.grid import TileGrid
from napari_stpredict.tumor import (
    DEFAULT_TUMOR_GENES,
    GridGeometry,
    Signature,
    TumorError,
    evaluate_scores,
    mask_to_polygons,
    model_gene_stats,
    otsu_threshold,
    parse_gene_set,
    read_model_metadata,
    score_adata,
    score_matrix,
    score_predictions,
    score_store,
    smooth_score,
    threshold_score,
    tumor_area,
    tumor_auroc,
    tumor_labels_to_binary,
    tumor_mask,
    tumor_regions,
    validate_gene_sets,
)

GENES = ["ERBB2", "KRT19", "EPCAM", "COL1A1"]


# ----------------------------------------------------------------------------- gene sets
def test_parse_gene_set_weights_and_separators():
    sig = parse_gene_set("ERBB2, KRT19 KRT8 : 0.5;COL1A1=-1\nEPCAM")
    assert sig.genes == ("ERBB2", "KRT19", "KRT8", "COL1A1", "EPCAM")
    assert sig.weights == (1.0, 1.0, 0.5, -1.0, 1.0)
    assert parse_gene_set(sig.to_text()) == sig


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        (" , ;", "empty"),
        ("ERBB2, ERBB2", "duplicate"),
        ("ERBB2:x", "cannot read"),
        ("A:0", "not all zero"),
    ],
)
def test_bad_gene_sets_are_one_line_errors(text, fragment):
    with pytest.raises(StPredictError, match=fragment) as err:
        parse_gene_set(text)
    assert "\n" not in str(err.value)


def test_signature_resolution_strict_and_default():
    with pytest.raises(TumorError, match="NOPE not among"):
        score_matrix(np.zeros((3, 4)), GENES, gene_set=["ERBB2", "NOPE"])
    # the default set drops what the model lacks and says so
    x = np.random.default_rng(0).normal(size=(20, 4))
    sc = score_predictions(x.T.reshape(4, 4, 5), GENES)
    assert sc.genes == ("ERBB2", "KRT19", "EPCAM")
    assert set(sc.missing) == set(DEFAULT_TUMOR_GENES) - {"ERBB2", "KRT19", "EPCAM"}
    with pytest.raises(TumorError, match="none of"):
        score_matrix(x, ["A", "B", "C", "D"])
    with pytest.raises(TumorError, match="weights"):
        Signature.create(["A", "B"], [1.0])


# ----------------------------------------------------------------------------- scores
def test_score_is_weighted_mean_zscore_against_given_stats():
    rng = np.random.default_rng(1)
    values = rng.normal(1.0, 0.5, size=(4, 6, 7)).astype(np.float32)
    values[:, 0, 0] = np.nan
    stats = {"mean": np.array([1.0, 2.0, 0.5, 3.0]), "std": np.array([0.5, 1.0, 0.25, 2.0])}
    sc = score_predictions(values, GENES, gene_set={"ERBB2": 2.0, "COL1A1": -1.0}, gene_stats=stats)
    z0 = (values[0] - 1.0) / 0.5
    z3 = (values[3] - 3.0) / 2.0
    expected = (2 * z0 - z3) / 3.0
    np.testing.assert_allclose(sc.score, expected, rtol=1e-5, equal_nan=True)
    assert np.isnan(sc.score[0, 0]) and sc.predicted.sum() == 41
    # the same statistics give the same score on another "slide": the scale is fixed
    sc2 = score_predictions(
        values[:, :3] + 0.0, GENES, gene_set={"ERBB2": 2.0, "COL1A1": -1.0}, gene_stats=stats
    )
    np.testing.assert_allclose(sc2.score, expected[:3], rtol=1e-5, equal_nan=True)
    assert sc.reference == "model"
    own = score_predictions(values, GENES, gene_set=["ERBB2"])
    assert own.reference == "slide"
    assert abs(np.nanmean(own.score)) < 1e-5


def test_score_matrix_matches_score_predictions():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(30, 4))
    stats = {"mean": x.mean(0), "std": x.std(0)}
    a = score_matrix(x, GENES, gene_set=["ERBB2", "EPCAM"], gene_stats=stats)
    b = score_predictions(
        x.T.reshape(4, 5, 6), GENES, gene_set=["ERBB2", "EPCAM"], gene_stats=stats
    )
    np.testing.assert_allclose(a.reshape(5, 6), b.score, rtol=1e-5)


# ----------------------------------------------------------------------------- threshold
def test_threshold_range_otsu_smoothing_and_min_size():
    s = np.full((10, 10), -1.0, np.float32)
    s[2:6, 2:6] = 2.0  # a 16-cell region
    s[8, 8] = 2.0  # a 1-cell speck
    s[0, 9] = np.nan
    thr = otsu_threshold(s)
    assert -1.0 < thr < 2.0
    mask = tumor_mask(s, thr)
    assert mask.sum() == 17 and not mask[0, 9]
    assert tumor_mask(s, thr, min_size=2).sum() == 16
    tissue = np.ones_like(mask)
    tissue[2, 2] = False
    assert tumor_mask(s, thr, tissue=tissue).sum() == 16
    with pytest.raises(TumorError, match="outside the score range") as err:
        tumor_mask(s, 5.0)
    assert "\n" not in str(err.value)
    with pytest.raises(TumorError, match="not a finite"):
        tumor_mask(s, float("nan"))
    with pytest.raises(TumorError, match="two different"):
        otsu_threshold(np.ones((3, 3)))
    sm = smooth_score(s, 1.0)
    assert np.isnan(sm[0, 9])  # unscored stays unscored
    assert sm[8, 8] < 2.0 and sm[4, 4] > sm[8, 8]  # the speck is blurred away more than the block
    tm = threshold_score(
        score_predictions(
            s[None], ["ERBB2"], gene_set=["ERBB2"], gene_stats={"mean": [0], "std": [1]}
        )
    )
    assert tm.method == "otsu" and tm.mask.sum() == 17


def test_tumor_area_in_mm2_and_percent():
    grid = TileGrid((1000, 1000), 0.5, patch_um=100, patch_px=32)  # 200 px = 100 µm cells, 5×5
    mask = np.zeros(grid.shape, bool)
    mask[:2, :2] = True
    tissue = np.zeros(grid.shape, bool)
    tissue[:4, :4] = True
    a = tumor_area(mask, grid, tissue=tissue)
    assert a.tumor_cells == 4 and a.tissue_cells == 16
    assert a.tumor_mm2 == pytest.approx(4 * 0.01) and a.tissue_mm2 == pytest.approx(0.16)
    assert a.percent == pytest.approx(25.0)
    assert "mm²" in a.text() and "25.0%" in a.text()


# ----------------------------------------------------------------------------- polygons
def test_polygons_follow_cell_edges_with_holes_in_level0_px():
    grid = TileGrid((1000, 1400), 0.5, patch_um=100, patch_px=32)  # 200 px cells, 5×7 grid
    geo = GridGeometry.from_grid(grid)
    mask = np.zeros(grid.shape, bool)
    mask[1:4, 1:4] = True
    mask[2, 2] = False  # a hole
    mask[0, 5] = mask[1, 6] = True  # two cells touching at a corner: two regions
    polys = mask_to_polygons(mask, grid)
    assert len(polys) == 3
    ring = max(polys, key=lambda p: p.area)  # regions come in raster order
    assert ring.is_valid and len(ring.interiors) == 1
    assert ring.area == pytest.approx(8 * 200 * 200)
    assert ring.bounds == (200.0, 200.0, 800.0, 800.0)  # x0, y0, x1, y1
    for i, j in np.argwhere(mask):
        y, x = geo.centers_px(i, j)
        assert any(p.contains(Point(x, y)) for p in polys)
    y, x = geo.centers_px(2, 2)
    assert not any(p.contains(Point(x, y)) for p in polys)
    # the last column of cells extends past the slide's right edge: clipped to the slide
    grid2 = TileGrid((1000, 1300), 0.5, patch_um=100, patch_px=32)
    mask2 = np.zeros(grid2.shape, bool)
    mask2[:, -1] = True
    (edge,) = mask_to_polygons(mask2, grid2)
    assert edge.bounds[2] == 1300.0 and edge.area == pytest.approx(100 * 1000)


def test_region_measurements_are_means_over_cells():
    grid = TileGrid((600, 600), 0.5, patch_um=100, patch_px=32)
    values = np.arange(2 * 9, dtype=np.float32).reshape(2, 3, 3)
    mask = np.zeros((3, 3), bool)
    mask[0, :2] = True
    (r,) = tumor_regions(mask, grid, values=values, genes=["A", "B"])
    assert r.measurements["A"] == pytest.approx(0.5)
    assert r.measurements["B"] == pytest.approx(9.5)
    assert r.measurements["Cells"] == 2 and r.measurements["Area µm^2"] == pytest.approx(
        2 * 100 * 100
    )


# ----------------------------------------------------------------------------- validation
def _auroc_by_hand(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random tumour spot outscores a random non-tumour one (ties = ½)."""
    pos, neg = scores[positive], scores[~positive]
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return (greater + 0.5 * ties) / (len(pos) * len(neg))


def test_label_mapping_documents_the_classes():
    y, keep = tumor_labels_to_binary(
        ["invasive cancer", "Cancer in situ", "undetermined", None, "breast glands", float("nan")]
    )
    assert y.tolist() == [True, True, False, False, False, False]
    assert keep.tolist() == [True, True, False, False, True, False]


@pytest.fixture(scope="module")
def labelled(benchmarks_data_dir, her2st_dir):
    from napari_stpredict.st import read_sections

    return read_sections(benchmarks_data_dir / "her2st_labelled.yaml", sections=["B1", "H1"])


def test_auroc_on_labelled_sections_equals_hand_check(labelled):
    for adata in labelled:
        s = score_adata(adata)
        labels = adata.obs["label"].astype(object).to_numpy()
        m = evaluate_scores(s, labels)
        keep = labels != "undetermined"
        y = np.isin(labels, ["invasive cancer", "cancer in situ"])
        assert m.auroc == pytest.approx(_auroc_by_hand(s[keep], y[keep]), abs=1e-12)
        assert m.n == keep.sum() and m.n_tumor == (y & keep).sum()
        assert m.n_excluded == (~keep).sum() > 0
        assert 0.6 < m.auroc <= 1.0  # the default signature localizes tumour on measured data
        pred = s[keep] >= m.threshold
        tp = (pred & y[keep]).sum()
        assert m.f1 == pytest.approx(2 * tp / (pred.sum() + y[keep].sum()))


def test_tumor_auroc_entry_point_and_validation_table(labelled):
    from napari_stpredict.st import normalize

    a = labelled[0]
    genes = [str(g) for g in a.var_names]
    expr = normalize(a.X)
    m = tumor_auroc(expr, genes, a.obs["label"].astype(object).to_numpy())
    ref = evaluate_scores(score_adata(a), a.obs["label"].astype(object).to_numpy())
    assert m.auroc == pytest.approx(ref.auroc, abs=1e-6)
    rows = validate_gene_sets(
        labelled, {"erbb2": ["ERBB2"], "default": list(DEFAULT_TUMOR_GENES)}, reference="section"
    )
    sections = {r["section"] for r in rows}
    assert sections == {"B1", "H1", "pooled", "mean"}
    per = next(r for r in rows if r["gene_set"] == "erbb2" and r["section"] == "B1")
    by_hand = score_adata(a, gene_set=["ERBB2"])
    assert per["auroc"] == pytest.approx(
        evaluate_scores(by_hand, a.obs["label"].astype(object).to_numpy()).auroc
    )


# ----------------------------------------------------------------------------- real predicted store
def test_score_on_a_real_predicted_store(real_store):
    store, model_path = real_store
    genes = list(store.genes)
    meta = read_model_metadata(model_path)
    stats = model_gene_stats(model_path, genes)
    from napari_stpredict.model.header import header_gene_stats

    np.testing.assert_allclose(stats["mean"], header_gene_stats(meta, genes)["mean"], rtol=1e-6)
    gene_set = [g for g in DEFAULT_TUMOR_GENES if g in genes] or genes[:3]
    sc = score_store(store, gene_set=gene_set, model=model_path)  # the model's training statistics
    assert sc.reference == "model"
    done = np.asarray(store.done[...])
    assert np.array_equal(sc.predicted, done)
    expected = score_matrix(
        np.stack([np.asarray(store.values[i])[done] for i in range(len(genes))], axis=1),
        genes,
        gene_set=gene_set,
        gene_stats=stats,
    )
    np.testing.assert_allclose(sc.score[done], expected, rtol=1e-4, atol=1e-5)
    tm = threshold_score(sc, threshold="otsu")
    assert 0 < tm.mask.sum() < done.sum()
    area = tm.area(store.grid)
    assert area.tissue_cells == done.sum() and 0 < area.percent < 100
    polys = mask_to_polygons(tm.mask, store.grid, clip=False)
    assert sum(p.area for p in polys) == pytest.approx(
        tm.mask.sum() * store.grid.stride_px**2, rel=1e-6
    )
    with pytest.raises(TumorError):
        tumor_mask(sc.score, sc.range()[1] + 1.0)


# ----------------------------------------------------------------------------- signature vs model
def _synthetic_store(tmp_path, genes):
    from napari_stpredict.inference.store import PredictionStore

    grid = TileGrid((800, 1000), 0.5, patch_um=100, patch_px=32)
    st = PredictionStore.open(tmp_path / "cache", key="sig", genes=genes, grid=grid)
    gh, gw = grid.shape
    ii, jj = np.mgrid[:gh, :gw]
    cells = np.stack([ii.ravel(), jj.ravel()], axis=1)
    st.write(cells, np.random.default_rng(0).random((len(cells), len(genes))))
    return st


def test_store_score_uses_the_models_recorded_signature(tmp_path):
    genes = ["ERBB2", "EPCAM", "KRT8", "CDH1", "CLDN4", "VIM"]
    st = _synthetic_store(tmp_path, genes)
    stats = {"mean": [0.5] * len(genes), "std": [0.3] * len(genes)}
    meta = {"genes": genes, "gene_stats": stats, "tumor_signature": ["EPCAM", "KRT8", "CLDN4"]}
    sc = score_store(st, model=meta)
    assert sc.genes == ("EPCAM", "KRT8", "CLDN4") and sc.reference == "model"
    # without a recorded signature: every default gene the model has
    sc = score_store(st, model={"genes": genes, "gene_stats": stats})
    assert sc.genes == ("ERBB2", "EPCAM", "KRT8", "CDH1")
    # a typed set is used as typed
    assert score_store(st, model=meta, gene_set=["VIM"]).genes == ("VIM",)


def test_model_without_signature_genes_predicts_but_refuses_tumour(tmp_path):
    """A model whose panel lacks every signature gene: predictions work, the tumour layer is
    refused with one line, and tumour_support() says so from the header alone."""
    import torch

    from napari_stpredict.model import Predictor, build_model, save_model_file
    from napari_stpredict.model.checkpoint import compute_gene_stats
    from napari_stpredict.model.header import read_model_header
    from napari_stpredict.st.genesets import tumour_support

    genes = ["VIM", "CD74", "COL1A1", "PTPRC"]
    torch.manual_seed(0)
    model = build_model("regression", n_genes=len(genes), pretrained="none")
    expr = np.random.default_rng(1).random((20, len(genes))).astype(np.float32)
    path = tmp_path / "nosig.safetensors"
    meta = {
        "genes": genes,
        "normalization": {"method": "log1p_cpm", "target_sum": 1e4},
        "patch_um": 100.0,
        "patch_px": 32,
        "training_sections": ["S1"],
        "gene_stats": compute_gene_stats(expr),
        "tumor_signature": [],
    }
    save_model_file(path, model, bank_embeddings=None, bank_expression=None, metadata=meta)
    pred = Predictor(path, device="cpu")
    out = pred.predict(np.full((2, 32, 32, 3), 200, np.uint8))
    assert out.shape == (2, len(genes)) and np.isfinite(out).all()
    ok, reason = tumour_support(read_model_header(path))
    assert not ok and reason.startswith("tumour signature: none of ERBB2") and "\n" not in reason
    assert tumour_support(path) == (ok, reason)
    st = _synthetic_store(tmp_path, genes)
    with pytest.raises(TumorError) as err:
        score_store(st, model=path)
    assert str(err.value) == reason


def test_default_signature_is_the_choice_of_the_selection_sections(benchmarks_data_dir, her2st_dir):
    """The default is the best pre-declared candidate on B1, C1, D1 alone (measured
    expression, z-scores over those sections): chosen without the sections it is reported on."""
    from napari_stpredict.st import read_sections
    from napari_stpredict.tumor import CANDIDATE_GENE_SETS

    chosen = ["B1", "C1", "D1"]
    adatas = read_sections(benchmarks_data_dir / "her2st_labelled.yaml", sections=chosen)
    rows = validate_gene_sets(dict(zip(chosen, adatas, strict=True)))
    assert {r["section"] for r in rows} == {*chosen, "pooled", "mean"}
    means = {r["gene_set"]: r["auroc"] for r in rows if r["section"] == "mean"}
    assert set(means) == set(CANDIDATE_GENE_SETS)
    best = max(means, key=means.get)
    assert tuple(CANDIDATE_GENE_SETS[best]["genes"]) == DEFAULT_TUMOR_GENES
