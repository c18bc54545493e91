"""The JSON metadata of a model file: completed when saved, validated when saved and loaded.

Part of the model file (:mod:`napari_stpredict.model.checkpoint`; the layout of the metadata is
described there).
"""

from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path
from typing import Any

import numpy as np

from napari_stpredict.errors import ModelFileError
from napari_stpredict.model.gene_stats import GENE_STAT_KEYS, per_gene_layout
from napari_stpredict.model.header import FORMAT_NAME, bad_key

FORMAT_VERSION = 1
_REQUIRED = {
    "method": str,
    "backbone": str,
    "model_config": dict,
    "genes": list,
    "normalization": dict,
    "patch_px": int,
    "top_k": int,
    "training_sections": list,
    "gene_stats": dict,
    "image_mean": list,
    "image_std": list,
}


def completed_metadata(metadata: dict[str, Any], model) -> dict[str, Any]:
    """``metadata`` with the defaults, the input spec's mean/std, the format and model fields."""
    from napari_stpredict import __version__
    from napari_stpredict.model.preprocess import IMAGENET_MEAN, IMAGENET_STD, InputSpec

    meta = dict(metadata)
    meta.setdefault("top_k", 50)
    if meta.get("input") is not None:
        spec = InputSpec.from_dict(meta["input"])  # one-line error on a bad spec
        meta["input"] = spec.to_dict()
        # kept for readers of older versions: the same numbers as the spec
        meta["image_mean"], meta["image_std"] = list(spec.mean), list(spec.std)
    meta.setdefault("image_mean", list(IMAGENET_MEAN))
    meta.setdefault("image_std", list(IMAGENET_STD))
    meta.setdefault("metrics", {})
    meta.setdefault("history", [])
    meta.setdefault("config", {})
    meta.setdefault("bank_sections", list(meta.get("training_sections", [])))
    meta.update(
        format=FORMAT_NAME,
        format_version=FORMAT_VERSION,
        package_version=__version__,
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        method=model.method,
        backbone=model.backbone,
        model_config=model.config,
        pretrained=meta.get("pretrained", getattr(model, "pretrained_source", "none")),
    )
    return meta


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON values: paths and numpy as Python, non-finite floats as ``None``."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def validate_metadata(path: Path, meta: dict[str, Any]) -> None:
    """Raise :class:`ModelFileError` (one line naming ``path``) unless ``meta`` is complete and sound."""
    bad = bad_key(meta, _REQUIRED)
    if bad is not None:
        key, present = bad
        if not present:
            raise ModelFileError(f"{path}: metadata lacks {key!r}")
        raise ModelFileError(f"{path}: metadata {key!r} is not a {_REQUIRED[key].__name__}")
    genes = meta["genes"]
    if not genes or not all(isinstance(g, str) for g in genes) or len(set(genes)) != len(genes):
        raise ModelFileError(f"{path}: metadata 'genes' must be unique gene names")
    pum = meta.get("patch_um")
    if pum is not None and (not isinstance(pum, int | float) or pum <= 0):
        raise ModelFileError(f"{path}: metadata 'patch_um'={pum!r} is not a positive number")
    if meta["patch_px"] < 8:
        raise ModelFileError(f"{path}: metadata 'patch_px'={meta['patch_px']} is too small")
    if meta["top_k"] < 1:
        raise ModelFileError(f"{path}: metadata 'top_k'={meta['top_k']} must be ≥ 1")
    stats = meta["gene_stats"]
    if per_gene_layout(stats, genes):
        for g in genes:
            bad = [k for k in ("mean", "sd", "p01", "p99") if not _is_number(stats[g].get(k))]
            if bad:
                raise ModelFileError(
                    f"{path}: metadata gene_stats[{g!r}][{bad[0]!r}] is not a number"
                )
    else:
        for k in GENE_STAT_KEYS:
            vals = stats.get(k)
            if not isinstance(vals, list) or len(vals) != len(genes):
                raise ModelFileError(
                    f"{path}: metadata gene_stats must give each gene's statistics ({k!r} missing)"
                )
    if len(meta["image_mean"]) != 3 or len(meta["image_std"]) != 3:
        raise ModelFileError(f"{path}: metadata image_mean/image_std must have 3 values")
    if meta.get("input") is not None:
        from napari_stpredict.errors import StPredictError
        from napari_stpredict.model.preprocess import InputSpec

        try:
            spec = InputSpec.from_dict(meta["input"])
        except StPredictError as err:
            raise ModelFileError(f"{path}: metadata 'input': {err}") from None
        if spec.patch_px != meta["patch_px"]:
            raise ModelFileError(
                f"{path}: metadata 'input' patch_px {spec.patch_px} differs from patch_px {meta['patch_px']}"
            )


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)
