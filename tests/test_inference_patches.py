"""slide/patches.py: batched patch reads through the decoded-tile cache are bit-identical to
per-patch Slide.read_resampled, decode each tile once, and stay within their memory bound."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from napari_stpredict.slide import open_slide, write_ome_tiff
from napari_stpredict.slide.patches import TileCache, read_patch_rects, read_patches


@pytest.fixture(scope="module")
def tiled_slide(tmp_path_factory, her2st_dir):
    """HER2ST C3 as a JPEG-tiled OME-TIFF pyramid with small (128 px) tiles."""
    dst = tmp_path_factory.mktemp("patches") / "c3.ome.tif"
    with open_slide(her2st_dir / "images" / "C3.jpg", mpp=0.5) as src:
        write_ome_tiff(src, dst, tile=128, compression="jpeg", mpp=0.5)
    with open_slide(dst) as slide:
        yield slide


def _random_rects(slide, n, rng, *, scale=(0.4, 3.0)):
    h, w = slide.shape
    side = rng.uniform(20, 300, n) * rng.uniform(*scale, n) ** 0
    y = rng.uniform(-50, h - 20, n)
    x = rng.uniform(-50, w - 20, n)
    return np.stack([y, x, side, side], axis=1)


@pytest.mark.parametrize("out_px", [32, 112, 224])
def test_read_patch_rects_bit_identical_to_read_resampled(tiled_slide, out_px):
    rng = np.random.default_rng(out_px)
    rects = _random_rects(tiled_slide, 40, rng)
    # integer-aligned, same-scale rectangles take read_resampled's no-resize path
    rects[:5] = [
        [256, 128, out_px, out_px],
        [0, 0, out_px, out_px],
        [3, 5, out_px, out_px],
        [tiled_slide.shape[0] - 10, 7, out_px, out_px],
        [-4, -4, out_px, out_px],
    ]
    expected = np.stack([tiled_slide.read_resampled(*r, out_shape=(out_px, out_px)) for r in rects])
    with ThreadPoolExecutor(2) as pool:
        got = read_patch_rects(tiled_slide, rects, out_px, executor=pool, group=3)
    assert got.dtype == np.uint8 and got.shape == expected.shape
    assert np.array_equal(got, expected)


def test_read_patches_centres_match_read_resampled(tiled_slide):
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, min(tiled_slide.shape), (25, 2))
    s = 163.4
    got = read_patches(tiled_slide, xy, s, 64)
    for k, (x, y) in enumerate(xy):
        ref = tiled_slide.read_resampled(y - s / 2, x - s / 2, s, s, out_shape=(64, 64))
        assert np.array_equal(got[k], ref)


def test_tile_cache_decodes_each_tile_once_and_stays_bounded(tiled_slide, monkeypatch):
    calls = []
    real = tiled_slide.read_region

    def counting(level, y, x, h, w):
        calls.append((level, y, x))
        return real(level, y, x, h, w)

    monkeypatch.setattr(tiled_slide, "read_region", counting)
    # a contiguous 6 × 6 block of 100-px patches: overlapping 128-px tiles
    cy, cx = np.meshgrid(np.arange(6) * 100 + 400, np.arange(6) * 100 + 400, indexing="ij")
    xy = np.stack([cx.ravel(), cy.ravel()], axis=1)
    cache = TileCache(tiled_slide)
    read_patches(tiled_slide, xy, 100.0, 100, cache=cache)
    assert len(calls) == len(set(calls)), "a tile was decoded twice"
    assert cache.misses == len(calls) and cache.hits > cache.misses
    # every decode is one whole 128-px tile (the cache asks the slide for tiles only)
    assert all(y % 128 == 0 and x % 128 == 0 for _, y, x in calls)
    # the bound holds: room for 3 tiles only
    small = TileCache(tiled_slide, max_bytes=3 * 128 * 128 * 3)
    out = read_patches(tiled_slide, xy, 100.0, 100, cache=small)
    assert small.nbytes <= 3 * 128 * 128 * 3
    assert np.array_equal(out, read_patches(tiled_slide, xy, 100.0, 100))


# --------------------------------------------------------------------------- device resize
def _cuda_or_cpu() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


_DEVICE = _cuda_or_cpu()  # the GPU where there is one (the port's purpose), else the CPU


def test_torch_bilinear_is_pillow_bit_for_bit_on_random_boxes():
    """The torch port of Pillow's BILINEAR resize (run on the CPU here; CUDA in use) gives
    Pillow's pixels for random windows, boxes and scales, up and down, batched."""
    import torch
    from PIL import Image

    from napari_stpredict.inference.device_resize import resize_windows

    rng = np.random.default_rng(7)
    for _ in range(40):
        oh, ow = (int(v) for v in rng.integers(1, 90, 2))
        sizes = rng.integers(3, 110, (4, 2))
        hmax, wmax = sizes.max(axis=0)
        windows = np.zeros((4, hmax, wmax, 3), np.uint8)
        boxes, expected = [], []
        for k, (h, w) in enumerate(sizes):
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            windows[k, :h, :w] = img
            left, top = rng.uniform(0, w - 1), rng.uniform(0, h - 1)
            box = (left, top, rng.uniform(left + 0.05, w), rng.uniform(top + 0.05, h))
            if k == 0:
                box = (0.0, 0.0, float(w), float(h))  # the whole window
            boxes.append(box)
            pil = Image.fromarray(img).resize((ow, oh), Image.Resampling.BILINEAR, box=box)
            expected.append(np.asarray(pil))
        got = resize_windows(
            torch.from_numpy(windows).to(_DEVICE), sizes, np.array(boxes), (oh, ow)
        )
        assert got.dtype == torch.uint8 and got.device.type == _DEVICE
        np.testing.assert_array_equal(got.cpu().numpy(), np.stack(expected))


@pytest.mark.parametrize("out_px", [32, 224])
def test_device_resize_windows_equal_read_resampled(tiled_slide, out_px):
    """Windows planned and cut as read_resampled cuts them, resized by the torch port, are
    read_resampled's pixels (including its no-resize path and rectangles past the edge)."""
    import torch

    from napari_stpredict.inference.device_resize import plan_windows, read_windows, resize_windows

    rng = np.random.default_rng(out_px + 1)
    rects = _random_rects(tiled_slide, 30, rng)
    rects[:3] = [[256, 128, out_px, out_px], [-4, -4, out_px, out_px], [3.5, 5, out_px, out_px]]
    plan = plan_windows(tiled_slide, rects, out_px)
    assert plan is not None
    h, w = plan.max_window
    windows = np.zeros((len(rects), h, w, 3), np.uint8)
    read_windows(plan, TileCache(tiled_slide).read_region, windows)
    got = resize_windows(
        torch.from_numpy(windows).to(_DEVICE), plan.windows[:, 2:], plan.boxes, (out_px,) * 2
    )
    expected = np.stack([tiled_slide.read_resampled(*r, out_shape=(out_px, out_px)) for r in rects])
    np.testing.assert_array_equal(got.cpu().numpy(), expected)
