"""Engine on a real slide with the real tiny model: selection, registration, cache, cancel, OOM."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from napari_stpredict.errors import Cancelled, StPredictError
from napari_stpredict.inference.engine import Engine, order_cells
from napari_stpredict.inference.grid import TileGrid
from napari_stpredict.inference.store import PredictionStore
from napari_stpredict.progress import CancelToken


class Counting:
    """Wraps a Predictor: counts model calls and patches, optionally fails or blocks."""

    def __init__(self, inner, *, oom_once_above: int | None = None) -> None:
        self.inner = inner
        self.calls = 0
        self.patches = 0
        self.sizes: list[int] = []
        self.oom_once_above = oom_once_above
        self.on_call = None
        for name in ("genes", "patch_um", "patch_px", "metadata", "device", "path"):
            setattr(self, name, getattr(inner, name))
        self.batch_size = None

    def predict(self, patches):
        self.calls += 1
        self.sizes.append(len(patches))
        if self.on_call is not None:
            self.on_call(self.calls)
        if self.oom_once_above is not None and len(patches) > self.oom_once_above:
            self.oom_once_above = None
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.patches += len(patches)
        return self.inner.predict(patches)


@pytest.fixture(scope="module")
def predictor(tiny_model_file):
    from napari_stpredict.model import Predictor

    return Predictor(tiny_model_file, device="cpu")


@pytest.fixture(scope="module")
def c2(her2st_dir, her2st_mpp):
    from napari_stpredict.slide import open_slide

    with open_slide(her2st_dir / "images" / "C2.jpg", mpp=her2st_mpp("C2")) as s:
        yield s


@pytest.fixture(scope="module")
def c2_tissue(c2, predictor):
    from napari_stpredict.slide import tissue_mask

    grid = TileGrid.for_slide(c2, predictor)
    return grid.tissue_cells(tissue_mask(c2), 0.2)


@pytest.fixture
def setup(c2, predictor, c2_tissue, tmp_path):
    """A fresh store and engine over C2 (tissue mask shared across tests: computed once)."""
    grid = TileGrid.for_slide(c2, predictor)
    store = PredictionStore.for_slide(c2, predictor, grid, cache_dir=tmp_path)
    wrapped = Counting(predictor)
    engine = Engine(c2, wrapped, grid, store, tissue=c2_tissue, batch_size=8, read_workers=2)
    yield engine, wrapped
    engine.close()


def _view_around_tissue(
    grid: TileGrid, tissue: np.ndarray, half: int = 3
) -> tuple[np.ndarray, tuple]:
    """A view rectangle (level-0 px) centred on a tissue cell near a tissue border."""
    ii, jj = np.nonzero(tissue)
    # a tissue cell next to background: the view then has both kinds
    for i, j in zip(ii, jj, strict=True):
        block = tissue[max(i - half, 0) : i + half + 1, max(j - half, 0) : j + half + 1]
        if (
            0.3 < block.mean() < 0.8
            and half <= i < tissue.shape[0] - half
            and half <= j < tissue.shape[1] - half
        ):
            break
    cy, cx = grid.cell_center_px(i, j)
    r = (half + 0.4) * grid.stride_px
    return np.array([cy - r, cx - r, cy + r, cx + r]), (cy, cx)


def _crop(slide, grid: TileGrid, i: int, j: int) -> np.ndarray:
    """The patch of cell (i, j), computed from its centre in µm (independently of cell_rect_px)."""
    cy_um = (i * grid.stride_um) + grid.patch_um / 2
    cx_um = (j * grid.stride_um) + grid.patch_um / 2
    half = grid.patch_um / 2 / slide.mpp
    y0, x0 = cy_um / slide.mpp - half, cx_um / slide.mpp - half
    p = grid.patch_px
    return slide.read_resampled(y0, x0, 2 * half, 2 * half, out_shape=(p, p))


# --------------------------------------------------------------------------- behaviour
def test_predicts_exactly_the_visible_tissue_cells(setup, c2, c2_tissue, predictor):
    engine, wrapped = setup
    grid, store = engine.grid, engine.store
    rect, center = _view_around_tissue(grid, c2_tissue)
    cells = grid.cells_in_view(*rect, margin=0)
    expected = {tuple(c) for c in cells if c2_tissue[c[0], c[1]]}
    assert 0 < len(expected) < len(cells)  # the view has tissue and background
    batches = list(engine.run(cells, center=center))
    got = {tuple(c) for b in batches for c in b.cells}
    assert got == expected
    # exactly those cells are in the store: none outside the view, no background
    done = store.done_mask()
    assert {tuple(c) for c in np.argwhere(done)} == expected
    assert wrapped.patches == len(expected)
    assert engine.stats.cells_predicted == len(expected)
    assert engine.stats.cells_background == len(cells) - len(expected)
    assert all(len(b.cells) <= 8 for b in batches)
    assert batches[-1].done == batches[-1].total == len(expected)

    # registration: a stored value equals the model's output on that crop, read independently
    sample = sorted(expected)[:: max(1, len(expected) // 6)][:6]
    crops = np.stack([_crop(c2, grid, i, j) for i, j in sample])
    ref = predictor.predict(crops)
    np.testing.assert_allclose(store.read_cells(np.array(sample)), ref, rtol=1e-4, atol=1e-4)
    # ... and the heatmap pixel under the patch centre (napari layer coordinates) holds it
    (sy, _), (ty, _) = grid.heatmap_transform()
    gene = predictor.genes[0]
    plane = store.read(gene)
    for (i, j), row in zip(sample, ref, strict=True):
        cy, cx = grid.cell_center_px(i, j)
        hit = grid.cell_at((cy - 0.5) * c2.mpp, (cx - 0.5) * c2.mpp, units="layer")
        assert hit == (i, j)
        assert round((cy - 0.5) * c2.mpp / sy - ty / sy) == i
        assert plane[hit] == pytest.approx(row[0], rel=1e-4, abs=1e-4)


def test_second_visit_and_reopened_store_make_no_model_call(setup, c2, predictor, c2_tissue):
    engine, wrapped = setup
    rect, center = _view_around_tissue(engine.grid, c2_tissue, half=2)
    cells = engine.grid.cells_in_view(*rect, margin=0)
    first = list(engine.run(cells, center=center))
    calls = wrapped.calls
    assert calls > 0 and first
    # same view again: nothing to do
    assert list(engine.run(cells, center=center)) == []
    assert wrapped.calls == calls
    assert engine.stats.cells_cached == sum(len(b.cells) for b in first)
    # an overlapping view predicts only the new cells
    shifted = engine.grid.cells_in_view(*(rect + engine.grid.stride_px), margin=0)
    new = engine.pending(shifted)
    assert not engine.store.is_done(new).any()
    list(engine.run(shifted))
    assert wrapped.patches == sum(len(b.cells) for b in first) + len(new)
    # a new store object + engine over the same cache folder (as after reopening the slide)
    store2 = PredictionStore.for_slide(
        c2, predictor, engine.grid, cache_dir=engine.store.path.parent
    )
    assert store2.path == engine.store.path
    fresh = Counting(predictor)
    with Engine(c2, fresh, engine.grid, store2, tissue=c2_tissue) as engine2:
        assert list(engine2.run(cells)) == [] and list(engine2.run(shifted)) == []
    assert fresh.calls == 0


def test_order_is_from_the_centre_outward(setup, c2_tissue):
    engine, _ = setup
    grid = engine.grid
    rect, _ = _view_around_tissue(grid, c2_tissue, half=3)
    cells = grid.cells_in_view(*rect, margin=0)
    # start from a corner of the view, not its middle
    center = (rect[0], rect[1])
    order = np.concatenate([b.cells for b in engine.run(cells, center=center)])
    d = np.hypot(*(grid.cell_centers_px(order) - np.array(center)).T)
    assert (np.diff(d) >= -1e-9).all()
    assert d[0] < d[-1]
    # the pure function agrees, and defaults to the cells' mean
    np.testing.assert_array_equal(order_cells(order[::-1], grid, center), order)
    mean_first = order_cells(cells, grid, None)[0]
    m = grid.cell_centers_px(cells).mean(axis=0)
    assert np.hypot(*(grid.cell_centers_px(mean_first[None]) - m).T)[0] <= grid.stride_px


def test_cancel_stops_within_one_batch(setup, c2_tissue):
    engine, wrapped = setup
    rect, center = _view_around_tissue(engine.grid, c2_tissue, half=4)
    cells = engine.grid.cells_in_view(*rect, margin=0)
    assert len(engine.pending(cells)) > 3 * 8
    token = CancelToken()
    # cancel while the model is busy with its second batch
    wrapped.on_call = lambda n: token.cancel() if n == 2 else None
    seen = []
    with pytest.raises(Cancelled):
        for b in engine.run(cells, center=center, cancel=token):
            seen.append(b)
    assert wrapped.calls == 2  # the batch in progress finished, no further one started
    assert len(seen) == 2
    # finished batches are kept in the store; nothing else is marked done
    assert engine.store.n_done == sum(len(b.cells) for b in seen)
    assert not [t for t in threading.enumerate() if t.name == "stpredict-store-writer"]


def test_closing_the_iterator_keeps_finished_batches(setup, c2_tissue):
    engine, wrapped = setup
    rect, center = _view_around_tissue(engine.grid, c2_tissue, half=4)
    it = engine.run(engine.grid.cells_in_view(*rect, margin=0), center=center)
    first = next(it)
    it.close()
    assert wrapped.calls == 1
    assert engine.store.is_done(first.cells).all() and engine.store.n_done == len(first.cells)


def test_cache_cleared_during_a_run_is_a_clear_error(setup, c2_tissue):
    from napari_stpredict.inference.store import clear_cache

    engine, wrapped = setup
    rect, center = _view_around_tissue(engine.grid, c2_tissue, half=4)
    # the user clears the cache while the model works on the second batch
    wrapped.on_call = lambda n: clear_cache(engine.store.path.parent) if n == 2 else None
    with pytest.raises(StPredictError, match="removed"):
        list(engine.run(engine.grid.cells_in_view(*rect, margin=0), center=center))
    assert wrapped.calls <= 3
    assert not [t for t in threading.enumerate() if t.name == "stpredict-store-writer"]


def test_out_of_memory_halves_the_batch_and_goes_on(c2, predictor, c2_tissue, tmp_path):
    grid = TileGrid.for_slide(c2, predictor)
    store = PredictionStore.for_slide(c2, predictor, grid, cache_dir=tmp_path)
    wrapped = Counting(predictor, oom_once_above=4)
    rect, center = _view_around_tissue(grid, c2_tissue, half=2)
    cells = grid.cells_in_view(*rect, margin=0)
    with Engine(c2, wrapped, grid, store, tissue=c2_tissue, batch_size=8) as engine:
        n = len(engine.pending(cells))
        assert n > 8
        with pytest.warns(RuntimeWarning, match="out of memory"):
            results = list(engine.run(cells, center=center))
        assert engine.batch_size == 4 and engine.stats.oom_halvings == 1
    assert wrapped.sizes[0] == 8 and max(wrapped.sizes[1:]) == 4
    assert sum(len(b.cells) for b in results) == n == store.n_done
    assert results[-1].batch_size == 4
    # the values are right despite the retry
    some = np.concatenate([b.cells for b in results])[:4]
    ref = predictor.predict(np.stack([_crop(c2, grid, i, j) for i, j in some]))
    np.testing.assert_allclose(store.read_cells(some), ref, rtol=1e-4, atol=1e-4)


def test_out_of_memory_at_batch_one_is_an_error(c2, predictor, c2_tissue, tmp_path):
    grid = TileGrid.for_slide(c2, predictor)
    store = PredictionStore.for_slide(c2, predictor, grid, cache_dir=tmp_path)
    wrapped = Counting(predictor, oom_once_above=0)
    rect, center = _view_around_tissue(grid, c2_tissue, half=1)
    with (
        Engine(c2, wrapped, grid, store, tissue=c2_tissue, batch_size=1) as engine,
        pytest.raises(StPredictError, match=r"out of memory.*batch size 1"),
    ):
        list(engine.run(grid.cells_in_view(*rect, margin=0), center=center))
    assert store.n_done == 0


def test_progress_and_bad_input(setup):
    engine, _ = setup
    calls = []
    cells = np.argwhere(engine.tissue)[:10]
    list(engine.run(cells, progress=lambda d, t, m="": calls.append((d, t))))
    assert calls[0] == (0, 10) and calls[-1] == (10, 10)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    # a per-run batch size does not change the engine's default
    more = np.argwhere(engine.tissue)[10:17]
    sizes = [len(b.cells) for b in engine.run(more, batch_size=3)]
    assert sizes == [3, 3, 1] and engine.batch_size == 8
    with pytest.raises(StPredictError, match="outside"):
        list(engine.run(np.array([[10**6, 0]])))
    with pytest.raises(StPredictError, match="batch_size"):
        list(engine.run(cells, batch_size=0))
    with pytest.raises(StPredictError, match="mask of shape"):
        list(engine.run(np.ones((3, 3), bool)))


def test_engine_refuses_mismatched_store(c2, predictor, tmp_path):
    grid = TileGrid.for_slide(c2, predictor)
    other = TileGrid.for_slide(c2, predictor, stride_um=grid.patch_um / 2)
    store = PredictionStore.for_slide(c2, predictor, other, cache_dir=tmp_path)
    with pytest.raises(StPredictError, match="grid"):
        Engine(c2, predictor, grid, store)


def test_half_patch_stride_registration(c2, predictor, c2_tissue, tmp_path):
    grid = TileGrid.for_slide(c2, predictor, stride_um=predictor.patch_um / 2)
    assert grid.stride_px == pytest.approx(grid.cell_px / 2)
    store = PredictionStore.for_slide(c2, predictor, grid, cache_dir=tmp_path)
    # overlapping neighbours around the centre of a tissue cell of the plain grid
    i, j = np.argwhere(c2_tissue)[len(np.argwhere(c2_tissue)) // 2]
    cells = np.array(
        [[2 * i, 2 * j], [2 * i, 2 * j + 1], [2 * i + 1, 2 * j], [2 * i + 1, 2 * j + 1]]
    )
    with Engine(c2, predictor, grid, store, tissue=None, batch_size=4) as engine:
        assert sum(len(b.cells) for b in engine.run(cells)) == 4
    ref = predictor.predict(np.stack([_crop(c2, grid, a, b) for a, b in cells]))
    np.testing.assert_allclose(store.read_cells(cells), ref, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- whole slides
def test_predict_all_tissue_on_a_real_svs(wsi_dir, predictor, tmp_path):
    """Whole slide with the automatic tissue mask: tissue cells only, then all cached."""
    from napari_stpredict.slide import open_slide, tissue_mask

    with open_slide(wsi_dir / "cmu_small_region.svs") as slide:
        grid = TileGrid.for_slide(slide, predictor)
        store = PredictionStore.for_slide(slide, predictor, grid, cache_dir=tmp_path)
        wrapped = Counting(predictor)
        with Engine(slide, wrapped, grid, store, batch_size=16) as engine:
            summary = engine.predict_all_tissue()
            expected = grid.tissue_cells(tissue_mask(slide), 0.2)
            np.testing.assert_array_equal(engine.tissue, expected)
            assert 0 < expected.sum() < expected.size
            np.testing.assert_array_equal(store.done_mask(), expected)
            assert summary.predicted == summary.tissue == int(expected.sum())
            assert summary.model_calls == wrapped.calls > 0
            again = engine.predict_all_tissue()
            assert again.predicted == 0 and again.model_calls == 0
            assert again.cached == summary.tissue


def test_slide_closed_while_predicting_is_a_clear_error(wsi_dir, predictor, tmp_path):
    """E.g. the slide layer was removed: the run ends with a SlideError, no thread left behind."""
    from napari_stpredict.errors import SlideError
    from napari_stpredict.slide import open_slide

    slide = open_slide(wsi_dir / "cmu_small_region.svs")
    grid = TileGrid.for_slide(slide, predictor)
    store = PredictionStore.for_slide(slide, predictor, grid, cache_dir=tmp_path)
    wrapped = Counting(predictor)
    wrapped.on_call = lambda n: slide.close() if n == 1 else None
    with Engine(slide, wrapped, grid, store, tissue=None, batch_size=4, prefetch=0) as engine:
        with pytest.raises(SlideError, match="closed"):
            list(engine.run(np.argwhere(np.ones(grid.shape, bool))[:40]))
        assert wrapped.calls == 1
    assert store.n_done == 4  # the batch predicted before the slide went away is kept
    assert not [t for t in threading.enumerate() if t.name == "stpredict-store-writer"]


def test_slide_without_mpp_uses_the_model_scale(mob_dir, predictor, tmp_path):
    from napari_stpredict.slide import open_slide

    with open_slide(mob_dir / "MOB1.jpg") as slide:
        assert slide.mpp is None
        grid = TileGrid.for_slide(slide, predictor)
        assert grid.mpp_assumed and grid.cell_px == pytest.approx(predictor.patch_px)
        store = PredictionStore.for_slide(slide, predictor, grid, cache_dir=tmp_path)
        with Engine(slide, predictor, grid, store, tissue=None, batch_size=4) as engine:
            cells = np.array([[3, 4], [5, 6], [7, 8]])
            list(engine.run(cells))
        p = predictor.patch_px
        ref = predictor.predict(
            np.stack([slide.read_region(0, i * p, j * p, p, p) for i, j in cells])
        )
        np.testing.assert_allclose(store.read_cells(cells), ref, rtol=1e-4, atol=1e-4)
