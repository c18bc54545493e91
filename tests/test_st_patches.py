"""Training patch dataset on real sections: geometry, normalisation, augmentation, threads."""

from __future__ import annotations

import pickle
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from napari_stpredict.errors import DatasetError
from napari_stpredict.model.preprocess import IMAGENET_MEAN, IMAGENET_STD, InputSpec
from napari_stpredict.slide import open_slide
from napari_stpredict.st import PatchDataset, normalize, read_sections, select_genes


@pytest.fixture(scope="module")
def a2(her2st_dir, benchmarks_data_dir):
    (a,) = read_sections(benchmarks_data_dir / "her2st.yaml", sections=["A2"])
    return a


@pytest.fixture(scope="module")
def mob1(mob_dir, benchmarks_data_dir):
    (a,) = read_sections(benchmarks_data_dir / "mob.yaml", sections=["MOB1"])
    return a


@pytest.fixture(scope="module")
def genes(a2):
    return select_genes([a2], n_top=64)


def _to_uint8(t: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (t * std + mean).mul(255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def _corner_means(path: str, size: float, out: int) -> float:
    """Mean intensity of four corner crops (background glass / masked area) of an image."""
    with open_slide(path) as s:
        h, w = s.shape
        boxes = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size)]
        return float(
            np.mean(
                [s.read_resampled(y, x, size, size, out_shape=(out, out)).mean() for y, x in boxes]
            )
        )


def test_items_shapes_and_normalisation(a2, mob1, genes):
    mob_genes = select_genes([mob1], n_top=32)
    ds = PatchDataset([a2[:20].copy()], genes, patch_um=112.0, patch_px=64, augment=False)
    assert len(ds) == 20 and ds.n_genes == len(genes)
    item = ds[3]
    assert set(item) == {"image", "expr", "section", "index"}
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert item["expr"].shape == (len(genes),) and item["expr"].dtype == torch.float32
    assert item["section"] == "A2" and item["index"] == 3
    # ImageNet normalisation undone gives back the crop's pixels
    assert np.array_equal(_to_uint8(item["image"]), ds.read_patch(3))
    # another spec (the backbone's own mean/std) changes only the normalisation
    half = InputSpec(112.0, 64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    other = PatchDataset([a2[:20].copy()], genes, patch_px=64, input_spec=half)
    x = other[3]["image"]
    assert torch.allclose(
        x, torch.from_numpy(ds.read_patch(3)).permute(2, 0, 1) / 127.5 - 1, atol=1e-6
    )
    assert other.config()["image_normalization"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    # expression: log1p(counts / library size over ALL genes × 1e4) of the panel genes
    X = sp.csr_matrix(a2.X[:20])
    cols = a2.var_names.get_indexer(genes)
    expected = normalize(X[:, cols], library_size=np.asarray(X.sum(axis=1)).ravel())
    assert item["expr"].numpy() == pytest.approx(expected[3])
    assert ds.expression.shape == (20, len(genes))
    assert ds.spot_names[3] == f"A2:{a2.obs_names[3]}"
    m = PatchDataset(
        [mob1[:10].copy()],
        mob_genes,
        patch_px=32,
        normalization={"method": "log1p", "target_sum": 1e4},
    )
    assert m[0]["expr"].numpy() == pytest.approx(np.log1p(X_dense(mob1[:10], mob_genes)[0]))
    assert m.config()["normalization"] == {"method": "log1p", "target_sum": 1e4}


def X_dense(a, genes):
    return a[:, genes].X.toarray()


def test_patch_is_fixed_physical_size_centred_on_spot(a2, genes):
    mpp = a2.uns["stpredict"]["mpp"]
    ds = PatchDataset([a2[:5].copy()], genes, patch_um=112.0, patch_px=48)
    assert ds.patch_size_px == [pytest.approx(112.0 / mpp)]
    half = PatchDataset([a2[:5].copy()], genes, patch_um=56.0, patch_px=48)
    assert half.patch_size_px[0] == pytest.approx(ds.patch_size_px[0] / 2)
    # the crop is read with read_resampled around the spot centre
    x, y = a2.obsm["spatial"][2]
    s = ds.patch_size_px[0]
    with open_slide(a2.uns["stpredict"]["image"]) as slide:
        direct = slide.read_resampled(y - s / 2, x - s / 2, s, s, out_shape=(48, 48))
    assert np.array_equal(ds.read_patch(2), direct)


def test_spot_patches_land_on_tissue(a2, mob1, genes):
    # MOB: bright glass background; spot crops are darker
    mob = PatchDataset([mob1[::10].copy()], select_genes([mob1], n_top=16), patch_px=32)
    size = mob.patch_size_px[0]
    spots = np.mean([mob.read_patch(i).mean() for i in range(len(mob))])
    assert spots < _corner_means(mob.images[0], size, 32) - 25
    # A2: background masked black; spot crops are tissue
    ds = PatchDataset([a2[::8].copy()], genes, patch_px=32)
    spots = np.mean([ds.read_patch(i).mean() for i in range(len(ds))])
    assert spots > _corner_means(ds.images[0], ds.patch_size_px[0], 32) + 60


def test_her2st_jpeg_patches_darker_than_background(her2st_dir, benchmarks_data_dir):
    (b4,) = read_sections(benchmarks_data_dir / "her2st.yaml", sections=["B4"])
    ds = PatchDataset([b4[::20].copy()], ["ERBB2", "GRB7"], patch_px=32)
    assert 150 < ds.patch_size_px[0] < 180  # 112 µm at about 0.69 µm/px
    ds.preload()
    spots = ds._patches.mean()
    assert spots < _corner_means(ds.images[0], ds.patch_size_px[0], 32) - 25


def test_augmentation_is_a_square_symmetry(a2, genes):
    torch.manual_seed(0)
    plain = PatchDataset([a2[:3].copy()], genes, patch_px=32)
    aug = PatchDataset([a2[:3].copy()], genes, patch_px=32, augment=True)
    base = plain.read_patch(1)
    syms = [np.rot90(base, k) for k in range(4)] + [np.rot90(base, k)[:, ::-1] for k in range(4)]
    seen = set()
    for _ in range(40):
        img = _to_uint8(aug[1]["image"])
        hits = [k for k, s in enumerate(syms) if np.array_equal(img, s)]
        assert hits, "augmented crop is not a flip/rotation of the crop"
        seen.add(hits[0])
    assert len(seen) >= 5
    assert torch.equal(aug[1]["expr"], plain[1]["expr"])  # expression is not augmented


def test_dataset_errors(a2, genes, her2st_dir, benchmarks_data_dir):
    (b1,) = read_sections(benchmarks_data_dir / "her2st_labelled.yaml", sections=["B1"])
    with pytest.raises(DatasetError, match=r"section 'B1': no image, so no patches can be cut"):
        PatchDataset([b1], ["ERBB2"])
    no_mpp = a2[:4].copy()
    no_mpp.uns["stpredict"] = {**a2.uns["stpredict"], "mpp": None}
    with pytest.raises(
        DatasetError,
        match=r"section 'A2': image .*A2_dark\.png has no pixel size \(mpp\).*patch_px_level0",
    ):
        PatchDataset([no_mpp], genes)
    ds = PatchDataset([no_mpp], genes, patch_px_level0=40, patch_px=16)
    assert ds.patch_size_px == [40.0] and ds[0]["image"].shape == (3, 16, 16)
    with pytest.raises(
        DatasetError, match=r"section 'A2': 1 of 2 panel genes are not measured \(NOTAGENE\)"
    ):
        PatchDataset([a2[:4].copy()], ["ERBB2", "NOTAGENE"])
    with pytest.raises(DatasetError, match="empty gene panel"):
        PatchDataset([a2[:4].copy()], [])


def test_read_patches_in_threads_equals_one_by_one(a2, genes):
    ds = PatchDataset([a2[:24].copy()], genes, patch_px=32, cache=False)
    one = np.stack([ds.read_patch(i) for i in range(24)])
    with ThreadPoolExecutor(2) as pool:
        many = ds.read_patches(np.arange(24)[::-1], executor=pool)
    assert np.array_equal(many, one[::-1])
    # a wider field of view around the same centre (context), still 32 px a side
    wide = ds.read_patches([3], scale=3.0)[0]
    assert wide.shape == (32, 32, 3) and not np.array_equal(wide, one[3])
    for i in (0, 5):
        assert torch.equal(
            ds[i]["image"], PatchDataset([a2[:24].copy()], genes, patch_px=32)[i]["image"]
        )
    # the dataset pickles without its open slides (another process re-opens them)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._slides == {} and torch.equal(clone[5]["image"], ds[5]["image"])


def test_preload_reads_every_crop_once_and_reports(a2, genes):
    ds = PatchDataset([a2[:16].copy()], genes, patch_px=32, augment=True)
    assert ds.cache and not ds.preloaded
    calls = []
    ds.preload(progress=lambda d, t, m="": calls.append((d, t)))
    assert ds.preloaded and calls[-1] == (16, 16)
    fresh = PatchDataset([a2[:16].copy()], genes, patch_px=32, cache=False)
    assert np.array_equal(ds.read_patches(np.arange(16)), fresh.read_patches(np.arange(16)))
