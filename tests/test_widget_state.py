"""The docks' Qt-free state (issue 13): plain Python, no display, no napari viewer."""

from __future__ import annotations

import sys
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from napari_stpredict.errors import StPredictError


def _predictor(genes=("ERBB2", "KRT8", "EPCAM")):
    stats = {
        "mean": np.array([1.0, 2.0, 0.5], np.float32),
        "p01": np.array([0.1, 0.2, 0.0], np.float32),
        "p99": np.array([2.0, 3.0, 1.0], np.float32),
    }
    return SimpleNamespace(genes=list(genes), gene_stats=stats, metadata={})


def test_state_modules_do_not_import_qt():
    code = (
        "import sys; import napari_stpredict.widgets._state, napari_stpredict.widgets._common; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('qtpy', 'PyQt5', 'PyQt6', "
        "'PySide2', 'PySide6', 'napari')]; print(bad); assert not bad"
    )
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_predict_state_events_and_exact_mpp():
    from napari_stpredict.widgets._state import PredictState

    s = PredictState()
    seen: list[tuple] = []
    for name in ("model", "inputs", "genes", "display"):
        s.events.connect(name, lambda *a, name=name: seen.append((name, *a)))
    with pytest.raises(StPredictError, match="load a model"):
        s.set_genes(["ERBB2"])
    p = _predictor()
    s.set_model(p, None)
    s.set_slide("/x/C3.jpg", None)
    assert not s.ready  # no model path
    mpp = 0.692712345678901
    s.set_mpp(mpp)
    assert s.mpp == mpp  # exact
    n = len(seen)
    s.set_mpp(mpp)  # unchanged: no new session
    assert len(seen) == n
    with pytest.raises(StPredictError, match="positive"):
        s.set_mpp(-1)
    s.set_genes(["erbb2", "KRT8", "ERBB2"])
    assert s.genes == ["ERBB2", "KRT8"]
    with pytest.raises(StPredictError, match="NOPE"):
        s.set_genes(["NOPE"])
    s.drop_gene("ERBB2")
    assert s.genes == ["KRT8"] and seen[-1] == ("genes", ["KRT8"])
    s.set_display(colorbar=False, smooth=True)
    assert (s.colorbar, s.smooth) == (False, True) and seen[-1] == ("display",)
    s.set_slide("/x/C2.jpg", 0.5)
    assert s.mpp_override is None and s.mpp == 0.5


def test_predict_state_tta_choice():
    """The live view's test-time augmentation: the file's TTA, the Predictor's, the choices."""
    from napari_stpredict.model.preprocess import InputSpec
    from napari_stpredict.widgets._state import PredictState

    s = PredictState()
    asked: list[int] = []
    s.events.connect("tta", asked.append)
    with pytest.raises(StPredictError, match="load a model"):
        s.request_tta(8)
    p = _predictor()
    p.metadata, p.tta = {"input": InputSpec(112.0, 64, tta=8).to_dict()}, 1
    s.set_model(p, None)
    assert (s.model_tta, s.tta) == (8, 1)  # the file says 8; this Predictor averages 1
    assert s.tta_choices == [1, 8]
    assert [s.tta_label(v) for v in s.tta_choices] == ["1 view (fast)", "8 views (as predict)"]
    assert s.tta_note == "8 views: 8× slower per tile"
    assert s.request_tta(8) and s.tta == 8 and asked == [8]
    assert not s.request_tta(8) and asked == [8]  # unchanged: no rebuild
    with pytest.raises(StPredictError, match="1, 2, 4 or 8"):
        s.request_tta(3)
    p.tta = 2  # e.g. `stpredict view --tta 2`: offered beside 1 and the model's
    s.set_model(p, None)
    assert s.tta_choices == [1, 2, 8] and s.tta_label(2) == "2 views"
    plain = _predictor()  # a model without TTA (or a stand-in without an input spec)
    s.set_model(plain, None)
    assert (s.model_tta, s.tta, s.tta_choices, s.tta_note) == (1, 1, [1], "")


def test_contrast_limits_from_model_metadata_both_formats():
    from napari_stpredict.widgets._heatmaps import contrast_limits, model_gene_stats

    # newer files: metadata["gene_stats"][gene] = {"p01", "p99", ...}
    per_gene = {"ERBB2": {"mean": 1.0, "sd": 0.5, "p01": 0.25, "p99": 2.5, "val_pcc": 0.3}}
    assert contrast_limits(per_gene, 0, "ERBB2") == (0.25, 2.5)
    # older files: arrays in panel order
    p = _predictor()
    assert contrast_limits(p.gene_stats, 1, "KRT8") == pytest.approx((0.2, 3.0))
    assert contrast_limits(None, 0, "ERBB2") == (0.0, 1.0)
    p.metadata = {"gene_stats": per_gene}
    p.genes = ["ERBB2"]
    assert model_gene_stats(p) is per_gene


def test_start_worker_inline_reports_failures_as_values():
    from napari_stpredict.widgets._common import Failed, start_worker

    got: list = []

    def gen(n):
        yield from range(n)
        return "done"

    start_worker(gen, 3, yielded=got.append, returned=got.append, inline=True)
    assert got == [0, 1, 2, "done"]

    def boom():
        raise StPredictError("model.safetensors: not a model file")

    got.clear()
    start_worker(boom, returned=got.append, finished=lambda: got.append("fin"), inline=True)
    assert isinstance(got[0], Failed) and got[0].text == "model.safetensors: not a model file"
    assert got[1] == "fin"


def test_worker_set_waits_without_sleeping():
    from napari_stpredict.widgets._common import WorkerSet

    ws = WorkerSet()
    ended = threading.Event()
    ws.add(object(), ended)
    assert len(ws) == 1 and not ws.wait(0.01)
    threading.Timer(0.05, ended.set).start()
    assert ws.wait(5.0) and len(ws) == 0


def test_export_plan_refuses_a_missing_folder(tmp_path):
    from napari_stpredict.widgets._state import ExportPlan, run_export_plan

    plan = ExportPlan(
        store=str(tmp_path / "x.zarr"), meta={}, kinds=("csv",), folder=tmp_path / "nope", name="x"
    )
    with pytest.raises(StPredictError, match="nope: output folder does not exist"):
        run_export_plan(plan)
