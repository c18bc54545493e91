"""Issue 14, "never lose a user's file": one test per numbered case, each failing before the fix.

Real slides and the tiny trained model (``tests/conftest.py``). Disk full is a real write
failure: a subprocess whose file-size limit (``RLIMIT_FSIZE``) is below the output's size gets
``EFBIG`` from the kernel on the write, exactly where a full disk gives ``ENOSPC``; or an
``OSError(ENOSPC)`` from a patched writer. Kills are real signals to subprocesses; two writers
are two processes (multiprocessing).
"""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from napari_stpredict.cli import main
from napari_stpredict.cohort import DONE_FILE, SUMMARY_FILE, collect_slides, predict_cohort
from napari_stpredict.errors import StPredictError
from napari_stpredict.io_utils import (
    TMP_PREFIX,
    OutputBusyError,
    atomic_path,
    confined,
    output_lock,
    safe_name,
    sweep_temporaries,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mob_mpp(mob_dir: Path) -> float:
    import pandas as pd

    from napari_stpredict.st import estimate_spot_pitch

    table = pd.read_csv(mob_dir / "alignment_table_MOB1.tsv", sep="\t")
    return 200.0 / estimate_spot_pitch(table[["pixel_x", "pixel_y"]].to_numpy(float))


def _stride(model: Path) -> float:
    from napari_stpredict.model import load_model_file

    return 3 * float(load_model_file(model).metadata["patch_um"])


def _tree(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder`` (files with their content, links with their target)."""
    out: dict[str, bytes | str] = {}
    for p in sorted(folder.rglob("*")):
        key = str(p.relative_to(folder))
        if p.is_symlink():
            out[key] = f"-> {os.readlink(p)}"
        elif p.is_file():
            out[key] = p.read_bytes()
        else:
            out[key] = "dir"
    return out


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith((TMP_PREFIX, ".stpredict-pyramid"))]


def _run_python(code: str, *, fsize: int | None = None, timeout: float = 300):
    """Run ``code`` in a fresh interpreter (optionally with a file-size limit); return it."""
    prelude = "import resource, signal, sys\n"
    if fsize is not None:
        prelude += (
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({fsize}, {fsize}))\n"
        )
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=str(REPO),
    )


def _one_line_error(proc) -> str:
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("stpredict: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


# ------------------------------------------------------------------ 1. names and confinement
def test_safe_name_and_confined_paths(tmp_path):
    assert safe_name("..") == safe_name("...") == safe_name("") == "slide"
    assert "/" not in safe_name("a/../../b c") and safe_name("a/../../b c") not in ("", "..")
    assert not safe_name(".hidden").startswith(".") and safe_name("C3 (HE)") == "C3_HE"
    out = tmp_path / "out"
    out.mkdir()
    assert confined(out, "x") == out.resolve() / "x"
    with pytest.raises(StPredictError, match="outside the output folder"):
        confined(out, "..")
    (out / "link").symlink_to(tmp_path)
    with pytest.raises(StPredictError, match="outside the output folder"):
        confined(out, "link", "x")
    assert [n for _, n in collect_slides([_make_dots(tmp_path)])] == ["slide"]


def _make_dots(tmp_path: Path) -> Path:
    src = Path(os.environ.get("STPREDICT_SHARED_DATA", REPO.parent / "shared" / "data"))
    src = src / "mob" / "MOB1.jpg"
    if not src.exists():
        pytest.skip("real data absent")
    d = tmp_path / "in"
    d.mkdir(exist_ok=True)
    p = d / "...png"
    shutil.copy(src, p)
    return p


def test_slide_named_dots_writes_nothing_outside_out(tmp_path, mob_mpp, tiny_model_file):
    slide = _make_dots(tmp_path)
    base = tmp_path / "base"
    out = base / "out"
    out.mkdir(parents=True)
    (base / "error.log").write_text("mine\n")
    (base / "done.json").write_text('{"mine": true}\n')
    before = _tree(base)
    result = predict_cohort(
        [slide],
        tiny_model_file,
        out,
        scheduler="inline",
        exports="csv",
        mpp=mob_mpp,
        stride_um=_stride(tiny_model_file),
    )
    assert result.ok and result.rows[0]["name"] == "slide"
    after = _tree(base)
    outside = {k: v for k, v in after.items() if not k.startswith("out")}
    assert outside == {k: v for k, v in before.items() if not k.startswith("out")}
    assert (out / "slide" / "predictions.zarr").is_dir()
    assert (out / "slide" / "slide.csv").is_file()


# ------------------------------------------------------------------ 7. error.log and symlinks
def test_error_log_never_follows_a_planted_symlink(tmp_path, wsi_dir, tiny_model_file):
    bad = tmp_path / "bad.svs"
    shutil.copy(wsi_dir / "broken" / "broken.svs", bad)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    (out / "bad").mkdir(parents=True)
    (out / "bad" / ".stpredict-output").write_text("{}\n")  # our folder, from an earlier run
    (out / "bad" / "error.log").symlink_to(victim)
    result = predict_cohort([bad], tiny_model_file, out, scheduler="inline", mpp=0.5)
    assert result.rows[0]["status"] == "failed"
    assert victim.read_text() == "precious\n"
    log = out / "bad" / "error.log"
    assert not log.is_symlink() and "Traceback" in log.read_text()


# ------------------------------------------------------------------ 2. never delete what is not ours
def test_omezarr_slide_inside_its_output_folder_is_refused(tmp_path, wsi_dir, tiny_model_file):
    from napari_stpredict.slide import open_slide, write_ome_zarr

    out = tmp_path / "out"
    (out / "predictions").mkdir(parents=True)
    slide = out / "predictions" / "predictions.zarr"
    with open_slide(wsi_dir / "cmu_small_region.svs") as s:
        write_ome_zarr(s, slide, tile=256)
    before = _tree(slide)
    with pytest.raises(StPredictError, match="inside its output folder"):
        predict_cohort([slide], tiny_model_file, out, scheduler="inline")
    assert _tree(slide) == before


def test_convert_into_its_own_source_folder_is_refused(tmp_path, wsi_dir, capsys):
    proj = tmp_path / "proj.zarr"
    proj.mkdir()
    src = proj / "slide.svs"
    shutil.copy(wsi_dir / "cmu_small_region.svs", src)
    assert main(["convert", str(src), str(proj), "--overwrite"]) == 2
    assert "inside the output" in capsys.readouterr().err
    assert src.read_bytes() == (wsi_dir / "cmu_small_region.svs").read_bytes()


def test_convert_replaces_only_its_own_folders(tmp_path, wsi_dir, capsys):
    dst = tmp_path / "user.zarr"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine\n")
    src = wsi_dir / "cmu_small_region.svs"
    assert main(["convert", str(src), str(dst), "--overwrite", "--tile", "256"]) == 2
    assert "not written by stpredict" in capsys.readouterr().err
    assert (dst / "notes.txt").read_text() == "mine\n"
    ours = tmp_path / "ours.zarr"
    assert main(["convert", str(src), str(ours), "--tile", "256"]) == 0
    assert main(["convert", str(src), str(ours), "--overwrite", "--tile", "256"]) == 0
    assert not _temporaries(tmp_path)


def _hold_lock(path: str, ready, release) -> None:
    from napari_stpredict.io_utils import output_lock

    with output_lock(path):
        ready.set()
        release.wait(60)


def _holding(path: Path):
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(str(path), ready, release))
    proc.start()
    assert ready.wait(120), "the first process did not take the lock"
    return proc, release


def test_second_convert_to_the_same_output_refuses(tmp_path, wsi_dir, capsys):
    dst = tmp_path / "slide.ome.tif"
    proc, release = _holding(dst)
    try:
        rc = main(["convert", str(wsi_dir / "cmu_small_region.svs"), str(dst)])
        err = capsys.readouterr().err
    finally:
        release.set()
        proc.join(60)
    assert rc == 2 and "another stpredict process" in err and len(err.strip().splitlines()) == 1
    assert not dst.exists()


def test_second_predict_to_the_same_slide_refuses_and_keeps_the_first(
    tmp_path, wsi_dir, tiny_model_file
):
    out = tmp_path / "out"
    (out / "cmu_small_region").mkdir(parents=True)
    (out / "cmu_small_region" / ".stpredict-output").write_text("{}\n")
    (out / "cmu_small_region" / "first.txt").write_text("the first run's\n")
    before = _tree(out / "cmu_small_region")
    proc, release = _holding(out / "cmu_small_region")
    try:
        result = predict_cohort(
            [wsi_dir / "cmu_small_region.svs"],
            tiny_model_file,
            out,
            scheduler="inline",
            stride_um=_stride(tiny_model_file),
        )
    finally:
        release.set()
        proc.join(60)
    row = result.rows[0]
    assert row["status"] == "failed" and "another stpredict process" in row["error"]
    assert _tree(out / "cmu_small_region") == before


# ------------------------------------------------------------------ 3. disk full
@pytest.fixture(scope="module")
def finished_store(tmp_path_factory, wsi_dir, tiny_model_file) -> Path:
    out = tmp_path_factory.mktemp("finished")
    result = predict_cohort(
        [wsi_dir / "cmu_small_region.svs"],
        tiny_model_file,
        out,
        scheduler="inline",
        stride_um=_stride(tiny_model_file) / 3,
    )
    assert result.ok
    return out / "cmu_small_region" / "predictions.zarr"


@pytest.mark.parametrize(
    ("kind", "call"),
    [
        ("h5ad", "export_h5ad(store, dst, overwrite=True)"),
        ("csv", "export_csv(store, dst, overwrite=True)"),
        ("ome.tif", "export_heatmaps_ome_tiff(store, dst, overwrite=True)"),
    ],
)
def test_full_disk_during_an_export_is_one_line_and_keeps_the_old_file(
    tmp_path, finished_store, kind, call
):
    dst = tmp_path / f"cells.{kind}"
    dst.write_bytes(b"the previous export\n")
    proc = _run_python(
        f"""
        from napari_stpredict.export import *
        from napari_stpredict.errors import StPredictError
        store, dst = {str(finished_store)!r}, {str(dst)!r}
        try:
            {call}
        except StPredictError as err:
            print("ERROR", err)
            sys.exit(3)
        """,
        fsize=16 * 1024,
    )
    assert proc.returncode == 3, (proc.returncode, proc.stderr[-3000:])
    line = proc.stdout.strip().splitlines()[-1]
    assert str(dst) in line and "File too large" in line
    assert dst.read_bytes() == b"the previous export\n"
    assert not _temporaries(tmp_path)


@pytest.fixture
def small_disk(tmp_path):
    """A real 192 KiB file system (tmpfs): writes beyond it fail with ENOSPC."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip()[:100]}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_really_full_disk_h5ad_is_one_line_not_a_crash(small_disk, finished_store):
    """HDF5 segfaults (rc 139) when the disk fills under it; the export must not."""
    dst = small_disk / "cells.h5ad"
    dst.write_bytes(b"the previous export\n")
    proc = _run_python(
        f"""
        from napari_stpredict.export import export_h5ad
        from napari_stpredict.errors import StPredictError
        try:
            export_h5ad({str(finished_store)!r}, {str(dst)!r}, overwrite=True)
        except StPredictError as err:
            print("ERROR", err)
            sys.exit(3)
        """
    )
    assert proc.returncode == 3, (proc.returncode, proc.stderr[-3000:])
    line = proc.stdout.strip().splitlines()[-1]
    assert str(dst) in line and ("No space left" in line or "free space" in line)
    assert dst.read_bytes() == b"the previous export\n"
    assert not _temporaries(small_disk)


def test_really_full_disk_during_convert_is_one_line(small_disk, wsi_dir):
    dst = small_disk / "slide.ome.tif"
    proc = _run_python(
        f"""
        from napari_stpredict.cli import main
        sys.exit(main(["convert", {str(wsi_dir / "cmu_small_region.svs")!r}, {str(dst)!r}]))
        """
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_line_error(proc)
    assert str(dst) in line and "No space left on device" in line
    assert not dst.exists() and not _temporaries(small_disk)


@pytest.mark.parametrize("suffix", [".ome.tif", ".zarr"])
def test_full_disk_during_convert_is_one_line(tmp_path, wsi_dir, suffix):
    dst = tmp_path / f"slide{suffix}"
    proc = _run_python(
        f"""
        from napari_stpredict.cli import main
        sys.exit(main(["convert", {str(wsi_dir / "cmu_small_region.svs")!r}, {str(dst)!r},
                       "--tile", "256"]))
        """,
        fsize=64 * 1024,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_line_error(proc)
    assert str(dst) in line and "File too large" in line
    assert not dst.exists() and not _temporaries(tmp_path)


def test_full_disk_for_summary_json_is_one_line(
    tmp_path, wsi_dir, tiny_model_file, monkeypatch, capsys
):
    original = Path.write_text

    def full(self, *args, **kwargs):
        if "summary.json" in self.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    out = tmp_path / "out"
    args = [
        "predict", str(wsi_dir / "cmu_small_region.svs"), "--model", str(tiny_model_file),
        "--out", str(out), "--scheduler", "inline", "--stride-um", str(_stride(tiny_model_file)),
    ]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "summary.json" in err and "No space left on device" in err and "Traceback" not in err
    assert (out / "cmu_small_region" / DONE_FILE).is_file()  # the slide itself is kept
    assert not (out / SUMMARY_FILE).exists() and not _temporaries(out)


# ------------------------------------------------------------------ 4. kills and leftovers
_KILL_DURING_CONVERT = """
import os, signal
from napari_stpredict.slide import open_slide, write_ome_tiff, write_ome_zarr
from napari_stpredict.cli import _sigterm_as_interrupt
_sigterm_as_interrupt()
def progress(done, total, message=""):
    if done >= 2:
        os.kill(os.getpid(), signal.{sig})
with open_slide({src!r}) as s:
    {writer}(s, {dst!r}, tile=256, progress=progress)
"""


@pytest.mark.parametrize("suffix", [".ome.tif", ".zarr"])
def test_sigkill_leftovers_are_swept_by_the_next_run(tmp_path, wsi_dir, suffix):
    src = str(wsi_dir / "cmu_small_region.svs")
    dst = tmp_path / f"slide{suffix}"
    writer = "write_ome_tiff" if suffix == ".ome.tif" else "write_ome_zarr"
    proc = _run_python(
        _KILL_DURING_CONVERT.format(sig="SIGKILL", src=src, dst=str(dst), writer=writer)
    )
    assert proc.returncode == -signal.SIGKILL
    assert _temporaries(tmp_path), "the killed run left no temporary to sweep"
    # the next run is a new process, as a user's rerun would be
    rerun = _run_python(
        f"""
        from napari_stpredict.cli import main
        sys.exit(main(["convert", {src!r}, {str(dst)!r}, "--tile", "256"]))
        """
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert dst.exists() and not _temporaries(tmp_path)


def test_sigterm_removes_its_own_temporaries(tmp_path, wsi_dir):
    dst = tmp_path / "slide.ome.tif"
    proc = _run_python(
        _KILL_DURING_CONVERT.format(
            sig="SIGTERM",
            src=str(wsi_dir / "cmu_small_region.svs"),
            dst=str(dst),
            writer="write_ome_tiff",
        )
    )
    assert proc.returncode != 0
    assert not dst.exists() and not _temporaries(tmp_path)


def test_sweep_spares_temporaries_of_running_processes(tmp_path):
    target = tmp_path / "x.csv"
    live = tmp_path / f"{TMP_PREFIX}x.csv-{os.getppid()}-0123abcd.csv"
    live.write_text("in progress\n")
    dead = tmp_path / f"{TMP_PREFIX}x.csv-999999999-0123abcd.csv"
    dead.write_text("left by a killed run\n")
    other = tmp_path / f"{TMP_PREFIX}y.csv-999999999-0123abcd.csv"
    other.write_text("another output's\n")
    for p in (live, dead, other):
        os.utime(p, (1, 1))
    assert sweep_temporaries(target) == [dead]
    assert live.exists() and other.exists()
    with atomic_path(target) as tmp:
        tmp.write_text("a\n")
    assert target.read_text() == "a\n"


def test_legacy_pyramid_leftovers_are_swept_by_the_next_convert(tmp_path, wsi_dir):
    old = tmp_path / ".stpredict-pyramid-abc123"
    (old / "level1").mkdir(parents=True)
    (old / "level1" / "chunk").write_bytes(b"x" * 1000)
    os.utime(old, (1, 1))
    fresh = tmp_path / ".stpredict-pyramid-new"  # may belong to a running older version
    fresh.mkdir()
    dst = tmp_path / "slide.ome.tif"
    assert main(["convert", str(wsi_dir / "cmu_small_region.svs"), str(dst), "--tile", "256"]) == 0
    assert not old.exists() and fresh.exists()


# ------------------------------------------------------------------ 5. no traceback, verified reuse
def test_done_slide_with_a_broken_store_is_predicted_again(tmp_path, wsi_dir, tiny_model_file):
    from napari_stpredict.inference.store import PredictionStore

    if not hasattr(PredictionStore, "verify"):
        pytest.skip("the prediction store cannot verify itself yet")
    out = tmp_path / "out"
    common = dict(scheduler="inline", stride_um=_stride(tiny_model_file))
    slide = wsi_dir / "cmu_small_region.svs"
    first = predict_cohort([slide], tiny_model_file, out, **common)
    assert first.rows[0]["status"] == "done"
    chunks = sorted((out / "cmu_small_region" / "predictions.zarr" / "values").rglob("c/*/*/*"))
    assert chunks
    chunks[0].write_bytes(b"not zstd at all")
    again = predict_cohort([slide], tiny_model_file, out, **common)
    assert again.rows[0]["status"] == "done"  # not "skipped" on the word of done.json
    assert again.rows[0]["predicted"] > 0


def test_model_with_a_wrong_shape_tensor_names_it(tmp_path, tiny_model_file):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from napari_stpredict.errors import ModelFileError
    from napari_stpredict.model import Predictor
    from napari_stpredict.model.checkpoint import _content_hash

    tensors = load_file(str(tiny_model_file))
    with safe_open(str(tiny_model_file), framework="pt") as f:
        header = dict(f.metadata())
    name = next(
        k for k, t in tensors.items() if k.startswith("model.") and t.ndim == 2 and t.shape[0] > 2
    )
    tensors[name] = tensors[name][:-1].clone()
    meta = json.loads(header["stpredict"])
    meta["content_sha256"] = _content_hash(tensors)
    header["stpredict"] = json.dumps(meta)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=header)
    with pytest.raises(ModelFileError) as info:
        Predictor(bad, device="cpu")
    msg = str(info.value)
    assert "\n" not in msg and "has shape" in msg and name.split(".", 1)[-1] in msg


# ------------------------------------------------------------------ 6. validation up front
def test_absurd_stride_is_refused_before_any_work(tmp_path, wsi_dir, tiny_model_file, capsys):
    out = tmp_path / "out"
    args = [
        "predict", str(wsi_dir / "cmu_small_region.svs"), "--model", str(tiny_model_file),
        "--out", str(out), "--scheduler", "inline", "--stride-um", "0.001",
    ]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--stride-um 0.001" in err and "tiles" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_slide_without_mpp_is_refused_naming_mpp(tmp_path, mob_dir, tiny_model_file, capsys):
    out = tmp_path / "out"
    args = [
        "predict", str(mob_dir / "MOB1.jpg"), "--model", str(tiny_model_file),
        "--out", str(out), "--scheduler", "inline",
    ]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "MOB1.jpg" in err and "--mpp" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_demo_unknown_gene_fails_before_predicting(
    tmp_path, tiny_model_file, wsi_dir, monkeypatch, capsys
):
    from napari_stpredict.inference.engine import Engine

    def no_prediction(*a, **k):
        raise AssertionError("predicted before checking the genes")

    monkeypatch.setattr(Engine, "run", no_prediction)
    monkeypatch.setattr(Engine, "predict_all_tissue", no_prediction)
    args = [
        "demo", "--no-viewer", "--quick", "--model", str(tiny_model_file),
        "--slide", str(wsi_dir / "cmu_small_region.svs"), "--cache-dir", str(tmp_path),
        "--genes", "NOTAGENE",
    ]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "NOTAGENE" in err and err.count("stpredict: error:") == 1 and "Traceback" not in err


# ------------------------------------------------------------------ issue 10.3 / 12: exports
def test_an_export_that_cannot_be_made_never_fails_the_slide(
    tmp_path, mob_dir, mob_mpp, tiny_model_file, monkeypatch
):
    import anndata as ad

    import napari_stpredict.st.genesets as genesets
    import napari_stpredict.tumor as tumor

    reason = "tumour signature: none of ERBB2, KRT19 among the model's genes"
    monkeypatch.setattr(genesets, "tumour_support", lambda header: (False, reason))
    notes: list[str] = []
    out = tmp_path / "out"
    common = dict(scheduler="inline", mpp=mob_mpp, stride_um=_stride(tiny_model_file))
    result = predict_cohort(
        [mob_dir / "MOB1.jpg"],
        tiny_model_file,
        out,
        exports="h5ad,geojson",
        on_note=notes.append,
        **common,
    )
    row = result.rows[0]
    assert result.ok and row["status"] == "done"
    assert set(row["outputs"]) == {"h5ad"} and row["export_errors"] == {"geojson": reason}
    assert any("geojson" in n for n in notes)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["slides"][0]["export_errors"] == {"geojson": reason}
    # every tissue tile was predicted: the h5ad is not "partial"
    adata = ad.read_h5ad(out / "MOB1" / row["outputs"]["h5ad"])
    assert not bool(adata.uns["stpredict"]["partial"])
    assert int(adata.uns["stpredict"]["n_missing"]) == 0

    # the same when the tumour map fails only after prediction (no up-front check)
    monkeypatch.setattr(genesets, "tumour_support", lambda header: (True, ""))

    def broken(*a, **k):
        raise StPredictError("tumour signature: too few genes")

    monkeypatch.setattr(tumor, "tumor_map_for_store", broken)
    result = predict_cohort(
        [mob_dir / "MOB1.jpg"], tiny_model_file, tmp_path / "out2", exports="csv,geojson", **common
    )
    row = result.rows[0]
    assert row["status"] == "done" and set(row["outputs"]) == {"csv"}
    assert row["export_errors"] == {"geojson": "tumour signature: too few genes"}


def test_export_is_partial_only_when_tissue_tiles_are_missing(real_store, tmp_path):
    from napari_stpredict.export import export_csv
    from napari_stpredict.export._predictions import as_predictions

    store, _ = real_store
    pred = as_predictions(store)
    done = pred.predicted()
    pred.set_tissue(done)  # the tissue is exactly what was predicted
    res = export_csv(pred, tmp_path / "a.csv")
    assert not res.partial and "; partial:" not in res.message()
    tissue = done.copy()
    tissue[0, 0] = True  # one tissue tile not predicted
    pred.set_tissue(tissue)
    res = export_csv(pred, tmp_path / "b.csv")
    assert res.partial and "1 of" in res.message() and "tissue tiles" in res.message()


def test_help_shows_boolean_flags_as_flags(capsys):
    main(["predict", "--help"])
    text = capsys.readouterr().out
    assert "--json" in text and "<bool>" not in text


def test_lock_is_released_after_use(tmp_path):
    target = tmp_path / "x.ome.tif"
    with output_lock(target):
        pass
    with output_lock(target):
        pass
    with output_lock(target), pytest.raises(OutputBusyError):
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        p = ctx.Process(target=_try_lock, args=(str(target), q))
        p.start()
        p.join(60)
        raise q.get(timeout=5)


def _try_lock(path: str, q) -> None:
    from napari_stpredict.io_utils import output_lock

    try:
        with output_lock(path):
            q.put(AssertionError("got the lock"))
    except Exception as err:
        q.put(err)
