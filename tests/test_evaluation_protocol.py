"""Fold construction, the no-leakage guard, the results JSON and the report."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from napari_stpredict.errors import StPredictError
from napari_stpredict.evaluation import (
    METRIC_KEYS,
    EvaluationResult,
    FoldResult,
    LeakageError,
    MethodResult,
    check_no_leakage,
    make_folds,
    score_section,
    write_report,
)


@dataclass
class _Spec:
    name: str
    patient: str = ""


SPECS = [_Spec("B4", "B"), _Spec("C2", "C"), _Spec("C3", "C"), _Spec("C4", "C"), _Spec("A2", "A")]


def test_leave_one_section_out_folds():
    folds = make_folds(SPECS)
    assert [f.test for f in folds] == [("B4",), ("C2",), ("C3",), ("C4",), ("A2",)]
    for f in folds:
        assert set(f.train) | set(f.test) == {s.name for s in SPECS}
        assert not set(f.train) & set(f.test)
        assert len(f.train) == 4


def test_leave_one_patient_out_folds():
    folds = make_folds(SPECS, cv="leave-one-patient-out")
    assert [f.test for f in folds] == [("B4",), ("C2", "C3", "C4"), ("A2",)]
    assert folds[1].train == ("B4", "A2")
    # no patient is ever split between train and test
    patient = {s.name: s.patient for s in SPECS}
    for f in folds:
        assert not {patient[n] for n in f.train} & {patient[n] for n in f.test}


def test_fold_errors():
    with pytest.raises(StPredictError, match="at least 2 sections"):
        make_folds([_Spec("A")])
    with pytest.raises(StPredictError, match="no 'patient'"):
        make_folds([_Spec("A", "p"), _Spec("B")], cv="leave-one-patient-out")
    with pytest.raises(StPredictError, match="at least 2 patients"):
        make_folds([_Spec("A", "p"), _Spec("B", "p")], cv="leave-one-patient-out")
    with pytest.raises(StPredictError, match="unknown mode"):
        make_folds(SPECS, cv="k-fold")
    with pytest.raises(StPredictError, match="duplicate"):
        make_folds([_Spec("A"), _Spec("A")])
    with pytest.raises(StPredictError, match="unknown sections"):
        make_folds(SPECS, test_sections=["Z9"])
    (only,) = make_folds(SPECS, test_sections=["C3", "A2"])
    assert only.test == ("C3", "A2") and only.train == ("B4", "C2", "C4")


def test_real_manifest_folds(benchmarks_data_dir, her2st_dir):
    from napari_stpredict.st import load_manifest

    path = benchmarks_data_dir / "her2st.yaml"
    if not path.exists():
        pytest.skip(f"{path} not written yet")
    m = load_manifest(path)
    names = [s.name for s in m.sections]
    by_patient = make_folds(m.sections, cv="leave-one-patient-out")
    assert len(make_folds(m.sections)) == len(names)
    assert sorted(n for f in by_patient for n in f.test) == sorted(names)
    patients = {s.name: s.patient for s in m.sections}
    for f in by_patient:
        assert len({patients[n] for n in f.test}) == 1


def test_no_leakage_guard():
    check_no_leakage(["A2"], training_sections=["B4", "C2"], bank_sections=["B4", "C2"])
    check_no_leakage(["A2"], training_sections=["B4"], bank_sections=None)  # regression: no bank
    with pytest.raises(LeakageError, match="used for training"):
        check_no_leakage(["A2"], training_sections=["A2", "B4"], bank_sections=["B4"])
    with pytest.raises(LeakageError, match="reference bank"):
        check_no_leakage(["A2"], training_sections=["B4"], bank_sections=["B4", "A2"])
    with pytest.raises(LeakageError, match="does not list"):
        check_no_leakage(["A2"], training_sections=None, bank_sections=None)


def _fake_result(with_failure: bool = True) -> EvaluationResult:
    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(8)] + ["ERBB2", "KRT19"]
    methods = {}
    for name, noise in (("cmrc", 0.5), ("regression", 1.0)):
        folds = []
        for test in ("S1", "S2"):
            true = rng.normal(size=(30, len(genes))) + 2
            pred = true + noise * rng.normal(size=true.shape)
            xy = rng.uniform(0, 100, size=(30, 2))
            sec = score_section(
                true, pred, genes, section=test, markers=["ERBB2", "KRT19"], xy=xy, n_top=5
            )
            folds.append(
                FoldResult(test=[test], train=["S3"], metrics=dict(sec.metrics), sections=[sec])
            )
        if with_failure and name == "regression":
            folds.append(FoldResult(test=["S3"], train=["S1", "S2"], error="RuntimeError: boom"))
        methods[name] = MethodResult(name=name, folds=folds)
    return EvaluationResult(
        methods=methods,
        config={"cv": "leave-one-section-out", "n_top": 5},
        versions={"napari_stpredict": "0"},
        wall_time_s=1.5,
        genes=genes,
        markers_used=["ERBB2", "KRT19"],
        markers_missing=["ESR1"],
    )


def test_results_json_shape():
    res = _fake_result()
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert set(d) >= {"methods", "config", "versions", "wall_time_s"}
    for name in ("cmrc", "regression"):
        m = d["methods"][name]
        assert set(m["mean"]) == set(METRIC_KEYS)
        assert set(m["sd"]) == set(METRIC_KEYS)
        assert all(isinstance(v, float) for v in m["mean"].values())
        ok = [f for f in m["folds"] if "error" not in f]
        assert len(ok) == 2
        for f in ok:
            assert f["test"] in (["S1"], ["S2"])
            assert set(METRIC_KEYS) <= set(f)
        # the mean is the mean of the successful folds
        assert m["mean"]["pcc_heg"] == pytest.approx(np.mean([f["pcc_heg"] for f in ok]))
        assert m["sd"]["pcc_heg"] == pytest.approx(np.std([f["pcc_heg"] for f in ok], ddof=1))
    failed = d["methods"]["regression"]["folds"][-1]
    assert failed == {"test": ["S3"], "train": ["S1", "S2"], "error": "RuntimeError: boom"}
    assert d["methods"]["regression"]["n_failed"] == 1
    # a less noisy prediction scores better: the numbers mean something
    assert d["methods"]["cmrc"]["mean"]["pcc_all"] > d["methods"]["regression"]["mean"]["pcc_all"]


def test_report_files(tmp_path: Path):
    md = write_report(_fake_result(), tmp_path / "rep")
    text = md.read_text()
    assert "| cmrc |" in text and "| regression |" in text
    assert "failed: RuntimeError: boom" in text
    assert "ESR1" in text  # missing markers are reported
    pngs = sorted(p.name for p in (tmp_path / "rep").glob("*.png"))
    assert "pcc_distribution.png" in pngs
    assert any(p.startswith("scatter_") for p in pngs) and any(
        p.startswith("spatial_") for p in pngs
    )
    for p in pngs:
        assert f"]({p})" in text
        assert (tmp_path / "rep" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv_lines = (tmp_path / "rep" / "per_gene_pcc.csv").read_text().splitlines()
    assert csv_lines[0].startswith("gene,pcc_cmrc,pcc_regression")
    assert len(csv_lines) == 1 + 10  # header + one row per gene


# ------------------------------------------------------------------------------------------
# end to end on two real HER2ST sections (tiny backbone, tiny patches, a few steps)

TWO_SECTIONS = """\
name: her2st-two
defaults:
  spot_id: "{{x}}x{{y}}"
  pixel_columns: [pixel_x, pixel_y]
  selected_column: selected
  spot_pitch_um: 200
sections:
  - name: C2
    patient: C
    image: {d}/images/C2.jpg
    counts: {d}/counts/C2.tsv.gz
    spots: {d}/spots/C2_selection.tsv
  - name: C3
    patient: C
    image: {d}/images/C3.jpg
    counts: {d}/counts/C3.tsv.gz
    spots: {d}/spots/C3_selection.tsv
"""


def tiny_config(**changes):
    """The smallest real training: test backbone, 32 px patches, frozen features, 2 steps."""
    from napari_stpredict.training import TrainConfig

    base = dict(
        backbone="test_efficientnet",
        pretrained="none",
        patch_px=32,
        batch_size=16,
        epochs=1,
        max_steps=2,
        n_top_genes=40,
        train_backbone="none",
        num_workers=2,  # 1 deadlocks training._PatchSource (nested submit on its own pool)
        top_k=10,
        device="cpu",
        tta=1,  # pinned: the defaults (8 views + context) cost 16 passes per spot
        context=0.0,
    )
    base.update(changes)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def two_sections(her2st_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("manifest") / "two.yaml"
    path.write_text(TWO_SECTIONS.format(d=her2st_dir))
    return path


@pytest.fixture(scope="module")
def evaluated(two_sections, tmp_path_factory):
    from napari_stpredict.evaluation import evaluate

    work = tmp_path_factory.mktemp("work")
    calls = []
    res = evaluate(
        two_sections,
        config=tiny_config(),
        work_dir=work,
        progress=lambda d, t, m="": calls.append((d, t, m)),
    )
    return res, work, calls


def test_evaluate_end_to_end(evaluated):
    res, _, calls = evaluated
    assert list(res.methods) == ["cmrc", "bleep", "regression", "ridge"]
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    for name in ("cmrc", "bleep", "regression", "ridge"):
        m = d["methods"][name]
        assert [f["test"] for f in m["folds"]] == [["C2"], ["C3"]]
        assert all("error" not in f for f in m["folds"]), m["folds"]
        for k in ("pcc_heg", "pcc_hvg", "pcc_all", "mse", "mae", "gene_gene_corr"):
            assert isinstance(m["mean"][k], float)
        assert -1 <= m["mean"]["pcc_all"] <= 1 and m["mean"]["mse"] > 0
        # the same budget for all; ridge is solved in closed form (no gradient steps)
        steps = 0 if name == "ridge" else 2
        assert all(f["training"]["steps"] == steps for f in m["folds"])
        # pcc_mg says how many markers it averaged and which (none of 40 HVGs may be one)
        assert m["pcc_mg_n"] == len(m["pcc_mg_genes"])
        for f in m["folds"]:
            for sec in f["sections"].values():
                assert sec["n_mg"] == len(sec["mg_genes"])
    assert calls[-1][:2] == (8, 8)  # 2 folds × 4 methods
    # identical data and budget: same panel within a fold, same training sections
    for i, test in enumerate(("C2", "C3")):
        panels = {tuple(res.methods[m].folds[i].sections[0].genes) for m in res.methods}
        assert len(panels) == 1
        for m in res.methods.values():
            assert m.folds[i].train == [{"C2": "C3", "C3": "C2"}[test]]
    # predictions of one section line up with its spots
    sec = res.methods["cmrc"].folds[0].sections[0]
    assert (
        sec.section == "C2"
        and sec.true.shape == sec.pred.shape
        and sec.xy.shape[0] == sec.true.shape[0]
    )


def test_no_leakage_in_fold_models(evaluated):
    """The held-out section never trained a fold's model nor sits in its reference bank."""
    from napari_stpredict.model import load_model_file

    res, _, _ = evaluated
    for name, m in res.methods.items():
        for f in m.folds:
            mf = load_model_file(f.model_path)
            assert not set(f.test) & set(mf.metadata["training_sections"])
            if mf.bank_section_index is not None:
                names = mf.metadata["bank_sections"]
                bank = {names[i] for i in mf.bank_section_index.tolist()}
                assert bank == set(f.train), (name, bank)
            else:
                assert name in ("regression", "ridge")


def test_score_model_matches_fold_and_refuses_leaks(evaluated, two_sections):
    from napari_stpredict.evaluation import score_model

    res, _, _ = evaluated
    fold = res.methods["bleep"].folds[0]  # trained on C3, tested on C2
    again = score_model(fold.model_path, two_sections, test_sections=["C2"], device="cpu")
    assert list(again.methods) == ["bleep"]
    got = again.methods["bleep"].folds[0].metrics
    for k in ("pcc_heg", "pcc_all", "mse", "gene_gene_corr"):
        assert got[k] == pytest.approx(fold.metrics[k], abs=1e-6)
    # scoring it on its own training section is refused, before any number is computed
    with pytest.raises(LeakageError, match="C3"):
        score_model(fold.model_path, two_sections, test_sections=["C3"], device="cpu")


def test_leaky_training_is_caught_per_fold(two_sections, tmp_path, monkeypatch):
    """If training ever used the held-out section, the fold fails instead of reporting a number."""
    import napari_stpredict.training as training
    from napari_stpredict.evaluation import evaluate

    real_train = training.train

    def leaky_train(manifest, config, *, out, sections=None, **kw):
        return real_train(manifest, config, out=out, sections=None, **kw)  # all sections: a leak

    monkeypatch.setattr(training, "train", leaky_train)
    res = evaluate(
        two_sections,
        methods=["regression"],
        config=tiny_config(),
        test_sections=["C2"],
        work_dir=tmp_path,
    )
    (fold,) = res.methods["regression"].folds
    assert not fold.ok and "LeakageError" in fold.error and not fold.metrics
    assert res.methods["regression"].to_dict()["n_failed"] == 1


def test_validation_sections_stay_inside_the_fold(tmp_path):
    """--val-sections never names the held-out section and is not trained on."""
    from napari_stpredict.evaluation.protocol import _fold_config
    from napari_stpredict.training import TrainConfig

    fold = make_folds(SPECS)[-1]  # test A2
    cfg, train_sections = _fold_config(
        TrainConfig(val_sections=["C3", "A2"], train_backbone="none"), "bleep", fold, tmp_path
    )
    assert cfg.method == "bleep" and cfg.val_sections == ["C3"]
    assert train_sections == ["B4", "C2", "C4"]
    assert cfg.feature_cache_dir == str(tmp_path / "features")  # shared by methods and folds
    cfg, train_sections = _fold_config(TrainConfig(val_sections=["A2"]), "cmrc", fold, tmp_path)
    assert cfg.val_sections is None and "A2" not in train_sections
    with pytest.raises(StPredictError, match="validation"):
        _fold_config(TrainConfig(val_sections=["B4"]), "cmrc", make_folds(SPECS[:2])[1], tmp_path)


def test_ridge_fold_model_records_its_fit(evaluated):
    """The ridge fold model is a normal model file: PCA + ridge tensors, the fit in metadata,
    alpha chosen on the training section only (one training section: random inner folds)."""
    from napari_stpredict.model import Predictor, load_model_file

    res, _, _ = evaluated
    fold = res.methods["ridge"].folds[0]
    mf = load_model_file(fold.model_path)
    meta = mf.metadata
    assert meta["method"] == "ridge" and mf.bank_embeddings is None
    assert {"pca_mean", "pca_components", "coef", "intercept"} <= set(mf.state_dict)
    info = meta["ridge"]
    assert info["n_components"] == mf.state_dict["pca_components"].shape[0]
    assert info["cv"]["scheme"].endswith("random") and len(info["cv"]["scores"]) == len(
        info["cv"]["alphas_relative"]
    )
    assert meta["training_sections"] == fold.train
    p = Predictor(fold.model_path, device="cpu")
    assert p.top_k is None and p.method == "ridge"


def test_scoring_overrides_tta_and_weighting(evaluated, two_sections):
    """score_model's predictor options change the scoring, are recorded, and are checked."""
    from napari_stpredict.evaluation import score_model

    res, _, _ = evaluated
    fold = res.methods["bleep"].folds[0]
    opts = {"tta": 2, "weighting": "softmax", "temperature": 0.05}
    again = score_model(
        fold.model_path, two_sections, test_sections=["C2"], device="cpu", predictor_options=opts
    )
    assert again.config["predictor"] == opts
    got = again.methods["bleep"].folds[0].metrics
    assert got["pcc_all"] != pytest.approx(fold.metrics["pcc_all"], abs=1e-9)
    with pytest.raises(StPredictError, match="tta"):
        score_model(fold.model_path, two_sections, test_sections=["C2"],
                    predictor_options={"tta": 3})  # fmt: skip


def test_cli_unknown_gene_fails_before_training(two_sections, tmp_path, capsys):
    """`evaluate --genes NOTAGENE`: one line on stderr, exit 2, no fold trained (14.6)."""
    from napari_stpredict.cli import main

    work = tmp_path / "work"
    code = main(["evaluate", str(two_sections), "--genes", "NOTAGENE", "--work-dir", str(work),
                 "--out", str(tmp_path / "r.json"), "--device", "cpu"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2
    err = captured.err.strip()
    assert err.startswith("stpredict: error:") and "NOTAGENE" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "r.json").exists()
    assert not list(work.glob("fold*/*.safetensors"))


def test_retrieval_spread_is_the_neighbours_sd(evaluated, two_sections):
    """Predictor.predict(x, return_spread=True) on a fold's BLEEP model: the mean is the plain
    prediction and the spread the per-gene sd of the top-k neighbours' expression."""
    import torch

    from napari_stpredict.evaluation.data import load_section, section_patches
    from napari_stpredict.model import Predictor, load_model_file
    from napari_stpredict.model.retrieval import retrieve_topk
    from napari_stpredict.st import load_manifest

    res, _, _ = evaluated
    fold = res.methods["bleep"].folds[0]
    p = Predictor(fold.model_path, device="cpu")
    assert p.has_uncertainty and p.weighting == "mean"
    sec = load_section(load_manifest(two_sections).section("C2"))
    x = section_patches(p, sec)[:12]
    mean, sd = p.predict(x, return_spread=True)
    assert np.array_equal(mean, p.predict(x))
    mf = load_model_file(fold.model_path)
    with torch.no_grad():
        emb = p.embed_tensor(p.preprocess(x))
        _, idx = retrieve_topk(emb, mf.bank_embeddings, k=p.top_k)
    nb = mf.bank_expression[idx].numpy()
    assert np.allclose(sd, nb.std(1), atol=1e-4) and (sd > 0).any()
