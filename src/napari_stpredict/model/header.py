"""A model file's metadata without its tensors, and the one resolver of a "model" argument.

Many places need facts about a model (its genes, training statistics, normalisation, tumour
signature) but not its weights: the tumour score, the exports' provenance, the prediction store
key, the cohort's up-front check. :func:`read_model_header` reads the JSON metadata from the
safetensors header (the first bytes of the file; no tensor is read, torch is not imported).
:func:`model_info` turns any accepted "model" argument — a Predictor, a metadata mapping, a
path, or ``None`` — into one :class:`ModelInfo`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_stpredict.errors import ModelFileError, first_line

__all__ = ["ModelInfo", "bad_key", "header_gene_stats", "model_info", "read_model_header"]

FORMAT_NAME = "napari-stpredict-model"  # the "format" field of the safetensors header
_MAX_HEADER = 256 << 20  # a safetensors header larger than this is not ours


def read_model_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a model file, from the safetensors header only.

    Raises
    ------
    ModelFileError
        One line: missing file, not safetensors, not a napari-stpredict model file.

    Examples
    --------
    >>> read_model_header("model.safetensors")["genes"][:2]  # doctest: +SKIP
    ['ERBB2', 'GRB7']
    """
    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"{p}: model file not found")
    try:
        with open(p, "rb") as fh:
            raw = fh.read(8)
            n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
            if not 0 < n <= min(_MAX_HEADER, p.stat().st_size - 8):
                raise ValueError("no safetensors header")
            header = json.loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise ModelFileError(
            f"{p}: not a readable napari-stpredict model file ({first_line(err)})"
        ) from None
    meta_raw = (header.get("__metadata__") or {}) if isinstance(header, dict) else {}
    fmt = meta_raw.get("format")
    if fmt is not None and fmt != FORMAT_NAME:
        raise ModelFileError(f"{p}: not a napari-stpredict model file (format {fmt!r})")
    try:
        meta = json.loads(meta_raw.get("stpredict", ""))
    except (TypeError, ValueError):
        raise ModelFileError(f"{p}: not a napari-stpredict model file (no metadata)") from None
    if not isinstance(meta, dict):
        raise ModelFileError(f"{p}: not a napari-stpredict model file (metadata is not an object)")
    return meta


def bad_key(
    meta: Mapping[str, Any], required: Mapping[str, type | tuple[type, ...]]
) -> tuple[str, bool] | None:
    """The first key of ``required`` that ``meta`` lacks or holds with another type.

    Returns ``(key, False)`` for a missing key, ``(key, True)`` for a value of the wrong type
    (a bool never counts as a number), ``None`` when every key is there with its type. Used to
    check a model file's metadata and a training state's header.
    """
    for key, typ in required.items():
        if key not in meta:
            return key, False
        if not isinstance(meta[key], typ) or isinstance(meta[key], bool):
            return key, True
    return None


@dataclass(frozen=True)
class ModelInfo:
    """What a "model" argument resolved to.

    Attributes
    ----------
    metadata
        The model's metadata (empty when unknown).
    path
        The model file, when known.
    predictor
        The Predictor, when one was given.
    """

    metadata: Mapping[str, Any] = field(default_factory=dict)
    path: Path | None = None
    predictor: Any = None

    @property
    def genes(self) -> list[str]:
        """The model's genes (``[]`` when unknown)."""
        if self.predictor is not None and hasattr(self.predictor, "genes"):
            return [str(g) for g in self.predictor.genes]
        return [str(g) for g in self.metadata.get("genes") or []]

    def gene_stats(self) -> dict[str, np.ndarray] | None:
        """Per-gene training statistics as arrays aligned with :attr:`genes` (or ``None``)."""
        stats = getattr(self.predictor, "gene_stats", None) if self.predictor is not None else None
        if stats:
            return {k: np.asarray(v, dtype=np.float64) for k, v in stats.items()}
        return header_gene_stats(self.metadata, self.genes)

    def __str__(self) -> str:
        return str(self.path) if self.path is not None else "model"


def model_info(
    model: Any, *, fallback: str | os.PathLike | None = None, best_effort: bool = False
) -> ModelInfo:
    """Resolve a "model" argument: a Predictor, a metadata mapping, a file path or ``None``.

    Parameters
    ----------
    model
        A Predictor (``.metadata``, ``.genes``, ``.gene_stats``, ``.path``), its metadata as a
        mapping (a bare ``{"mean", "std"[, "genes"]}`` statistics mapping is accepted too), a
        model file path, or ``None``.
    fallback
        A model file path to use when ``model`` is ``None`` (e.g. the one a prediction store
        recorded).
    best_effort
        Return an empty :class:`ModelInfo` (with the path) instead of raising when a file
        cannot be read (provenance must not stop an export).

    Raises
    ------
    ModelFileError
        Unreadable model file (unless ``best_effort``).
    """
    if model is None:
        model = fallback or None
    if model is None:
        return ModelInfo()
    if isinstance(model, ModelInfo):
        return model
    if hasattr(model, "metadata") and not isinstance(model, Mapping):
        path = getattr(model, "path", None) or getattr(model, "model_path", None)
        return ModelInfo(dict(model.metadata or {}), Path(path) if path else None, predictor=model)
    if isinstance(model, Mapping):
        meta = dict(model)
        if "gene_stats" not in meta and "mean" in meta and "std" in meta:
            meta = {"gene_stats": {"mean": meta["mean"], "std": meta["std"]}}
            if model.get("genes") is not None:
                meta["genes"] = list(model["genes"])
        return ModelInfo(meta)
    if isinstance(model, str | os.PathLike):
        p = Path(model)
        try:
            return ModelInfo(read_model_header(p), p)
        except ModelFileError:
            if best_effort:
                return ModelInfo({}, p)
            raise
    raise ModelFileError(
        f"{type(model).__name__}: not a model (give a Predictor, its metadata or a model file)"
    )


def header_gene_stats(
    meta: Mapping[str, Any], genes: list[str] | None = None
) -> dict[str, np.ndarray] | None:
    """``metadata["gene_stats"]`` as ``{stat: (G,) float64 array}``, or ``None`` without them.

    Both layouts (per gene ``{gene: {"mean", "sd", …}}`` and the older columns
    ``{"mean": [...], "std": [...]}``) are read by
    :func:`napari_stpredict.model.checkpoint.gene_stats_arrays`; ``std`` is the standard
    deviation either way. Aligned with ``genes`` (default ``meta["genes"]``).
    """
    stats = meta.get("gene_stats")
    if not isinstance(stats, Mapping) or not stats:
        return None
    from napari_stpredict.model.checkpoint import gene_stats_arrays

    order = [str(g) for g in (genes or meta.get("genes") or [])]
    try:
        arrays = gene_stats_arrays(dict(stats), order)
    except (TypeError, ValueError, KeyError, AttributeError):
        return None
    out = {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()}
    if out["mean"].size == 0 or np.isnan(out["mean"]).all():
        return None
    return out
