"""``stpredict evaluate``: the paper's protocol, CMRCNet vs BLEEP vs regression vs ridge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from napari_stpredict.cli import app
from napari_stpredict.cli._options import json_object_option, split_commas, train_config
from napari_stpredict.errors import StPredictError

_TRAIN_HELP = (
    "Training (forwarded to every method of every fold; unset: `stpredict train`'s default)"
)


def _genes_option(genes: str | None) -> Any:
    if genes is None:
        return None
    if Path(genes).exists() or genes.endswith((".txt", ".csv", ".tsv", ".npy", ".json")):
        return genes  # a gene list file: TrainConfig takes its path
    return split_commas(genes)


def _print_table(result: Any) -> None:
    """Metrics as rows, methods as columns: three methods fit an 80-column terminal."""
    from rich.console import Console
    from rich.table import Table

    from napari_stpredict.evaluation.report import _LABELS, format_value

    keys: list[str] = []
    for m in result.methods.values():
        keys += [k for k in m.metric_keys() if k not in keys]
    table = Table(title=f"stpredict evaluate ({result.config.get('cv')}): mean ± sd over folds")
    table.add_column("metric", style="bold")
    stats = {name: (m.mean(), m.sd()) for name, m in result.methods.items()}
    for name in result.methods:
        table.add_column(name, justify="right")
    n_mg = max((len(m.mg_genes()) for m in result.methods.values()), default=0)
    for k in keys:
        label = _LABELS.get(k, k)
        if k == "pcc_mg":
            label = f"{label} ({n_mg} genes)"
        table.add_row(
            label,
            *[format_value(mean.get(k), sd.get(k)) for mean, sd in stats.values()],
        )
    table.add_row(
        "folds ok",
        *[f"{sum(f.ok for f in m.folds)}/{len(m.folds)}" for m in result.methods.values()],
    )
    console = Console()
    console.print(table)
    for name, m in result.methods.items():
        for f in m.folds:
            if not f.ok:
                console.print(f"[red]{name}: fold test={'+'.join(f.test)} failed: {f.error}[/red]")
    if result.markers_used:
        used = result.markers_used
        console.print(
            f"PCC MG scored on {len(used)} marker genes: {', '.join(used[:20])}"
            f"{', …' if len(used) > 20 else ''}"
        )
    if result.markers_missing:
        miss = result.markers_missing
        console.print(
            f"{len(result.markers_used)} marker genes used; {len(miss)} not in the gene panel "
            f"(skipped): {', '.join(miss[:12])}{', …' if len(miss) > 12 else ''}"
        )


@app.command(
    "evaluate",
    help="Cross-validate CMRCNet, BLEEP, ST-Net-style regression and PCA+ridge (or score one "
    "model).\n\nPer-gene PCC across the spots of each held-out section on log-normalised values "
    "(NaN → 0), averaged over the top HEG/HVG genes of that section, a marker list and all "
    "genes; MSE, MAE, gene–gene correlation preservation and, for labelled sections, tumour "
    "AUROC.",
)
def evaluate_cmd(
    data: Path = typer.Argument(..., help="Dataset manifest (YAML).", show_default=False),
    cv: str = typer.Option(
        "leave-one-section-out", "--cv", help="leave-one-section-out or leave-one-patient-out."
    ),
    methods: str = typer.Option(
        "cmrc,bleep,regression,ridge", "--methods", help="Comma-separated methods."
    ),
    model: Path | None = typer.Option(
        None, "--model", help="Score this existing model file instead of cross-validating."
    ),
    test_sections: list[str] | None = typer.Option(
        None, "--test-sections", help="Held-out sections (comma-separated or repeated)."
    ),
    markers: Path | None = typer.Option(
        None,
        "--markers",
        help="Marker genes for PCC(MG): one per line or a CSV (default: breast-cancer list).",
    ),
    n_top: int = typer.Option(50, "--n-top", help="Size of the HEG and HVG sets."),
    out: Path | None = typer.Option(None, "--out", help="Write every number to this JSON file."),
    report: Path | None = typer.Option(
        None, "--report", help="Write a Markdown report + PNGs here."
    ),
    work_dir: Path | None = typer.Option(
        None, "--work-dir", help="Keep the fold models here (default: a temporary folder)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
    tta: int | None = typer.Option(
        None,
        "--tta",
        help="Score with this test-time augmentation (1, 2, 4 or 8 symmetries averaged; "
        "default: each model file's own).",
    ),
    weighting: str | None = typer.Option(
        None,
        "--weighting",
        help="Retrieval weighting of the top-k neighbours when scoring: mean or softmax "
        "(default: each model file's own).",
    ),
    temperature: float | None = typer.Option(
        None, "--temperature", help="Softmax temperature over cosine for --weighting softmax."
    ),
    epochs: int | None = typer.Option(None, "--epochs", rich_help_panel=_TRAIN_HELP),
    batch_size: int | None = typer.Option(None, "--batch-size", rich_help_panel=_TRAIN_HELP),
    lr: float | None = typer.Option(None, "--lr", rich_help_panel=_TRAIN_HELP),
    backbone: str | None = typer.Option(None, "--backbone", rich_help_panel=_TRAIN_HELP),
    pretrained: str | None = typer.Option(
        None, "--pretrained", help="auto, none, or a weights file.", rich_help_panel=_TRAIN_HELP
    ),
    patch_px: int | None = typer.Option(None, "--patch-px", rich_help_panel=_TRAIN_HELP),
    patch_um: float | None = typer.Option(None, "--patch-um", rich_help_panel=_TRAIN_HELP),
    train_backbone: str | None = typer.Option(
        None,
        "--train-backbone",
        help="all, last or none (frozen backbone, cached features: the CPU-budget mode).",
        rich_help_panel=_TRAIN_HELP,
    ),
    seed: int | None = typer.Option(None, "--seed", rich_help_panel=_TRAIN_HELP),
    device: str | None = typer.Option(None, "--device", rich_help_panel=_TRAIN_HELP),
    genes: str | None = typer.Option(
        None,
        "--genes",
        help="Gene list file (.txt/.csv/.npy) or comma-separated names.",
        rich_help_panel=_TRAIN_HELP,
    ),
    n_top_genes: int | None = typer.Option(None, "--n-top-genes", rich_help_panel=_TRAIN_HELP),
    max_steps: int | None = typer.Option(None, "--max-steps", rich_help_panel=_TRAIN_HELP),
    top_k: int | None = typer.Option(None, "--top-k", rich_help_panel=_TRAIN_HELP),
    val_sections: list[str] | None = typer.Option(
        None,
        "--val-sections",
        help="Validation sections (only those in a fold's training set are used).",
        rich_help_panel=_TRAIN_HELP,
    ),
    num_workers: int | None = typer.Option(None, "--num-workers", rich_help_panel=_TRAIN_HELP),
    steps_per_epoch: int | None = typer.Option(
        None, "--steps-per-epoch", rich_help_panel=_TRAIN_HELP
    ),
    context: float | None = typer.Option(
        None,
        "--context",
        help="Add a context field of view this many times the patch side (0 = none), "
        "features concatenated before the heads.",
        rich_help_panel=_TRAIN_HELP,
    ),
    feature_cache: Path | None = typer.Option(
        None,
        "--feature-cache",
        help="Keep frozen-backbone features here across runs (with --train-backbone none).",
        rich_help_panel=_TRAIN_HELP,
    ),
    model_kwargs: str | None = typer.Option(
        None,
        "--model-kwargs",
        help="Method hyper-parameters as JSON, e.g. '{\"temperature\": 0.5}' (regression ignores them).",
        rich_help_panel=_TRAIN_HELP,
    ),
) -> None:
    """``stpredict evaluate``: check inputs, then score one model or cross-validate the
    methods with progress bars, then print and write the results.

    Long because the typer signature lists every flag (the user's help is the command's
    ``help=``).
    """
    flags = dict(locals())  # the options, before any other local is set
    from napari_stpredict.cli._progress import Bars
    from napari_stpredict.evaluation import evaluate, load_markers, score_model
    from napari_stpredict.st import load_manifest

    # fail on bad input before any training starts
    manifest = load_manifest(data)
    _check_outputs(out, report, overwrite=overwrite)
    marker_list = load_markers(markers) if markers is not None else None
    tests = split_commas(test_sections) or None
    predictor_options = {"tta": tta, "weighting": weighting, "temperature": temperature}
    scoring = dict(markers=marker_list, n_top=n_top, predictor_options=predictor_options)
    if model is not None and tests is None:
        raise StPredictError("--model: give the held-out sections with --test-sections")
    if model is None:
        options = {k: flags[k] for k in _TRAIN_FLAGS}
        config = _evaluation_config(options, genes, val_sections, feature_cache, model_kwargs)
    with Bars() as bars:
        outer, inner = _progress_pair(bars)
        if model is not None:
            result = score_model(
                model,
                manifest,
                test_sections=tests,
                device=device or "auto",
                progress=outer,
                **scoring,
            )
        else:
            result = evaluate(
                manifest,
                methods=split_commas(methods),
                cv=cv,
                test_sections=tests,
                config=config,
                work_dir=work_dir,
                progress=outer,
                step_progress=inner,
                **scoring,
            )
    _write_results(result, out, report)


#: ``evaluate`` flags that are :class:`TrainConfig` fields of the same name
_TRAIN_FLAGS = (
    "epochs", "batch_size", "lr", "backbone", "pretrained", "patch_px", "patch_um",
    "train_backbone", "seed", "device", "n_top_genes", "max_steps", "top_k", "num_workers",
    "steps_per_epoch", "context", "tta",
)  # fmt: skip


def _evaluation_config(
    options: dict[str, Any],
    genes: str | None,
    val_sections: list[str] | None,
    feature_cache: Path | None,
    model_kwargs: str | None,
) -> Any:
    """The training settings of every fold: the flags given over ``TrainConfig``'s defaults."""
    return train_config(
        {
            **options,
            "genes": _genes_option(genes),
            "val_sections": split_commas(val_sections) or None,
            "feature_cache_dir": None if feature_cache is None else str(feature_cache),
            "model_kwargs": json_object_option("--model-kwargs", model_kwargs),
        }
    )


def _check_outputs(out: Path | None, report: Path | None, *, overwrite: bool) -> None:
    """``--out`` and ``--report`` can be written (checked before any training)."""
    from napari_stpredict.io_utils import check_target

    if out is not None:
        check_target(out, overwrite=overwrite)
    if report is not None and report.exists() and not report.is_dir():
        raise StPredictError(f"--report {report}: exists and is not a folder")


def _write_results(result: Any, out: Path | None, report: Path | None) -> None:
    """Print the table, write ``--out`` (JSON) and ``--report`` (Markdown + PNGs); exit 1 when
    a fold failed."""
    from napari_stpredict.evaluation import write_report
    from napari_stpredict.io_utils import atomic_path

    _print_table(result)
    if out is not None:
        with atomic_path(out, overwrite=True) as tmp:
            tmp.write_text(json.dumps(result.to_dict(), indent=1, allow_nan=False) + "\n")
        typer.echo(f"results: {out}")
    if report is not None:
        md = write_report(result, report)
        typer.echo(f"report: {md}")
    if result.n_failed:
        raise typer.Exit(1)


def _progress_pair(bars: Any) -> tuple[Any, Any]:
    """``(outer, inner)`` callbacks on the CLI's :class:`~napari_stpredict.cli._progress.Bars`:
    units (fold × method) and the steps of the current training (its bar is dropped when the
    next unit starts)."""
    folds = bars.callback("folds")
    training = bars.callback("training", label="  training")

    def outer(done: int, total: int | None, message: str = "") -> None:
        folds(done, total, message)
        if done == 0 or message:
            bars.remove("training")

    return outer, training
