"""``stpredict demo``: a real H&E slide, a trained model and live heatmaps in one command.

The data and model are prepared by :mod:`napari_stpredict.demo` (download, train, cache); this
module adds the faces: rich progress on the terminal, and napari with the slide, the "Predict
expression" widget (a few markers, live) and the tumour layer. ``--no-viewer`` runs the same
pipeline headless and prints a summary.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer

from napari_stpredict.cli import app
from napari_stpredict.cli._options import Device
from napari_stpredict.cli._progress import Bars
from napari_stpredict.cli._viewer import check_display, load_view_predictor, open_viewer


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
    device: Device = "auto",
    as_json: bool = typer.Option(False, "--json", help="With --no-viewer: print JSON on stdout."),
) -> None:
    """Show the whole product on a real slide: download, train (cached), predict, explore.

    The first run downloads four HER2ST breast cancer sections (about 19 MB, pinned by SHA-256)
    and trains a small model on three of them on the CPU (minutes); napari then opens the
    fourth with live heatmaps of a few markers and the tumour layer.
    """
    from napari_stpredict.cli.view_cmd import parse_genes
    from napari_stpredict.demo import DemoConfig

    config = DemoConfig.quick() if quick else DemoConfig()
    where = {"data_dir": data_dir, "model": model, "slide": slide, "cache_dir": cache_dir}
    if no_viewer:
        _run_headless(where, config, device=device, genes=parse_genes(genes), as_json=as_json)
    else:
        _run_with_viewer(where, config, device=device, genes=parse_genes(genes))


def _run_headless(
    where: dict[str, Any], config: Any, *, device: str, genes: list[str], as_json: bool
) -> None:
    """``--no-viewer``: :func:`~napari_stpredict.demo.run_demo` with a stage bar, then the
    summary table (and the JSON)."""
    from rich.console import Console

    from napari_stpredict.demo import run_demo

    console = Console(stderr=True)
    _remember_data_dir(where["data_dir"])
    with _StageBar(console) as bar:
        summary = run_demo(
            **where,
            config=config,
            device=device,
            genes=genes,
            progress=bar,
            on_stage=bar.stage,
        )
    _print_summary(console, summary)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))


def _run_with_viewer(where: dict[str, Any], config: Any, *, device: str, genes: list[str]) -> None:
    """Prepare data and model with a stage bar, load the model, open napari."""
    from rich.console import Console

    from napari_stpredict.demo import cache_root, genes_to_show, prepare_demo

    # before minutes of training, not after
    check_display(
        "use 'stpredict demo --no-viewer', or 'xvfb-run -a stpredict demo' on a headless machine"
    )
    console = Console(stderr=True)
    _remember_data_dir(where["data_dir"])
    with _StageBar(console) as bar:
        inputs = prepare_demo(**where, config=config, progress=bar, on_stage=bar.stage)
    # torch/timm load before the first OpenGL context (see cli/view_cmd.py)
    predictor, _ = load_view_predictor(inputs.model, device=device)
    shown = genes_to_show(predictor, genes, config.markers, inputs.model)
    console.print(
        f"· opening napari: {inputs.slide.name}, model {inputs.model.name}, genes {', '.join(shown)}",
        highlight=False,
    )
    # the same prediction cache as the headless demo: what one predicted, the other reuses
    predictions = cache_root(where["cache_dir"]) / "predictions"
    open_demo_viewer(inputs, predictor, shown, device=device, cache_dir=predictions)


def _remember_data_dir(data_dir: Path | None) -> None:
    """File > Open Sample then uses ``--data-dir`` too, without a download."""
    if data_dir is not None:
        from napari_stpredict._sample_data import remember_local_data

        remember_local_data(data_dir)


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
    # the HER2ST JPEGs record no pixel size: the spot grid gave it (kept exact)
    parts = open_viewer(
        Path(inputs.slide),
        title=f"stpredict demo · {inputs.slide.name}",
        mpp=inputs.mpp,
        predictor=predictor,
        model=Path(inputs.model),
        genes=genes,
        device=device,
        cache_dir=cache_dir,
        tumor=True,
        show=show,
        window_size=window_size,
    )
    if run:
        import napari

        napari.run()
        parts.widget.close_workers(wait_s=30)
    return parts.viewer, parts.widget, parts.tumor_widget


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
