"""The one pixel pipeline: uint8 RGB patches → the encoder's input, and the augmentations.

Training (:mod:`napari_stpredict.training`), evaluation, the :class:`~napari_stpredict.model.
Predictor` and the inference engine all turn pixels into encoder input with
:func:`encoder_input` and nothing else, so a model sees bit-identical numbers for the same
pixels wherever they come from. What the model expects is an :class:`InputSpec`, stored in the
model file's ``metadata["input"]``:

* ``patch_um`` / ``patch_px``: the physical side of a patch and its side in pixels;
* ``mean`` / ``std``: the backbone's own normalisation, from timm's pretrained config
  (:func:`backbone_mean_std`; ``(0.5, 0.5, 0.5)`` for ``tf_efficientnet_lite0``, ImageNet's for
  ResNets), never downloaded;
* ``context``: ``0`` (none) or the side of a second, wider field of view around the same centre,
  as a multiple of ``patch_um``, resampled to ``patch_px`` (:meth:`InputSpec.fields`);
* ``tta``: how many of the 8 symmetries of the square (:func:`dihedral`) are averaged at
  inference (1, 2, 4 or 8).

Model files written before ``"input"`` existed load as ImageNet mean/std (their
``image_mean``/``image_std``), no context, ``tta=1`` (:meth:`InputSpec.from_metadata`).

:func:`augment` is the only training augmentation: a random symmetry of the square per patch
and, when asked, a stain jitter (HED and/or brightness–contrast–saturation), drawn from a
seeded :class:`torch.Generator`, on uint8 patches *before* :func:`encoder_input`, so
augmented patches go through the same conversion as everything else.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from napari_stpredict.errors import StPredictError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "STAIN_AUGMENTS",
    "TTA_ORDER",
    "InputSpec",
    "augment",
    "backbone_mean_std",
    "dihedral",
    "encoder_input",
    "stain_jitter",
]

#: ImageNet channel statistics (RGB, 0–1 scale): the fallback, and what old model files used.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Stain augmentations :func:`augment` knows.
STAIN_AUGMENTS = ("none", "hed", "color", "hed+color")
_TTA = (1, 2, 4, 8)


def _triple(name: str, value: Any) -> tuple[float, float, float]:
    try:
        t = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise StPredictError(f"input spec: {name}={value!r} is not 3 numbers") from None
    if len(t) != 3 or not all(math.isfinite(v) for v in t):
        raise StPredictError(f"input spec: {name}={value!r} is not 3 finite numbers")
    return t  # type: ignore[return-value]


@dataclass(frozen=True)
class InputSpec:
    """What the encoder expects (stored in the model file as ``metadata["input"]``).

    Attributes
    ----------
    patch_um
        Physical side of a patch in µm (``None``: the model was trained in image pixels only).
    patch_px
        Side of a patch in pixels.
    mean, std
        RGB normalisation on the 0–1 scale: ``(x / 255 - mean) / std``.
    context
        ``0.0``: no context. Else the side of a second field of view (same centre) as a multiple
        of ``patch_um``, resampled to ``patch_px`` pixels.
    tta
        Symmetries of the square averaged at inference (1, 2, 4 or 8; see :func:`dihedral`).
    """

    patch_um: float | None
    patch_px: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    context: float = 0.0
    tta: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", _triple("mean", self.mean))
        object.__setattr__(self, "std", _triple("std", self.std))
        if self.patch_um is not None:
            object.__setattr__(self, "patch_um", float(self.patch_um))
            if not self.patch_um > 0:
                raise StPredictError(f"input spec: patch_um={self.patch_um!r} must be > 0")
        if isinstance(self.patch_px, bool) or int(self.patch_px) != self.patch_px:
            raise StPredictError(f"input spec: patch_px={self.patch_px!r} is not an integer")
        object.__setattr__(self, "patch_px", int(self.patch_px))
        if self.patch_px < 8:
            raise StPredictError(f"input spec: patch_px={self.patch_px} is too small (< 8)")
        if any(s <= 0 for s in self.std):
            raise StPredictError(f"input spec: std={self.std} must be positive")
        object.__setattr__(self, "context", float(self.context))
        if not (self.context == 0.0 or (math.isfinite(self.context) and self.context > 1.0)):
            raise StPredictError(
                f"input spec: context={self.context!r}: 0 (none) or a multiple > 1 of the patch side"
            )
        if self.tta not in _TTA:
            raise StPredictError(f"input spec: tta={self.tta!r}: choose 1, 2, 4 or 8")
        object.__setattr__(self, "tta", int(self.tta))

    # ---------------------------------------------------------------- fields of view
    @property
    def scales(self) -> tuple[float, ...]:
        """Side of each field of view as a multiple of the patch side (first = the patch)."""
        return (1.0,) if self.context == 0.0 else (1.0, self.context)

    def fields(self) -> list[tuple[float | None, int]]:
        """``(side in µm, side in px)`` per field of view; the first is the patch itself.

        The side in µm is ``None`` for a pixel-only model; multiply the patch's level-0 side by
        :attr:`scales` then.
        """
        return [
            (None if self.patch_um is None else self.patch_um * s, self.patch_px)
            for s in self.scales
        ]

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (``metadata["input"]``)."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InputSpec:
        """Inverse of :meth:`to_dict`; unknown keys or bad values → :class:`StPredictError`."""
        if not isinstance(d, Mapping):
            raise StPredictError(f"input spec: expected a mapping, got {type(d).__name__}")
        names = {"patch_um", "patch_px", "mean", "std", "context", "tta"}
        unknown = sorted(set(d) - names)
        if unknown:
            raise StPredictError(f"input spec: unknown key {unknown[0]!r}")
        if "patch_px" not in d:
            raise StPredictError("input spec: 'patch_px' is missing")
        return cls(**{k: d[k] for k in names if k in d})

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> InputSpec:
        """The spec of a model file's metadata; files without ``"input"`` → ImageNet, no context, tta 1."""
        if meta.get("input") is not None:
            return cls.from_dict(meta["input"])
        return cls(
            patch_um=meta.get("patch_um"),
            patch_px=int(meta["patch_px"]),
            mean=tuple(meta.get("image_mean") or IMAGENET_MEAN),
            std=tuple(meta.get("image_std") or IMAGENET_STD),
        )

    def replace(self, **changes: Any) -> InputSpec:
        """A copy with ``changes`` (e.g. ``spec.replace(tta=8)``)."""
        return InputSpec(**{**asdict(self), **changes})


def backbone_mean_std(backbone: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` of a backbone from timm's pretrained config; no download.

    Parameters
    ----------
    backbone
        A timm model name (``"tf_efficientnet_lite0"``, ``"resnet50.a1_in1k"``), a timm model,
        or an :class:`~napari_stpredict.model.encoders.ImageEncoder`. Names timm does not know
        (e.g. ``hf-hub:`` ones) fall back to ImageNet's statistics.
    """
    cfg: Any = None
    module = getattr(backbone, "model", backbone)
    if hasattr(module, "pretrained_cfg"):
        cfg = module.pretrained_cfg
    elif isinstance(backbone, str):
        try:
            from timm.models import get_pretrained_cfg

            cfg = get_pretrained_cfg(backbone)
            if cfg is None and "." in backbone:
                cfg = get_pretrained_cfg(backbone.split(".", 1)[0])
        except Exception:  # unknown names, old timm
            cfg = None
    if cfg is not None and not isinstance(cfg, Mapping):
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else vars(cfg)
    mean = (cfg or {}).get("mean") or IMAGENET_MEAN
    std = (cfg or {}).get("std") or IMAGENET_STD
    if len(mean) != 3 or len(std) != 3:  # grey-scale backbones: not for H&E
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _as_uint8_tensor(patches: np.ndarray | torch.Tensor, spec: InputSpec) -> torch.Tensor:
    if isinstance(patches, np.ndarray):
        if patches.dtype != np.uint8:
            raise StPredictError(f"patches: dtype {patches.dtype}, expected uint8 RGB")
        patches = torch.from_numpy(np.ascontiguousarray(patches))
    elif not isinstance(patches, torch.Tensor):
        raise StPredictError(f"patches: expected a uint8 array, got {type(patches).__name__}")
    elif patches.dtype != torch.uint8:
        raise StPredictError(f"patches: dtype {patches.dtype}, expected uint8 RGB")
    p = spec.patch_px
    if patches.ndim < 4 or tuple(patches.shape[-3:]) != (p, p, 3):
        raise StPredictError(
            f"patches: shape {tuple(patches.shape)}, expected (N, {p}, {p}, 3) uint8 RGB"
        )
    return patches


def encoder_input(
    patches_u8: np.ndarray | torch.Tensor,
    spec: InputSpec,
    *,
    device: str | torch.device | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """uint8 RGB ``(N, P, P, 3)`` → float32 ``(N, 3, P, P)``: ``(x - 255·mean) · 1/(255·std)``.

    The one conversion from pixels to the encoder's input. Leading dimensions other than one
    ``N`` are kept: ``(N, F, P, P, 3)`` (F fields of view) → ``(N, F, 3, P, P)``.

    Parameters
    ----------
    patches_u8
        numpy array or torch tensor (any device) of uint8 RGB, ``P = spec.patch_px``.
    spec
        The model's :class:`InputSpec` (mean/std).
    device
        Where the result lives (default: where ``patches_u8`` is; numpy → CPU). The uint8 data
        is moved first, so the float maths runs on ``device``.
    channels_last
        Return a channels-last tensor (CUDA convolutions); only for 4-D input.

    Raises
    ------
    StPredictError
        Not uint8, or not ``(..., P, P, 3)``.
    """
    x = _as_uint8_tensor(patches_u8, spec)
    if device is not None:
        x = x.to(device, non_blocking=True)
    lead = x.shape[:-3]
    p = spec.patch_px
    x = x.reshape(-1, p, p, 3).permute(0, 3, 1, 2).float()
    mean255 = torch.tensor([m * 255.0 for m in spec.mean], dtype=torch.float32, device=x.device)
    inv_std255 = torch.tensor(
        [1.0 / (s * 255.0) for s in spec.std], dtype=torch.float32, device=x.device
    )
    x = (x - mean255.view(1, 3, 1, 1)) * inv_std255.view(1, 3, 1, 1)
    if len(lead) == 1:
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()
    return x.reshape(*lead, 3, p, p).contiguous()


def dihedral(x: np.ndarray | torch.Tensor, k: int, dims: tuple[int, int] = (-2, -1)):
    """Symmetry ``k`` (0–7) of the square: ``k % 4`` quarter turns, then mirrored if ``k >= 4``.

    ``dims`` are the (row, column) axes: the default suits ``(…, C, H, W)`` encoder input; use
    ``dims=(-3, -2)`` for uint8 ``(…, H, W, 3)`` patches. ``k = 0`` returns ``x`` itself.
    Test-time augmentation with ``tta = n`` averages the first ``n`` symmetries of
    :data:`TTA_ORDER`.
    """
    if not 0 <= int(k) <= 7:
        raise StPredictError(f"dihedral: k={k!r} must be in 0..7")
    k = int(k)
    if k == 0:
        return x
    if isinstance(x, np.ndarray):
        out = np.rot90(x, k % 4, axes=dims)
        return np.flip(out, axis=dims[1]) if k >= 4 else out
    out = torch.rot90(x, k % 4, dims=dims)
    return out.flip(dims[1]) if k >= 4 else out


#: The symmetries averaged for each ``tta`` (first ``tta`` of this order): identity, mirror,
#: half turn, mirrored half turn, then the quarter turns.
TTA_ORDER = (0, 4, 2, 6, 1, 5, 3, 7)


# ------------------------------------------------------------------------------------ stain jitter
# Ruifrok & Johnston H&E-DAB stain matrix (as skimage.color.hed_from_rgb / rgb_from_hed).
_RGB_FROM_HED = np.array(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64
)
_RGB_FROM_HED[2] = np.cross(_RGB_FROM_HED[0], _RGB_FROM_HED[1])
_RGB_FROM_HED = _RGB_FROM_HED / np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)
_OD_EPS = 1e-6


def stain_jitter(
    x: torch.Tensor, generator: torch.Generator | None, *, kind: str = "hed", strength: float = 1.0
) -> torch.Tensor:
    """Random per-sample stain/colour change of float RGB ``(N, ..., H, W, 3)`` in 0–1 (a new tensor).

    ``hed``: each sample's haematoxylin, eosin and DAB optical densities are scaled by
    ``U(1 - 0.05s, 1 + 0.05s)`` and shifted by ``U(-0.05s, 0.05s)`` (Tellez et al. 2019, "HED
    light"); ``color``: brightness ``±0.1s``, contrast ``±0.1s`` and saturation ``±0.1s``
    (torchvision's ColorJitter maths); ``hed+color``: both. ``s = strength``. All fields of view
    of a sample (``(N, F, H, W, 3)``) get the same change.
    """
    if kind not in STAIN_AUGMENTS:
        raise StPredictError(f"stain augmentation {kind!r}: choose {', '.join(STAIN_AUGMENTS)}")
    n = x.shape[0]
    per_sample = (n,) + (1,) * (x.ndim - 2)
    x = x.clone()
    if "hed" in kind:
        sigma = 0.05 * strength
        alpha = 1.0 + (torch.rand(n, 3, generator=generator) * 2 - 1) * sigma
        beta = (torch.rand(n, 3, generator=generator) * 2 - 1) * sigma
        hed_from_rgb = torch.from_numpy(_HED_FROM_RGB).float()
        rgb_from_hed = torch.from_numpy(_RGB_FROM_HED).float()
        # OD' = (OD @ H · diag(alpha) + beta) @ R, folded into one 3 × 3 matrix per sample
        mix = (hed_from_rgb.unsqueeze(0) * alpha.unsqueeze(1)) @ rgb_from_hed
        shift = (beta @ rgb_from_hed).unsqueeze(1)
        od = x.clamp_min_(_OD_EPS).log_().neg_().reshape(n, -1, 3)
        x = torch.baddbmm(shift, od, mix).neg_().exp_().reshape(x.shape)
    if "color" in kind:
        amp = 0.1 * strength
        b, c, s = (1.0 + (torch.rand(3, n, generator=generator) * 2 - 1) * amp).unbind(0)
        luma = torch.tensor([0.299, 0.587, 0.114])
        dims = tuple(range(1, x.ndim))
        x = x * b.view(*per_sample, 1)
        mean = (x * luma).sum(-1, keepdim=True).mean(dims, keepdim=True)
        x = (x - mean) * c.view(*per_sample, 1) + mean
        grey = (x * luma).sum(-1, keepdim=True)
        x = (x - grey) * s.view(*per_sample, 1) + grey
    return x.clamp_(0.0, 1.0)


def augment(
    patches_u8: torch.Tensor,
    generator: torch.Generator | None,
    *,
    symmetries: bool = True,
    stain: str = "none",
    strength: float = 1.0,
) -> torch.Tensor:
    """The training augmentation of uint8 ``(N, P, P, 3)`` (or ``(N, F, P, P, 3)``) patches.

    A uniformly random symmetry of the square per sample (:func:`dihedral`; every field of view
    of a sample turns the same way) when ``symmetries``, then the stain jitter ``stain``
    (:data:`STAIN_AUGMENTS`, see :func:`stain_jitter`), rounded back to uint8 so the result goes
    through :func:`encoder_input` like any patch. Every random number comes from ``generator``
    (``None``: torch's global RNG): the same seed gives the same patches.
    """
    if stain not in STAIN_AUGMENTS:
        raise StPredictError(f"stain augmentation {stain!r}: choose {', '.join(STAIN_AUGMENTS)}")
    x = patches_u8
    if symmetries:
        codes = torch.randint(0, 8, (x.shape[0],), generator=generator).tolist()
        x = torch.stack([dihedral(xi, c, dims=(-3, -2)) for xi, c in zip(x, codes, strict=True)])
    if stain != "none":
        f = stain_jitter(x.float() / 255.0, generator, kind=stain, strength=strength)
        x = (f * 255.0).round_().to(torch.uint8)
    return x.contiguous()
