"""``stpredict train DATA.yaml --out MODEL.safetensors``: train CMRCNet or a baseline."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import typer

from napari_stpredict.cli import app
from napari_stpredict.cli._options import (
    json_object_option,
    split_commas,
    train_config,
)
from napari_stpredict.errors import StPredictError
from napari_stpredict.training.config import TrainConfig

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
    names = split_commas(value)
    if not names:
        raise StPredictError(f"section list {value!r} is empty")
    return names


#: flags that are :class:`TrainConfig` fields of the same name (``None`` = its default)
_CONFIG_FLAGS = (
    "method", "backbone", "pretrained", "epochs", "batch_size", "lr", "n_top_genes", "markers",
    "patch_um", "patch_px", "val_fraction", "device", "seed", "max_steps", "steps_per_epoch",
    "train_backbone", "stain_augment", "context", "tta", "top_k", "num_workers",
)  # fmt: skip
_TRAIN_DEFAULTS = TrainConfig()


def _default(name: str) -> dict[str, str]:
    """``show_default`` of a training flag: :class:`TrainConfig`'s value, written once there."""
    return {"show_default": str(getattr(_TRAIN_DEFAULTS, name))}


@app.command(
    "train",
    help="Train a model on sections with paired spatial transcriptomics and write a model file.",
)
def train_command(
    manifest: Path = typer.Argument(
        ..., metavar="DATA.yaml", help="Dataset manifest (see docs/datasets.md)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Model file to write (.safetensors)."),
    method: str | None = typer.Option(
        None,
        "--method",
        help="cmrc (CMRCNet), bleep, regression (ST-Net style) or ridge.",
        **_default("method"),
    ),
    backbone: str | None = typer.Option(
        None, "--backbone", help="Any timm model name.", **_default("backbone")
    ),
    pretrained: str | None = typer.Option(
        None,
        "--pretrained",
        help="auto, offline, hub, none or a weights file.",
        **_default("pretrained"),
    ),
    epochs: int | None = typer.Option(
        None, "--epochs", help="Training epochs.", **_default("epochs")
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="Spots per batch (≥ 2).", **_default("batch_size")
    ),
    lr: float | None = typer.Option(
        None, "--lr", help="Learning rate of the heads (backbone: lr × 0.1).", **_default("lr")
    ),
    genes: Path | None = typer.Option(
        None, "--genes", help="Gene list file (.txt/.csv/.tsv/.npy/.json)."
    ),
    n_top_genes: int | None = typer.Option(
        None,
        "--n-top-genes",
        help="Without --genes: top-N HVGs per section.",
        **_default("n_top_genes"),
    ),
    markers: str | None = typer.Option(
        None,
        "--markers",
        help="Marker genes always in the default panel: breast, pan-cancer, none, or a gene "
        "list file.",
        **_default("markers"),
    ),
    add_genes: str | None = typer.Option(
        None, "--add-genes", help="More genes for the panel, comma-separated (e.g. FASN,SCD)."
    ),
    patch_um: float | None = typer.Option(
        None, "--patch-um", help="Patch side in µm.", **_default("patch_um")
    ),
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
        help="Validation sections, comma-separated (default: a random fraction of spots).",
    ),
    val_fraction: float | None = typer.Option(
        None,
        "--val-fraction",
        help="Random validation fraction of spots.",
        **_default("val_fraction"),
    ),
    device: str | None = typer.Option(
        None, "--device", help="auto, cpu, cuda or mps.", **_default("device")
    ),
    seed: int | None = typer.Option(
        None, "--seed", help="Random seed (deterministic on CPU).", **_default("seed")
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue an interrupted run (same options)."
    ),
    max_steps: int | None = typer.Option(
        None, "--max-steps", help="Stop after this many steps (tests)."
    ),
    steps_per_epoch: int | None = typer.Option(
        None, "--steps-per-epoch", help="Cap steps per epoch."
    ),
    train_backbone: str | None = typer.Option(
        None,
        "--train-backbone",
        help="auto (all on CUDA; on a CPU last or none by measured cost), all, last (last "
        "stage only) or none (frozen, cached features).",
        **_default("train_backbone"),
    ),
    stain_augment: str | None = typer.Option(
        None,
        "--stain-augment",
        help="Stain jitter of training patches: auto (hed when the backbone trains), none, hed, "
        "color or hed+color.",
        **_default("stain_augment"),
    ),
    context: float | None = typer.Option(
        None,
        "--context",
        help="0 = none; else a second, wider field of view of this many patch sides (e.g. 3).",
        **_default("context"),
    ),
    tta: int | None = typer.Option(
        None,
        "--tta",
        help="Flips/rotations averaged at inference: 1, 2, 4 or 8 (in the model file).",
        **_default("tta"),
    ),
    feature_cache: Path | None = typer.Option(
        None, "--feature-cache", help="Folder keeping frozen backbone features across runs."
    ),
    top_k: int | None = typer.Option(
        None, "--top-k", help="Retrieval neighbours at inference.", **_default("top_k")
    ),
    model_kwargs: str | None = typer.Option(
        None, "--model-kwargs", help="Method hyper-parameters as JSON, e.g. '{\"mask_prob\": 0.3}'."
    ),
    num_workers: int | None = typer.Option(None, "--num-workers", help="Patch reading threads."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing model file."),
    as_json: bool = typer.Option(False, "--json", help="Print the result summary as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """``stpredict train``: options → TrainConfig → train → summary.

    Long because the typer signature lists every flag (the user's help is the command's
    ``help=``); a flag left out keeps :class:`~napari_stpredict.training.TrainConfig`'s
    default, written once, there.
    """
    config = _make_config(dict(locals()))
    if genes is not None and not genes.exists():
        raise StPredictError(f"{genes}: gene list not found")
    run = dict(sections=_section_list(sections), resume=resume, overwrite=overwrite)
    result = _train_with_bars(manifest, config, out, run, quiet=quiet)
    _print_summary(result, as_json=as_json)


def _train_with_bars(manifest: Path, config: Any, out: Path, run: dict, *, quiet: bool) -> Any:
    """:func:`~napari_stpredict.training.train` with a bar per epoch and phase, and a line per
    epoch and per note (none with ``quiet``)."""
    from napari_stpredict.cli._progress import Bars
    from napari_stpredict.training import train

    with Bars(enabled=not quiet) as bars:

        def note(message: str) -> None:
            if not quiet:
                bars.progress.console.print(message, markup=False, highlight=False)

        return train(
            manifest,
            config,
            out=out,
            **run,
            progress=_train_progress(bars),
            on_epoch=lambda entry: note(_epoch_line(entry)),
            log=note,
        )


def _make_config(options: dict) -> Any:
    """The :class:`TrainConfig` of the command's options (checked, one line on bad values)."""
    genes, cache = options["genes"], options["feature_cache"]
    config = train_config(
        {
            **{k: options[k] for k in _CONFIG_FLAGS},
            "genes": str(genes) if genes is not None else None,
            "val_sections": _section_list(options["val_sections"]),
            "add_genes": split_commas(options["add_genes"]) or None,
            "feature_cache_dir": str(cache) if cache is not None else None,
            "model_kwargs": json_object_option("--model-kwargs", options["model_kwargs"]),
        }
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
