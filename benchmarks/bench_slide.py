"""Slide layer benchmarks: tile reads vs raw tifffile, open latency/RSS, convert throughput.

1. Tile read throughput, as a ratio within one run: every tile of level 0 read through
   ``Slide.read_region`` (one native tile per call) vs tifffile's own decode of the same tiles
   (``FileHandle`` read + ``TiffPage.decode``, no Slide code), single thread, alternating tile
   by tile (both see the same machine load), median of repeats. Also reported for information: the dask/zarr path napari uses
   (``Slide.levels[0][tile].compute()``) and ``read_resampled`` 224-px patches.
   Slides: ``cmu_small_region.svs`` (240-px JPEG tiles) and the 4×4 C2 mosaic pyramid
   (512-px JPEG tiles).
2. Open latency and RSS growth of the 4×4 mosaic of HER2ST C2 (39 644 × 37 096 px, JPEG OME-TIFF
   pyramid, built with ``write_ome_tiff`` in a temporary folder): a fresh process per repeat;
   RSS after imports vs after ``open_slide`` + reading one tile.
3. ``stpredict convert`` of that mosaic to OME-TIFF (jpeg), and of ``C2.jpg`` to OME-TIFF (jpeg)
   and OME-Zarr (deflate) (``--zarr-mosaic``: the mosaic to OME-Zarr too): MB/s of level-0 RGB
   pixels and the child's peak RSS (VmHWM).
4. For information: a napari-sized view (4 × 8 tiles, one dask compute) through
   ``Slide.levels`` (tifffile aszarr → zarr → dask) vs the same dask graph over the direct tile
   reader.

    /work/venv/bin/python benchmarks/bench_slide.py [--repeats 5] [--workdir DIR] [--zarr-mosaic] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("STPREDICT_SHARED_DATA", HERE.parent.parent / "shared" / "data"))
C2 = SHARED / "her2st" / "images" / "C2.jpg"
CMU = SHARED / "wsi" / "cmu_small_region.svs"
PY = sys.executable


def _spans(a0: int, a1: int, period: int) -> list[tuple[int, int, int]]:
    """Pieces of [a0, a1) on a periodic axis: (source start, source end, output offset)."""
    out, a = [], a0
    while a < a1:
        s = a % period
        n = min(a1 - a, period - s)
        out.append((s, s + n, a - a0))
        a += n
    return out


def build_mosaic(dst: Path) -> float:
    """Write the 4×4 C2 mosaic pyramid; return seconds."""
    import imagecodecs

    from napari_stpredict.slide import write_ome_tiff
    from napari_stpredict.slide.base import LevelSource, Slide, source_to_dask

    img = imagecodecs.imread(C2)

    class Mosaic(LevelSource):
        def __init__(self) -> None:
            self.shape = (img.shape[0] * 4, img.shape[1] * 4)
            self.chunks = (512, 512)

        def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
            out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
            for sy0, sy1, dy in _spans(y0, y1, img.shape[0]):
                for sx0, sx1, dx in _spans(x0, x1, img.shape[1]):
                    out[dy : dy + sy1 - sy0, dx : dx + sx1 - sx0] = img[sy0:sy1, sx0:sx1]
            return out

        def to_dask(self, name: str):
            return source_to_dask(self, name)

    t = time.perf_counter()
    write_ome_tiff(
        Slide(Path("C2x4"), format="image", sources=[Mosaic()], mpp=0.689), dst, tile=512
    )
    return time.perf_counter() - t


# --------------------------------------------------------------------------- 1. tile reads
def tile_reads(path: Path, repeats: int, max_tiles: int = 400) -> dict:
    import tifffile

    from napari_stpredict.slide import open_slide

    slide = open_slide(path)
    tf = tifffile.TiffFile(path)
    page = tf.series[0].levels[0].keyframe
    fh = tf.filehandle
    th, tw = page.tilelength, page.tilewidth
    nty, ntx = -(-page.imagelength // th), -(-page.imagewidth // tw)
    rng = np.random.default_rng(0)
    idx = np.arange(nty * ntx)
    if len(idx) > max_tiles:
        idx = np.sort(rng.choice(idx, max_tiles, replace=False))
    kw = {"jpegtables": page.jpegtables} if page.jpegtables is not None else {}
    h0, w0 = slide.shape

    def raw_one(i: int) -> None:
        fh.seek(page.dataoffsets[i])
        data = fh.read(page.databytecounts[i])
        page.decode(data, i, **kw)

    def slide_one(i: int) -> None:
        ty, tx = divmod(i, ntx)
        slide.read_region(0, ty * th, tx * tw, min(th, h0 - ty * th), min(tw, w0 - tx * tw))

    def raw() -> None:
        for i in idx:
            raw_one(int(i))

    def via_slide() -> None:
        for i in idx:
            slide_one(int(i))

    def paired() -> tuple[float, float]:
        # raw and Slide alternate tile by tile: both see the same machine load
        t_raw = t_slide = 0.0
        for i in idx:
            t = time.perf_counter()
            raw_one(int(i))
            t1 = time.perf_counter()
            slide_one(int(i))
            t2 = time.perf_counter()
            t_raw += t1 - t
            t_slide += t2 - t1
        return t_raw, t_slide

    def via_dask() -> None:
        lv = slide.levels[0]
        for i in idx:
            ty, tx = divmod(int(i), ntx)
            lv[ty * th : (ty + 1) * th, tx * tw : (tx + 1) * tw].compute(scheduler="sync")

    centres = rng.uniform(0, 1, (len(idx), 2)) * (np.array(slide.shape) - 300) + 150

    def patches() -> None:
        for cy, cx in centres:
            slide.read_resampled(cy - 112.2, cx - 112.2, 224.4, 224.4, out_shape=(224, 224))

    from napari_stpredict.slide.base import source_to_dask

    direct = source_to_dask(slide._sources[0], "bench-direct")
    vy, vx = min(4, nty), min(8, ntx)  # a napari-sized view: 4 x 8 tiles, one compute

    def view_zarr() -> None:
        slide.levels[0][: vy * th, : vx * tw].compute()

    def view_direct() -> None:
        direct[: vy * th, : vx * tw].compute()

    names = ("dask", "resampled", "view_zarr", "view_direct")
    times: dict[str, list[float]] = {k: [] for k in ("raw", "slide", *names)}
    for fn in (raw, via_slide, view_zarr, view_direct):  # warm caches
        fn()
    fns = (via_dask, patches, view_zarr, view_direct)
    for _ in range(repeats):
        t_raw, t_slide = paired()
        times["raw"].append(t_raw)
        times["slide"].append(t_slide)
        for name, fn in zip(names, fns, strict=True):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    n = len(idx)
    return {
        "slide": path.name,
        "tile": [th, tw],
        "compression": slide.metadata.get("compression"),
        "tiles": n,
        "raw_tiles_per_s": n / med["raw"],
        "slide_tiles_per_s": n / med["slide"],
        "dask_tiles_per_s": n / med["dask"],
        "resampled_patches_per_s": n / med["resampled"],
        "ratio_slide_vs_raw": med["raw"] / med["slide"],
        "ratio_dask_vs_raw": med["raw"] / med["dask"],
        "view_tiles": vy * vx,
        "view_zarr_s": med["view_zarr"],
        "view_direct_s": med["view_direct"],
    }


# --------------------------------------------------------------------------- 2. open
_OPEN_CHILD = r"""
import json, sys, time
def rss():
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) * 1024
import numpy, dask.array, zarr, tifffile, PIL.Image
from napari_stpredict.slide import open_slide
r0 = rss(); t0 = time.perf_counter()
s = open_slide(sys.argv[1])
t1 = time.perf_counter(); r1 = rss()
tile = s.read_region(0, 10240, 15360, 512, 512)
t2 = time.perf_counter(); r2 = rss()
print(json.dumps({"open_s": t1 - t0, "first_tile_s": t2 - t1, "rss_open_mb": (r1 - r0) / 1e6,
                  "rss_open_tile_mb": (r2 - r0) / 1e6, "levels": len(s.levels), "shape": list(s.shape)}))
"""


def open_cost(path: Path, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            [PY, "-c", _OPEN_CHILD, str(path)], capture_output=True, text=True, check=True
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    keys = ("open_s", "first_tile_s", "rss_open_mb", "rss_open_tile_mb")
    return {
        **{k: statistics.median(r[k] for r in runs) for k in keys},
        "max_open_s": max(r["open_s"] for r in runs),
        "shape": runs[0]["shape"],
        "levels": runs[0]["levels"],
    }


# --------------------------------------------------------------------------- 3. convert
# peak RSS from VmHWM: ru_maxrss would include the parent's peak inherited across exec
_CONVERT_CHILD = r"""
import sys, time
from napari_stpredict.cli import main
t = time.perf_counter()
rc = main(sys.argv[1:])
dt = time.perf_counter() - t
hwm = [int(x.split()[1]) * 1024 for x in open('/proc/self/status') if x.startswith('VmHWM:')][0]
print("RESULT", rc, dt, hwm)
"""


def convert_cost(src: Path, dst: Path, *extra: str) -> dict:
    from napari_stpredict.slide import open_slide

    with open_slide(src) as s:
        h, w = s.shape
    out = subprocess.run(
        [PY, "-c", _CONVERT_CHILD, "convert", str(src), str(dst), "--overwrite", *extra],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT")][-1].split()
    rc, secs, peak = int(line[1]), float(line[2]), int(line[3])
    assert rc == 0, out.stderr
    size = sum(p.stat().st_size for p in dst.rglob("*")) if dst.is_dir() else dst.stat().st_size
    return {
        "src": src.name,
        "dst": dst.name,
        "shape": [h, w],
        "seconds": secs,
        "mb_per_s": h * w * 3 / 1e6 / secs,
        "peak_rss_mb": peak / 1e6,
        "output_mb": size / 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument(
        "--zarr-mosaic",
        action="store_true",
        help="also convert the 4x4 mosaic to OME-Zarr (slow: deflate)",
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="stpredict-bench-slide-"))
    work.mkdir(parents=True, exist_ok=True)
    mosaic = work / "c2_mosaic_4x4.ome.tif"
    result: dict = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "command": " ".join([Path(PY).name, *sys.argv]),
    }
    if not mosaic.exists():
        result["mosaic_build_s"] = build_mosaic(mosaic)
    print("tile reads ...", file=sys.stderr)
    result["tile_reads"] = [tile_reads(CMU, args.repeats), tile_reads(mosaic, args.repeats)]
    print("open ...", file=sys.stderr)
    result["open"] = open_cost(mosaic, args.repeats)
    print("convert ...", file=sys.stderr)
    conv = [
        convert_cost(mosaic, work / "out.ome.tif"),
        convert_cost(C2, work / "c2.ome.tif", "--mpp", "0.689"),
        convert_cost(C2, work / "c2.zarr", "--mpp", "0.689"),
    ]
    if args.zarr_mosaic:
        conv.append(convert_cost(mosaic, work / "out.zarr"))
    result["convert"] = conv
    result["self_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
