"""Cohort throughput: `stpredict predict` in-process and on a LocalCluster vs the engine alone.

Measures, in one run on the same slides and model:

- **engine**: :meth:`Engine.predict_all_tissue` on each slide, already opened, into a fresh
  store — the pipeline's own limit for one process (tile decoding overlapped with the model);
- **raw model**: ``Predictor.predict`` on in-memory patches of the same batch size (context);
- **cohort inline**: :func:`predict_cohort` with ``scheduler="inline"`` (opens every slide,
  tissue mask, store, summary) — one slide after the other in this process;
- **cohort LocalCluster(N)**: the same on a fresh dask LocalCluster of N worker processes,
  start-up included (and reported separately).

Reported as slides/s and cells/s, and as ratios to the engine's cells/s. The model has the
demo's architecture (CMRCNet, EfficientNet-Lite0, 112 µm patches at 112 px, 250 genes, a
650-spot bank) with random weights: speed does not depend on the weights.

Usage::

    python benchmarks/bench_cohort.py                       # HER2ST C2, C3, C4, B4 from ../shared/data
    python benchmarks/bench_cohort.py --workers 2 --update-docs
    python benchmarks/bench_cohort.py --slides a.svs b.svs --mpp 0.5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STPREDICT_SHARED_DATA", ROOT.parent / "shared" / "data"))
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "cohort"


def make_model(path: Path, *, n_genes: int = 250, n_bank: int = 650, patch_px: int = 112) -> Path:
    """A model file with the demo's architecture and random weights."""
    import torch

    from napari_stpredict.model import build_model, save_model_file
    from napari_stpredict.model.checkpoint import compute_gene_stats

    torch.manual_seed(0)
    genes = [f"GENE{i:04d}" for i in range(n_genes)]
    model = build_model(
        "cmrc", n_genes=n_genes, backbone="tf_efficientnet_lite0", pretrained="none"
    )
    model.eval()
    expr = np.random.default_rng(0).gamma(1.5, 1.0, (n_bank, n_genes)).astype(np.float32)
    with torch.no_grad():
        emb = model.encode_expr(torch.from_numpy(expr))
    return save_model_file(
        path,
        model,
        bank_embeddings=emb,
        bank_expression=expr,
        metadata={
            "genes": genes,
            "normalization": {"method": "log1p_cpm", "target_sum": 1e4},
            "patch_um": 112.0,
            "patch_px": patch_px,
            "training_sections": ["random"],
            "gene_stats": compute_gene_stats(expr),
        },
    )


def bench_engine(slides: list[Path], model: Path, *, mpp: float | None, work: Path) -> dict:
    """Engine.predict_all_tissue per slide (slide already open) + the raw model forward."""
    from napari_stpredict.inference import Engine, PredictionStore, TileGrid
    from napari_stpredict.model import Predictor
    from napari_stpredict.slide import open_slide, tissue_mask

    predictor = Predictor(model, device="cpu")
    cells = 0
    seconds = 0.0
    for k, path in enumerate(slides):
        slide = open_slide(path)
        if slide.mpp is None and mpp is not None:
            slide = open_slide(path, mpp=mpp)
        grid = TileGrid.for_slide(slide, predictor)
        tissue = grid.tissue_cells(tissue_mask(slide))
        store = PredictionStore.open(
            work / "engine", key=f"s{k}", genes=predictor.genes, grid=grid, max_bytes=2**62
        )
        with Engine(slide, predictor, grid, store, tissue=tissue) as engine:
            summary = engine.predict_all_tissue()
        cells += summary.predicted
        seconds += summary.seconds
        slide.close()
    # the model alone, same batch size, patches already in memory
    bs = predictor.batch_size
    patches = np.random.default_rng(0).integers(
        0, 255, (bs, predictor.patch_px, predictor.patch_px, 3), dtype=np.uint8
    )
    predictor.predict(patches)  # warm-up
    n_rep = max(3, min(20, cells // bs))
    t0 = time.perf_counter()
    for _ in range(n_rep):
        predictor.predict(patches)
    raw = time.perf_counter() - t0
    return {
        "cells": cells,
        "seconds": seconds,
        "cells_per_s": cells / seconds,
        "raw_model_cells_per_s": n_rep * bs / raw,
        "batch_size": bs,
    }


def bench_cohort(
    slides: list[Path], model: Path, *, scheduler: str, workers: int | None, mpp, out: Path
) -> dict:
    from napari_stpredict.cohort import predict_cohort

    shutil.rmtree(out, ignore_errors=True)
    lines: list[str] = []
    t0 = time.perf_counter()
    result = predict_cohort(
        slides,
        model,
        out,
        scheduler=scheduler,
        workers=workers,
        mpp=mpp,
        device="cpu",
        on_cluster=lines.append,
    )
    wall = time.perf_counter() - t0
    assert result.ok, result.rows
    cells = sum(r["cells"] for r in result.rows)
    return {
        "scheduler": scheduler if workers is None else f"{scheduler}({workers})",
        "where": lines[0] if lines else "",
        "slides": len(slides),
        "cells": cells,
        "seconds": wall,
        "slides_per_s": len(slides) / wall,
        "cells_per_s": cells / wall,
    }


def bench_cluster_startup(workers: int) -> float:
    """Seconds to start a LocalCluster of ``workers`` processes and connect (no work)."""
    from distributed import Client

    from napari_stpredict.distributed import plan_local_cluster, start_local_cluster

    t0 = time.perf_counter()
    cluster = start_local_cluster(plan_local_cluster(n_jobs=workers, workers=workers, gpus=[]))
    with Client(cluster, set_as_default=False) as client:
        client.wait_for_workers(workers)
        elapsed = time.perf_counter() - t0
    cluster.close()
    return elapsed


def render(results: dict, command: str) -> str:
    eng = results["engine"]
    rows = [
        "| run | slides/s | cells/s | vs engine |",
        "|---|---:|---:|---:|",
        f"| raw model forward (batch {eng['batch_size']}, patches in memory) | — | "
        f"{eng['raw_model_cells_per_s']:.1f} | {eng['raw_model_cells_per_s'] / eng['cells_per_s']:.2f} |",
        f"| engine, one slide at a time (slides already open) | "
        f"{results['n_slides'] / eng['seconds']:.3f} | {eng['cells_per_s']:.1f} | 1.00 |",
    ]
    for r in results["cohort"]:
        flags = r["scheduler"].replace("(", " --workers ").rstrip(")")
        rows.append(
            f"| `stpredict predict --scheduler {flags}` | {r['slides_per_s']:.3f} | "
            f"{r['cells_per_s']:.1f} | {r['cells_per_s'] / eng['cells_per_s']:.2f} |"
        )
    m = results["machine"]
    return "\n".join(
        [
            "## Cohort prediction",
            "",
            f"{results['n_slides']} slides ({', '.join(results['slides'])}), "
            f"{eng['cells']} tissue cells in all; CMRCNet with EfficientNet-Lite0 (112 µm at "
            f"112 px, 250 genes, random weights: speed does not depend on them), CPU. "
            f"Machine: {m['cpus']} CPUs, {m['platform']}, Python {m['python']}; "
            f"{m['note']}",
            "",
            *rows,
            "",
            f"Starting the LocalCluster's {results['startup_workers']} worker processes takes "
            f"{results['startup_s']:.1f} s; importing torch and loading the model in each worker "
            "come on top. All of it is inside the LocalCluster row, as are, in both cohort rows, "
            "opening each slide (HER2ST JPEGs are decoded whole), the tissue mask, the store and "
            "`summary.json`. 'vs engine' is cells/s relative to the engine's own throughput in "
            "the same run.",
            "",
            "Command:",
            "",
            "```bash",
            command,
            "```",
        ]
    )


def update_docs(text: str) -> None:
    doc = DOCS.read_text()
    pattern = re.compile(
        rf"(<!-- section:{SECTION} -->\n).*?(\n<!-- /section:{SECTION} -->)", re.DOTALL
    )
    if not pattern.search(doc):
        raise SystemExit(f"{DOCS}: no <!-- section:{SECTION} --> block")
    DOCS.write_text(pattern.sub(lambda mt: mt.group(1) + text + mt.group(2), doc))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slides", nargs="*", type=Path, default=None)
    ap.add_argument("--mpp", type=float, default=None, help="for slides without one")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "cohort")
    ap.add_argument("--note", default="", help="free text about the machine (load, sharing)")
    ap.add_argument("--update-docs", action="store_true")
    ap.add_argument(
        "--from-json", type=Path, default=None, help="re-render a results.json (no new run)"
    )
    args = ap.parse_args()
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        text = render(saved, saved["command"])
        print(text)
        if args.update_docs:
            update_docs(text)
        return

    her2st = SHARED / "her2st"
    slides = args.slides or [her2st / "images" / f"{s}.jpg" for s in ("C2", "C3", "C4", "B4")]
    mpp = args.mpp
    if args.slides is None:
        from napari_stpredict.demo import section_mpp

        mpp = float(np.mean([section_mpp(her2st, s) for s in ("C2", "C3", "C4", "B4")]))
    for s in slides:
        if not s.exists():
            raise SystemExit(f"{s}: not found (set STPREDICT_SHARED_DATA)")
    args.out.mkdir(parents=True, exist_ok=True)
    model = make_model(args.out / "model.safetensors")
    print("engine …", flush=True)
    engine = bench_engine(slides, model, mpp=mpp, work=args.out / "work")
    print(json.dumps(engine), flush=True)
    cohort = []
    for sched, workers in (("inline", None), ("local", args.workers)):
        print(f"cohort {sched} …", flush=True)
        r = bench_cohort(
            slides, model, scheduler=sched, workers=workers, mpp=mpp, out=args.out / f"run-{sched}"
        )
        print(json.dumps(r), flush=True)
        cohort.append(r)
    startup = bench_cluster_startup(args.workers)
    results = {
        "n_slides": len(slides),
        "slides": [s.name for s in slides],
        "engine": engine,
        "cohort": cohort,
        "startup_s": startup,
        "startup_workers": args.workers,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(terse=True),
            "python": platform.python_version(),
            "note": args.note,
        },
    }
    cmd = shlex.join(
        ["python", "benchmarks/bench_cohort.py", *(a for a in sys.argv[1:] if a != "--update-docs")]
    )
    results["command"] = cmd
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    text = render(results, cmd)
    print(text)
    if args.update_docs:
        update_docs(text)


if __name__ == "__main__":
    main()
