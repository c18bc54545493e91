"""open_slide on every real slide, bad input, pixel equality with tifffile, read_resampled."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_stpredict.errors import SlideError, StPredictError
from napari_stpredict.slide import Slide, open_slide
from napari_stpredict.slide.base import block_mean

# file -> (format, stored level shapes (h, w), mpp)
WSI_EXPECTED = {
    "cmu_small_region.svs": ("svs", [(2967, 2220)], 0.499),
    "small.svs": ("svs", [(16, 16)], 0.499),
    # both TIFFs carry a 72-dpi resolution in px/cm: used as stated (like OpenSlide), flagged
    "boxes.tiff": ("tiff", [(250, 300), (125, 150), (62, 75), (31, 37)], 1e4 * 524288 / 14861707),
    "small_HE_levels.tiff": (
        "tiff",
        [(250, 300), (125, 150), (62, 75), (31, 37)],
        1e4 * 151551421 / 4294967295,
    ),
}
BROKEN = ["unreadable.svs", "unopenable.tiff", "broken.svs"]


def test_every_real_slide_is_covered(wsi_dir: Path) -> None:
    found = {p.name for p in wsi_dir.iterdir() if p.is_file()}
    assert found == set(WSI_EXPECTED)
    assert {p.name for p in (wsi_dir / "broken").iterdir()} == set(BROKEN)


@pytest.mark.parametrize("name", sorted(WSI_EXPECTED))
def test_real_slide_levels_and_mpp(wsi_dir: Path, name: str) -> None:
    fmt, shapes, mpp = WSI_EXPECTED[name]
    with open_slide(wsi_dir / name) as slide:
        assert slide.format == fmt
        assert slide.level_shapes[: len(shapes)] == shapes
        assert slide.metadata["stored_levels"] == len(shapes)
        assert slide.shape == shapes[0]
        if mpp is None:
            assert slide.mpp is None
            assert slide.units == "px" and slide.layer_scale == (1.0, 1.0)
        else:
            assert slide.mpp == pytest.approx(mpp)
            assert slide.units == "µm" and slide.layer_scale == (pytest.approx(mpp),) * 2
            assert ("mpp_suspect" in slide.metadata) == (mpp > 50)
        for level, (h, w) in zip(slide.levels, slide.level_shapes, strict=True):
            assert level.shape == (h, w, 3) and level.dtype == np.uint8
        # every level is coarser than the last and the coarsest fits a screen
        assert all(np.diff(slide.downsamples) > 0)
        assert max(slide.level_shapes[-1]) <= 1024
        assert slide.downsamples[0] == 1.0


@pytest.mark.parametrize("name", sorted(WSI_EXPECTED))
def test_pixels_equal_tifffile_decode(wsi_dir: Path, name: str) -> None:
    path = wsi_dir / name
    with tifffile.TiffFile(path) as tf, open_slide(path) as slide:
        for i, lv in enumerate(tf.series[0].levels):
            ref = lv.asarray()
            h, w = ref.shape[:2]
            assert np.array_equal(slide.read_region(i, 0, 0, h, w), ref)
            assert np.array_equal(slide.levels[i].compute(), ref)  # the dask/zarr path too
            # an unaligned window crossing tile borders and the slide edge
            y, x = h // 3, w // 2
            win = slide.read_region(i, y, x, h, w)
            assert np.array_equal(win[: h - y, : w - x], ref[y:, x:])
            assert (win[h - y :] == 255).all() and (win[:, w - x :] == 255).all()


def test_cmu_svs_tiles_and_lazy_pyramid(wsi_dir: Path) -> None:
    with open_slide(wsi_dir / "cmu_small_region.svs") as slide:
        assert slide.levels[0].chunksize == (240, 240, 3)  # native SVS tiles
        assert slide.metadata["tile"] == [240, 240]
        assert slide.metadata["objective_power"] == 20
        assert slide.metadata["mpp_source"] == "svs MPP"
        # single stored level: lazy 2x block-mean levels are added below it
        assert slide.level_shapes[1:] == [(1483, 1110), (741, 555)]
        assert slide.downsamples[1:] == [2.0, 4.0]
        full = slide.read_region(0, 0, 0, *slide.shape)
        assert np.array_equal(slide.levels[1].compute(), block_mean(full, 2))
        assert np.array_equal(
            slide.read_region(2, 0, 0, 741, 555), block_mean(block_mean(full, 2), 2)
        )


@pytest.mark.parametrize("name", BROKEN)
def test_broken_files_are_refused(wsi_dir: Path, name: str) -> None:
    path = wsi_dir / "broken" / name
    with pytest.raises(SlideError) as info:
        open_slide(path)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg
    assert any(word in msg for word in ("corrupt", "not a", "cannot"))


def test_missing_unknown_and_empty(tmp_path: Path) -> None:
    with pytest.raises(SlideError, match="no such file"):
        open_slide(tmp_path / "nope.svs")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(SlideError, match="unknown format"):
        open_slide(text)
    empty = tmp_path / "empty.tif"
    empty.write_bytes(b"")
    with pytest.raises(SlideError, match="empty file"):
        open_slide(empty)
    with pytest.raises(SlideError, match="not an OME-Zarr"):
        open_slide(tmp_path)
    fake = tmp_path / "fake.ndpi"
    fake.write_bytes(b"\x00" * 64)
    with pytest.raises(SlideError, match="corrupt or not a NDPI"):
        open_slide(fake)
    with pytest.raises(StPredictError, match="mpp must be a positive"):
        open_slide(text, mpp=-1)


def test_truncated_tiff_is_refused(wsi_dir: Path, tmp_path: Path) -> None:
    data = (wsi_dir / "cmu_small_region.svs").read_bytes()
    cut = tmp_path / "cut.svs"
    cut.write_bytes(data[:4000])  # header + first tiles only: offsets point past the end
    with pytest.raises(SlideError) as info:
        open_slide(cut)
    assert str(cut) in str(info.value)


def _write(path: Path, data: np.ndarray, **kw) -> Path:
    tifffile.imwrite(path, data, **kw)
    return path


def test_pixel_types_refused_or_converted(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(SlideError, match="uint16 pixels"):
        open_slide(_write(tmp_path / "a.tif", rng.integers(0, 60000, (64, 64, 3), dtype=np.uint16)))
    with pytest.raises(SlideError, match="float32 pixels"):
        open_slide(_write(tmp_path / "b.tif", rng.random((64, 64), dtype=np.float32)))
    five = rng.integers(0, 255, (5, 64, 64), dtype=np.uint8)
    with pytest.raises(SlideError, match="not supported"):
        open_slide(_write(tmp_path / "c.tif", five, photometric="minisblack"))
    # 8-bit grey: converted to RGB (three equal channels)
    grey = rng.integers(0, 255, (100, 120), dtype=np.uint8)
    with open_slide(_write(tmp_path / "d.tif", grey, tile=(32, 32), photometric="minisblack")) as s:
        out = s.read_region(0, 0, 0, 100, 120)
        assert out.shape == (100, 120, 3)
        assert all(np.array_equal(out[..., c], grey) for c in range(3))
        assert np.array_equal(s.levels[0].compute(), out)
    # RGBA: composited over white
    rgba = rng.integers(0, 255, (40, 48, 4), dtype=np.uint8)
    rgba[..., 3] = 0
    rgba[:20, :, 3] = 255
    with open_slide(
        _write(tmp_path / "e.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    ) as s:
        out = s.read_region(0, 0, 0, 40, 48)
        assert np.array_equal(out[:20], rgba[:20, :, :3])
        assert (out[20:] == 255).all()


def test_png_pixel_types(tmp_path: Path) -> None:
    import imagecodecs

    rng = np.random.default_rng(5)
    (tmp_path / "deep.png").write_bytes(
        imagecodecs.png_encode(rng.integers(0, 65535, (32, 32, 3), dtype=np.uint16))
    )
    with pytest.raises(SlideError, match="not supported"):
        open_slide(tmp_path / "deep.png")
    rgba = rng.integers(0, 255, (32, 40, 4), dtype=np.uint8)
    rgba[:, :20, 3] = 255
    rgba[:, 20:, 3] = 0
    (tmp_path / "alpha.png").write_bytes(imagecodecs.png_encode(rgba))
    with open_slide(tmp_path / "alpha.png") as s:
        out = s.read_region(0, 0, 0, 32, 40)
        assert np.array_equal(out[:, :20], rgba[:, :20, :3]) and (out[:, 20:] == 255).all()
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(SlideError, match=r"bad\.png"):
        open_slide(tmp_path / "bad.png")


def test_zero_sized_level_is_refused(tmp_path: Path) -> None:
    import zarr

    root = zarr.open_group(str(tmp_path / "z.zarr"), mode="w", zarr_format=2)
    root.create_array("0", shape=(3, 64, 64), chunks=(3, 32, 32), dtype="uint8")
    root.create_array("1", shape=(3, 0, 32), chunks=(3, 32, 32), dtype="uint8")
    root.attrs["multiscales"] = [
        {
            "version": "0.4",
            "axes": [{"name": "c"}, {"name": "y"}, {"name": "x"}],
            "datasets": [{"path": "0"}, {"path": "1"}],
        }
    ]
    with pytest.raises(SlideError, match="level 1 has zero size"):
        open_slide(tmp_path / "z.zarr")


def test_mpp_from_tiff_tags_and_override(tmp_path: Path) -> None:
    img = np.zeros((64, 64, 3), np.uint8)
    cm = _write(
        tmp_path / "cm.tif", img, resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER"
    )
    inch = _write(
        tmp_path / "in.tif", img, resolution=(25400 / 0.5, 25400 / 0.5), resolutionunit="INCH"
    )
    with open_slide(cm) as a, open_slide(inch) as b:
        assert a.mpp == pytest.approx(0.25) and b.mpp == pytest.approx(0.5)
        assert a.metadata["mpp_source"] == "TIFF resolution tags"
    with open_slide(cm, mpp=0.8) as c:
        assert c.mpp == 0.8 and c.layer_scale == (0.8, 0.8)
        assert c.metadata["mpp_source"] == "user" and c.metadata["mpp_file"] == pytest.approx(0.25)
    # OME PhysicalSizeX with a unit other than µm
    ome = tmp_path / "x.ome.tif"
    tifffile.imwrite(
        ome,
        img,
        photometric="rgb",
        metadata={"axes": "YXS", "PhysicalSizeX": 250, "PhysicalSizeXUnit": "nm"},
    )
    with open_slide(ome) as d:
        assert d.format == "ome-tiff" and d.mpp == pytest.approx(0.25)


def test_ndpi_like_file(tmp_path: Path) -> None:
    """A Hamamatsu-flagged TIFF (NDPI tags): format ndpi, mpp from its resolution tags."""
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
    # (a real .ndpi name makes tifffile expect NDPI's 64-bit offsets, which it cannot write)
    path = tmp_path / "x.tif"
    tifffile.imwrite(
        path, img, photometric="rgb", tile=(32, 32), compression="jpeg",
        resolution=(1e4 / 0.46, 1e4 / 0.46), resolutionunit="CENTIMETER",
        extratags=[(65420, "I", 1, 1, True), (65421, "f", 1, 20.0, True), (271, "s", 0, "Hamamatsu", True)],
    )  # fmt: skip
    with open_slide(path) as s, tifffile.TiffFile(path) as tf:
        assert tf.is_ndpi and s.format == "ndpi"
        assert s.mpp == pytest.approx(0.46)
        assert s.metadata["objective_power"] == 20.0
        assert np.array_equal(s.read_region(0, 0, 0, 96, 128), tf.pages[0].asarray())


def test_real_jpeg_png_and_mpp_override(her2st_dir: Path) -> None:
    with open_slide(her2st_dir / "images" / "C2.jpg") as s:
        assert s.format == "image" and s.shape == (9911, 9274) and s.mpp is None
        assert s.level_shapes[1] == (4955, 4637) and s.downsamples[:3] == [1.0, 2.0, 4.0]
        import imagecodecs

        ref = imagecodecs.imread(her2st_dir / "images" / "C2.jpg")
        assert np.array_equal(s.read_region(0, 5000, 4000, 300, 200), ref[5000:5300, 4000:4200])
        assert np.array_equal(s.read_region(1, 0, 0, 100, 100), block_mean(ref[:200, :200], 2))
    with open_slide(her2st_dir / "images" / "A2_dark.png", mpp=2.5) as s:
        assert s.shape == (2136, 2000) and s.mpp == 2.5 and s.units == "µm"


def test_fingerprint_pickle_close(wsi_dir: Path, tmp_path: Path) -> None:
    a = open_slide(wsi_dir / "cmu_small_region.svs")
    b = open_slide(wsi_dir / "boxes.tiff")
    assert a.fingerprint() == open_slide(wsi_dir / "cmu_small_region.svs").fingerprint()
    assert a.fingerprint() != b.fingerprint()
    copy = pickle.loads(pickle.dumps(a))  # DataLoader workers get a re-opened slide
    assert isinstance(copy, Slide) and copy.mpp == a.mpp
    assert np.array_equal(copy.read_region(0, 10, 10, 50, 50), a.read_region(0, 10, 10, 50, 50))
    with b:
        pass
    with pytest.raises(SlideError, match="closed"):
        b.read_region(0, 0, 0, 4, 4)
    with pytest.raises(SlideError, match="level 9 does not exist"):
        a.read_region(9, 0, 0, 4, 4)


# ------------------------------------------------------------------ read_resampled


SX, SY = 0.15, 0.2  # ramp slopes (grey levels per level-0 px)


@pytest.fixture(scope="module")
def ramp_pyramid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-level pyramid whose pixels encode their own coordinates (linear ramps).

    Each level is computed from the continuous ramp at its pixel centres, so no level carries
    a rounding bias and any shift in ``read_resampled`` shows up as a mean offset.
    """
    h, w = 1200, 1600
    levels = []
    for k in range(4):
        d = 2**k
        yy, xx = np.mgrid[0 : h // d, 0 : w // d]
        img = np.full((h // d, w // d, 3), 128, np.uint8)
        img[..., 0] = np.round((xx + 0.5) * d * SX)
        img[..., 1] = np.round((yy + 0.5) * d * SY)
        levels.append(img)
    path = tmp_path_factory.mktemp("ramp") / "ramp.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(levels[0], tile=(128, 128), subifds=3, compression="zlib", photometric="rgb",
                 resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")  # fmt: skip
        for k, lv in enumerate(levels[1:], 1):
            tw.write(lv, tile=(128, 128), subfiletype=1, compression="zlib", photometric="rgb",
                     resolution=(1e4 / 0.5 / 2**k, 1e4 / 0.5 / 2**k), resolutionunit="CENTIMETER")  # fmt: skip
    return path


def test_read_resampled_identity_and_padding(ramp_pyramid: Path, wsi_dir: Path) -> None:
    with open_slide(wsi_dir / "cmu_small_region.svs") as s:
        ref = s.read_region(0, 0, 0, *s.shape)
        assert np.array_equal(
            s.read_resampled(100, 37, 224, 224, out_shape=(224, 224)), ref[100:324, 37:261]
        )
        # half outside the slide: padded with 255
        out = s.read_resampled(-50, s.shape[1] - 30, 100, 100, out_shape=(100, 100))
        assert (out[:50] == 255).all() and (out[:, 30:] == 255).all()
        assert np.array_equal(out[50:, :30], ref[:50, -30:])
        far = s.read_resampled(1e6, 1e6, 500.5, 500.5, out_shape=(32, 32))
        assert (far == 255).all()
    with pytest.raises(SlideError):
        open_slide(ramp_pyramid).read_resampled(0, 0, 10, 10, out_shape=(0, 5))


def _ramp_errors(
    s: Slide, rng: np.random.Generator, shift: float = 0.0
) -> list[tuple[int, float, float, float]]:
    rows = []
    for _ in range(48):
        o = int(rng.integers(24, 80))
        scale = float(rng.uniform(0.6, 12.0))
        h = o * scale * rng.uniform(0.9, 1.1)
        w = o * scale
        y0 = rng.uniform(0, s.shape[0] - h)
        x0 = rng.uniform(0, s.shape[1] - w)
        out = s.read_resampled(y0 + shift, x0 + shift, h, w, out_shape=(o, o)).astype(float)
        cy = y0 + (np.arange(o) + 0.5) * h / o
        cx = x0 + (np.arange(o) + 0.5) * w / o
        ex = out[..., 0] - cx[None, :] * SX
        ey = out[..., 1] - cy[:, None] * SY
        err = max(np.abs(ex).max(), np.abs(ey).max())
        rows.append((s.best_level(min(h, w) / o), err, ex.mean() / SX, ey.mean() / SY))
    return rows


def test_read_resampled_registration(ramp_pyramid: Path) -> None:
    """Output pixel (i, j) shows level-0 point y0+(i+½)h/oh, x0+(j+½)w/ow, from any level."""
    with open_slide(ramp_pyramid) as s:
        assert s.downsamples[:4] == [1.0, 2.0, 4.0, 8.0]
        rows = _ramp_errors(s, np.random.default_rng(0))
        assert {r[0] for r in rows} == {0, 1, 2, 3}  # every stored level was used
        assert max(r[1] for r in rows) <= 1.0  # linear ramps survive up to 8-bit rounding
        # mean offset over many random requests (8-bit steps alias within any one request):
        # registered to a small fraction of a level-0 pixel, at every level
        for level in range(4):
            sel = [r for r in rows if r[0] == level]
            assert (
                abs(np.mean([r[2] for r in sel])) < 0.3 and abs(np.mean([r[3] for r in sel])) < 0.3
            )
        # the test can see a 1-px misregistration
        shifted = _ramp_errors(s, np.random.default_rng(0), shift=1.0)
        assert np.mean([r[2] for r in shifted]) > 0.7 and np.mean([r[3] for r in shifted]) > 0.7


def test_read_resampled_reads_only_needed_tiles_from_best_level(ramp_pyramid: Path) -> None:
    with open_slide(ramp_pyramid) as s:
        levels = s._sources[: s.metadata["stored_levels"]]
        before = [lv.tiles_read for lv in levels]
        # 4 level-0 px per output px: level 2 (downsample 4) is the coarsest with enough resolution
        s.read_resampled(256, 256, 400, 400, out_shape=(100, 100))
        delta = [lv.tiles_read - b for lv, b in zip(levels, before, strict=True)]
        assert delta[0] == delta[1] == delta[3] == 0
        # 100 px at level 2 + filter margin from y=64: tiles rows/cols 0..1 of 128-px tiles
        assert 1 <= delta[2] <= 4
        assert s.best_level(4.0) == 2 and s.best_level(3.9) == 1 and s.best_level(100) == 3


def test_read_resampled_large_request_is_banded(wsi_dir: Path) -> None:
    """A whole-slide thumbnail equals the level read + resize done in one piece."""
    from PIL import Image

    from napari_stpredict.slide import base

    with open_slide(wsi_dir / "cmu_small_region.svs") as s:
        full = s.read_resampled(0, 0, 2967, 2220, out_shape=(600, 450))
        old = base._BAND_BYTES
        base._BAND_BYTES = 200_000  # force many bands
        try:
            banded = s.read_resampled(0, 0, 2967, 2220, out_shape=(600, 450))
        finally:
            base._BAND_BYTES = old
        assert np.abs(full.astype(int) - banded).max() <= 1
        ref = np.asarray(
            Image.fromarray(s.read_region(0, 0, 0, 2967, 2220)).resize(
                (450, 600), Image.Resampling.BILINEAR
            )
        )
        assert np.abs(full.astype(int) - ref).mean() < 0.5


def test_jpeg2000_svs_tiles(tmp_path: Path) -> None:
    """Aperio files with JPEG 2000 tiles decode like tifffile does; MPP comes from the description."""
    rng = np.random.default_rng(2)
    img = np.clip(rng.normal(180, 40, (200, 300, 3)), 0, 255).astype(np.uint8)
    path = tmp_path / "j2k.svs"
    desc = (
        "Aperio Image Library v12.0.16\r\n300x200 (256x256) J2K/KDU Q=70|AppMag = 40|MPP = 0.2527"
    )
    tifffile.imwrite(
        path, img, tile=(128, 128), compression="jpeg2000", photometric="rgb", description=desc
    )
    with open_slide(path) as s, tifffile.TiffFile(path) as tf:
        assert s.format == "svs" and s.mpp == pytest.approx(0.2527)
        assert s.metadata["compression"] == "jpeg2000"
        assert np.array_equal(s.read_region(0, 0, 0, 200, 300), tf.pages[0].asarray())


_FORKED: Slide | None = None


def _read_in_child(queue) -> None:
    assert _FORKED is not None
    queue.put(int(_FORKED.read_region(0, 0, 0, *_FORKED.shape).sum()))


def test_reads_in_forked_worker(wsi_dir: Path) -> None:
    """A slide (and its decode pool) inherited through fork keeps working in the child."""
    import multiprocessing

    global _FORKED
    _FORKED = open_slide(wsi_dir / "cmu_small_region.svs")
    # positional reads (no shared file offset between parent and child)
    assert _FORKED._sources[0].planes[0].fd is not None
    expected = int(_FORKED.read_region(0, 0, 0, *_FORKED.shape).sum())  # parent starts the pool
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_read_in_child, args=(queue,))
    proc.start()
    try:
        assert queue.get(timeout=60) == expected
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
        _FORKED = None
