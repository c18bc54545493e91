"""Training patch dataset on real sections: geometry, normalisation, augmentation, DataLoader."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from napari_stpredict.errors import DatasetError
from napari_stpredict.slide import open_slide
from napari_stpredict.st import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PatchDataset,
    make_loader,
    normalize,
    patches_to_tensor,
    read_sections,
    select_genes,
)


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


def test_patches_to_tensor():
    p = np.zeros((2, 8, 8, 3), np.uint8)
    p[..., 0] = 255
    t = patches_to_tensor(p)
    assert t.shape == (2, 3, 8, 8)
    assert t[0, 0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229)
    assert t[0, 1, 0, 0].item() == pytest.approx(-0.456 / 0.224)
    assert patches_to_tensor(p[0]).shape == (3, 8, 8)
    with pytest.raises(ValueError):
        patches_to_tensor(p.astype(np.float32))


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


def test_dataloader_with_two_workers(a2, genes):
    ds = PatchDataset([a2[:24].copy()], genes, patch_px=32, cache=False)
    ds.read_patch(0)  # a slide handle open in the parent must not break the workers
    loader = make_loader(ds, batch_size=8, shuffle=True, num_workers=2, seed=1)
    assert loader.num_workers == 2 and loader.persistent_workers
    seen = []
    for batch in loader:
        assert batch["image"].shape == (8, 3, 32, 32)
        assert batch["expr"].shape == (8, len(genes))
        assert batch["section"] == ["A2"] * 8
        for img, i in zip(batch["image"], batch["index"].tolist(), strict=True):
            assert torch.equal(img, ds[i]["image"])
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(24))
    # the dataset pickles without its open slides (spawned workers re-open them)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._slides == {} and torch.equal(clone[5]["image"], ds[5]["image"])


def test_make_loader_preloads_cached_dataset_and_is_seeded(a2, genes):
    ds = PatchDataset([a2[:16].copy()], genes, patch_px=32, augment=True)
    assert ds.cache and not ds.preloaded
    calls = []
    loader = make_loader(ds, batch_size=4, seed=7, progress=lambda d, t, m="": calls.append((d, t)))
    assert ds.preloaded and loader.num_workers == 2
    assert calls[-1] == (16, 16)

    def first(seed, workers):
        torch.manual_seed(123)  # augmentation in the main process draws from torch's RNG
        b = next(iter(make_loader(ds, batch_size=4, seed=seed, num_workers=workers)))
        return b["index"].tolist(), b["image"]

    for workers in (0, 2):  # workers are seeded from the loader's seeded generator
        i1, im1 = first(7, workers)
        i2, im2 = first(7, workers)
        assert i1 == i2 and torch.equal(im1, im2)
        i3, im3 = first(8, workers)
        assert i3 != i1 or not torch.equal(im3, im1)
