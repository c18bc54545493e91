"""``--tta`` of ``stpredict predict`` and ``stpredict view`` reaches the Predictor; a bad value is
one line before any slow work. ``stpredict train``'s defaults are TrainConfig's own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from napari_stpredict.cli import main


@pytest.fixture()
def predictor_tta(monkeypatch) -> list[int]:
    """The ``tta`` of every Predictor built (recorded, then built as usual)."""
    from napari_stpredict.model.predictor import Predictor

    seen: list[int] = []
    original = Predictor.__init__

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen.append(self.tta)

    monkeypatch.setattr(Predictor, "__init__", recording)
    return seen


@pytest.fixture()
def no_predictor(monkeypatch) -> None:
    """Building a Predictor fails the test: a bad option must be refused before it."""
    from napari_stpredict.model.predictor import Predictor

    def refuse(self, *args, **kwargs):
        raise AssertionError("a Predictor was built before the bad option was refused")

    monkeypatch.setattr(Predictor, "__init__", refuse)


def _one_line_error(capsys, needle: str) -> None:
    err = capsys.readouterr().err.strip()
    assert err.startswith("stpredict: error:") and needle in err
    assert len(err.splitlines()) == 1


def test_predict_tta_reaches_the_predictor(tmp_path, wsi_dir, tiny_model_file, predictor_tta):
    from napari_stpredict.distributed import clear_worker_cache
    from napari_stpredict.model import load_model_file

    clear_worker_cache()  # a Predictor cached by another test would not be built again
    stride = 4 * float(load_model_file(tiny_model_file).metadata["patch_um"])
    out = tmp_path / "out"
    args = ["predict", str(wsi_dir / "cmu_small_region.svs"), "-m", str(tiny_model_file)]
    args += ["-o", str(out), "-s", "inline", "--stride-um", str(stride), "--device", "cpu"]
    assert main([*args, "--tta", "2"]) == 0
    assert predictor_tta == [2]
    (marker,) = out.glob("*/done.json")
    assert json.loads(marker.read_text())["config"]["tta"] == 2
    clear_worker_cache()


def test_predict_refuses_a_bad_tta_before_any_work(
    tmp_path, wsi_dir, tiny_model_file, no_predictor, capsys
):
    out = tmp_path / "out"
    slide = str(wsi_dir / "cmu_small_region.svs")
    code = main(["predict", slide, "-m", str(tiny_model_file), "-o", str(out), "--tta", "3"])
    assert code == 2
    _one_line_error(capsys, "--tta 3")
    assert not out.exists()


@pytest.fixture()
def viewer_call(monkeypatch) -> dict:
    """``stpredict view`` up to the viewer: what it would open is recorded, no window opens."""
    from napari_stpredict.cli import view_cmd

    seen: dict = {}

    def fake_open_viewer(slide_path, **kwargs):
        seen.update(kwargs, slide_path=slide_path)
        raise SystemExit(0)

    monkeypatch.setattr(view_cmd, "check_display", lambda advice: None)
    monkeypatch.setattr(view_cmd, "open_viewer", fake_open_viewer)
    return seen


def _view(slide: Path, model: Path, *extra: str) -> None:
    with pytest.raises(SystemExit):
        main(["view", str(slide), "--model", str(model), "--device", "cpu", *extra])


def test_view_tta_reaches_the_predictor(wsi_dir, tiny_model_file, viewer_call):
    from napari_stpredict.model.predictor import live_view_tta

    slide = wsi_dir / "cmu_small_region.svs"
    _view(slide, tiny_model_file, "--tta", "4", "--genes", "erbb2")
    assert viewer_call["predictor"].tta == 4
    assert viewer_call["genes"] == ["ERBB2"]  # as the model spells it
    # default: the live-view policy (the model's on CUDA, 1 on a CPU)
    _view(slide, tiny_model_file)
    model_tta = viewer_call["predictor"].metadata.get("input", {}).get("tta", 1)
    assert viewer_call["predictor"].tta == live_view_tta(model_tta, "cpu") == 1


def test_view_refuses_a_bad_tta_before_any_work(
    tmp_path, wsi_dir, tiny_model_file, no_predictor, capsys
):
    slide = str(wsi_dir / "cmu_small_region.svs")
    assert main(["view", slide, "--model", str(tiny_model_file), "--tta", "3"]) == 2
    _one_line_error(capsys, "--tta 3")
    assert main(["view", slide, "--tta", "2"]) == 2
    _one_line_error(capsys, "--tta needs --model")


def test_train_defaults_are_train_config_defaults(monkeypatch):
    """Every `stpredict train` flag that is a TrainConfig field defaults to TrainConfig's own
    value: a changed default in training/config.py is what the command trains with."""
    import dataclasses

    import typer.main

    from napari_stpredict.cli import app
    from napari_stpredict.cli.train_cmd import _make_config
    from napari_stpredict.training import TrainConfig

    command = typer.main.get_command(app).commands["train"]
    defaults = {p.name: p.default for p in command.params}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert all(defaults[name] is None for name in fields & set(defaults))
    assert _make_config(defaults).to_dict() == TrainConfig().to_dict()
    monkeypatch.setattr(TrainConfig, "__init__", _with_default(TrainConfig.__init__, tta=8))
    assert _make_config(defaults).tta == 8
    assert _make_config({**defaults, "tta": 2}).tta == 2


def _with_default(init, **changed):
    """``TrainConfig.__init__`` with other defaults (as an edit of training/config.py would)."""

    def patched(self, *args, **kwargs):
        init(self, *args, **{**changed, **kwargs})

    return patched
