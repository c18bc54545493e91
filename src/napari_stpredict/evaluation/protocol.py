"""The paper's protocol: train every method on every fold, score the held-out sections.

Each method is trained with the same :class:`~napari_stpredict.training.TrainConfig` (data,
genes, backbone, seed, budget) except ``method``, so the comparison is fair. Before a model is
scored, its file is checked: the held-out sections must be neither among its training sections
nor in its reference bank (:func:`~napari_stpredict.evaluation.folds.check_no_leakage`).

The pieces: up-front checks (:mod:`.checks`), scoring one model on a fold with each section
read once (:mod:`.model_scoring`), and what is recorded beside the numbers (:mod:`.provenance`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari_stpredict.errors import Cancelled, StPredictError
from napari_stpredict.evaluation.checks import (
    METHODS,
    check_genes,
    check_method_configs,
    check_methods,
    check_n_top,
    check_predictor_options,
)
from napari_stpredict.evaluation.data import model_info
from napari_stpredict.evaluation.folds import Fold, make_folds
from napari_stpredict.evaluation.markers import BREAST_CANCER_MARKERS
from napari_stpredict.evaluation.model_scoring import (
    TUMOR_SCORE_DOC,
    SectionCache,
    score_model_on,
    tumor_score_fn,
)
from napari_stpredict.evaluation.provenance import (
    config_dict,
    error_text,
    training_summary,
    used_and_missing,
    versions,
)
from napari_stpredict.evaluation.results import EvaluationResult, FoldResult, MethodResult
from napari_stpredict.progress import CancelToken, ProgressCallback, check_cancel, report

# names kept importable from here (tests, older callers)
_tumor_score_fn = tumor_score_fn
_check_predictor_options = check_predictor_options

__all__ = ["METHODS", "check_genes", "evaluate", "score_model"]


def _load_manifest(manifest: Any) -> Any:
    if isinstance(manifest, str | os.PathLike):
        from napari_stpredict.st import load_manifest

        return load_manifest(manifest)
    return manifest


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


@dataclass
class _Plan:
    """One evaluation, checked: what is trained on which folds and how it is scored."""

    manifest: Any
    methods: list[str]
    folds: list[Fold]
    config: Any
    markers: list[str]
    n_top: int
    sections: SectionCache
    predictor_options: dict[str, Any]
    tumor_score: Callable[..., Any]

    def record(self, cv: str, test_sections: Sequence[str] | None) -> dict[str, Any]:
        """The results' ``config``: manifest, folds, methods, training config, scoring."""
        return {
            "manifest": str(getattr(self.manifest, "path", "")),
            "cv": "test-sections" if test_sections is not None else cv,
            "folds": [{"train": list(f.train), "test": list(f.test)} for f in self.folds],
            "methods": self.methods,
            "n_top": self.n_top,
            "train": config_dict(self.config),
            "tumor_score": TUMOR_SCORE_DOC,
            "predictor": dict(self.predictor_options or {}),
        }


def _plan(
    manifest: Any,
    *,
    methods: Sequence[str],
    cv: str,
    test_sections: Sequence[str] | None,
    config: Any,
    markers: Sequence[str] | None,
    n_top: int,
    predictor_options: dict[str, Any] | None,
) -> _Plan:
    """Every check that can fail before a fold trains, in the order the errors are reported."""
    from napari_stpredict.training import TrainConfig

    manifest = _load_manifest(manifest)
    methods = check_methods(methods)
    check_n_top(n_top)
    config = config if config is not None else TrainConfig()
    folds = make_folds(manifest.sections, cv=cv, test_sections=test_sections)
    check_method_configs(config, methods)
    sections = SectionCache(manifest)
    # a gene list that cannot be met fails here, before any fold trains
    check_genes(config, [sections.get(n) for f in folds for n in (*f.train, *f.test)])
    return _Plan(
        manifest=manifest,
        methods=methods,
        folds=folds,
        config=config,
        markers=list(markers) if markers is not None else list(BREAST_CANCER_MARKERS),
        n_top=n_top,
        sections=sections,
        predictor_options=check_predictor_options(predictor_options),
        tumor_score=tumor_score_fn(),
    )


@contextlib.contextmanager
def _work_root(work_dir: str | os.PathLike | None) -> Iterator[Path]:
    """Where fold models are written: ``work_dir`` (kept), else a temporary folder (removed)."""
    if work_dir is not None:
        root = Path(work_dir)
        root.mkdir(parents=True, exist_ok=True)
        yield root
        return
    root = Path(tempfile.mkdtemp(prefix="stpredict-eval-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run_folds(
    plan: _Plan,
    train: Callable[..., Any],
    root: Path,
    *,
    keep_models: bool,
    progress: ProgressCallback | None,
    step_progress: ProgressCallback | None,
    cancel: CancelToken | None,
) -> tuple[dict[str, MethodResult], list[list[str]]]:
    """Train and score every (fold, method) unit; the results per method and the gene panels
    of the models trained."""
    results = {m: MethodResult(name=m) for m in plan.methods}
    panels: list[list[str]] = []
    total = len(plan.folds) * len(plan.methods)
    done = 0
    for i, fold in enumerate(plan.folds):
        for method in plan.methods:
            check_cancel(cancel, "evaluation")
            label = f"fold {i + 1}/{len(plan.folds)} (test {'+'.join(fold.test)}) {method}"
            report(progress, done, total, label)
            fold_dir = root / f"fold{i + 1:02d}-{'+'.join(fold.test)}"
            fold_dir.mkdir(parents=True, exist_ok=True)
            unit = _Unit(
                plan,
                method,
                fold,
                root,
                out=fold_dir / f"{method}.safetensors",
                train=train,
                keep_model=keep_models,
                progress=step_progress,
                cancel=cancel,
            )
            fr = unit.run()
            if unit.genes is not None:
                panels.append(unit.genes)
            results[method].folds.append(fr)
            done += 1
            report(progress, done, total, label)
    return results, panels


@dataclass
class _Unit:
    """One method trained on one fold, then scored on the fold's held-out sections."""

    plan: _Plan
    method: str
    fold: Fold
    root: Path
    out: Path
    train: Callable[..., Any]
    keep_model: bool
    progress: ProgressCallback | None
    cancel: CancelToken | None
    #: the trained model's gene panel (``None`` until it is scored)
    genes: list[str] | None = None

    def run(self) -> FoldResult:
        """The fold's result; a failure is recorded in it (the other folds still run)."""
        try:
            return self._train_and_score()
        except (Cancelled, KeyboardInterrupt):
            raise
        except Exception as err:  # a failed fold is reported; the others still run
            fold = self.fold
            return FoldResult(test=list(fold.test), train=list(fold.train), error=error_text(err))

    def _train_and_score(self) -> FoldResult:
        plan, fold = self.plan, self.fold
        t0 = time.perf_counter()
        fold_config, train_sections = _fold_config(plan.config, self.method, fold, self.root)
        tr = self.train(
            plan.manifest,
            fold_config,
            out=self.out,
            sections=train_sections,
            progress=self.progress,
            cancel=self.cancel,
        )
        t_train = time.perf_counter() - t0
        info = model_info(str(getattr(tr, "model_path", self.out)))
        fr = score_model_on(
            info,
            fold,
            plan.sections,
            markers=plan.markers,
            n_top=plan.n_top,
            device=str(getattr(plan.config, "device", "auto")),
            tumor_score=plan.tumor_score,
            progress=self.progress,
            cancel=self.cancel,
            predictor_options=plan.predictor_options,
        )
        fr.train = list(fold.train)
        fr.train_wall_s = t_train
        fr.training = training_summary(info.metadata)
        if not self.keep_model:
            fr.model_path = None
        self.genes = info.genes
        return fr


def _result(
    methods: dict[str, MethodResult],
    config: dict[str, Any],
    t_start: float,
    markers: Sequence[str],
    panels: Sequence[Sequence[str]],
) -> EvaluationResult:
    """The evaluation's result: the markers found in the panels, versions and wall time."""
    used, missing = used_and_missing(markers, panels)
    return EvaluationResult(
        methods=methods,
        config=config,
        versions=versions(),
        wall_time_s=time.perf_counter() - t_start,
        genes=list(panels[0]) if panels else [],
        markers_used=used,
        markers_missing=missing,
    )


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
    from napari_stpredict.training import train

    t_start = time.perf_counter()
    plan = _plan(
        manifest,
        methods=methods,
        cv=cv,
        test_sections=test_sections,
        config=config,
        markers=markers,
        n_top=n_top,
        predictor_options=predictor_options,
    )
    with _work_root(work_dir) as root:
        results, panels = _run_folds(
            plan,
            train,
            root,
            keep_models=work_dir is not None,
            progress=progress,
            step_progress=step_progress,
            cancel=cancel,
        )
    record = plan.record(cv, test_sections)
    if work_dir is not None:
        record["work_dir"] = str(root)
    return _result(results, record, t_start, plan.markers, panels)


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
    check_n_top(n_top)
    _check_test_sections(manifest, test_sections)
    markers = list(markers) if markers is not None else list(BREAST_CANCER_MARKERS)
    predictor_options = check_predictor_options(predictor_options)
    info = model_info(str(model_path))
    fold = Fold(
        name="+".join(test_sections),
        train=tuple(t for t in (info.training_sections or []) if t not in test_sections),
        test=tuple(dict.fromkeys(test_sections)),
    )
    fr = score_model_on(
        info,
        fold,
        SectionCache(manifest),
        markers=markers,
        n_top=n_top,
        device=device,
        tumor_score=tumor_score_fn(),
        progress=progress,
        cancel=cancel,
        predictor_options=predictor_options,
    )
    record = {
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
    methods = {info.method: MethodResult(name=info.method, folds=[fr])}
    return _result(methods, record, t_start, markers, [info.genes])


def _check_test_sections(manifest: Any, test_sections: Sequence[str]) -> None:
    """The held-out sections must be given and be sections of the manifest."""
    if not test_sections:
        raise StPredictError("--test-sections: give the held-out sections to score the model on")
    names = [str(s.name) for s in manifest.sections]
    unknown = [t for t in test_sections if t not in names]
    if unknown:
        raise StPredictError(f"--test-sections: unknown sections {unknown} (have {names})")
