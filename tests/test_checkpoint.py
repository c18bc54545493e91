"""The model file: save → load → predict identical; refusal of corrupt/foreign/other-version files."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from napari_stpredict.errors import ModelFileError
from napari_stpredict.model.checkpoint import (
    FORMAT_NAME,
    GENE_STAT_KEYS,
    compute_gene_stats,
    gene_stats_arrays,
    gene_stats_per_gene,
    load_model_file,
    save_model_file,
)
from napari_stpredict.model.methods import build_model
from napari_stpredict.model.predictor import Predictor

GENES = [f"G{i}" for i in range(10)]


def _meta(expr: np.ndarray) -> dict:
    return {
        "genes": GENES,
        "normalization": {"method": "log1p_cpm", "target_sum": 1e4},
        "patch_um": 112.0,
        "patch_px": 32,
        "top_k": 5,
        "training_sections": ["S1", "S2"],
        "gene_stats": compute_gene_stats(expr),
    }


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("bleep", n_genes=10, pretrained="none", proj_dim=16).eval()
    expr = np.random.default_rng(0).random((40, 10)).astype(np.float32)
    with torch.no_grad():
        emb = model.encode_expr(torch.from_numpy(expr))
    path = tmp_path_factory.mktemp("ckpt") / "small.safetensors"
    save_model_file(
        path, model, bank_embeddings=emb, bank_expression=expr, metadata=_meta(expr),
        bank_section_index=np.repeat([0, 1], 20),
    )  # fmt: skip
    return path


def _rewrite(src, dst, *, header=None, tensors=None):
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
        ts = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    if header:
        meta.update(header)
    if tensors:
        ts.update(tensors)
    save_file(ts, str(dst), metadata=meta)
    return dst


def _one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_real_model_save_load_predict_identical(tiny_model_file, tmp_path, her2st_dir):
    mf = load_model_file(tiny_model_file)
    meta = mf.metadata
    assert meta["format"] == FORMAT_NAME and meta["format_version"] == 1
    assert meta["method"] == "cmrc" and meta["backbone"] == "tf_efficientnet_lite0"
    assert (
        meta["training_sections"] == ["B4", "C2"]
        and meta["patch_px"] == 64
        and meta["patch_um"] == 112.0
    )
    assert meta["normalization"]["method"] == "log1p_cpm" and meta["top_k"] == 50
    assert "ERBB2" in mf.genes and len(mf.genes) > 700
    assert meta["pretrained"] == "offline" and meta["history"] and meta["config"]["seed"] == 0
    n = mf.bank_expression.shape[0]
    assert mf.bank_embeddings.shape == (n, 256) and mf.bank_expression.shape == (n, len(mf.genes))
    assert set(mf.bank_section_index.tolist()) == {0, 1} and n == meta["n_bank"] > 400
    # gene stats describe the bank (= training spots), one record per gene
    stats = compute_gene_stats(mf.bank_expression.numpy())
    for k in GENE_STAT_KEYS:
        assert np.allclose(mf.gene_stats[k], stats[k], atol=1e-5)
    erbb2 = meta["gene_stats"]["ERBB2"]
    assert set(erbb2) == {"mean", "sd", "p01", "p50", "p99", "val_pcc"}
    assert erbb2["sd"] == pytest.approx(stats["std"][mf.genes.index("ERBB2")], abs=1e-5)
    # the encoder input the model was trained with
    assert meta["input"]["mean"] == [0.5] * 3 and meta["input"]["patch_px"] == 64
    assert mf.input_spec.tta == 1 and mf.input_spec.context == 0.0

    # re-save the loaded model: predictions are bit-identical
    model = mf.build_model()
    copy = tmp_path / "copy.safetensors"
    save_model_file(
        copy, model, bank_embeddings=mf.bank_embeddings, bank_expression=mf.bank_expression,
        bank_section_index=mf.bank_section_index,
        metadata={k: v for k, v in meta.items() if k not in ("format", "format_version")},
    )  # fmt: skip
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    with Image.open(her2st_dir / "images" / "C2.jpg") as im:
        im.draft("RGB", (im.width // 4, im.height // 4))
        arr = np.asarray(im.convert("RGB"))
    h, w = arr.shape[:2]
    patches = np.stack(
        [arr[y : y + 64, x : x + 64] for y, x in [(h // 2, w // 2), (h // 3, w // 2), (10, 10)]]
    )
    a = Predictor(tiny_model_file, device="cpu").predict(patches)
    b = Predictor(copy, device="cpu").predict(patches)
    assert a.shape == (3, len(mf.genes)) and a.dtype == np.float32
    assert np.array_equal(a, b)


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="not found") as err:
        load_model_file(tmp_path / "nope.safetensors")
    _one_line(err)


def test_random_bytes_refused(tmp_path):
    p = tmp_path / "junk.safetensors"
    p.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(ModelFileError, match="not a readable model file") as err:
        load_model_file(p)
    _one_line(err)


def test_truncated_file_refused(small_file, tmp_path):
    data = small_file.read_bytes()
    p = tmp_path / "trunc.safetensors"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match=r"corrupt|not a readable"):
        load_model_file(p)


def test_flipped_bytes_fail_checksum(small_file, tmp_path):
    data = bytearray(small_file.read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    pos = 8 + header_len + 1000  # inside the tensor data
    data[pos] ^= 0xFF
    p = tmp_path / "flipped.safetensors"
    p.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="checksum"):
        load_model_file(p)
    load_model_file(p, verify=False)  # the structure itself is still valid


def test_foreign_safetensors_refused(tmp_path):
    p = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3, 3)}, str(p))
    with pytest.raises(ModelFileError, match="not a napari-stpredict model file") as err:
        load_model_file(p)
    _one_line(err)


def test_other_format_version_refused(small_file, tmp_path):
    p = _rewrite(small_file, tmp_path / "v99.safetensors", header={"format_version": "99"})
    with pytest.raises(ModelFileError, match="format version 99 is not supported") as err:
        load_model_file(p)
    _one_line(err)


def test_bad_metadata_refused(small_file, tmp_path):
    p = _rewrite(small_file, tmp_path / "badjson.safetensors", header={"stpredict": "{not json"})
    with pytest.raises(ModelFileError, match="not valid JSON"):
        load_model_file(p)
    with safe_open(str(small_file), "pt") as f:
        meta = json.loads(f.metadata()["stpredict"])
    meta.pop("genes")
    p2 = _rewrite(
        small_file, tmp_path / "nogenes.safetensors", header={"stpredict": json.dumps(meta)}
    )
    with pytest.raises(ModelFileError, match="lacks 'genes'"):
        load_model_file(p2)


def test_bank_shape_mismatch_refused(small_file, tmp_path):
    p = _rewrite(
        small_file, tmp_path / "bank.safetensors", tensors={"bank.expression": torch.zeros(40, 3)}
    )
    with pytest.raises(ModelFileError):
        load_model_file(p, verify=False)


def test_weights_that_do_not_fit_refused(small_file, tmp_path):
    p = _rewrite(
        small_file,
        tmp_path / "w.safetensors",
        tensors={"model.image_projection.fc.weight": torch.zeros(2, 2)},
    )
    mf = load_model_file(p, verify=False)
    with pytest.raises(ModelFileError, match="weights do not fit"):
        mf.build_model()


def test_pickle_is_never_loaded(tmp_path):
    marker = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self):
            return (marker.write_text, ("pwned",))

    p = tmp_path / "evil.safetensors"
    torch.save({"x": Evil()}, p)  # a pickle file under a model file name
    with pytest.raises(ModelFileError):
        load_model_file(p)
    with pytest.raises(ModelFileError):
        Predictor(p, device="cpu")
    assert not marker.exists()


def test_regression_file_has_no_bank(tmp_path):
    model = build_model("regression", n_genes=10, pretrained="none")
    expr = np.random.default_rng(1).random((20, 10)).astype(np.float32)
    p = tmp_path / "reg.safetensors"
    save_model_file(p, model, bank_embeddings=None, bank_expression=None, metadata=_meta(expr))
    mf = load_model_file(p)
    assert mf.bank_embeddings is None and mf.method == "regression" and mf.metadata["n_bank"] == 0


def test_save_is_atomic_and_respects_overwrite(small_file, tmp_path):
    mf = load_model_file(small_file)
    model = mf.build_model()
    kw = dict(
        bank_embeddings=mf.bank_embeddings,
        bank_expression=mf.bank_expression,
        metadata=_meta(mf.bank_expression.numpy()),
    )
    p = tmp_path / "m.safetensors"
    save_model_file(p, model, **kw)
    with pytest.raises(Exception, match="already exists"):
        save_model_file(p, model, overwrite=False, **kw)
    with pytest.raises(ModelFileError, match="needs a reference bank"):
        save_model_file(
            tmp_path / "m2.safetensors",
            model,
            bank_embeddings=None,
            bank_expression=None,
            metadata=kw["metadata"],
        )
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.safetensors"]  # no temporaries left


def test_input_spec_and_gene_stats_layouts(small_file, tmp_path):
    from napari_stpredict.model.preprocess import IMAGENET_MEAN, InputSpec

    old = load_model_file(small_file)  # written without "input", columns of gene stats
    assert "input" not in old.metadata
    assert old.input_spec == InputSpec(112.0, 32)  # ImageNet, no context, tta 1
    assert old.input_spec.mean == IMAGENET_MEAN
    cols = old.gene_stats
    assert set(cols) == set(GENE_STAT_KEYS) and cols["mean"].shape == (10,)
    assert np.isnan(gene_stats_arrays(old.metadata["gene_stats"], GENES)["val_pcc"]).all()

    model = old.build_model()
    expr = old.bank_expression.numpy()
    pcc = np.linspace(-0.1, 0.8, 10)
    meta = {
        **_meta(expr),
        "gene_stats": gene_stats_per_gene(GENES, expr, pcc),
        "input": InputSpec(112.0, 32, mean=(0.5,) * 3, std=(0.5,) * 3, tta=8).to_dict(),
    }
    p = tmp_path / "new.safetensors"
    save_model_file(
        p, model, bank_embeddings=old.bank_embeddings, bank_expression=expr, metadata=meta
    )
    mf = load_model_file(p)
    assert mf.input_spec.tta == 8 and mf.metadata["image_mean"] == [0.5] * 3
    assert all(np.allclose(mf.gene_stats[k], cols[k], atol=1e-6) for k in GENE_STAT_KEYS)
    arr = gene_stats_arrays(mf.metadata["gene_stats"], GENES[::-1])
    assert np.allclose(arr["val_pcc"], pcc[::-1], atol=1e-6)

    bad = dict(meta, input={**meta["input"], "tta": 3})
    with pytest.raises(Exception, match="tta"):
        save_model_file(
            tmp_path / "bad.safetensors", model, bank_embeddings=old.bank_embeddings,
            bank_expression=expr, metadata=bad,
        )  # fmt: skip
    with safe_open(str(p), "pt") as f:
        raw = json.loads(f.metadata()["stpredict"])
    raw["input"]["patch_px"] = 48
    p2 = _rewrite(p, tmp_path / "mismatch.safetensors", header={"stpredict": json.dumps(raw)})
    with pytest.raises(ModelFileError, match="'input' patch_px 48 differs") as err:
        load_model_file(p2, verify=False)
    _one_line(err)
    raw["input"]["patch_px"] = 32
    del raw["gene_stats"]["G3"]["sd"]
    p3 = _rewrite(p, tmp_path / "nosd.safetensors", header={"stpredict": json.dumps(raw)})
    with pytest.raises(ModelFileError, match="gene_stats"):
        load_model_file(p3, verify=False)
