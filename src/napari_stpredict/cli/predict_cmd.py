"""``stpredict predict``: a cohort of slides through the model, in-process or on dask."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import typer

from napari_stpredict.cli import app


class _CohortBars:
    """Rich progress: one bar for the cohort, one per running slide (thread-safe)."""

    def __init__(self, console, n_slides: int, *, enabled: bool) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.enabled = enabled
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
            transient=False,
        )
        self.overall = self.progress.add_task("slides", total=n_slides, note="")
        self._tasks: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> _CohortBars:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def slide_progress(self, name: str, done: int, total: int | None, message: str = "") -> None:
        with self._lock:
            task = self._tasks.get(name)
            if task is None:
                task = self.progress.add_task(f"  {name}", total=total, note=message)
                self._tasks[name] = task
            self.progress.update(task, completed=done, total=total, note=message)

    def slide_done(self, row: dict[str, Any]) -> None:
        with self._lock:
            task = self._tasks.pop(row["name"], None)
            if task is not None:
                self.progress.remove_task(task)
            self.progress.advance(self.overall)
            status = row["status"]
            style = {"done": "green", "skipped": "cyan", "failed": "red"}.get(status, "yellow")
            extra = f": {row['error']}" if row.get("error") else ""
            cells = f" ({row['cells']} cells)" if row.get("cells") is not None else ""
            self.progress.console.print(
                f"[{style}]{status:>8}[/{style}] {row['name']}{cells}{extra}",
                highlight=False,
            )


def _table(rows: list[dict[str, Any]]):
    from rich.table import Table

    table = Table(title="stpredict predict", show_lines=False)
    table.add_column("slide")
    table.add_column("cells", justify="right")
    table.add_column("predicted", justify="right")
    table.add_column("time (s)", justify="right")
    table.add_column("status")
    table.add_column("error", overflow="fold")
    for r in rows:
        style = {"done": "green", "skipped": "cyan", "failed": "red"}.get(r["status"], "yellow")
        table.add_row(
            r["name"],
            "" if r["cells"] is None else str(r["cells"]),
            str(r["predicted"] or 0),
            "" if r["time_s"] is None else f"{r['time_s']:.1f}",
            f"[{style}]{r['status']}[/{style}]",
            r["error"] or "",
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
        help="Comma-separated exports per slide: h5ad, csv, ome-tiff, geojson, mask-ome-tiff, png.",
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
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    mpp: float | None = typer.Option(
        None,
        "--mpp",
        help="µm per pixel for slides whose file records none (JPEG/PNG); others keep theirs.",
        show_default=False,
    ),
    min_tissue: float = typer.Option(
        0.2, "--min-tissue", help="Minimum tissue fraction of a grid cell to predict it."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print the summary as JSON on stdout (bars go to stderr)."
    ),
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
    console = Console(stderr=True)
    bars: _CohortBars | None = None

    def on_start(pairs) -> None:
        nonlocal bars
        bars = _CohortBars(console, len(pairs), enabled=True)
        bars.__enter__()
        console.print(f"{len(pairs)} slide(s) → {out}", highlight=False)

    def on_cluster(line: str) -> None:
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
            on_cluster=on_cluster,
            on_slide_progress=lambda *a: bars.slide_progress(*a) if bars else None,
            on_slide_done=lambda row: bars.slide_done(row) if bars else None,
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
