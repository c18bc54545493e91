"""``--method ridge``: frozen backbone features → PCA → ridge regression (the HEST-Benchmark recipe).

The model is an ordinary :class:`~napari_stpredict.model.methods.STModel` (``retrieval =
False``) whose head is four tensors kept as buffers — ``pca_mean (D,)``, ``pca_components (K,
D)``, ``coef (G, K)``, ``intercept (G,)`` — so it is saved in the normal ``.safetensors`` model
file and used by the Predictor, the engine and the viewer like every other method. Nothing is
trained by gradient descent: :func:`fit_ridge` computes the PCA and the ridge solution in closed
form on the training spots' frozen features, with ``alpha`` chosen by an inner
cross-validation **on the training spots only** (grouped by section when there are several, so
that spatially autocorrelated neighbours of one section never sit on both sides of a split).

The JSON metadata of the model file keeps what was chosen under ``"ridge"`` (see
:meth:`RidgeFit.info`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from napari_stpredict.errors import StPredictError
from napari_stpredict.model.methods import STModel, register_method

__all__ = ["ALPHA_GRID", "RidgeFit", "RidgeModel", "fit_ridge"]

#: ``alpha`` candidates, relative to the mean PCA eigenvalue × number of training spots (so the
#: grid means the same on any backbone, panel and data size).
ALPHA_GRID: tuple[float, ...] = tuple(float(a) for a in np.logspace(-3, 2, 11))


@register_method("ridge")
class RidgeModel(STModel):
    """Frozen backbone + PCA + ridge head (closed form; see :func:`fit_ridge`).

    Parameters
    ----------
    n_components
        PCA components kept (``K``); at most the number of training spots − 1.
    """

    retrieval: ClassVar[bool] = False
    #: trained in closed form on frozen features, never by gradient descent
    closed_form: ClassVar[bool] = True

    def __init__(self, *, n_genes: int, n_components: int = 256, **hparams: Any) -> None:
        # backbone, pretrained, encoder and n_fields pass through ``hparams`` to STModel
        super().__init__(n_genes=n_genes, n_components=n_components, **hparams)
        if int(n_components) < 1:
            raise StPredictError(f"n_components={n_components}: must be ≥ 1")
        self._set_buffers(int(n_components))

    def _set_buffers(self, k: int) -> None:
        d = self.feature_dim
        self.n_components = int(k)
        self.hparams["n_components"] = int(k)
        self.register_buffer("pca_mean", torch.zeros(d))
        self.register_buffer("pca_components", torch.zeros(k, d))
        self.register_buffer("coef", torch.zeros(self.n_genes, k))
        self.register_buffer("intercept", torch.zeros(self.n_genes))

    @property
    def embed_dim(self) -> int:
        return self.n_genes

    def set_fit(self, fit: RidgeFit) -> None:
        """Install a :class:`RidgeFit` (resizes the buffers to its number of components)."""
        if fit.pca_mean.shape[0] != self.feature_dim or fit.coef.shape[0] != self.n_genes:
            raise StPredictError(
                f"ridge fit: features {fit.pca_mean.shape[0]} / genes {fit.coef.shape[0]} do not "
                f"match the model ({self.feature_dim} / {self.n_genes})"
            )
        dev = self.pca_mean.device
        self._set_buffers(int(fit.components.shape[0]))
        self.pca_mean.copy_(torch.from_numpy(fit.pca_mean).to(dev))
        self.pca_components.copy_(torch.from_numpy(fit.components).to(dev))
        self.coef.copy_(torch.from_numpy(fit.coef).to(dev))
        self.intercept.copy_(torch.from_numpy(fit.intercept).to(dev))

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """PCA scores ``(B, K)`` of pooled features ``(B, D)``."""
        return (pooled.float() - self.pca_mean) @ self.pca_components.T

    def image_from_features(self, tokens, pooled):
        return self.project(pooled) @ self.coef.T + self.intercept

    def loss_from_features(self, tokens, pooled, expr):
        # not trained by gradient: the loss is reported (validation), never minimised
        mse = torch.nn.functional.mse_loss(self.image_from_features(tokens, pooled), expr.float())
        return {"loss": mse, "mse": mse.detach()}


@dataclass
class RidgeFit:
    """A fitted PCA + ridge head (float32 numpy arrays) and how it was chosen."""

    pca_mean: np.ndarray  # (D,)
    components: np.ndarray  # (K, D)
    coef: np.ndarray  # (G, K)
    intercept: np.ndarray  # (G,)
    alpha: float  # absolute
    alpha_rel: float  # relative to the grid's scale
    explained_variance: float  # fraction of the feature variance the K components keep
    cv: dict[str, Any] = field(default_factory=dict)

    def info(self) -> dict[str, Any]:
        """JSON metadata (model file ``metadata["ridge"]``)."""
        return {
            "n_components": int(self.components.shape[0]),
            "alpha": float(self.alpha),
            "alpha_relative": float(self.alpha_rel),
            "explained_variance": float(self.explained_variance),
            "cv": self.cv,
        }

    def predict(self, features: np.ndarray) -> np.ndarray:
        """``(N, D)`` features → ``(N, G)`` predictions (same maths as :class:`RidgeModel`)."""
        z = (np.asarray(features, np.float64) - self.pca_mean) @ self.components.T
        return (z @ self.coef.T + self.intercept).astype(np.float32)


def _mean_pcc(pred: np.ndarray, true: np.ndarray, n_top: int | None = None) -> float:
    """Mean per-gene Pearson r (constant genes count 0, as in the evaluation); with ``n_top``,
    over the ``n_top`` genes most expressed in ``true`` (the evaluation's HEG set)."""
    if n_top is not None and n_top < true.shape[1]:
        keep = np.argsort(-true.sum(0), kind="stable")[:n_top]
        pred, true = pred[:, keep], true[:, keep]
    p = pred - pred.mean(0)
    t = true - true.mean(0)
    den = np.sqrt((p * p).sum(0) * (t * t).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (p * t).sum(0) / den
    r[~np.isfinite(r)] = 0.0
    return float(r.mean())


def _solve(z: np.ndarray, y: np.ndarray, alphas: np.ndarray) -> list[np.ndarray]:
    """Ridge coefficients ``(K, G)`` of centred ``z``/``y`` for each alpha (one SVD)."""
    u, s, vt = np.linalg.svd(z, full_matrices=False)
    uty = u.T @ y
    return [vt.T @ ((s / (s * s + a))[:, None] * uty) for a in alphas]


def fit_ridge(
    features: np.ndarray,
    expression: np.ndarray,
    *,
    groups: np.ndarray | None = None,
    n_components: int = 256,
    alphas: tuple[float, ...] = ALPHA_GRID,
    n_splits: int = 5,
    seed: int = 0,
    cv_top: int | None = 50,
) -> RidgeFit:
    """Fit PCA (``n_components``) + ridge on frozen features, ``alpha`` by inner CV.

    Parameters
    ----------
    features
        ``(N, D)`` pooled backbone features of the **training** spots.
    expression
        ``(N, G)`` their normalised expression (the targets).
    groups
        ``(N,)`` section of each spot. With ≥ 2 sections, the inner CV leaves one section out
        at a time (spots of one section are spatially autocorrelated, so a random split would
        favour too small an ``alpha``); otherwise ``n_splits`` random folds.
    n_components
        PCA components (clipped to ``N - 1`` and ``D``).
    alphas
        Candidates, relative to ``N × mean PCA eigenvalue``; the one with the best mean
        per-gene Pearson r over the inner folds wins, then the model is refitted on all spots.
    seed
        Seeds the random inner folds.
    cv_top
        The inner-CV score: mean Pearson r over the ``cv_top`` most expressed genes of each
        inner held-out part (the evaluation's PCC(HEG)); ``None``: over all genes. Genes that
        are mostly noise favour strong shrinkage (only the first components), which costs the
        well-measured genes; the HEG criterion does not (measured: docs/benchmarks.md).

    Returns
    -------
    RidgeFit
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(expression, dtype=np.float64)
    _check_training_data(x, y)
    n = x.shape[0]
    k = int(max(1, min(n_components, n - 1, x.shape[1])))
    mean, comps, var = _pca(x, k)
    explained = float(var[:k].sum() / var.sum()) if var.sum() > 0 else 1.0
    z = (x - mean) @ comps.T
    scale = float(n * var[:k].mean()) if var[:k].mean() > 0 else 1.0
    rel = np.asarray(alphas, dtype=np.float64)
    if rel.size == 0 or (rel <= 0).any():
        raise StPredictError("ridge: alphas must be positive")
    grid = rel * scale

    # inner cross-validation on the training spots only
    splits, scheme = _inner_splits(groups, n, n_splits, seed)
    scores = _cv_scores(z, y, grid, splits, cv_top)
    best = int(np.argmax(scores))
    ym = y.mean(0)
    coef = _solve(z, y - ym, grid[best : best + 1])[0]  # (K, G); z is already centred
    return RidgeFit(
        pca_mean=mean.astype(np.float32),
        components=comps.astype(np.float32),
        coef=coef.T.astype(np.float32),
        intercept=ym.astype(np.float32),
        alpha=float(grid[best]),
        alpha_rel=float(rel[best]),
        explained_variance=explained,
        cv={
            "scheme": scheme,
            "metric": "mean per-gene Pearson r"
            + (f" over the {cv_top} most expressed genes" if cv_top else " over all genes"),
            "alphas_relative": [float(a) for a in rel],
            "scores": [round(float(v), 5) for v in scores],
        },
    )


def _check_training_data(x: np.ndarray, y: np.ndarray) -> None:
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise StPredictError(
            f"ridge: features {x.shape} and expression {y.shape} must be (N, D) and (N, G)"
        )
    n = x.shape[0]
    if n < 3:
        raise StPredictError(f"ridge: {n} training spots, need at least 3")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise StPredictError("ridge: features or expression contain NaN/infinite values")


def _pca(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mean (D,), components (k, D), variance of every component)`` of ``x`` ``(N, D)``.

    By SVD of the centred features: deterministic, each component's sign fixed by its largest
    loading.
    """
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    comps = vt[:k]
    signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(1)])
    signs[signs == 0] = 1.0
    return mean, comps * signs[:, None], s * s / max(1, x.shape[0] - 1)


def _inner_splits(
    groups: np.ndarray | None, n: int, n_splits: int, seed: int
) -> tuple[list[tuple[np.ndarray, np.ndarray]], str]:
    """``([(train, held out)], scheme)``: one section out at a time, else random folds."""
    if groups is not None and len(np.unique(groups)) >= 2:
        g = np.asarray(groups)
        splits = [(np.nonzero(g != u)[0], np.nonzero(g == u)[0]) for u in np.unique(g)]
        return splits, "leave-one-section-out"
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    folds = np.array_split(perm, min(n_splits, n))
    splits = [(np.setdiff1d(perm, f), f) for f in folds if len(f)]
    return splits, f"{len(splits)}-fold random"


def _cv_scores(
    z: np.ndarray,
    y: np.ndarray,
    grid: np.ndarray,
    splits: list[tuple[np.ndarray, np.ndarray]],
    cv_top: int | None,
) -> np.ndarray:
    """Mean held-out score (:func:`_mean_pcc`) of each alpha of ``grid`` over ``splits``."""
    scores = np.zeros(len(grid))
    for tr, te in splits:
        if len(tr) < 2 or len(te) < 2:
            continue
        zt, yt = z[tr], y[tr]
        zm, ym = zt.mean(0), yt.mean(0)
        for j, b in enumerate(_solve(zt - zm, yt - ym, grid)):
            scores[j] += _mean_pcc((z[te] - zm) @ b + ym, y[te], cv_top) / len(splits)
    return scores


def fit_closed_form(run: Any, tracker: Any) -> dict[str, Any]:
    """The training hook of ``--method ridge``: fit on the run's frozen features, no epochs.

    ``run.features`` holds the pooled frozen features of every item (training and validation
    spots, :class:`napari_stpredict.training.features.FeatureStore`); the fit uses the training
    spots only (``run.data.train_idx``; inner CV grouped by section), the validation spots give
    the reported ``val_loss`` / ``val_pcc`` and the per-gene validation Pearson r. The result is
    recorded in ``tracker`` as one epoch; ``run.model.fit_info`` is the ``metadata["ridge"]``.
    """
    import time

    t0 = time.perf_counter()
    model, data = run.model, run.data
    pooled = run.features.pooled.float().cpu().numpy()
    tr, va = np.asarray(data.train_idx), np.asarray(data.val_idx)
    n_components = int(model.hparams.get("n_components", 256))
    fit = fit_ridge(
        pooled[tr],
        data.expr[tr],
        groups=np.asarray(data.section_index)[tr],
        n_components=n_components,
        seed=int(getattr(run.config, "seed", 0)),
    )
    model.set_fit(fit)
    pred_tr = fit.predict(pooled[tr])
    entry: dict[str, Any] = {
        "epoch": 1,
        "steps": 0,
        "global_step": 0,
        "lr": 0.0,
        "train_loss": float(((pred_tr - data.expr[tr]) ** 2).mean()),
    }
    gene_pcc = None
    if len(va):
        pred = fit.predict(pooled[va])
        true = data.expr[va]
        p, t = pred - pred.mean(0), true - true.mean(0)
        den = np.sqrt((p * p).sum(0) * (t * t).sum(0))
        with np.errstate(invalid="ignore", divide="ignore"):
            gene_pcc = (p * t).sum(0) / den
        gene_pcc = np.where(np.isfinite(gene_pcc), gene_pcc, 0.0)
        mse = float(((pred - true) ** 2).mean())
        entry.update(val_loss=mse, val_mse=mse, val_pcc=float(gene_pcc.mean()))
    entry["seconds"] = round(time.perf_counter() - t0, 3)
    entry["patches_per_s"] = None
    tracker.update(entry, model, gene_pcc)
    model.fit_info = fit.info()
    return model.fit_info
