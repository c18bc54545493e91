"""``info`` reports what a slide really is: w × h, truncated files, huge JPEG/PNG (issues 12, 14)."""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_stpredict.cli import main
from napari_stpredict.errors import SlideError
from napari_stpredict.slide import open_slide


def test_info_size_is_width_by_height(capsys: pytest.CaptureFixture[str], wsi_dir: Path) -> None:
    # cmu_small_region.svs is 2220 px wide and 2967 px high
    assert main(["info", str(wsi_dir / "cmu_small_region.svs")]) == 0
    out = capsys.readouterr().out
    assert "size: 2220 × 2967 px (w × h)" in out
    assert "2967 x 2220 px" not in out and "2967 × 2220" not in out


def _pyramid(path: Path) -> Path:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (1024, 1536, 3), dtype=np.uint8)
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
        tw.write(
            img, tile=(256, 256), subifds=1, photometric="rgb", compression="zlib",
            metadata={"PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5},
        )  # fmt: skip
        tw.write(img[::2, ::2].copy(), tile=(256, 256), subfiletype=1, photometric="rgb",
                 compression="zlib")  # fmt: skip
    return path


@pytest.mark.parametrize("keep", [0.35, 0.7, 0.97])
def test_info_refuses_truncated_ome_tiff(
    keep: float, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    whole = _pyramid(tmp_path / "whole.ome.tif")
    assert main(["info", str(whole)]) == 0  # the complete file is fine
    capsys.readouterr()
    data = whole.read_bytes()
    cut = tmp_path / "cut.ome.tif"
    cut.write_bytes(data[: int(len(data) * keep)])  # an interrupted copy
    with pytest.raises(SlideError, match=r"cut\.ome\.tif: truncated file"):
        open_slide(cut)
    rc = subprocess.run(
        [sys.executable, "-m", "napari_stpredict", "info", str(cut)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert rc.returncode == 2, rc.stdout + rc.stderr
    assert "truncated file" in rc.stderr and "Traceback" not in rc.stderr


def _write_big_png(path: Path, width: int, height: int) -> None:
    """A real ``width × height`` RGB PNG, streamed (never held in memory)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    row = np.full((width, 3), 240, np.uint8)
    row[width // 4 : width // 2] = (200, 120, 180)  # a band of "tissue" colour
    raw = b"\x00" + row.tobytes()
    comp = zlib.compressobj(1)
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n")
        fh.write(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))
        block = raw * 256
        for _ in range(height // 256):
            fh.write(chunk(b"IDAT", comp.compress(block)))
        fh.write(chunk(b"IDAT", comp.compress(raw * (height % 256)) + comp.flush()))
        fh.write(chunk(b"IEND", b""))


_RSS_CODE = """
import resource, sys
from napari_stpredict.cli import main
import napari_stpredict.slide, napari_stpredict.slide.image, napari_stpredict.slide.tiff
import PIL.PngImagePlugin, imagecodecs, rich.console, rich.table
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rc = main(["info", sys.argv[1]])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("RSS_KIB", before, after, rc)
"""


def test_info_on_huge_png_keeps_memory_bounded(tmp_path: Path) -> None:
    """Issue 14.8: a 20,000² PNG took 1.7 GB to ``info``; the header is enough."""
    big = tmp_path / "big.png"
    _write_big_png(big, 20_000, 20_000)  # 1.2 GB of pixels decoded
    res = subprocess.run(
        [sys.executable, "-c", _RSS_CODE, str(big)], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    assert "size: 20000 × 20000 px" in res.stdout and "convert" in res.stdout
    before, after, rc = (int(v) for v in res.stdout.split("RSS_KIB")[1].split()[:3])
    assert rc == 0
    assert (after - before) * 1024 < 150e6, f"info grew RSS by {(after - before) / 1024:.0f} MiB"
    # reading its pixels is refused in one line with the cure, before any decoding
    with open_slide(big) as slide:
        assert slide.shape == (20_000, 20_000) and slide.metadata["decoded"] == "on first read"
        with pytest.raises(SlideError, match=r"big\.png: 20000 x 20000 px .*stpredict convert"):
            slide.read_region(0, 0, 0, 16, 16)


def test_image_pixel_limit_is_lifted_for_convert(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
    import imagecodecs

    path = tmp_path / "small.png"
    path.write_bytes(imagecodecs.png_encode(img))
    with pytest.raises(SlideError, match=r"small\.png: 400 x 300 px .*stpredict convert"):
        open_slide(path, max_image_pixels=1000)  # small images decode at open: refused there
    with open_slide(path, max_image_pixels=None) as s:
        assert np.array_equal(s.read_region(0, 0, 0, 300, 400), img)
    with open_slide(path) as s:  # default limit: far above this image
        assert np.array_equal(s.read_region(0, 10, 20, 5, 6), img[10:15, 20:26])
