"""What an evaluation records beside its numbers: versions, the training config, each fold's
training summary, error text and which marker genes were scored."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from napari_stpredict.evaluation.markers import match_genes

__all__ = ["config_dict", "error_text", "training_summary", "used_and_missing", "versions"]

#: Fields of a model's training metrics kept in a fold's ``training`` summary.
_TRAINING_KEYS = (
    "best_epoch",
    "epochs_run",
    "steps",
    "n_train_spots",
    "n_val_spots",
    "val_pcc",
    "val_loss",
)


def versions() -> dict[str, str]:
    """Versions of napari-stpredict, Python and the libraries the numbers depend on."""
    import napari_stpredict

    out = {"napari_stpredict": napari_stpredict.__version__, "python": platform.python_version()}
    for mod in ("numpy", "torch", "timm", "anndata"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[mod] = importlib.metadata.version(mod)
    out["platform"] = platform.platform(terse=True)
    return out


def error_text(err: BaseException) -> str:
    """``"Type: first line"`` of a fold's failure (the type alone when there is no message)."""
    msg = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {msg}" if msg else type(err).__name__


def used_and_missing(
    markers: Sequence[str], panels: Sequence[Sequence[str]]
) -> tuple[list[str], list[str]]:
    """Marker genes found in the union of the models' panels, and those found in none."""
    union: list[str] = list(dict.fromkeys(g for p in panels for g in p))
    idx, missing = match_genes(union, markers)
    return [union[i] for i in idx], missing


def training_summary(meta: dict[str, Any]) -> dict[str, Any]:
    """What the fold's training did: best epoch, steps, validation scores (validation spots of
    the training sections only)."""
    m = meta.get("metrics") or {}
    return {k: m[k] for k in _TRAINING_KEYS if k in m}


def config_dict(config: Any) -> dict[str, Any]:
    """The training config as JSON-able values (``method`` left out: it is per method; long
    lists shown as their length)."""
    if dataclasses.is_dataclass(config):
        d = dataclasses.asdict(config)
    else:
        d = dict(vars(config))
    out = {}
    for k, v in d.items():
        if k == "method":
            continue
        if isinstance(v, Path):
            v = str(v)
        elif isinstance(v, list | tuple) and len(v) > 20:
            v = f"<{len(v)} items>"
        out[k] = v
    return out
