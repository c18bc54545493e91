"""One training run, top to bottom: :func:`train` (data → model → epochs → model file).

The steps are the package's modules (see :mod:`napari_stpredict.training`); this module wires
them together and owns the set-up helpers (:func:`input_spec_for`, the model, the patch
source, the ``auto`` plan).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_stpredict.errors import StPredictError
from napari_stpredict.model.preprocess import InputSpec, backbone_mean_std
from napari_stpredict.progress import CancelToken, ProgressCallback, check_cancel, report
from napari_stpredict.training.config import TrainConfig, TrainResult, method_kwargs
from napari_stpredict.training.data import PatchSource, TrainData, prepare_data
from napari_stpredict.training.loop import train_one_epoch, validate
from napari_stpredict.training.state import (
    EpochTracker,
    check_resumable,
    load_state,
    restore_state,
    save_state,
    state_path_for,
)

__all__ = ["input_spec_for", "train"]

logger = logging.getLogger(__name__)


def train(
    manifest,
    config: TrainConfig | None = None,
    *,
    out: str | os.PathLike,
    sections: Sequence[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train a model on the sections of a dataset manifest and write the model file.

    Parameters
    ----------
    manifest
        A :class:`~napari_stpredict.st.Manifest` or the path of a manifest YAML.
    config
        The run's options (default :class:`TrainConfig`).
    out
        The model file to write (``.safetensors``). A resumable state file
        (:func:`state_path_for`) lives next to it while training runs and is removed at the end.
    sections
        Training sections (default: all sections that are not validation sections). Other
        sections never enter training nor the reference bank.
    resume
        Continue from the state file of an interrupted run with the same options.
    overwrite
        Replace an existing ``out``.
    progress
        Called per step as ``progress(step_in_epoch, steps_in_epoch, "epoch E/N loss L")``;
        also during data loading, feature extraction and bank building.
    cancel
        Checked between steps; the state of the last finished epoch stays on disk.
    on_epoch
        Called with each epoch's history entry.
    log
        Called with one-line notes for the user (what ``auto`` chose and why, the estimated
        time per epoch); default: this module's logger.

    Returns
    -------
    TrainResult

    Raises
    ------
    StPredictError
        Bad options or data (before any training starts); ``Cancelled`` when cancelled.
    """
    config = config or TrainConfig()
    out, state_path, device = _check_options(config, out, overwrite=overwrite)
    saved = _saved_state(state_path, config) if resume else None
    say = log or logger.info

    data = prepare_data(manifest, config, sections, progress=progress, cancel=cancel)
    if saved is not None and saved[1]["genes"] != data.genes:
        raise StPredictError(f"{state_path}: the gene panel changed since the interrupted run")
    torch.manual_seed(config.seed)
    model, spec = _build_model(config, data, device)
    source = _patch_source(config, data, spec)
    overwrite = overwrite or resume  # a resumed run replaces its own earlier attempt
    with _released(source, data), _deterministic_on_cpu(device):
        if getattr(model, "closed_form", False):  # --method ridge (B): no epochs, no optimizer
            return _fit_closed_form(config, data, spec, model, device, source, out, say,
                                    overwrite=overwrite, progress=progress,
                                    cancel=cancel)  # fmt: skip
        plan = _plan(config, model, source, data, spec, device, saved)
        say(f"train_backbone={plan['train_backbone']}: {plan['reason']}")
        run = _make_run(config, data, spec, model, device, source, plan)
        tracker = _tracker(run, saved, state_path)
        if run.train_backbone == "none":
            _build_features(run, progress=progress, cancel=cancel)
        plan["est_epoch_s"] = _announce_epoch_time(run, say)
        _run_epochs(run, tracker, plan, state_path, progress=progress, cancel=cancel,
                    on_epoch=on_epoch)  # fmt: skip
        return _finish(run, tracker, plan, out, overwrite=overwrite, progress=progress,
                       cancel=cancel)  # fmt: skip


# ------------------------------------------------------------------------------------ set-up


def _check_options(
    config: TrainConfig, out: str | os.PathLike, *, overwrite: bool
) -> tuple[Path, Path, torch.device]:
    """Check ``config`` and the target before any data is read: ``(out, state path, device)``."""
    from napari_stpredict.io_utils import check_target
    from napari_stpredict.model.predictor import resolve_device

    config.validate()
    method_kwargs(config)
    out = Path(out)
    if out.suffix != ".safetensors":
        raise StPredictError(f"{out}: the model file must end in .safetensors")
    check_target(out, overwrite=overwrite)
    return out, state_path_for(out), resolve_device(config.device)


@contextlib.contextmanager
def _released(source: PatchSource, data: TrainData) -> Iterator[None]:
    """Close the patch reader and the dataset's slides at the end, whatever happens."""
    try:
        yield
    finally:
        source.close()
        with contextlib.suppress(Exception):
            data.dataset.close()  # decoded JPEG/PNG sections can be large


@contextlib.contextmanager
def _deterministic_on_cpu(device: torch.device) -> Iterator[None]:
    """Deterministic algorithms (warn only) on a CPU while training; the old setting after."""
    prev = torch.are_deterministic_algorithms_enabled()
    try:
        if device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        yield
    finally:
        torch.use_deterministic_algorithms(prev)


def _saved_state(state_path: Path, config: TrainConfig):
    """``(tensors, info)`` of the interrupted run, checked against ``config``; ``None`` if absent."""
    if not state_path.is_file():
        warnings.warn(f"--resume: no state file {state_path}; starting from scratch", stacklevel=3)
        return None
    tensors, info = load_state(state_path)
    check_resumable(state_path, info, config)
    return tensors, info


def input_spec_for(config: TrainConfig, data: TrainData, encoder) -> InputSpec:
    """The model's :class:`InputSpec`: patch geometry, the backbone's own mean/std, context, tta."""
    mean, std = backbone_mean_std(encoder)
    return InputSpec(
        patch_um=data.patch_um,
        patch_px=data.patch_px,
        mean=mean,
        std=std,
        context=config.context,
        tta=config.tta,
    )


def _build_model(config: TrainConfig, data: TrainData, device: torch.device):
    from napari_stpredict.model.methods import build_model

    extra = {"n_fields": 2} if config.context else {}
    model = build_model(
        config.method,
        n_genes=len(data.genes),
        backbone=config.backbone,
        pretrained=config.pretrained,
        **method_kwargs(config),
        **extra,
    )
    spec = input_spec_for(config, data, model.encoder)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, spec


def _patch_source(config: TrainConfig, data: TrainData, spec: InputSpec) -> PatchSource:
    n_items = data.expr.shape[0]
    workers = config.num_workers if config.num_workers is not None else min(4, os.cpu_count() or 1)
    patch_bytes = n_items * data.patch_px * data.patch_px * 3 * len(spec.scales)
    use_cache = config.cache == "memory" or (
        config.cache == "auto" and patch_bytes <= config.cache_max_gb * 2**30
    )
    return PatchSource(
        data.dataset, n_items, data.patch_px, cache=use_cache, workers=workers, scales=spec.scales
    )


def _plan(config, model, source, data, spec, device, saved) -> dict[str, Any]:
    """Resolve the ``auto`` options (a resumed run keeps the interrupted run's choices)."""
    from napari_stpredict.training.auto import choose_train_backbone
    from napari_stpredict.training.loop import schedule

    if saved is not None and saved[1].get("plan"):
        plan = dict(saved[1]["plan"])
        if not str(plan.get("reason", "")).startswith("as in the interrupted run"):
            plan["reason"] = f"as in the interrupted run ({plan.get('reason', '')})"
        return plan
    if config.train_backbone != "auto":
        plan = {"train_backbone": config.train_backbone, "reason": "as given"}
    else:
        bs, _, total_steps, _ = schedule(config, len(data.train_idx))
        idx = data.train_idx[: min(bs, 16)]  # timed on a few spots, scaled to the batch
        plan = choose_train_backbone(
            model=model, device=device, u8=source.read(idx), expr=data.expr[idx], spec=spec,
            total_steps=total_steps, n_items=data.expr.shape[0], batch_size=bs,
        )  # fmt: skip
    frozen = plan["train_backbone"] == "none"
    stain = config.stain_augment
    if stain == "auto":
        stain = "none" if frozen else "hed"
    elif frozen and stain != "none":
        warnings.warn(
            f"stain_augment={stain!r} has no effect with a frozen backbone (features are "
            "computed once per spot)",
            stacklevel=3,
        )
        stain = "none"
    plan["stain_augment"] = stain
    return plan


def _make_run(config, data, spec, model, device, source, plan):
    from napari_stpredict.model.predictor import amp_dtype
    from napari_stpredict.training.loop import Run, build_optimizer, schedule

    model.encoder.set_trainable(plan["train_backbone"])
    adt = amp_dtype(device)
    bs, steps_per_epoch, total_steps, warmup = schedule(config, len(data.train_idx))
    return Run(
        config=config,
        data=data,
        spec=spec,
        model=model,
        optimizer=build_optimizer(model, config),
        scaler=torch.amp.GradScaler("cuda") if adt == torch.float16 else None,
        device=device,
        amp_dtype=adt,
        source=source,
        gen=torch.Generator().manual_seed(config.seed),
        train_backbone=plan["train_backbone"],
        stain=plan["stain_augment"],
        batch_size=bs,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        warmup=warmup,
    )


def _build_features(run, *, progress, cancel) -> None:
    from napari_stpredict.training.features import FeatureStore

    run.features = FeatureStore(
        run.model, run.source, run.data, run.config, run.spec, run.device,
        need_tokens=run.config.method == "cmrc",
    )  # fmt: skip
    run.features.build(progress=progress, cancel=cancel, amp=run.amp)


def _announce_epoch_time(run, say) -> float | None:
    """Time two real steps (nothing changes) and say the estimated seconds per epoch."""
    from napari_stpredict.training.auto import _fmt, estimate_epoch_seconds, time_steps
    from napari_stpredict.training.loop import _val_batches, batches_of, compute_loss

    idx = run.data.train_idx[: min(run.batch_size, 16)]  # a few spots, scaled to the batch
    ((_, inputs, expr),) = list(batches_of(run, [idx], train=False))
    step_s = time_steps(run.model, lambda: compute_loss(run, inputs, expr)["loss"], n=2)
    step_s *= run.batch_size / len(idx)
    n_val = len(_val_batches(run)) if len(run.data.val_idx) else 0
    est = estimate_epoch_seconds(step_s, run.steps_per_epoch, n_val)
    first = "" if run.features is not None else " (the first epoch also reads every patch)"
    say(
        f"estimated time per epoch: ~{_fmt(est)} ({run.steps_per_epoch} steps × {step_s:.2f} s "
        f"measured{first})"
    )
    return round(est, 2)


def _fit_closed_form(config, data, spec, model, device, source, out, say, *, overwrite, progress,
                     cancel):  # fmt: skip
    """``--method ridge``: frozen features of every spot, then PCA + ridge in closed form
    (:func:`napari_stpredict.model.ridge.fit_closed_form`); the backbone never trains."""
    from napari_stpredict.model.ridge import fit_closed_form

    plan = {
        "train_backbone": "none",
        "reason": f"{config.method} is fitted in closed form on frozen backbone features",
        "stain_augment": "none",
    }
    say(f"train_backbone=none: {plan['reason']}")
    run = _make_run(config, data, spec, model, device, source, plan)
    tracker = EpochTracker(frozen=True)
    _build_features(run, progress=progress, cancel=cancel)
    check_cancel(cancel, "training")
    info = fit_closed_form(run, tracker)
    say(
        f"ridge: {info['n_components']} PCA components ({info['explained_variance']:.0%} of the "
        f"feature variance), alpha {info['alpha']:.3g} by {info['cv']['scheme']} inner CV"
    )
    return _finish(run, tracker, plan, out, overwrite=overwrite, progress=progress, cancel=cancel)


# ------------------------------------------------------------------------------------ loop + end


def _tracker(run, saved, state_path: Path) -> EpochTracker:
    """A fresh :class:`EpochTracker`, or the interrupted run's (weights, optimiser restored)."""
    tracker = EpochTracker(frozen=run.train_backbone == "none")
    if saved is not None:
        best = restore_state(
            state_path, *saved, model=run.model, optimizer=run.optimizer, scaler=run.scaler,
            gen=run.gen,
        )  # fmt: skip
        tracker.resume(saved[1], best)
    return tracker


def _run_epochs(run, tracker: EpochTracker, plan, state_path: Path, *, progress, cancel,
                on_epoch) -> None:  # fmt: skip
    """Train and validate epoch by epoch; the resumable state is saved after every epoch."""
    for epoch in range(tracker.start_epoch, run.config.epochs):
        if tracker.global_step >= run.total_steps:
            break
        t0 = time.perf_counter()
        entry, tracker.global_step = train_one_epoch(
            run, epoch, tracker.global_step, progress=progress, cancel=cancel
        )
        val, gene_pcc = validate(run, cancel=cancel)
        entry.update(val)
        entry["seconds"] = round(time.perf_counter() - t0, 3)
        tracker.update(entry, run.model, gene_pcc)
        save_state(
            state_path, model=run.model, best_state=tracker.best_state, optimizer=run.optimizer,
            scaler=run.scaler, gen=run.gen, info=tracker.info(run.data.genes, run.config, plan),
        )  # fmt: skip
        if on_epoch is not None:
            on_epoch(entry)


def _finish(run, tracker: EpochTracker, plan, out: Path, *, overwrite: bool, progress, cancel):
    """Best weights → reference bank → metadata → model file; the state file goes."""
    from napari_stpredict.model.checkpoint import load_model_file, save_model_file
    from napari_stpredict.training.bank import build_metadata, encode_expr_chunked

    model, data, config = run.model, run.data, run.config
    if tracker.best_state is not None:
        model.load_state_dict(tracker.best_state, strict=not tracker.frozen)
    model.eval()
    check_cancel(cancel, "training")
    report(progress, 0, 1, "building reference bank")
    bank_expr = data.expr[data.train_idx]
    bank_emb = encode_expr_chunked(model, bank_expr) if model.retrieval else None
    report(progress, 1, 1, "building reference bank")
    if model.retrieval and len(data.train_idx) < config.top_k:
        warnings.warn(
            f"top_k={config.top_k} exceeds the {len(data.train_idx)} bank spots; all are used",
            stacklevel=3,
        )
    gene_pcc = None if tracker.best_gene_pcc is None else np.asarray(tracker.best_gene_pcc)
    metadata = build_metadata(
        data=data, config=config, spec=run.spec, model=model, history=tracker.history,
        best_epoch=tracker.best_epoch, best_val=tracker.best_val,
        global_step=tracker.global_step, gene_pcc=gene_pcc, plan=plan,
    )  # fmt: skip
    if getattr(model, "fit_info", None) is not None:  # ridge: PCA size, alpha, inner CV scores
        metadata["ridge"] = model.fit_info
    if model.retrieval:  # k and the neighbour weighting the Predictor uses (B)
        from napari_stpredict.model.retrieval import default_retrieval

        metadata["retrieval"] = default_retrieval(config.top_k)
    save_model_file(
        out,
        model.to("cpu").to(memory_format=torch.contiguous_format),
        bank_embeddings=bank_emb,
        bank_expression=bank_expr if model.retrieval else None,
        bank_section_index=data.section_index[data.train_idx],
        metadata=metadata,
        overwrite=overwrite,
    )
    with contextlib.suppress(FileNotFoundError):
        state_path_for(out).unlink()
    return TrainResult(
        model_path=out,
        history=tracker.history,
        best_epoch=tracker.best_epoch,
        metadata=load_model_file(out, verify=False).metadata,
        resumed_from=tracker.resumed_from,
        plan=plan,
    )
