"""Predictor: model file → expression for uint8 patches, same preprocessing as training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_stpredict.errors import StPredictError
from napari_stpredict.model.checkpoint import load_model_file
from napari_stpredict.model.predictor import Predictor, resolve_device


@pytest.fixture(scope="module")
def predictor(tiny_model_file):
    return Predictor(tiny_model_file, device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def real_patches(predictor, benchmarks_data_dir):
    """Eight real crops of section C2 cut by the training patch dataset at the model's scale."""
    from napari_stpredict.st import PatchDataset, load_manifest, read_sections

    adatas = read_sections(load_manifest(benchmarks_data_dir / "her2st.yaml"), sections=["C2"])
    ds = PatchDataset(
        adatas,
        predictor.genes[:5],
        patch_um=predictor.patch_um,
        patch_px=predictor.patch_px,
        cache=False,
        input_spec=predictor.input_spec,
    )
    idx = np.linspace(0, len(ds) - 1, 8).astype(int)
    patches = np.stack([ds.read_patch(int(i)) for i in idx])
    training_inputs = torch.stack([ds[int(i)]["image"] for i in idx])
    return patches, training_inputs


def test_attributes(predictor, tiny_model_file):
    meta = load_model_file(tiny_model_file).metadata
    assert predictor.genes == meta["genes"] and predictor.n_genes == len(meta["genes"])
    assert predictor.patch_um == 112.0 and predictor.patch_px == 64
    assert predictor.method == "cmrc" and predictor.backbone == "tf_efficientnet_lite0"
    assert predictor.top_k == 50 and predictor.device == torch.device("cpu")
    assert predictor.training_sections == ["B4", "C2"]
    assert set(predictor.gene_stats) == {"mean", "std", "p01", "p50", "p99"}
    s = predictor.gene_stats
    assert all(v.shape == (predictor.n_genes,) for v in s.values())
    assert np.all(s["p01"] <= s["p50"]) and np.all(s["p50"] <= s["p99"]) and np.all(s["std"] >= 0)
    assert len(predictor.fingerprint) == 64
    assert "cmrc" in repr(predictor)


def test_same_preprocessing_as_training(predictor, real_patches):
    patches, training_inputs = real_patches
    assert patches.dtype == np.uint8 and patches.shape == (8, 64, 64, 3)
    assert patches.mean() < 230  # spots lie on tissue
    x = predictor.preprocess(patches)
    assert torch.allclose(x.cpu(), training_inputs, atol=1e-6)
    assert np.array_equal(predictor.predict(patches), predictor.predict_tensor(training_inputs))


def test_prediction_is_topk_mean_of_bank(predictor, real_patches, tiny_model_file):
    patches, training_inputs = real_patches
    pred = predictor.predict(patches)
    mf = load_model_file(tiny_model_file)
    model = mf.build_model()
    with torch.no_grad():
        emb = model.encode_image(training_inputs).numpy()
    bank = mf.bank_embeddings.numpy()
    sims = emb @ bank.T
    top = np.argsort(-sims, axis=1)[:, :50]
    brute = mf.bank_expression.numpy()[top].mean(1)
    assert np.allclose(pred, brute, atol=1e-5)
    # a mean of training spots stays within the training range, and patches differ
    lo, hi = mf.bank_expression.numpy().min(0), mf.bank_expression.numpy().max(0)
    assert np.all(pred >= lo - 1e-5) and np.all(pred <= hi + 1e-5)
    assert not np.allclose(pred[0], pred[-1])


def test_batch_size_does_not_change_results(tiny_model_file, predictor, real_patches):
    patches, _ = real_patches
    one = Predictor(tiny_model_file, device="cpu", batch_size=1).predict(patches[:3])
    assert np.allclose(one, predictor.predict(patches[:3]), atol=1e-5)
    assert predictor.predict(patches[:0]).shape == (0, predictor.n_genes)


def test_bad_patches(predictor):
    with pytest.raises(StPredictError, match=r"expected \(N, 64, 64, 3\)"):
        predictor.predict(np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(StPredictError, match="uint8"):
        predictor.predict(np.zeros((2, 64, 64, 3), np.float32))
    with pytest.raises(StPredictError):
        predictor.predict(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(StPredictError, match="not in the model"):
        predictor.gene_index(["NOT_A_GENE"])
    assert predictor.gene_index("ERBB2") == [predictor.genes.index("ERBB2")]


def test_devices(tiny_model_file):
    if not torch.cuda.is_available():
        assert resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(StPredictError, match="CUDA is not available"):
            Predictor(tiny_model_file, device="cuda")
    with pytest.raises(StPredictError, match="expected auto"):
        resolve_device("tpu")
    with pytest.raises(StPredictError, match="batch_size"):
        Predictor(tiny_model_file, device="cpu", batch_size=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_amp_close_to_cpu(tiny_model_file, predictor, real_patches):
    patches, _ = real_patches
    gpu = Predictor(tiny_model_file, device="cuda")
    assert gpu._amp in (torch.bfloat16, torch.float16)
    a, b = gpu.predict(patches), predictor.predict(patches)
    # AMP may swap near-tied neighbours; the top-k mean stays close
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99


def test_cpu_encoder_chunks_do_not_change_results(tiny_model_file, real_patches, monkeypatch):
    """TTA views of a batch go through the backbone in chunks of CPU_ENCODER_CHUNK images on a
    CPU (faster per image); the features, order and averages must be those of one call."""
    import napari_stpredict.model.predictor as predictor_mod

    patches, _ = real_patches
    eight = Predictor(tiny_model_file, device="cpu", batch_size=8, tta=8)
    monkeypatch.setattr(predictor_mod, "CPU_ENCODER_CHUNK", 10_000)
    whole, whole_sd = eight.predict(patches, return_spread=True)
    monkeypatch.setattr(predictor_mod, "CPU_ENCODER_CHUNK", 5)  # 64 images → 13 uneven chunks
    chunked, chunked_sd = eight.predict(patches, return_spread=True)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(chunked_sd, whole_sd, rtol=1e-5, atol=1e-5)
    assert not np.allclose(whole, Predictor(tiny_model_file, device="cpu").predict(patches))
