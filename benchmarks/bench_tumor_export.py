"""Speed of the tumour layer and the exports, as ratios within one run.

A synthetic prediction store the size of a large slide (100,000 × 100,000 px at 0.25 µm/px,
112 µm cells → 224 × 224 grid, all cells predicted, 50 genes) is scored, thresholded and
exported. Each step is compared with its own limit in the same run:

- a threshold-slider move (mask + area from the kept score) vs computing the score from the
  store (what a move would cost without keeping the score);
- the OME-TIFF export vs ``tifffile`` writing the same pixels from memory (tiled, zlib, same
  pyramid) — the cost of generating tiles on the fly from the grid;
- the h5ad export vs ``anndata`` writing the same AnnData already in memory;
- the CSV export vs ``pandas.DataFrame.to_csv`` of the same table already in memory;
- the GeoJSON export (regions, polygons, per-gene means): time only.

    /work/venv/bin/python benchmarks/bench_tumor_export.py [--genes 50] [--repeats 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def run(n_genes: int, repeats: int, workdir: Path) -> dict:
    import pandas as pd
    import tifffile

    from napari_stpredict.export import (
        export_csv,
        export_h5ad,
        export_heatmaps_ome_tiff,
        export_tumor_geojson,
        predictions_to_anndata,
    )
    from napari_stpredict.export.ome_tiff import _levels, default_pixel_px
    from napari_stpredict.inference.grid import TileGrid
    from napari_stpredict.inference.store import PredictionStore
    from napari_stpredict.tumor import (
        DEFAULT_TUMOR_GENES,
        GridGeometry,
        score_store,
        threshold_score,
        tumor_area,
        tumor_mask,
    )

    grid = TileGrid((100_000, 100_000), 0.25, patch_um=112, patch_px=224)
    genes = list(DEFAULT_TUMOR_GENES) + [f"G{k}" for k in range(n_genes - len(DEFAULT_TUMOR_GENES))]
    store = PredictionStore.open(workdir / "cache", key="bench", genes=genes, grid=grid)
    gh, gw = grid.shape
    rng = np.random.default_rng(0)
    ii, jj = np.mgrid[:gh, :gw]
    blob = np.exp(-((ii - gh / 3) ** 2 + (jj - gw / 2) ** 2) / (gh * 3.0))
    for r0 in range(0, gh, 32):
        rows = slice(r0, min(r0 + 32, gh))
        cells = np.stack([ii[rows].ravel(), jj[rows].ravel()], axis=1)
        vals = rng.random((len(cells), n_genes)) * 0.5 + 2.0 * blob[rows].ravel()[:, None]
        store.write(cells, vals.astype(np.float32))
    stats = {"mean": np.full(n_genes, 1.0), "std": np.full(n_genes, 0.5)}
    out: dict = {"grid": [gh, gw], "genes": n_genes, "cells": gh * gw}
    out["load_avg_start"] = round(os.getloadavg()[0], 1)

    # --- slider move vs score computation
    t_score = _best(lambda: score_store(store, gene_stats=stats), repeats)
    sc = score_store(store, gene_stats=stats)
    tm = threshold_score(sc)
    lo, hi = sc.range()
    moves = []
    for thr in np.linspace(lo, hi, 41)[1:-1]:
        t0 = time.perf_counter()
        m = tumor_mask(sc.score, float(thr), check_range=False)
        tumor_area(m, grid, tissue=sc.predicted)
        moves.append(time.perf_counter() - t0)
    t_move = statistics.median(moves)
    out["score_s"] = t_score
    out["slider_move_s"] = t_move
    out["slider_vs_score"] = t_move / t_score

    # --- OME-TIFF vs tifffile from memory (same pixels, tiles, compression, pyramid)
    dst = workdir / "h.ome.tif"

    def ours():
        out["ome_tiff_levels"] = export_heatmaps_ome_tiff(store, dst, overwrite=True).extra[
            "levels"
        ]

    geo = GridGeometry.from_grid(grid)
    levels = _levels(geo.shape0, default_pixel_px(geo), 256)
    planes = np.asarray(store.values[...], dtype=np.float32)

    def limit():
        # the grid is one pixel per cell here: the level-0 image is the store itself
        with tifffile.TiffWriter(workdir / "ref.ome.tif", bigtiff=True, ome=True) as tif:
            opts = {"tile": (256, 256), "compression": "zlib", "photometric": "minisblack"}
            tif.write(planes, subifds=len(levels) - 1, metadata={"axes": "CYX"}, **opts)
            for k in range(1, len(levels)):
                step = 2**k
                tif.write(planes[:, step // 2 :: step, step // 2 :: step], subfiletype=1, **opts)

    out["ome_tiff_s"] = _best(ours, repeats)
    out["ome_tiff_limit_s"] = _best(limit, repeats)
    out["ome_tiff_ratio"] = out["ome_tiff_s"] / out["ome_tiff_limit_s"]
    out["ome_tiff_mb"] = dst.stat().st_size / 1e6

    # --- h5ad vs anndata from memory
    h5 = workdir / "a.h5ad"
    out["h5ad_s"] = _best(lambda: export_h5ad(store, h5, tumor=tm, overwrite=True), repeats)
    adata = predictions_to_anndata(store, tumor=tm)
    out["h5ad_limit_s"] = _best(
        lambda: adata.write_h5ad(workdir / "ref.h5ad", compression="gzip"), repeats
    )
    out["h5ad_ratio"] = out["h5ad_s"] / out["h5ad_limit_s"]

    # --- CSV vs pandas from memory
    csv = workdir / "a.csv"
    out["csv_s"] = _best(lambda: export_csv(store, csv, tumor=tm, overwrite=True), repeats)
    frame = pd.read_csv(csv)
    out["csv_limit_s"] = _best(
        lambda: frame.to_csv(workdir / "ref.csv", index=False, float_format="%.6g"), repeats
    )
    out["csv_ratio"] = out["csv_s"] / out["csv_limit_s"]
    out["csv_mb"] = csv.stat().st_size / 1e6

    # --- GeoJSON (regions + polygons + per-gene means) vs the mask
    gj = workdir / "t.geojson"
    out["geojson_s"] = _best(
        lambda: export_tumor_geojson(tm, gj, predictions=store, overwrite=True), repeats
    )
    out["geojson_regions"] = len(json.loads(gj.read_text())["features"])
    return out


def markdown(r: dict, command: str) -> str:
    """The lines for docs/benchmarks.md."""
    return "\n".join(
        [
            "### Tumour layer and export speed",
            "",
            f"Command: `{command}`  ",
            f"Synthetic store of a 100,000 × 100,000 px slide (0.25 µm/px, 112 µm cells → "
            f"{r['grid'][0]} × {r['grid'][1]} = {r['cells']:,} cells, all predicted, {r['genes']} "
            f"genes); best of the repeats; ratios are within this run. The 2 cores were shared "
            f"with other work (load average {r['load_avg_start']:g} at the start), so absolute "
            "times are pessimistic.",
            "",
            "| step | time | its limit in the same run | ratio |",
            "|---|---:|---:|---:|",
            f"| threshold slider move (mask + area from the kept score) | {1e3 * r['slider_move_s']:.2f} ms | "
            f"score from the store {1e3 * r['score_s']:.0f} ms | {r['slider_vs_score']:.1e} |",
            f"| heatmaps OME-TIFF ({r['genes']} channels, {r['ome_tiff_levels']} level(s), "
            f"{r['ome_tiff_mb']:.1f} MB) | "
            f"{r['ome_tiff_s']:.2f} s | tifffile from memory {r['ome_tiff_limit_s']:.2f} s | "
            f"{r['ome_tiff_ratio']:.2f} |",
            f"| h5ad (with tumour columns) | {r['h5ad_s']:.2f} s | anndata from memory "
            f"{r['h5ad_limit_s']:.2f} s | {r['h5ad_ratio']:.2f} |",
            f"| CSV ({r['csv_mb']:.0f} MB) | {r['csv_s']:.2f} s | pandas from memory {r['csv_limit_s']:.2f} s | "
            f"{r['csv_ratio']:.2f} |",
            f"| QuPath GeoJSON ({r['geojson_regions']} regions, {r['genes']} gene means) | "
            f"{r['geojson_s']:.2f} s | (no lower-level equivalent) | — |",
        ]
    )


SPEED_START, SPEED_END = "<!-- tumor-speed -->", "<!-- /tumor-speed -->"


def write_docs(path: Path, body: str) -> None:
    """Put the table in its own block inside the ``tumor`` section (kept by tumor_validation.py)."""
    text = path.read_text(encoding="utf-8")
    block = f"{SPEED_START}\n{body.strip()}\n{SPEED_END}"
    if SPEED_START in text:
        a, b = text.index(SPEED_START), text.index(SPEED_END) + len(SPEED_END)
        text = text[:a] + block + text[b:]
    else:
        end = text.index("<!-- /section:tumor -->")
        text = text[:end] + "\n" + block + "\n" + text[end:]
    path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--genes", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--write-docs", type=Path, default=None, help="update the tumor section of this file"
    )
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="stpredict-bench-") as tmp:
        r = run(args.genes, args.repeats, Path(tmp))
    command = (
        f"/work/venv/bin/python benchmarks/bench_tumor_export.py --genes {args.genes} "
        f"--repeats {args.repeats} --write-docs docs/benchmarks.md"
    )
    body = markdown(r, command)
    print(body)
    if args.write_docs:
        write_docs(args.write_docs, body)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
