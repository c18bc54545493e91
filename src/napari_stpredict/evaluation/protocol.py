"""The paper's protocol: train every method on every fold, score the held-out sections.

Each method is trained with the same :class:`~napari_stpredict.training.TrainConfig` (data,
genes, backbone, seed, budget) except ``method``, so the comparison is fair. Before a model is
scored, its file is checked: the held-out sections must be neither among its training sections
nor in its reference bank (:func:`~napari_stpredict.evaluation.folds.check_no_leakage`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import os
import platform
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_stpredict.errors import Cancelled, StPredictError
from napari_stpredict.evaluation.data import (
    ModelInfo,
    SectionData,
    load_section,
    measured_expression,
    model_info,
    predict_section,
    section_patches,
)
from napari_stpredict.evaluation.folds import Fold, check_no_leakage, make_folds
from napari_stpredict.evaluation.markers import BREAST_CANCER_MARKERS, match_genes
from napari_stpredict.evaluation.results import EvaluationResult, FoldResult, MethodResult
from napari_stpredict.evaluation.scoring import score_section
from napari_stpredict.progress import CancelToken, ProgressCallback, check_cancel, report

__all__ = ["METHODS", "check_genes", "evaluate", "score_model"]

METHODS: tuple[str, ...] = ("cmrc", "bleep", "regression", "ridge")
_PATCH_CACHE_BYTES = 2 << 30
_TUMOR_SCORE_DOC = (
    "napari_stpredict.tumor.score_matrix (default signature, z-scores over the section); "
    "mean z-score of evaluation.markers.TUMOR_MARKERS when the panel has none of its genes"
)


def _load_manifest(manifest: Any) -> Any:
    if isinstance(manifest, str | os.PathLike):
        from napari_stpredict.st import load_manifest

        return load_manifest(manifest)
    return manifest


def _versions() -> dict[str, str]:
    import napari_stpredict

    out = {"napari_stpredict": napari_stpredict.__version__, "python": platform.python_version()}
    for mod in ("numpy", "torch", "timm", "anndata"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[mod] = importlib.metadata.version(mod)
    out["platform"] = platform.platform(terse=True)
    return out


def _tumor_score_fn() -> Callable[[np.ndarray, Sequence[str]], np.ndarray]:
    """The tumour module's default signature score; the marker z-score where it has no gene."""
    from napari_stpredict.evaluation.scoring import marker_zscore
    from napari_stpredict.tumor import TumorError, score_matrix

    def _score(expr: np.ndarray, genes: Sequence[str]) -> np.ndarray:
        try:
            # z-scores over the section's own spots: the AUROC only needs a ranking within it
            return np.asarray(score_matrix(expr, list(genes)), dtype=np.float64)
        except TumorError:
            return marker_zscore(expr, genes)

    return _score


class _Sections:
    """Reads each section once; measured expression cached per (gene panel, normalization)."""

    def __init__(self, manifest: Any) -> None:
        self._specs = {str(s.name): s for s in manifest.sections}
        self._data: dict[str, SectionData] = {}
        self._truth: dict[tuple, np.ndarray] = {}
        self._patches: dict[tuple, np.ndarray] = {}

    def get(self, name: str) -> SectionData:
        if name not in self._data:
            self._data[name] = load_section(self._specs[name])
        return self._data[name]

    def patches(self, name: str, predictor: Any, *, cancel: CancelToken | None) -> np.ndarray:
        """The section's spot patches at the predictor's scale, read once for all methods."""
        key = (
            name,
            predictor.patch_um,
            predictor.patch_px,
            repr(predictor.metadata.get("config", {}).get("patch_px_level0")),
            tuple(getattr(getattr(predictor, "input_spec", None), "scales", (1.0,))),
        )
        if key not in self._patches:
            arr = section_patches(predictor, self.get(name), cancel=cancel)
            # bounded: a cohort whose patches would not fit is read again per model instead
            if sum(a.nbytes for a in self._patches.values()) + arr.nbytes <= _PATCH_CACHE_BYTES:
                self._patches[key] = arr
            return arr
        return self._patches[key]

    def truth(self, name: str, genes: Sequence[str], normalization: Any) -> np.ndarray:
        key = (name, tuple(genes), repr(normalization))
        if key not in self._truth:
            self._truth[key] = measured_expression(self.get(name), genes, normalization)
        return self._truth[key]


def _score_model_on(
    info: ModelInfo,
    fold: Fold,
    sections: _Sections,
    *,
    markers: Sequence[str],
    n_top: int,
    device: str,
    tumor_score: Any,
    progress: ProgressCallback | None,
    cancel: CancelToken | None,
    predictor_options: dict[str, Any] | None = None,
) -> FoldResult:
    from napari_stpredict.model import Predictor

    # the guard: no number is ever computed on a section the model has seen
    check_no_leakage(
        fold.test,
        training_sections=info.training_sections,
        bank_sections=info.bank_sections,
        what=f"{info.path}",
    )
    t0 = time.perf_counter()
    predictor = Predictor(info.path, device=device, **(predictor_options or {}))
    result = FoldResult(test=list(fold.test), train=list(info.training_sections or fold.train))
    for name in fold.test:
        check_cancel(cancel, "evaluation")
        sec = sections.get(name)
        patches = sections.patches(name, predictor, cancel=cancel)
        pred = predict_section(predictor, sec, patches=patches, progress=progress, cancel=cancel)
        true = sections.truth(name, predictor.genes, info.normalization)
        result.sections.append(
            score_section(
                true,
                pred,
                predictor.genes,
                section=name,
                markers=markers,
                xy=sec.xy,
                n_top=n_top,
                labels=sec.labels,
                tumor_score=tumor_score,
            )
        )
    # a fold's number = mean over its held-out sections (the paper's code does the same)
    keys = dict.fromkeys(k for s in result.sections for k in s.metrics)
    for k in keys:
        vals = [
            s.metrics[k] for s in result.sections if k in s.metrics and np.isfinite(s.metrics[k])
        ]
        result.metrics[k] = float(np.mean(vals)) if vals else float("nan")
    result.model_path = info.path
    result.score_wall_s = time.perf_counter() - t0
    return result


def _fold_config(config: Any, method: str, fold: Fold, root: Path) -> tuple[Any, list[str]]:
    """The fold's training config and the sections it trains on (validation sections apart)."""
    changes: dict[str, Any] = {"method": method}
    if getattr(config, "train_backbone", None) == "none" and not getattr(
        config, "feature_cache_dir", None
    ):
        # frozen backbone: every method and fold reuses the same features, extracted once
        changes["feature_cache_dir"] = str(root / "features")
    val = list(getattr(config, "val_sections", None) or [])
    # validation sections must come from the fold's training sections, never from its test
    val = [v for v in val if v in fold.train]
    if hasattr(config, "val_sections"):
        changes["val_sections"] = val or None
    train_sections = [n for n in fold.train if n not in val]
    if not train_sections:
        raise StPredictError(f"fold {fold.name}: every training section is a validation section")
    return dataclasses.replace(config, **changes), train_sections


def _error_text(err: BaseException) -> str:
    msg = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {msg}" if msg else type(err).__name__


def _used_and_missing(
    markers: Sequence[str], panels: Sequence[Sequence[str]]
) -> tuple[list[str], list[str]]:
    union: list[str] = list(dict.fromkeys(g for p in panels for g in p))
    idx, missing = match_genes(union, markers)
    return [union[i] for i in idx], missing


def evaluate(
    manifest: Any,
    *,
    methods: Sequence[str] = METHODS,
    cv: str = "leave-one-section-out",
    test_sections: Sequence[str] | None = None,
    config: Any = None,
    markers: Sequence[str] | None = None,
    n_top: int = 50,
    work_dir: str | os.PathLike | None = None,
    predictor_options: dict[str, Any] | None = None,
    progress: ProgressCallback | None = None,
    step_progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> EvaluationResult:
    """Cross-validate each method with identical data, backbone, seed and budget.

    Parameters
    ----------
    manifest
        A :class:`~napari_stpredict.st.Manifest` or the path of its YAML file.
    methods
        Methods to train and compare (``"cmrc"``, ``"bleep"``, ``"regression"``).
    cv
        ``"leave-one-section-out"`` or ``"leave-one-patient-out"``.
    test_sections
        Instead of a cross-validation, a single fold testing these sections.
    config
        A :class:`~napari_stpredict.training.TrainConfig`; ``method`` is set per method and
        ``val_sections`` restricted to each fold's training sections.
    markers
        The MG list (default :data:`~napari_stpredict.evaluation.markers.BREAST_CANCER_MARKERS`).
    n_top
        Size of the HEG and HVG sets.
    work_dir
        Where fold models are written (``<fold>/<method>.safetensors``) and kept; by default a
        temporary folder removed at the end.
    predictor_options
        Scoring overrides passed to :class:`~napari_stpredict.model.Predictor`: ``tta`` (1, 2,
        4, 8), ``top_k``, ``weighting``, ``temperature``. ``None`` keeps each model file's own.
    progress
        Called per (fold, method) unit: ``progress(done, total, message)``.
    step_progress
        Forwarded to ``train`` (epochs/steps of the current unit).
    cancel
        Cancels between units and inside training.

    Returns
    -------
    EvaluationResult
        Per-method folds and their mean ± sd; a fold whose training or scoring fails carries
        the error and the other folds still run.
    """
    from napari_stpredict.training import TrainConfig, train

    t_start = time.perf_counter()
    manifest = _load_manifest(manifest)
    methods = list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise StPredictError(
            f"--methods {','.join(methods)}: unknown {unknown} (use {','.join(METHODS)})"
        )
    if n_top < 1:
        raise StPredictError(f"--n-top {n_top}: must be at least 1")
    config = config if config is not None else TrainConfig()
    markers = list(markers) if markers is not None else list(BREAST_CANCER_MARKERS)
    folds = make_folds(manifest.sections, cv=cv, test_sections=test_sections)
    # bad training options fail here, in a second, not once per fold
    for method in methods:
        validate = getattr(dataclasses.replace(config, method=method), "validate", None)
        if validate is not None:
            validate()
    sections = _Sections(manifest)
    # a gene list that cannot be met fails here, before any fold trains
    check_genes(config, [sections.get(n) for f in folds for n in (*f.train, *f.test)])
    predictor_options = _check_predictor_options(predictor_options)
    tumor_score = _tumor_score_fn()
    results = {m: MethodResult(name=m) for m in methods}
    panels: list[list[str]] = []

    own_tmp = work_dir is None
    root = Path(tempfile.mkdtemp(prefix="stpredict-eval-")) if own_tmp else Path(work_dir)
    root.mkdir(parents=True, exist_ok=True)
    total = len(folds) * len(methods)
    done = 0
    try:
        for i, fold in enumerate(folds):
            for method in methods:
                check_cancel(cancel, "evaluation")
                label = f"fold {i + 1}/{len(folds)} (test {'+'.join(fold.test)}) {method}"
                report(progress, done, total, label)
                fold_dir = root / f"fold{i + 1:02d}-{'+'.join(fold.test)}"
                fold_dir.mkdir(parents=True, exist_ok=True)
                out = fold_dir / f"{method}.safetensors"
                try:
                    t0 = time.perf_counter()
                    fold_config, train_sections = _fold_config(config, method, fold, root)
                    tr = train(
                        manifest,
                        fold_config,
                        out=out,
                        sections=train_sections,
                        progress=step_progress,
                        cancel=cancel,
                    )
                    t_train = time.perf_counter() - t0
                    info = model_info(str(getattr(tr, "model_path", out)))
                    fr = _score_model_on(
                        info,
                        fold,
                        sections,
                        markers=markers,
                        n_top=n_top,
                        device=str(getattr(config, "device", "auto")),
                        tumor_score=tumor_score,
                        progress=step_progress,
                        cancel=cancel,
                        predictor_options=predictor_options,
                    )
                    fr.train = list(fold.train)
                    fr.train_wall_s = t_train
                    fr.training = _training_summary(info.metadata)
                    if own_tmp:
                        fr.model_path = None
                    panels.append(info.genes)
                except (Cancelled, KeyboardInterrupt):
                    raise
                except Exception as err:  # a failed fold is reported; the others still run
                    fr = FoldResult(
                        test=list(fold.test), train=list(fold.train), error=_error_text(err)
                    )
                results[method].folds.append(fr)
                done += 1
                report(progress, done, total, label)
    finally:
        if own_tmp:
            shutil.rmtree(root, ignore_errors=True)

    used, missing = _used_and_missing(markers, panels)
    cfg = {
        "manifest": str(getattr(manifest, "path", "")),
        "cv": "test-sections" if test_sections is not None else cv,
        "folds": [{"train": list(f.train), "test": list(f.test)} for f in folds],
        "methods": methods,
        "n_top": n_top,
        "train": _config_dict(config),
        "tumor_score": _TUMOR_SCORE_DOC,
        "predictor": dict(predictor_options or {}),
    }
    if not own_tmp:
        cfg["work_dir"] = str(root)
    return EvaluationResult(
        methods=results,
        config=cfg,
        versions=_versions(),
        wall_time_s=time.perf_counter() - t_start,
        genes=panels[0] if panels else [],
        markers_used=used,
        markers_missing=missing,
    )


def score_model(
    model_path: str | os.PathLike,
    manifest: Any,
    *,
    test_sections: Sequence[str],
    markers: Sequence[str] | None = None,
    n_top: int = 50,
    device: str = "auto",
    predictor_options: dict[str, Any] | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> EvaluationResult:
    """Score an existing model file on held-out sections of a manifest.

    ``progress`` is called per batch of predicted spots.

    The result has one method, named after the model's ``method`` metadata, with one fold.

    Raises
    ------
    LeakageError
        If a test section is among the model's training sections or in its reference bank.
    """
    t_start = time.perf_counter()
    manifest = _load_manifest(manifest)
    if n_top < 1:
        raise StPredictError(f"--n-top {n_top}: must be at least 1")
    if not test_sections:
        raise StPredictError("--test-sections: give the held-out sections to score the model on")
    names = [str(s.name) for s in manifest.sections]
    unknown = [t for t in test_sections if t not in names]
    if unknown:
        raise StPredictError(f"--test-sections: unknown sections {unknown} (have {names})")
    markers = list(markers) if markers is not None else list(BREAST_CANCER_MARKERS)
    predictor_options = _check_predictor_options(predictor_options)
    info = model_info(str(model_path))
    fold = Fold(
        name="+".join(test_sections),
        train=tuple(t for t in (info.training_sections or []) if t not in test_sections),
        test=tuple(dict.fromkeys(test_sections)),
    )
    fr = _score_model_on(
        info,
        fold,
        _Sections(manifest),
        markers=markers,
        n_top=n_top,
        device=device,
        tumor_score=_tumor_score_fn(),
        progress=progress,
        cancel=cancel,
        predictor_options=predictor_options,
    )
    used, missing = _used_and_missing(markers, [info.genes])
    cfg = {
        "manifest": str(getattr(manifest, "path", "")),
        "cv": "model",
        "model": str(model_path),
        "folds": [{"train": list(fold.train), "test": list(fold.test)}],
        "methods": [info.method],
        "n_top": n_top,
        "predictor": dict(predictor_options or {}),
        "model_metadata": {
            k: v for k, v in info.metadata.items() if k not in ("genes", "gene_stats")
        },
    }
    return EvaluationResult(
        methods={info.method: MethodResult(name=info.method, folds=[fr])},
        config=cfg,
        versions=_versions(),
        wall_time_s=time.perf_counter() - t_start,
        genes=info.genes,
        markers_used=used,
        markers_missing=missing,
    )


_PREDICTOR_OPTIONS = ("tta", "top_k", "weighting", "temperature")


def _check_predictor_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """Validate scoring overrides up front (one line naming the bad value)."""
    from napari_stpredict.model.retrieval import WEIGHTINGS

    opts = {k: v for k, v in (options or {}).items() if v is not None}
    unknown = sorted(set(opts) - set(_PREDICTOR_OPTIONS))
    if unknown:
        raise StPredictError(
            f"predictor option {unknown[0]!r}: unknown (use {', '.join(_PREDICTOR_OPTIONS)})"
        )
    if "tta" in opts and opts["tta"] not in (1, 2, 4, 8):
        raise StPredictError(f"--tta {opts['tta']}: choose 1, 2, 4 or 8")
    if "top_k" in opts and int(opts["top_k"]) < 1:
        raise StPredictError(f"--top-k {opts['top_k']}: must be ≥ 1")
    if "weighting" in opts and opts["weighting"] not in WEIGHTINGS:
        raise StPredictError(f"--weighting {opts['weighting']}: choose {' or '.join(WEIGHTINGS)}")
    if "temperature" in opts and not float(opts["temperature"]) > 0:
        raise StPredictError(f"--temperature {opts['temperature']}: must be > 0")
    return opts


def check_genes(config: Any, sections: Sequence[SectionData]) -> None:
    """Refuse, before any training, a gene list the sections cannot satisfy.

    Genes are resolved like training does (:func:`napari_stpredict.st.select_genes` with the
    config's ``missing_genes``): with ``"error"`` every listed gene must be measured in every
    section, with ``"drop"`` at least one must be. ``genes=None`` (the default panel) passes.
    """
    genes = getattr(config, "genes", None)
    if genes is None:
        return
    from napari_stpredict.st import select_genes

    adatas = list({s.name: s.adata for s in sections}.values())
    missing = getattr(config, "missing_genes", "error")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = select_genes(adatas, gene_list=genes, missing=missing)
    if not kept:
        raise StPredictError("--genes: none of the listed genes is measured in every section")


def _training_summary(meta: dict[str, Any]) -> dict[str, Any]:
    """What the fold's training did: best epoch, steps, validation scores (validation spots of
    the training sections only)."""
    m = meta.get("metrics") or {}
    keep = (
        "best_epoch",
        "epochs_run",
        "steps",
        "n_train_spots",
        "n_val_spots",
        "val_pcc",
        "val_loss",
    )
    return {k: m[k] for k in keep if k in m}


def _config_dict(config: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(config):
        d = dataclasses.asdict(config)
    else:
        d = dict(vars(config))
    out = {}
    for k, v in d.items():
        if k == "method":
            continue
        if isinstance(v, Path):
            v = str(v)
        elif isinstance(v, list | tuple) and len(v) > 20:
            v = f"<{len(v)} items>"
        out[k] = v
    return out
