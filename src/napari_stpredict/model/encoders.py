"""Image encoders: any timm backbone as (tokens, pooled) features.

The reconstruction branch of CMRCNet needs the backbone's last feature map as a token sequence,
the projection heads need one pooled vector per patch. Both come from timm's
``forward_features`` / ``forward_head(pre_logits=True)``, which every timm model implements, so
convolutional networks (EfficientNet, ResNet, ConvNeXt) and transformers (ViT, UNI-style) work
through the same code.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from napari_stpredict.errors import StPredictError
from napari_stpredict.model.preprocess import IMAGENET_MEAN, IMAGENET_STD  # re-exported

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImageEncoder", "create_encoder"]


class ImageEncoder(nn.Module):
    """A timm backbone returning ``(tokens (B, T, C), pooled (B, C))``.

    Parameters
    ----------
    name
        Any timm model name (``timm.list_models()``).
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        import timm

        try:
            self.model = timm.create_model(name, pretrained=False, num_classes=0)
        except Exception as err:  # unknown names raise RuntimeError in timm
            raise StPredictError(f"backbone {name!r}: not a timm model ({err})") from None
        self.name = name
        self.num_features = int(getattr(self.model, "num_features", 0))
        fmt = getattr(self.model, "output_fmt", "NCHW")
        self._nhwc = str(fmt).upper() == "NHWC"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode images ``(B, 3, H, W)`` into tokens ``(B, T, C)`` and pooled ``(B, C)``."""
        feats = self.model.forward_features(x)
        pooled = self.model.forward_head(feats, pre_logits=True)
        return self.tokens_from_features(feats), pooled

    def tokens_from_features(self, feats: torch.Tensor) -> torch.Tensor:
        """Turn a feature map (NCHW/NHWC) or a token sequence into ``(B, T, C)``."""
        if feats.ndim == 4:
            if self._nhwc:
                return feats.flatten(1, 2)
            return feats.flatten(2).transpose(1, 2)
        if feats.ndim == 3:
            return feats
        raise StPredictError(
            f"backbone {self.name!r}: unsupported feature shape {tuple(feats.shape)}"
        )

    def set_trainable(self, mode: str) -> None:
        """Choose which backbone weights train: ``"all"``, ``"last"`` (last stage) or ``"none"``.

        Frozen batch-norm layers are kept in eval mode (see :meth:`train`), so a frozen backbone
        computes exactly the same features in training and at inference.
        """
        if mode not in ("all", "last", "none"):
            raise StPredictError(f"train_backbone={mode!r}: expected all, last or none")
        self._trainable_mode = mode
        params = list(self.model.named_parameters())
        for _, p in params:
            p.requires_grad = mode == "all"
        if mode == "last":
            for name in _last_stage_names(self.model):
                dict(params)[name].requires_grad = True
        self.train(self.training)

    def train(self, mode: bool = True) -> ImageEncoder:
        super().train(mode)
        tmode = getattr(self, "_trainable_mode", "all")
        if mode and tmode != "all":
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                    p.requires_grad for p in module.parameters(recurse=False)
                ):
                    module.eval()
                if tmode == "none" and isinstance(
                    module, nn.Dropout | nn.modules.dropout._DropoutNd
                ):
                    module.eval()
            if tmode == "none":
                self.model.eval()
        return self


def _last_stage_names(model: nn.Module) -> list[str]:
    """Parameter names of the last coarse parameter group (timm's layer-decay grouping)."""
    names = [n for n, _ in model.named_parameters()]
    try:
        from timm.models import group_parameters

        groups = group_parameters(model, model.group_matcher(coarse=True))
        keys = sorted(groups, key=lambda k: int(k) if str(k).isdigit() else -1)
        last = list(groups[keys[-1]])
        # a lone final norm group (e.g. conv_head|bn2, ViT norm) is too small: add the stage before
        if len(keys) > 1 and len(last) <= 4:
            last += list(groups[keys[-2]])
        if last:
            return last
    except Exception:  # models without group_matcher
        warnings.warn(
            "backbone has no group_matcher; unfreezing its last 20% of tensors", stacklevel=2
        )
    return names[-max(1, len(names) // 5) :]


def create_encoder(name: str, *, pretrained: str = "auto") -> ImageEncoder:
    """Create a timm backbone and load pretrained weights.

    Parameters
    ----------
    name
        A timm model name, e.g. ``"tf_efficientnet_lite0"`` (default backbone) or ``"resnet50"``.
    pretrained
        ``"auto"``, ``"offline"``, ``"hub"``, ``"none"`` or a path to a local ``.safetensors`` /
        state-dict file (see :func:`napari_stpredict.model.pretrained.load_pretrained`).

    Returns
    -------
    ImageEncoder
        ``.forward(x) -> (tokens (B, T, C), pooled (B, C))``; ``.pretrained_source`` names the
        weights actually loaded.
    """
    from napari_stpredict.model.pretrained import load_pretrained

    enc = ImageEncoder(name)
    enc.pretrained_source = load_pretrained(enc.model, name, pretrained)
    return enc
