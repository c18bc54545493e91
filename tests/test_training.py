"""Training on real HER2ST sections: each method learns, resume after a kill, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open

from napari_stpredict.cli import main
from napari_stpredict.errors import Cancelled, StPredictError
from napari_stpredict.model.checkpoint import load_model_file
from napari_stpredict.progress import CancelToken
from napari_stpredict.training import TrainConfig, state_path_for, train

SECTIONS = ["B4", "C2"]


@pytest.fixture(scope="module")
def manifest(benchmarks_data_dir, her2st_dir) -> Path:
    path = benchmarks_data_dir / "her2st.yaml"
    if not path.exists():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory) -> Path:
    """Frozen-backbone features shared by the tests of this module (extracted once)."""
    return tmp_path_factory.mktemp("features")


def _frozen(method: str, feature_cache: Path, **kw) -> TrainConfig:
    base = dict(
        method=method,
        pretrained="offline",
        n_top_genes=60,
        patch_px=64,
        batch_size=32,
        train_backbone="none",
        feature_cache_dir=str(feature_cache),
        val_fraction=0.1,
        device="cpu",
        seed=0,
        lr=2e-3,
        warmup_steps=0,
        num_workers=2,
        tta=1,  # pinned (the defaults, 8 views + context, cost 16 passes per spot)
        context=0.0,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("method", ["cmrc", "bleep", "regression"])
def test_each_method_lowers_the_loss(method, manifest, feature_cache, tmp_path):
    out = tmp_path / f"{method}.safetensors"
    res = train(
        manifest,
        _frozen(method, feature_cache, epochs=4, steps_per_epoch=6),
        out=out,
        sections=SECTIONS,
    )
    h = res.history
    assert [e["epoch"] for e in h] == [1, 2, 3, 4]
    assert h[-1]["train_loss"] < h[0]["train_loss"], [e["train_loss"] for e in h]
    assert all(np.isfinite(e["val_loss"]) and np.isfinite(e["val_pcc"]) for e in h)
    best = min(range(4), key=lambda i: h[i]["val_loss"])
    assert res.best_epoch == best + 1
    mf = load_model_file(out)
    m = mf.metadata
    assert m["method"] == method and m["training_sections"] == SECTIONS
    assert m["metrics"]["best_epoch"] == res.best_epoch
    # the bank holds the training spots only (the random validation spots are left out)
    n_train, n_val = m["metrics"]["n_train_spots"], m["metrics"]["n_val_spots"]
    assert n_val > 0 and n_train + n_val == 470
    if method == "regression":
        assert mf.bank_expression is None
    else:
        assert mf.bank_expression.shape == (n_train, len(m["genes"]))
    assert not state_path_for(out).exists()  # the resumable state is removed on success
    if method == "cmrc":
        assert {"train_contrastive", "train_reconstruction"} <= set(h[0])


def test_validation_sections_and_panel(manifest, feature_cache, tmp_path):
    out = tmp_path / "valsec.safetensors"
    cfg = _frozen("bleep", feature_cache, epochs=1, steps_per_epoch=2, val_sections=["C2"])
    res = train(manifest, cfg, out=out, sections=["B4"])
    m = res.metadata
    assert m["training_sections"] == ["B4"] and m["validation_sections"] == ["C2"]
    assert m["n_bank"] == m["metrics"]["n_train_spots"] == 283  # every B4 spot, no C2 spot
    assert m["metrics"]["n_val_spots"] == 187
    assert set(load_model_file(out).bank_section_index.tolist()) == {0}


SMALL_HEADS = {"proj_dim": 64, "n_gene_tokens": 4, "fusion_heads": 4}


def test_deterministic_and_resume_is_exact(manifest, feature_cache, tmp_path):
    cfg = _frozen("cmrc", feature_cache, epochs=3, steps_per_epoch=2, model_kwargs=SMALL_HEADS)
    full = train(manifest, cfg, out=tmp_path / "full.safetensors", sections=SECTIONS)

    token = CancelToken()

    def stop_after_first(entry):
        if entry["epoch"] == 1:
            token.cancel()

    out = tmp_path / "resumed.safetensors"
    with pytest.raises(Cancelled):
        train(manifest, cfg, out=out, sections=SECTIONS, cancel=token, on_epoch=stop_after_first)
    assert state_path_for(out).exists() and not out.exists()
    res = train(manifest, cfg, out=out, sections=SECTIONS, resume=True)
    assert res.resumed_from == 1
    assert [e["train_loss"] for e in res.history] == [e["train_loss"] for e in full.history]
    a, b = load_model_file(full.model_path), load_model_file(out)
    assert a.state_dict.keys() == b.state_dict.keys()
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert torch.equal(a.bank_embeddings, b.bank_embeddings)

    # a resume with other options is refused, before any work
    token = CancelToken()
    with pytest.raises(Cancelled):
        train(
            manifest,
            cfg,
            out=out,
            sections=SECTIONS,
            cancel=token,
            on_epoch=stop_after_first,
            overwrite=True,
        )
    other = _frozen(
        "cmrc", feature_cache, epochs=3, steps_per_epoch=2, model_kwargs=SMALL_HEADS, lr=1e-2
    )
    with pytest.raises(StPredictError, match="different lr"):
        train(manifest, other, out=out, sections=SECTIONS, resume=True, overwrite=True)


def _state_epoch(path: Path) -> int | None:
    try:
        with safe_open(str(path), "pt") as f:
            return int(json.loads(f.metadata()["state"])["epoch"])
    except Exception:
        return None


def test_kill_and_resume_cli(manifest, feature_cache, tmp_path):
    out = tmp_path / "killed.safetensors"
    args = [
        str(manifest), "--out", str(out), "--sections", "B4,C2", "--method", "bleep",
        "--patch-px", "64", "--n-top-genes", "60", "--train-backbone", "none",
        "--feature-cache", str(feature_cache), "--epochs", "8", "--steps-per-epoch", "2",
        "--device", "cpu", "--seed", "3", "--quiet", "--tta", "1", "--context", "0",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "napari_stpredict", "train", *args]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    state = state_path_for(out)
    deadline = time.monotonic() + 600
    try:
        while _state_epoch(state) is None:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no epoch finished in time"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # a hard kill: no cleanup code runs
        proc.wait()
    killed_at = _state_epoch(state)
    assert proc.returncode == -signal.SIGKILL
    assert 1 <= killed_at < 8 and not out.exists()

    res = subprocess.run(
        [sys.executable, "-m", "napari_stpredict", "train", *args, "--resume", "--json"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout)
    assert summary["resumed_from"] >= killed_at
    assert [e["epoch"] for e in summary["history"]] == list(range(1, 9))
    assert load_model_file(out).metadata["metrics"]["epochs_run"] == 8
    assert not state.exists()


# ---------------------------------------------------------------------------------------------
# bad input: one line, exit code 2, before any training, nothing written


@pytest.fixture(scope="module")
def small_tables(her2st_dir, tmp_path_factory):
    """30 real B4 spots × 200 real genes as small tables next to a manifest folder."""
    root = tmp_path_factory.mktemp("bad")
    counts = pd.read_csv(her2st_dir / "counts" / "B4.tsv.gz", sep="\t", index_col=0, nrows=30)
    counts = counts.loc[:, counts.sum(0) > 0].iloc[:, :200]
    spots = pd.read_csv(her2st_dir / "spots" / "B4_selection.tsv", sep="\t")
    spots = spots[[f"{x}x{y}" in set(counts.index) for x, y in zip(spots.x, spots.y, strict=True)]]
    spots.to_csv(root / "spots.tsv", sep="\t", index=False)
    counts.to_csv(root / "counts.tsv", sep="\t")
    return root, counts, her2st_dir / "images" / "B4.jpg"


def _manifest(root: Path, sections: list[dict], name="m.yaml") -> Path:
    import yaml

    doc = {"sections": sections, "defaults": {"selected_column": "selected"}}
    p = root / name
    p.write_text(yaml.safe_dump(doc))
    return p


def _section(root, image, name="S1", counts="counts.tsv", **kw) -> dict:
    d = {
        "name": name,
        "image": str(image),
        "counts": str(root / counts),
        "spots": str(root / "spots.tsv"),
    }
    d.update({"spot_pitch_um": 200, **kw})
    return d


def _fails(capsys, argv, pattern: str, out: Path) -> str:
    import re

    code = main(
        ["train", *argv, "--out", str(out), "--quiet", "--device", "cpu", "--patch-px", "32"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("stpredict: error:") and "\n" not in err, err
    assert re.search(pattern, err), err
    assert not out.exists() and not state_path_for(out).exists()
    return err


def test_bad_input_one_line_errors(small_tables, tmp_path, capsys):
    root, counts, image = small_tables
    out = tmp_path / "never.safetensors"

    m = _manifest(root, [_section(root, root / "missing.jpg")], "missing.yaml")
    _fails(capsys, [str(m)], r"missing\.jpg", out)

    m = _manifest(root, [_section(root, image, scale=50)], "outside.yaml")
    _fails(capsys, [str(m)], "outside the image", out)

    renamed = counts.rename(columns=lambda g: f"X{g}")
    renamed.to_csv(root / "renamed.tsv", sep="\t")
    m = _manifest(
        root, [_section(root, image), _section(root, image, "S2", "renamed.tsv")], "noshared.yaml"
    )
    _fails(capsys, [str(m)], "share no gene", out)

    good = _manifest(root, [_section(root, image)], "good.yaml")
    genes = root / "genes.txt"
    genes.write_text("\n".join([*counts.columns[:3], "NOT_A_GENE_1"]))
    _fails(capsys, [str(good), "--genes", str(genes)], "NOT_A_GENE_1", out)

    nan = counts.astype(float)
    nan.iloc[3, 2] = np.nan
    nan.to_csv(root / "nan.tsv", sep="\t")
    m = _manifest(root, [_section(root, image, counts="nan.tsv")], "nan.yaml")
    _fails(capsys, [str(m)], "NaN", out)

    neg = counts.copy()
    neg.iloc[1, 1] = -4
    neg.to_csv(root / "neg.tsv", sep="\t")
    m = _manifest(root, [_section(root, image, counts="neg.tsv")], "neg.yaml")
    _fails(capsys, [str(m)], "negative", out)

    no_mpp = _section(root, image)
    no_mpp.pop("spot_pitch_um")
    m = _manifest(root, [no_mpp], "nompp.yaml")
    code = main(["train", str(m), "--out", str(out), "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no pixel size" in err and "--patch-px" in err and "\n" not in err

    _fails(capsys, [str(good), "--method", "nope"], "method='nope'", out)
    _fails(capsys, [str(good), "--train-backbone", "half"], "train_backbone", out)
    _fails(capsys, [str(good), "--batch-size", "1"], "batch_size", out)
    _fails(capsys, [str(good), "--val-sections", "ZZ"], "no section 'ZZ'", out)
    _fails(
        capsys, [str(good), "--model-kwargs", '{"foo": 1}'], "unknown hyper-parameter 'foo'", out
    )
    _fails(capsys, [str(good), "--model-kwargs", "{foo"], "not valid JSON", out)
    out.write_bytes(b"x")
    code = main(["train", str(good), "--out", str(out), "--quiet"])
    assert code == 2 and "already exists" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# one pixel pipeline, metadata, auto backbone, stain augmentation, state files


def test_training_and_inference_encoder_inputs_are_bit_identical(
    manifest, tiny_model_file, tiny_model_config
):
    """The same HER2ST spots through the training data path and the Predictor/engine path."""
    from napari_stpredict.model import Predictor
    from napari_stpredict.slide import open_slide
    from napari_stpredict.slide.patches import read_patch_rects
    from napari_stpredict.st.patches import spot_rect
    from napari_stpredict.training.data import PatchSource, prepare_data
    from napari_stpredict.training.loop import batches_of
    from napari_stpredict.training.run import _build_model, _make_run, _patch_source

    predictor = Predictor(tiny_model_file, device="cpu")
    data = prepare_data(manifest, tiny_model_config, ["B4", "C2"], progress=None, cancel=None)
    model, spec = _build_model(tiny_model_config, data, torch.device("cpu"))
    assert spec == predictor.input_spec  # the model file records what training used
    assert spec.mean == (0.5, 0.5, 0.5)  # tf_efficientnet_lite0's own normalisation, not ImageNet
    source = _patch_source(tiny_model_config, data, spec)
    plan = {"train_backbone": "none", "stain_augment": "none"}
    run = _make_run(tiny_model_config, data, spec, model, torch.device("cpu"), source, plan)
    idx = np.array([3, 140, 301])  # spots of B4 and C2
    try:
        ((_, inputs, _),) = list(batches_of(run, [idx], train=False))
    finally:
        source.close()
    x_train = inputs[1]
    ds = data.dataset
    u8 = []
    for i in idx:  # what the engine does: level-0 rectangles through read_patch_rects
        k = int(ds.item_section[i])
        rect = spot_rect(*ds.centers[i], ds.patch_size_px[k])
        with open_slide(ds.images[k]) as slide:
            u8.append(read_patch_rects(slide, [rect], predictor.patch_px)[0])
    u8 = np.stack(u8)
    assert u8.mean() < 230  # on tissue
    x_infer = predictor.preprocess(u8)
    assert x_train.dtype == x_infer.dtype == torch.float32
    assert torch.equal(x_train, x_infer)
    assert np.array_equal(predictor.predict(u8), predictor.predict_tensor(x_train))

    # a context field (3 × the patch side) as training reads it and as the engine reads it
    from napari_stpredict.slide.patches import field_rects

    ctx = PatchSource(ds, len(ds), predictor.patch_px, cache=False, workers=2, scales=(1.0, 3.0))
    try:
        both = ctx.read(idx)
    finally:
        ctx.close()
    assert both.shape == (3, 2, 64, 64, 3) and np.array_equal(both[:, 0], u8)
    for j, i in enumerate(idx):
        k = int(ds.item_section[i])
        rect = spot_rect(*ds.centers[i], ds.patch_size_px[k])
        with open_slide(ds.images[k]) as slide:
            wide = read_patch_rects(slide, field_rects([rect], 3.0), predictor.patch_px)[0]
        assert np.array_equal(both[j, 1], wide)


def test_metadata_records_input_spec_and_gene_stats(manifest, feature_cache, tmp_path):
    out = tmp_path / "meta.safetensors"
    cfg = _frozen("regression", feature_cache, epochs=2, steps_per_epoch=2, tta=4)
    res = train(manifest, cfg, out=out, sections=SECTIONS)
    m = load_model_file(out).metadata
    assert m["input"] == {
        "patch_um": 112.0, "patch_px": 64, "mean": [0.5] * 3, "std": [0.5] * 3,
        "context": 0.0, "tta": 4,
    }  # fmt: skip
    assert m["image_mean"] == [0.5] * 3
    stats = m["gene_stats"]
    assert list(stats) == m["genes"]
    s0 = stats[m["genes"][0]]
    assert set(s0) >= {"mean", "sd", "p01", "p99", "val_pcc"} and s0["p01"] <= s0["p99"]
    # the per-gene validation r of the saved epoch averages to the history's val_pcc
    best = res.history[res.best_epoch - 1]
    pcc = np.array([stats[g]["val_pcc"] for g in m["genes"]])
    assert np.mean(pcc) == pytest.approx(best["val_pcc"], abs=1e-5)
    assert m["training_plan"]["train_backbone"] == "none"
    assert m["training_plan"]["stain_augment"] == "none"  # frozen: nothing to augment
    assert m["config"]["train_backbone"] == "none"


def test_val_pcc_is_the_evaluation_pearson():
    """Constant genes score 0 in training's validation exactly as in evaluation."""
    from napari_stpredict.evaluation.metrics import pearson_per_gene
    from napari_stpredict.training import loop

    src = Path(loop.__file__).read_text()
    assert "pearson_per_gene" in src and "corrcoef" not in src
    t = np.array([[1.0, 1.0], [2.0, 1.0], [3.0, 1.0]])
    assert pearson_per_gene(t, t).tolist() == [1.0, 0.0]


def test_auto_backbone_on_cpu_says_what_and_why(manifest, tmp_path):
    notes: list[str] = []
    cfg = TrainConfig(
        method="bleep", pretrained="offline", n_top_genes=40, patch_px=32, batch_size=16,
        epochs=1, steps_per_epoch=2, device="cpu", seed=1, num_workers=2, warmup_steps=0,
        tta=1, context=0.0,
    )  # fmt: skip
    assert cfg.train_backbone == "auto" and cfg.stain_augment == "auto"
    res = train(manifest, cfg, out=tmp_path / "auto.safetensors", sections=["B4"], log=notes.append)
    plan = res.plan
    assert plan["train_backbone"] == "last"  # two steps: far under the CPU budget
    assert plan["measured_step_s_last"] > 0 and plan["est_epoch_s"] > 0
    assert plan["stain_augment"] == "hed"  # the backbone trains: stain jitter on
    assert any(n.startswith("train_backbone=last: CPU") and "s/step" in n for n in notes), notes
    assert any(n.startswith("estimated time per epoch") for n in notes), notes
    assert res.metadata["training_plan"]["train_backbone"] == "last"


def test_auto_picks_frozen_when_last_stage_is_too_slow(monkeypatch):
    from napari_stpredict.model.methods import build_model
    from napari_stpredict.model.preprocess import InputSpec
    from napari_stpredict.training import auto

    model = build_model("bleep", n_genes=5, pretrained="none", proj_dim=16)
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    expr = rng.random((4, 5), dtype=np.float32)
    spec = InputSpec(112.0, 32)
    kw = dict(model=model, device=torch.device("cpu"), u8=u8, expr=expr, spec=spec, n_items=100)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng_before = torch.get_rng_state()
    fast = auto.choose_train_backbone(total_steps=2, **kw)
    assert fast["train_backbone"] == "last"
    monkeypatch.setattr(auto, "AUTO_BUDGET_S", 1e-9)
    slow = auto.choose_train_backbone(total_steps=10**6, **kw)
    assert slow["train_backbone"] == "none" and "budget" in slow["reason"]
    # measuring never changes the model nor the random stream
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng_before, torch.get_rng_state())


def test_crafted_state_files_give_one_line_errors(manifest, tmp_path):
    from safetensors.torch import save_file

    from napari_stpredict.training.state import STATE_FORMAT

    out = tmp_path / "crafted.safetensors"
    state = state_path_for(out)
    cfg = TrainConfig(device="cpu", train_backbone="none")
    for header, pattern in [
        ({"format": STATE_FORMAT, "format_version": "1", "state": "{}"}, "no 'epoch'"),
        ({"format": STATE_FORMAT, "format_version": "1", "state": "[1]"}, "not a JSON object"),
        ({"format": STATE_FORMAT, "format_version": "1", "state": "{"}, "corrupt training state"),
        ({"format": "other"}, "not a napari-stpredict training state"),
    ]:
        save_file({"x": torch.zeros(1)}, str(state), metadata=header)
        with pytest.raises(StPredictError, match=pattern) as err:
            train(manifest, cfg, out=out, resume=True)
        assert "\n" not in str(err.value) and str(state) in str(err.value)
    state.write_bytes(b"not safetensors")
    with pytest.raises(StPredictError, match="corrupt training state"):
        train(manifest, cfg, out=out, resume=True)


def test_state_file_is_replaced_atomically(tmp_path, monkeypatch):
    """A failing write leaves the previous state file as it was."""
    from napari_stpredict.training import state as st

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    gen = torch.Generator().manual_seed(0)
    info = {"epoch": 1, "global_step": 2, "history": [], "best_epoch": 1, "best_val": 0.5,
            "genes": ["A"], "config_fingerprint": {}}  # fmt: skip
    path = tmp_path / "s.train-state.safetensors"
    st.save_state(
        path, model=model, best_state=None, optimizer=opt, scaler=None, gen=gen, info=info
    )
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(Exception, match="disk full"):
        st.save_state(path, model=model, best_state=None, optimizer=opt, scaler=None, gen=gen,
                      info={**info, "epoch": 2})  # fmt: skip
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    _, loaded = st.load_state(path)
    assert loaded["epoch"] == 1


def test_context_field_trains_and_is_recorded(manifest, tmp_path):
    from napari_stpredict.model import Predictor

    cfg = TrainConfig(
        method="bleep", pretrained="offline", n_top_genes=30, patch_px=32, batch_size=16,
        epochs=1, steps_per_epoch=2, device="cpu", seed=0, num_workers=2, context=3.0,
        train_backbone="none", tta=2,
    )  # fmt: skip
    out = tmp_path / "ctx.safetensors"
    res = train(manifest, cfg, out=out, sections=["B4"])
    assert res.metadata["input"]["context"] == 3.0 and res.metadata["input"]["tta"] == 2
    p = Predictor(out, device="cpu")
    assert p.input_spec.fields() == [(112.0, 32), (336.0, 32)] and p.model.n_fields == 2
    u8 = np.random.default_rng(0).integers(0, 255, (3, 2, 32, 32, 3), dtype=np.uint8)
    assert p.predict(u8).shape == (3, len(p.genes))


def test_training_defaults_are_the_measured_best():
    """docs/benchmarks.md (evaluation) and docs/training.md: BLEEP, 8 views, a 3× context field;
    what `stpredict train` without flags records in the model file's input spec."""
    from napari_stpredict.training.run import input_spec_for

    cfg = TrainConfig()
    assert (cfg.method, cfg.tta, cfg.context) == ("bleep", 8, 3.0)
    data = type("Data", (), {"patch_um": 112.0, "patch_px": 224})()
    spec = input_spec_for(cfg, data, "tf_efficientnet_lite0")
    assert (spec.tta, spec.context, spec.scales) == (8, 3.0, (1.0, 3.0))


def test_feature_cache_keeps_tta_views_apart(manifest, tmp_path):
    """Frozen features averaged over 2 views are cached apart from 1-view ones: a later run
    with the other TTA must not train on the first run's features."""
    from safetensors.torch import load_file

    cache = tmp_path / "features"
    for tta in (1, 2):
        cfg = _frozen("regression", cache, tta=tta, epochs=1, steps_per_epoch=1, patch_px=32)
        train(manifest, cfg, out=tmp_path / f"tta{tta}.safetensors", sections=["B4"])
    files = sorted(cache.glob("features-*.safetensors"))
    assert len(files) == 2
    one, two = (load_file(str(f))["pooled"] for f in files)
    assert one.shape == two.shape and not np.allclose(one.numpy(), two.numpy())
