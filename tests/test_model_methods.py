"""CMRCNet, BLEEP and regression: losses, shapes, masking, retrieval."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_stpredict.errors import StPredictError
from napari_stpredict.model.heads import soft_clip_loss
from napari_stpredict.model.methods import CMRCNet, build_model, list_methods
from napari_stpredict.model.retrieval import (
    neighbour_weights,
    retrieve_topk,
    topk_mean_expression,
)
from napari_stpredict.model.ridge import fit_ridge

SMALL = {"proj_dim": 32, "n_gene_tokens": 3, "fusion_heads": 4}


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(6, 3, 64, 64, generator=g)
    expr = torch.rand(6, 12, generator=g) * 3
    return images, expr


@pytest.fixture(scope="module")
def he_batch(her2st_dir):
    """Six real 64 px H&E crops (B4) and random expression, for one real-data pass."""
    import pandas as pd
    from PIL import Image

    from napari_stpredict.model.preprocess import InputSpec, encoder_input

    spots = pd.read_csv(her2st_dir / "spots" / "B4_selection.tsv", sep="\t").head(6)
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(her2st_dir / "images" / "B4.jpg") as im:
        full_w = im.width
        im.draft("RGB", (im.width // 2, im.height // 2))  # JPEG DCT scaling: fast, 1/2 size
        s = im.size[0] / full_w
        rgb = im.convert("RGB")
        crops = [
            np.asarray(
                rgb.crop((int(x * s) - 32, int(y * s) - 32, int(x * s) + 32, int(y * s) + 32))
            )
            for x, y in spots[["pixel_x", "pixel_y"]].to_numpy()
        ]
    crops = np.stack(crops)
    assert crops.mean() < 220  # on tissue, darker than the background
    return encoder_input(crops, InputSpec(None, 64)), torch.rand(6, 12)


def test_registry():
    assert list_methods() == ["bleep", "cmrc", "regression", "ridge"]
    with pytest.raises(StPredictError, match="unknown"):
        build_model("nope", n_genes=3)
    with pytest.raises(StPredictError, match="unknown hyper-parameter 'mask_prob'"):
        build_model("bleep", n_genes=3, mask_prob=0.3)
    model = build_model("cmrc", n_genes=3, pretrained="none", mask_prob=0.25, fusion_depth=1)
    assert model.config["mask_prob"] == 0.25 and len(model.fusion) == 1
    rebuilt = build_model(**{**model.config, "pretrained": "none"})
    assert rebuilt.config == model.config


@pytest.mark.parametrize("method", ["cmrc", "bleep", "regression"])
def test_losses_and_shapes(method, batch):
    images, expr = batch
    torch.manual_seed(0)
    kwargs = {"cmrc": SMALL, "bleep": {"proj_dim": 32}}.get(method, {})
    model = build_model(method, n_genes=12, pretrained="none", **kwargs)
    model.train()
    losses = model.loss(images, expr)
    expected = {"cmrc": {"loss", "contrastive", "reconstruction"}, "bleep": {"loss", "contrastive"}}
    assert set(losses) == expected.get(method, {"loss", "mse"})
    assert losses["loss"].ndim == 0 and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["encoder.model.conv_stem.weight"] is not None  # gradients reach the backbone
    model.eval()
    with torch.no_grad():
        emb = model.encode_image(images)
    if method == "regression":
        assert emb.shape == (6, 12)
        with pytest.raises(StPredictError):
            model.encode_expr(expr)
    else:
        assert emb.shape == (6, 32)
        assert torch.allclose(emb.norm(dim=1), torch.ones(6), atol=1e-5)
        e = model.encode_expr(expr)
        assert e.shape == (6, 32) and torch.allclose(e.norm(dim=1), torch.ones(6), atol=1e-5)
    if method == "cmrc":
        for name in (
            "gene_tokenizer.fc1.weight",
            "fusion.0.attn_ig.in_proj_weight",
            "recon_head.weight",
        ):
            assert grads[name] is not None and grads[name].abs().sum() > 0, name


def test_cmrc_total_is_log1p_sum(batch):
    images, expr = batch
    torch.manual_seed(1)
    model = build_model("cmrc", n_genes=12, pretrained="none", **SMALL).eval()
    with torch.no_grad():
        out = model.loss(images, expr)
    total = math.log1p(float(out["contrastive"])) + math.log1p(float(out["reconstruction"]))
    assert float(out["loss"]) == pytest.approx(total, rel=1e-5)


def test_bleep_has_no_reconstruction_modules():
    bleep = build_model("bleep", n_genes=12, pretrained="none", **{"proj_dim": 32})
    cmrc = build_model("cmrc", n_genes=12, pretrained="none", **SMALL)
    assert not any(n.startswith(("gene_tokenizer", "fusion")) for n, _ in bleep.named_parameters())
    assert any(n.startswith("fusion") for n, _ in cmrc.named_parameters())


def test_masking_only_in_training():
    model = build_model("cmrc", n_genes=12, pretrained="none", **SMALL)
    tokens = torch.randn(8, 16, 32)
    model.train()
    masked = model.mask_tokens(tokens)
    zero_frac = float((masked == 0).float().mean())
    assert 0.4 < zero_frac < 0.6  # element-wise, p = 0.5
    kept = masked != 0
    assert torch.equal(masked[kept], tokens[kept])
    model.eval()
    assert torch.equal(model.mask_tokens(tokens), tokens)


def test_eval_loss_is_deterministic_and_train_loss_is_not(batch):
    images, expr = batch
    model = build_model("cmrc", n_genes=12, pretrained="none", **SMALL)
    with torch.no_grad():
        tokens, pooled = model.encoder.eval()(images)
        model.eval()
        a = model.loss_from_features(tokens, pooled, expr)["reconstruction"]
        b = model.loss_from_features(tokens, pooled, expr)["reconstruction"]
        assert torch.equal(a, b)
        model.train()
        c = model.loss_from_features(tokens, pooled, expr)["reconstruction"]
        d = model.loss_from_features(tokens, pooled, expr)["reconstruction"]
        assert not torch.equal(c, d)  # fresh random mask (and dropout) each call


def test_loss_from_features_matches_images(batch):
    images, expr = batch
    model = build_model("bleep", n_genes=12, pretrained="none", proj_dim=32).eval()
    with torch.no_grad():
        tokens, pooled = model.encoder(images)
        assert torch.allclose(
            model.loss(images, expr)["loss"], model.loss_from_features(tokens, pooled, expr)["loss"]
        )


def test_soft_clip_loss_matches_definition_and_prefers_aligned_pairs():
    g = torch.Generator().manual_seed(3)
    img = torch.randn(5, 8, generator=g)
    expr = torch.randn(5, 8, generator=g)
    t = 0.7
    logits = expr @ img.T / t
    targets = F.softmax((img @ img.T + expr @ expr.T) / 2 / t, dim=-1)
    manual = (
        (
            -(targets * F.log_softmax(logits, -1)).sum(1)
            + -(targets.T * F.log_softmax(logits.T, -1)).sum(1)
        )
        / 2
    ).mean()
    assert torch.allclose(soft_clip_loss(img, expr, temperature=t), manual)
    aligned = soft_clip_loss(img, img.clone())
    shuffled = soft_clip_loss(img, img[torch.tensor([1, 2, 3, 4, 0])])
    assert aligned < shuffled


def test_real_he_patches_forward(he_batch):
    images, expr = he_batch
    assert images.shape == (6, 3, 64, 64)
    model = build_model("cmrc", n_genes=12, pretrained="offline", **SMALL).train()
    out = model.loss(images, expr)
    assert torch.isfinite(out["loss"])
    model.eval()
    with torch.no_grad():
        emb = model.encode_image(images)
    # distinct tissue patches give distinct embeddings
    assert torch.cdist(emb, emb).fill_diagonal_(1.0).min() > 1e-4


@pytest.mark.parametrize("chunk", [7, 64, 100000])
def test_retrieval_topk_equals_brute_force(chunk):
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(300, 16, generator=g), dim=1)
    bank_expr = torch.rand(300, 5, generator=g)
    q = F.normalize(torch.randn(9, 16, generator=g), dim=1)
    scores, idx = retrieve_topk(q, bank, k=50, chunk=chunk)
    sims = (q @ bank.T).numpy()
    brute = np.argsort(-sims, axis=1)[:, :50]
    assert np.array_equal(idx.numpy(), brute)
    assert np.allclose(scores.numpy(), np.take_along_axis(sims, brute, 1), atol=1e-6)
    pred = topk_mean_expression(q, bank, bank_expr, k=50, query_chunk=4, bank_chunk=chunk)
    assert np.allclose(pred.numpy(), bank_expr.numpy()[brute].mean(1), atol=1e-6)


def test_retrieval_k_larger_than_bank_and_empty_bank():
    bank = F.normalize(torch.randn(4, 8), dim=1)
    _, idx = retrieve_topk(bank[:2], bank, k=50)
    assert idx.shape == (2, 4)
    with pytest.raises(StPredictError, match="empty"):
        retrieve_topk(bank[:2], bank[:0], k=3)


def test_mask_prob_validated():
    with pytest.raises(StPredictError, match="mask_prob"):
        CMRCNet(n_genes=4, pretrained="none", mask_prob=1.5)


def test_cmrc_fine_tuning_fits_a_real_batch(he_batch):
    """A few optimizer steps on real H&E crops (whole backbone trainable) lower the loss."""
    images, expr = he_batch
    torch.manual_seed(0)
    model = build_model("cmrc", n_genes=12, pretrained="offline", **SMALL)
    model.encoder.set_trainable("all")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = model.loss(images, expr)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0], losses


def test_train_backbone_modes():
    model = build_model("bleep", n_genes=4, pretrained="none", proj_dim=16)
    enc = model.encoder
    n = len(list(enc.parameters()))
    enc.set_trainable("none")
    assert not any(p.requires_grad for p in enc.parameters())
    model.train()
    assert not enc.model.training  # frozen: batch-norm statistics never move
    enc.set_trainable("last")
    trainable = [name for name, p in enc.model.named_parameters() if p.requires_grad]
    assert 0 < len(trainable) < n and all(
        t.startswith(("blocks.6", "conv_head", "bn2")) for t in trainable
    )
    enc.set_trainable("all")
    assert all(p.requires_grad for p in enc.parameters())
    with pytest.raises(StPredictError):
        enc.set_trainable("some")


# ---------------------------------------------------------------------------------------- ridge


def test_fit_ridge_recovers_a_linear_map_and_model_matches():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 40)).astype(np.float32)
    w = rng.normal(size=(40, 6))
    y = (x @ w + 0.1 * rng.normal(size=(240, 6))).astype(np.float32)
    groups = np.repeat([0, 1, 2], 80)
    fit = fit_ridge(x[:200], y[:200], groups=groups[:200], n_components=40)
    assert fit.cv["scheme"] == "leave-one-section-out"
    assert fit.components.shape == (40, 40) and fit.coef.shape == (6, 40)
    pred = fit.predict(x[200:])
    r = [np.corrcoef(pred[:, g], y[200:, g])[0, 1] for g in range(6)]
    assert min(r) > 0.95, r
    # the installed model computes exactly the same numbers from pooled features
    model = build_model("ridge", n_genes=6, pretrained="none", n_components=256)
    model.encoder.num_features = 40  # features of a 40-wide backbone, for the maths only
    model._set_buffers(256)
    model.set_fit(fit)
    assert model.config["n_components"] == 40
    with torch.no_grad():
        out = model.image_from_features(None, torch.from_numpy(x[200:])).numpy()
    assert np.allclose(out, pred, atol=1e-4)


def test_fit_ridge_alpha_is_chosen_on_inner_folds_only():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(150, 30))
    noise = rng.normal(size=(150, 4))  # nothing to learn: the strongest shrinkage must win
    fit = fit_ridge(x, noise, n_components=30)
    assert fit.cv["scheme"].endswith("random")
    assert fit.alpha_rel == max(fit.cv["alphas_relative"])
    signal = x[:, :4] * 3 + 0.01 * rng.normal(size=(150, 4))
    assert fit_ridge(x, signal, n_components=30).alpha_rel < fit.alpha_rel
    with pytest.raises(StPredictError, match="ridge"):
        fit_ridge(x[:2], noise[:2])
    with pytest.raises(StPredictError, match="NaN"):
        fit_ridge(np.full((5, 3), np.nan), noise[:5])


# ------------------------------------------------------------------------- weighted retrieval


def test_softmax_weighted_retrieval_and_neighbour_spread():
    g = torch.Generator().manual_seed(5)
    bank = F.normalize(torch.randn(200, 16, generator=g), dim=1)
    bank_expr = torch.rand(200, 7, generator=g)
    q = F.normalize(torch.randn(5, 16, generator=g), dim=1)
    scores, idx = retrieve_topk(q, bank, k=20)
    nb = bank_expr[idx]  # (5, 20, 7)
    w = torch.softmax(scores / 0.05, dim=1)
    mean, sd = topk_mean_expression(
        q, bank, bank_expr, k=20, weighting="softmax", temperature=0.05, return_spread=True
    )
    expect = (w[:, :, None] * nb).sum(1)
    assert torch.allclose(mean, expect, atol=1e-5)
    var = (w[:, :, None] * (nb - expect[:, None]) ** 2).sum(1)
    assert torch.allclose(sd, var.sqrt(), atol=1e-5)
    # the closest neighbour weighs most; a huge temperature is the plain mean
    assert bool((w[:, 0] >= w[:, -1]).all())
    flat = topk_mean_expression(q, bank, bank_expr, k=20, weighting="softmax", temperature=1e6)
    plain, plain_sd = topk_mean_expression(q, bank, bank_expr, k=20, return_spread=True)
    assert torch.allclose(flat, plain, atol=1e-5)
    assert torch.allclose(plain_sd, nb.std(1, unbiased=False), atol=1e-5)
    assert torch.allclose(neighbour_weights(scores).sum(1), torch.ones(5))
    with pytest.raises(StPredictError, match="weighting"):
        topk_mean_expression(q, bank, bank_expr, k=3, weighting="median")


# ---------------------------------------------------------------------------------- context


def test_context_field_concatenates_pooled_features(batch):
    images, expr = batch
    model = build_model("bleep", n_genes=12, pretrained="none", proj_dim=32, n_fields=2).eval()
    assert model.config["n_fields"] == 2 and model.feature_dim == 2 * model.encoder.num_features
    two = torch.stack([images, images.flip(-1)], 1)  # (B, 2, 3, P, P)
    with torch.no_grad():
        _, pooled = model.encode_fields(two)
        _, p0 = model.encoder(images)
        _, p1 = model.encoder(images.flip(-1))
        assert torch.allclose(pooled, torch.cat([p0, p1], 1), atol=1e-5)
        assert model.encode_image(two).shape == (6, 32)
        assert torch.isfinite(model.loss(two, expr)["loss"])
    with pytest.raises(StPredictError, match="fields"):
        model.encode_image(images)
    one = build_model("bleep", n_genes=12, pretrained="none", proj_dim=32)
    assert "n_fields" not in one.config  # old model files rebuild with the same config


# ------------------------------------------------------- Predictor: ridge file, TTA, spread


@pytest.fixture(scope="module")
def he_crops(her2st_dir):
    """24 real 64 px H&E crops of B4 (uint8), on tissue."""
    import pandas as pd
    from PIL import Image

    spots = pd.read_csv(her2st_dir / "spots" / "B4_selection.tsv", sep="\t").iloc[::10][:24]
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(her2st_dir / "images" / "B4.jpg") as im:
        full_w = im.width
        im.draft("RGB", (im.width // 2, im.height // 2))
        s = im.size[0] / full_w
        rgb = im.convert("RGB")
        crops = [
            np.asarray(
                rgb.crop((int(x * s) - 32, int(y * s) - 32, int(x * s) + 32, int(y * s) + 32))
            )
            for x, y in spots[["pixel_x", "pixel_y"]].to_numpy()
        ]
    return np.stack(crops)


def _ridge_file(path, crops, *, n_fields=1, tta=8):
    """A real ridge model file: offline EfficientNet-Lite0 features of real crops → 3 'genes'
    (the crops' mean R, G, B — something the features can predict)."""
    from napari_stpredict.model.checkpoint import compute_gene_stats, save_model_file
    from napari_stpredict.model.preprocess import InputSpec, backbone_mean_std, encoder_input

    mean, std = backbone_mean_std("tf_efficientnet_lite0")
    spec = InputSpec(
        patch_um=112.0, patch_px=64, mean=mean, std=std, context=3.0 if n_fields == 2 else 0.0
    )
    model = build_model("ridge", n_genes=3, pretrained="offline", n_fields=n_fields).eval()
    x = encoder_input(crops, spec)
    with torch.no_grad():
        if n_fields == 2:
            x = torch.stack([x, x.flip(-2)], 1)
        _, pooled = model.encode_fields(x)
    y = crops.reshape(len(crops), -1, 3).mean(1).astype(np.float32) / 50.0
    fit = fit_ridge(pooled.numpy(), y, n_components=16)
    model.set_fit(fit)
    save_model_file(
        path,
        model,
        bank_embeddings=None,
        bank_expression=None,
        metadata={
            "genes": ["R", "G", "B"],
            "normalization": {"method": "log1p_cpm", "target_sum": 1e4},
            "patch_um": 112.0,
            "patch_px": 64,
            "training_sections": ["B4"],
            "gene_stats": compute_gene_stats(y),
            "input": spec.replace(tta=tta).to_dict(),
            "ridge": fit.info(),
        },
    )
    return path, fit, pooled.numpy()


def test_ridge_model_file_through_the_predictor(tmp_path, he_crops):
    from napari_stpredict.model import Predictor, load_model_file

    path, fit, pooled = _ridge_file(tmp_path / "ridge.safetensors", he_crops, tta=1)
    meta = load_model_file(path).metadata
    assert meta["method"] == "ridge" and meta["ridge"]["n_components"] == 16
    p = Predictor(path, device="cpu", batch_size=5)
    assert p.method == "ridge" and p.top_k is None and p.tta == 1 and not p.has_uncertainty
    out = p.predict(he_crops)
    assert out.shape == (24, 3) and out.dtype == np.float32
    assert np.allclose(out, fit.predict(pooled), atol=1e-3)
    mean, spread = p.predict(he_crops, return_spread=True)
    assert np.array_equal(mean, out) and np.all(spread == 0)


def test_tta_averages_the_eight_symmetries(tmp_path, he_crops):
    """With tta=8 a patch and its rotated/mirrored copies get the same prediction; the spread
    over the views is positive; tta=1 (an override) is the plain patch."""
    from napari_stpredict.model import Predictor
    from napari_stpredict.model.preprocess import dihedral

    path, fit, pooled = _ridge_file(tmp_path / "ridge8.safetensors", he_crops, tta=8)
    p8 = Predictor(path, device="cpu")
    assert p8.tta == 8 and p8.has_uncertainty
    a, sd = p8.predict(he_crops[:6], return_spread=True)
    for k in (1, 3, 4, 6):
        b = p8.predict(np.ascontiguousarray(dihedral(he_crops[:6], k, dims=(-3, -2))))
        assert np.allclose(a, b, atol=2e-3), k
    assert sd.shape == a.shape and np.all(sd > 0)
    p1 = Predictor(path, device="cpu", tta=1)
    one = p1.predict(he_crops[:6])
    assert np.allclose(one, fit.predict(pooled[:6]), atol=1e-3)
    assert not np.allclose(one, a, atol=1e-3)


def test_context_model_needs_both_fields(tmp_path, he_crops):
    from napari_stpredict.model import Predictor

    path, fit, pooled = _ridge_file(tmp_path / "ridge_ctx.safetensors", he_crops, n_fields=2, tta=1)
    p = Predictor(path, device="cpu")
    assert p.n_fields == 2 and len(p.input_spec.fields()) == 2
    assert p.input_spec.fields()[1] == (336.0, 64)
    two = np.stack([he_crops, np.ascontiguousarray(he_crops[:, ::-1])], 1)  # (N, 2, P, P, 3)
    assert np.allclose(p.predict(two), fit.predict(pooled), atol=1e-3)
    with pytest.raises(StPredictError, match="context"):
        p.predict(he_crops)
