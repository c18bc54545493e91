"""``stpredict predict``: a cohort of slides through the model, in-process or on dask."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from napari_stpredict.cli import app
from napari_stpredict.cli._options import AsJson, Device, ModelFile, Mpp, StrideUm
from napari_stpredict.cli._progress import Bars, status_markup


def _row_line(row) -> str:
    """One printed line per finished slide (status, tiles, error, exports not made)."""
    extra = f": {row['error']}" if row.get("error") else ""
    tiles = f" ({row['cells']} tiles)" if row.get("cells") is not None else ""
    pad = " " * max(0, 8 - len(row["status"]))
    text = f"{pad}{status_markup(row['status'])} {row['name']}{tiles}{extra}"
    for note in row.get("notes") or []:
        text += f"\n         [yellow]note[/yellow]: {note}"
    for kind, reason in (row.get("export_errors") or {}).items():
        text += f"\n         [yellow]export {kind} not written[/yellow]: {reason}"
    return text


def _table(rows):
    from rich.table import Table

    table = Table(title="stpredict predict", show_lines=False)
    table.add_column("slide")
    table.add_column("tiles", justify="right")
    table.add_column("predicted", justify="right")
    table.add_column("time (s)", justify="right")
    table.add_column("status")
    table.add_column("error / exports not written", overflow="fold")
    for r in rows:
        notes = [r["error"]] if r["error"] else []
        notes += [f"{k}: {why}" for k, why in (r.get("export_errors") or {}).items()]
        table.add_row(
            r["name"],
            "" if r["cells"] is None else str(r["cells"]),
            str(r["predicted"] or 0),
            "" if r["time_s"] is None else f"{r['time_s']:.1f}",
            status_markup(r["status"]),
            "; ".join(notes),
        )
    return table


class _CohortBars:
    """The terminal face of a cohort run: a bar for the cohort and one per running slide
    (opened once the inputs are checked), a line per finished slide, notes in yellow."""

    def __init__(self, console: Any, out: Path) -> None:
        self.console, self.out = console, out
        self.bars: Bars | None = None

    def callbacks(self) -> dict[str, Any]:
        """The ``on_*`` arguments of :func:`~napari_stpredict.cohort.predict_cohort`."""
        return {
            "on_start": self.on_start,
            "on_cluster": self.line,
            "on_note": lambda line: self.line(f"[yellow]note:[/yellow] {line}"),
            "on_slide_progress": self.on_slide_progress,
            "on_slide_done": self.on_slide_done,
        }

    def on_start(self, pairs: list) -> None:
        self.bars = Bars(self.console)
        self.bars.__enter__()
        self.bars.update("slides", 0, len(pairs), label="slides")
        self.bars.print(f"{len(pairs)} slide(s) → {self.out}")

    def on_slide_progress(self, name: str, done: int, total: int | None, message: str = "") -> None:
        if self.bars is not None:
            self.bars.update(name, done, total, message, label=f"  {name}")

    def on_slide_done(self, row: Any) -> None:
        if self.bars is not None:
            self.bars.remove(row["name"])
            self.bars.advance("slides")
            self.bars.print(_row_line(row))

    def line(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def __enter__(self) -> _CohortBars:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bars is not None:
            self.bars.__exit__(None, None, None)


@app.command(
    "predict",
    help="Predict expression over the tissue of many slides (resumable; local or dask cluster)."
    "\n\nEach slide gets OUT/<slide>/predictions.zarr and the exports asked for; a rerun skips "
    "finished slides and cells. Exit status: 0 all done, 1 some slide failed, 2 bad input.",
)
def predict(
    slides: list[Path] | None = typer.Argument(
        None,
        help="Slide files, or folders of slides (every slide file directly inside).",
        show_default=False,
    ),
    model: ModelFile = None,
    out: Path | None = typer.Option(
        None,
        "--out",
        "-o",
        help="Output folder: OUT/<slide>/predictions.zarr, exports, summary.json.",
        show_default=False,
    ),
    export: str = typer.Option(
        "",
        "--export",
        "-e",
        help="Comma-separated exports per slide: h5ad, csv, ome-tiff, geojson, mask-ome-tiff, png, "
        "spatialdata (needs the 'spatialdata' extra).",
    ),
    no_image: bool = typer.Option(
        False,
        "--no-image",
        help="--export spatialdata without the copy of the slide image (tiles, table, regions only).",
    ),
    scheduler: str = typer.Option(
        "local",
        "--scheduler",
        "-s",
        help="'local' (a dask LocalCluster sized to this machine), 'inline' (this process), "
        "or the address of a running dask scheduler (tcp://HOST:8786).",
    ),
    workers: int | None = typer.Option(
        None,
        "--workers",
        "-w",
        help="LocalCluster workers (default: one per GPU, else cores/4).",
        show_default=False,
    ),
    stride_um: StrideUm = None,
    batch_size: int | None = typer.Option(
        None,
        "--batch-size",
        "-b",
        help="Patches per model call (default: the model's).",
        show_default=False,
    ),
    tta: int | None = typer.Option(
        None,
        "--tta",
        help="Flips/rotations averaged per tile for every slide: 1, 2, 4 or 8 "
        "(default: the model file's).",
        show_default=False,
    ),
    device: Device = "auto",
    mpp: Mpp = None,
    min_tissue: float = typer.Option(
        0.2, "--min-tissue", help="Minimum tissue fraction of a grid cell to predict it."
    ),
    as_json: AsJson = False,
) -> None:
    """``stpredict predict``: check the required arguments, run the cohort with progress bars,
    print the table (and the summary JSON).

    Long because the typer signature lists every flag (the user's help is the command's
    ``help=``).
    """
    from rich.console import Console

    from napari_stpredict.cohort import predict_cohort

    slides, model, out = _required(slides, model, out)
    console = Console(stderr=True)
    with _CohortBars(console, out) as ui:
        result = predict_cohort(
            slides,
            model,
            out,
            exports=_exports(export, no_image=no_image),
            scheduler=scheduler,
            workers=workers,
            stride_um=stride_um,
            batch_size=batch_size,
            device=device,
            mpp=mpp,
            min_tissue=min_tissue,
            tta=tta,
            **ui.callbacks(),
        )
    console.print(_table(result.rows))
    console.print(f"summary: {result.summary_path}", highlight=False)
    if as_json:
        typer.echo(json.dumps(json.loads(result.summary_path.read_text()), indent=2))
    if not result.ok:
        raise typer.Exit(1)


def _required(
    slides: list[Path] | None, model: Path | None, out: Path | None
) -> tuple[list[Path], Path, Path]:
    """Slides, model and output, each required: checked here rather than by click so that the
    message and the exit status (2) are ours."""
    from napari_stpredict.errors import StPredictError

    if not slides:
        raise StPredictError("no slides given (stpredict predict SLIDES... --model M --out DIR)")
    if model is None:
        raise StPredictError("--model: required (a model file from `stpredict train`)")
    if out is None:
        raise StPredictError("--out: required (the output folder)")
    return slides, model, out


def _exports(export: str, *, no_image: bool) -> tuple[str, ...]:
    """``--export`` names (bad names are bad input, before anything starts); with
    ``--no-image`` the SpatialData store goes without its image element."""
    from napari_stpredict.cohort import parse_exports

    exports = parse_exports(export)
    if no_image:
        exports = tuple("spatialdata-no-image" if e == "spatialdata" else e for e in exports)
    return exports
