"""The resumable training state: one safetensors file next to the output, rewritten every epoch.

Tensors: ``model.*`` (current weights), ``best.*`` (the best epoch's weights), ``optim.<pid>.*``
(AdamW moments), ``rng.torch`` / ``rng.augment`` / ``rng.cuda.<i>``. Header: ``format``,
``format_version`` and ``state`` (JSON: epoch, global_step, history, best epoch/score, genes,
the config fingerprint, what ``auto`` options became, optimizer scalars and param groups, AMP
scaler). No pickle. The file is written to a temporary name and renamed over the previous one
(:func:`napari_stpredict.io_utils.atomic_path`), so a kill at any moment leaves either the
previous epoch's state or the new one, complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from napari_stpredict.errors import StPredictError, first_line
from napari_stpredict.model.header import bad_key
from napari_stpredict.training.config import RESUME_MUTABLE, TrainConfig

__all__ = [
    "STATE_FORMAT",
    "STATE_VERSION",
    "EpochTracker",
    "check_resumable",
    "config_fingerprint",
    "load_state",
    "restore_state",
    "save_state",
    "state_path_for",
]

STATE_FORMAT = "napari-stpredict-train-state"
STATE_VERSION = 1
# what a state header must hold, and the type of each value
_INFO_KEYS = {
    "epoch": int,
    "global_step": int,
    "history": list,
    "best_epoch": int,
    "best_val": (int, float),
    "genes": list,
    "config_fingerprint": dict,
    "optimizer": dict,
}


def state_path_for(out: str | os.PathLike) -> Path:
    """The resumable state file kept next to ``out`` while training runs."""
    p = Path(out)
    stem = p.name[: -len(".safetensors")] if p.name.endswith(".safetensors") else p.name
    return p.with_name(f"{stem}.train-state.safetensors")


def config_fingerprint(config: TrainConfig) -> dict[str, Any]:
    """The options a resumed run must share with the interrupted one."""
    return {k: v for k, v in config.to_dict().items() if k not in RESUME_MUTABLE}


def save_state(
    path: Path, *, model, best_state, optimizer, scaler, gen, info: dict[str, Any]
) -> None:
    """Write the state atomically (the previous file stays until the new one is complete)."""
    from safetensors.torch import save_file

    from napari_stpredict.io_utils import atomic_path

    tensors: dict[str, torch.Tensor] = {}
    # CPU tensors are written as they are (no copies): save_file only reads them
    for k, v in model.state_dict().items():
        tensors[f"model.{k}"] = v.detach().cpu().contiguous()
    for k, v in (best_state or {}).items():
        tensors[f"best.{k}"] = v.detach().cpu().contiguous()
    osd = optimizer.state_dict()
    opt_scalars: dict[str, dict[str, Any]] = {}
    for pid, st in osd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = val.detach().cpu().contiguous()
            else:
                opt_scalars.setdefault(str(pid), {})[key] = val
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.augment"] = gen.get_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    meta = dict(info)
    meta["optimizer"] = {"param_groups": osd["param_groups"], "scalars": opt_scalars}
    meta["scaler"] = scaler.state_dict() if scaler is not None else None
    header = {
        "format": STATE_FORMAT,
        "format_version": str(STATE_VERSION),
        "state": json.dumps(meta),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and check a state file; anything wrong → one :class:`StPredictError` line."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            if header.get("format") != STATE_FORMAT:
                raise StPredictError(f"{path}: not a napari-stpredict training state file")
            if header.get("format_version") != str(STATE_VERSION):
                raise StPredictError(
                    f"{path}: training state version {header.get('format_version')} not supported"
                )
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (no iterator)
        info = json.loads(header.get("state", ""))
    except StPredictError:
        raise
    except Exception as err:
        raise StPredictError(
            f"{path}: corrupt training state ({first_line(err)}); delete it to start over"
        ) from None
    _check_info(path, info, tensors)
    return tensors, info


def _check_info(path: Path, info: Any, tensors: dict[str, torch.Tensor]) -> None:
    def bad(what: str) -> StPredictError:
        return StPredictError(f"{path}: corrupt training state ({what}); delete it to start over")

    if not isinstance(info, dict):
        raise bad("the state header is not a JSON object")
    wrong = bad_key(info, _INFO_KEYS)
    if wrong is not None:
        key, present = wrong
        raise bad(f"{key!r} has the wrong type" if present else f"no {key!r}")
    opt = info["optimizer"]
    if not isinstance(opt.get("param_groups"), list) or not isinstance(opt.get("scalars"), dict):
        raise bad("no optimizer state")
    for name in ("rng.torch", "rng.augment"):
        if name not in tensors:
            raise bad(f"no tensor {name!r}")
    if not any(k.startswith("model.") for k in tensors):
        raise bad("no model weights")


def check_resumable(path: Path, info: dict[str, Any], config: TrainConfig) -> None:
    """Refuse a resume whose options differ from the interrupted run's (before any work)."""
    old = info["config_fingerprint"]
    new = config_fingerprint(config)
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        raise StPredictError(
            f"{path}: was made with a different {diff[0]} "
            f"({old.get(diff[0])!r} vs {new.get(diff[0])!r}); use the same options or start over"
        )


def restore_state(
    path: Path,
    tensors: dict[str, torch.Tensor],
    info: dict[str, Any],
    *,
    model,
    optimizer,
    scaler,
    gen,
) -> dict[str, torch.Tensor] | None:
    """Load weights, optimizer, scaler and RNG states; returns the best epoch's weights."""
    try:
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        opt_state: dict[int, dict[str, Any]] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, pid, key = k.split(".", 2)
                opt_state.setdefault(int(pid), {})[key] = v
        for pid, sc in info["optimizer"]["scalars"].items():
            opt_state.setdefault(int(pid), {}).update(sc)
        optimizer.load_state_dict(
            {"state": opt_state, "param_groups": info["optimizer"]["param_groups"]}
        )
        if scaler is not None and info.get("scaler"):
            scaler.load_state_dict(info["scaler"])
        torch.set_rng_state(tensors["rng.torch"])
        gen.set_state(tensors["rng.augment"])
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        raise StPredictError(
            f"{path}: training state does not fit this model ({first_line(err)}); "
            "delete it to start over"
        ) from None
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
    return best or None


class EpochTracker:
    """History, step count and the best epoch so far (what the state file carries across runs)."""

    def __init__(self, *, frozen: bool) -> None:
        self.frozen = frozen
        self.history: list[dict[str, Any]] = []
        self.global_step = 0
        self.start_epoch = 0
        self.resumed_from: int | None = None
        self.best_epoch = 0
        self.best_val = float("inf")
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_gene_pcc: list[float] | None = None

    def resume(self, info: dict[str, Any], best_state) -> None:
        """Continue from a state file's header (already checked by :func:`load_state`)."""
        self.history = list(info["history"])
        self.start_epoch = self.resumed_from = int(info["epoch"])
        self.global_step = int(info["global_step"])
        self.best_epoch, self.best_val = int(info["best_epoch"]), float(info["best_val"])
        self.best_state = best_state
        self.best_gene_pcc = info.get("best_gene_pcc")

    def update(self, entry: dict[str, Any], model, gene_pcc) -> None:
        """Record an epoch; snapshot the weights when it is the best so far (by validation loss)."""
        score = entry.get("val_loss", entry["train_loss"])
        if score < self.best_val or self.best_state is None:
            self.best_val, self.best_epoch = score, entry["epoch"]
            # a frozen backbone never changes: the snapshot keeps the trained part only
            self.best_state = {
                k: v.detach().cpu().clone()
                for k, v in model.state_dict().items()
                if not (self.frozen and k.startswith("encoder."))
            }
            self.best_gene_pcc = None if gene_pcc is None else [float(v) for v in gene_pcc]
        self.history.append(entry)

    def info(self, genes: list[str], config: TrainConfig, plan: dict[str, Any]) -> dict[str, Any]:
        """The state file's header (JSON)."""
        return {
            "epoch": self.history[-1]["epoch"] if self.history else self.start_epoch,
            "global_step": self.global_step,
            "history": self.history,
            "best_epoch": self.best_epoch,
            "best_val": self.best_val,
            "best_gene_pcc": self.best_gene_pcc,
            "genes": genes,
            "config_fingerprint": config_fingerprint(config),
            "plan": plan,
        }
