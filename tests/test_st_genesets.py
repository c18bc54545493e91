"""Gene sets in one place: marker registry, default tumour signature, the default panel,
the model header reader and the tumour-support check (issue 10, issue 13)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_stpredict.errors import DatasetError, ModelFileError
from napari_stpredict.model.header import header_gene_stats, model_info, read_model_header
from napari_stpredict.st import read_sections
from napari_stpredict.st.genesets import (
    BREAST_CANCER_MARKERS,
    DEFAULT_TUMOR_GENES,
    HER2_AMPLICON,
    MARKER_SETS,
    MIN_SIGNATURE_GENES,
    PAM50,
    SignatureError,
    build_panel,
    describe_panel,
    marker_set,
    resolve_signature,
    tumour_support,
)

#: What a pathologist opens a HER2-positive slide to see (issue 10).
MUST_HAVE = ("ERBB2", "KRT19", "GRB7", "EPCAM", "ESR1", "MKI67")


@pytest.fixture(scope="module")
def her2st_train(her2st_dir, benchmarks_data_dir):
    """The four imaged HER2ST sections that `stpredict train` learns from by default."""
    return read_sections(
        benchmarks_data_dir / "her2st.yaml", sections=["B4", "C2", "C3", "C4"], check_image=False
    )


# ----------------------------------------------------------------------------- registry
def test_registry_holds_the_named_sets():
    assert set(MARKER_SETS) == {"breast", "pan-cancer", "none"}
    breast = marker_set("breast")
    assert breast.genes == BREAST_CANCER_MARKERS and len(set(breast.genes)) == len(breast.genes)
    for group in (PAM50, HER2_AMPLICON, DEFAULT_TUMOR_GENES):
        assert set(group) <= set(breast.genes)
    for g in ("PNMT", "TCAP", "MIEN1", "PGAP3", "STARD3", "PTPRC", "COL1A1", "VIM"):
        assert g in breast.genes
    pan = marker_set("Pan_Cancer")  # names are forgiving about case and _/-
    assert set(pan.groups) == {"proliferation", "epithelial", "immune", "stromal", "hypoxia"}
    assert {"CA9", "VEGFA", "MKI67", "CD8A"} <= set(pan.genes)
    assert "ERBB2" not in pan.tumor_signature  # not a breast/HER2-specific signature
    assert marker_set("none").panel_genes() == ()
    assert marker_set(None) is breast


def test_marker_set_from_file_resolves_old_symbols(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("# my markers\nCDCA1\nERBB2\nC17orf37\n")
    ms = marker_set(f)
    assert ms.genes == ("NUF2", "ERBB2", "MIEN1")
    assert ms.tumor_signature == DEFAULT_TUMOR_GENES
    with pytest.raises(DatasetError, match="neither a marker set") as err:
        marker_set("brest")
    assert "\n" not in str(err.value) and "breast" in str(err.value)


def test_evaluation_and_tumour_use_the_same_lists():
    from napari_stpredict.evaluation import markers
    from napari_stpredict.tumor import DEFAULT_TUMOR_GENES as tumour_default

    assert markers.BREAST_CANCER_MARKERS is BREAST_CANCER_MARKERS
    assert markers.PAM50 is PAM50
    assert tumour_default is DEFAULT_TUMOR_GENES


# ----------------------------------------------------------------------------- signature
def test_signature_resolution_needs_three_genes():
    used, missing = resolve_signature(["krt19", "ERBB2", "EPCAM", "VIM"])
    assert used == ["ERBB2", "krt19", "EPCAM"]  # signature order, the model's spelling
    assert set(missing) == set(DEFAULT_TUMOR_GENES) - {"ERBB2", "KRT19", "EPCAM"}
    with pytest.raises(SignatureError, match="only ERBB2, KRT19 of") as err:
        resolve_signature(["ERBB2", "KRT19", "VIM"])
    assert "\n" not in str(err.value) and f"at least {MIN_SIGNATURE_GENES}" in str(err.value)
    ok, reason = tumour_support({"genes": ["VIM", "CD74", "COL1A1"]})
    assert not ok and reason.startswith("tumour signature: none of ERBB2")
    assert tumour_support({"genes": list(DEFAULT_TUMOR_GENES)}) == (True, "")
    # a recorded signature is what counts
    rec = {
        "genes": ["EPCAM", "KRT8", "CLDN4", "VIM"],
        "tumor_signature": ["EPCAM", "KRT8", "CLDN4"],
    }
    assert tumour_support(rec) == (True, "")


# ----------------------------------------------------------------------------- panel
def test_default_panel_on_her2st_has_the_markers(her2st_train):
    panel = build_panel(her2st_train)  # defaults: breast markers ∪ 250 HEG ∪ 1000 HVG/section
    genes = set(panel.genes)
    assert len(genes) == len(panel.genes)
    for g in MUST_HAVE:
        assert g in genes, g
    measured = set.intersection(*(set(a.var_names) for a in her2st_train))
    assert {g for g in DEFAULT_TUMOR_GENES if g in measured} <= genes
    assert panel.tumor_signature == DEFAULT_TUMOR_GENES  # every default gene is measured here
    # markers come first, in set order; what was asked for but not measured is reported
    assert panel.genes[: len(panel.in_panel)] == list(panel.in_panel)
    assert set(panel.in_panel) | set(panel.missing) == set(panel.requested)
    assert all(g not in measured or g not in genes for g in panel.missing)
    assert panel.counts["markers"] == len(panel.in_panel) and panel.counts["heg"] > 0
    meta = panel.metadata()
    assert meta["markers"]["set"] == "breast" and meta["tumor_signature"][0] == "ERBB2"
    json.dumps(meta)
    text = "\n".join(panel.summary())
    assert "markers (breast):" in text and "tumour signature: ERBB2" in text


def test_panel_sources_and_options(her2st_train):
    a = her2st_train[:2]
    only_markers = build_panel(a, n_heg=0, n_hvg=0)
    assert only_markers.genes == list(only_markers.in_panel)
    none = build_panel(a, markers="none", n_heg=30, n_hvg=0, add_genes=["CDCA1"])
    assert none.genes[0] == "NUF2" and len(none.genes) == 31  # alias resolved, then 30 HEG
    assert none.requested == ("NUF2",)
    heg_only = build_panel(a, markers="none", n_heg=5, n_hvg=0)
    assert len(heg_only.genes) == 5 and heg_only.tumor_signature == ()
    assert len(set(heg_only.genes) & set(DEFAULT_TUMOR_GENES)) < MIN_SIGNATURE_GENES
    assert "cannot make the default tumour layer" in heg_only.summary()[-1]
    with pytest.raises(DatasetError, match="empty"):
        build_panel(a, markers="none", n_heg=0, n_hvg=0)
    # a panel must be measured in the validation sections too
    vh = build_panel(a, markers="none", n_heg=0, n_hvg=50, measured_in=her2st_train[2:])
    shared = set.intersection(*(set(x.var_names) for x in her2st_train))
    assert set(vh.genes) <= shared


def test_describe_given_panel():
    p = describe_panel(["ERBB2", "GRB7", "VIM"], "breast")
    assert p.in_panel == ("ERBB2", "GRB7", "VIM") and "KRT19" in p.missing
    assert p.tumor_signature == ()  # two signature genes are not enough


# ----------------------------------------------------------------------------- model header
def test_read_model_header(tiny_model_file, tmp_path):
    meta = read_model_header(tiny_model_file)
    assert meta["genes"] and "gene_stats" in meta
    info = model_info(tiny_model_file)
    assert info.path == tiny_model_file and info.genes == meta["genes"]
    stats = info.gene_stats()
    assert stats["mean"].shape == (len(meta["genes"]),)
    assert model_info(meta).genes == meta["genes"] and model_info(None).genes == []
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 64)
    for p, frag in ((bad, "not a readable"), (tmp_path / "none.safetensors", "not found")):
        with pytest.raises(ModelFileError, match=frag) as err:
            read_model_header(p)
        assert "\n" not in str(err.value)
    assert model_info(bad, best_effort=True).metadata == {}


def test_gene_stats_both_layouts():
    per_stat = {"genes": ["A", "B"], "gene_stats": {"mean": [1.0, 2.0], "std": [0.5, None]}}
    s = header_gene_stats(per_stat)
    np.testing.assert_allclose(s["mean"], [1, 2])
    assert s["std"][0] == 0.5 and np.isnan(s["std"][1])  # JSON null = NaN
    per_gene = {
        "genes": ["A", "B"],
        "gene_stats": {"B": {"mean": 2.0, "sd": 1.0}, "A": {"mean": 1.0, "sd": 0.5}},
    }
    s = header_gene_stats(per_gene)
    np.testing.assert_allclose(s["mean"], [1, 2])
    np.testing.assert_allclose(s["std"], [0.5, 1.0])
    assert header_gene_stats({"genes": ["A"]}) is None


# ----------------------------------------------------------------------------- training
def test_train_with_defaults_has_the_markers_and_says_so(
    her2st_dir, benchmarks_data_dir, tmp_path, capsys
):
    """`stpredict train` on her2st.yaml with default genes (frozen backbone, one step, 32 px):
    the model predicts the markers a pathologist looks for, and the run says what it has."""
    from napari_stpredict.cli import main

    manifest = benchmarks_data_dir / "her2st.yaml"
    out = tmp_path / "default.safetensors"
    args = ["train", str(manifest), "--out", str(out), "--quiet", "--device", "cpu"]
    args += ["--train-backbone", "none", "--pretrained", "none", "--epochs", "1"]
    args += ["--max-steps", "1", "--patch-px", "32", "--add-genes", "CDCA1"]
    args += ["--tta", "1", "--context", "0"]  # the defaults cost 16 passes per spot
    assert main(args) == 0
    text = capsys.readouterr().out
    meta = read_model_header(out)
    genes = set(meta["genes"])
    for g in (*MUST_HAVE, "NUF2"):  # the --add-genes alias resolved
        assert g in genes, g
    adatas = read_sections(manifest, check_image=False)
    measured = set.intersection(*(set(a.var_names) for a in adatas))
    assert {g for g in DEFAULT_TUMOR_GENES if g in measured} <= genes
    assert meta["tumor_signature"] == [g for g in DEFAULT_TUMOR_GENES if g in measured]
    rec = meta["markers"]
    assert rec["set"] == "breast" and rec["panel"] == "default"
    assert set(rec["in_panel"]) <= genes and not set(rec["missing"]) & genes
    assert set(rec["missing"]) == {g for g in BREAST_CANCER_MARKERS if g not in measured}
    assert meta["genes"][: len(rec["in_panel"])] == rec["in_panel"]  # markers first
    assert f"markers (breast): {len(rec['in_panel'])} of " in text
    assert "tumour signature: ERBB2, GRB7, KRT19, EPCAM, KRT8, KRT18, CDH1" in text
    if rec["missing"]:
        assert "requested but not measured in every section" in text
    assert tumour_support(meta) == (True, "")


def test_bad_marker_set_is_refused_before_training(
    her2st_dir, benchmarks_data_dir, tmp_path, capsys
):
    from napari_stpredict.cli import main

    out = tmp_path / "never.safetensors"
    manifest = benchmarks_data_dir / "her2st.yaml"
    assert main(["train", str(manifest), "--out", str(out), "--markers", "brest", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "markers 'brest'" in err[0] and "pan-cancer" in err[0]
    assert not out.exists()
