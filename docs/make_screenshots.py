"""Take the documentation's screenshots from real data and a real model.

Run under a virtual display (napari needs an OpenGL context; a hidden window renders black)::

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/make_screenshots.py --data-dir ../shared/data/her2st

It prepares the demo (the HER2ST data from ``--data-dir`` or the download cache, the demo model
from the cache or trained now), opens the same viewer as ``stpredict demo``, waits until every
visible tissue cell is predicted and drawn, and writes into ``docs/images/``:

- ``demo.png``: the whole window — the held-out section C2 with a predicted marker, the
  "Predict expression" panel (and "Tumour localization" when available);
- ``demo_tumor.png``: the same view with the tumour layer (when the tumour widget is available);
- ``sample_c2.png``: *File → Open Sample → HER2ST breast cancer section C2* (canvas only).

``--quick`` uses the seconds-long smoke-test model (to check the script, not for the docs).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def wait_until(condition, *, timeout: float, what: str) -> None:
    """Run the Qt event loop until ``condition()`` is true."""
    from qtpy.QtWidgets import QApplication

    t0 = time.perf_counter()
    while not condition():
        QApplication.processEvents()
        time.sleep(0.05)
        if time.perf_counter() - t0 > timeout:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
    for _ in range(20):  # let the canvas draw the last batch
        QApplication.processEvents()
        time.sleep(0.02)


def tissue_center_layer(inputs) -> tuple[float, float]:
    """Centre of the tissue in the slide layer's world coordinates (µm when mpp is known)."""
    from napari_stpredict.slide import open_slide, tissue_mask

    with open_slide(inputs.slide, mpp=inputs.mpp) as slide:
        mask = tissue_mask(slide)
        ys, xs = np.nonzero(mask.mask)
        cy = (ys.mean() + 0.5) * mask.downsample
        cx = (xs.mean() + 0.5) * mask.downsample
        s = slide.mpp or 1.0
    return cy * s, cx * s


def save(viewer, path: Path, *, canvas_only: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(path=str(path), canvas_only=canvas_only, flash=False)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    ap.add_argument("--genes", default="ERBB2,KRT19,CD74")
    ap.add_argument("--zoom", type=float, default=1.6, help="zoom relative to the whole slide")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()

    from napari_stpredict.demo import DATA_ENV, DemoConfig, pick_markers, prepare_demo

    if args.data_dir is not None:
        os.environ[DATA_ENV] = str(args.data_dir.resolve())  # the sample data uses it too

    config = DemoConfig.quick() if args.quick else DemoConfig()
    inputs = prepare_demo(
        data_dir=args.data_dir,
        cache_dir=args.cache_dir,
        config=config,
        on_stage=lambda s: print(s, flush=True),
    )
    # the model (torch, timm) is loaded before the first OpenGL context exists
    from napari_stpredict.model import Predictor

    predictor = Predictor(inputs.model)
    wanted = [g for g in args.genes.split(",") if g in predictor.genes]
    genes = wanted or pick_markers(predictor.genes, config.markers)

    import napari

    from napari_stpredict.cli.demo_cmd import open_demo_viewer

    viewer, widget, tumor = open_demo_viewer(
        inputs, predictor, genes, show=True, run=False, window_size=(1500, 950)
    )
    # one heatmap visible (the first gene), the others hidden: a readable picture
    wait_until(
        lambda: widget.heatmaps is not None and len(widget.heatmaps.layers) == len(genes),
        timeout=120,
        what="heatmap layers",
    )
    for layer in list(widget.heatmaps.layers.values())[1:]:
        layer.visible = False
    from napari_stpredict.widgets._live import camera_of

    viewer.reset_view()
    camera = camera_of(viewer)
    cy, cx = tissue_center_layer(inputs)
    camera.center = (cy, cx)
    camera.zoom = camera.zoom * args.zoom
    wait_until(widget.view_complete, timeout=args.timeout, what="the visible cells")

    def tumor_layers():
        return [
            layer
            for layer in viewer.layers
            if (layer.metadata.get("stpredict") or {}).get("kind") == "tumor"
        ]

    has_markers = any(
        g in predictor.genes for g in ("ERBB2", "KRT19", "EPCAM", "KRT8", "KRT18", "CDH1")
    )
    if tumor is not None and has_markers:
        # the demo computes the tumour layer once the first view is predicted
        wait_until(lambda: bool(tumor_layers()), timeout=120, what="the tumour layer")
    heat = list(widget.heatmaps.layers.values())
    for layer in tumor_layers():
        layer.visible = False
    viewer.layers.selection.active = heat[0]  # its colormap and contrast in the controls
    wait_until(lambda: True, timeout=5, what="drawing")
    save(viewer, args.out / "demo.png", canvas_only=False)
    if tumor_layers():
        for layer in heat:
            layer.visible = False
        for layer in tumor_layers():
            layer.visible = True
        viewer.layers.selection.active = tumor_layers()[0]
        wait_until(lambda: True, timeout=5, what="drawing")
        save(viewer, args.out / "demo_tumor.png", canvas_only=False)
    widget.close_workers(wait_s=30)
    viewer.close()

    sample = napari.Viewer(show=True)
    sample.window.resize(1100, 900)
    sample.open_sample("napari-stpredict", "her2st_c2")
    wait_until(lambda: True, timeout=5, what="drawing")
    save(sample, args.out / "sample_c2.png", canvas_only=True)
    sample.close()


if __name__ == "__main__":
    sys.exit(main())
