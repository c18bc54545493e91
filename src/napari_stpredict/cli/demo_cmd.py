"""``stpredict demo``: a real H&E slide, a trained model and live heatmaps in one command.

The data and model are prepared by :mod:`napari_stpredict.demo` (download, train, cache); this
module adds the faces: rich progress on the terminal, and napari with the slide, the "Predict
expression" widget (a few markers, live) and the tumour layer. ``--no-viewer`` runs the same
pipeline headless and prints a summary.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import typer

from napari_stpredict.cli import app
from napari_stpredict.cli._progress import Bars
from napari_stpredict.errors import StPredictError


class _StageBar(Bars):
    """One progress bar (the CLI's :class:`Bars`), re-labelled for each stage of the demo."""

    def __init__(self, console) -> None:
        super().__init__(console, transient=True)
        self._stage: str | None = None

    def stage(self, text: str) -> None:
        if self._stage is not None:
            self.remove(self._stage)
        self.print(f"· {text}")
        self._stage = text
        self.update(text, 0, None)

    def __call__(self, done: int, total: int | None, message: str = "") -> None:
        if self._stage is not None:
            self.update(self._stage, done, total, message[:60])


def _check_display() -> None:
    if not sys.platform.startswith("linux") or os.environ.get("QT_QPA_PLATFORM"):
        return
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise StPredictError(
            "no display: napari needs one (use 'stpredict demo --no-viewer', or "
            "'xvfb-run -a stpredict demo' on a headless machine)"
        )


@app.command("demo")
def demo(
    data_dir: Path | None = typer.Option(
        None,
        "--data-dir",
        help="A local copy of the HER2ST files (counts/, spots/, images/): no download.",
        show_default=False,
    ),
    model: Path | None = typer.Option(
        None,
        "--model",
        "-m",
        help="Use this model file instead of training the demo model.",
        show_default=False,
    ),
    slide: Path | None = typer.Option(
        None,
        "--slide",
        help="Show this slide instead of the held-out HER2ST section C2.",
        show_default=False,
    ),
    genes: str | None = typer.Option(
        None,
        "--genes",
        "-g",
        help="Comma-separated genes to show (default: a few breast-cancer markers the model has).",
        show_default=False,
    ),
    no_viewer: bool = typer.Option(
        False, "--no-viewer", help="Headless: prepare, predict the tissue, print a summary."
    ),
    cache_dir: Path | None = typer.Option(
        None,
        "--cache-dir",
        help="Where data, models and predictions are cached (default: the user cache folder).",
        show_default=False,
    ),
    quick: bool = typer.Option(
        False,
        "--quick",
        help="A tiny budget (seconds): a few training steps on one section, few tiles. "
        "For smoke tests; the model is not meant to be looked at.",
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    as_json: bool = typer.Option(False, "--json", help="With --no-viewer: print JSON on stdout."),
) -> None:
    """Show the whole product on a real slide: download, train (cached), predict, explore.

    The first run downloads four HER2ST breast cancer sections (about 19 MB, pinned by SHA-256)
    and trains a small model on three of them on the CPU (minutes); napari then opens the
    fourth with live heatmaps of a few markers and the tumour layer.
    """
    from rich.console import Console

    from napari_stpredict.cli.view_cmd import parse_genes
    from napari_stpredict.demo import DemoConfig, pick_markers, prepare_demo, run_demo

    config = DemoConfig.quick() if quick else DemoConfig()
    gene_list = parse_genes(genes)
    console = Console(stderr=True)
    if not no_viewer:
        _check_display()  # before minutes of training, not after
    if data_dir is not None:  # File > Open Sample then uses it too, without a download
        from napari_stpredict._sample_data import remember_local_data

        remember_local_data(data_dir)
    with _StageBar(console) as bar:
        if no_viewer:
            summary = run_demo(
                data_dir=data_dir,
                model=model,
                slide=slide,
                cache_dir=cache_dir,
                config=config,
                device=device,
                genes=gene_list,
                progress=bar,
                on_stage=bar.stage,
            )
        else:
            inputs = prepare_demo(
                data_dir=data_dir,
                model=model,
                slide=slide,
                cache_dir=cache_dir,
                config=config,
                progress=bar,
                on_stage=bar.stage,
            )
    if no_viewer:
        _print_summary(console, summary)
        if as_json:
            typer.echo(json.dumps(summary, indent=2))
        return

    # torch/timm load before the first OpenGL context (see cli/view_cmd.py)
    from napari_stpredict.model import Predictor

    predictor = Predictor(inputs.model, device=device)
    if gene_list:
        known = {g.upper(): g for g in predictor.genes}
        unknown = [g for g in gene_list if g.upper() not in known]
        if unknown:
            raise StPredictError(
                f"{inputs.model}: genes not predicted by the model: {', '.join(unknown)}"
            )
        shown = [known[g.upper()] for g in gene_list]
    else:
        shown = pick_markers(predictor.genes, config.markers)
    console.print(
        f"· opening napari: {inputs.slide.name}, model {inputs.model.name}, genes {', '.join(shown)}",
        highlight=False,
    )
    from napari_stpredict.demo import default_cache_dir

    # the same prediction cache as the headless demo: what one predicted, the other reuses
    predictions = (cache_dir.expanduser() if cache_dir else default_cache_dir()) / "predictions"
    open_demo_viewer(inputs, predictor, shown, device=device, cache_dir=predictions)


def open_demo_viewer(
    inputs: Any,
    predictor: Any,
    genes: list[str],
    *,
    device: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    show: bool = True,
    run: bool = True,
    window_size: tuple[int, int] = (1400, 900),
):
    """napari with the slide, "Predict expression" docked (live, ``genes``) and the tumour layer.

    Parameters
    ----------
    inputs
        :class:`~napari_stpredict.demo.DemoInputs`.
    predictor
        The loaded :class:`~napari_stpredict.model.Predictor`.
    genes
        Genes shown as heatmaps.
    device
        Device of the widget (the predictor's is used).
    cache_dir
        Prediction cache of the widget (default: the widget's own default).
    show, run
        Show the window; enter the Qt event loop (``False`` for scripts and tests).
    window_size
        Window size in screen pixels.

    Returns
    -------
    (viewer, predict_widget, tumor_widget)
        ``tumor_widget`` is ``None`` when the tumour widget is not available. The tumour layer
        is computed by the tumour widget as soon as the first view is predicted.
    """
    import napari

    from napari_stpredict.cli.view_cmd import dock_predict_widget

    viewer = napari.Viewer(title=f"stpredict demo · {inputs.slide.name}", show=show)
    viewer.window.resize(*window_size)
    # the HER2ST JPEGs record no pixel size: the spot grid gave it (kept exact)
    widget, _dock = dock_predict_widget(
        viewer,
        Path(inputs.slide),
        mpp=inputs.mpp,
        predictor=predictor,
        model=Path(inputs.model),
        genes=genes,
        device=device,
        cache_dir=cache_dir,
    )
    tumor_widget = _dock_tumor_widget(viewer)
    if tumor_widget is not None:
        from napari_stpredict.cli.view_cmd import balance_docks

        balance_docks(viewer, _dock, tumor_widget.dock)
        _tumor_when_view_is_predicted(widget, tumor_widget, predictor)
    viewer.reset_view()
    if run:
        napari.run()
        widget.close_workers(wait_s=30)
    return viewer, widget, tumor_widget


def _dock_tumor_widget(viewer) -> Any:
    """Dock "Tumour localization" (it builds the tumour layer from the heatmaps' store)."""
    try:
        from napari_stpredict.widgets.tumor import TumorWidget
    except ImportError:  # the tumour widget is optional for the demo
        return None
    tumor = TumorWidget(viewer)
    tumor.dock = viewer.window.add_dock_widget(tumor, name="Tumour localization", area="right")
    return tumor


def _tumor_when_view_is_predicted(widget, tumor_widget, predictor) -> None:
    """Compute the tumour layer once the first view is predicted (if the model has markers)."""
    from qtpy.QtCore import QTimer

    from napari_stpredict.st.genesets import tumour_support

    if not tumour_support(predictor)[0]:
        return  # a score from too few signature genes would only raise an error notification
    timer = QTimer(tumor_widget)
    timer.setInterval(300)

    def poll() -> None:
        if widget.view_complete():
            timer.stop()
            tumor_widget.compute()

    timer.timeout.connect(poll)
    timer.start()


def _print_summary(console, s: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title="stpredict demo", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("model", f"{s['model']} ({'trained now' if s['trained'] else 'cached'})")
    table.add_row("slide", f"{s['slide']} ({s['mpp']:.3f} µm/px)" if s["mpp"] else s["slide"])
    table.add_row("genes", str(s["genes"]))
    table.add_row("tissue tiles", str(s["cells"]))
    table.add_row("predicted now", f"{s['predicted']} of {s['requested']} requested")
    for g, v in s["marker_means"].items():
        table.add_row(f"mean {g}", "—" if v is None else f"{v:.3f}")
    if s["tumor_fraction"] is not None:
        table.add_row("tumour (of predicted)", f"{100 * s['tumor_fraction']:.1f} %")
    table.add_row("predictions", s["store"])
    table.add_row("time", f"{s['seconds']:.1f} s")
    console.print(table)
