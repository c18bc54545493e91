"""One epoch of training and one validation pass, in plain PyTorch.

A :class:`Run` holds what every step needs (model, optimizer, data, the pixel path). Batches
come from :func:`batches_of` — cached frozen features, or uint8 patches read ahead by
:class:`~napari_stpredict.training.data.PatchSource`, augmented
(:func:`~napari_stpredict.model.preprocess.augment`) and turned into encoder input by
:func:`~napari_stpredict.model.preprocess.encoder_input`, the same function the Predictor and
the engine use.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from napari_stpredict.errors import StPredictError
from napari_stpredict.model.preprocess import InputSpec, augment, encoder_input
from napari_stpredict.progress import check_cancel, report
from napari_stpredict.training.config import TrainConfig
from napari_stpredict.training.data import PatchSource, TrainData
from napari_stpredict.training.features import FeatureStore

__all__ = ["Run", "batches_of", "build_optimizer", "lr_factor", "train_one_epoch", "validate"]


@dataclass
class Run:
    """Everything a training step needs."""

    config: TrainConfig
    data: TrainData
    spec: InputSpec
    model: Any
    optimizer: torch.optim.Optimizer
    scaler: Any
    device: torch.device
    amp_dtype: torch.dtype | None
    source: PatchSource
    gen: torch.Generator  # augmentation RNG (saved in the state file)
    train_backbone: str  # resolved: all | last | none
    stain: str  # resolved stain augmentation
    batch_size: int
    steps_per_epoch: int
    total_steps: int
    warmup: int
    features: FeatureStore | None = None

    @property
    def channels_last(self) -> bool:
        return self.device.type == "cuda"

    def amp(self):
        """Autocast context on CUDA (bf16/fp16), a no-op elsewhere."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)


def build_optimizer(model, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW: heads at ``lr``, trainable backbone weights at ``lr * backbone_lr_scale``."""
    enc_params = [p for p in model.encoder.parameters() if p.requires_grad]
    enc_ids = {id(p) for p in model.encoder.parameters()}
    head_params = [p for p in model.parameters() if id(p) not in enc_ids and p.requires_grad]
    groups = [{"params": head_params, "lr": config.lr, "base_lr": config.lr}]
    if enc_params and config.backbone_lr_scale > 0:
        blr = config.lr * config.backbone_lr_scale
        groups.append({"params": enc_params, "lr": blr, "base_lr": blr})
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


def schedule(config: TrainConfig, n_train: int) -> tuple[int, int, int, int]:
    """``(batch size, steps per epoch, total steps, warm-up steps)``."""
    bs = min(config.batch_size, n_train)
    steps_per_epoch = max(1, n_train // bs)
    if config.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.steps_per_epoch)
    total = config.epochs * steps_per_epoch
    if config.max_steps:
        total = min(total, config.max_steps)
    return bs, steps_per_epoch, total, min(config.warmup_steps, total // 10)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 1 % of the base rate."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * t))


def batches_of(
    run: Run, batches: Sequence[np.ndarray], *, train: bool, cancel=None
) -> Iterator[tuple[np.ndarray, tuple, torch.Tensor]]:
    """Yield ``(idx, inputs, expr)``: ``inputs`` is ``("features", tokens, pooled)`` or
    ``("images", x)``; the next batch of patches is read while this one trains."""
    expr_of = lambda idx: torch.from_numpy(run.data.expr[idx]).to(run.device)  # noqa: E731
    if run.features is not None:
        for idx in batches:
            check_cancel(cancel, "training")
            yield idx, ("features", *run.features.get(idx)), expr_of(idx)
        return
    cfg = run.config
    transform = None
    if train and (cfg.augment or run.stain != "none"):

        def transform(u8: np.ndarray) -> torch.Tensor:  # runs in the patch reader's thread
            return augment(
                torch.from_numpy(u8), run.gen, symmetries=cfg.augment, stain=run.stain,
                strength=cfg.stain_strength,
            )  # fmt: skip

    for idx, u8 in run.source.iterate(batches, transform=transform, cancel=cancel):
        x = encoder_input(u8, run.spec, device=run.device, channels_last=run.channels_last)
        yield idx, ("images", x), expr_of(idx)


def compute_loss(run: Run, inputs: tuple, expr: torch.Tensor) -> dict[str, torch.Tensor]:
    """The method's loss parts (``"loss"`` is the total) for one batch."""
    with run.amp():
        if inputs[0] == "features":
            return run.model.loss_from_features(inputs[1], inputs[2], expr)
        return run.model.loss(inputs[1], expr)


def _optimizer_step(run: Run, loss: torch.Tensor, global_step: int) -> None:
    factor = lr_factor(global_step, run.total_steps, run.warmup)
    for g in run.optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor
    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(run.optimizer)
    else:
        loss.backward()
    if run.config.grad_clip:
        params = [p for g in run.optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, run.config.grad_clip)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()


def epoch_batches(run: Run, epoch: int, global_step: int) -> list[np.ndarray]:
    """This epoch's shuffled training batches (seeded by ``seed`` and the epoch)."""
    n = len(run.data.train_idx)
    gen = torch.Generator().manual_seed(run.config.seed * 100003 + epoch)
    order = run.data.train_idx[torch.randperm(n, generator=gen).numpy()]
    steps = min(run.steps_per_epoch, run.total_steps - global_step)
    bs = run.batch_size
    return [order[i * bs : (i + 1) * bs] for i in range(steps)]


def train_one_epoch(
    run: Run, epoch: int, global_step: int, *, progress=None, cancel=None
) -> tuple[dict[str, Any], int]:
    """Train one epoch; returns its history entry (without validation) and the new step count."""
    t0 = time.perf_counter()
    run.model.train()
    batches = epoch_batches(run, epoch, global_step)
    sums: dict[str, float] = {}
    seen = 0
    n_epochs = run.config.epochs
    for s, (idx, inputs, expr) in enumerate(batches_of(run, batches, train=True, cancel=cancel)):
        losses = compute_loss(run, inputs, expr)
        loss = losses["loss"]
        if not torch.isfinite(loss):
            raise StPredictError(
                f"epoch {epoch + 1} step {s + 1}: loss is {float(loss)} (try a lower --lr)"
            )
        _optimizer_step(run, loss, global_step)
        global_step += 1
        seen += len(idx)
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        msg = f"epoch {epoch + 1}/{n_epochs} loss {sums['loss'] / (s + 1):.4f}"
        report(progress, s + 1, len(batches), msg)
    seconds = time.perf_counter() - t0
    entry: dict[str, Any] = {
        "epoch": epoch + 1,
        "steps": len(batches),
        "global_step": global_step,
        "lr": run.optimizer.param_groups[0]["lr"],
    }
    entry.update(
        {("train_" + k if k != "loss" else "train_loss"): v / len(batches) for k, v in sums.items()}
    )
    entry["patches_per_s"] = round(seen / seconds, 2) if seconds > 0 else None
    return entry, global_step


def _val_batches(run: Run) -> list[np.ndarray]:
    vbs = max(2, run.batch_size)
    idx = run.data.val_idx
    batches = [idx[i : i + vbs] for i in range(0, len(idx), vbs)]
    if len(batches) > 1 and len(batches[-1]) < 2:  # contrastive losses need 2 spots
        batches[-2] = np.concatenate([batches[-2], batches[-1]])
        batches.pop()
    return batches


@torch.no_grad()
def validate(run: Run, *, cancel=None) -> tuple[dict[str, Any], np.ndarray | None]:
    """Validation losses (eval mode), mean per-gene Pearson r and MSE; plus r per gene.

    The Pearson r is :func:`napari_stpredict.evaluation.metrics.pearson_per_gene` — the
    evaluation's — so a gene constant in the validation spots scores 0 in both.
    """
    from napari_stpredict.evaluation.metrics import pearson_per_gene

    data = run.data
    if len(data.val_idx) == 0:
        return {}, None
    model = run.model
    model.eval()
    sums: dict[str, float] = {}
    embeddings = []
    batches = _val_batches(run)
    for _, inputs, expr in batches_of(run, batches, train=False, cancel=cancel):
        for k, v in compute_loss(run, inputs, expr).items():
            sums[k] = sums.get(k, 0.0) + float(v)
        with run.amp():
            if inputs[0] == "features":
                emb = model.image_from_features(inputs[1], inputs[2])
            else:
                emb = model.encode_image(inputs[1])
        embeddings.append(emb.float().cpu())
    out = {("val_" + k if k != "loss" else "val_loss"): v / len(batches) for k, v in sums.items()}
    pred = _predict_from_embeddings(run, torch.cat(embeddings))
    true = data.expr[data.val_idx]
    gene_pcc = pearson_per_gene(true, pred)
    out["val_pcc"] = float(np.mean(gene_pcc))
    out["val_mse"] = float(((pred - true) ** 2).mean())
    model.train()
    return out, gene_pcc


def _predict_from_embeddings(run: Run, emb: torch.Tensor) -> np.ndarray:
    if not run.model.retrieval:
        return emb.numpy()
    from napari_stpredict.model.retrieval import topk_mean_expression
    from napari_stpredict.training.bank import encode_expr_chunked

    bank_expr = torch.from_numpy(run.data.expr[run.data.train_idx])
    bank_emb = encode_expr_chunked(run.model, bank_expr)
    return topk_mean_expression(emb, bank_emb, bank_expr, k=run.config.top_k).numpy()
