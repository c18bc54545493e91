"""Pyramid writers: round trips, streaming, atomic writes, and a 40k-pixel pyramid."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_stpredict.errors import Cancelled, StPredictError
from napari_stpredict.progress import CancelToken
from napari_stpredict.slide import open_slide, write_ome_tiff, write_ome_zarr
from napari_stpredict.slide.base import LevelSource, Slide, block_mean, source_to_dask
from napari_stpredict.slide.writers import pyramid_shapes


def _spans(a0: int, a1: int, period: int) -> list[tuple[int, int, int]]:
    out, a = [], a0
    while a < a1:
        s = a % period
        n = min(a1 - a, period - s)
        out.append((s, s + n, a - a0))
        a += n
    return out


class MosaicSource(LevelSource):
    """A lazy level tiling one image ``reps`` times (no big array is ever built)."""

    def __init__(self, img: np.ndarray, reps: tuple[int, int]) -> None:
        self.img = img
        self.ph, self.pw = img.shape[:2]
        self.shape = (self.ph * reps[0], self.pw * reps[1])
        self.chunks = (512, 512)
        self.max_rows = 0

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        self.max_rows = max(self.max_rows, y1 - y0)
        out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
        for sy0, sy1, dy in _spans(y0, y1, self.ph):
            for sx0, sx1, dx in _spans(x0, x1, self.pw):
                out[dy : dy + sy1 - sy0, dx : dx + sx1 - sx0] = self.img[sy0:sy1, sx0:sx1]
        return out

    def to_dask(self, name: str):
        return source_to_dask(self, name)


@pytest.fixture(scope="module")  # 275 MB of pixels: not held for the rest of the run
def c2_pixels(her2st_dir: Path) -> np.ndarray:
    import imagecodecs

    return imagecodecs.imread(her2st_dir / "images" / "C2.jpg")


#: the pyramid is ~190 MB; ask for twice that (its temporary name, then the rename)
BIG_PYRAMID_FREE_BYTES = 400 * 2**20


@pytest.fixture(scope="module")
def big_pyramid(c2_pixels: np.ndarray, tmp_path_factory: pytest.TempPathFactory):
    """A 4 × 4 mosaic of HER2ST C2 (39 644 × 37 096 px) written as a JPEG OME-TIFF pyramid.

    Deleted when this module's tests end, so it does not hold disk for the rest of the run.
    """
    folder = tmp_path_factory.mktemp("big")
    free = shutil.disk_usage(folder).free
    if free < BIG_PYRAMID_FREE_BYTES:
        pytest.skip(f"{folder}: {free / 2**20:.0f} MB free, the 40k-px pyramid needs ~400 MB")
    source = MosaicSource(c2_pixels, (4, 4))
    mosaic = Slide(Path("C2-mosaic-4x4"), format="image", sources=[source], mpp=1.0)
    calls: list[tuple[int, int | None]] = []
    dst = folder / "mosaic.ome.tif"
    write_ome_tiff(
        mosaic, dst, tile=512, compression="jpeg", progress=lambda d, t, m="": calls.append((d, t))
    )
    yield {"path": dst, "source": source, "mosaic": mosaic, "progress": calls}
    shutil.rmtree(folder, ignore_errors=True)


def test_big_pyramid_structure_and_streaming(big_pyramid) -> None:
    src = big_pyramid["source"]
    assert src.shape == (39644, 37096)
    assert src.max_rows <= 512  # the writer only ever asked for one row of tiles
    calls = big_pyramid["progress"]
    total = sum(-(-h // 512) for h, _ in pyramid_shapes(src.shape, 512))
    assert [d for d, _ in calls] == list(range(1, total + 1)) and calls[-1][1] == total
    with tifffile.TiffFile(big_pyramid["path"]) as tf:
        assert tf.is_ome and len(tf.pages) == 1  # all reductions live in SubIFDs
        page = tf.pages[0]
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (512, 512)
        assert len(page.subifds) == len(pyramid_shapes(src.shape, 512)) - 1


def test_big_pyramid_open_reads_only_what_is_asked(big_pyramid) -> None:
    with open_slide(big_pyramid["path"]) as slide:
        assert slide.format == "ome-tiff" and slide.mpp == pytest.approx(1.0)
        assert slide.level_shapes == pyramid_shapes((39644, 37096), 512)
        assert slide.downsamples == [2.0**k for k in range(len(slide.levels))]
        stored = slide._sources
        opened = [lv.tiles_read for lv in stored]
        assert sum(opened) == 0  # the probe decode at open is not counted

        # direct path: one aligned tile -> exactly one tile decoded, on level 0 only
        tile = slide.read_region(0, 20 * 512, 30 * 512, 512, 512)
        assert [lv.tiles_read for lv in stored] == [1] + [0] * (len(stored) - 1)

        # dask/zarr path (what napari slices): count tifffile decodes on level 0
        keyframe = stored[0].planes[0].page.keyframe
        decode = keyframe.decode
        seen: list[int] = []

        def counting(data, index, **kw):
            seen.append(index)
            return decode(data, index, **kw)

        keyframe.__dict__["decode"] = counting
        try:
            via_dask = slide.levels[0][20 * 512 : 21 * 512, 30 * 512 : 31 * 512].compute()
        finally:
            keyframe.__dict__["decode"] = decode
        assert seen == [20 * 73 + 30]  # 73 tiles per row: just that tile
        assert np.array_equal(via_dask, tile)

        # pixels round-trip (JPEG q90: close)
        ref = big_pyramid["source"].read(20 * 512, 21 * 512, 30 * 512, 31 * 512)
        diff = np.abs(tile.astype(int) - ref)
        assert diff.mean() < 2.5 and np.percentile(diff, 99) < 15
        # a coarse level: block means of the mosaic, also close
        lv3 = slide.read_region(3, 100, 200, 128, 128)
        ref3 = block_mean(big_pyramid["source"].read(800, 800 + 1024, 1600, 1600 + 1024), 8)
        assert np.abs(lv3.astype(int) - ref3).mean() < 2.5


@pytest.fixture(scope="module")
def cmu(wsi_dir: Path) -> Slide:
    return open_slide(wsi_dir / "cmu_small_region.svs")


def _chain(img: np.ndarray, k: int) -> np.ndarray:
    for _ in range(k):
        img = block_mean(img, 2)
    return img


def test_deflate_round_trip_is_exact(cmu: Slide, tmp_path: Path) -> None:
    full = cmu.read_region(0, 0, 0, *cmu.shape)
    out = write_ome_tiff(cmu, tmp_path / "cmu.ome.tif", tile=256, compression="deflate")
    with open_slide(out) as back:
        assert back.mpp == pytest.approx(0.499) and back.format == "ome-tiff"
        assert back.metadata["mpp_source"] == "OME PhysicalSizeX"
        assert back.levels[0].chunksize == (256, 256, 3)
        assert back.level_shapes == pyramid_shapes(cmu.shape, 256)
        for k, (h, w) in enumerate(back.level_shapes):
            assert np.array_equal(back.read_region(k, 0, 0, h, w), _chain(full, k))
    z = write_ome_zarr(cmu, tmp_path / "cmu.zarr", tile=256)
    with open_slide(z) as back:
        assert back.format == "ome-zarr" and back.mpp == pytest.approx(0.499)
        for k, (h, w) in enumerate(back.level_shapes[: len(pyramid_shapes(cmu.shape, 256))]):
            assert np.array_equal(back.read_region(k, 0, 0, h, w), _chain(full, k))
            assert np.array_equal(back.levels[k].compute(), _chain(full, k))
    attrs = json.loads((z / ".zattrs").read_text())["multiscales"][0]
    assert attrs["version"] == "0.4" and [a["name"] for a in attrs["axes"]] == ["c", "y", "x"]
    assert attrs["axes"][2]["unit"] == "micrometer"
    assert attrs["datasets"][1]["coordinateTransformations"][0]["scale"] == pytest.approx(
        [1, 0.998, 0.998]
    )


def test_jpeg_round_trip_is_close_and_mpp_can_be_set(
    c2_pixels: np.ndarray, her2st_dir: Path, tmp_path: Path
) -> None:
    with open_slide(her2st_dir / "images" / "C2.jpg") as src:
        assert src.mpp is None
        out = write_ome_tiff(src, tmp_path / "c2.ome.tif", compression="jpeg", mpp=1.05)
    with open_slide(out) as back:
        assert back.mpp == pytest.approx(1.05) and back.shape == (9911, 9274)
        got = back.read_region(0, 3000, 2000, 1024, 1024)
        diff = np.abs(got.astype(int) - c2_pixels[3000:4024, 2000:3024])
        assert diff.mean() < 2.5
    # no mpp anywhere: written without a physical size, downsamples still exact
    with open_slide(her2st_dir / "images" / "A2_dark.png") as src:
        out = write_ome_tiff(src, tmp_path / "a2.ome.tif", tile=256)
    with open_slide(out) as back:
        assert back.mpp is None and back.downsamples[:3] == [1.0, 2.0, 4.0]


def test_interrupted_write_leaves_nothing(cmu: Slide, tmp_path: Path) -> None:
    token = CancelToken()

    def progress(done: int, total: int | None, message: str = "") -> None:
        if done == 3:
            token.cancel()

    for writer, name in ((write_ome_tiff, "x.ome.tif"), (write_ome_zarr, "x.zarr")):
        with pytest.raises(Cancelled):
            writer(cmu, tmp_path / name, tile=256, progress=progress, cancel=token)
        assert list(tmp_path.iterdir()) == []  # no truncated output, no temporaries
        token = CancelToken()


def test_overwrite_and_bad_options(cmu: Slide, tmp_path: Path) -> None:
    dst = tmp_path / "y.ome.tif"
    dst.write_bytes(b"keep me")
    with pytest.raises(StPredictError, match="already exists"):
        write_ome_tiff(cmu, dst)
    assert dst.read_bytes() == b"keep me"
    write_ome_tiff(cmu, dst, overwrite=True, tile=512)
    assert open_slide(dst).shape == cmu.shape
    with pytest.raises(StPredictError, match="multiple of 16"):
        write_ome_tiff(cmu, tmp_path / "a.ome.tif", tile=100)
    with pytest.raises(StPredictError, match="compression 'lzw'"):
        write_ome_tiff(cmu, tmp_path / "a.ome.tif", compression="lzw")
    with pytest.raises(StPredictError, match="compression 'jpeg'"):
        write_ome_zarr(cmu, tmp_path / "a.zarr", compression="jpeg")
    with pytest.raises(StPredictError, match="mpp"):
        write_ome_zarr(cmu, tmp_path / "a.zarr", mpp=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["y.ome.tif"]
