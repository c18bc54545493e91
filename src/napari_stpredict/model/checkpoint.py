"""The model file: one ``.safetensors`` with weights, the reference bank and JSON metadata.

Layout
------
Tensors
    ``model.<name>``: the :class:`~napari_stpredict.model.methods.STModel` state dict (float32);
    ``bank.embeddings`` ``(N, D)`` float32 L2-normalised expression embeddings of the training
    spots, ``bank.expression`` ``(N, G)`` float32 their normalised expression,
    ``bank.section_index`` ``(N,)`` int32 index into ``metadata["bank_sections"]``
    (retrieval methods only).
safetensors header metadata (strings)
    ``format = "napari-stpredict-model"``, ``format_version = "1"``, ``stpredict = <JSON>``.
JSON (``ModelFile.metadata``)
    ``format``, ``format_version``, ``package_version``, ``created``, ``method``, ``backbone``,
    ``model_config`` (rebuilds the architecture), ``pretrained``, ``genes``, ``normalization``,
    ``patch_um``, ``patch_px``, ``image_mean``, ``image_std``, ``input`` (the
    :class:`~napari_stpredict.model.preprocess.InputSpec` dict: patch geometry, the backbone's
    mean/std, context, tta; files without it read as ImageNet mean/std, no context, tta 1),
    ``top_k``, ``training_sections``, ``bank_sections``, ``n_bank``, ``gene_stats``
    (``{gene: {"mean", "sd", "p01", "p50", "p99", "val_pcc"}}``: the training spots'
    log-normalised expression and the validation Pearson r, ``None`` without validation; older
    files store columns ``{"mean": [...], "std": [...], "p01", "p50", "p99"}``, read the same
    by :func:`gene_stats_arrays`), ``metrics``, ``history``, ``config``, ``content_sha256``
    (of all tensors, checked on load).

Nothing is ever unpickled: safetensors stores raw tensors and the metadata is JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_stpredict.errors import ModelFileError, first_line
from napari_stpredict.model.file_metadata import (
    FORMAT_VERSION,
    completed_metadata,
    jsonable,
    validate_metadata,
)
from napari_stpredict.model.gene_stats import (
    GENE_STAT_KEYS,
    compute_gene_stats,
    gene_stats_arrays,
    gene_stats_per_gene,
)
from napari_stpredict.model.header import FORMAT_NAME

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "GENE_STAT_KEYS",
    "ModelFile",
    "compute_gene_stats",
    "gene_stats_arrays",
    "gene_stats_per_gene",
    "load_model_file",
    "save_model_file",
]


@dataclass
class ModelFile:
    """A loaded, validated model file (tensors on the CPU).

    Attributes
    ----------
    path
        The file.
    metadata
        The JSON metadata (see the module docstring).
    state_dict
        Model weights (names without the ``model.`` prefix).
    bank_embeddings, bank_expression, bank_section_index
        The reference bank, or ``None`` for direct regression.
    """

    path: Path
    metadata: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    bank_embeddings: torch.Tensor | None = None
    bank_expression: torch.Tensor | None = None
    bank_section_index: torch.Tensor | None = None
    _gene_stats: dict[str, np.ndarray] | None = field(default=None, repr=False)

    @property
    def genes(self) -> list[str]:
        """Gene panel, in output column order."""
        return list(self.metadata["genes"])

    @property
    def method(self) -> str:
        """``"cmrc"``, ``"bleep"`` or ``"regression"``."""
        return str(self.metadata["method"])

    @property
    def gene_stats(self) -> dict[str, np.ndarray]:
        """Per-gene statistics of the training expression: ``mean std p01 p50 p99`` → ``(G,)``."""
        if self._gene_stats is None:
            arrays = gene_stats_arrays(self.metadata["gene_stats"], self.genes)
            self._gene_stats = {k: arrays[k] for k in GENE_STAT_KEYS}
        return self._gene_stats

    @property
    def input_spec(self):
        """The :class:`~napari_stpredict.model.preprocess.InputSpec` the encoder expects."""
        from napari_stpredict.model.preprocess import InputSpec

        return InputSpec.from_metadata(self.metadata)

    def build_model(self):
        """Rebuild the :class:`~napari_stpredict.model.methods.STModel` with these weights (eval mode)."""
        from napari_stpredict.model.methods import build_model

        cfg = dict(self.metadata["model_config"])
        method = cfg.pop("method", self.method)
        try:
            model = build_model(method, pretrained="none", **cfg)
        except Exception as err:
            raise ModelFileError(
                f"{self.path}: cannot rebuild the model ({first_line(err)})"
            ) from None
        try:
            model.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as err:
            why = _state_mismatch(model.state_dict(), self.state_dict) or first_line(err)
            raise ModelFileError(f"{self.path}: weights do not fit the model ({why})") from None
        return model.eval()


def _state_mismatch(expected: dict, got: dict) -> str:
    """The first tensor that does not fit, named: wrong shape, missing or unexpected."""
    for name, t in expected.items():
        if name not in got:
            return f"tensor {name!r} is missing"
        if tuple(got[name].shape) != tuple(t.shape):
            return (
                f"tensor {name!r} has shape {tuple(got[name].shape)}, "
                f"the model needs {tuple(t.shape)}"
            )
    extra = [n for n in got if n not in expected]
    return f"unexpected tensor {extra[0]!r}" if extra else ""


def _content_hash(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous().reshape(-1)
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_model_file(
    path: str | os.PathLike,
    model,
    *,
    bank_embeddings: torch.Tensor | np.ndarray | None,
    bank_expression: torch.Tensor | np.ndarray | None,
    metadata: dict[str, Any],
    bank_section_index: torch.Tensor | np.ndarray | None = None,
    overwrite: bool = True,
) -> Path:
    """Write a model file atomically.

    Parameters
    ----------
    path
        Target ``.safetensors`` file.
    model
        The trained :class:`~napari_stpredict.model.methods.STModel`.
    bank_embeddings, bank_expression
        The reference bank (``(N, D)`` and ``(N, G)``); ``None`` for direct regression.
    metadata
        At least ``genes``, ``normalization``, ``patch_px``, ``patch_um`` (float or ``None``),
        ``training_sections``, ``gene_stats``; optional ``top_k`` (50), ``bank_sections``,
        ``metrics``, ``history``, ``config``, ``input`` (an
        :class:`~napari_stpredict.model.preprocess.InputSpec` dict; ``image_mean``/``image_std``
        are then set from it, else they default to ImageNet's). ``method``, ``backbone``,
        ``model_config`` and the format fields are filled in here.
    bank_section_index
        ``(N,)`` index of each bank spot into ``metadata["bank_sections"]``.
    overwrite
        Replace an existing file.

    Returns
    -------
    Path
        The written file.
    """
    from safetensors.torch import save_file

    from napari_stpredict.io_utils import atomic_path

    tensors = _weights(model)
    meta = completed_metadata(metadata, model)
    if getattr(model, "retrieval", True):
        bank = _bank_tensors(path, model, bank_embeddings, bank_expression, bank_section_index)
        tensors.update(bank)
        meta["n_bank"] = int(bank["bank.embeddings"].shape[0])
    else:
        meta["n_bank"] = 0
    meta["content_sha256"] = _content_hash(tensors)
    meta = jsonable(meta)
    validate_metadata(Path(path), meta)
    header = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "stpredict": json.dumps(meta, separators=(",", ":"), allow_nan=False),
    }
    with atomic_path(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return Path(path)


def _weights(model) -> dict[str, torch.Tensor]:
    """``model.<name>`` → CPU copies of the state dict (floating point as float32)."""
    return {
        f"model.{k}": v.detach()
        .to("cpu", torch.float32 if v.is_floating_point() else v.dtype)
        .contiguous()
        .clone()
        for k, v in model.state_dict().items()
    }


def _bank_tensors(
    path: str | os.PathLike,
    model,
    bank_embeddings: torch.Tensor | np.ndarray | None,
    bank_expression: torch.Tensor | np.ndarray | None,
    bank_section_index: torch.Tensor | np.ndarray | None,
) -> dict[str, torch.Tensor]:
    """The ``bank.*`` tensors of a retrieval model (section index default: all 0)."""
    if bank_embeddings is None or bank_expression is None:
        raise ModelFileError(f"{path}: method {model.method!r} needs a reference bank")
    emb = torch.as_tensor(bank_embeddings).detach().to("cpu", torch.float32).contiguous()
    expr = torch.as_tensor(bank_expression).detach().to("cpu", torch.float32).contiguous()
    if emb.ndim != 2 or expr.ndim != 2 or emb.shape[0] != expr.shape[0]:
        raise ModelFileError(
            f"{path}: bank shapes {tuple(emb.shape)} and {tuple(expr.shape)} do not match"
        )
    if bank_section_index is None:
        bank_section_index = torch.zeros(emb.shape[0], dtype=torch.int32)
    return {
        "bank.embeddings": emb,
        "bank.expression": expr,
        "bank.section_index": torch.as_tensor(bank_section_index)
        .to("cpu", torch.int32)
        .contiguous(),
    }


def load_model_file(path: str | os.PathLike, *, verify: bool = True) -> ModelFile:
    """Read and validate a model file.

    Parameters
    ----------
    path
        A file written by :func:`save_model_file`.
    verify
        Check the tensor checksum (detects bit-level corruption; costs one pass over the data).

    Returns
    -------
    ModelFile

    Raises
    ------
    ModelFileError
        Missing, not a safetensors file, not a napari-stpredict model, from an incompatible
        format version, or corrupt (one line naming the file and the reason).
    """
    p = Path(path)
    header, tensors = _read(p)
    meta = _metadata(p, header)
    validate_metadata(p, meta)
    if verify and meta.get("content_sha256") != _content_hash(tensors):
        raise ModelFileError(f"{p}: corrupt model file (tensor checksum mismatch)")
    state = {n[len("model.") :]: t for n, t in tensors.items() if n.startswith("model.")}
    if not state:
        raise ModelFileError(f"{p}: model file has no weights")
    mf = ModelFile(path=p, metadata=meta, state_dict=state)
    n_genes = len(meta["genes"])
    if meta["model_config"].get("n_genes") != n_genes:
        raise ModelFileError(f"{p}: model_config n_genes does not match {n_genes} genes")
    if "bank.embeddings" in tensors:
        mf.bank_embeddings, mf.bank_expression, mf.bank_section_index = _checked_bank(
            p, tensors, n_genes
        )
    elif meta["method"] not in ("regression", "ridge"):  # direct methods have no bank
        raise ModelFileError(f"{p}: method {meta['method']!r} needs a reference bank, none stored")
    return mf


def _read(p: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The safetensors header metadata and every tensor, after the format and version checks."""
    from safetensors import safe_open

    if not p.is_file():
        raise ModelFileError(f"{p}: model file not found")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            names = list(f.keys())
            _check_format(p, header)
            tensors = {n: f.get_tensor(n) for n in names}
    except ModelFileError:
        raise
    except Exception as err:
        raise ModelFileError(
            f"{p}: not a readable model file (corrupt or not safetensors: {first_line(err)})"
        ) from None
    return header, tensors


def _check_format(p: Path, header: dict[str, str]) -> None:
    if header.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{p}: not a napari-stpredict model file (no {FORMAT_NAME!r} header)")
    version = header.get("format_version", "")
    if not version.isdigit():
        raise ModelFileError(f"{p}: corrupt model file (format_version={version!r})")
    if int(version) != FORMAT_VERSION:
        raise ModelFileError(
            f"{p}: model file format version {version} is not supported by this "
            f"napari-stpredict (reads version {FORMAT_VERSION}); retrain or use a matching version"
        )


def _metadata(p: Path, header: dict[str, str]) -> dict[str, Any]:
    """The JSON metadata object of the header."""
    try:
        meta = json.loads(header.get("stpredict", ""))
    except json.JSONDecodeError:
        raise ModelFileError(f"{p}: corrupt model file (metadata is not valid JSON)") from None
    if not isinstance(meta, dict):
        raise ModelFileError(f"{p}: corrupt model file (metadata is not a JSON object)")
    return meta


def _checked_bank(
    p: Path, tensors: dict[str, torch.Tensor], n_genes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(embeddings, expression, section_index)`` of the stored bank: complete, fitting, finite."""
    emb, expr = tensors["bank.embeddings"], tensors.get("bank.expression")
    sec = tensors.get("bank.section_index")
    if expr is None or sec is None:
        raise ModelFileError(f"{p}: incomplete reference bank")
    if emb.ndim != 2 or expr.shape != (emb.shape[0], n_genes) or sec.shape != (emb.shape[0],):
        raise ModelFileError(
            f"{p}: reference bank shapes {tuple(emb.shape)}, {tuple(expr.shape)}, "
            f"{tuple(sec.shape)} do not match {n_genes} genes"
        )
    if emb.shape[0] == 0:
        raise ModelFileError(f"{p}: reference bank is empty")
    if not (torch.isfinite(emb).all() and torch.isfinite(expr).all()):
        raise ModelFileError(f"{p}: reference bank contains NaN or infinite values")
    return emb, expr, sec
