"""``stpredict predict``: a cohort of slides through the model, in-process or on dask."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from napari_stpredict.cli import app
from napari_stpredict.cli._options import AsJson, Device, Mpp
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


@app.command("predict")
def predict(
    slides: list[Path] | None = typer.Argument(
        None,
        help="Slide files, or folders of slides (every slide file directly inside).",
        show_default=False,
    ),
    model: Path | None = typer.Option(
        None,
        "--model",
        "-m",
        help="Model file (.safetensors) from `stpredict train`.",
        show_default=False,
    ),
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
    stride_um: float | None = typer.Option(
        None,
        "--stride-um",
        help="Grid stride in µm (default: the model's patch size).",
        show_default=False,
    ),
    batch_size: int | None = typer.Option(
        None,
        "--batch-size",
        "-b",
        help="Patches per model call (default: the model's).",
        show_default=False,
    ),
    device: Device = "auto",
    mpp: Mpp = None,
    min_tissue: float = typer.Option(
        0.2, "--min-tissue", help="Minimum tissue fraction of a grid cell to predict it."
    ),
    as_json: AsJson = False,
) -> None:
    """Predict expression over the tissue of many slides (resumable; local or dask cluster).

    Each slide gets OUT/<slide>/predictions.zarr and the exports asked for; a rerun skips finished
    slides and cells. Exit status: 0 all done, 1 some slide failed, 2 bad input.
    """
    from rich.console import Console

    from napari_stpredict.cohort import parse_exports, predict_cohort
    from napari_stpredict.errors import StPredictError

    # checked here rather than by click so that the message and exit status (2) are ours
    if not slides:
        raise StPredictError("no slides given (stpredict predict SLIDES... --model M --out DIR)")
    if model is None:
        raise StPredictError("--model: required (a model file from `stpredict train`)")
    if out is None:
        raise StPredictError("--out: required (the output folder)")
    exports = parse_exports(export)  # bad names are bad input, before anything starts
    if no_image:  # the SpatialData store without its image element
        exports = tuple("spatialdata-no-image" if e == "spatialdata" else e for e in exports)
    console = Console(stderr=True)
    bars: Bars | None = None

    def on_start(pairs) -> None:
        nonlocal bars
        bars = Bars(console)
        bars.__enter__()
        bars.update("slides", 0, len(pairs), label="slides")
        bars.print(f"{len(pairs)} slide(s) → {out}")

    def on_slide_progress(name: str, done: int, total: int | None, message: str = "") -> None:
        if bars is not None:
            bars.update(name, done, total, message, label=f"  {name}")

    def on_slide_done(row) -> None:
        if bars is not None:
            bars.remove(row["name"])
            bars.advance("slides")
            bars.print(_row_line(row))

    def on_line(line: str) -> None:
        console.print(line, highlight=False)

    try:
        result = predict_cohort(
            slides,
            model,
            out,
            exports=exports,
            scheduler=scheduler,
            workers=workers,
            stride_um=stride_um,
            batch_size=batch_size,
            device=device,
            mpp=mpp,
            min_tissue=min_tissue,
            on_start=on_start,
            on_cluster=on_line,
            on_note=lambda line: on_line(f"[yellow]note:[/yellow] {line}"),
            on_slide_progress=on_slide_progress,
            on_slide_done=on_slide_done,
        )
    finally:
        if bars is not None:
            bars.__exit__(None, None, None)
    console.print(_table(result.rows))
    console.print(f"summary: {result.summary_path}", highlight=False)
    if as_json:
        typer.echo(json.dumps(json.loads(result.summary_path.read_text()), indent=2))
    if not result.ok:
        raise typer.Exit(1)
