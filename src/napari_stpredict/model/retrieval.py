"""Inference by retrieval: top-k cosine neighbours in the reference bank, mean expression."""

from __future__ import annotations

import torch

from napari_stpredict.errors import StPredictError

__all__ = [
    "DEFAULT_TEMPERATURE",
    "DEFAULT_WEIGHTING",
    "WEIGHTINGS",
    "default_retrieval",
    "neighbour_weights",
    "retrieve_topk",
    "topk_mean_expression",
]


def retrieve_topk(
    queries: torch.Tensor,
    bank: torch.Tensor,
    *,
    k: int,
    chunk: int = 65536,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` bank rows by dot product (cosine for L2-normalised inputs).

    The bank is scanned in chunks of ``chunk`` rows, keeping a running top-k, so memory is
    ``B × (k + chunk)`` whatever the bank size.

    Parameters
    ----------
    queries
        ``(B, D)`` query embeddings.
    bank
        ``(N, D)`` reference embeddings on the same device.
    k
        Neighbours per query (clipped to ``N``).

    Returns
    -------
    (scores, indices)
        Both ``(B, k)``, scores in descending order.
    """
    n = bank.shape[0]
    if n == 0:
        raise StPredictError("reference bank is empty")
    k = max(1, min(int(k), n))
    q = queries.to(bank.dtype)
    best_s = best_i = None
    for start in range(0, n, chunk):
        block = bank[start : start + chunk]
        s = q @ block.T
        kk = min(k, s.shape[1])
        s, i = torch.topk(s, kk, dim=1)
        i = i + start
        if best_s is not None:
            s = torch.cat([best_s, s], dim=1)
            i = torch.cat([best_i, i], dim=1)
            s, j = torch.topk(s, min(k, s.shape[1]), dim=1)
            i = torch.gather(i, 1, j)
        best_s, best_i = s, i
    return best_s, best_i


WEIGHTINGS = ("mean", "softmax")
#: What new model files store under ``metadata["retrieval"]`` (chosen on validation sections
#: only: docs/benchmarks.md, section "evaluation"); files without the key use the plain mean.
DEFAULT_WEIGHTING = "mean"
DEFAULT_TEMPERATURE = 0.05


def default_retrieval(top_k: int) -> dict:
    """``metadata["retrieval"]`` of a newly trained retrieval model."""
    return {"top_k": int(top_k), "weighting": DEFAULT_WEIGHTING, "temperature": DEFAULT_TEMPERATURE}


def neighbour_weights(
    scores: torch.Tensor, *, weighting: str = "mean", temperature: float = 0.05
) -> torch.Tensor:
    """Weights ``(B, k)`` (rows sum to 1) of the top-``k`` neighbours from their cosine ``scores``.

    ``"mean"``: equal weights (the paper); ``"softmax"``: ``softmax(cosine / temperature)``, so
    the closest neighbours count more (``temperature → ∞`` gives the mean).
    """
    if weighting == "mean":
        return torch.full_like(scores, 1.0 / scores.shape[1], dtype=torch.float32)
    if weighting == "softmax":
        if not temperature > 0:
            raise StPredictError(f"retrieval temperature={temperature}: must be > 0")
        return torch.softmax(scores.float() / float(temperature), dim=1)
    raise StPredictError(f"retrieval weighting={weighting!r}: choose {' or '.join(WEIGHTINGS)}")


def topk_mean_expression(
    queries: torch.Tensor,
    bank_embeddings: torch.Tensor,
    bank_expression: torch.Tensor,
    *,
    k: int = 50,
    weighting: str = "mean",
    temperature: float = 0.05,
    return_spread: bool = False,
    query_chunk: int = 256,
    bank_chunk: int = 65536,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Predict expression as the (weighted) mean normalised expression of the top-``k`` bank spots.

    Parameters
    ----------
    queries
        ``(B, D)`` L2-normalised image embeddings.
    bank_embeddings
        ``(N, D)`` L2-normalised expression embeddings of the training spots.
    bank_expression
        ``(N, G)`` their normalised expression.
    k
        Number of neighbours (the paper uses 50).
    weighting, temperature
        ``"mean"`` (equal weights) or ``"softmax"`` over cosine / ``temperature``
        (:func:`neighbour_weights`).
    return_spread
        Also return the per-gene (weighted) standard deviation of the neighbours' expression:
        how much the spots that look alike disagree (the uncertainty of the prediction).

    Returns
    -------
    torch.Tensor or (mean, spread)
        ``(B, G)`` float32 on the bank's device.
    """
    out, spread = [], []
    for start in range(0, queries.shape[0], query_chunk):
        q = queries[start : start + query_chunk]
        scores, idx = retrieve_topk(q, bank_embeddings, k=k, chunk=bank_chunk)
        nb = bank_expression[idx.reshape(-1)].view(idx.shape[0], idx.shape[1], -1).float()
        if weighting == "mean":
            mean = nb.mean(1)
            w = None
        else:
            w = neighbour_weights(scores, weighting=weighting, temperature=temperature)
            mean = (w[:, :, None] * nb).sum(1)
        out.append(mean)
        if return_spread:
            d2 = (nb - mean[:, None, :]) ** 2
            var = d2.mean(1) if w is None else (w[:, :, None] * d2).sum(1)
            spread.append(var.clamp_min(0).sqrt())
    g = bank_expression.shape[1]
    if not out:
        empty = torch.zeros((0, g), dtype=torch.float32, device=bank_expression.device)
        return (empty, empty.clone()) if return_spread else empty
    if return_spread:
        return torch.cat(out), torch.cat(spread)
    return torch.cat(out)
