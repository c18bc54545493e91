"""``--train-backbone auto`` and the time estimate printed before the first epoch.

On CUDA the whole backbone trains (``all``). On a CPU (or MPS) a couple of real training steps
with only the backbone's last stage trainable are timed; if the whole run would then take at
most :data:`AUTO_BUDGET_S`, ``last`` is chosen (on HER2ST it gained ~10 % PCC over a frozen
backbone for minutes of CPU time), else ``none`` (frozen backbone: features computed once per
spot, then every epoch costs only the heads). Timing steps never changes the run: weights,
BatchNorm statistics and RNG states are restored afterwards.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import numpy as np
import torch

from napari_stpredict.model.preprocess import encoder_input

__all__ = ["AUTO_BUDGET_S", "choose_train_backbone", "estimate_epoch_seconds", "time_steps"]

#: Longest whole run (seconds) for which ``auto`` fine-tunes the last stage on a CPU.
AUTO_BUDGET_S = 30 * 60


def _fmt(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def time_steps(model, batch_fn, *, n: int = 2, backward: bool = True) -> float:
    """Median seconds of ``n`` forward(+backward) passes after one warm-up; the model, its
    gradients and every RNG state are left exactly as they were."""
    snapshot = copy.deepcopy(model.state_dict())
    was_training = model.training
    times = []
    with torch.random.fork_rng(devices=[]):
        if backward:
            model.train()
        for i in range(n + 1):
            t0 = time.perf_counter()
            loss = batch_fn()
            if backward:
                loss.backward()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
    model.load_state_dict(snapshot)
    model.train(was_training)
    return statistics.median(times)


def choose_train_backbone(
    *,
    model,
    device: torch.device,
    u8: np.ndarray,
    expr: np.ndarray,
    spec,
    total_steps: int,
    n_items: int,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Resolve ``train_backbone="auto"``: ``{"train_backbone", "reason", ...}``.

    ``u8``/``expr`` are real training spots (at most a batch; the measured time is scaled
    linearly to ``batch_size``); ``total_steps`` the run's optimizer steps and ``n_items`` the
    spots whose frozen features ``none`` would extract.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return {"train_backbone": "all", "reason": f"CUDA ({name}): the whole backbone trains"}
    x = encoder_input(u8, spec, device=device)
    e = torch.from_numpy(expr).to(device)
    model.encoder.set_trainable("last")
    scale = (batch_size or len(u8)) / len(u8)
    step_s = time_steps(model, lambda: model.loss(x, e)["loss"], n=2) * scale
    model.encoder.set_trainable("none")
    with torch.no_grad():
        fwd_s = time_steps(model, lambda: model.encode_fields(x)[1], n=1, backward=False)
    last_total = step_s * total_steps
    frozen_total = fwd_s * n_items / max(1, len(u8))
    where = device.type.upper()
    plan: dict[str, Any] = {
        "measured_step_s_last": round(step_s, 4),
        "measured_forward_s": round(fwd_s, 4),
        "estimated_run_s_last": round(last_total, 1),
        "estimated_features_s_none": round(frozen_total, 1),
    }
    if last_total <= AUTO_BUDGET_S:
        plan["train_backbone"] = "last"
        plan["reason"] = (
            f"{where}: training the backbone's last stage measured {step_s:.2f} s/step → "
            f"~{_fmt(last_total)} for {total_steps} steps (≤ {_fmt(AUTO_BUDGET_S)} budget)"
        )
    else:
        plan["train_backbone"] = "none"
        plan["reason"] = (
            f"{where}: the last stage would take ~{_fmt(last_total)} ({step_s:.2f} s/step × "
            f"{total_steps} steps > {_fmt(AUTO_BUDGET_S)} budget); a frozen backbone costs one "
            f"feature pass (~{_fmt(frozen_total)}), then only the heads train"
        )
    return plan


def estimate_epoch_seconds(step_s: float, steps: int, val_batches: int) -> float:
    """An epoch: ``steps`` training steps plus validation batches (forward only, ~⅓ of a step)."""
    return step_s * steps + step_s / 3 * val_batches
