"""The reference bank and the model file's metadata, built once training has picked its best epoch.

The bank holds the *training* spots only: their expression embeddings (retrieval methods),
normalised expression and section. :func:`build_metadata` is the one place that assembles the
model file's JSON metadata; :func:`extra_metadata` is where other modules add their keys.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from napari_stpredict.model.preprocess import InputSpec
from napari_stpredict.training.config import TrainConfig
from napari_stpredict.training.data import TrainData

__all__ = ["build_metadata", "encode_expr_chunked", "extra_metadata"]

_CHUNK = 4096


@torch.no_grad()
def encode_expr_chunked(model, expr: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Expression embeddings ``(N, D)`` float32 on the CPU, in chunks on the model's device."""
    dev = next(model.parameters()).device
    x = torch.as_tensor(expr)
    parts = [
        model.encode_expr(x[i : i + _CHUNK].to(dev)).float().cpu() for i in range(0, len(x), _CHUNK)
    ]
    return torch.cat(parts) if parts else torch.empty(0)


def extra_metadata(data: TrainData, config: TrainConfig) -> dict[str, Any]:
    """Keys other parts of the package add to a trained model's metadata.

    The hook for gene sets ("markers": ``{"set", "in_panel", "missing"}``, "tumor_signature")
    and any later addition: return a JSON-able dict; it is merged into the metadata last
    (it cannot replace the keys :func:`build_metadata` sets).
    """
    from napari_stpredict.st.panel import describe_panel

    panel = data.panel or describe_panel(data.genes, config.markers, add_genes=config.add_genes)
    return panel.metadata()


def build_metadata(
    *,
    data: TrainData,
    config: TrainConfig,
    spec: InputSpec,
    model,
    history: list[dict[str, Any]],
    best_epoch: int,
    best_val: float,
    global_step: int,
    gene_pcc: np.ndarray | None,
    plan: dict[str, Any],
) -> dict[str, Any]:
    """The model file's metadata (``method``, ``backbone``, ``model_config`` are added on save)."""
    from napari_stpredict.model.checkpoint import gene_stats_per_gene

    best = history[best_epoch - 1] if history and best_epoch else {}
    meta: dict[str, Any] = {
        "genes": data.genes,
        "normalization": dict(config.normalization),
        "patch_um": data.patch_um,
        "patch_px": data.patch_px,
        # sections without a pixel size: patches are this many image pixels, unresampled
        "patch_px_level0": float(data.patch_px) if data.patch_um is None else None,
        "input": spec.to_dict(),
        "top_k": config.top_k,
        "training_sections": data.train_sections,
        "validation_sections": data.val_sections,
        "bank_sections": data.all_sections,
        "gene_stats": gene_stats_per_gene(data.genes, data.expr[data.train_idx], gene_pcc),
        "pretrained": str(config.pretrained)
        if model.pretrained_source == "none" and config.pretrained == "none"
        else model.pretrained_source,
        "metrics": {
            "best_epoch": best_epoch,
            "best_val_loss": best_val if math.isfinite(best_val) else None,
            "epochs_run": len(history),
            "steps": global_step,
            "n_train_spots": len(data.train_idx),
            "n_val_spots": len(data.val_idx),
            **{k: v for k, v in best.items() if k.startswith(("val_", "train_"))},
        },
        "training_plan": dict(plan),
        "history": history,
        "config": config.to_dict(),
    }
    for k, v in extra_metadata(data, config).items():
        meta.setdefault(k, v)
    return meta
