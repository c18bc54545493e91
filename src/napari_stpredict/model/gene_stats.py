"""Per-gene statistics of a model's training expression (``metadata["gene_stats"]``).

Two layouts are read: per gene ``{gene: {"mean", "sd", "p01", "p50", "p99", "val_pcc"}}``
(written now) and the older columns ``{"mean": [...], "std": [...], "p01", "p50", "p99"}``.
Part of the model file (:mod:`napari_stpredict.model.checkpoint`, where the names are also
importable).
"""

from __future__ import annotations

from typing import Any

import numpy as np

GENE_STAT_KEYS = ("mean", "std", "p01", "p50", "p99")


def compute_gene_stats(expression: np.ndarray) -> dict[str, list[float]]:
    """Per-gene ``mean, std, p01, p50, p99`` of a ``(N, G)`` normalised expression matrix (columns)."""
    x = np.asarray(expression, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError("expression must be a non-empty (N, G) matrix")
    p01, p50, p99 = np.percentile(x, [1, 50, 99], axis=0)
    stats = {"mean": x.mean(0), "std": x.std(0), "p01": p01, "p50": p50, "p99": p99}
    return {k: [float(np.float32(v)) for v in stats[k]] for k in GENE_STAT_KEYS}


def gene_stats_per_gene(
    genes: list[str], expression: np.ndarray, val_pcc: np.ndarray | None = None
) -> dict[str, dict[str, float | None]]:
    """``metadata["gene_stats"]``: ``{gene: {"mean", "sd", "p01", "p50", "p99", "val_pcc"}}``.

    ``expression`` is the training spots' ``(N, G)`` normalised expression; ``val_pcc`` the
    validation Pearson r per gene (``None`` when there was no validation).
    """
    cols = compute_gene_stats(expression)
    if len(genes) != len(cols["mean"]):
        raise ValueError(f"{len(genes)} genes but expression has {len(cols['mean'])} columns")
    pcc = [None] * len(genes) if val_pcc is None else [float(np.float32(v)) for v in val_pcc]
    return {
        g: {
            "mean": cols["mean"][i],
            "sd": cols["std"][i],
            "p01": cols["p01"][i],
            "p50": cols["p50"][i],
            "p99": cols["p99"][i],
            "val_pcc": pcc[i],
        }
        for i, g in enumerate(genes)
    }


def per_gene_layout(stats: dict[str, Any], genes: list[str]) -> bool:
    """Whether ``stats`` is the per-gene layout ``{gene: {...}}`` (else the older columns)."""
    return bool(genes) and all(isinstance(stats.get(g), dict) for g in genes)


def gene_stats_arrays(stats: dict[str, Any], genes: list[str]) -> dict[str, np.ndarray]:
    """Columns ``mean std p01 p50 p99 val_pcc`` → float32 ``(G,)`` in ``genes`` order, from either layout.

    Reads both ``metadata["gene_stats"]`` layouts (per gene, or the older columns); a
    statistic a file does not have (``p50``, ``val_pcc``) is NaN.
    """
    genes = list(genes)
    keys = {"mean": "mean", "std": "sd", "p01": "p01", "p50": "p50", "p99": "p99"}
    out: dict[str, np.ndarray] = {}
    if per_gene_layout(stats, genes):
        for col, key in [*keys.items(), ("val_pcc", "val_pcc")]:
            vals = [stats[g].get(key) for g in genes]
            out[col] = np.array([np.nan if v is None else v for v in vals], dtype=np.float32)
        return out
    for col in [*GENE_STAT_KEYS, "val_pcc"]:
        vals = stats.get(col)
        out[col] = (
            np.full(len(genes), np.nan, np.float32)
            if vals is None
            else np.array([np.nan if v is None else v for v in vals], dtype=np.float32)
        )
    return out
