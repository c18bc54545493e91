"""``stpredict view``: open a slide in napari with the "Predict expression" widget docked and set.

With ``--screenshot`` it waits until every visible tissue tile is predicted and drawn, saves the
canvas (slide + heatmaps) and exits: scripted figures, and a headless check of the whole
product under ``xvfb-run``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import typer

from napari_stpredict.cli import app
from napari_stpredict.errors import StPredictError


def parse_pair(text: str | None, name: str) -> tuple[float, float] | None:
    """Parse ``"X,Y"`` into two floats.

    Raises
    ------
    StPredictError
        If the text is not two comma-separated numbers.
    """
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    try:
        if len(parts) != 2:
            raise ValueError
        return float(parts[0]), float(parts[1])
    except ValueError:
        raise StPredictError(f"{name}={text!r}: expected two numbers 'X,Y'") from None


def parse_genes(text: str | None) -> list[str]:
    """Split ``"G1,G2"`` into gene names (empty entries dropped)."""
    if not text:
        return []
    return [g.strip() for g in text.split(",") if g.strip()]


def _check_display() -> None:
    if not sys.platform.startswith("linux") or os.environ.get("QT_QPA_PLATFORM"):
        return
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise StPredictError(
            "no display: napari needs one (on a headless machine run 'xvfb-run -a stpredict view ...')"
        )


@app.command("view")
def view(
    slide_path: Path = typer.Argument(..., metavar="SLIDE", help="Slide file or OME-Zarr folder."),
    model: Path | None = typer.Option(None, "--model", "-m", help="Model file (.safetensors)."),
    genes: str | None = typer.Option(
        None, "--genes", "-g", help="Comma-separated genes to show as heatmaps, e.g. ERBB2,KRT19."
    ),
    center_um: str | None = typer.Option(
        None, "--center-um", help="View centre 'X,Y' in µm from the slide's top-left corner."
    ),
    zoom: float | None = typer.Option(
        None, "--zoom", help="Screen pixels per µm (napari camera zoom in µm units)."
    ),
    stride_um: float | None = typer.Option(
        None, "--stride-um", help="Grid stride in µm (default: the model's patch size)."
    ),
    mpp: float | None = typer.Option(None, "--mpp", help="µm per pixel, overriding the file."),
    smooth: bool = typer.Option(
        False, "--smooth", help="Interpolate heatmaps between tile centres (display only)."
    ),
    uncertainty: bool = typer.Option(
        False,
        "--uncertainty",
        help="Also show each gene's uncertainty (spread) layer, when the model provides one.",
    ),
    tumor: bool = typer.Option(
        False,
        "--tumor",
        help="Dock 'Tumour localization' and outline the tumour regions (default signature) "
        "once the view is predicted.",
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    screenshot: Path | None = typer.Option(
        None,
        "--screenshot",
        help="Save the canvas to this PNG once the visible tiles are predicted, then exit.",
    ),
    window: bool = typer.Option(
        False, "--window", help="With --screenshot: save the whole window, panels included."
    ),
    size: str = typer.Option("1200,900", "--size", help="Window size 'W,H' in screen pixels."),
    timeout: float = typer.Option(
        600.0, "--timeout", help="With --screenshot: give up after this many seconds."
    ),
) -> None:
    """Open SLIDE in napari with live predicted-expression heatmaps."""
    from napari_stpredict.slide import open_slide

    gene_list = parse_genes(genes)
    center = parse_pair(center_um, "--center-um")
    win = parse_pair(size, "--size")
    if zoom is not None and not zoom > 0:
        raise StPredictError(f"--zoom={zoom}: must be positive")
    if stride_um is not None and not stride_um > 0:
        raise StPredictError(f"--stride-um={stride_um}: must be positive")
    if gene_list and model is None:
        raise StPredictError("--genes needs --model")
    if screenshot is not None:
        from napari_stpredict.io_utils import check_target

        if screenshot.suffix.lower() != ".png":
            raise StPredictError(f"{screenshot}: --screenshot writes a .png file")
        check_target(screenshot, overwrite=True)
    with open_slide(slide_path, mpp=mpp) as slide:
        slide_mpp = slide.mpp
    predictor = None
    if model is not None:
        # load (and import torch/timm) before the first OpenGL context: see guard_llvm_clash
        from napari_stpredict.model import Predictor

        if not model.is_file():
            raise StPredictError(f"{model}: no such model file")
        predictor = Predictor(model, device=device)
        lookup = {g.upper() for g in predictor.genes}
        unknown = [g for g in gene_list if g.upper() not in lookup]
        if unknown:
            raise StPredictError(f"{model}: genes not predicted by the model: {', '.join(unknown)}")
    _check_display()
    code = _run_viewer(
        slide_path,
        predictor=predictor,
        model=model,
        genes=gene_list,
        center_um=center,
        zoom=zoom,
        stride_um=stride_um,
        mpp=mpp,
        slide_mpp=slide_mpp,
        smooth=smooth,
        uncertainty=uncertainty,
        tumor=tumor,
        device=device,
        screenshot=screenshot,
        whole_window=window,
        window_size=(int(win[0]), int(win[1])) if win else (1200, 900),
        timeout=timeout,
    )
    if code:
        raise typer.Exit(code)


def _run_viewer(
    slide_path: Path,
    *,
    predictor: Any,
    model: Path | None,
    genes: list[str],
    center_um: tuple[float, float] | None,
    zoom: float | None,
    stride_um: float | None,
    mpp: float | None,
    slide_mpp: float | None,
    smooth: bool,
    uncertainty: bool,
    tumor: bool,
    device: str,
    screenshot: Path | None,
    whole_window: bool,
    window_size: tuple[int, int],
    timeout: float,
) -> int:
    import napari
    from qtpy.QtCore import QTimer

    from napari_stpredict.widgets._common import camera_of

    viewer = napari.Viewer(title=f"stpredict · {slide_path.name}", show=True)
    viewer.window.resize(*window_size)
    widget, dock = dock_predict_widget(
        viewer,
        slide_path,
        mpp=mpp,
        predictor=predictor,
        model=model,
        genes=genes,
        stride_um=stride_um,
        device=device,
    )
    widget.set_smooth(smooth)
    widget.set_uncertainty(uncertainty)
    tumor_widget = None
    if tumor and predictor is not None:
        from napari_stpredict.cli.demo_cmd import _dock_tumor_widget, _tumor_when_view_is_predicted
        from napari_stpredict.tumor import DEFAULT_TUMOR_GENES

        tumor_widget = _dock_tumor_widget(viewer)
        _tumor_when_view_is_predicted(widget, tumor_widget, predictor)
        if not set(DEFAULT_TUMOR_GENES) & set(predictor.genes):
            tumor_widget.failed = True  # no marker of the signature: nothing to wait for
        balance_docks(viewer, dock, tumor_widget.dock)

    # the layer is in µm when the slide has a pixel size (the file's or --mpp), else in pixels
    # at the model's scale: convert the µm options to layer units
    units_per_um = 1.0
    if not slide_mpp:
        assumed = predictor.patch_um / predictor.patch_px if predictor is not None else 1.0
        units_per_um = 1.0 / assumed
    viewer.reset_view()
    camera = camera_of(viewer)
    if center_um is not None:
        x, y = center_um
        camera.center = (y * units_per_um, x * units_per_um)
    if zoom is not None:
        camera.zoom = zoom / units_per_um

    if screenshot is None:
        napari.run()
        widget.close_workers(wait_s=30)
        return 0

    if not whole_window:
        _canvas_only_window(viewer, dock, *([tumor_widget.dock] if tumor_widget else []))
    state: dict[str, Any] = {"code": None, "error": None}
    t0 = time.perf_counter()

    def on_error(text: str) -> None:
        state["error"] = text

    widget.scheduler.error.connect(on_error)

    def finish(code: int) -> None:
        state["code"] = code
        timer.stop()
        widget.close_workers(wait_s=30)
        viewer.close()

    def poll() -> None:
        if state["error"]:
            print(f"stpredict: error: {state['error']}", file=sys.stderr)
            finish(1)
        elif predictor is None or (
            widget.view_complete()
            and (tumor_widget is None or tumor_widget.outline is not None or tumor_widget.failed)
        ):
            _save_screenshot(viewer, screenshot, canvas_only=not whole_window)
            print(
                f"saved {screenshot} ({widget.n_done} tiles predicted, "
                f"{time.perf_counter() - t0:.1f} s)",
                file=sys.stderr,
            )
            finish(0)
        elif time.perf_counter() - t0 > timeout:
            print(
                f"stpredict: error: timed out after {timeout:g} s waiting for predictions",
                file=sys.stderr,
            )
            finish(1)

    timer = QTimer()
    timer.setInterval(200)
    timer.timeout.connect(poll)
    timer.start()
    napari.run()
    return int(state["code"] if state["code"] is not None else 1)


def dock_predict_widget(
    viewer: Any,
    slide_path: Path,
    *,
    mpp: float | None,
    predictor: Any,
    model: Path | None,
    genes: list[str],
    stride_um: float | None = None,
    device: str = "auto",
    cache_dir: str | os.PathLike | None = None,
) -> tuple[Any, Any]:
    """The viewer set-up shared by ``view`` and ``demo``: the slide layer (our reader, µm when
    the pixel size is known, ``mpp`` kept exact), the Predict dock docked and set.

    Returns ``(widget, dock)``.
    """
    from napari_stpredict._reader import slide_layer_data
    from napari_stpredict.slide import open_slide
    from napari_stpredict.widgets.predict import PredictWidget

    data, kwargs, _ = slide_layer_data(open_slide(slide_path, mpp=mpp))
    slide_layer = viewer.add_image(data, **kwargs)
    widget = PredictWidget(viewer, device=device, cache_dir=cache_dir)
    dock = viewer.window.add_dock_widget(widget, name="Predict expression", area="right")
    widget.set_slide_layer(slide_layer)
    if mpp is not None:
        widget.set_mpp(mpp)  # exact: the cache key is the CLI's
    if stride_um is not None:
        widget.set_stride(stride_um)
    if predictor is not None:
        widget.set_predictor(predictor, model)
    if genes:
        widget.set_genes(genes)
    return widget, dock


def balance_docks(viewer: Any, *docks: Any, shares: tuple[int, ...] = (55, 45)) -> None:
    """Share the right-hand column between stacked docks (else the first one takes it all)."""
    from qtpy.QtCore import Qt

    window = getattr(viewer.window, "_qt_window", None)
    docks = tuple(d for d in docks if d is not None)
    if window is None or len(docks) < 2:
        return
    from qtpy.QtCore import QTimer

    def apply() -> None:  # once the window is laid out (sizes are in pixels)
        height = max(sum(d.height() for d in docks), 400)
        sizes = [int(height * s / sum(shares[: len(docks)])) for s in shares[: len(docks)]]
        window.resizeDocks(list(docks), sizes, Qt.Orientation.Vertical)

    QTimer.singleShot(300, apply)


def _save_screenshot(viewer: Any, path: Path, *, canvas_only: bool = True) -> None:
    import imageio.v3 as iio

    from napari_stpredict.io_utils import atomic_path

    image = viewer.screenshot(canvas_only=canvas_only, flash=False)
    with atomic_path(path, overwrite=True) as tmp:
        iio.imwrite(tmp, image, extension=".png")


def _canvas_only_window(viewer: Any, *docks: Any) -> None:
    """Give the canvas the whole window for screenshots (hide the docks and the status bar:
    only the canvas is saved, and its size then depends on ``--size`` alone, not on the docks'
    contents nor on the status text — napari's status bar grows or shrinks by a few pixels
    with the text it shows, e.g. once a heatmap layer is selected)."""
    qt_viewer = getattr(viewer.window, "_qt_viewer", None)
    for name in ("dockLayerList", "dockLayerControls"):
        dock = getattr(qt_viewer, name, None)
        if dock is not None:
            dock.hide()
    for dock in docks:
        dock.hide()
    window = getattr(viewer.window, "_qt_window", None)
    status_bar = window.statusBar() if window is not None else None
    if status_bar is not None:
        status_bar.hide()
