"""Direct whole-chunk writes of a store: the same bytes as zarr's own writes, atomic, fallback."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import GzipCodec

from napari_stpredict.inference.grid import TileGrid
from napari_stpredict.inference.store import PredictionStore
from napari_stpredict.inference.store_chunks import DirectChunks

GENES = [f"G{i}" for i in range(40)]  # a full gene chunk (32) and a partial one (8)


@pytest.fixture
def grid() -> TileGrid:
    # 61 × 57 cells: 2 × 2 blocks of 32, the right and bottom ones partial
    return TileGrid((9911, 9274), 0.69, patch_um=112, patch_px=32)


def _write_sequence(store: PredictionStore, seed: int = 0) -> None:
    """Every block of the grid, part-filled, then its other cells (the keep path), + spread."""
    rng = np.random.default_rng(seed)
    bh, bw = store.block_shape
    nbi, nbj = -(-store.grid.shape[0] // bh), -(-store.grid.shape[1] // bw)
    for bi in range(nbi):
        for bj in range(nbj):
            r0, r1, c0, c1 = store.block_bounds(bi, bj)
            first = rng.random((r1 - r0, c1 - c0)) < 0.4
            for mask in (first, ~first):
                values = rng.normal(size=(len(GENES), r1 - r0, c1 - c0)).astype(store.dtype)
                spread = np.abs(values) if store.spread is not None else None
                store.write_block(bi, bj, values, mask, spread)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.name not in ("zarr.json", ".lock")
    }


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_direct_writes_are_byte_identical_to_zarr_writes(tmp_path, grid, dtype):
    direct = PredictionStore.open(
        tmp_path / "a", key="k", genes=GENES, grid=grid, dtype=dtype, spread=True
    )
    through_zarr = PredictionStore.open(
        tmp_path / "b", key="k", genes=GENES, grid=grid, dtype=dtype, spread=True
    )
    assert all(d is not None for d in direct.chunk_files.values())
    through_zarr.chunk_files.clear()  # the zarr path, for reference
    _write_sequence(direct)
    _write_sequence(through_zarr)

    files_a, files_b = _files(direct.path), _files(through_zarr.path)
    assert files_a.keys() == files_b.keys()
    assert any(k.startswith("values/c/1/1/1") for k in files_a)  # the partial corner chunk
    assert files_a == files_b
    assert direct.n_done == grid.shape[0] * grid.shape[1]
    np.testing.assert_array_equal(direct.values[:], through_zarr.values[:])
    np.testing.assert_array_equal(direct.spread[:], through_zarr.spread[:])
    assert not any(name.endswith(".partial") for name in files_a)


def test_direct_writes_read_back_through_zarr_and_verify(tmp_path, grid):
    store = PredictionStore.open(tmp_path, key="k", genes=GENES, grid=grid)
    rng = np.random.default_rng(3)
    cells = np.array([[0, 0], [31, 31], [32, 0], [60, 56], [45, 40]])
    values = rng.normal(size=(len(cells), len(GENES))).astype(np.float32)
    store.write(cells, values)

    reopened = PredictionStore.open(tmp_path, key="k", genes=GENES, grid=grid)
    np.testing.assert_array_equal(reopened.read_cells(cells), values)
    assert reopened.n_done == len(cells)
    report = reopened.verify(heal=False)
    assert report.broken_chunks == [] and report.cells_reset == 0


def test_failed_chunk_write_leaves_old_chunk_and_no_temporary_file(tmp_path, grid, monkeypatch):
    store = PredictionStore.open(tmp_path, key="k", genes=GENES, grid=grid)
    mask = np.ones((32, 32), bool)
    store.write_block(0, 0, np.ones((len(GENES), 32, 32), np.float32), mask)
    before = _files(store.path)

    def no_replace(src, dst):
        raise OSError("disc full")

    monkeypatch.setattr(os, "replace", no_replace)
    with pytest.raises(OSError, match="disc full"):
        store.write_block(0, 0, np.full((len(GENES), 32, 32), 2.0, np.float32), mask)
    monkeypatch.undo()
    assert _files(store.path) == before
    assert store.read("G0", rows=slice(0, 32), cols=slice(0, 32)).tolist() == [[1.0] * 32] * 32


def test_other_layouts_go_through_zarr(tmp_path):
    group = zarr.open_group(tmp_path / "g.zarr", mode="w")
    gzip = group.create_array(
        "gzip", shape=(4, 8), chunks=(2, 4), dtype="float32", compressors=[GzipCodec()]
    )
    plain = group.create_array(
        "plain", shape=(4, 8), chunks=(2, 4), dtype="float32", compressors=None
    )
    sharded = group.create_array(
        "sharded", shape=(4, 8), chunks=(2, 4), shards=(4, 8), dtype="float32"
    )
    for arr in (gzip, plain, sharded):
        assert DirectChunks.for_array(arr, tmp_path / "g.zarr" / arr.basename) is None


def test_missing_chunk_reads_as_fill_value(tmp_path, grid):
    store = PredictionStore.open(tmp_path, key="k", genes=GENES, grid=grid)
    chunk = store.chunk_files["values"].read((1, 1, 0))
    assert chunk.shape == (32, 32, 32) and np.isnan(chunk).all()
    assert not store.chunk_files["done"].read((0, 0)).any()
