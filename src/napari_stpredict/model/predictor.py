"""Predictor: model file → expression for batches of patches, on CUDA, MPS or CPU."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_stpredict.errors import StPredictError
from napari_stpredict.model.checkpoint import ModelFile, load_model_file
from napari_stpredict.model.retrieval import topk_mean_expression

__all__ = ["Predictor", "live_view_tta", "resolve_device"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → CUDA if available, else MPS, else CPU; explicit names are checked."""
    name = str(device)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise StPredictError(f"device={name!r}: expected auto, cpu, cuda[:N] or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StPredictError(f"device={name!r}: CUDA is not available on this machine")
    if dev.type == "mps" and not (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    ):
        raise StPredictError(f"device={name!r}: MPS is not available on this machine")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise StPredictError(f"device={name!r}: expected auto, cpu, cuda[:N] or mps")
    return dev


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype used on ``device``: bf16 where supported on CUDA, else fp16; ``None`` on CPU/MPS."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


#: Images per backbone call on a CPU. Measured (EfficientNet-Lite0, 224 px, 2 threads, quiet
#: 2-core machine): 16 → 34, 32 → 32, 64 → 25, 256 → 21 images/s; a context field (2 images per
#: tile) or 8 TTA views (8 per tile) in one call would run 1.3–1.5× slower than in chunks of 32.
CPU_ENCODER_CHUNK = 32


def live_view_tta(model_tta: int, device: str | torch.device) -> int:
    """Test-time augmentation for the interactive view: the model's on a GPU, 1 on a CPU/MPS.

    Every TTA view is one more backbone pass per tile, so a model trained with ``tta = 8``
    costs 8× per tile; ``predict``, cohorts and ``evaluate`` pay it (it buys accuracy), but a
    live view on a CPU must answer while the user pans, so it shows the single-view prediction
    unless asked (the dock's "Test-time augmentation" choice, ``stpredict view --tta N``).

    Parameters
    ----------
    model_tta
        ``metadata["input"]["tta"]`` of the model file (:attr:`Predictor.tta`).
    device
        The device the view's model runs on (``"auto"`` is resolved first).

    Returns
    -------
    int
        ``model_tta`` on CUDA, else 1.
    """
    return int(model_tta) if resolve_device(device).type == "cuda" else 1


class Predictor:
    """Load a model file and predict expression for image patches.

    Parameters
    ----------
    model_path
        A ``.safetensors`` model file written by ``stpredict train``.
    device
        ``"auto"`` (CUDA > MPS > CPU), ``"cpu"``, ``"cuda"``/``"cuda:N"`` or ``"mps"``.
    batch_size
        Patches per forward pass; default 256 on CUDA, 64 on MPS, 32 on CPU.
    tta
        Override the model file's test-time augmentation (1, 2, 4 or 8 symmetries of the
        square averaged; ``None``: the file's ``metadata["input"]["tta"]``).
    top_k, weighting, temperature
        Override the retrieval settings of the file (``metadata["retrieval"]``; files without
        it: ``top_k`` from the file, plain mean).

    Attributes
    ----------
    genes : list[str]
        Output columns of :meth:`predict`.
    input_spec : InputSpec
        What the model expects: patch size, normalisation, context field, TTA.
    patch_um : float | None
        Physical side of a patch (``None`` if the model was trained in pixels only).
    patch_px : int
        Side of a patch in pixels at the model's scale.
    n_fields : int
        Fields of view per sample (2 with a context field): :meth:`predict` takes
        ``(N, F, P, P, 3)`` then.
    method, backbone : str
    top_k : int
        Retrieval neighbours (``None`` for regression and ridge).
    weighting, temperature
        Retrieval weighting of the neighbours (``"mean"`` or ``"softmax"`` over cosine / T).
    has_uncertainty : bool
        Whether ``predict(x, return_spread=True)`` gives a meaningful spread: the per-gene sd
        of the top-k neighbours (retrieval) or of the TTA views (regression, ridge; only with
        ``tta > 1``).
    metadata : dict
        The model file's JSON metadata.
    gene_stats : dict[str, np.ndarray]
        ``mean, std, p01, p50, p99`` per gene of the training expression.
    device : torch.device
    fingerprint : str
        Content hash of the model file (for cache keys).

    Examples
    --------
    >>> p = Predictor("model.safetensors")  # doctest: +SKIP
    >>> expr = p.predict(patches)            # (N, P, P, 3) uint8 → (N, G) float32
    >>> expr, sd = p.predict(patches, return_spread=True)  # doctest: +SKIP
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        device: str | torch.device = "auto",
        batch_size: int | None = None,
        tta: int | None = None,
        top_k: int | None = None,
        weighting: str | None = None,
        temperature: float | None = None,
    ) -> None:
        from napari_stpredict.model.preprocess import InputSpec
        from napari_stpredict.model.retrieval import WEIGHTINGS

        self.path = Path(model_path)
        self.device = resolve_device(device)
        mf: ModelFile = load_model_file(self.path)
        meta = mf.metadata
        self.metadata: dict[str, Any] = meta
        self.genes: list[str] = list(meta["genes"])
        spec = InputSpec.from_metadata(meta)
        if tta is not None:
            spec = spec.replace(tta=int(tta))
        self.input_spec = spec
        self.patch_um: float | None = spec.patch_um
        self.patch_px: int = int(spec.patch_px)
        self.method: str = str(meta["method"])
        self.backbone: str = str(meta["backbone"])
        self.normalization: dict = dict(meta["normalization"])
        self.training_sections: list[str] = list(meta["training_sections"])
        self.gene_stats: dict[str, np.ndarray] = mf.gene_stats
        self.fingerprint: str = str(meta.get("content_sha256", ""))
        if batch_size is None:
            batch_size = {"cuda": 256, "mps": 64}.get(self.device.type, 32)
        if int(batch_size) < 1:
            raise StPredictError(f"batch_size={batch_size}: must be ≥ 1")
        self.batch_size = int(batch_size)

        model = mf.build_model()
        self.n_fields = int(getattr(model, "n_fields", 1))
        if self.n_fields != len(spec.fields()):
            raise StPredictError(
                f"{self.path}: the model takes {self.n_fields} field(s) of view but its input "
                f"spec lists {len(spec.fields())}"
            )
        self.retrieval = bool(model.retrieval)
        rset = dict(meta.get("retrieval") or {})
        self.top_k: int | None = (
            int(top_k if top_k is not None else rset.get("top_k", meta["top_k"]))
            if self.retrieval
            else None
        )
        self.weighting: str = str(weighting or rset.get("weighting", "mean"))
        self.temperature: float = float(
            temperature if temperature is not None else rset.get("temperature", 0.05)
        )
        if self.weighting not in WEIGHTINGS:
            raise StPredictError(
                f"retrieval weighting={self.weighting!r}: choose {' or '.join(WEIGHTINGS)}"
            )
        if self.top_k is not None and self.top_k < 1:
            raise StPredictError(f"top_k={self.top_k}: must be ≥ 1")
        self._amp = amp_dtype(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.model = model.to(self.device).eval()
        if self.retrieval:
            self._bank_emb = mf.bank_embeddings.to(self.device)
            self._bank_expr = mf.bank_expression.to(self.device)

    @property
    def n_genes(self) -> int:
        """Number of genes predicted."""
        return len(self.genes)

    @property
    def tta(self) -> int:
        """Symmetries averaged per patch (1 = none)."""
        return int(self.input_spec.tta)

    @property
    def has_uncertainty(self) -> bool:
        """Whether :meth:`predict` with ``return_spread=True`` gives a real spread."""
        return self.retrieval or self.tta > 1

    def __repr__(self) -> str:
        return (
            f"Predictor({str(self.path)!r}, method={self.method!r}, backbone={self.backbone!r}, "
            f"genes={len(self.genes)}, patch={self.patch_um} µm/{self.patch_px} px, "
            f"fields={self.n_fields}, tta={self.tta}, device={self.device})"
        )

    def _autocast(self):
        if self._amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self._amp)

    def preprocess(self, patches: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 ``(N, P, P, 3)`` (or ``(N, F, P, P, 3)``) RGB → encoder input on the device.

        The one conversion shared with training (:func:`~napari_stpredict.model.preprocess.
        encoder_input`): ``(N, 3, P, P)`` or ``(N, F, 3, P, P)`` float32.
        """
        from napari_stpredict.model.preprocess import encoder_input

        arr = patches
        if isinstance(arr, np.ndarray) and arr.dtype != np.uint8:
            raise StPredictError(f"patches: dtype {arr.dtype}, expected uint8 RGB")
        p = self.patch_px
        ok = arr.ndim in (4, 5) and tuple(arr.shape[-3:]) == (p, p, 3)
        if arr.ndim == 5 and arr.shape[1] != self.n_fields:
            ok = False
        if arr.ndim == 4 and self.n_fields != 1:
            ok = False
        if not ok:
            want = (
                f"(N, {p}, {p}, 3)"
                if self.n_fields == 1
                else f"(N, {self.n_fields}, {p}, {p}, 3) (patch + context field)"
            )
            raise StPredictError(f"patches: shape {tuple(arr.shape)}, expected {want}")
        x = encoder_input(arr, self.input_spec, device=self.device)
        if self.device.type == "cuda" and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    @torch.inference_mode()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled encoder features per TTA view: ``(V, B, F·C)`` for encoder input
        ``(B, 3, P, P)`` or ``(B, F, 3, P, P)`` (V = :attr:`tta`; fields concatenated)."""
        from napari_stpredict.model.preprocess import TTA_ORDER, dihedral

        if x.ndim == 4:
            x = x[:, None]
        b = x.shape[0]
        views = [dihedral(x, k) for k in TTA_ORDER[: self.tta]]
        stacked = torch.stack(views).flatten(0, 2)  # (V·B·F, 3, P, P)
        if self.device.type == "cuda":
            stacked = stacked.contiguous(memory_format=torch.channels_last)
            parts = [stacked]
        else:  # on a CPU large backbone calls run slower per image (memory traffic)
            parts = list(stacked.split(CPU_ENCODER_CHUNK))
        with self._autocast():
            pooled = torch.cat([self.model.encoder(part)[1] for part in parts])
        return pooled.float().view(len(views), b, -1)

    @torch.inference_mode()
    def _head(self, pooled: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.model.image_from_features(pooled[:, None, :], pooled).float()

    @torch.inference_mode()
    def embed_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Image embeddings (retrieval) or predictions (regression, ridge) for encoder input
        ``(B, 3, P, P)`` / ``(B, F, 3, P, P)``; pooled features averaged over the TTA views."""
        return self._head(self.features(x).mean(0))

    @torch.inference_mode()
    def _predict_batch(
        self, x: torch.Tensor, *, return_spread: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        feats = self.features(x)  # (V, B, D)
        emb = self._head(feats.mean(0))
        if self.retrieval:
            return topk_mean_expression(
                emb,
                self._bank_emb,
                self._bank_expr,
                k=self.top_k,
                weighting=self.weighting,
                temperature=self.temperature,
                return_spread=return_spread,
            )
        if not return_spread:
            return emb
        if feats.shape[0] == 1:
            return emb, torch.zeros_like(emb)
        per_view = self._head(feats.flatten(0, 1)).view(feats.shape[0], feats.shape[1], -1)
        return emb, per_view.std(0, unbiased=False)

    def _run(self, batches, n: int, return_spread: bool):
        out = np.empty((n, self.n_genes), dtype=np.float32)
        spread = np.empty((n, self.n_genes), dtype=np.float32) if return_spread else None
        pos = 0
        for xb in batches:
            res = self._predict_batch(xb, return_spread=return_spread)
            m = xb.shape[0]
            if return_spread:
                out[pos : pos + m] = res[0].cpu().numpy()
                spread[pos : pos + m] = res[1].cpu().numpy()
            else:
                out[pos : pos + m] = res.cpu().numpy()
            pos += m
        return (out, spread) if return_spread else out

    def predict_tensor(self, x: torch.Tensor, *, return_spread: bool = False):
        """Predict from encoder input ``(N, 3, P, P)`` / ``(N, F, 3, P, P)`` (any device).

        Returns
        -------
        np.ndarray or (mean, spread)
            ``(N, G)`` float32 log-normalised expression, columns = :attr:`genes`.
        """
        if x.ndim not in (4, 5) or x.shape[-3] != 3:
            raise StPredictError(f"images: shape {tuple(x.shape)}, expected (N, 3, P, P)")

        def batches():
            for start in range(0, x.shape[0], self.batch_size):
                xb = x[start : start + self.batch_size].to(self.device, non_blocking=True).float()
                if self.device.type == "cuda" and xb.ndim == 4:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                yield xb

        return self._run(batches(), x.shape[0], return_spread)

    def predict(self, patches: np.ndarray, *, return_spread: bool = False):
        """Predict expression for uint8 RGB patches at the model's scale.

        Parameters
        ----------
        patches
            ``(N, patch_px, patch_px, 3)`` uint8, or ``(N, F, patch_px, patch_px, 3)`` when
            the model has a context field (``F = len(input_spec.fields())``, the patch first).
        return_spread
            Also return the per-gene spread (see :attr:`has_uncertainty`).

        Returns
        -------
        np.ndarray or (mean, spread)
            ``(N, G)`` float32 log-normalised expression, columns = :attr:`genes`.
        """
        if not isinstance(patches, np.ndarray | torch.Tensor):
            raise StPredictError("patches: expected a numpy array (N, P, P, 3) uint8")
        n = patches.shape[0] if patches.ndim in (4, 5) else -1
        self.preprocess(patches[:1] if n > 0 else patches)  # validates shape/dtype once

        def batches():
            for start in range(0, n, self.batch_size):
                yield self.preprocess(patches[start : start + self.batch_size])

        return self._run(batches(), n, return_spread)

    def gene_index(self, genes: list[str] | str) -> list[int]:
        """Column indices of ``genes`` in :attr:`genes` (raises on unknown names)."""
        names = [genes] if isinstance(genes, str) else list(genes)
        lookup = {g: i for i, g in enumerate(self.genes)}
        unknown = [g for g in names if g not in lookup]
        if unknown:
            raise StPredictError(f"genes not in the model: {', '.join(unknown[:5])}")
        return [lookup[g] for g in names]
