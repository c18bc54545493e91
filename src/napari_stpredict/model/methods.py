"""CMRCNet and its baselines (BLEEP, ST-Net-style regression) in one code path.

Every method is an :class:`STModel`: a timm image encoder plus heads, with

- ``loss(images, expr)`` → ``{"loss": total, ...parts}`` (training objective),
- ``encode_image(images)`` → L2-normalised image embeddings for retrieval methods, the
  predicted expression for direct regression,
- ``encode_expr(expr)`` → L2-normalised expression embeddings (retrieval methods).

The ``*_from_features`` variants take the encoder's ``(tokens, pooled)`` so training with a
frozen backbone can reuse cached features. Methods register themselves in a small registry
(like timm's) and are built with :func:`build_model`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from napari_stpredict.errors import StPredictError
from napari_stpredict.model.encoders import ImageEncoder, create_encoder
from napari_stpredict.model.heads import FusionBlock, ProjectionHead, SNNTokenizer, soft_clip_loss

__all__ = [
    "BLEEP",
    "DEFAULT_BACKBONE",
    "CMRCNet",
    "Regression",
    "STModel",
    "build_model",
    "list_methods",
    "method_hparams",
    "register_method",
]

DEFAULT_BACKBONE = "tf_efficientnet_lite0"
_REGISTRY: dict[str, type[STModel]] = {}


def register_method(name: str) -> Callable[[type[STModel]], type[STModel]]:
    """Class decorator adding an :class:`STModel` subclass to the registry under ``name``."""

    def deco(cls: type[STModel]) -> type[STModel]:
        cls.method = name
        _REGISTRY[name] = cls
        return cls

    return deco


def list_methods() -> list[str]:
    """Names accepted by :func:`build_model` (``--method``)."""
    return sorted(_REGISTRY)


class STModel(nn.Module):
    """Base class: an image encoder and method-specific heads.

    Parameters
    ----------
    n_genes
        Number of genes in the panel.
    backbone
        timm model name.
    pretrained
        Pretrained weights for the backbone (see :func:`create_encoder`); ignored when
        ``encoder`` is given.
    encoder
        A ready encoder (used when rebuilding from a model file).
    """

    method: ClassVar[str] = ""
    retrieval: ClassVar[bool] = True

    def __init__(
        self,
        *,
        n_genes: int,
        backbone: str = DEFAULT_BACKBONE,
        pretrained: str = "none",
        encoder: ImageEncoder | None = None,
        n_fields: int = 1,
        **hparams: Any,
    ) -> None:
        super().__init__()
        if n_genes < 1:
            raise StPredictError(f"n_genes={n_genes}: a model needs at least one gene")
        if int(n_fields) < 1:
            raise StPredictError(f"n_fields={n_fields}: must be ≥ 1")
        self.n_genes = int(n_genes)
        self.backbone = backbone
        self.encoder = (
            encoder if encoder is not None else create_encoder(backbone, pretrained=pretrained)
        )
        self.pretrained_source = getattr(self.encoder, "pretrained_source", "none")
        self.hparams = dict(hparams)
        #: fields of view per sample (1 = the patch; 2 = patch + a wider context field): the
        #: pooled features of the fields are concatenated before the heads
        self.n_fields = int(n_fields)
        if self.n_fields != 1:  # old files (one field) keep their exact config
            self.hparams["n_fields"] = self.n_fields

    @property
    def feature_dim(self) -> int:
        """Width of the (concatenated) pooled features the heads take."""
        return int(self.encoder.num_features) * self.n_fields

    def encode_fields(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder features of ``(B, 3, P, P)`` or ``(B, F, 3, P, P)`` images.

        Returns the tokens of the first field (the patch) and the pooled features of all
        fields concatenated, ``(B, F * C)``.
        """
        if images.ndim == 4:
            if self.n_fields != 1:
                raise StPredictError(
                    f"method {self.method!r} expects {self.n_fields} fields of view per sample "
                    "(B, F, 3, P, P); got one"
                )
            return self.encoder(images)
        if images.ndim != 5 or images.shape[1] != self.n_fields:
            raise StPredictError(
                f"images: shape {tuple(images.shape)}, expected (B, {self.n_fields}, 3, P, P)"
            )
        b, f = images.shape[:2]
        tokens, pooled = self.encoder(images.flatten(0, 1))
        tokens = tokens.view(b, f, *tokens.shape[1:])[:, 0]
        return tokens, pooled.reshape(b, -1)

    @property
    def config(self) -> dict[str, Any]:
        """Everything :func:`build_model` needs to rebuild this architecture (no weights)."""
        return {
            "method": self.method,
            "n_genes": self.n_genes,
            "backbone": self.backbone,
            **self.hparams,
        }

    @property
    def embed_dim(self) -> int:
        """Width of :meth:`encode_image` output."""
        raise NotImplementedError

    def loss(self, images: torch.Tensor, expr: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training objective on a batch of normalised images ``(B,3,P,P)`` and expression ``(B,G)``."""
        tokens, pooled = self.encode_fields(images)
        return self.loss_from_features(tokens, pooled, expr)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings (retrieval methods, L2-normalised) or predictions (regression)."""
        tokens, pooled = self.encode_fields(images)
        return self.image_from_features(tokens, pooled)

    def loss_from_features(
        self, tokens: torch.Tensor, pooled: torch.Tensor, expr: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def image_from_features(self, tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_expr(self, expr: torch.Tensor) -> torch.Tensor:
        """L2-normalised expression embeddings (retrieval methods only)."""
        raise StPredictError(f"method {self.method!r} has no expression embedding")


@register_method("bleep")
class BLEEP(STModel):
    """BLEEP: image and expression projected to a shared space, soft-target CLIP loss."""

    def __init__(
        self,
        *,
        n_genes: int,
        proj_dim: int = 256,
        temperature: float = 1.0,
        dropout: float = 0.1,
        **hparams: Any,
    ) -> None:
        # backbone, pretrained, encoder and n_fields pass through ``hparams`` to STModel
        super().__init__(
            n_genes=n_genes, proj_dim=proj_dim, temperature=temperature, dropout=dropout, **hparams
        )
        self.proj_dim = proj_dim
        self.dropout = dropout
        self.temperature = float(temperature)
        self.image_projection = ProjectionHead(self.feature_dim, proj_dim, dropout=dropout)
        self.expr_projection = ProjectionHead(n_genes, proj_dim, dropout=dropout)

    @property
    def embed_dim(self) -> int:
        return self.proj_dim

    def _contrastive(
        self, pooled: torch.Tensor, expr: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.image_projection(pooled)
        spot = self.expr_projection(expr)
        # the similarity matrices are computed in float32 even under autocast (softmax of sums)
        loss = soft_clip_loss(img.float(), spot.float(), temperature=self.temperature)
        return loss, img

    def loss_from_features(self, tokens, pooled, expr):
        con, _ = self._contrastive(pooled, expr)
        return {"loss": con, "contrastive": con.detach()}

    def image_from_features(self, tokens, pooled):
        return F.normalize(self.image_projection(pooled).float(), dim=-1)

    def encode_expr(self, expr: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.expr_projection(expr).float(), dim=-1)


@register_method("cmrc")
class CMRCNet(BLEEP):
    """CMRCNet: BLEEP's contrastive objective plus cross-modal masked reconstruction.

    In training, the image tokens (projected to ``proj_dim``) are masked element-wise with
    probability ``mask_prob``; the expression becomes ``n_gene_tokens`` gene tokens through an
    SNN block; the masked image tokens query the gene tokens (cross-attention), ``fusion_depth``
    fusion blocks mix both streams, and the token mean must reconstruct the unmasked image
    embedding (MSE). Total loss ``log(1 + L_con) + log(1 + L_rec)``. Inference uses only the
    image encoder and projection (retrieval), exactly as BLEEP.
    """

    def __init__(
        self,
        *,
        mask_prob: float = 0.5,
        n_gene_tokens: int = 8,
        fusion_depth: int = 2,
        fusion_heads: int = 8,
        **hparams: Any,
    ) -> None:
        # n_genes, proj_dim, temperature, dropout (BLEEP) and the STModel arguments pass
        # through ``hparams``
        super().__init__(
            mask_prob=mask_prob,
            n_gene_tokens=n_gene_tokens,
            fusion_depth=fusion_depth,
            fusion_heads=fusion_heads,
            **hparams,
        )
        proj_dim, dropout = self.proj_dim, self.dropout
        if not 0.0 <= mask_prob < 1.0:
            raise StPredictError(f"mask_prob={mask_prob}: must be in [0, 1)")
        self.mask_prob = float(mask_prob)
        self.token_projection = nn.Linear(self.encoder.num_features, proj_dim)
        self.gene_tokenizer = SNNTokenizer(self.n_genes, n_tokens=n_gene_tokens, dim=proj_dim)
        self.cross_norm_q = nn.LayerNorm(proj_dim)
        self.cross_norm_kv = nn.LayerNorm(proj_dim)
        self.cross_attention = nn.MultiheadAttention(proj_dim, 4, dropout=dropout, batch_first=True)
        self.fusion = nn.ModuleList(
            FusionBlock(proj_dim, heads=fusion_heads, dropout=dropout) for _ in range(fusion_depth)
        )
        self.recon_norm = nn.LayerNorm(proj_dim)
        self.recon_head = nn.Linear(proj_dim, proj_dim)

    def mask_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Zero each element of ``tokens`` with probability ``mask_prob`` (training only)."""
        if not self.training or self.mask_prob == 0.0:
            return tokens
        keep = torch.rand_like(tokens, dtype=torch.float32) >= self.mask_prob
        return tokens * keep.to(tokens.dtype)

    def reconstruct(self, tokens: torch.Tensor, expr: torch.Tensor) -> torch.Tensor:
        """Reconstruct the image embedding from (masked) image tokens and gene tokens."""
        img = self.mask_tokens(self.token_projection(tokens))
        gene = self.gene_tokenizer(expr)
        kv = self.cross_norm_kv(gene)
        img = img + self.cross_attention(self.cross_norm_q(img), kv, kv, need_weights=False)[0]
        for block in self.fusion:
            img, gene = block(img, gene)
        return self.recon_head(self.recon_norm(img.mean(dim=1)))

    def loss_from_features(self, tokens, pooled, expr):
        con, img_emb = self._contrastive(pooled, expr)
        recon = self.reconstruct(tokens, expr)
        rec = F.mse_loss(recon.float(), img_emb.float())
        total = torch.log1p(con) + torch.log1p(rec)
        return {"loss": total, "contrastive": con.detach(), "reconstruction": rec.detach()}


@register_method("regression")
class Regression(STModel):
    """ST-Net-style baseline: backbone + linear head predicting expression directly (MSE)."""

    retrieval: ClassVar[bool] = False

    def __init__(self, *, n_genes: int, **hparams: Any) -> None:
        super().__init__(n_genes=n_genes, **hparams)
        self.head = nn.Linear(self.feature_dim, n_genes)

    @property
    def embed_dim(self) -> int:
        return self.n_genes

    def loss_from_features(self, tokens, pooled, expr):
        mse = F.mse_loss(self.head(pooled).float(), expr.float())
        return {"loss": mse, "mse": mse.detach()}

    def image_from_features(self, tokens, pooled):
        return self.head(pooled).float()


def _method_class(method: str) -> type[STModel]:
    """The registered class of ``method``; an unknown name is an error naming the choices."""
    cls = _REGISTRY.get(method)
    if cls is None:
        raise StPredictError(
            f"method {method!r}: unknown (choose from {', '.join(list_methods())})"
        )
    return cls


def method_hparams(method: str) -> set[str]:
    """Hyper-parameter names ``method`` accepts (``model_kwargs`` / ``--model-kwargs``)."""
    cls = _method_class(method)
    return {
        name
        for klass in cls.__mro__
        if isinstance(klass, type) and issubclass(klass, STModel)
        for name, par in inspect.signature(klass.__init__).parameters.items()
        if par.kind == inspect.Parameter.KEYWORD_ONLY
    } - {"n_genes", "backbone", "pretrained", "encoder"}


def build_model(
    method: str,
    *,
    n_genes: int,
    backbone: str = DEFAULT_BACKBONE,
    pretrained: str = "none",
    **hparams: Any,
) -> STModel:
    """Build a model by method name (``"cmrc"``, ``"bleep"``, ``"regression"``).

    Parameters
    ----------
    method
        A name from :func:`list_methods`.
    n_genes
        Size of the gene panel.
    backbone
        timm model name of the image encoder.
    pretrained
        Backbone weights: ``auto``, ``offline``, ``hub``, ``none`` or a file path.
    **hparams
        Method hyper-parameters (``proj_dim``, ``temperature``, ``mask_prob``, ``n_gene_tokens``,
        ``fusion_depth``, ...). ``model.config`` returns them so the model can be rebuilt.

    Returns
    -------
    STModel
    """
    cls = _method_class(method)
    allowed = method_hparams(method)
    unknown = sorted(set(hparams) - allowed)
    if unknown:
        raise StPredictError(
            f"method {method!r}: unknown hyper-parameter {unknown[0]!r} (known: {', '.join(sorted(allowed)) or 'none'})"
        )
    try:
        return cls(n_genes=n_genes, backbone=backbone, pretrained=pretrained, **hparams)
    except TypeError as err:
        raise StPredictError(f"method {method!r}: bad hyper-parameters ({err})") from None


# ridge registers itself (it builds on STModel, so it is imported once this module is complete)
from napari_stpredict.model import ridge as _ridge  # noqa: E402,F401
