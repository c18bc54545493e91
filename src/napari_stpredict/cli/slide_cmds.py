"""``stpredict info`` and ``stpredict convert``: inspect a slide, write a tiled pyramid."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import typer

from napari_stpredict.cli import app
from napari_stpredict.cli._options import MppOverride, Overwrite
from napari_stpredict.errors import StPredictError


def slide_info(slide: Any) -> dict[str, Any]:
    """The ``stpredict info --json`` document for an open slide (a stable contract).

    Keys: ``path``, ``format``, ``mpp``, ``shape`` ``[h, w]``, ``units``, ``levels`` (each
    ``{"shape": [h, w, c], "downsample": d, "chunks": [th, tw, c], "stored": bool}``),
    ``fingerprint``, ``metadata``.
    """
    stored = int(slide.metadata.get("stored_levels", len(slide.levels)))
    return {
        "path": str(slide.path),
        "format": slide.format,
        "mpp": slide.mpp,
        "shape": list(slide.shape),
        "units": slide.units,
        "levels": [
            {
                "shape": [int(s) for s in level.shape],
                "downsample": float(ds),
                "chunks": [int(c[0]) for c in level.chunks],
                "stored": i < stored,
            }
            for i, (level, ds) in enumerate(zip(slide.levels, slide.downsamples, strict=True))
        ],
        "fingerprint": slide.fingerprint(),
        "metadata": slide.metadata,
    }


@app.command("info")
def info(
    slide_path: Path = typer.Argument(..., metavar="SLIDE", help="Slide file or OME-Zarr folder."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
    mpp: MppOverride = None,
) -> None:
    """Show a slide's format, pyramid levels, tile size and resolution."""
    from napari_stpredict.slide import open_slide

    with open_slide(slide_path, mpp=mpp) as slide:
        doc = slide_info(slide)
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    mpp_text = (
        f"{doc['mpp']:.4g} µm/px ({doc['metadata'].get('mpp_source')})"
        if doc["mpp"]
        else "unknown (use --mpp)"
    )
    console.print(f"[bold]{doc['path']}[/bold]")
    h, w = doc["shape"]
    console.print(f"format: {doc['format']}   mpp: {mpp_text}   size: {w} × {h} px (w × h)")
    table = Table("level", "shape (h, w, c)", "downsample", "chunks", "stored")
    for i, lv in enumerate(doc["levels"]):
        table.add_row(
            str(i),
            " x ".join(map(str, lv["shape"])),
            f"{lv['downsample']:.3f}",
            " x ".join(map(str, lv["chunks"])),
            "yes" if lv["stored"] else "lazy",
        )
    console.print(table)
    if doc["metadata"].get("decoded") == "on first read":
        console.print(
            "[yellow]note:[/yellow] large JPEG/PNG: it cannot be read tile by tile; convert it "
            "to a tiled pyramid once (stpredict convert SRC DST.ome.tif --mpp X)"
        )
    if doc["metadata"].get("mpp_suspect"):
        console.print(f"[yellow]warning:[/yellow] {doc['metadata']['mpp_suspect']} (--mpp)")


def _target_kind(dst: Path) -> str:
    name = dst.name.lower()
    if name.endswith((".ome.tif", ".ome.tiff")):
        return "ome-tiff"
    if name.endswith(".zarr"):
        return "ome-zarr"
    raise StPredictError(
        f"{dst}: output must end in .ome.tif, .ome.tiff (OME-TIFF) or .zarr (OME-Zarr)"
    )


@app.command("convert")
def convert(
    src: Path = typer.Argument(
        ..., help="Any readable slide (SVS, NDPI, TIFF, OME-Zarr, JPEG, PNG)."
    ),
    dst: Path = typer.Argument(
        ..., help="Output: .ome.tif/.ome.tiff (pyramidal OME-TIFF) or .zarr (OME-Zarr)."
    ),
    tile: int = typer.Option(512, "--tile", help="Tile size in pixels (multiple of 16)."),
    compression: str | None = typer.Option(
        None,
        "--compression",
        help="jpeg or deflate (default: jpeg for OME-TIFF, deflate for OME-Zarr).",
    ),
    quality: int = typer.Option(90, "--quality", help="JPEG quality (1-100)."),
    mpp: float | None = typer.Option(
        None, "--mpp", help="µm per pixel to record (when the source has none)."
    ),
    overwrite: Overwrite = False,
) -> None:
    """Write a tiled multi-resolution pyramid, streaming (bounded memory), atomically."""
    from rich.console import Console

    from napari_stpredict.cli._progress import Bars
    from napari_stpredict.io_utils import check_not_inside, check_replaceable, check_target
    from napari_stpredict.slide import open_slide, write_ome_tiff, write_ome_zarr

    kind = _target_kind(dst)
    if compression is None:
        compression = "jpeg" if kind == "ome-tiff" else "deflate"
    if compression not in ("jpeg", "deflate"):
        raise StPredictError(f"--compression {compression!r}: choose jpeg or deflate")
    if not 1 <= quality <= 100:
        raise StPredictError(f"--quality {quality}: must be between 1 and 100")
    if src.exists() and src.resolve() == dst.resolve():
        raise StPredictError(f"{dst}: output is the input")
    # before any work: never replace (or write into) the source, never replace a foreign folder
    check_not_inside([src], dst, "output")
    check_target(dst, overwrite=overwrite)
    if dst.exists() or dst.is_symlink():
        check_replaceable(dst)
    console = Console(stderr=True)
    t0 = time.perf_counter()
    with open_slide(
        src, mpp=mpp, max_image_pixels=None
    ) as slide:  # big JPEG/PNG: convert is the cure
        if slide.mpp is None:
            console.print(
                f"[yellow]note:[/yellow] {src} has no resolution; writing without µm/px (pass --mpp)"
            )
        with Bars(console, unit="tile rows") as bars:
            progress = bars.callback("convert", label="convert")
            if kind == "ome-tiff":
                write_ome_tiff(
                    slide, dst, tile=tile, compression=compression, mpp=mpp, quality=quality,
                    overwrite=overwrite, progress=progress,
                )  # fmt: skip
            else:
                write_ome_zarr(
                    slide, dst, tile=tile, compression=compression, mpp=mpp,
                    overwrite=overwrite, progress=progress,
                )  # fmt: skip
        h, w = slide.shape
    dt = time.perf_counter() - t0
    mb = h * w * 3 / 1e6
    console.print(
        f"wrote {dst} ({kind}, {compression}, {h} x {w} px, {mb / dt:.0f} MB/s of level-0 pixels)"
    )
