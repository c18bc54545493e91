"""``stpredict view``: open a slide in napari with the "Predict expression" widget docked and set.

With ``--screenshot`` it waits until every visible tissue tile is predicted and drawn, saves the
canvas (slide + heatmaps) and exits: scripted figures, and a headless check of the whole
product under ``xvfb-run``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import typer

from napari_stpredict.cli import app
from napari_stpredict.cli._options import Device, ModelFile, MppOverride, StrideUm, split_commas
from napari_stpredict.cli._viewer import (  # noqa: F401  (importable from here, as before)
    ViewerParts,
    balance_docks,
    check_display,
    dock_predict_widget,
    load_view_predictor,
    open_viewer,
)
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
    return split_commas(text)


@app.command("view")
def view(
    slide_path: Path = typer.Argument(..., metavar="SLIDE", help="Slide file or OME-Zarr folder."),
    model: ModelFile = None,
    genes: str | None = typer.Option(
        None, "--genes", "-g", help="Comma-separated genes to show as heatmaps, e.g. ERBB2,KRT19."
    ),
    center_um: str | None = typer.Option(
        None, "--center-um", help="View centre 'X,Y' in µm from the slide's top-left corner."
    ),
    zoom: float | None = typer.Option(
        None, "--zoom", help="Screen pixels per µm (napari camera zoom in µm units)."
    ),
    stride_um: StrideUm = None,
    mpp: MppOverride = None,
    tta: int | None = typer.Option(
        None,
        "--tta",
        help="Flips/rotations averaged per tile: 1, 2, 4 or 8 (default: the model's on CUDA, "
        "1 on a CPU, where the view must keep up with panning).",
        show_default=False,
    ),
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
    device: Device = "auto",
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
    _check_options(model, gene_list, zoom=zoom, stride_um=stride_um, tta=tta, screenshot=screenshot)
    with open_slide(slide_path, mpp=mpp) as slide:
        slide_mpp = slide.mpp
    predictor = None
    if model is not None:  # before the first OpenGL context: see guard_llvm_clash
        predictor, gene_list = load_view_predictor(model, device=device, tta=tta, genes=gene_list)
    check_display("on a headless machine run 'xvfb-run -a stpredict view ...'")
    parts = open_viewer(
        slide_path,
        title=f"stpredict · {slide_path.name}",
        mpp=mpp,
        predictor=predictor,
        model=model,
        genes=gene_list,
        stride_um=stride_um,
        device=device,
        tumor=tumor,
        window_size=(int(win[0]), int(win[1])) if win else (1200, 900),
    )
    parts.widget.set_smooth(smooth)
    parts.widget.set_uncertainty(uncertainty)
    _place_camera(parts.viewer, predictor, slide_mpp, center_um=center, zoom=zoom)
    code = _run_viewer(parts, predictor, screenshot, whole_window=window, timeout=timeout)
    if code:
        raise typer.Exit(code)


def _check_options(
    model: Path | None,
    genes: list[str],
    *,
    zoom: float | None,
    stride_um: float | None,
    tta: int | None,
    screenshot: Path | None,
) -> None:
    """Bad options are one line before any file is read."""
    from napari_stpredict.cohort.inputs import check_tta

    if zoom is not None and not zoom > 0:
        raise StPredictError(f"--zoom={zoom}: must be positive")
    if stride_um is not None and not stride_um > 0:
        raise StPredictError(f"--stride-um={stride_um}: must be positive")
    check_tta(tta)
    if model is None:
        for flag, given in (("--genes", bool(genes)), ("--tta", tta is not None)):
            if given:
                raise StPredictError(f"{flag} needs --model")
    if screenshot is not None:
        from napari_stpredict.io_utils import check_target

        if screenshot.suffix.lower() != ".png":
            raise StPredictError(f"{screenshot}: --screenshot writes a .png file")
        check_target(screenshot, overwrite=True)


def _place_camera(
    viewer: Any,
    predictor: Any,
    slide_mpp: float | None,
    *,
    center_um: tuple[float, float] | None,
    zoom: float | None,
) -> None:
    """Centre and zoom the camera; the µm options are converted to the slide layer's units
    (µm when the slide has a pixel size, the file's or --mpp; else pixels at the model's
    scale)."""
    from napari_stpredict.widgets._common import camera_of

    units_per_um = 1.0
    if not slide_mpp:
        assumed = predictor.patch_um / predictor.patch_px if predictor is not None else 1.0
        units_per_um = 1.0 / assumed
    camera = camera_of(viewer)
    if center_um is not None:
        x, y = center_um
        camera.center = (y * units_per_um, x * units_per_um)
    if zoom is not None:
        camera.zoom = zoom / units_per_um


def _run_viewer(
    parts: ViewerParts,
    predictor: Any,
    screenshot: Path | None,
    *,
    whole_window: bool,
    timeout: float,
) -> int:
    """Enter the Qt event loop; with ``screenshot``, save it once the view is predicted (and
    the tumour outlined when asked) and close. Returns the exit code."""
    import napari

    if screenshot is None:
        napari.run()
        parts.widget.close_workers(wait_s=30)
        return 0
    if not whole_window:
        tumor_dock = [parts.tumor_widget.dock] if parts.tumor_widget else []
        _canvas_only_window(parts.viewer, parts.dock, *tumor_dock)
    return _screenshot_when_ready(parts, predictor, screenshot, whole_window, timeout)


def _screenshot_when_ready(
    parts: ViewerParts, predictor: Any, screenshot: Path, whole_window: bool, timeout: float
) -> int:
    """Poll until every visible tile is predicted and drawn, save the PNG, close the viewer;
    a prediction error or the timeout ends it with code 1."""
    import napari
    from qtpy.QtCore import QTimer

    viewer, widget, tumor_widget = parts.viewer, parts.widget, parts.tumor_widget
    state: dict[str, Any] = {"code": None, "error": None}
    t0 = time.perf_counter()
    widget.scheduler.error.connect(lambda text: state.update(error=text))

    def ready() -> bool:
        if predictor is None:
            return True
        tumor_done = tumor_widget is None or tumor_widget.outline is not None or tumor_widget.failed
        return widget.view_complete() and tumor_done

    def finish(code: int, message: str) -> None:
        print(message, file=sys.stderr)
        state["code"] = code
        timer.stop()
        widget.close_workers(wait_s=30)
        viewer.close()

    def poll() -> None:
        if state["error"]:
            finish(1, f"stpredict: error: {state['error']}")
        elif ready():
            _save_screenshot(viewer, screenshot, canvas_only=not whole_window)
            seconds = time.perf_counter() - t0
            finish(0, f"saved {screenshot} ({widget.n_done} tiles predicted, {seconds:.1f} s)")
        elif time.perf_counter() - t0 > timeout:
            finish(1, f"stpredict: error: timed out after {timeout:g} s waiting for predictions")

    timer = QTimer()
    timer.setInterval(200)
    timer.timeout.connect(poll)
    timer.start()
    napari.run()
    return int(state["code"] if state["code"] is not None else 1)


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
