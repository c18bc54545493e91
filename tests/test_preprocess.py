"""The one pixel pipeline: InputSpec, encoder_input, dihedral symmetries, augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_stpredict.errors import StPredictError
from napari_stpredict.model.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TTA_ORDER,
    InputSpec,
    augment,
    backbone_mean_std,
    dihedral,
    encoder_input,
    stain_jitter,
)


def _patches(n=4, p=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, p, p, 3), dtype=np.uint8)


def test_backbone_mean_std_from_timm_config_without_download():
    assert backbone_mean_std("tf_efficientnet_lite0") == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert backbone_mean_std("resnet18") == (IMAGENET_MEAN, IMAGENET_STD)
    assert backbone_mean_std("resnet50.a1_in1k") == (IMAGENET_MEAN, IMAGENET_STD)
    assert backbone_mean_std("hf-hub:someone/unknown") == (IMAGENET_MEAN, IMAGENET_STD)
    from napari_stpredict.model.encoders import ImageEncoder

    assert backbone_mean_std(ImageEncoder("tf_efficientnet_lite0"))[0] == (0.5, 0.5, 0.5)


def test_input_spec_round_trip_fields_and_old_files():
    spec = InputSpec(112.0, 64, mean=(0.5,) * 3, std=(0.5,) * 3, context=3, tta=8)
    assert InputSpec.from_dict(spec.to_dict()) == spec
    assert spec.fields() == [(112.0, 64), (336.0, 64)] and spec.scales == (1.0, 3.0)
    assert InputSpec(None, 32).fields() == [(None, 32)]
    old = {"patch_um": 112.0, "patch_px": 224, "image_mean": list(IMAGENET_MEAN)}
    legacy = InputSpec.from_metadata(old)
    assert legacy == InputSpec(112.0, 224) and legacy.tta == 1 and legacy.context == 0
    assert legacy.std == IMAGENET_STD
    assert InputSpec.from_metadata({"input": spec.to_dict(), "patch_px": 64}) == spec
    for bad, match in [
        ({"patch_px": 64, "tta": 3}, "tta"),
        ({"patch_px": 64, "context": 0.5}, "context"),
        ({"patch_px": 4}, "too small"),
        ({"patch_px": 64, "mean": [1, 2]}, "mean"),
        ({"patch_px": 64, "colour": 1}, "unknown key 'colour'"),
        ({}, "patch_px"),
    ]:
        with pytest.raises(StPredictError, match=match):
            InputSpec.from_dict({"patch_um": 112.0, **bad} if bad else bad)


def test_encoder_input_is_the_normalisation_and_checks_input():
    spec = InputSpec(112.0, 16, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    u8 = _patches()
    x = encoder_input(u8, spec)
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and x.is_contiguous()
    ref = (
        torch.from_numpy(u8).permute(0, 3, 1, 2).double() / 255
        - torch.tensor(spec.mean).view(1, 3, 1, 1).double()
    ) / torch.tensor(spec.std).view(1, 3, 1, 1).double()
    assert torch.allclose(x.double(), ref, atol=1e-5)
    # numpy or torch, contiguous or not: the same numbers
    assert torch.equal(encoder_input(torch.from_numpy(u8), spec), x)
    assert torch.equal(encoder_input(u8, spec, channels_last=True), x)
    # (N, F, P, P, 3) keeps the fields axis
    two = encoder_input(np.stack([u8, u8[::-1]], 1), spec)
    assert two.shape == (4, 2, 3, 16, 16) and torch.equal(two[:, 0], x)
    with pytest.raises(StPredictError, match="uint8"):
        encoder_input(u8.astype(np.float32), spec)
    with pytest.raises(StPredictError, match=r"expected \(N, 16, 16, 3\)"):
        encoder_input(_patches(p=8), spec)


def test_dihedral_gives_the_eight_symmetries():
    img = np.arange(9).reshape(3, 3)
    seen = {dihedral(img, k).tobytes() for k in range(8)}
    assert len(seen) == 8
    t = torch.arange(9).view(1, 1, 3, 3)
    for k in range(8):
        assert np.array_equal(dihedral(t, k).numpy()[0, 0], dihedral(img, k))
    hwc = np.arange(27).reshape(3, 3, 3)
    assert np.array_equal(dihedral(hwc, 5, dims=(-3, -2))[..., 0], dihedral(hwc[..., 0], 5))
    assert sorted(TTA_ORDER) == list(range(8)) and TTA_ORDER[0] == 0
    with pytest.raises(StPredictError):
        dihedral(img, 8)


def test_augment_is_seeded_and_stain_jitter_changes_colour_only():
    u8 = torch.from_numpy(_patches(n=6, p=24, seed=1))
    a = augment(u8, torch.Generator().manual_seed(5), stain="hed+color")
    b = augment(u8, torch.Generator().manual_seed(5), stain="hed+color")
    c = augment(u8, torch.Generator().manual_seed(6), stain="hed+color")
    assert a.dtype == torch.uint8 and a.shape == u8.shape
    assert torch.equal(a, b) and not torch.equal(a, c)
    # symmetries only: every patch is one of its 8 symmetries, bit for bit
    sym = augment(u8, torch.Generator().manual_seed(0))
    for orig, out in zip(u8, sym, strict=True):
        assert any(torch.equal(dihedral(orig, k, dims=(0, 1)), out) for k in range(8))
    # stain only: geometry kept, colours moved a little
    hed = augment(u8, torch.Generator().manual_seed(0), symmetries=False, stain="hed")
    diff = (hed.float() - u8.float()).abs()
    assert 0 < diff.mean() < 20
    # zero strength is the identity (up to the uint8 round trip)
    f = torch.rand(2, 8, 8, 3) * 0.8 + 0.1
    assert torch.allclose(
        stain_jitter(f, torch.Generator(), kind="hed", strength=0.0), f, atol=1e-5
    )
    with pytest.raises(StPredictError, match="stain augmentation"):
        augment(u8, None, stain="purple")
