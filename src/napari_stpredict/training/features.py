"""Frozen-backbone features (``train_backbone="none"``): computed once per spot, optionally on disk.

An epoch then costs only the heads. The on-disk cache (``feature_cache_dir``) is keyed by
backbone, weights, the :class:`~napari_stpredict.model.preprocess.InputSpec` and the section's
image + spots, so several methods / folds on the same data extract the features once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from napari_stpredict.model.preprocess import TTA_ORDER, InputSpec, dihedral, encoder_input
from napari_stpredict.progress import report
from napari_stpredict.training.config import TrainConfig
from napari_stpredict.training.data import PatchSource, TrainData

__all__ = ["FeatureStore"]


class FeatureStore:
    """Pooled features (and tokens, for CMRCNet) of every dataset item, by item index."""

    def __init__(
        self,
        model,
        source: PatchSource,
        data: TrainData,
        config: TrainConfig,
        spec: InputSpec,
        device: torch.device,
        *,
        need_tokens: bool,
    ) -> None:
        self.model, self.source, self.data, self.device = model, source, data, device
        self.config, self.spec, self.need_tokens = config, spec, need_tokens
        self.pooled: torch.Tensor | None = None
        self.tokens: torch.Tensor | None = None

    def _cache_file(self, section_i: int) -> Path | None:
        if not self.config.feature_cache_dir:
            return None
        key = json.dumps(
            [
                self.config.backbone,
                str(getattr(self.model, "pretrained_source", "")),
                # the whole spec, tta included: with tta > 1 the cached features are the
                # average over the views, so a 1-view and an 8-view run must not share them
                self.spec.to_dict(),
                self.data.spot_keys[section_i],
            ]
        )
        h = hashlib.sha1(key.encode()).hexdigest()[:20]
        return Path(self.config.feature_cache_dir) / f"features-{h}.safetensors"

    def _load(self, f: Path | None, n: int) -> dict[str, torch.Tensor] | None:
        from safetensors.torch import load_file

        if f is None or not f.is_file():
            return None
        with contextlib.suppress(Exception):
            t = load_file(str(f))
            if t["pooled"].shape[0] == n and (not self.need_tokens or "tokens" in t):
                return t
        return None

    @torch.no_grad()
    def _extract(self, idx: np.ndarray, *, amp, cancel, progress, done: int) -> dict:
        bs = max(self.config.batch_size, 32)
        batches = [idx[i : i + bs] for i in range(0, len(idx), bs)]
        pooled, tokens = [], []
        n = self.data.expr.shape[0]
        for _, u8 in self.source.iterate(batches, cancel=cancel):
            x = encoder_input(
                u8, self.spec, device=self.device, channels_last=self.device.type == "cuda"
            )
            with amp():
                tok, pool = self.model.encode_fields(x)  # tokens of the patch, pooled of all fields
                # tta > 1 (B): the pooled features averaged over the same symmetries the
                # Predictor averages at inference, so heads train on what they will see
                for k in TTA_ORDER[1 : self.spec.tta]:
                    pool = pool + self.model.encode_fields(dihedral(x, k))[1]
            pool = pool / self.spec.tta
            pooled.append(pool.float().cpu())
            if self.need_tokens:
                tokens.append(tok.to(torch.float16).cpu())
            done += len(u8)
            report(progress, done, n, "extracting frozen backbone features")
        t = {"pooled": torch.cat(pooled)}
        if self.need_tokens:
            t["tokens"] = torch.cat(tokens)
        return t

    def build(self, *, progress, cancel, amp) -> None:
        """Compute (or load) the features of every item, section by section."""
        from safetensors.torch import save_file

        from napari_stpredict.io_utils import atomic_path

        self.model.encoder.eval()
        pooled_parts, token_parts = [], []
        done = 0
        for s in range(len(self.data.all_sections)):
            idx = np.nonzero(self.data.section_index == s)[0]
            f = self._cache_file(s)
            t = self._load(f, len(idx))
            if t is None:
                t = self._extract(idx, amp=amp, cancel=cancel, progress=progress, done=done)
                if f is not None:
                    f.parent.mkdir(parents=True, exist_ok=True)
                    with atomic_path(f) as tmp:
                        save_file(t, str(tmp))
            done += len(idx)
            pooled_parts.append(t["pooled"])
            if self.need_tokens:
                token_parts.append(t["tokens"])
        self.pooled = torch.cat(pooled_parts)
        self.tokens = torch.cat(token_parts) if self.need_tokens else None
        if self.pooled.shape[0] != self.data.expr.shape[0]:
            raise RuntimeError("frozen features do not cover every spot")

    def get(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens, pooled)`` of items ``idx`` on the device (tokens = pooled without CMRCNet)."""
        ii = torch.from_numpy(np.asarray(idx))
        pooled = self.pooled[ii].to(self.device)
        if self.tokens is not None:
            tokens = self.tokens[ii].to(self.device).float()
        else:
            tokens = pooled[:, None, :]
        return tokens, pooled
