"""``stpredict info`` and ``stpredict convert`` on real slides."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_stpredict.cli import main
from napari_stpredict.slide import open_slide


def _info(capsys: pytest.CaptureFixture[str], path: Path, *extra: str) -> dict:
    assert main(["info", str(path), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_info_json_contract(
    capsys: pytest.CaptureFixture[str], wsi_dir: Path, her2st_dir: Path
) -> None:
    doc = _info(capsys, wsi_dir / "cmu_small_region.svs")
    assert {"path", "format", "mpp", "levels", "shape", "units", "fingerprint", "metadata"} <= set(
        doc
    )
    assert doc["format"] == "svs" and doc["mpp"] == pytest.approx(0.499) and doc["units"] == "µm"
    assert doc["levels"][0] == {
        "shape": [2967, 2220, 3],
        "downsample": 1.0,
        "chunks": [240, 240, 3],
        "stored": True,
    }
    assert [lv["stored"] for lv in doc["levels"]] == [True, False, False]
    assert doc["levels"][1]["shape"] == [1483, 1110, 3] and doc["levels"][1]["downsample"] == 2.0

    doc = _info(capsys, wsi_dir / "boxes.tiff")
    assert (
        doc["format"] == "tiff"
        and doc["mpp"] == pytest.approx(352.78, abs=0.01)
        and doc["units"] == "µm"
    )
    assert "mpp_suspect" in doc["metadata"]
    assert [lv["shape"][:2] for lv in doc["levels"]] == [[250, 300], [125, 150], [62, 75], [31, 37]]
    # first dask chunk of each level: the 64-px tile, clipped to small levels
    assert [lv["chunks"] for lv in doc["levels"]] == [
        [64, 64, 3],
        [64, 64, 3],
        [62, 64, 3],
        [31, 37, 3],
    ]

    doc = _info(capsys, her2st_dir / "images" / "C2.jpg", "--mpp", "1.1")
    assert doc["format"] == "image" and doc["mpp"] == 1.1 and doc["shape"] == [9911, 9274]


def test_info_table(capsys: pytest.CaptureFixture[str], wsi_dir: Path) -> None:
    assert main(["info", str(wsi_dir / "small_HE_levels.tiff")]) == 0
    out = capsys.readouterr().out
    assert "tiff" in out and "352.9 µm/px" in out and "125 x 150 x 3" in out
    assert "looks like a default screen resolution" in out


@pytest.mark.parametrize("name", ["broken.svs", "unreadable.svs", "unopenable.tiff"])
def test_info_refuses_broken(capsys: pytest.CaptureFixture[str], wsi_dir: Path, name: str) -> None:
    assert main(["info", str(wsi_dir / "broken" / name)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stpredict: error: ") and name in err and "\n" not in err


def test_convert_round_trips(
    capsys: pytest.CaptureFixture[str], wsi_dir: Path, tmp_path: Path
) -> None:
    src = wsi_dir / "cmu_small_region.svs"
    dst = tmp_path / "cmu.ome.tif"
    assert main(["convert", str(src), str(dst), "--tile", "256", "--compression", "deflate"]) == 0
    assert "wrote" in capsys.readouterr().err
    with open_slide(src) as a, open_slide(dst) as b:
        assert b.mpp == pytest.approx(0.499) and b.levels[0].chunksize == (256, 256, 3)
        assert np.array_equal(a.read_region(0, 0, 0, *a.shape), b.read_region(0, 0, 0, *b.shape))
    # existing target: refused unless --overwrite; --mpp replaces the resolution
    assert main(["convert", str(src), str(dst)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(src), str(dst), "--overwrite", "--mpp", "0.25"]) == 0
    assert open_slide(dst).mpp == pytest.approx(0.25)
    assert open_slide(dst).metadata["compression"] == "jpeg"  # the OME-TIFF default

    zdst = tmp_path / "cmu.zarr"
    assert main(["convert", str(src), str(zdst), "--tile", "512"]) == 0
    with open_slide(zdst) as z, open_slide(src) as a:
        assert z.format == "ome-zarr" and z.mpp == pytest.approx(0.499)
        assert np.array_equal(
            z.read_region(0, 100, 100, 700, 900), a.read_region(0, 100, 100, 700, 900)
        )


def test_convert_bad_input(
    capsys: pytest.CaptureFixture[str], wsi_dir: Path, tmp_path: Path
) -> None:
    src = wsi_dir / "small.svs"
    cases = [
        (["convert", str(src), str(tmp_path / "x.png")], "must end in"),
        (
            ["convert", str(src), str(tmp_path / "x.ome.tif"), "--compression", "lzw"],
            "jpeg or deflate",
        ),
        (["convert", str(src), str(tmp_path / "x.zarr"), "--compression", "jpeg"], "not supported"),
        (["convert", str(src), str(tmp_path / "x.ome.tif"), "--tile", "100"], "multiple of 16"),
        (
            ["convert", str(wsi_dir / "broken" / "broken.svs"), str(tmp_path / "x.ome.tif")],
            "broken.svs",
        ),
        (["convert", str(src), str(tmp_path / "nofolder" / "x.ome.tif")], "does not exist"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and err.count("stpredict: error:") == 1
    assert list(tmp_path.iterdir()) == []


def test_console_script_exit_code(wsi_dir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "napari_stpredict", "info", str(wsi_dir / "broken" / "broken.svs")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "broken.svs" in proc.stderr
