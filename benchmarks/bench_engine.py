"""Inference engine: engine ÷ raw model, feed rate vs decode limit, store writes, memory.

Everything is measured in one run, on the same slide and the same tiles:

1. Builds mosaic pyramids of the HER2ST section C2 (``../shared/data/her2st/images/C2.jpg``)
   with :func:`napari_stpredict.slide.write_ome_tiff` (``--workdir``, reused when present):
   ``4×4`` copies (≈ 39.6k × 37.1k px, 512-px JPEG tiles, full pyramid) and ``1×1``;
   mpp 0.689 µm/px from C2's 200 µm spot grid.
2. *decode limit*: every slide tile that the N tissue cells nearest the centre touch, decoded
   once, on ``--read-workers`` threads (tiles/s, and cells/s = N ÷ that time).
3. *feed*: :meth:`Engine.run` on the same N cells with a model that costs nothing (returns
   zeros): patch reads + resize + store writes only. Goal: feed ≥ 0.3 × decode limit.
   ``--feed-mpps native,0.5`` adds a row per declared µm/px: the same mosaic pixels written
   with that µm/px (``c2_mosaic_NxN_mpp0.5.ome.tif``); at 0.5 µm/px a 112 µm patch is 224
   stored px, read without resizing (``resize`` in the JSON counts the patches that were
   resized). ``feed`` stays the native row; ``feed_by_mpp`` holds every row.
4. *store*: write cost of the engine's buffered whole-block writes (whole chunk files written
   directly, and the same through zarr's own pipeline for comparison), and the read time of one
   gene's map for display, for several chunk layouts (``--layouts``).
5. *engine ÷ raw*: ``Predictor.predict`` on the same tiles' patches already in memory (raw)
   vs :meth:`Engine.run` on fresh cells (decode, resize, predict, store), interleaved repeats,
   for each ``--read-workers`` × ``--torch-threads`` budget and each ``--batch-sizes``.
   Goal: ≥ 0.9.
6. *full tissue map* of the 4×4 mosaic with the zero-cost model (feed-limited) and, in fresh
   processes, peak RSS of :meth:`Engine.predict_all_tissue` on the 1×1 and 4×4 mosaics with
   ``--rss-model`` (flat in slide size = bounded memory).

The model: ``--model FILE``, or by default a CMRCNet with random weights in the paper's setting
(``tf_efficientnet_lite0``, 224 px per 112 µm patch, 785 genes, 2,000-spot bank): weights do
not change speed. ``--device cuda`` runs the model parts on the GPU (bf16 autocast, pinned
host buffers); the CPU parts (decode, feed) are the same.

    python benchmarks/bench_engine.py [--device cpu|cuda] [--cells 256] [--repeats 2]
        [--read-workers 2] [--torch-threads 0] [--batch-sizes 32] [--layouts 32x32,...]
        [--mosaic 4] [--feed-mpps native,0.5] [--rss-sizes 1,4] [--rss-model fast|zero|same|FILE]
        [--workdir DIR] [--json OUT]
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


def build_mosaics(workdir: Path, sizes: list[int], mpp: float, *, tag: str = "") -> dict[int, Path]:
    """Write the mosaic pyramids (reused when already in ``workdir``).

    ``tag`` names a variant (e.g. ``"_mpp0.5"``: the same pixels declared at another µm/px).
    """
    from napari_stpredict.slide import open_slide, write_ome_tiff

    out = {n: workdir / f"c2_mosaic_{n}x{n}{tag}.ome.tif" for n in sizes}
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


# --------------------------------------------------------------------------- helpers
class ZeroModel:
    """A model that costs nothing: the engine's feed rate (reads, resize, store) alone."""

    def __init__(self, genes: list[str], patch_px: int, patch_um: float) -> None:
        self.genes = list(genes)
        self.patch_px = patch_px
        self.patch_um = patch_um
        self.metadata = {"content_sha256": f"zero-{len(genes)}-{patch_px}-{patch_um}"}
        self.path = Path("zero.safetensors")
        self.device = "cpu"
        self.batch_size = None
        self._out: dict[int, np.ndarray] = {}

    def predict(self, x) -> np.ndarray:
        n = len(x)
        out = self._out.get(n)
        if out is None:
            out = self._out[n] = np.zeros((n, len(self.genes)), np.float32)
        return out


def _open_session(slide, predictor, tissue, cache, **kw):
    from napari_stpredict.inference.session import open_session

    return open_session(
        slide=slide, predictor=predictor, tissue=tissue, cache_dir=cache, verify_store=False, **kw
    )


def decode_limit(slide, grid, cells: np.ndarray, workers: int) -> dict:
    """Decode once every slide tile the cells' patches touch, on ``workers`` threads."""
    from concurrent.futures import ThreadPoolExecutor

    level = slide.best_level(grid.cell_px / grid.patch_px)
    ds = slide.downsamples[level]
    th, tw = (int(v) for v in slide.levels[level].chunksize[:2])
    lh, lw = slide.level_shapes[level]
    rects = grid.cell_rects_px(cells) / ds
    tiles = set()
    for y0, x0, y1, x1 in rects:
        for ty in range(max(int(y0) - 3, 0) // th, min(int(y1) + 3, lh - 1) // th + 1):
            for tx in range(max(int(x0) - 3, 0) // tw, min(int(x1) + 3, lw - 1) // tw + 1):
                tiles.add((ty, tx))

    def read(t):
        ty, tx = t
        y, x = ty * th, tx * tw
        slide.read_region(level, y, x, min(th, lh - y), min(tw, lw - x))

    best = cpu = None
    with ThreadPoolExecutor(workers) as pool:
        for _ in range(2):  # the second pass: page cache warm, like the engine runs
            t, c = time.perf_counter(), time.process_time()
            list(pool.map(read, sorted(tiles)))
            dt, dc = time.perf_counter() - t, time.process_time() - c
            best = dt if best is None else min(best, dt)
            cpu = dc if cpu is None else min(cpu, dc)
    return {
        "cells_per_cpu_s": round(len(cells) / cpu, 1),
        "level": level,
        "tile": [th, tw],
        "tiles": len(tiles),
        "tiles_per_s": round(len(tiles) / best, 1),
        "cells_per_s": round(len(cells) / best, 1),
        "workers": workers,
    }


def engine_run(slide, predictor, grid, tissue, cells, *, workers, bs, center) -> tuple[float, dict]:
    """One engine run over ``cells`` into a fresh store; ``(cells/s, breakdown)``."""
    with (
        tempfile.TemporaryDirectory(prefix="stpredict-bench-cache-") as cache,
        _open_session(
            slide, predictor, tissue, cache, read_workers=workers, batch_size=bs
        ) as session,
    ):
        engine = session.engine
        t, c = time.perf_counter(), time.process_time()
        for _ in engine.run(cells, center=center):
            pass
        dt, dc = time.perf_counter() - t, time.process_time() - c
        st = engine.stats
        assert st.cells_predicted == len(cells), (st.cells_predicted, len(cells))
        return len(cells) / dt, {
            "total_s": round(dt, 3),
            "cpu_s": round(dc, 3),
            "cells_per_cpu_s": round(len(cells) / dc, 2),
            "wait_s": round(st.wait_s, 3),
            "predict_s": round(st.predict_s, 3),
            "read_s_summed": round(st.read_s, 3),
            "write_s": round(st.write_s, 3),
            "tiles_decoded": st.tiles_decoded,
            "tiles_reused": st.tiles_reused,
            "tile_cache_peak_mb": round(st.tile_cache_peak_bytes / 2**20, 1),
            "write_buffer_peak_mb": round(st.write_buffer_peak_bytes / 2**20, 1),
            "resize_device": engine.resize_device or "pillow (reader threads)",
        }


def _cells(slide, grid, tissue, n: int, sets: int) -> tuple[list[np.ndarray], tuple]:
    """``sets`` disjoint sets of ``n`` tissue cells, nearest the slide centre first."""
    from napari_stpredict.inference import order_cells

    centre = (slide.shape[0] / 2, slide.shape[1] / 2)
    ordered = order_cells(np.argwhere(tissue), grid, centre)
    n = min(n, len(ordered) // sets)
    return [ordered[k * n : (k + 1) * n] for k in range(sets)], centre


# --------------------------------------------------------------------------- feed + decode
def resize_share(slide, grid, cells: np.ndarray) -> dict:
    """How many of the cells' patches go through Pillow's resize (the rest: stored pixels).

    ``Slide.read_resampled`` returns the stored pixels unchanged when the patch is read at its
    level's own scale from integral pixel offsets; counted here by wrapping ``Image.resize``
    while the engine's reader cuts the patches once.
    """
    from PIL import Image

    from napari_stpredict.slide.patches import TileCache, read_patch_rects

    rects = grid.cell_rects_px(cells)
    rects[:, 2:] -= rects[:, :2]
    calls = [0]
    real = Image.Image.resize

    def counting(self, *a, **kw):
        calls[0] += 1
        return real(self, *a, **kw)

    Image.Image.resize = counting
    try:
        read_patch_rects(slide, rects, grid.patch_px, cache=TileCache(slide))
    finally:
        Image.Image.resize = real
    origins = grid.cell_rects_px(cells)[:, :2]
    return {
        "cells": len(cells),
        "resized": calls[0],
        "stored_pixels": len(cells) - calls[0],
        "integral_origins": int(np.all(origins == np.round(origins), axis=1).sum()),
        "cell_px": grid.cell_px,
        "stride_px": grid.stride_px,
    }


def feed(args, slide, grid, tissue, genes: list[str]) -> dict:
    zero = ZeroModel(genes, grid.patch_px, grid.patch_um)
    n = args.feed_cells
    (cells, warm), centre = _cells(slide, grid, tissue, n, 2)
    out = {"cells": len(cells), "genes": len(genes), "mpp": slide.mpp, "runs": []}
    out["resize"] = resize_share(slide, grid, cells)
    print(f"  mpp {slide.mpp}: {out['resize']}", flush=True)
    for workers in args.read_workers:
        engine_run(slide, zero, grid, tissue, warm[:256], workers=workers, bs=64, center=centre)
        dec = decode_limit(slide, grid, cells, workers)
        rates = []
        details = []
        for _ in range(2):
            rate, detail = engine_run(
                slide, zero, grid, tissue, cells, workers=workers, bs=64, center=centre
            )
            rates.append(rate)
            details.append(detail)
        row = {
            "read_workers": workers,
            "decode_limit": dec,
            "feed_cells_per_s": [round(r, 1) for r in rates],
            "feed_over_decode": round(max(rates) / dec["cells_per_s"], 3),
            # CPU time (what the load cannot hide): cells per CPU-second, feed ÷ decode
            "feed_over_decode_cpu": round(
                max(d["cells_per_cpu_s"] for d in details) / dec["cells_per_cpu_s"], 3
            ),
            "breakdown": details,
        }
        print(f"  feed {row}", flush=True)
        out["runs"].append(row)
    return out


def feed_at_mpp(args, workdir: Path, mpp: float, genes: list[str], meta) -> dict:
    """The feed table on the same mosaic pixels written with another declared µm/px.

    At 0.5 µm/px a 112 µm patch is 224 level-0 px = the model's 224 px: patches are read at the
    level's own scale and, where the grid's origins are integral, returned without resizing.
    """
    from napari_stpredict.inference import TileGrid
    from napari_stpredict.slide import open_slide, tissue_mask

    path = build_mosaics(workdir, [args.mosaic], mpp, tag=f"_mpp{mpp:g}")[args.mosaic]
    with open_slide(path) as slide:  # the file's own (declared) µm/px
        grid = TileGrid.for_slide(slide, meta)
        tissue = grid.tissue_cells(tissue_mask(slide), 0.2)
        row = {
            "slide": path.name,
            "declared_mpp": mpp,
            "grid": list(grid.shape),
            "tissue_cells": int(tissue.sum()),
        }
        row.update(feed(args, slide, grid, tissue, genes))
    return row


def _feed_mpps(text: str) -> list[float | None]:
    """``native,0.5`` → ``[None, 0.5]`` (``native`` = C2's own µm/px)."""
    return [None if v.strip() == "native" else float(v) for v in text.split(",") if v.strip()]


# --------------------------------------------------------------------------- store layouts
def _buffered_write(store, todo: np.ndarray, vals: np.ndarray) -> float:
    """Seconds to write ``vals`` of cells ``todo`` as the engine does: batches of 64 into a
    ``WriteBuffer``, each block written whole once."""
    from napari_stpredict.inference.store import WriteBuffer

    buf = WriteBuffer(store, todo)
    t = time.perf_counter()
    for k in range(0, len(todo), 64):
        buf.add(todo[k : k + 64], vals[k : k + 64])
    buf.flush()
    return time.perf_counter() - t


def store_layouts(args, grid, n_genes: int) -> list[dict]:
    """Buffered whole-block writes (direct chunk files, and through zarr) and one-gene reads
    for several chunk layouts."""
    from napari_stpredict.inference import store as store_mod
    from napari_stpredict.inference.engine import order_cells
    from napari_stpredict.inference.store import PredictionStore

    genes = [f"G{k}" for k in range(n_genes)]
    gh, gw = grid.shape
    ii, jj = np.mgrid[0:gh, 0:gw]
    cells = np.stack([ii.ravel(), jj.ravel()], 1)[: args.layout_cells * 4]
    rows = []
    saved = (store_mod.GENE_CHUNK, store_mod.CELL_CHUNK)
    try:
        for spec in args.layouts:
            g, c = (int(v) for v in spec.split("x"))
            store_mod.GENE_CHUNK, store_mod.CELL_CHUNK = g, c
            with tempfile.TemporaryDirectory(prefix="stpredict-bench-store-") as root:
                st = PredictionStore.open(root, key="layout", genes=genes, grid=grid)
                todo = order_cells(cells, grid, None, block=st.block_shape)[: args.layout_cells]
                vals = np.random.default_rng(0).random((len(todo), n_genes), np.float32)
                # the engine's way: batches of 64 into a WriteBuffer, whole blocks written
                t_buf = _buffered_write(st, todo, vals)
                # the same, each chunk through zarr's own pipeline (before direct chunk writes)
                st3 = PredictionStore.open(root, key="layout3", genes=genes, grid=grid)
                st3.chunk_files.clear()
                t_zarr = _buffered_write(st3, todo, vals)
                # batch by batch, no buffer (each batch rewrites the chunks it touches)
                st2 = PredictionStore.open(root, key="layout2", genes=genes, grid=grid)
                t = time.perf_counter()
                for k in range(0, len(todo), 64):
                    st2.write(todo[k : k + 64], vals[k : k + 64])
                t_direct = time.perf_counter() - t
                reads = []
                for gi in (0, n_genes // 2, n_genes - 1):
                    t = time.perf_counter()
                    st.read(gi)
                    reads.append(time.perf_counter() - t)
                rows.append(
                    {
                        "layout": f"{g} genes × {c}×{c} cells",
                        "cells": len(todo),
                        "buffered_ms_per_1000_cells": round(1000 * t_buf / len(todo) * 1000, 1),
                        "buffered_through_zarr_ms_per_1000_cells": round(
                            1000 * t_zarr / len(todo) * 1000, 1
                        ),
                        "per_batch_ms_per_1000_cells": round(1000 * t_direct / len(todo) * 1000, 1),
                        "read_one_gene_ms": round(1000 * statistics.median(reads), 1),
                        "grid": [gh, gw],
                    }
                )
                print(f"  store {rows[-1]}", flush=True)
    finally:
        store_mod.GENE_CHUNK, store_mod.CELL_CHUNK = saved
    return rows


# --------------------------------------------------------------------------- engine ÷ raw
def _raw_patches(slide, grid, pred, cells: np.ndarray) -> np.ndarray:
    """The cells' patches in memory, every field of view the model takes (patch, then e.g. its
    context field around the same centre), read like the engine: ``(n, P, P, 3)`` or
    ``(n, F, P, P, 3)``."""
    from napari_stpredict.inference.protocol import fields_of

    px = grid.patch_px
    fields = fields_of(pred, patch_um=grid.patch_um)
    out = []
    for y0, x0, y1, x1 in grid.cell_rects_px(cells):
        cy, cx, side = (y0 + y1) / 2, (x0 + x1) / 2, y1 - y0
        views = []
        for um, _ in fields:
            s = side * um / grid.patch_um
            views.append(slide.read_resampled(cy - s / 2, cx - s / 2, s, s, out_shape=(px, px)))
        out.append(views[0] if len(views) == 1 else np.stack(views))
    return np.stack(out)


def throughput(args: argparse.Namespace, slide, grid, tissue, model: Path) -> list[dict]:
    import torch

    from napari_stpredict.model import Predictor

    results = []
    for threads in args.torch_threads:
        if threads:
            torch.set_num_threads(threads)
        for bs in args.batch_sizes:
            pred = Predictor(model, device=args.device, batch_size=bs or None)
            bs = pred.batch_size
            sets, centre = _cells(slide, grid, tissue, args.cells, args.repeats + 1)
            n = len(sets[0]) - len(sets[0]) % bs or len(sets[0])
            sets = [c[:n] for c in sets]
            patches = _raw_patches(slide, grid, pred, sets[0][:bs])

            def sync(pred=pred) -> None:
                if pred.device.type == "cuda":
                    torch.cuda.synchronize()

            def raw_rate(pred=pred, patches=patches, n=n, bs=bs, sync=sync) -> tuple[float, float]:
                sync()
                t, c = time.perf_counter(), time.process_time()
                for _ in range(max(n // bs, 1)):
                    pred.predict(patches)
                sync()
                k = max(n // bs, 1) * len(patches)
                return k / (time.perf_counter() - t), k / (time.process_time() - c)

            pred.predict(patches)  # warm-up: allocator, autotuning, page cache
            for workers in args.read_workers:
                engine_run(
                    slide,
                    pred,
                    grid,
                    tissue,
                    sets[-1][: 2 * bs],
                    workers=workers,
                    bs=bs,
                    center=centre,
                )
                raw, eng, parts, raw_cpu = [], [], [], []
                for r in range(args.repeats):
                    wall, cpu = raw_rate()
                    raw.append(wall)
                    raw_cpu.append(cpu)
                    rate, detail = engine_run(
                        slide, pred, grid, tissue, sets[r], workers=workers, bs=bs, center=centre
                    )
                    eng.append(rate)
                    parts.append(detail)
                    print(
                        f"  threads {torch.get_num_threads()} readers {workers} bs {bs} "
                        f"repeat {r}: raw {raw[-1]:.2f}/s engine {eng[-1]:.2f}/s {detail}",
                        flush=True,
                    )
                ratio_total = (sum(eng) / len(eng)) / (sum(raw) / len(raw))
                eng_cpu = [d["cells_per_cpu_s"] for d in parts]
                ratio_cpu = (sum(eng_cpu) / len(eng_cpu)) / (sum(raw_cpu) / len(raw_cpu))
                results.append(
                    {
                        "device": str(pred.device),
                        "device_name": torch.cuda.get_device_name(pred.device)
                        if pred.device.type == "cuda"
                        else platform.processor() or platform.machine(),
                        "amp": str(getattr(pred, "_amp", None)),
                        "torch_threads": torch.get_num_threads(),
                        "read_workers": workers,
                        "batch_size": bs,
                        "cells_per_repeat": n,
                        "raw_cells_per_s": [round(v, 2) for v in raw],
                        "engine_cells_per_s": [round(v, 2) for v in eng],
                        "ratio": [round(e / r, 3) for e, r in zip(eng, raw, strict=True)],
                        "ratio_of_means": round(ratio_total, 3),
                        # per CPU-second of this process: the engine's own work shows even
                        # when other jobs load the machine
                        "raw_cells_per_cpu_s": [round(v, 2) for v in raw_cpu],
                        "engine_cells_per_cpu_s": eng_cpu,
                        "ratio_cpu": round(ratio_cpu, 3),
                        "engine_breakdown": parts,
                    }
                )
            del pred
    return results


def full_map(args, slide, grid, tissue, genes) -> dict:
    """Time to the full tissue map of the slide with the zero-cost model (feed-limited)."""
    zero = ZeroModel(genes, grid.patch_px, grid.patch_um)
    with (
        tempfile.TemporaryDirectory(prefix="stpredict-bench-cache-") as cache,
        _open_session(
            slide, zero, tissue, cache, read_workers=max(args.read_workers), batch_size=64
        ) as session,
    ):
        summary = session.engine.predict_all_tissue()
        st = session.engine.stats
    return {
        "model": f"zero-cost, {len(genes)} genes",
        "tissue_cells": summary.tissue,
        "seconds": round(summary.seconds, 1),
        "cells_per_s": round(summary.predicted / summary.seconds, 1),
        "tiles_decoded": st.tiles_decoded,
        "tiles_reused": st.tiles_reused,
        "write_s": round(st.write_s, 1),
    }


# --------------------------------------------------------------------------- memory
def rss_child(slide_path: str, model: str, mpp: float, device: str, batch_size: int | None) -> dict:
    """Run in a fresh process: whole-slide tissue prediction, peak RSS sampled every 20 ms."""
    import psutil

    from napari_stpredict.inference.session import open_session
    from napari_stpredict.model import Predictor

    proc = psutil.Process()
    if model == "zero":  # the CPU pipeline alone (decode, resize, store), paper-setting shapes
        pred = ZeroModel([f"G{k}" for k in range(785)], 224, 112.0)
        pred.batch_size = batch_size or 64
    else:
        pred = Predictor(model, device=device, batch_size=batch_size)
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.02)

    with tempfile.TemporaryDirectory(prefix="stpredict-bench-cache-") as cache:
        before = proc.memory_info().rss
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        # slide + automatic tissue mask (bounded: at most 2048 px a side) + store + engine
        session = open_session(slide_path=slide_path, predictor=pred, mpp=mpp, cache_dir=cache)
        t_mask = time.perf_counter() - t0
        after_mask = proc.memory_info().rss
        with session:
            summary = session.predict_all_tissue()
            stats = session.engine.stats
            shape, grid_shape = session.slide.shape, session.grid.shape
        stop.set()
        sampler.join()
    return {
        "slide": Path(slide_path).name,
        "slide_shape": list(shape),
        "grid": list(grid_shape),
        "tissue_cells": summary.tissue,
        "predicted": summary.predicted,
        "open_session_s": round(t_mask, 1),
        "rss_after_open_mb": round(after_mask / 2**20),
        "seconds": round(summary.seconds, 1),
        "cells_per_s": round(summary.predicted / summary.seconds, 2),
        "tile_cache_peak_mb": round(stats.tile_cache_peak_bytes / 2**20),
        "write_buffer_peak_mb": round(stats.write_buffer_peak_bytes / 2**20),
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
def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


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
        help="model for the memory runs: a file, 'same' (= --model), 'zero' (a zero-cost model: "
        "the time is the CPU pipeline's) or 'fast' (default: random weights, lite0, 64 px per "
        "112 µm, 250 genes — memory is about the slide, not the model)",
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--batch-sizes", type=_ints, default=[0], help="engine ÷ raw batch sizes (0 = default)"
    )
    ap.add_argument("--rss-batch-size", type=int, default=None)
    ap.add_argument("--cells", type=int, default=256, help="cells per timed engine ÷ raw run")
    ap.add_argument("--feed-cells", type=int, default=2048, help="cells per feed run")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--read-workers", type=_ints, default=[os.cpu_count() or 1], help="reader threads, e.g. 1,2"
    )
    ap.add_argument(
        "--torch-threads", type=_ints, default=[0], help="torch threads, e.g. 1,2 (0 = default)"
    )
    ap.add_argument(
        "--layouts",
        type=lambda t: [v for v in t.split(",") if v],
        default=["8x32", "32x16", "32x32", "32x64", "128x32"],
        help="store chunk layouts GENESxCELLS to measure ('' = skip)",
    )
    ap.add_argument("--layout-genes", type=_ints, default=[785, 3400])
    ap.add_argument("--layout-cells", type=int, default=4096)
    ap.add_argument(
        "--rss-sizes", default="1,4", help="mosaic sizes for the memory runs ('' = skip)"
    )
    ap.add_argument(
        "--mosaic", type=int, default=4, help="mosaic size for feed/store/ratio/full map (N×N)"
    )
    ap.add_argument(
        "--feed-mpps",
        type=_feed_mpps,
        default=[None],
        help="declared µm/px of the feed runs, e.g. 'native,0.5' (native = C2's 0.689; others: "
        "the same mosaic pixels written with that µm/px; 0.5 = patches at the stored scale)",
    )
    ap.add_argument("--skip", default="", help="parts to skip: feed,store,ratio,fullmap")
    ap.add_argument("--workdir", type=Path, help="where mosaics go (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    skip = {v.strip() for v in args.skip.split(",") if v.strip()}
    if not C2.exists():
        raise SystemExit(f"{C2}: real data not found (set STPREDICT_SHARED_DATA)")

    import torch

    from napari_stpredict.inference import TileGrid
    from napari_stpredict.model import Predictor
    from napari_stpredict.slide import open_slide, tissue_mask

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="stpredict-bench-engine-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        mpp = her2st_mpp()
        rss_sizes = [int(s) for s in args.rss_sizes.split(",") if s.strip()]
        sizes = sorted(set(rss_sizes) | {args.mosaic})
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
                "nice": os.nice(0),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            },
            "model": str(
                model if args.model else "random-weight CMRCNet, lite0, 224 px / 112 µm, 785 genes"
            ),
        }
        probe = Predictor(model, device="cpu")
        genes, meta = list(probe.genes), probe
        with open_slide(slides[args.mosaic], mpp=mpp) as slide:
            grid = TileGrid.for_slide(slide, meta)
            t0 = time.perf_counter()
            tissue = grid.tissue_cells(tissue_mask(slide), 0.2)
            result["slide"] = {
                "name": slides[args.mosaic].name,
                "shape": list(slide.shape),
                "grid": list(grid.shape),
                "tissue_cells": int(tissue.sum()),
                "tissue_mask_s": round(time.perf_counter() - t0, 2),
                "cell_px": round(grid.cell_px, 2),
                "patch_px": grid.patch_px,
            }
            del probe, meta
            if "feed" not in skip and None in args.feed_mpps:
                print("feed rate (zero-cost model) and decode limit, same cells", flush=True)
                result["feed"] = feed(args, slide, grid, tissue, genes)
            if "feed" not in skip and any(m is not None for m in args.feed_mpps):
                result["feed_by_mpp"] = [
                    {"slide": slides[args.mosaic].name, "declared_mpp": mpp, **result["feed"]}
                    if m is None
                    else feed_at_mpp(
                        args, workdir, m, genes, ZeroModel(genes, grid.patch_px, grid.patch_um)
                    )
                    for m in args.feed_mpps
                    if m is not None or "feed" in result
                ]
            if "store" not in skip and args.layouts:
                print("store chunk layouts: buffered writes and one-gene reads", flush=True)
                result["store"] = [
                    row for g in args.layout_genes for row in store_layouts(args, grid, g)
                ]
            if "ratio" not in skip:
                print("engine ÷ raw model", flush=True)
                result["throughput"] = throughput(args, slide, grid, tissue, model)
            if "fullmap" not in skip:
                print("full tissue map, zero-cost model", flush=True)
                result["full_map"] = full_map(args, slide, grid, tissue, genes)
                print(f"  {result['full_map']}", flush=True)
        if rss_sizes:
            print("peak memory of whole-slide tissue prediction", flush=True)
            if args.rss_model == "same":
                rss_model, label = model, result["model"]
            elif args.rss_model == "zero":
                rss_model, label = "zero", "zero-cost model, 785 genes, 224 px / 112 µm"
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
