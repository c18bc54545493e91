"""Signature scores: weighted mean z-score of log-normalised expression."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_stpredict.model.header import model_info, read_model_header
from napari_stpredict.st.genesets import model_signature
from napari_stpredict.tumor.mask import score_range
from napari_stpredict.tumor.signature import Signature, TumorError, _signature

_STD_FLOOR = 1e-3  # log-normalised units: a gene that never varies must not blow up the z-score


@dataclass
class TumorScore:
    """A tumour score on the prediction grid.

    Attributes
    ----------
    score
        (gh, gw) float32 weighted mean z-score; NaN where a cell is not predicted.
    genes, weights
        The genes actually used and their weights.
    missing
        Genes of the (default) set that the model does not predict and were dropped.
    reference
        Where the z-score mean/std came from: ``"model"`` (training data), ``"given"`` or
        ``"slide"`` (the predicted cells themselves; not comparable across slides).
    """

    score: np.ndarray
    genes: tuple[str, ...]
    weights: tuple[float, ...]
    missing: tuple[str, ...] = ()
    reference: str = "model"

    @property
    def predicted(self) -> np.ndarray:
        """(gh, gw) bool: cells with a score."""
        return np.isfinite(self.score)

    def range(self) -> tuple[float, float]:
        """(min, max) over scored cells; see :func:`score_range`."""
        return score_range(self.score)

    def signature(self) -> Signature:
        """The signature actually used."""
        return Signature(self.genes, self.weights)


def gene_stats_from_matrix(x: np.ndarray) -> dict[str, np.ndarray]:
    """Per-gene ``mean`` and ``std`` (ddof 0) of a (n, G) matrix, ignoring NaN rows."""
    x = np.asarray(x, dtype=np.float64)
    return {"mean": np.nanmean(x, axis=0), "std": np.nanstd(x, axis=0)}


def _stats_for(
    stats: Mapping[str, Any], index: np.ndarray, n_genes: int
) -> tuple[np.ndarray, np.ndarray]:
    try:
        mean = np.asarray(stats["mean"], dtype=np.float64)
        std = np.asarray(stats["std"], dtype=np.float64)
    except KeyError as err:
        raise TumorError(
            f"gene statistics: missing {err.args[0]!r} (need 'mean' and 'std')"
        ) from None
    if mean.shape != (n_genes,) or std.shape != (n_genes,):
        raise TumorError(
            f"gene statistics: shape {mean.shape}/{std.shape}, expected ({n_genes},) per gene"
        )
    return mean[index], np.maximum(std[index], _STD_FLOOR)


def _weighted_z(
    sub: np.ndarray, res: Any, gene_stats: Mapping[str, Any] | None, n_genes: int
) -> np.ndarray:
    """Weighted mean z-score of the signature columns ``sub`` (rows × used genes).

    The z-scores use ``gene_stats`` (aligned with all ``n_genes``) or, without them, the rows'
    own statistics.
    """
    if gene_stats is None:
        own = gene_stats_from_matrix(sub)
        mean, std = own["mean"], np.maximum(own["std"], _STD_FLOOR)
    else:
        mean, std = _stats_for(gene_stats, res.index, n_genes)
    z = (sub - mean) / std
    return z @ res.weights / np.abs(res.weights).sum()


def score_matrix(
    expression: np.ndarray,
    genes: Sequence[str],
    *,
    gene_set: Signature | Iterable[str] | Mapping[str, float] | str | None = None,
    weights: Sequence[float] | None = None,
    gene_stats: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """Tumour score of each row of a (n, G) log-normalised expression matrix.

    Parameters
    ----------
    expression
        (n, G) log-normalised expression (predicted or measured, same normalisation as the
        model's), columns named by ``genes``.
    gene_set, weights
        See :meth:`Signature.create`; ``None`` = :data:`DEFAULT_TUMOR_GENES` (missing genes
        dropped); a user-given set must be fully present.
    gene_stats
        ``{"mean": (G,), "std": (G,)}`` aligned with ``genes`` (e.g. ``Predictor.gene_stats``);
        ``None`` = the rows' own statistics.

    Returns
    -------
    numpy.ndarray
        (n,) float64 score; NaN for rows with NaN in a used gene.
    """
    x = np.asarray(expression)
    if x.ndim != 2 or x.shape[1] != len(genes):
        raise TumorError(f"expression: shape {x.shape} does not match {len(genes)} genes")
    sig, strict = _signature(gene_set, weights)
    res = sig.resolve(list(genes), strict=strict)
    sub = x[:, res.index].astype(np.float64)
    return _weighted_z(sub, res, gene_stats, len(genes))


def score_predictions(
    values: Any,
    genes: Sequence[str],
    *,
    gene_set: Signature | Iterable[str] | Mapping[str, float] | str | None = None,
    weights: Sequence[float] | None = None,
    gene_stats: Mapping[str, Any] | None = None,
    reference: str = "model",
    strict: bool | None = None,
) -> TumorScore:
    """Tumour score per grid cell from a (G, gh, gw) array of predictions.

    ``values`` may be a zarr array: only the planes of the used genes are read, one at a time.
    NaN (not predicted) stays NaN. ``gene_stats`` as in :func:`score_matrix`; ``None`` uses the
    predicted cells themselves (``reference="slide"``), which is not comparable across slides;
    ``reference`` names the source of given statistics (``"model"`` or ``"given"``);
    ``strict=False`` treats a given set as a default one (missing genes dropped, at least
    three needed; ``None``: strict for a given set).
    """
    shape = tuple(values.shape)
    if len(shape) != 3 or shape[0] != len(genes):
        raise TumorError(f"predictions: shape {shape} does not match {len(genes)} genes × grid")
    sig, default_strict = _signature(gene_set, weights)
    strict = default_strict if strict is None else strict
    res = sig.resolve(list(genes), strict=strict)
    planes = [np.asarray(values[int(i)], dtype=np.float64) for i in res.index]
    if gene_stats is None:
        flat = np.stack([p.ravel() for p in planes], axis=1)
        own = (
            gene_stats_from_matrix(flat)
            if np.isfinite(flat).any()
            else {"mean": np.zeros(len(planes)), "std": np.ones(len(planes))}
        )
        mean, std = own["mean"], np.maximum(np.nan_to_num(own["std"], nan=1.0), _STD_FLOOR)
        reference = "slide"
    else:
        mean, std = _stats_for(gene_stats, res.index, len(genes))
    total = np.zeros(shape[1:], dtype=np.float64)
    for p, m, s, w in zip(planes, mean, std, res.weights, strict=True):
        total += w * (p - m) / s
    score = (total / np.abs(res.weights).sum()).astype(np.float32)
    return TumorScore(
        score, res.genes, tuple(float(v) for v in res.weights), res.missing, reference
    )


def score_store(
    store: Any,
    *,
    gene_set: Signature | Iterable[str] | Mapping[str, float] | str | None = None,
    weights: Sequence[float] | None = None,
    gene_stats: Mapping[str, Any] | None = None,
    model: Any = None,
) -> TumorScore:
    """Tumour score per grid cell of a :class:`~napari_stpredict.inference.PredictionStore`.

    Parameters
    ----------
    store
        A prediction store (``.values`` genes × gh × gw, ``.genes``) or a path to one.
    gene_stats
        Reference statistics aligned with the store's genes. Default: the model's training
        statistics, from ``model`` (a :class:`~napari_stpredict.model.Predictor`, a model file
        path) or the store's own model record.
    """
    if isinstance(store, str | os.PathLike):
        from napari_stpredict.inference.store import PredictionStore

        store = PredictionStore.from_path(store)
    if not (hasattr(store, "values") and hasattr(store, "genes")):
        raise TumorError(f"{type(store).__name__}: not a prediction store")
    genes = list(store.genes)
    reference = "given"
    if model is None and (gene_stats is None or gene_set is None):
        rec = (getattr(store, "info", None) or {}).get("model")
        model = (rec.get("path") if isinstance(rec, Mapping) else rec) or None
    if gene_set is None and model is not None:
        # the model's own default signature (recorded at training), missing genes dropped
        info = model_info(model, best_effort=gene_stats is not None)
        gene_set = Signature.create(model_signature(info.metadata))
        strict = False
    else:
        strict = None
    if gene_stats is None:
        gene_stats = model_gene_stats(model, genes)
        reference = "model"
    return score_predictions(
        store.values,
        genes,
        gene_set=gene_set,
        weights=weights,
        gene_stats=gene_stats,
        reference=reference,
        strict=strict,
    )


#: Kept name: the header reader lives in :mod:`napari_stpredict.model.header`.
read_model_metadata = read_model_header


def model_gene_stats(model: Any, genes: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """The training-data ``mean``/``std`` per gene of a model, aligned with ``genes``.

    ``model`` is anything :func:`~napari_stpredict.model.header.model_info` accepts: a
    Predictor, its metadata (or a ``{"mean", "std"[, "genes"]}`` mapping), or a model file path.

    Raises
    ------
    TumorError
        No model, no statistics found, or they do not cover ``genes``.
    ModelFileError
        Unreadable model file.
    """
    if model is None:
        raise TumorError(
            "tumour score: no model to take the training statistics from (give model= or gene_stats=)"
        )
    info = model_info(model)
    stats = info.gene_stats()
    model_genes = info.genes or None
    if not stats:
        raise TumorError(f"{info}: the model file has no training gene statistics (gene_stats)")
    mean, std = stats["mean"], stats["std"]
    if genes is None or model_genes is None or list(model_genes) == list(genes):
        return {"mean": mean, "std": std}
    pos = {g: i for i, g in enumerate(model_genes)}
    miss = [g for g in genes if g not in pos]
    if miss:
        raise TumorError(f"{info}: no training statistics for {', '.join(miss[:5])}")
    idx = np.array([pos[g] for g in genes])
    return {"mean": mean[idx], "std": std[idx]}


def score_adata(
    adata: Any,
    *,
    gene_set: Signature | Iterable[str] | Mapping[str, float] | str | None = None,
    weights: Sequence[float] | None = None,
    gene_stats: Mapping[str, Any] | None = None,
    normalization: str | Mapping[str, Any] | None = "log1p_cpm",
    layer: str | None = None,
) -> np.ndarray:
    """Tumour score per spot of measured (or predicted) expression in an AnnData.

    Parameters
    ----------
    adata
        Spots × genes; ``var_names`` are gene symbols.
    normalization
        Applied to ``X`` (raw counts) first (a method name or the model's normalisation
        record, see :class:`napari_stpredict.st.normalization.Normalization`); ``None`` if ``X`` (or
        ``layer``) is already log-normalised.
    gene_stats
        ``{"mean", "std"}`` aligned with ``adata.var_names``; ``None`` = the data's own.
    """
    genes = [str(g) for g in adata.var_names]
    sig, strict = _signature(gene_set, weights)
    res = sig.resolve(genes, strict=strict)
    # normalisation needs the library size of all genes, but only the used columns are densified
    x = adata.layers[layer] if layer else adata.X
    if normalization is not None:
        sub = _normalized_columns(x, res.index, normalization)
    else:
        sub = _dense(x[:, res.index]).astype(np.float64)
    return _weighted_z(sub, res, gene_stats, len(genes))


def _dense(x: Any) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x)


def _normalized_columns(x: Any, index: np.ndarray, normalization: Any) -> np.ndarray:
    """Normalised values of some columns, with the library size taken over all genes."""
    from napari_stpredict.st.normalization import Normalization, library_size

    norm = Normalization.from_dict(normalization)
    return np.asarray(norm(x[:, index], library_size=library_size(x)), dtype=np.float64)
