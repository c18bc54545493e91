"""``stpredict view --screenshot``: the whole product headless (run under ``xvfb-run -a``)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.gui

ARTIFACTS = __import__("pathlib").Path(__file__).parent / "artifacts"


def _stpredict(*args: str, cache_dir, env_extra: dict | None = None, timeout: float = 600):
    env = {**os.environ, "STPREDICT_CACHE_DIR": str(cache_dir)}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "napari_stpredict", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def _read_png(path):
    import imageio.v3 as iio

    return np.asarray(iio.imread(path))[..., :3].astype(np.int16)


@pytest.fixture(scope="module")
def cmu(wsi_dir):
    return wsi_dir / "cmu_small_region.svs"


def test_view_screenshot_shows_predicted_heatmap(cmu, tiny_model_file, tmp_path):
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        pytest.skip("needs a display: run under xvfb-run -a")
    view = ["--center-um", "550,700", "--zoom", "0.9", "--size", "900,700"]
    plain = tmp_path / "slide.png"
    res = _stpredict("view", str(cmu), *view, "--screenshot", str(plain), cache_dir=tmp_path / "c")
    assert res.returncode == 0, res.stderr
    shot = tmp_path / "heatmap.png"
    res = _stpredict(
        "view",
        str(cmu),
        "--model",
        str(tiny_model_file),
        "--genes",
        "ERBB2,KRT18",
        *view,
        "--screenshot",
        str(shot),
        "--device",
        "cpu",
        cache_dir=tmp_path / "c",
    )
    assert res.returncode == 0, res.stderr
    assert "saved" in res.stderr
    # the visible tissue was predicted into the cache...
    from napari_stpredict.inference.store import PredictionStore, list_cache

    (entry,) = list_cache(tmp_path / "c")
    store = PredictionStore.from_path(entry.path)
    assert store.n_done > 0
    assert "ERBB2" in store.genes
    # ... and drawn. The canvas size depends on --size alone (the status bar, whose height
    # follows its text, is hidden for screenshots), so both shots show the same view.
    a, b = _read_png(plain), _read_png(shot)
    assert a.shape == b.shape
    # the plain shot is the slide: bright background around tissue, not an empty canvas
    background = a[..., :3].min(axis=-1) > 200
    assert 0.1 < background.mean() < 0.95
    # the legend (colour bar + gene name in a dark box) sits in the top-right corner
    h, w = a.shape[:2]
    legend = np.zeros((h, w), bool)
    legend[: h // 4, w * 2 // 3 :] = True
    dark_a, dark_b = (x[..., :3].max(axis=-1) < 60 for x in (a, b))
    assert 0.05 < dark_b[legend].mean() < 0.9
    assert dark_b[legend].mean() > 3 * dark_a[legend].mean()
    # heatmap tiles cover the tissue, not the empty background (a black canvas fails here)
    changed = np.abs(a - b).max(axis=-1) > 30
    assert 0.05 < changed.mean() < 0.95
    assert (b[..., :3].min(axis=-1) > 200).mean() > 0.1  # background still visible
    over_tissue = changed[~background & ~legend].mean()
    assert over_tissue > 0.5 and over_tissue > 2 * changed[background & ~legend].mean()
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "cli_view_heatmap.png").write_bytes(shot.read_bytes())
    # no half-written file next to the screenshot
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".png") == [
        "heatmap.png",
        "slide.png",
    ]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--genes", "ERBB2"], "--genes needs --model"),
        (["--center-um", "12"], "--center-um"),
        (["--zoom", "-1"], "--zoom"),
        (["--screenshot", "out.jpg"], ".png"),
    ],
)
def test_view_refuses_bad_options(cmu, tmp_path, extra, needle):
    res = _stpredict("view", str(cmu), *extra, cache_dir=tmp_path / "c", timeout=120)
    assert res.returncode == 2
    assert res.stderr.startswith("stpredict: error:")
    assert needle in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_view_refuses_unknown_genes_and_bad_files(cmu, tiny_model_file, wsi_dir, tmp_path):
    res = _stpredict(
        "view", str(cmu), "--model", str(tiny_model_file), "--genes", "ERBB2,NOTAGENE",
        cache_dir=tmp_path / "c", timeout=300,
    )  # fmt: skip
    assert res.returncode == 2 and "NOTAGENE" in res.stderr
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a model" * 20)
    res = _stpredict("view", str(cmu), "--model", str(junk), cache_dir=tmp_path / "c", timeout=300)
    assert res.returncode == 2 and "junk.safetensors" in res.stderr
    res = _stpredict("view", str(wsi_dir / "broken" / "broken.svs"), cache_dir=tmp_path / "c")
    assert res.returncode == 2 and "broken.svs" in res.stderr


def test_view_without_display_says_so(cmu, tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("display detection is Linux-specific")
    env = {"DISPLAY": "", "WAYLAND_DISPLAY": "", "QT_QPA_PLATFORM": ""}
    res = _stpredict("view", str(cmu), cache_dir=tmp_path / "c", env_extra=env, timeout=120)
    assert res.returncode == 2
    assert "xvfb-run" in res.stderr
