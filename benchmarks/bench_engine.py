"""Inference engine throughput vs the raw model forward, and peak memory of whole-slide runs.

1. Builds mosaic pyramids of the HER2ST section C2 (``../shared/data/her2st/images/C2.jpg``)
   with :func:`napari_stpredict.slide.write_ome_tiff` into a temporary folder (never the
   repository): ``4×4`` copies (≈ 39.6k × 37.1k px, JPEG tiles, full pyramid) and ``1×1``. mpp = 0.689 µm/px, from C2's 200 µm spot grid.
2. Throughput, same run, same device, same batch size, interleaved repeats:

   - *raw*: ``Predictor.predict_tensor`` on batches already normalised and on the device
     (the model's own limit: no decode, no resize, no store);
   - *engine*: :meth:`Engine.run` on the same number of tissue cells of the 4×4 mosaic, from a
     fresh cache (decode + resize in reader threads, predict, store writes).

   ratio = engine cells/s ÷ raw cells/s (goal ≥ 0.9).
3. Peak RSS of :meth:`Engine.predict_all_tissue` (automatic tissue mask included) on the 1×1
   and 4×4 mosaics (16× the area and the cells), each in its own process, sampled every 20 ms.

The model: ``--model FILE``, or by default a CMRCNet with random weights in the paper's setting
(``tf_efficientnet_lite0``, 224 px per 112 µm patch, 785 genes, 2,000-spot bank): weights do
not change speed.

    /work/venv/bin/python benchmarks/bench_engine.py [--model M] [--device auto] [--cells 768]
        [--batch-size B] [--repeats 2] [--rss-sizes 1,4] [--rss-model fast] [--workdir DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("STPREDICT_SHARED_DATA", HERE.parent.parent / "shared" / "data"))
C2 = SHARED / "her2st" / "images" / "C2.jpg"
C2_SPOTS = SHARED / "her2st" / "spots" / "C2_selection.tsv"


# --------------------------------------------------------------------------- inputs
def her2st_mpp() -> float:
    """µm/px of C2 from its legacy-ST spot grid (200 µm array pitch)."""
    import pandas as pd

    d = pd.read_csv(C2_SPOTS, sep="\t")
    step = (np.polyfit(d["x"], d["pixel_x"], 1)[0] + np.polyfit(d["y"], d["pixel_y"], 1)[0]) / 2
    return float(200.0 / step)


class Mosaic:
    """``reps × reps`` copies of an image, read like a slide by the pyramid writer."""

    def __init__(self, image: np.ndarray, reps: int, mpp: float) -> None:
        self.image = image
        self.h, self.w = image.shape[:2]
        self.shape = (self.h * reps, self.w * reps)
        self.mpp = mpp

    def read_region(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        ys = np.arange(y, y + h) % self.h
        xs = np.arange(x, x + w) % self.w
        return np.take(np.take(self.image, ys, axis=0), xs, axis=1)


def build_mosaics(workdir: Path, sizes: list[int], mpp: float) -> dict[int, Path]:
    """Write the mosaic pyramids (reused when already in ``workdir``)."""
    from napari_stpredict.slide import open_slide, write_ome_tiff

    out = {n: workdir / f"c2_mosaic_{n}x{n}.ome.tif" for n in sizes}
    missing = [n for n, p in out.items() if not p.exists()]
    if missing:
        with open_slide(C2) as src:
            image = src.read_region(0, 0, 0, *src.shape)
        for n in missing:
            t0 = time.perf_counter()
            write_ome_tiff(Mosaic(image, n, mpp), out[n], tile=512, compression="jpeg", mpp=mpp)
            print(f"  wrote {out[n].name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def make_model(path: Path, *, genes: int = 785, bank: int = 2000, patch_px: int = 224) -> Path:
    """A CMRCNet with random weights (speed does not depend on weights).

    The defaults are the paper's setting: 224 px per 112 µm patch, 785 genes.
    """
    import torch

    from napari_stpredict.model import build_model, save_model_file

    torch.manual_seed(0)
    model = build_model("cmrc", n_genes=genes, backbone="tf_efficientnet_lite0", pretrained="none")
    emb = torch.nn.functional.normalize(torch.randn(bank, model.embed_dim), dim=1)
    expr = torch.rand(bank, genes)
    names = [f"GENE{i}" for i in range(genes)]
    stats = {k: [0.5] * genes for k in ("mean", "std", "p01", "p50", "p99")}
    meta = {
        "genes": names,
        "normalization": {"method": "log1p_cpm", "target_sum": 1e4},
        "patch_px": patch_px,
        "patch_um": 112.0,
        "training_sections": ["random"],
        "gene_stats": stats,
        "top_k": 50,
    }
    save_model_file(path, model.eval(), bank_embeddings=emb, bank_expression=expr, metadata=meta)
    return path


# --------------------------------------------------------------------------- throughput
def throughput(args: argparse.Namespace, slide_path: Path, model: Path, mpp: float) -> dict:
    import torch

    from napari_stpredict.inference import Engine, PredictionStore, TileGrid
    from napari_stpredict.model import Predictor
    from napari_stpredict.slide import open_slide, tissue_mask

    pred = Predictor(model, device=args.device, batch_size=args.batch_size)
    bs = pred.batch_size
    slide = open_slide(slide_path, mpp=mpp)
    grid = TileGrid.for_slide(slide, pred)
    t0 = time.perf_counter()
    tissue = grid.tissue_cells(tissue_mask(slide), 0.2)
    t_mask = time.perf_counter() - t0
    # the N tissue cells nearest the slide centre, in blocks per repeat (no cache reuse)
    centre = (slide.shape[0] / 2, slide.shape[1] / 2)
    from napari_stpredict.inference import order_cells

    ordered = order_cells(np.argwhere(tissue), grid, centre)
    n = min(args.cells, len(ordered) // (args.repeats + 1))
    n -= n % bs
    sets = [ordered[k * n : (k + 1) * n] for k in range(args.repeats + 1)]

    # raw: real patches of the same slide, normalised and on the device once
    patches = np.stack(
        [
            slide.read_resampled(
                *grid.cell_rect_px(i, j)[:2],
                grid.cell_px,
                grid.cell_px,
                out_shape=(grid.patch_px, grid.patch_px),
            )
            for i, j in sets[0][:bs]
        ]
    )
    x = pred.preprocess(patches)

    def sync() -> None:
        if pred.device.type == "cuda":
            torch.cuda.synchronize()

    def raw_rate() -> float:
        sync()
        t = time.perf_counter()
        for _ in range(n // bs):
            pred.predict_tensor(x)
        sync()
        return n / (time.perf_counter() - t)

    def engine_rate(cells: np.ndarray) -> tuple[float, dict]:
        with tempfile.TemporaryDirectory(prefix="stpredict-bench-cache-") as cache:
            store = PredictionStore.for_slide(slide, pred, grid, cache_dir=cache)
            with Engine(slide, pred, grid, store, tissue=tissue, batch_size=bs) as engine:
                t = time.perf_counter()
                for _ in engine.run(cells, center=centre):
                    pass
                dt = time.perf_counter() - t
                assert engine.stats.cells_predicted == len(cells)
                st = engine.stats
                return len(cells) / dt, {
                    "wait_s": round(st.wait_s, 2),
                    "predict_s": round(st.predict_s, 2),
                    "read_s_summed": round(st.read_s, 2),
                    "write_s": round(st.write_s, 2),
                    "total_s": round(dt, 2),
                }

    # warm-up (allocator, autotuning, page cache) outside the timed runs
    pred.predict_tensor(x)
    engine_rate(sets[-1][: 2 * bs])
    raw, eng, parts = [], [], []
    for r in range(args.repeats):
        raw.append(raw_rate())
        rate, detail = engine_rate(sets[r])
        eng.append(rate)
        parts.append(detail)
        print(
            f"  repeat {r}: raw {raw[-1]:.1f} cells/s, engine {eng[-1]:.1f} cells/s {detail}",
            flush=True,
        )
    ratios = [e / r for e, r in zip(eng, raw, strict=True)]
    return {
        "slide": slide_path.name,
        "slide_shape": list(slide.shape),
        "levels": len(slide.levels),
        "grid": list(grid.shape),
        "tissue_cells": int(tissue.sum()),
        "tissue_mask_s": round(t_mask, 2),
        "device": str(pred.device),
        "device_name": torch.cuda.get_device_name(pred.device)
        if pred.device.type == "cuda"
        else platform.processor() or platform.machine(),
        "amp": str(getattr(pred, "_amp", None)),
        "batch_size": bs,
        "cells_per_repeat": n,
        "patch_px": grid.patch_px,
        "cell_px": round(grid.cell_px, 2),
        "genes": len(pred.genes),
        "raw_cells_per_s": [round(v, 2) for v in raw],
        "engine_cells_per_s": [round(v, 2) for v in eng],
        "ratio": [round(v, 3) for v in ratios],
        "ratio_median": round(statistics.median(ratios), 3),
        "engine_breakdown": parts,
        "torch_threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------- memory
def rss_child(slide_path: str, model: str, mpp: float, device: str, batch_size: int | None) -> dict:
    """Run in a fresh process: whole-slide tissue prediction, peak RSS sampled every 20 ms."""
    import psutil

    from napari_stpredict.inference import Engine, PredictionStore, TileGrid
    from napari_stpredict.model import Predictor
    from napari_stpredict.slide import open_slide

    proc = psutil.Process()
    pred = Predictor(model, device=device, batch_size=batch_size)
    slide = open_slide(slide_path, mpp=mpp)
    grid = TileGrid.for_slide(slide, pred)
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.02)

    with tempfile.TemporaryDirectory(prefix="stpredict-bench-cache-") as cache:
        store = PredictionStore.for_slide(slide, pred, grid, cache_dir=cache)
        with Engine(slide, pred, grid, store) as engine:
            before = proc.memory_info().rss
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            t0 = time.perf_counter()
            _ = engine.tissue  # the automatic tissue mask (bounded: at most 2048 px a side)
            t_mask = time.perf_counter() - t0
            after_mask = proc.memory_info().rss
            summary = engine.predict_all_tissue()
            stop.set()
            sampler.join()
    return {
        "slide": Path(slide_path).name,
        "slide_shape": list(slide.shape),
        "grid": list(grid.shape),
        "tissue_cells": summary.tissue,
        "predicted": summary.predicted,
        "tissue_mask_s": round(t_mask, 1),
        "rss_after_mask_mb": round(after_mask / 2**20),
        "seconds": round(summary.seconds, 1),
        "cells_per_s": round(summary.predicted / summary.seconds, 2),
        "rss_before_mb": round(before / 2**20),
        "rss_peak_mb": round(peak[0] / 2**20),
        "rss_growth_mb": round((peak[0] - before) / 2**20),
    }


def memory(
    args: argparse.Namespace, slides: dict[int, Path], model: Path, mpp: float
) -> list[dict]:
    rows = []
    for n, path in sorted(slides.items()):
        cmd = [
            sys.executable,
            __file__,
            "_rss",
            str(path),
            str(model),
            str(mpp),
            args.device,
            str(args.rss_batch_size or 0),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise SystemExit(f"memory run on {path.name} failed:\n{res.stderr[-3000:]}")
        row = json.loads(res.stdout.strip().splitlines()[-1])
        row["mosaic"] = f"{n}x{n}"
        print(f"  {row}", flush=True)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_rss":
        _, slide, model, mpp, device, bs = argv
        print(json.dumps(rss_child(slide, model, float(mpp), device, int(bs) or None)))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="model file (default: random-weight paper setting)")
    ap.add_argument(
        "--rss-model",
        default="fast",
        help="model for the memory runs: a file, 'same' (= --model) or 'fast' (default: random "
        "weights, lite0, 64 px per 112 µm, 250 genes — memory is about the slide, not the model)",
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the Predictor's")
    ap.add_argument("--rss-batch-size", type=int, default=None)
    ap.add_argument("--cells", type=int, default=768, help="cells per timed engine run")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--rss-sizes", default="1,4", help="mosaic sizes for the memory runs ('' = skip)"
    )
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--workdir", type=Path, help="where mosaics go (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    if not C2.exists():
        raise SystemExit(f"{C2}: real data not found (set STPREDICT_SHARED_DATA)")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="stpredict-bench-engine-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        mpp = her2st_mpp()
        rss_sizes = [int(s) for s in args.rss_sizes.split(",") if s.strip()]
        sizes = sorted(set(rss_sizes) | ({4} if not args.skip_throughput else set()))
        print(f"building mosaics {sizes} in {workdir} (mpp {mpp:.4f})", flush=True)
        slides = build_mosaics(workdir, sizes, mpp)
        model = args.model or workdir / "paper_setting_random.safetensors"
        if not model.exists():
            make_model(model)  # the paper's setting
        result: dict = {
            "command": "benchmarks/bench_engine.py " + " ".join(argv),
            "machine": {
                "load_avg_at_start": [round(v, 1) for v in os.getloadavg()],
                "cpu_count": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
            },
            "model": str(
                model if args.model else "random-weight CMRCNet, lite0, 224 px / 112 µm, 785 genes"
            ),
        }
        if not args.skip_throughput:
            print("throughput (4x4 mosaic)", flush=True)
            result["throughput"] = throughput(args, slides[4], model, mpp)
        if rss_sizes:
            print("peak memory of whole-slide tissue prediction", flush=True)
            if args.rss_model == "same":
                rss_model, label = model, result["model"]
            elif args.rss_model == "fast":
                rss_model = workdir / "fast_random.safetensors"
                if not rss_model.exists():
                    make_model(rss_model, genes=250, patch_px=64)
                label = "random-weight CMRCNet, lite0, 64 px / 112 µm, 250 genes"
            else:
                rss_model = label = Path(args.rss_model)
            result["memory"] = memory(args, {n: slides[n] for n in rss_sizes}, rss_model, mpp)
            result["rss_model"] = str(label)
        result["machine"]["load_avg_at_end"] = [round(v, 1) for v in os.getloadavg()]
        print(json.dumps(result, indent=1))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1))
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
