"""``stpredict evaluate`` on real HER2ST sections: table, JSON, report, --model, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from napari_stpredict.cli import main

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

# the smallest real training: timm's test backbone, 32 px patches, frozen features, 2 steps
TINY = [
    "--backbone", "test_efficientnet", "--pretrained", "none", "--patch-px", "32",
    "--batch-size", "16", "--epochs", "1", "--max-steps", "2", "--n-top-genes", "40",
    "--train-backbone", "none", "--num-workers", "2", "--top-k", "10", "--device", "cpu",
]  # fmt: skip


@pytest.fixture(scope="module")
def manifest(her2st_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("manifest") / "two.yaml"
    path.write_text(TWO_SECTIONS.format(d=her2st_dir))
    return path


@pytest.fixture(scope="module")
def cli_run(manifest, tmp_path_factory):
    """One CLI run: cmrc gets an impossible mask_prob, so its fold fails and the others finish."""
    out = tmp_path_factory.mktemp("out")
    argv = [
        "evaluate", str(manifest), "--test-sections", "C2", "--out", str(out / "r.json"),
        "--report", str(out / "report"), "--work-dir", str(out / "work"),
        "--model-kwargs", '{"mask_prob": 1.5}', *TINY,
    ]  # fmt: skip
    return main(argv), out


def test_cli_evaluate_outputs(cli_run, capsys):
    code, out = cli_run
    assert code == 1  # a failed fold is reported with exit code 1, the rest is written
    d = json.loads((out / "r.json").read_text())
    assert set(d["methods"]) == {"cmrc", "bleep", "regression", "ridge"}  # ridge: B, issue 11
    assert d["config"]["cv"] == "test-sections"
    assert d["config"]["folds"] == [{"train": ["C3"], "test": ["C2"]}]
    assert d["config"]["train"]["backbone"] == "test_efficientnet"
    assert d["config"]["train"]["max_steps"] == 2
    assert "torch" in d["versions"] and d["wall_time_s"] > 0
    (cm,) = d["methods"]["cmrc"]["folds"]
    assert cm["test"] == ["C2"] and "mask_prob" in cm["error"]
    assert d["methods"]["cmrc"]["n_failed"] == 1
    for name in ("bleep", "regression"):
        m = d["methods"][name]
        assert m["n_failed"] == 0
        (f,) = m["folds"]
        assert f["test"] == ["C2"]
        for k in ("pcc_heg", "pcc_hvg", "pcc_all", "mse", "mae", "gene_gene_corr"):
            assert isinstance(m["mean"][k], float) and f[k] == m["mean"][k]
    md = (out / "report" / "report.md").read_text()
    assert "| bleep |" in md and "| regression |" in md and "mask_prob" in md
    assert (out / "report" / "pcc_distribution.png").stat().st_size > 1000
    assert (out / "report" / "spatial_C2.png").stat().st_size > 1000
    assert (out / "work" / "fold01-C2" / "bleep.safetensors").is_file()


def test_cli_score_existing_model(cli_run, manifest, tmp_path, capsys):
    _, out = cli_run
    model = out / "work" / "fold01-C2" / "bleep.safetensors"
    code = main(["evaluate", str(manifest), "--model", str(model), "--test-sections", "C2",
                 "--out", str(tmp_path / "m.json"), "--device", "cpu"])  # fmt: skip
    assert code == 0
    d = json.loads((tmp_path / "m.json").read_text())
    assert list(d["methods"]) == ["bleep"]  # NAME = the model's method
    assert d["methods"]["bleep"]["folds"][0]["test"] == ["C2"]
    ref = json.loads((out / "r.json").read_text())["methods"]["bleep"]["mean"]
    assert d["methods"]["bleep"]["mean"]["pcc_all"] == pytest.approx(ref["pcc_all"], abs=1e-6)
    table = capsys.readouterr().out  # the terminal table
    assert "PCC HEG" in table and "bleep" in table and "1/1" in table
    # the model was trained on C3: scoring it there is refused
    capsys.readouterr()
    code = main(["evaluate", str(manifest), "--model", str(model), "--test-sections", "C3"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("stpredict: error:") and "C3" in err and "training" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--methods", "cmrc,nope"], "nope"),
        (["--cv", "k-fold"], "k-fold"),
        (["--model", "m.safetensors"], "--test-sections"),
        (["--markers", "absent.txt"], "absent.txt"),
        (["--model-kwargs", "{bad"], "--model-kwargs"),
        (["--test-sections", "Z9"], "Z9"),
        (["--train-backbone", "half"], "half"),
    ],
)
def test_cli_bad_input(manifest, extra, message, capsys):
    code = main(["evaluate", str(manifest), *extra])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stpredict: error:") and message in err
    assert len(err.splitlines()) == 1


def test_cli_refuses_to_overwrite(manifest, tmp_path, capsys):
    target = tmp_path / "r.json"
    target.write_text("{}")
    assert main(["evaluate", str(manifest), "--out", str(target)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert target.read_text() == "{}"
    assert main(["evaluate", str(tmp_path / "missing.yaml")]) == 2
