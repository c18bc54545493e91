"""`stpredict predict`: cohorts in-process and on a real dask LocalCluster, resume, failures.

Real slides (a tiled Aperio SVS and a legacy-ST JPEG without a pixel size) and the tiny trained
model from ``tests/conftest.py``. A coarse stride keeps each slide at about a hundred cells at most.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from napari_stpredict.cli import main
from napari_stpredict.cohort import (
    DONE_FILE,
    EXPORT_FORMATS,
    SUMMARY_FILE,
    collect_slides,
    parse_exports,
    predict_cohort,
)
from napari_stpredict.distributed import (
    ClusterPlan,
    parse_scheduler,
    plan_local_cluster,
    start_local_cluster,
)
from napari_stpredict.errors import Cancelled, StPredictError
from napari_stpredict.progress import CancelToken


@pytest.fixture(scope="module")
def slides(wsi_dir: Path, mob_dir: Path) -> list[Path]:
    return [wsi_dir / "cmu_small_region.svs", mob_dir / "MOB1.jpg"]


@pytest.fixture(scope="module")
def mob_mpp(mob_dir: Path) -> float:
    """MOB1.jpg records no pixel size: legacy ST spots are 200 µm apart (as the reader infers)."""
    import pandas as pd

    from napari_stpredict.st import estimate_spot_pitch

    table = pd.read_csv(mob_dir / "alignment_table_MOB1.tsv", sep="\t")
    return 200.0 / estimate_spot_pitch(table[["pixel_x", "pixel_y"]].to_numpy(float))


def _stride(model: Path) -> float:
    """Three patches: a coarse grid keeps each slide at a hundred cells or so."""
    from napari_stpredict.model import load_model_file

    return 3 * float(load_model_file(model).metadata["patch_um"])


def _values(out: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    group = zarr.open_group(out / name / "predictions.zarr", mode="r")
    return np.asarray(group["values"]), np.asarray(group["done"])


def _summary(out: Path) -> dict:
    return json.loads((out / SUMMARY_FILE).read_text())


def test_inline_and_local_cluster_give_identical_stores(tmp_path, slides, mob_mpp, tiny_model_file):
    stride = _stride(tiny_model_file)
    common = dict(stride_um=stride, mpp=mob_mpp, batch_size=16)
    a = predict_cohort(slides, tiny_model_file, tmp_path / "inline", scheduler="inline", **common)
    b = predict_cohort(
        slides, tiny_model_file, tmp_path / "local", scheduler="local", workers=2, **common
    )
    assert a.ok and b.ok
    assert [r["status"] for r in a.rows] == ["done", "done"]
    assert [r["status"] for r in b.rows] == ["done", "done"]
    assert b.scheduler == "local"
    for ra, rb in zip(a.rows, b.rows, strict=True):
        assert ra["cells"] == rb["cells"] > 0
        assert ra["predicted"] == ra["cells"]
        va, da = _values(tmp_path / "inline", ra["name"])
        vb, db = _values(tmp_path / "local", rb["name"])
        np.testing.assert_array_equal(da, db)
        assert da.sum() == ra["cells"]
        np.testing.assert_array_equal(np.isnan(va), np.isnan(vb))
        np.testing.assert_allclose(va, vb, rtol=1e-5, atol=1e-5, equal_nan=True)
        assert np.isfinite(va[:, da]).all() and np.isnan(va[:, ~da]).all()
    # the model is loaded once per worker process: at most one load per worker used
    workers = {r["worker"] for r in b.rows}
    loads = sum(not r["model_cached"] for r in b.rows)
    assert loads == len(workers)
    assert all(r["worker"].split(":")[-1] != str(os.getpid()) for r in b.rows)
    summary = _summary(tmp_path / "local")
    assert summary["counts"] == {"done": 2}
    assert summary["cells"] == sum(r["cells"] for r in b.rows)
    for r in b.rows:
        done = json.loads((tmp_path / "local" / r["name"] / DONE_FILE).read_text())
        assert done["status"] == "done" and done["cells"] == r["cells"]


def test_resume_after_cancel_predicts_only_the_remaining_cells(
    tmp_path, slides, mob_mpp, tiny_model_file, monkeypatch
):
    from napari_stpredict.model.predictor import Predictor

    out = tmp_path / "out"
    token = CancelToken()
    seen: list[tuple[str, int, int | None]] = []

    def on_progress(name, done, total, message=""):
        seen.append((name, done, total))
        if done > 0 and total:  # after the first batch of the first slide
            token.cancel()

    slides = slides[::-1]  # MOB1 first: many batches, so the cancel lands mid-slide
    common = dict(stride_um=_stride(tiny_model_file), mpp=mob_mpp, batch_size=8)
    with pytest.raises(Cancelled):
        predict_cohort(
            slides,
            tiny_model_file,
            out,
            scheduler="inline",
            on_slide_progress=on_progress,
            cancel=token,
            **common,
        )
    summary = _summary(out)  # written even when cancelled
    assert [r["status"] for r in summary["slides"]] == ["cancelled", "cancelled"]
    first = summary["slides"][0]["name"]
    _, done_mask = _values(out, first)
    kept = int(done_mask.sum())
    assert kept > 0  # finished batches stay in the store
    assert not (out / first / DONE_FILE).exists()

    calls = {"patches": 0, "calls": 0}
    original = Predictor.predict

    def counting(self, patches, **kwargs):
        calls["patches"] += len(patches)
        calls["calls"] += 1
        return original(self, patches, **kwargs)

    monkeypatch.setattr(Predictor, "predict", counting)
    result = predict_cohort(slides, tiny_model_file, out, scheduler="inline", **common)
    assert result.ok
    total = sum(r["cells"] for r in result.rows)
    assert kept < result.rows[0]["cells"]
    assert calls["patches"] == total - kept
    assert [r["predicted"] for r in result.rows] == [
        result.rows[0]["cells"] - kept,
        result.rows[1]["cells"],
    ]
    # a third run finds every slide finished: no model call, nothing predicted
    calls.update(patches=0, calls=0)
    again = predict_cohort(slides, tiny_model_file, out, scheduler="inline", **common)
    assert [r["status"] for r in again.rows] == ["skipped", "skipped"]
    assert calls["calls"] == 0
    assert [r["cells"] for r in again.rows] == [r["cells"] for r in result.rows]


def test_failing_slide_is_reported_and_the_others_finish(
    tmp_path, wsi_dir, tiny_model_file, capsys
):
    out = tmp_path / "out"
    good = wsi_dir / "cmu_small_region.svs"
    broken = wsi_dir / "broken" / "broken.svs"
    args = [
        "predict",
        str(broken),
        str(good),
        "--model",
        str(tiny_model_file),
        "--out",
        str(out),
        "--scheduler",
        "inline",
        "--stride-um",
        str(_stride(tiny_model_file)),
        "--export",
        "h5ad,csv",
        "--json",
    ]
    assert main(args) == 1
    printed = json.loads(capsys.readouterr().out)
    summary = _summary(out)
    assert printed["slides"] == summary["slides"]
    rows = {r["name"]: r for r in summary["slides"]}
    assert rows["broken"]["status"] == "failed"
    assert "broken.svs" in rows["broken"]["error"]
    assert "\n" not in rows["broken"]["error"]
    assert (out / "broken" / "error.log").read_text().strip()
    assert rows["cmu_small_region"]["status"] == "done"
    assert summary["n_failed"] == 1

    import anndata

    adata = anndata.read_h5ad(
        out / "cmu_small_region" / rows["cmu_small_region"]["outputs"]["h5ad"]
    )
    assert adata.n_obs == rows["cmu_small_region"]["cells"]
    assert adata.obsm["spatial"].shape == (adata.n_obs, 2)
    csv_lines = (out / "cmu_small_region" / "cmu_small_region.csv").read_text().splitlines()
    assert len(csv_lines) == adata.n_obs + 1

    # asking for one more export later reuses the predictions (nothing predicted again)
    args[args.index("h5ad,csv")] = "h5ad,csv,ome-tiff"
    assert main(args) == 1
    capsys.readouterr()
    rows = {r["name"]: r for r in _summary(out)["slides"]}
    assert rows["cmu_small_region"]["status"] == "done"
    assert rows["cmu_small_region"]["predicted"] == 0
    import tifffile

    with tifffile.TiffFile(out / "cmu_small_region" / "cmu_small_region_heatmaps.ome.tif") as tif:
        assert tif.is_ome


def test_bad_input_exits_2_before_any_work(tmp_path, wsi_dir, tiny_model_file, capsys):
    slide = str(wsi_dir / "cmu_small_region.svs")
    out = tmp_path / "out"
    missing_model = [
        "predict",
        slide,
        "--model",
        str(tmp_path / "nope.safetensors"),
        "-o",
        str(out),
    ]
    assert main(missing_model) == 2
    assert "nope.safetensors" in capsys.readouterr().err
    assert (
        main(["predict", str(tmp_path / "nope.svs"), "-m", str(tiny_model_file), "-o", str(out)])
        == 2
    )
    assert "nope.svs" in capsys.readouterr().err
    assert main(["predict", slide, "-m", str(tiny_model_file), "-o", str(out), "-e", "pdf"]) == 2
    assert "pdf" in capsys.readouterr().err
    assert main(["predict", "-m", str(tiny_model_file), "-o", str(out)]) == 2  # no slides
    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", str(empty), "-m", str(tiny_model_file), "-o", str(out)]) == 2
    assert "no slide" in capsys.readouterr().err
    assert not out.exists()


def test_collect_slides_expands_folders_and_keeps_names_unique(tmp_path, wsi_dir, mob_dir):
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "s.svs").symlink_to(wsi_dir / "cmu_small_region.svs")
    (b / "s.tiff").symlink_to(wsi_dir / "small_HE_levels.tiff")
    (b / "same.svs").symlink_to(wsi_dir / "cmu_small_region.svs")
    (a / "MOB1.jpg").symlink_to(mob_dir / "MOB1.jpg")
    (a / "notes.txt").write_text("not a slide")
    pairs = collect_slides([a, b / "s.tiff", a / "s.svs", b / "same.svs"])
    # a/s.svs given twice and b/same.svs (the same file) count once
    assert [n for _, n in pairs] == ["MOB1", "a__s", "b__s"]
    with pytest.raises(StPredictError, match="no such file"):
        collect_slides([tmp_path / "missing.svs"])


def test_parse_exports_and_scheduler():
    from napari_stpredict.export import EXPORT_KINDS

    assert set(EXPORT_FORMATS) == set(EXPORT_KINDS)
    assert parse_exports("h5ad, geojson,OME-TIFF,csv,h5ad") == (
        "h5ad",
        "geojson",
        "ome-tiff",
        "csv",
    )
    with pytest.raises(StPredictError, match="xlsx"):
        parse_exports("h5ad,xlsx")
    assert parse_scheduler("local").kind == "local"
    assert parse_scheduler("none").kind == parse_scheduler("inline").kind == "inline"
    assert parse_scheduler("tcp://10.0.0.5:8786").address == "tcp://10.0.0.5:8786"
    assert parse_scheduler("sched.example.org:8786").address == "tcp://sched.example.org:8786"
    with pytest.raises(StPredictError, match="scheduler"):
        parse_scheduler("kubernetes")


def test_local_cluster_plan_gives_each_worker_its_own_gpu():
    plan = plan_local_cluster(n_jobs=10, cores=16, gpus=["0", "3"])
    assert plan == ClusterPlan(n_workers=2, threads_per_worker=8, gpus=("0", "3"))
    assert plan_local_cluster(n_jobs=1, cores=16, gpus=["0", "3"]).n_workers == 1
    cpu = plan_local_cluster(n_jobs=10, cores=16, gpus=[])
    assert cpu.n_workers == 4 and cpu.threads_per_worker == 4 and cpu.gpus == (None,) * 4
    assert plan_local_cluster(n_jobs=10, cores=2, gpus=[]).n_workers == 1
    assert plan_local_cluster(n_jobs=10, cores=2, gpus=[], workers=2).threads_per_worker == 1
    with pytest.raises(StPredictError):
        plan_local_cluster(n_jobs=3, workers=0)


def test_local_cluster_workers_see_only_their_gpu():
    # GPU ids are only environment here: nothing touches CUDA, so this runs without GPUs
    from distributed import Client

    plan = ClusterPlan(n_workers=2, threads_per_worker=1, gpus=("0", "1"))
    cluster = start_local_cluster(plan, dashboard=False)
    try:
        with Client(cluster, set_as_default=False) as client:
            env = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
            info = client.scheduler_info()["workers"]
    finally:
        cluster.close()
    assert sorted(env.values()) == ["0", "1"]
    assert all(w["resources"] == {"GPU": 1} for w in info.values())
    assert all(w["nthreads"] == 1 for w in info.values())


def test_existing_cluster_by_address(tmp_path, wsi_dir, tiny_model_file):
    # a scheduler someone else started (here: in this process, one GPU-declaring worker)
    from distributed import LocalCluster

    cluster = LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=False,
        dashboard_address=None,
        resources={"GPU": 1},
    )
    lines: list[str] = []
    try:
        result = predict_cohort(
            [wsi_dir / "cmu_small_region.svs"],
            tiny_model_file,
            tmp_path / "out",
            scheduler=cluster.scheduler_address,
            stride_um=_stride(tiny_model_file),
            on_cluster=lines.append,
        )
    finally:
        cluster.close()
    assert result.ok and result.rows[0]["status"] == "done"
    assert result.scheduler == cluster.scheduler_address
    assert "1 worker(s) with GPU resources" in lines[0]
    assert result.rows[0]["worker"].endswith(f":{os.getpid()}")  # ran on that cluster's worker
    from napari_stpredict.distributed import connect

    with (
        pytest.raises(StPredictError, match="cannot connect"),
        connect("tcp://127.0.0.1:9", timeout_s=1),
    ):
        pass


def test_folder_takes_only_what_open_slide_reads_and_names_are_safe(tmp_path, wsi_dir):
    from napari_stpredict.slide.opener import SLIDE_SUFFIXES

    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("a.mrxs", "b.scn", "c.bif", "notes.txt"):
        (folder / name).write_text("not a slide we read\n")
    (folder / "C3 (HE).svs").write_bytes((wsi_dir / "small.svs").read_bytes())
    pairs = collect_slides([folder])
    assert [p.name for p, _ in pairs] == ["C3 (HE).svs"]
    assert [n for _, n in pairs] == ["C3_HE"]
    assert ".mrxs" not in SLIDE_SUFFIXES


def test_rows_are_typed_and_read_as_mappings(tmp_path):
    from napari_stpredict.cohort import SlideJob, SlideRow

    job = SlideJob("s.svs", "s", "m.safetensors", "0" * 64, str(tmp_path))
    row = SlideRow.failed(job, StPredictError("s.svs: corrupt\nmore"), 0.5)
    assert row.status == row["status"] == "failed" and row["error"] == "s.svs: corrupt"
    assert json.loads(json.dumps(row.to_dict()))["export_errors"] == {}
    assert dict(row)["name"] == "s" and SlideRow.cancelled(job)["status"] == "cancelled"
