"""The npe2 reader: claims, layer tuples, and a real napari viewer opening real slides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_stpredict._reader import layer_name, napari_get_reader, read_slide_layer
from napari_stpredict.widgets._common import camera_of

ARTIFACTS = Path(__file__).parent / "artifacts"


def test_get_reader_claims(wsi_dir: Path, tmp_path: Path) -> None:
    svs = str(wsi_dir / "cmu_small_region.svs")
    assert callable(napari_get_reader(svs))
    assert callable(napari_get_reader([svs]))
    assert napari_get_reader([svs, svs]) is None  # no stacks of slides
    assert napari_get_reader(str(tmp_path / "table.csv")) is None
    assert napari_get_reader(str(tmp_path)) is None  # a folder that is not a zarr store
    store = tmp_path / "img.zarr"
    store.mkdir()
    (store / ".zgroup").write_text('{"zarr_format": 2}')
    assert callable(napari_get_reader(str(store)))
    assert (
        layer_name(Path("/a/b/slide.ome.tif")) == "slide" and layer_name(Path("x/C2.jpg")) == "C2"
    )


def test_layer_tuple(wsi_dir: Path) -> None:
    [(data, kwargs, kind)] = read_slide_layer(str(wsi_dir / "cmu_small_region.svs"))
    assert kind == "image" and isinstance(data, list) and len(data) == 3
    assert kwargs["multiscale"] is True and kwargs["rgb"] is True
    assert kwargs["contrast_limits"] == (0, 255)
    assert kwargs["scale"] == (0.499, 0.499) and kwargs["units"] == ("µm", "µm")
    info = kwargs["metadata"]["stpredict_slide"]
    assert info["mpp"] == 0.499 and info["format"] == "svs" and info["shape"] == [2967, 2220]
    assert info["downsamples"] == [1.0, 2.0, 4.0] and info["path"].endswith("cmu_small_region.svs")
    assert info["metadata"]["vendor"] == "aperio"


def test_bad_file_notifies_and_adds_nothing(wsi_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import napari.utils.notifications as notifications

    shown: list[str] = []
    monkeypatch.setattr(notifications, "show_error", shown.append)
    out = read_slide_layer(str(wsi_dir / "broken" / "unreadable.svs"))
    assert out == [(None,)]  # npe2's "handled, no layer" sentinel
    assert len(shown) == 1 and "unreadable.svs" in shown[0] and "\n" not in shown[0]


def _not_blank(img: np.ndarray) -> None:
    rgb = img[..., :3].astype(float)
    assert rgb.std() > 10  # real tissue texture, not a flat canvas
    assert len(np.unique(rgb.reshape(-1, 3)[::7], axis=0)) > 200


@pytest.mark.gui
def test_viewer_opens_real_slides(make_napari_viewer, wsi_dir: Path) -> None:
    from PIL import Image

    viewer = make_napari_viewer(show=True)
    for name in ("cmu_small_region.svs", "boxes.tiff", "small_HE_levels.tiff", "small.svs"):
        layers = viewer.open(str(wsi_dir / name), plugin="napari-stpredict")
        assert len(layers) == 1
        layer = layers[0]
        assert layer.multiscale and layer.rgb
        assert [str(u) for u in layer.units] == ["micrometer", "micrometer"]
        mpp = layer.metadata["stpredict_slide"]["mpp"]
        assert tuple(layer.scale) == pytest.approx((mpp, mpp))
        assert tuple(layer.contrast_limits) == (0, 255)
    # a bad file: no layer, no exception in the viewer
    n = len(viewer.layers)
    assert viewer.open(str(wsi_dir / "broken" / "broken.svs"), plugin="napari-stpredict") == []
    assert len(viewer.layers) == n

    for name in ("boxes", "small_HE_levels", "small"):
        viewer.layers.remove(name)
    slide = viewer.layers["cmu_small_region"]
    overlays = getattr(viewer.canvas, "overlays", None)  # napari ≥ 0.9 moved the scale bar there
    (overlays.scale_bar if overlays is not None else viewer.scale_bar).visible = True
    viewer.window._qt_viewer.canvas.native.resize(800, 600)
    viewer.reset_view()
    # zoomed in on tissue: 1.5 screen px per level-0 px, near the top of the region
    camera_of(viewer).center = (600 * 0.499, 1100 * 0.499)
    camera_of(viewer).zoom = 1.5 / 0.499
    from qtpy.QtWidgets import QApplication

    for _ in range(20):
        QApplication.processEvents()
    shot = viewer.screenshot(canvas_only=True, flash=False)
    ARTIFACTS.mkdir(exist_ok=True)
    Image.fromarray(shot).save(ARTIFACTS / "reader_cmu_zoomed.png")
    assert slide.data_level == 0  # zoomed in: napari shows full resolution
    _not_blank(shot)
