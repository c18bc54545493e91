"""``stpredict train DATA.yaml --out MODEL.safetensors``: train CMRCNet or a baseline."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import typer

from napari_stpredict.cli import app
from napari_stpredict.errors import StPredictError

_EPOCH = re.compile(r"^epoch (\d+)/(\d+)")


def _train_progress(bars):
    """``progress(done, total, msg)`` → one bar per epoch (``"epoch E/N loss L"``) and one per
    other phase (keyed by its first word: reading, extracting, building)."""

    def progress(done: int, total: int | None, message: str = "") -> None:
        m = _EPOCH.match(message)
        if m:
            bars.update(m.group(0), done, total, message[m.end() :].strip())
        else:
            key = message.split(" ")[0] or "working"
            bars.update(key, done, total, "", label=message or "working")

    return progress


def _section_list(value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise StPredictError(f"section list {value!r} is empty")
    return names


@app.command("train")
def train_command(
    manifest: Path = typer.Argument(
        ..., metavar="DATA.yaml", help="Dataset manifest (see docs/datasets.md)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Model file to write (.safetensors)."),
    method: str = typer.Option(
        "cmrc", "--method", help="cmrc (CMRCNet), bleep or regression (ST-Net style)."
    ),
    backbone: str = typer.Option(
        "tf_efficientnet_lite0", "--backbone", help="Any timm model name."
    ),
    pretrained: str = typer.Option(
        "auto", "--pretrained", help="auto, offline, hub, none or a weights file."
    ),
    epochs: int = typer.Option(20, "--epochs", help="Training epochs."),
    batch_size: int = typer.Option(32, "--batch-size", help="Spots per batch (≥ 2)."),
    lr: float = typer.Option(1e-3, "--lr", help="Learning rate of the heads (backbone: lr × 0.1)."),
    genes: Path | None = typer.Option(
        None, "--genes", help="Gene list file (.txt/.csv/.tsv/.npy/.json)."
    ),
    n_top_genes: int = typer.Option(
        1000, "--n-top-genes", help="Without --genes: top-N HVGs per section."
    ),
    markers: str = typer.Option(
        "breast",
        "--markers",
        help="Marker genes always in the default panel: breast, pan-cancer, none, or a gene "
        "list file.",
    ),
    add_genes: str | None = typer.Option(
        None, "--add-genes", help="More genes for the panel, comma-separated (e.g. FASN,SCD)."
    ),
    patch_um: float = typer.Option(112.0, "--patch-um", help="Patch side in µm."),
    patch_px: int | None = typer.Option(
        None,
        "--patch-px",
        help="Patch side in pixels (default 224); image pixels when a slide has no mpp.",
    ),
    sections: str | None = typer.Option(
        None, "--sections", help="Training sections, comma-separated (default all)."
    ),
    val_sections: str | None = typer.Option(
        None,
        "--val-sections",
        help="Validation sections, comma-separated (default: random 10% of spots).",
    ),
    val_fraction: float = typer.Option(
        0.1, "--val-fraction", help="Random validation fraction of spots."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    seed: int = typer.Option(0, "--seed", help="Random seed (deterministic on CPU)."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue an interrupted run (same options)."
    ),
    max_steps: int | None = typer.Option(
        None, "--max-steps", help="Stop after this many steps (tests)."
    ),
    steps_per_epoch: int | None = typer.Option(
        None, "--steps-per-epoch", help="Cap steps per epoch."
    ),
    train_backbone: str = typer.Option(
        "auto",
        "--train-backbone",
        help="auto (all on CUDA; on a CPU last or none by measured cost), all, last (last "
        "stage only) or none (frozen, cached features).",
    ),
    stain_augment: str = typer.Option(
        "auto",
        "--stain-augment",
        help="Stain jitter of training patches: auto (hed when the backbone trains), none, hed, "
        "color or hed+color.",
    ),
    context: float = typer.Option(
        0.0,
        "--context",
        help="0 = none; else a second, wider field of view of this many patch sides (e.g. 3).",
    ),
    tta: int = typer.Option(
        1, "--tta", help="Flips/rotations averaged at inference: 1, 2, 4 or 8 (in the model file)."
    ),
    feature_cache: Path | None = typer.Option(
        None, "--feature-cache", help="Folder keeping frozen backbone features across runs."
    ),
    top_k: int = typer.Option(50, "--top-k", help="Retrieval neighbours at inference."),
    model_kwargs: str | None = typer.Option(
        None, "--model-kwargs", help="Method hyper-parameters as JSON, e.g. '{\"mask_prob\": 0.3}'."
    ),
    num_workers: int | None = typer.Option(None, "--num-workers", help="Patch reading threads."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing model file."),
    as_json: bool = typer.Option(False, "--json", help="Print the result summary as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Train a model on sections with paired spatial transcriptomics and write a model file."""
    from napari_stpredict.cli._progress import Bars
    from napari_stpredict.training import train

    config = _make_config(dict(locals()))
    if genes is not None and not genes.exists():
        raise StPredictError(f"{genes}: gene list not found")

    with Bars(enabled=not quiet) as bars:

        def note(message: str) -> None:
            if not quiet:
                bars.progress.console.print(message, markup=False, highlight=False)

        result = train(
            manifest,
            config,
            out=out,
            sections=_section_list(sections),
            resume=resume,
            overwrite=overwrite,
            progress=_train_progress(bars),
            on_epoch=lambda entry: note(_epoch_line(entry)),
            log=note,
        )
    _print_summary(result, as_json=as_json)


def _make_config(options: dict):
    """The :class:`TrainConfig` of the command's options (checked, one line on bad values)."""
    from napari_stpredict.training import TrainConfig

    kwargs: dict = {}
    if options["model_kwargs"]:
        try:
            kwargs = json.loads(options["model_kwargs"])
        except json.JSONDecodeError as err:
            raise StPredictError(f"--model-kwargs: not valid JSON ({err.msg})") from None
        if not isinstance(kwargs, dict):
            raise StPredictError("--model-kwargs: expected a JSON object")
    same = [
        "method", "backbone", "pretrained", "epochs", "batch_size", "lr", "n_top_genes",
        "patch_um", "patch_px", "val_fraction", "device", "seed", "max_steps", "steps_per_epoch",
        "train_backbone", "stain_augment", "context", "tta", "top_k", "num_workers",
    ]  # fmt: skip
    genes, cache = options["genes"], options["feature_cache"]
    config = TrainConfig(
        **{k: options[k] for k in same},
        genes=str(genes) if genes is not None else None,
        val_sections=_section_list(options["val_sections"]),
        markers=options["markers"],
        add_genes=[g.strip() for g in (options["add_genes"] or "").split(",") if g.strip()] or None,
        feature_cache_dir=str(cache) if cache is not None else None,
        model_kwargs=kwargs,
    )
    config.validate()
    return config


def _epoch_line(entry: dict) -> str:
    parts = [f"epoch {entry['epoch']}", f"train loss {entry['train_loss']:.4f}"]
    if "val_loss" in entry:
        parts.append(f"val loss {entry['val_loss']:.4f}")
    if entry.get("val_pcc") is not None:
        parts.append(f"val PCC {entry['val_pcc']:.3f}")
    parts.append(f"{entry.get('patches_per_s') or 0:.1f} patches/s")
    return " · ".join(parts)


def _print_summary(result, *, as_json: bool) -> None:
    meta = result.metadata
    summary = {
        "model": str(result.model_path),
        "method": meta["method"],
        "backbone": meta["backbone"],
        "genes": len(meta["genes"]),
        "training_sections": meta["training_sections"],
        "n_bank": meta["n_bank"],
        "best_epoch": result.best_epoch,
        "resumed_from": result.resumed_from,
        "plan": result.plan,
        "markers": meta.get("markers"),
        "tumor_signature": meta.get("tumor_signature"),
        "history": result.history,
    }
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        return
    resumed = f" (resumed after epoch {result.resumed_from})" if result.resumed_from else ""
    typer.echo(
        f"wrote {result.model_path}: {summary['method']} / {summary['backbone']}, "
        f"{summary['genes']} genes, {summary['n_bank']} reference spots from "
        f"{', '.join(summary['training_sections'])}; best epoch {result.best_epoch}{resumed}"
    )
    from napari_stpredict.st.panel import marker_report

    for line in marker_report(meta):
        typer.echo(line)
