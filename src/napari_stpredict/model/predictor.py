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

__all__ = ["Predictor", "resolve_device"]


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

    Attributes
    ----------
    genes : list[str]
        Output columns of :meth:`predict`.
    patch_um : float | None
        Physical side of a patch (``None`` if the model was trained in pixels only).
    patch_px : int
        Side of a patch in pixels at the model's scale.
    method, backbone : str
    top_k : int
        Retrieval neighbours (``None`` for regression).
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
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        device: str | torch.device = "auto",
        batch_size: int | None = None,
    ) -> None:
        self.path = Path(model_path)
        self.device = resolve_device(device)
        mf: ModelFile = load_model_file(self.path)
        meta = mf.metadata
        self.metadata: dict[str, Any] = meta
        self.genes: list[str] = list(meta["genes"])
        self.patch_um: float | None = (
            None if meta.get("patch_um") is None else float(meta["patch_um"])
        )
        self.patch_px: int = int(meta["patch_px"])
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
        self.retrieval = bool(model.retrieval)
        self.top_k: int | None = int(meta["top_k"]) if self.retrieval else None
        self._amp = amp_dtype(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.model = model.to(self.device).eval()
        if self.retrieval:
            self._bank_emb = mf.bank_embeddings.to(self.device)
            self._bank_expr = mf.bank_expression.to(self.device)
        mean = torch.tensor(meta["image_mean"], dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(meta["image_std"], dtype=torch.float32).view(1, 3, 1, 1)
        self._mean = (mean * 255.0).to(self.device)
        self._inv_std = (1.0 / (std * 255.0)).to(self.device)

    @property
    def n_genes(self) -> int:
        """Number of genes predicted."""
        return len(self.genes)

    def __repr__(self) -> str:
        return (
            f"Predictor({str(self.path)!r}, method={self.method!r}, backbone={self.backbone!r}, "
            f"genes={len(self.genes)}, patch={self.patch_um} µm/{self.patch_px} px, device={self.device})"
        )

    def _autocast(self):
        if self._amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self._amp)

    def preprocess(self, patches: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 ``(N, P, P, 3)`` RGB → ImageNet-normalised float ``(N, 3, P, P)`` on the device.

        Identical to the training patch dataset's normalisation: ``(x / 255 - mean) / std``.
        """
        arr = patches
        if isinstance(arr, np.ndarray):
            if arr.dtype != np.uint8:
                raise StPredictError(f"patches: dtype {arr.dtype}, expected uint8 RGB")
            arr = torch.from_numpy(np.ascontiguousarray(arr))
        if (
            arr.ndim != 4
            or arr.shape[-1] != 3
            or arr.shape[1] != self.patch_px
            or arr.shape[2] != self.patch_px
        ):
            raise StPredictError(
                f"patches: shape {tuple(arr.shape)}, expected (N, {self.patch_px}, {self.patch_px}, 3)"
            )
        x = arr.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = (x - self._mean) * self._inv_std
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    @torch.inference_mode()
    def embed_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Image embeddings (retrieval) or predictions (regression) for normalised ``(B, 3, P, P)``."""
        with self._autocast():
            return self.model.encode_image(x).float()

    @torch.inference_mode()
    def _predict_batch(self, x: torch.Tensor) -> torch.Tensor:
        emb = self.embed_tensor(x)
        if not self.retrieval:
            return emb
        return topk_mean_expression(emb, self._bank_emb, self._bank_expr, k=self.top_k)

    def predict_tensor(self, x: torch.Tensor) -> np.ndarray:
        """Predict from already-normalised float images ``(N, 3, P, P)`` (any device).

        Returns
        -------
        np.ndarray
            ``(N, G)`` float32 log-normalised expression, columns = :attr:`genes`.
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise StPredictError(f"images: shape {tuple(x.shape)}, expected (N, 3, P, P)")
        out = np.empty((x.shape[0], self.n_genes), dtype=np.float32)
        for start in range(0, x.shape[0], self.batch_size):
            xb = x[start : start + self.batch_size].to(self.device, non_blocking=True).float()
            if self.device.type == "cuda":
                xb = xb.contiguous(memory_format=torch.channels_last)
            out[start : start + xb.shape[0]] = self._predict_batch(xb).cpu().numpy()
        return out

    def predict(self, patches: np.ndarray) -> np.ndarray:
        """Predict expression for uint8 RGB patches at the model's scale.

        Parameters
        ----------
        patches
            ``(N, patch_px, patch_px, 3)`` uint8.

        Returns
        -------
        np.ndarray
            ``(N, G)`` float32 log-normalised expression, columns = :attr:`genes`.
        """
        if not isinstance(patches, np.ndarray | torch.Tensor):
            raise StPredictError("patches: expected a numpy array (N, P, P, 3) uint8")
        n = patches.shape[0] if patches.ndim == 4 else -1
        self.preprocess(patches[:1] if n > 0 else patches)  # validates shape/dtype once
        out = np.empty((n, self.n_genes), dtype=np.float32)
        for start in range(0, n, self.batch_size):
            xb = self.preprocess(patches[start : start + self.batch_size])
            out[start : start + xb.shape[0]] = self._predict_batch(xb).cpu().numpy()
        return out

    def gene_index(self, genes: list[str] | str) -> list[int]:
        """Column indices of ``genes`` in :attr:`genes` (raises on unknown names)."""
        names = [genes] if isinstance(genes, str) else list(genes)
        lookup = {g: i for i, g in enumerate(self.genes)}
        unknown = [g for g in names if g not in lookup]
        if unknown:
            raise StPredictError(f"genes not in the model: {', '.join(unknown[:5])}")
        return [lookup[g] for g in names]
