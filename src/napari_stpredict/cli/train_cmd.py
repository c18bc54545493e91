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


class _RichProgress:
    """Adapts ``progress(done, total, msg)`` to rich: one bar per epoch, one for other phases."""

    def __init__(self, progress) -> None:
        self.progress = progress
        self.epoch_tasks: dict[str, int] = {}
        self.phase_task: int | None = None
        self.phase_msg = ""

    def __call__(self, done: int, total: int | None, message: str = "") -> None:
        m = _EPOCH.match(message)
        if m:
            key = m.group(0)
            if key not in self.epoch_tasks:
                self._finish_phase()
                self.epoch_tasks[key] = self.progress.add_task(key, total=total)
            loss = message[len(key) :].strip()
            self.progress.update(
                self.epoch_tasks[key], completed=done, total=total, description=f"{key} {loss}"
            )
            return
        if self.phase_task is None or message.split(" ")[0] != self.phase_msg.split(" ")[0]:
            self._finish_phase()
            self.phase_task = self.progress.add_task(message or "working", total=total)
        self.phase_msg = message
        self.progress.update(self.phase_task, completed=done, total=total, description=message)

    def _finish_phase(self) -> None:
        if self.phase_task is not None:
            task = self.progress.tasks[self.phase_task]
            if task.total:
                self.progress.update(self.phase_task, completed=task.total)
            self.phase_task = None


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
    from napari_stpredict.training import TrainConfig, train

    kwargs_dict: dict = {}
    if model_kwargs:
        try:
            kwargs_dict = json.loads(model_kwargs)
        except json.JSONDecodeError as err:
            raise StPredictError(f"--model-kwargs: not valid JSON ({err.msg})") from None
        if not isinstance(kwargs_dict, dict):
            raise StPredictError("--model-kwargs: expected a JSON object")
    config = TrainConfig(
        method=method,
        backbone=backbone,
        pretrained=pretrained,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        genes=str(genes) if genes is not None else None,
        n_top_genes=n_top_genes,
        patch_um=patch_um,
        patch_px=patch_px,
        val_sections=_section_list(val_sections),
        val_fraction=val_fraction,
        device=device,
        seed=seed,
        max_steps=max_steps,
        steps_per_epoch=steps_per_epoch,
        train_backbone=train_backbone,
        stain_augment=stain_augment,
        context=context,
        tta=tta,
        top_k=top_k,
        num_workers=num_workers,
        feature_cache_dir=str(feature_cache) if feature_cache is not None else None,
        model_kwargs=kwargs_dict,
    )
    config.validate()
    if genes is not None and not genes.exists():
        raise StPredictError(f"{genes}: gene list not found")

    from rich.console import Console

    console = Console(stderr=True)
    lines: list[str] = []

    def on_epoch(entry: dict) -> None:
        parts = [f"epoch {entry['epoch']}", f"train loss {entry['train_loss']:.4f}"]
        if "val_loss" in entry:
            parts.append(f"val loss {entry['val_loss']:.4f}")
        if entry.get("val_pcc") is not None:
            parts.append(f"val PCC {entry['val_pcc']:.3f}")
        parts.append(f"{entry.get('patches_per_s') or 0:.1f} patches/s")
        lines.append(" · ".join(parts))
        if not quiet:
            console.print(lines[-1])

    def note(message: str) -> None:
        if not quiet:
            console.print(message, markup=False, highlight=False)

    kwargs = dict(
        out=out,
        log=note,
        sections=_section_list(sections),
        resume=resume,
        overwrite=overwrite,
        on_epoch=on_epoch,
    )
    if quiet:
        result = train(manifest, config, **kwargs)
    else:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as bar:
            result = train(manifest, config, progress=_RichProgress(bar), **kwargs)
    summary = {
        "model": str(result.model_path),
        "method": result.metadata["method"],
        "backbone": result.metadata["backbone"],
        "genes": len(result.metadata["genes"]),
        "training_sections": result.metadata["training_sections"],
        "n_bank": result.metadata["n_bank"],
        "best_epoch": result.best_epoch,
        "resumed_from": result.resumed_from,
        "plan": result.plan,
        "history": result.history,
    }
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        return
    resumed = f" (resumed after epoch {result.resumed_from})" if result.resumed_from else ""
    typer.echo(
        f"wrote {result.model_path}: {summary['method']} / {summary['backbone']}, {summary['genes']} genes, "
        f"{summary['n_bank']} reference spots from {', '.join(summary['training_sections'])}; "
        f"best epoch {result.best_epoch}{resumed}"
    )
