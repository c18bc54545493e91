"""PredictionStore: zarr layout, cache keys, reopen, concurrent readers, LRU bound, clear."""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest

from napari_stpredict.errors import StPredictError
from napari_stpredict.inference.grid import TileGrid
from napari_stpredict.inference.store import (
    DEFAULT_MAX_BYTES,
    PredictionStore,
    cache_max_bytes,
    clear_cache,
    default_cache_dir,
    evict_cache,
    list_cache,
    model_key,
    store_key,
)

GENES = [f"G{i}" for i in range(40)]


@pytest.fixture
def grid() -> TileGrid:
    return TileGrid((9911, 9274), 0.69, patch_um=112, patch_px=32)


def _open(root, grid, key="k1", **kw) -> PredictionStore:
    return PredictionStore.open(root, key=key, genes=GENES, grid=grid, **kw)


def _fill(store: PredictionStore, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    gh, gw = store.grid.shape
    flat = rng.choice(gh * gw, size=n, replace=False)
    cells = np.stack(np.unravel_index(flat, (gh, gw)), axis=1)
    values = rng.normal(size=(n, len(store.genes))).astype(np.float32)
    store.write(cells, values)
    return cells, values


# --------------------------------------------------------------------------- layout
def test_new_store_is_all_nan_and_not_done(tmp_path, grid):
    s = _open(tmp_path, grid)
    assert s.path == tmp_path / "k1.zarr" and s.key == "k1"
    assert s.values.shape == (len(GENES), *grid.shape)
    assert s.done.shape == grid.shape
    assert s.values.chunks[1:] == (32, 32)
    assert s.n_done == 0
    assert np.isnan(s.read("G3")).all()
    assert s.read("G3").shape == grid.shape
    assert s.grid == grid and s.genes == GENES and s.dtype == "float32"


def test_write_read_round_trip(tmp_path, grid):
    s = _open(tmp_path, grid)
    cells, values = _fill(s, 300)
    np.testing.assert_array_equal(s.read_cells(cells), values)
    np.testing.assert_array_equal(s.read_cells(cells, genes=["G5", 7]), values[:, [5, 7]])
    assert s.is_done(cells).all()
    assert s.n_done == 300
    plane = s.read("G5")
    np.testing.assert_array_equal(plane[cells[:, 0], cells[:, 1]], values[:, 5])
    other = np.ones(grid.shape, bool)
    other[cells[:, 0], cells[:, 1]] = False
    assert np.isnan(plane[other]).all()
    done = s.done_mask()
    assert done.sum() == 300 and done[cells[:, 0], cells[:, 1]].all()
    # a block read equals the same block of the whole plane
    block = s.read(5, rows=slice(10, 40), cols=slice(20, 70))
    np.testing.assert_array_equal(block, plane[10:40, 20:70])
    np.testing.assert_array_equal(
        s.done_mask(rows=slice(10, 40), cols=slice(20, 70)), done[10:40, 20:70]
    )


def test_float16_store(tmp_path, grid):
    s = _open(tmp_path, grid, dtype="float16")
    cells, values = _fill(s, 50)
    assert s.values.dtype == np.float16
    got = s.read_cells(cells)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, values, rtol=1e-3, atol=1e-3)


def test_reopen_from_disk(tmp_path, grid):
    s = _open(tmp_path, grid)
    cells, values = _fill(s, 100)
    again = _open(tmp_path, grid)  # a fresh object over the same folder
    np.testing.assert_array_equal(again.read_cells(cells), values)
    by_path = PredictionStore.from_path(s.path)
    assert by_path.genes == GENES and by_path.grid == grid and by_path.n_done == 100
    # an existing store under the same key but other genes is refused
    with pytest.raises(StPredictError, match="other genes"):
        PredictionStore.open(tmp_path, key="k1", genes=GENES[:-1], grid=grid)


def test_torn_store_folder_is_recreated(tmp_path, grid):
    s = _open(tmp_path, grid)
    _fill(s, 10)
    (s.path / "zarr.json").write_text("{ not json")
    fresh = _open(tmp_path, grid)
    assert fresh.n_done == 0


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda s: s.write(np.array([[0, 0]]), np.zeros((1, 3))), "values of shape"),
        (lambda s: s.write(np.array([[10**6, 0]]), np.zeros((1, 40))), "outside"),
        (lambda s: s.write(np.array([0, 0, 1]), np.zeros((1, 40))), "expected \\(n, 2\\)"),
        (lambda s: s.read("NOPE"), "NOPE"),
        (lambda s: s.read(99), "out of range"),
    ],
)
def test_bad_requests(tmp_path, grid, call, match):
    s = _open(tmp_path, grid)
    with pytest.raises(StPredictError, match=match):
        call(s)


def test_bad_open_arguments(tmp_path, grid):
    with pytest.raises(StPredictError, match="dtype"):
        _open(tmp_path, grid, dtype="int8")
    with pytest.raises(StPredictError, match="empty"):
        PredictionStore.open(tmp_path, key="x", genes=[], grid=grid)
    with pytest.raises(StPredictError, match="duplicates"):
        PredictionStore.open(tmp_path, key="x", genes=["A", "A"], grid=grid)
    with pytest.raises(StPredictError, match="key"):
        PredictionStore.open(tmp_path, key="../evil", genes=GENES, grid=grid)
    with pytest.raises(StPredictError, match="not a prediction store"):
        PredictionStore.from_path(tmp_path / "missing.zarr")


def test_removed_store_refuses_writes(tmp_path, grid):
    s = _open(tmp_path, grid)
    clear_cache(tmp_path)
    with pytest.raises(StPredictError, match="removed"):
        s.write(np.array([[0, 0]]), np.zeros((1, len(GENES))))


# --------------------------------------------------------------------------- concurrency
def test_concurrent_reader_never_sees_torn_or_half_written_cells(tmp_path, grid):
    writer_store = _open(tmp_path, grid)
    reader_store = PredictionStore.from_path(writer_store.path)
    gh, gw = grid.shape
    rng = np.random.default_rng(3)
    order = rng.permutation(gh * gw)[:1200]
    cells = np.stack(np.unravel_index(order, (gh, gw)), axis=1)
    values = rng.normal(size=(len(cells), len(GENES))).astype(np.float32)
    stop = threading.Event()
    problems: list[str] = []
    reads = [0]

    def reader() -> None:
        while not stop.is_set():
            try:
                done = reader_store.done_mask()
                plane = reader_store.read("G39")  # last gene block: written last per batch
                bad = done & np.isnan(plane)
                if bad.any():
                    problems.append(f"{int(bad.sum())} cells done without values")
                reads[0] += 1
            except Exception as err:  # a torn chunk would fail to decode
                problems.append(repr(err))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for k in range(0, len(cells), 40):
            writer_store.write(cells[k : k + 40], values[k : k + 40])
    finally:
        stop.set()
        t.join()
    assert not problems, problems[:3]
    assert reads[0] > 0
    np.testing.assert_array_equal(reader_store.read_cells(cells), values)


# --------------------------------------------------------------------------- cache folder
def test_the_suite_never_writes_the_user_cache(tmp_path_factory):
    """conftest points the cache into this run's temporary folder (nothing under ``~``)."""
    basetemp = tmp_path_factory.getbasetemp().resolve()
    assert basetemp in default_cache_dir().resolve().parents


def test_default_cache_dir_and_size_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("STPREDICT_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("STPREDICT_CACHE_DIR")
    d = default_cache_dir()
    assert d.name == "predictions" and "napari-stpredict" in str(d)
    monkeypatch.delenv("STPREDICT_CACHE_MAX_GB", raising=False)
    assert cache_max_bytes() == DEFAULT_MAX_BYTES
    monkeypatch.setenv("STPREDICT_CACHE_MAX_GB", "0.5")
    assert cache_max_bytes() == 2**29
    monkeypatch.setenv("STPREDICT_CACHE_MAX_GB", "lots")
    with pytest.raises(StPredictError, match="STPREDICT_CACHE_MAX_GB"):
        cache_max_bytes()


def test_open_uses_default_cache_dir(monkeypatch, tmp_path, grid):
    monkeypatch.setenv("STPREDICT_CACHE_DIR", str(tmp_path / "cache"))
    s = PredictionStore.open(None, key="abc", genes=GENES, grid=grid)
    assert s.path.parent == tmp_path / "cache"
    assert [e.path for e in list_cache()] == [s.path]


def test_lru_eviction_by_folder_mtime(tmp_path, grid):
    stores = []
    for k in range(4):
        s = _open(tmp_path, grid, key=f"s{k}", max_bytes=10**12)
        _fill(s, 400, seed=k)
        stores.append(s)
    sizes = {e.path.name: e.size for e in list_cache(tmp_path)}
    assert len(sizes) == 4 and min(sizes.values()) > 50_000
    now = time.time()
    # s2 used longest ago, then s0, s3, s1
    for name, age in [("s2", 400), ("s0", 300), ("s3", 200), ("s1", 100)]:
        os.utime(tmp_path / f"{name}.zarr", (now - age, now - age))
    assert [e.path.name for e in list_cache(tmp_path)] == [
        "s2.zarr",
        "s0.zarr",
        "s3.zarr",
        "s1.zarr",
    ]
    total = sum(sizes.values())
    limit = total - sizes["s2.zarr"] - sizes["s0.zarr"] // 2  # must drop s2 and s0
    removed = evict_cache(tmp_path, max_bytes=limit)
    assert [p.name for p in removed] == ["s2.zarr", "s0.zarr"]
    assert sorted(e.path.name for e in list_cache(tmp_path)) == ["s1.zarr", "s3.zarr"]
    # opening a store applies the bound but never evicts the store being opened
    again = _open(tmp_path, grid, key="s3", max_bytes=0)
    assert [e.path.name for e in list_cache(tmp_path)] == ["s3.zarr"]
    assert again.n_done == 400


def test_clear_cache_removes_only_stores(tmp_path, grid):
    for k in range(2):
        _fill(_open(tmp_path, grid, key=f"s{k}"), 50, seed=k)
    foreign = tmp_path / "photos.zarr"
    foreign.mkdir()
    (foreign / "zarr.json").write_text(json.dumps({"attributes": {}}))
    (tmp_path / "notes.txt").write_text("keep me")
    # a store whose metadata vanished while a writer recreated a chunk folder is ours too
    torn = tmp_path / "torn.zarr"
    (torn / "values" / "c" / "0").mkdir(parents=True)
    (torn / "values" / "c" / "0" / "1").write_bytes(b"chunk")
    freed = clear_cache(tmp_path)
    assert freed > 0
    assert not torn.exists()
    assert list_cache(tmp_path) == []
    assert foreign.exists() and (tmp_path / "notes.txt").exists()
    assert (foreign / "zarr.json").exists()
    assert clear_cache(tmp_path / "nothing-here") == 0


# --------------------------------------------------------------------------- keys
def test_store_key_depends_on_every_input(grid):
    base = store_key(slide_fingerprint="a", model="m", grid=grid)
    assert base == store_key(slide_fingerprint="a", model="m", grid=grid)
    assert base != store_key(slide_fingerprint="b", model="m", grid=grid)
    assert base != store_key(slide_fingerprint="a", model="n", grid=grid)
    assert base != store_key(slide_fingerprint="a", model="m", grid=grid, dtype="float16")
    other = TileGrid(grid.shape0, grid.mpp, patch_um=112, patch_px=32, stride_um=56)
    assert base != store_key(slide_fingerprint="a", model="m", grid=other)


def test_model_key_needs_content_hash_or_file(tmp_path):
    a = type("P", (), {"metadata": {"content_sha256": "x" * 64, "genes": GENES}, "genes": GENES})()
    b = type("P", (), {"metadata": {"content_sha256": "y" * 64, "genes": GENES}, "genes": GENES})()
    assert model_key(a) == model_key(a) and model_key(a) != model_key(b)
    f = tmp_path / "m.bin"
    f.write_bytes(b"weights-1")
    c = type("P", (), {"metadata": {}, "genes": GENES, "path": f})()
    k1 = model_key(c)
    f.write_bytes(b"weights-2")
    assert model_key(c) != k1
    with pytest.raises(StPredictError, match="cannot key"):
        model_key(type("P", (), {"metadata": {}, "genes": GENES})())


def test_model_key_includes_duck_typed_inference_settings():
    meta = {"content_sha256": "x" * 64}

    def pred(**settings):
        spec = type("Spec", (), {"tta": settings.pop("tta", None)})()
        return type("P", (), {"metadata": meta, "genes": GENES, "input_spec": spec, **settings})()

    bare = type("P", (), {"metadata": meta, "genes": GENES})()
    # a setting that is absent or None leaves the key as it was
    assert model_key(bare) == model_key(pred()) == model_key(pred(top_k=None))
    base = pred(tta=1, top_k=50, weighting="mean", temperature=0.05)
    assert model_key(base) == model_key(pred(tta=1, top_k=50, weighting="mean", temperature=0.05))
    for change in ({"tta": 8}, {"top_k": 5}, {"weighting": "softmax"}, {"temperature": 0.5}):
        settings = {"tta": 1, "top_k": 50, "weighting": "mean", "temperature": 0.05, **change}
        assert model_key(pred(**settings)) != model_key(base), change


def test_model_key_of_predictors_with_other_settings(tiny_model_file):
    """Predictor(path, tta=1) (a live view) never shares cached values with tta=8 (predict)."""
    from napari_stpredict.model import Predictor

    def key(**overrides) -> str:
        return model_key(Predictor(tiny_model_file, device="cpu", **overrides))

    file_settings = Predictor(tiny_model_file, device="cpu")
    assert key(tta=1) != key(tta=8)
    assert key(tta=1) == key(tta=1)  # same settings, same key
    # the file's own settings, given explicitly, are the same predictor
    assert model_key(file_settings) == key(
        tta=file_settings.tta,
        top_k=file_settings.top_k,
        weighting=file_settings.weighting,
        temperature=file_settings.temperature,
    )
    other_k = 1 if file_settings.top_k != 1 else 2
    assert key(top_k=other_k) != model_key(file_settings)
    assert key(temperature=file_settings.temperature * 2) != model_key(file_settings)


# --------------------------------------------------------------------------- real slide + model
def test_for_slide_with_real_slide_and_model(tmp_path, wsi_dir, tiny_model_file):
    from napari_stpredict.model import Predictor
    from napari_stpredict.slide import open_slide

    pred = Predictor(tiny_model_file, device="cpu")
    with open_slide(wsi_dir / "cmu_small_region.svs") as slide:
        grid = TileGrid.for_slide(slide, pred)
        s = PredictionStore.for_slide(slide, pred, grid, cache_dir=tmp_path)
        assert s.genes == list(pred.genes) and s.grid == grid
        assert s.info["slide"]["fingerprint"] == slide.fingerprint()
        cells = np.array([[1, 1], [2, 3]])
        s.write(cells, np.ones((2, len(pred.genes)), np.float32))
    # re-opening the slide (a new object) finds the same store and its predictions
    with open_slide(wsi_dir / "cmu_small_region.svs") as slide2:
        again = PredictionStore.for_slide(
            slide2, pred, TileGrid.for_slide(slide2, pred), cache_dir=tmp_path
        )
        assert again.path == s.path and again.is_done(cells).all()
        # another grid (half-patch stride) or dtype is another store
        half = TileGrid.for_slide(slide2, pred, stride_um=grid.patch_um / 2)
        other = PredictionStore.for_slide(slide2, pred, half, cache_dir=tmp_path)
        assert other.path != s.path and other.n_done == 0
        f16 = PredictionStore.for_slide(slide2, pred, grid, cache_dir=tmp_path, dtype="float16")
        assert f16.path != s.path
    # the same model on another slide is another store
    with open_slide(wsi_dir / "small_HE_levels.tiff", mpp=0.5) as slide3:
        third = PredictionStore.for_slide(
            slide3, pred, TileGrid.for_slide(slide3, pred), cache_dir=tmp_path
        )
        assert third.path != s.path
