"""Building blocks of the heads: projection heads, the SNN gene-token block, fusion blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FusionBlock", "ProjectionHead", "SNNTokenizer", "soft_clip_loss"]


class ProjectionHead(nn.Module):
    """BLEEP/CLIP projection: linear → GELU → linear → dropout, residual, LayerNorm."""

    def __init__(self, in_dim: int, out_dim: int = 256, *, dropout: float = 0.1) -> None:
        super().__init__()
        self.projection = nn.Linear(in_dim, out_dim)
        self.fc = nn.Linear(out_dim, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.projection(x)
        x = self.dropout(self.fc(F.gelu(projected)))
        return self.norm(x + projected)


class SNNTokenizer(nn.Module):
    """Expression vector → ``k`` gene tokens through a self-normalising block (SELU + AlphaDropout).

    SELU with LeCun-normal weights keeps activations near zero mean / unit variance without
    batch statistics, which suits the wide, sparse input of a gene panel.
    """

    def __init__(self, n_genes: int, *, n_tokens: int = 8, dim: int = 256, dropout: float = 0.25):
        super().__init__()
        self.n_tokens = n_tokens
        self.dim = dim
        hidden = min(1024, max(dim, n_tokens * dim // 2))
        self.fc1 = nn.Linear(n_genes, hidden)
        self.fc2 = nn.Linear(hidden, n_tokens * dim)
        self.drop = nn.AlphaDropout(dropout)
        for fc in (self.fc1, self.fc2):
            nn.init.normal_(fc.weight, std=fc.in_features**-0.5)
            nn.init.zeros_(fc.bias)

    def forward(self, expr: torch.Tensor) -> torch.Tensor:
        x = self.drop(F.selu(self.fc1(expr)))
        x = self.drop(F.selu(self.fc2(x)))
        return x.view(expr.shape[0], self.n_tokens, self.dim)


class _Mlp(nn.Sequential):
    def __init__(self, dim: int, ratio: float, dropout: float) -> None:
        hidden = int(dim * ratio)
        super().__init__(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )


class FusionBlock(nn.Module):
    """Pre-norm fusion block updating image tokens and gene tokens from each other.

    Image tokens attend to gene tokens and gene tokens attend to image tokens (both residual),
    then each stream goes through its own MLP.
    """

    def __init__(
        self, dim: int = 256, *, heads: int = 8, mlp_ratio: float = 4.0, dropout: float = 0.1
    ):
        super().__init__()
        self.norm_i1 = nn.LayerNorm(dim)
        self.norm_g1 = nn.LayerNorm(dim)
        self.attn_ig = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.attn_gi = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_i2 = nn.LayerNorm(dim)
        self.norm_g2 = nn.LayerNorm(dim)
        self.mlp_i = _Mlp(dim, mlp_ratio, dropout)
        self.mlp_g = _Mlp(dim, mlp_ratio, dropout)

    def forward(self, img: torch.Tensor, gene: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        qi, qg = self.norm_i1(img), self.norm_g1(gene)
        img = img + self.attn_ig(qi, qg, qg, need_weights=False)[0]
        gene = gene + self.attn_gi(qg, qi, qi, need_weights=False)[0]
        img = img + self.mlp_i(self.norm_i2(img))
        gene = gene + self.mlp_g(self.norm_g2(gene))
        return img, gene


def soft_clip_loss(
    img: torch.Tensor, expr: torch.Tensor, *, temperature: float = 1.0
) -> torch.Tensor:
    """BLEEP's CLIP loss with soft targets, symmetric cross-entropy, mean over the batch.

    ``logits = expr @ img.T / T``; targets = ``softmax((img @ img.T + expr @ expr.T) / 2 / T)``,
    so spots with similar images and similar expression are not pushed apart as negatives.
    """
    logits = expr @ img.T / temperature
    targets = F.softmax((img @ img.T + expr @ expr.T) / 2.0 / temperature, dim=-1)
    expr_loss = (-targets * F.log_softmax(logits, dim=-1)).sum(1)
    img_loss = (-targets.T * F.log_softmax(logits.T, dim=-1)).sum(1)
    return ((expr_loss + img_loss) / 2.0).mean()
