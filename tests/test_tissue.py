"""Tissue mask: Otsu on a low-resolution view; exact area fractions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_stpredict.slide import TissueMask, open_slide, tissue_mask
from napari_stpredict.slide.base import ArraySource, Slide


def _synthetic(img: np.ndarray) -> Slide:
    return Slide(Path("synthetic"), format="image", sources=[ArraySource(img)], mpp=0.5)


def test_real_sections(her2st_dir: Path, wsi_dir: Path) -> None:
    with open_slide(her2st_dir / "images" / "C2.jpg") as s:
        m = tissue_mask(s, max_size=512)
        assert max(m.mask.shape) == 512 and m.downsample == pytest.approx(9911 / 512, rel=1e-3)
        assert 0.08 < m.fraction_total() < 0.35
        assert m.fraction(5600, 4400, 6400, 5200) > 0.9  # inside the tissue wedge
        assert m.fraction(0, 0, 1500, 1500) == 0.0  # blank glass in the corner
    # black (masked) background must not count as tissue
    with open_slide(her2st_dir / "images" / "A2_dark.png") as s:
        m = tissue_mask(s, max_size=512)
        assert m.fraction(0, 0, 150, 150) == 0.0
        assert m.fraction(900, 600, 1300, 1000) > 0.8
        assert 0.2 < m.fraction_total() < 0.6
    with open_slide(wsi_dir / "cmu_small_region.svs") as s:
        m = tissue_mask(s)
        assert max(m.mask.shape) <= 2048
        assert 0.2 < m.fraction_total() < 0.6


def test_synthetic_square_and_blank() -> None:
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(242, 3, (1000, 1200, 3)), 0, 255).astype(np.uint8)  # noisy glass
    img[300:700, 400:900] = (170, 90, 160)  # a pink-purple "tissue" block
    m = tissue_mask(_synthetic(img), max_size=200)
    assert m.mask.shape == (167, 200) and m.downsample == pytest.approx(6.0)
    assert m.fraction(320, 420, 680, 880) == pytest.approx(1.0)
    assert m.fraction(0, 0, 250, 1200) == 0.0
    assert m.fraction(300, 400, 700, 900) > 0.95
    assert m.fraction_total() == pytest.approx(400 * 500 / (1000 * 1200), rel=0.1)
    blank = tissue_mask(
        _synthetic(np.clip(rng.normal(242, 3, (300, 300, 3)), 0, 255).astype(np.uint8))
    )
    assert not blank.mask.any()


def _brute_fraction(
    mask: np.ndarray, d: float, y0: float, x0: float, y1: float, x1: float
) -> float:
    """Area-weighted coverage by explicit pixel overlaps (reference)."""
    if y1 <= y0 or x1 <= x0:
        return 0.0
    total = 0.0
    for i in range(mask.shape[0]):
        oy = max(0.0, min(y1, (i + 1) * d) - max(y0, i * d))
        if oy == 0:
            continue
        for j in range(mask.shape[1]):
            if mask[i, j]:
                total += oy * max(0.0, min(x1, (j + 1) * d) - max(x0, j * d))
    return total / ((y1 - y0) * (x1 - x0))


def test_fraction_is_exact_area_weighted() -> None:
    rng = np.random.default_rng(3)
    mask = rng.random((12, 15)) > 0.5
    tm = TissueMask(mask=mask, downsample=4.0)
    rects = []
    for _ in range(200):
        y0, x0 = rng.uniform(-10, 50), rng.uniform(-10, 65)
        rects.append((y0, x0, y0 + rng.uniform(0, 30), x0 + rng.uniform(0, 30)))
    for r in rects:
        assert tm.fraction(*r) == pytest.approx(_brute_fraction(mask, 4.0, *r), abs=1e-9)
    arr = np.array(rects)
    many = tm.fraction(arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3])  # vectorised
    assert many.shape == (200,)
    assert np.allclose(many, [tm.fraction(*r) for r in rects])
    assert tm.fraction(5, 5, 5, 9) == 0.0  # empty rectangle
    assert tm.fraction(0, 0, 48, 60) == pytest.approx(mask.mean())
