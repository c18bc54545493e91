"""The prediction session, engine reads/writes (issue 16) and store safety (issue 14).

- engine predictions are bit-identical to the per-patch ``read_resampled`` + model path;
- every field of view of the model is read (context), the spread is stored;
- buffered whole-block writes keep every prediction; large runs go block by block;
- a store is only deleted when it carries our ownership marker; a per-output lock makes a
  second process refuse; a corrupted chunk is reported by path and healed.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from napari_stpredict.errors import StPredictError
from napari_stpredict.inference import Engine, PredictionStore, TileGrid
from napari_stpredict.inference import engine as engine_mod
from napari_stpredict.inference.grid import layer_placement
from napari_stpredict.inference.protocol import PredictorProtocol
from napari_stpredict.inference.session import PredictSession, open_session
from napari_stpredict.inference.store import is_our_store, remove_store


# --------------------------------------------------------------------------- fakes
class ExactModel:
    """A model whose output is an exact function of the pixels (integer sums in float32).

    Gene ``k`` = sum of channel ``k % 3`` over quadrant ``(k // 3) % 4`` of field ``k // 12``.
    """

    def __init__(self, patch_px=64, patch_um=112.0, n_fields=1, spread=False):
        self.patch_px = patch_px
        self.patch_um = patch_um
        self.genes = [f"G{k}" for k in range(12 * n_fields)]
        self.metadata = {"content_sha256": f"exact-{n_fields}-{spread}", "method": "exact"}
        self.device = "cpu"
        self.path = Path("exact.safetensors")
        self.batch_size = 16
        self.calls: list[np.ndarray] = []
        self.has_uncertainty = spread
        if n_fields > 1:
            self.input_spec = _Spec(patch_um, patch_px, float(n_fields))

    def predict(self, x, return_spread=False):
        x = np.asarray(x)
        self.calls.append(x.copy())
        if x.ndim == 4:
            x = x[:, None]
        h = self.patch_px // 2
        out = []
        for f in range(x.shape[1]):
            for q in range(4):
                blk = x[:, f, (q // 2) * h : (q // 2 + 1) * h, (q % 2) * h : (q % 2 + 1) * h]
                out.append(blk.reshape(len(x), -1, 3).sum(axis=1, dtype=np.int64))
        v = np.concatenate(out, axis=1).astype(np.float32)
        if return_spread:
            return v, np.full_like(v, 0.5)
        return v


@dataclass(frozen=True)
class _Spec:
    patch_um: float
    patch_px: int
    context: float

    def fields(self):
        return [(self.patch_um, self.patch_px), (self.patch_um * self.context, self.patch_px)]


@pytest.fixture(scope="module")
def c3(her2st_dir):
    from napari_stpredict.slide import open_slide

    with open_slide(her2st_dir / "images" / "C3.jpg", mpp=0.6) as s:
        yield s


def _tissue_cells(grid, n, seed=0):
    gh, gw = grid.shape
    ii, jj = np.mgrid[gh // 4 : 3 * gh // 4, gw // 4 : 3 * gw // 4]
    cells = np.stack([ii.ravel(), jj.ravel()], 1)
    return cells[np.random.default_rng(seed).permutation(len(cells))[:n]]


def _reference_patch(slide, grid, cell, factor=1.0):
    y0, x0, y1, x1 = grid.cell_rect_px(*cell)
    h = (y1 - y0) * factor
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    if factor == 1.0:
        return slide.read_resampled(y0, x0, y1 - y0, x1 - x0, out_shape=(grid.patch_px,) * 2)
    return slide.read_resampled(cy - h / 2, cx - h / 2, h, h, out_shape=(grid.patch_px,) * 2)


# --------------------------------------------------------------------------- engine
def test_engine_predictions_bit_identical_to_per_patch_reads(c3, tmp_path, tiny_model_file):
    """The real model: each engine batch equals predict() on per-patch read_resampled crops."""
    from napari_stpredict.model import Predictor

    pred = Predictor(tiny_model_file, device="cpu")
    assert isinstance(pred, PredictorProtocol)
    grid = TileGrid.for_slide(c3, pred, stride_um=70.0)  # overlapping, fractional offsets
    store = PredictionStore.for_slide(c3, pred, grid, cache_dir=tmp_path)
    cells = _tissue_cells(grid, 40)
    with Engine(c3, pred, grid, store, tissue=None, batch_size=8, read_workers=2) as eng:
        batches = list(eng.run(cells))
        assert eng.stats.tiles_reused > 0
    for b in batches:
        patches = np.stack([_reference_patch(c3, grid, c) for c in b.cells])
        np.testing.assert_array_equal(b.values, pred.predict(patches))
        np.testing.assert_array_equal(store.read_cells(b.cells), b.values)


@pytest.mark.parametrize("n_fields", [1, 2])
def test_resize_on_device_gives_the_model_the_same_pixels(c3, tmp_path, n_fields):
    """Resizing on the model's device (the torch port of Pillow; CPU here, CUDA in use): the
    readers cut stored windows only, and the model still sees per-patch read_resampled pixels."""
    model = ExactModel(n_fields=n_fields)
    grid = TileGrid.for_slide(c3, model, stride_um=70.0)  # fractional offsets, downscaled
    store = PredictionStore.for_slide(c3, model, grid, cache_dir=tmp_path)
    cells = _tissue_cells(grid, 40, seed=2)
    with Engine(
        c3, model, grid, store, tissue=None, batch_size=16, read_workers=2, resize_on_device=True
    ) as eng:
        assert eng._reader.resize_device == "cpu"
        got = list(eng.run(cells))
    seen = np.concatenate(model.calls)
    for k, cell in enumerate(np.concatenate([b.cells for b in got])):
        fields = seen[k] if n_fields > 1 else seen[k][None]
        np.testing.assert_array_equal(fields[0], _reference_patch(c3, grid, cell))
        if n_fields > 1:
            np.testing.assert_array_equal(fields[1], _reference_patch(c3, grid, cell, 2.0))


def test_resize_on_device_failure_falls_back_to_pillow(c3, tmp_path, monkeypatch):
    """A device resize that fails warns once and the batch is read with Pillow: same pixels."""
    from napari_stpredict.inference import batch_reader

    def broken(*args, **kwargs):
        raise RuntimeError("no such kernel")

    monkeypatch.setattr(batch_reader, "resize_windows", broken)
    model = ExactModel()
    grid = TileGrid.for_slide(c3, model, stride_um=70.0)
    store = PredictionStore.for_slide(c3, model, grid, cache_dir=tmp_path)
    cells = _tissue_cells(grid, 20, seed=3)
    with Engine(
        c3, model, grid, store, tissue=None, batch_size=8, read_workers=2, resize_on_device=True
    ) as eng:
        with pytest.warns(RuntimeWarning, match="no such kernel"):
            got = list(eng.run(cells))
        assert eng.resize_device is None  # Pillow from now on
    seen = np.concatenate(model.calls)
    for k, cell in enumerate(np.concatenate([b.cells for b in got])):
        np.testing.assert_array_equal(seen[k], _reference_patch(c3, grid, cell))


def test_resize_on_device_predictions_bit_identical(c3, tmp_path, tiny_model_file):
    """The real model fed by the device resize (a torch tensor) predicts what it predicts on
    per-patch read_resampled crops."""
    from napari_stpredict.model import Predictor

    pred = Predictor(tiny_model_file, device="cpu")
    grid = TileGrid.for_slide(c3, pred, stride_um=70.0)
    store = PredictionStore.for_slide(c3, pred, grid, cache_dir=tmp_path)
    cells = _tissue_cells(grid, 24)
    with Engine(
        c3, pred, grid, store, tissue=None, batch_size=8, read_workers=2, resize_on_device=True
    ) as eng:
        batches = list(eng.run(cells))
    for b in batches:
        patches = np.stack([_reference_patch(c3, grid, c) for c in b.cells])
        np.testing.assert_array_equal(b.values, pred.predict(patches))


def test_block_ordered_run_with_context_and_spread(c3, tmp_path, monkeypatch):
    """A large run: block order, both fields read, values + spread stored exactly."""
    monkeypatch.setattr(engine_mod, "BLOCK_ORDER_MIN", 50)
    model = ExactModel(n_fields=2, spread=True)
    grid = TileGrid.for_slide(c3, model, stride_um=40.0)
    store = PredictionStore.for_slide(c3, model, grid, cache_dir=tmp_path)
    assert store.spread is not None
    cells = _tissue_cells(grid, 400, seed=1)
    with Engine(c3, model, grid, store, tissue=None, batch_size=32, read_workers=2) as eng:
        assert len(eng.fields) == 2
        got = list(eng.run(cells))
        assert eng.stats.blocks_written >= 1
    order = np.concatenate([b.cells for b in got])
    assert sorted(map(tuple, order)) == sorted(map(tuple, cells))
    blocks = order // np.array(store.block_shape)
    changes = (np.diff(blocks, axis=0) != 0).any(axis=1).sum()
    assert changes == len(np.unique(blocks, axis=0)) - 1  # one visit per block
    # the model saw the patch and the 2× context field of each cell, bit for bit
    x = model.calls[0]
    assert x.shape[1:] == (2, 64, 64, 3)
    for k in (0, 5):
        cell = got[0].cells[k]
        np.testing.assert_array_equal(x[k, 0], _reference_patch(c3, grid, cell))
        np.testing.assert_array_equal(x[k, 1], _reference_patch(c3, grid, cell, 2.0))
    allv = np.concatenate([b.values for b in got])
    np.testing.assert_array_equal(store.read_cells(order), allv)
    assert np.asarray(store.spread.vindex[0, order[:, 0], order[:, 1]] == 0.5).all()
    assert store.n_done == len(cells)


# --------------------------------------------------------------------------- session
def test_open_session_builds_the_recipe_once(her2st_dir, tmp_path):
    model = ExactModel()
    s = open_session(
        slide_path=her2st_dir / "images" / "C3.jpg", predictor=model, mpp=0.6, cache_dir=tmp_path
    )
    with s:
        assert isinstance(s, PredictSession)
        assert s.grid == TileGrid.for_slide(s.slide, model)
        assert s.tissue.shape == s.grid.shape and 0 < s.tissue.sum() < s.tissue.size
        assert s.store.path.parent == tmp_path and s.engine.store is s.store
        cells = s.tissue_cell_list()[:20]
        list(s.engine.run(cells))
        assert len(s.missing(cells)) == 0
    assert s.slide._closed
    # the Qt module re-exports the same objects
    pytest.importorskip("qtpy")
    from napari_stpredict.widgets import _live

    assert _live.open_session is open_session and _live.PredictSession is PredictSession


def test_layer_placement_matches_heatmap_transform():
    g = TileGrid((1000, 2000), 0.5, patch_um=112, patch_px=224, stride_um=56)
    assert layer_placement(g) == g.heatmap_transform()
    (sy, sx), (ty, tx) = layer_placement(g, slide_scale=(0.5, 0.5), slide_translate=(10, 20))
    assert (sy, sx) == (56.0, 56.0)
    # cell (0, 0) centre = level-0 112 px → world translate + scale * (112 - 0.5)
    assert ty == pytest.approx(10 + 0.5 * (112 - 0.5)) and tx == pytest.approx(20 + 0.5 * 111.5)


# --------------------------------------------------------------------------- store safety
class _Slide:
    def __init__(self, fp="slide-fp"):
        self.path = Path("fake.tif")
        self._fp = fp

    def fingerprint(self):
        return self._fp


def _grid():
    return TileGrid((640, 640), 0.5, patch_um=32, patch_px=64)


def test_ome_zarr_slide_at_store_path_is_refused_not_deleted(tmp_path, her2st_dir):
    from napari_stpredict.slide import open_slide, write_ome_zarr

    target = tmp_path / "out" / "predictions.zarr"
    target.parent.mkdir()
    with open_slide(her2st_dir / "images" / "C3.jpg", mpp=0.6) as src:
        write_ome_zarr(src, target, tile=512)
    before = sorted(p.name for p in target.iterdir())
    assert not is_our_store(target)
    with pytest.raises(StPredictError, match="not a napari-stpredict prediction store"):
        PredictionStore.open_at(target, slide=_Slide(), predictor=ExactModel(), grid=_grid())
    assert sorted(p.name for p in target.iterdir()) == before
    with pytest.raises(StPredictError, match="refusing"):
        remove_store(target)
    with open_slide(target) as again:  # still a readable slide
        assert again.shape[0] > 0
    # also in the cache: a foreign folder under our key is refused, not deleted
    with pytest.raises(StPredictError, match="refusing"):
        PredictionStore.open(tmp_path / "out", key="predictions", genes=["A"], grid=_grid())
    assert target.exists()


def test_open_at_reuses_same_identity_and_replaces_only_our_other_store(tmp_path):
    path = tmp_path / "predictions.zarr"
    m = ExactModel()
    with PredictionStore.open_at(path, slide=_Slide(), predictor=m, grid=_grid()) as s:
        assert s.info["owner"] == "napari-stpredict" and is_our_store(path)
        s.write(np.array([[1, 1]]), np.ones((1, len(m.genes))))
    with PredictionStore.open_at(path, slide=_Slide(), predictor=m, grid=_grid()) as s:
        assert s.n_done == 1  # same slide + model + grid: reused
    with PredictionStore.open_at(path, slide=_Slide("other"), predictor=m, grid=_grid()) as s:
        assert s.n_done == 0  # our store for another slide content: replaced


def _hold_store(path: str, ready, release) -> None:
    s = PredictionStore.open_at(Path(path), slide=_Slide(), predictor=ExactModel(), grid=_grid())
    ready.set()
    release.wait(60)
    s.close()


def test_second_process_refuses_a_locked_output_in_one_line(tmp_path):
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    path = tmp_path / "predictions.zarr"
    proc = ctx.Process(target=_hold_store, args=(str(path), ready, release))
    proc.start()
    try:
        assert ready.wait(120), "the first process did not open the store"
        with pytest.raises(StPredictError) as err:
            PredictionStore.open_at(path, slide=_Slide(), predictor=ExactModel(), grid=_grid())
        assert "in use by another stpredict process" in str(err.value)
        assert "\n" not in str(err.value)
        assert is_our_store(path)  # the first process' store is untouched
        t0 = time.monotonic()
        release.set()
        # waiting instead of refusing: gets the store once the first process lets go
        s = PredictionStore.open_at(
            path, slide=_Slide(), predictor=ExactModel(), grid=_grid(), lock_timeout=60
        )
        assert time.monotonic() - t0 < 60
        s.close()
    finally:
        release.set()
        proc.join(30)
    assert proc.exitcode == 0


def _try_open_at(path: str, result) -> None:
    try:
        s = PredictionStore.open_at(
            Path(path), slide=_Slide(), predictor=ExactModel(), grid=_grid(), lock_timeout=0
        )
    except StPredictError as err:
        result.put(str(err))
    else:
        s.close()
        result.put("ok")


def _open_in_other_process(path: Path) -> str:
    ctx = mp.get_context("spawn")
    result = ctx.Queue()
    proc = ctx.Process(target=_try_open_at, args=(str(path), result))
    proc.start()
    try:
        return result.get(timeout=120)
    finally:
        proc.join(30)


def test_session_close_releases_the_store_lock(tmp_path, c3, monkeypatch):
    """Closing a session (widget, ``view``, cohort) frees its output for another process."""
    path = tmp_path / "out" / "predictions.zarr"
    s = open_session(slide=c3, predictor=ExactModel(), store_path=path)
    assert s.store._file_lock is not None  # held while the session is open
    assert "in use by another stpredict process" in _open_in_other_process(path)
    s.close()
    s.close()  # idempotent
    assert s.engine._closed and not c3._closed  # a slide it did not open stays open
    assert _open_in_other_process(path) == "ok"

    # a session that fails half-way releases the lock it took, too
    def broken_engine(*a, **k):
        raise RuntimeError("engine failed")

    monkeypatch.setattr(engine_mod, "Engine", broken_engine)
    with pytest.raises(RuntimeError, match="engine failed"):
        open_session(slide=c3, predictor=ExactModel(), store_path=path)
    assert _open_in_other_process(path) == "ok"


def test_corrupted_chunk_is_reported_by_path_and_healed(tmp_path, c3):
    model = ExactModel()
    grid = TileGrid.for_slide(c3, model)
    path = tmp_path / "predictions.zarr"
    cells = _tissue_cells(grid, 60)
    s = PredictionStore.open_at(path, slide=c3, predictor=model, grid=grid)
    with Engine(c3, model, grid, s, tissue=None) as eng:
        list(eng.run(cells))
    before = s.read_cells(cells)
    s.close()
    chunk = next((path / "values" / "c").rglob("*"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    chunk.write_bytes(b"\x28\xb5\x2f\xfd garbage, not zstd")
    everywhere = np.ones(grid.shape, bool)
    with pytest.warns(RuntimeWarning, match="broken chunk"):
        session = open_session(slide=c3, predictor=model, store_path=path, tissue=everywhere)
    with session:
        assert str(chunk) in session.warnings[0]
        lost = session.missing(cells)
        assert 0 < len(lost) <= len(cells)
        assert not chunk.exists()
        list(session.engine.run(cells))  # the lost cells are predicted again
        assert len(session.missing(cells)) == 0
        np.testing.assert_array_equal(session.store.read_cells(cells), before)
        again = session.store.verify()
        assert again.broken_chunks == [] and again.cells_reset == 0
    assert not c3._closed  # the caller's slide stays open
