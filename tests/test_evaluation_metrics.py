"""Metric functions of the evaluation against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_stpredict.errors import StPredictError
from napari_stpredict.evaluation import (
    BREAST_CANCER_MARKERS,
    PAM50,
    auroc,
    gene_gene_corr,
    load_markers,
    mae,
    match_genes,
    mse,
    pearson_per_gene,
    score_section,
    select_heg,
    select_hvg,
)
from napari_stpredict.evaluation.scoring import marker_zscore, tumor_positive


def test_pearson_hand_computed():
    # gene 0: pred = 2*true + 1 → r = 1; gene 1: reversed → r = -1
    # gene 2: true (1,2,3,4), pred (1,3,2,4): cov = 4/… → r = 0.8 by hand:
    #   dx = (-1.5,-.5,.5,1.5), dy = (-1.5,.5,-.5,1.5); Σdxdy = 2.25-.25-.25+2.25 = 4; Σdx² = Σdy² = 5
    true = np.array([[1, 1, 1], [2, 2, 2], [3, 3, 3], [4, 4, 4]], dtype=float)
    pred = np.array([[3, 4, 1], [5, 3, 3], [7, 2, 2], [9, 1, 4]], dtype=float)
    r = pearson_per_gene(true, pred)
    np.testing.assert_allclose(r, [1.0, -1.0, 0.8], atol=1e-12)


def test_pearson_constant_and_nan_genes_are_zero():
    true = np.array([[1.0, 5.0, 1.0, 0.1], [2.0, 5.0, np.nan, 0.1], [3.0, 5.0, 3.0, 0.1]])
    pred = np.array([[2.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0], [2.0, 3.0, 3.0, 3.0]])
    r = pearson_per_gene(true, pred)
    # gene 0: constant prediction; gene 1: constant truth; gene 2: NaN; gene 3: 0.1 repeated
    # (its mean is not exactly 0.1 in floating point, which must still count as constant)
    assert r.tolist() == [0.0, 0.0, 0.0, 0.0]
    # matches numpy's corrcoef with NaN → 0 (the paper's code) on a generic case
    rng = np.random.default_rng(0)
    t, p = rng.normal(size=(30, 5)), rng.normal(size=(30, 5))
    ref = [np.corrcoef(p[:, i], t[:, i])[0, 1] for i in range(5)]
    np.testing.assert_allclose(pearson_per_gene(t, p), ref, atol=1e-12)


def test_pearson_single_spot_and_shape_errors():
    assert pearson_per_gene(np.ones((1, 3)), np.ones((1, 3))).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="shape"):
        pearson_per_gene(np.ones((3, 2)), np.ones((3, 3)))


def test_heg_hvg_selection():
    true = np.array(
        [
            [10.0, 0.0, 1.0, 5.0],
            [10.0, 4.0, 2.0, 5.0],
            [10.0, 8.0, 3.0, 5.0],
        ]
    )
    # totals: 30, 12, 6, 15 → top 2 = genes 0 and 3
    assert select_heg(true, 2).tolist() == [0, 3]
    # variances: 0, 10.67, 0.67, 0 → top 2 = genes 1, 2
    assert select_hvg(true, 2).tolist() == [1, 2]
    # asking for more than there are gives all genes
    assert select_heg(true, 50).tolist() == [0, 1, 2, 3]
    # ties keep gene order (deterministic): genes 0 and 3 have variance 0
    assert select_hvg(true, 3).tolist() == [0, 1, 2]
    with pytest.raises(ValueError):
        select_heg(true, 0)


def test_mse_mae_hand_computed():
    true = np.array([[0.0, 1.0], [2.0, 3.0]])
    pred = np.array([[1.0, 1.0], [0.0, 3.0]])
    assert mse(true, pred) == pytest.approx((1 + 0 + 4 + 0) / 4)
    assert mae(true, pred) == pytest.approx((1 + 0 + 2 + 0) / 4)
    # NaN in the truth is ignored
    true[0, 0] = np.nan
    assert mse(true, pred) == pytest.approx(4 / 3)


def test_gene_gene_corr():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(50, 1))
    true = np.hstack([base + 0.1 * rng.normal(size=(50, 1)) * k for k in range(1, 6)])
    true = np.hstack([true, rng.normal(size=(50, 3))])
    # a prediction that is an affine transform per gene keeps every correlation: r = 1
    pred = true * np.arange(1, 9) + 3
    assert gene_gene_corr(true, pred) == pytest.approx(1.0)
    # hand-computed with numpy on a subset
    p2 = rng.normal(size=true.shape)
    sub = [0, 2, 4, 6]
    ct = np.corrcoef(true[:, sub].T)[np.triu_indices(4, 1)]
    cp = np.corrcoef(p2[:, sub].T)[np.triu_indices(4, 1)]
    assert gene_gene_corr(true, p2, sub) == pytest.approx(np.corrcoef(ct, cp)[0, 1])
    # a constant predicted gene has undefined correlations: counted as 0, result still finite
    p3 = pred.copy()
    p3[:, 0] = 1.0
    v = gene_gene_corr(true, p3)
    assert math.isfinite(v) and v < 1.0
    # fewer than 3 genes: a single pair has no correlation across pairs → 0
    assert gene_gene_corr(true, pred, [0, 1]) == 0.0


def test_auroc_hand_computed():
    # positives 0.8, 0.4; negatives 0.5, 0.1: pairs (.8>.5, .8>.1, .4<.5, .4>.1) → 3/4
    assert auroc([0.8, 0.5, 0.4, 0.1], [True, False, True, False]) == pytest.approx(0.75)
    # ties count one half
    assert auroc([1.0, 1.0], [True, False]) == pytest.approx(0.5)
    assert math.isnan(auroc([1.0, 2.0], [True, True]))


def test_markers_lists_and_files(tmp_path, shared_data):
    # PAM50 matches the genefu file, with the old symbols renamed
    rows = [
        ln.split(",")[0].strip('"')
        for ln in (shared_data / "genelists" / "genefu_pam50_model.csv").read_text().splitlines()
        if ln and not ln.startswith("#")
    ][1:]
    renamed = {"CDCA1": "NUF2", "KNTC2": "NDC80", "ORC6L": "ORC6"}
    assert sorted(PAM50) == sorted(renamed.get(g, g) for g in rows)
    for g in ("ERBB2", "ESR1", "PGR", "MKI67", "KRT19", "EPCAM"):
        assert g in BREAST_CANCER_MARKERS
    assert len(set(BREAST_CANCER_MARKERS)) == len(BREAST_CANCER_MARKERS)
    # the genefu CSV itself is a valid --markers file ("probe" column)
    loaded = load_markers(shared_data / "genelists" / "genefu_pam50_model.csv")
    assert loaded == rows
    txt = tmp_path / "m.txt"
    txt.write_text("# comment\nERBB2\n\nesr1\nERBB2\n")
    assert load_markers(txt) == ["ERBB2", "esr1"]
    idx, missing = match_genes(["A", "ESR1", "ERBB2"], [*load_markers(txt), "NOPE"])
    assert idx == [2, 1] and missing == ["NOPE"]
    with pytest.raises(StPredictError, match="not found"):
        load_markers(tmp_path / "absent.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(StPredictError, match="no gene"):
        load_markers(tmp_path / "empty.txt")


def test_score_section_keys_and_tumor_auroc():
    rng = np.random.default_rng(2)
    n = 40
    genes = ["ERBB2", "KRT19", "VIM", "G4", "G5"]
    tumor = np.arange(n) < 15
    true = rng.normal(size=(n, 5))
    true[tumor, :2] += 3.0  # the tumour markers are up in tumour spots
    pred = true + 0.5 * rng.normal(size=true.shape)
    labels = np.where(tumor, "invasive cancer", "connective tissue").astype(object)
    labels[-3:] = "undetermined"
    s = score_section(
        true, pred, genes, section="S", markers=["ERBB2", "VIM", "ABSENT"], n_top=2, labels=labels
    )
    assert set(s.metrics) == {
        "pcc_heg", "pcc_hvg", "pcc_mg", "pcc_all", "mse", "mae", "gene_gene_corr",
        "tumor_auroc", "tumor_auroc_measured",
    }  # fmt: skip
    np.testing.assert_allclose(s.metrics["pcc_all"], pearson_per_gene(true, pred).mean())
    assert s.mg.tolist() == [0, 2]
    assert s.metrics["pcc_mg"] == pytest.approx(s.pcc[[0, 2]].mean())
    assert s.metrics["tumor_auroc_measured"] > 0.95
    assert 0.5 < s.metrics["tumor_auroc"] <= 1.0
    keep, pos = tumor_positive(labels)
    assert keep.sum() == n - 3 and pos.sum() == 15
    # no labels → no AUROC keys; no marker in the panel → pcc_mg NaN
    s2 = score_section(true, pred, genes, section="S", markers=["ABSENT"])
    assert "tumor_auroc" not in s2.metrics and math.isnan(s2.metrics["pcc_mg"])
    assert np.isnan(marker_zscore(true, ["A", "B", "C", "D", "E"])).all()


def test_tumor_auroc_on_real_labels(benchmarks_data_dir, her2st_dir):
    """Pathologist labels of a real HER2ST section: measured expression localises the tumour,
    a spot-shuffled 'prediction' does not (the labelled sections have no image to predict from)."""
    from napari_stpredict.evaluation.data import load_section, measured_expression
    from napari_stpredict.evaluation.protocol import _tumor_score_fn
    from napari_stpredict.st import load_manifest

    m = load_manifest(benchmarks_data_dir / "her2st_labelled.yaml")
    sec = load_section(m.section("B1"))
    assert sec.labels is not None and not sec.image
    genes = list(sec.adata.var_names)
    true = measured_expression(sec, genes, {"method": "log1p_cpm", "target_sum": 1e4})
    fn = _tumor_score_fn()
    same = score_section(
        true, true, genes, section="B1", markers=["ERBB2"], labels=sec.labels, tumor_score=fn
    )
    assert same.metrics["tumor_auroc"] == same.metrics["tumor_auroc_measured"] > 0.7
    shuffled = true[np.random.default_rng(0).permutation(len(true))]
    s = score_section(
        true, shuffled, genes, section="B1", markers=["ERBB2"], labels=sec.labels, tumor_score=fn
    )
    assert s.metrics["tumor_auroc"] < s.metrics["tumor_auroc_measured"] - 0.1
