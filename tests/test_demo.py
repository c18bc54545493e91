"""`stpredict demo` end to end on the real HER2ST files, its pinned download, the sample data."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import threading
from pathlib import Path

import pytest

from napari_stpredict.cli import main
from napari_stpredict.demo import (
    DATA_ENV,
    DEMO_SLIDE,
    HER2ST_FILES,
    MIRROR_ENV,
    demo_data,
    section_mpp,
)
from napari_stpredict.errors import DatasetError, StPredictError


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo-cache")


def _demo(args: list[str], capsys) -> dict:
    assert main(["demo", *args, "--no-viewer", "--quick", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_demo_headless_end_to_end_then_cached(her2st_dir, demo_cache, capsys, monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    args = ["--data-dir", str(her2st_dir), "--cache-dir", str(demo_cache)]
    first = _demo(args, capsys)
    assert first["trained"] is True
    model = Path(first["model"])
    assert model.is_file() and model.is_relative_to(demo_cache)
    assert Path(first["slide"]) == her2st_dir / "images" / f"{DEMO_SLIDE}.jpg"
    assert first["mpp"] == pytest.approx(section_mpp(her2st_dir, DEMO_SLIDE))
    assert 0.5 < first["mpp"] < 1.0  # HER2ST full-resolution images
    assert first["cells"] > first["requested"] > 0
    assert first["predicted"] == first["requested"]
    assert first["done"] >= first["requested"]
    assert len(first["markers"]) == 3
    assert all(v is not None and v == v for v in first["marker_means"].values())

    from napari_stpredict.model import load_model_file

    meta = load_model_file(model).metadata
    assert DEMO_SLIDE not in meta["training_sections"]  # the slide shown is held out
    assert set(first["markers"]) <= set(meta["genes"])

    # the second run trains nothing and predicts nothing: model and predictions are cached
    second = _demo(args, capsys)
    assert second["trained"] is False
    assert second["model"] == first["model"]
    assert second["predicted"] == 0
    assert second["done"] == first["done"]
    assert second["marker_means"] == pytest.approx(first["marker_means"])


def test_demo_with_a_given_model_and_slide(tiny_model_file, wsi_dir, demo_cache, capsys):
    out = _demo(
        [
            "--model",
            str(tiny_model_file),
            "--slide",
            str(wsi_dir / "cmu_small_region.svs"),
            "--cache-dir",
            str(demo_cache),
        ],
        capsys,
    )
    assert out["trained"] is False
    assert out["model"] == str(tiny_model_file)
    assert out["mpp"] == pytest.approx(0.499, abs=1e-3)
    assert out["predicted"] == out["requested"] > 0


def test_demo_bad_input(tmp_path, capsys):
    assert (
        main(["demo", "--no-viewer", "--data-dir", str(tmp_path), "--cache-dir", str(tmp_path)])
        == 2
    )
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "missing" in err
    assert main(["demo", "--no-viewer", "--model", str(tmp_path / "m.safetensors")]) == 2
    assert "m.safetensors" in capsys.readouterr().err


def test_pinned_hashes_match_the_real_files(her2st_dir):
    for section, files in HER2ST_FILES.items():
        for f in files.values():
            assert _sha256(her2st_dir / f.local) == f.sha256, f"{section}: {f.local}"


@pytest.fixture()
def mirror(tmp_path, her2st_dir):
    """A local HTTP server with the repository's layout ({commit}/{path}) over the real files."""
    root = tmp_path / "mirror"
    for files in HER2ST_FILES.values():
        for f in files.values():
            dst = root / f.commit / f.path
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(her2st_dir / f.local)
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_download_checks_the_pinned_hashes(tmp_path, mirror, her2st_dir, monkeypatch):
    root, url = mirror
    monkeypatch.setenv(MIRROR_ENV, url)
    monkeypatch.delenv(DATA_ENV, raising=False)
    cache = tmp_path / "cache"
    seen = []
    data = demo_data(
        cache_dir=cache,
        sections=[DEMO_SLIDE],
        what=("spots", "counts"),
        progress=lambda d, t, m="": seen.append((d, t)),
    )
    assert data == cache / "her2st"
    for f in (HER2ST_FILES[DEMO_SLIDE]["spots"], HER2ST_FILES[DEMO_SLIDE]["counts"]):
        assert (data / f.local).read_bytes() == (her2st_dir / f.local).read_bytes()
    assert seen[-1] == (2, 2)

    # a file that changed upstream (or a tampered mirror) is refused and not kept
    bad = HER2ST_FILES["C3"]["spots"]
    (root / bad.commit / bad.path).unlink()
    (root / bad.commit / bad.path).write_text("x\ty\n1\t2\n")
    with pytest.raises(DatasetError, match="download failed"):
        demo_data(cache_dir=cache, sections=["C3"], what=("spots",))
    assert not (cache / "her2st" / bad.local).exists()


def test_data_dir_env_and_missing_data(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(shared_data))  # the parent of her2st/ is accepted
    assert demo_data(cache_dir=tmp_path, sections=[DEMO_SLIDE]) == shared_data / "her2st"
    monkeypatch.delenv(DATA_ENV)
    with pytest.raises(DatasetError, match="not downloaded"):
        demo_data(cache_dir=tmp_path, sections=[DEMO_SLIDE], download=False)


def test_sample_data_layer(shared_data, monkeypatch):
    from napari_stpredict._sample_data import her2st_sample

    monkeypatch.setenv(DATA_ENV, str(shared_data / "her2st"))
    [(data, kwargs, kind)] = her2st_sample()
    assert kind == "image"
    mpp = section_mpp(shared_data / "her2st", DEMO_SLIDE)
    assert kwargs["scale"] == pytest.approx((mpp, mpp))
    assert kwargs["rgb"] and kwargs["multiscale"]
    assert data[0].shape[:2] == (9911, 9274)
    assert kwargs["metadata"]["stpredict_slide"]["mpp"] == pytest.approx(mpp)


def test_sample_data_absent_says_what_to_do(tmp_path, monkeypatch):
    from napari_stpredict._sample_data import her2st_sample

    monkeypatch.delenv(DATA_ENV, raising=False)
    monkeypatch.setenv("STPREDICT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv(MIRROR_ENV, "http://127.0.0.1:9")  # nothing listens: the download fails
    with pytest.raises(StPredictError, match="STPREDICT_DATA_DIR"):
        her2st_sample()


@pytest.mark.gui
def test_sample_data_in_napari(make_napari_viewer, shared_data, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(shared_data))
    viewer = make_napari_viewer()
    layers = viewer.open_sample("napari-stpredict", "her2st_c2")
    assert len(layers) == 1
    layer = layers[0]
    assert layer.multiscale and layer.rgb
    assert str(layer.units[0]) in ("micrometer", "µm")
    mpp = section_mpp(shared_data / "her2st", DEMO_SLIDE)
    assert tuple(layer.scale) == pytest.approx((mpp, mpp))
    assert os.fspath(layer.metadata["stpredict_slide"]["path"]).endswith("C2.jpg")


@pytest.mark.gui
def test_demo_viewer_shows_live_heatmaps_and_the_tumour_layer(qtbot, tiny_model_file, her2st_dir):
    from napari_stpredict.cli.demo_cmd import open_demo_viewer
    from napari_stpredict.demo import DemoInputs
    from napari_stpredict.model import Predictor
    from napari_stpredict.widgets._live import camera_of

    # C3 is held out of the tiny model's training (B4 + C2); torch loads before OpenGL
    mpp = section_mpp(her2st_dir, "C3")
    inputs = DemoInputs(tiny_model_file, False, her2st_dir / "images" / "C3.jpg", mpp, her2st_dir)
    predictor = Predictor(tiny_model_file, device="cpu")
    genes = ["ERBB2", "KRT8"]
    viewer, widget, tumor = open_demo_viewer(
        inputs, predictor, genes, show=True, run=False, window_size=(900, 700)
    )
    try:
        slide_layer = viewer.layers[0]
        assert tuple(slide_layer.scale) == pytest.approx((mpp, mpp))  # µm, from the spot grid
        camera = camera_of(viewer)
        h, w = slide_layer.data[0].shape[:2]
        camera.center = (h * mpp / 2, w * mpp / 2)
        camera.zoom = camera.zoom * 6  # a small field of view: a few dozen cells
        qtbot.waitUntil(widget.view_complete, timeout=180_000)
        heat = {layer.name: layer for layer in viewer.layers if "predicted" in layer.name}
        assert sorted(heat) == ["ERBB2 (predicted)", "KRT8 (predicted)"]
        grid = widget.session.grid
        assert grid.mpp == pytest.approx(mpp, rel=1e-3)  # the widget keeps 4 decimals
        scale, translate = grid.heatmap_transform()  # registered to the slide layer (µm)
        # rel 1e-3: the widget's µm/px box keeps 4 decimals of the spot-grid value
        assert tuple(heat["ERBB2 (predicted)"].scale) == pytest.approx(scale, rel=1e-3)
        assert tuple(heat["ERBB2 (predicted)"].translate) == pytest.approx(translate, rel=1e-3)
        assert scale[0] == pytest.approx(grid.stride_um, rel=1e-3)
        assert widget.session.store.n_done > 0
        assert tumor is not None

        def tumor_layer():
            return [
                layer
                for layer in viewer.layers
                if (layer.metadata.get("stpredict") or {}).get("kind") == "tumor"
            ]

        qtbot.waitUntil(lambda: bool(tumor_layer()), timeout=60_000)
        assert tumor_layer()[0].data.shape == grid.shape
    finally:
        widget.close_workers(wait_s=30)
        viewer.close()
