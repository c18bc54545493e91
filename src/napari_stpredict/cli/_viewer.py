"""The napari set-up shared by ``stpredict view`` and ``stpredict demo``, written once.

:func:`check_display` (before any slow work), :func:`load_view_predictor` (the model, loaded
before the first OpenGL context, with the live view's test-time augmentation),
:func:`open_viewer` (the slide layer, the "Predict expression" dock set, and optionally the
"Tumour localization" dock that outlines the tumour once the view is predicted).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from napari_stpredict.errors import StPredictError

__all__ = [
    "ViewerParts",
    "balance_docks",
    "check_display",
    "dock_predict_widget",
    "dock_tumor_widget",
    "load_view_predictor",
    "open_viewer",
    "tumor_when_view_is_predicted",
]


def check_display(advice: str) -> None:
    """Refuse in one line when napari cannot open a window (Linux without a display).

    Parameters
    ----------
    advice
        What to do instead, e.g. ``"use 'xvfb-run -a stpredict view ...'"``.
    """
    if not sys.platform.startswith("linux") or os.environ.get("QT_QPA_PLATFORM"):
        return
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise StPredictError(f"no display: napari needs one ({advice})")


def load_view_predictor(
    model: str | os.PathLike,
    *,
    device: str = "auto",
    tta: int | None = None,
    genes: Sequence[str] = (),
) -> tuple[Any, list[str]]:
    """Load the model for a live view, and check the genes to show against it.

    Call it before napari creates its first OpenGL context (torch and timm load here; see
    ``docs/troubleshooting.md``).

    Parameters
    ----------
    model
        The model file.
    device
        Torch device.
    tta
        Test-time augmentation of the view (1, 2, 4 or 8); ``None``:
        :func:`~napari_stpredict.model.predictor.live_view_tta` (the model's on CUDA, 1 on a
        CPU, where a live view must answer while the user pans).
    genes
        Genes asked for (any case).

    Returns
    -------
    (predictor, genes)
        The :class:`~napari_stpredict.model.Predictor` and ``genes`` as the model spells them.

    Raises
    ------
    StPredictError
        One line: no such model file, not a model file, a gene the model does not predict.
    """
    from napari_stpredict.demo import model_genes
    from napari_stpredict.widgets._predict_model import build_predictor

    path = Path(model)
    if not path.is_file():
        raise StPredictError(f"{path}: no such model file")
    predictor = build_predictor(path, device, tta)  # the dock's own loader and TTA policy
    return predictor, model_genes(predictor, genes, path)


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
    """The slide layer (our reader, µm when the pixel size is known, ``mpp`` kept exact) and
    the Predict dock docked and set.

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


def dock_tumor_widget(viewer: Any) -> Any:
    """Dock "Tumour localization" (it builds the tumour layer from the heatmaps' store);
    ``None`` when the tumour widget cannot be imported."""
    try:
        from napari_stpredict.widgets.tumor import TumorWidget
    except ImportError:
        return None
    tumor = TumorWidget(viewer)
    tumor.dock = viewer.window.add_dock_widget(tumor, name="Tumour localization", area="right")
    return tumor


def tumor_when_view_is_predicted(widget: Any, tumor_widget: Any, predictor: Any) -> None:
    """Compute the tumour layer once the first view is predicted (if the model can score it;
    otherwise the tumour widget is marked failed, so nothing waits for it)."""
    from qtpy.QtCore import QTimer

    from napari_stpredict.st.genesets import tumour_support

    if not tumour_support(predictor)[0]:
        tumor_widget.failed = True  # too few signature genes: a score would only be an error
        return
    timer = QTimer(tumor_widget)
    timer.setInterval(300)

    def poll() -> None:
        if widget.view_complete():
            timer.stop()
            tumor_widget.compute()

    timer.timeout.connect(poll)
    timer.start()


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


@dataclasses.dataclass
class ViewerParts:
    """What :func:`open_viewer` made: the viewer, the Predict widget and its dock, and the
    tumour widget (``None`` when not asked for or not available)."""

    viewer: Any
    widget: Any
    dock: Any
    tumor_widget: Any = None


def open_viewer(
    slide_path: Path,
    *,
    title: str,
    mpp: float | None,
    predictor: Any,
    model: Path | None,
    genes: list[str],
    stride_um: float | None = None,
    device: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    tumor: bool = False,
    show: bool = True,
    window_size: tuple[int, int] = (1200, 900),
) -> ViewerParts:
    """napari with the slide and "Predict expression" docked and set (live, ``genes``); with
    ``tumor`` (and a model) also "Tumour localization", computed once the view is predicted.

    The view is reset to the whole slide; the caller enters the Qt event loop.
    """
    import napari

    viewer = napari.Viewer(title=title, show=show)
    viewer.window.resize(*window_size)
    widget, dock = dock_predict_widget(
        viewer,
        Path(slide_path),
        mpp=mpp,
        predictor=predictor,
        model=None if model is None else Path(model),
        genes=genes,
        stride_um=stride_um,
        device=device,
        cache_dir=cache_dir,
    )
    tumor_widget = dock_tumor_widget(viewer) if tumor and predictor is not None else None
    if tumor_widget is not None:
        balance_docks(viewer, dock, tumor_widget.dock)
        tumor_when_view_is_predicted(widget, tumor_widget, predictor)
    viewer.reset_view()
    return ViewerParts(viewer, widget, dock, tumor_widget)
