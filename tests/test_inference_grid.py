"""TileGrid: geometry, units, view selection, tissue filtering, registration (real slides)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_stpredict.errors import StPredictError
from napari_stpredict.inference.grid import TileGrid


@pytest.fixture(scope="module")
def c2_slide(her2st_dir, her2st_mpp):
    from napari_stpredict.slide import open_slide

    with open_slide(her2st_dir / "images" / "C2.jpg", mpp=her2st_mpp("C2")) as s:
        yield s


@pytest.fixture(scope="module")
def cmu_slide(wsi_dir):
    from napari_stpredict.slide import open_slide

    with open_slide(wsi_dir / "cmu_small_region.svs") as s:
        yield s


# --------------------------------------------------------------------------- geometry
def test_shape_covers_slide_with_fewest_cells():
    g = TileGrid((1000, 2000), 0.5, patch_um=112, patch_px=224)
    assert g.cell_px == pytest.approx(224)
    assert g.stride_px == pytest.approx(224)
    assert g.shape == (5, 9)
    gh, gw = g.shape
    assert g.cell_rect_px(gh - 1, gw - 1)[2] >= 1000 and g.cell_rect_px(gh - 1, gw - 1)[3] >= 2000
    assert g.cell_rect_px(gh - 2, gw - 2)[2] < 1000 and g.cell_rect_px(gh - 2, gw - 2)[3] < 2000
    # an exact multiple gets no extra cell from rounding noise
    assert TileGrid((672, 672), 0.5, patch_um=112, patch_px=224).shape == (3, 3)
    # a slide smaller than one patch still has one cell
    assert TileGrid((10, 10), 0.5, patch_um=112, patch_px=224).shape == (1, 1)


def test_overlapping_stride():
    g = TileGrid((1000, 1000), 1.0, patch_um=100, patch_px=50, stride_um=50)
    assert g.cell_px == pytest.approx(100) and g.stride_px == pytest.approx(50)
    assert g.shape == (19, 19)  # last cell 18*50 .. 1000
    assert g.cell_rect_px(1, 2) == pytest.approx((50, 100, 150, 200))
    assert g.cell_center_px(1, 2) == pytest.approx((100, 150))
    assert g.cell_center_um(1, 2) == pytest.approx((100, 150))
    rects = g.cell_rects_px(np.array([[1, 2], [3, 0]]))
    np.testing.assert_allclose(rects, [[50, 100, 150, 200], [150, 0, 250, 100]])
    np.testing.assert_allclose(g.cell_centers_px(np.array([[1, 2]])), [[100, 150]])


def test_slide_without_mpp_uses_model_pixels():
    g = TileGrid((500, 700), None, patch_um=112, patch_px=64)
    assert g.mpp_assumed
    assert g.effective_mpp == pytest.approx(112 / 64)
    assert g.cell_px == pytest.approx(64) and g.stride_px == pytest.approx(64)
    assert g.shape == (math.ceil(500 / 64), math.ceil(700 / 64))
    scale, translate = g.heatmap_transform()  # layer units are pixels
    assert scale == pytest.approx((64, 64)) and translate == pytest.approx((31.5, 31.5))
    assert not TileGrid((500, 700), 0.5, patch_um=112, patch_px=64).mpp_assumed


def test_dict_round_trip_and_key():
    g = TileGrid((1234, 5678), 0.4991, patch_um=112.0, patch_px=96, stride_um=56.0)
    d = g.to_dict()
    import json

    assert TileGrid.from_dict(json.loads(json.dumps(d))) == g
    assert g.key() == TileGrid.from_dict(d).key()
    assert g.key() != TileGrid((1234, 5678), 0.4991, patch_um=112.0, patch_px=96).key()
    with pytest.raises(StPredictError, match="version"):
        TileGrid.from_dict({**d, "version": 99})
    with pytest.raises(StPredictError, match="missing"):
        TileGrid.from_dict({"shape0": [1, 2]})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shape0": (0, 10), "mpp": 0.5}, "shape0"),
        ({"shape0": (10, 10), "mpp": -1.0}, "mpp"),
        ({"shape0": (10, 10), "mpp": 0.5, "patch_um": float("nan")}, "patch_um"),
        ({"shape0": (10, 10), "mpp": 0.5, "patch_px": 0}, "patch_px"),
        ({"shape0": (10, 10), "mpp": 0.5, "patch_px": 2.5}, "patch_px"),
        ({"shape0": (10, 10), "mpp": 0.5, "stride_um": 0}, "stride_um"),
    ],
)
def test_bad_parameters(kwargs, match):
    args = {"patch_um": 112, "patch_px": 64, **kwargs}
    shape0, mpp = args.pop("shape0"), args.pop("mpp")
    with pytest.raises(StPredictError, match=match):
        TileGrid(shape0, mpp, **args)


# --------------------------------------------------------------------------- views
def test_cells_in_view_units_margin_and_clipping():
    g = TileGrid((1000, 2000), 0.5, patch_um=112, patch_px=224)  # 224 px cells
    cells = g.cells_in_view(0, 0, 300, 300, margin=0)
    assert {tuple(c) for c in cells} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    # same rectangle in µm and in napari layer coordinates
    np.testing.assert_array_equal(g.cells_in_view(0, 0, 150, 150, units="um", margin=0), cells)
    np.testing.assert_array_equal(
        g.cells_in_view(-0.25, -0.25, 149.75, 149.75, units="layer", margin=0), cells
    )
    # margin grows the block on every side, clipped at the grid border
    with_margin = g.cells_in_view(460, 460, 500, 500, margin=1)
    assert {tuple(c) for c in with_margin} == {(i, j) for i in (1, 2, 3) for j in (1, 2, 3)}
    # corners in any order; fully outside → empty
    np.testing.assert_array_equal(g.cells_in_view(300, 300, 0, 0, margin=0), cells)
    assert g.cells_in_view(5000, 5000, 6000, 6000, margin=0).shape == (0, 2)
    assert g.cells_in_view(-1e6, -1e6, 1e6, 1e6).shape == (g.n_cells, 2)
    with pytest.raises(StPredictError, match="units"):
        g.cells_in_view(0, 0, 1, 1, units="mm")  # type: ignore[arg-type]


def test_cells_in_view_uses_heatmap_pixels_with_overlap():
    g = TileGrid((1000, 1000), 1.0, patch_um=100, patch_px=50, stride_um=50)
    # heatmap pixel (i, j) spans centre ± 25 px; centre of (2, 2) is (150, 150)
    cells = g.cells_in_view(130, 130, 170, 170, margin=0)
    assert {tuple(c) for c in cells} == {(2, 2)}
    assert g.cell_at(126, 174) == (2, 2)
    assert g.cell_at(126, 176) == (2, 3)
    assert g.cell_at(124, 150) == (1, 2)
    assert g.cell_at(-500, 10) is None


def test_heatmap_registration_matches_cell_centres():
    """A heatmap pixel drawn with heatmap_transform sits on its patch centre in the slide layer."""
    for mpp, stride in [(0.5, None), (0.4991, 56.0), (None, None)]:
        g = TileGrid((3000, 4000), mpp, patch_um=112, patch_px=96, stride_um=stride)
        (sy, sx), (ty, tx) = g.heatmap_transform()
        scale = mpp or 1.0
        for i, j in [(0, 0), (3, 7), (g.shape[0] - 1, g.shape[1] - 1)]:
            cy, cx = g.cell_center_px(i, j)
            # slide layer: level-0 pixel k is drawn centred at k * scale → point c at (c - 0.5) * scale
            assert i * sy + ty == pytest.approx((cy - 0.5) * scale)
            assert j * sx + tx == pytest.approx((cx - 0.5) * scale)
            # and hovering there finds the same cell
            assert g.cell_at(i * sy + ty, j * sx + tx, units="layer") == (i, j)


# --------------------------------------------------------------------------- tissue
class _Mask:
    """A minimal TissueMask stand-in with a reference (slow, exact) fraction."""

    def __init__(self, mask: np.ndarray, downsample: float) -> None:
        self.mask = mask
        self.downsample = downsample

    def fraction(self, y0, x0, y1, x1):
        # exact: overlap of the rectangle with every mask pixel, separable in y and x
        edges_y = np.arange(self.mask.shape[0] + 1) * self.downsample
        edges_x = np.arange(self.mask.shape[1] + 1) * self.downsample
        oy = np.clip(np.minimum(edges_y[1:], y1) - np.maximum(edges_y[:-1], y0), 0, None)
        ox = np.clip(np.minimum(edges_x[1:], x1) - np.maximum(edges_x[:-1], x0), 0, None)
        return float(oy @ self.mask.astype(float) @ ox) / ((y1 - y0) * (x1 - x0))


def test_tissue_fraction_vectorised_matches_reference():
    rng = np.random.default_rng(1)
    m = _Mask(rng.random((40, 50)) > 0.6, downsample=10.0)
    g = TileGrid((400, 500), 1.0, patch_um=37, patch_px=16, stride_um=23)
    frac = g.tissue_fraction(m)
    ref = np.array(
        [[m.fraction(*g.cell_rect_px(i, j)) for j in range(g.shape[1])] for i in range(g.shape[0])]
    )
    np.testing.assert_allclose(frac, ref, atol=1e-5)
    # the slow path (only .fraction) gives the same
    slow = g.tissue_fraction(type("M", (), {"fraction": m.fraction})())
    np.testing.assert_allclose(slow, ref, atol=1e-6)
    cells = g.tissue_cells(m, min_fraction=0.5)
    np.testing.assert_array_equal(cells, frac >= 0.5)
    # nothing is tissue where the mask is empty, even with min_fraction 0
    empty = _Mask(np.zeros((40, 50), bool), 10.0)
    assert not g.tissue_cells(empty, min_fraction=0.0).any()
    with pytest.raises(StPredictError, match="min_fraction"):
        g.tissue_cells(m, min_fraction=1.5)


# --------------------------------------------------------------------------- real slides
def test_real_slide_tissue_cells_match_tissue_mask(c2_slide):
    from napari_stpredict.slide import tissue_mask

    g = TileGrid(c2_slide.shape, c2_slide.mpp, patch_um=112, patch_px=64)
    assert g.cell_px == pytest.approx(112 / c2_slide.mpp)
    mask = tissue_mask(c2_slide)
    frac = g.tissue_fraction(mask)
    tissue = g.tissue_cells(mask, 0.2)
    # a HER2ST section: tissue in the middle, glass around it
    assert 0.1 < tissue.mean() < 0.9
    assert not tissue[0, 0] and not tissue[-1, -1]
    # agrees with the mask's own per-rectangle fraction
    rng = np.random.default_rng(0)
    for i, j in rng.integers(0, g.shape, size=(25, 2)):
        assert frac[i, j] == pytest.approx(mask.fraction(*g.cell_rect_px(i, j)), abs=0.05)


def test_real_slide_pixels_at_cells(cmu_slide):
    """Cell rectangles address the right slide pixels (native scale: exact copies)."""
    assert cmu_slide.mpp == pytest.approx(0.499, abs=1e-3)
    p = 64
    g = TileGrid(cmu_slide.shape, cmu_slide.mpp, patch_um=p * cmu_slide.mpp, patch_px=p)
    assert g.cell_px == pytest.approx(p) and not g.mpp_assumed
    for i, j in [(0, 0), (5, 9), (g.shape[0] - 1, g.shape[1] - 1)]:
        y0, x0, y1, x1 = g.cell_rect_px(i, j)
        patch = cmu_slide.read_resampled(y0, x0, y1 - y0, x1 - x0, out_shape=(p, p))
        ref = cmu_slide.read_region(0, round(y0), round(x0), p, p)
        np.testing.assert_array_equal(patch, ref)
    assert g.cell_at(*g.cell_center_um(5, 9), units="um") == (5, 9)


def test_grid_for_slide_without_mpp(mob_dir):
    from napari_stpredict.slide import open_slide

    with open_slide(mob_dir / "MOB1.jpg") as s:
        assert s.mpp is None
        pred = type("P", (), {"patch_um": 112.0, "patch_px": 64})()
        g = TileGrid.for_slide(s, pred)
    assert g.mpp_assumed and g.cell_px == pytest.approx(64)
    assert g.shape == (math.ceil(s.shape[0] / 64), math.ceil(s.shape[1] / 64))
