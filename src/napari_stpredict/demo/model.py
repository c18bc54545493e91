"""The demo's model: what it trains (:class:`DemoConfig`), where it is cached, and its genes.

The training settings are a :class:`~napari_stpredict.training.TrainConfig`: the demo writes
only what it changes from ``stpredict train``'s defaults (:func:`demo_train_config`), so every
other default lives in ``training/config.py`` alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari_stpredict import __version__
from napari_stpredict.demo.dataset import (
    DEMO_SLIDE,
    DEMO_TRAIN_SECTIONS,
    cache_root,
    demo_manifest,
    file_sha256,
    required_files,
)
from napari_stpredict.errors import StPredictError
from napari_stpredict.progress import CancelToken, ProgressCallback

if TYPE_CHECKING:
    from napari_stpredict.training import TrainConfig

__all__ = [
    "DemoConfig",
    "demo_gene_panel",
    "demo_model",
    "demo_model_path",
    "demo_train_config",
    "pick_markers",
]

#: genes shown first (kept in the panel when the training sections measured them)
DEMO_MARKERS = ("ERBB2", "KRT19", "CD74", "IGKC", "COL1A1", "MUC1", "GRB7")


def demo_train_config(**changes: Any) -> TrainConfig:
    """The demo's training settings: ``stpredict train``'s defaults with the demo's changes.

    The demo trains the default method (BLEEP) with its context field on frozen, offline
    ImageNet features at 112 px for a few epochs (under a minute on 2 CPU cores). ``tta`` is
    pinned to 1: the 8 views of ``stpredict train``'s default cost 8× the feature extraction,
    and the live view on a CPU scores 1 view anyway
    (:func:`~napari_stpredict.model.predictor.live_view_tta`). ``changes`` go on top.
    """
    from napari_stpredict.training import TrainConfig

    demo = {
        "pretrained": "offline",
        "epochs": 6,
        "warmup_steps": 10,  # a short warm-up: the run is only about a hundred steps
        "n_top_genes": 200,
        "patch_px": 112,  # 112 µm at 1 µm/px keeps the CPU cost low
        "train_backbone": "none",  # frozen backbone, features computed once
        "tta": 1,
    }
    return dataclasses.replace(TrainConfig(), **{**demo, **changes})


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """What the demo trains and shows.

    The default trains for a few minutes on a laptop CPU; :meth:`quick` is a seconds-long
    smoke-test version (tests, CI) whose model is not meant to be looked at.

    Attributes
    ----------
    train_sections, slide
        Sections learnt from, and the held-out section shown.
    train
        The training settings (:func:`demo_train_config`); its ``genes`` are set by
        :func:`demo_gene_panel` when the model is trained.
    max_cells
        Cells predicted by the headless demo (``None`` = all tissue cells).
    markers
        Genes shown first; they (and the tumour signature's genes) are always in the panel
        when the training sections measured them.
    """

    train_sections: tuple[str, ...] = DEMO_TRAIN_SECTIONS
    slide: str = DEMO_SLIDE
    train: TrainConfig = dataclasses.field(default_factory=demo_train_config)
    max_cells: int | None = None
    markers: tuple[str, ...] = DEMO_MARKERS

    @classmethod
    def quick(cls) -> DemoConfig:
        """A tiny budget: two sections, a few steps, few cells (seconds on a CPU)."""
        return cls(
            train_sections=("C3",),
            train=demo_train_config(
                epochs=1, max_steps=2, batch_size=8, n_top_genes=40, patch_px=32
            ),
            max_cells=32,
        )

    def training_dict(self) -> dict[str, Any]:
        """The fields that change the trained model (part of the cache key)."""
        return {
            "train_sections": list(self.train_sections),
            "markers": list(self.markers),
            "train": self.train.to_dict(),
        }


def _data_key(data: Path, sections: Sequence[str]) -> str:
    h = hashlib.sha256()
    for f in required_files(sections, what=("counts", "spots", "image")):
        h.update(f.local.encode())
        h.update(file_sha256(data / f.local).encode())
    return h.hexdigest()


def demo_model_path(data: Path, cache_dir: Path, config: DemoConfig) -> Path:
    """Where the demo model for this data and configuration is cached."""
    key = hashlib.sha256(
        json.dumps(
            {
                "data": _data_key(data, config.train_sections),
                "config": config.training_dict(),
                "version": __version__,
            },
            sort_keys=True,
            default=str,
        ).encode()
    ).hexdigest()[:16]
    return cache_dir / "models" / f"her2st-demo-{key}.safetensors"


def demo_model(
    data: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    config: DemoConfig | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> tuple[Path, bool]:
    """The demo model file: from the cache, or trained now (CPU unless a GPU is there).

    Parameters
    ----------
    data
        The demo data folder (:func:`~napari_stpredict.demo.demo_data`).
    cache_dir
        Cache folder (default :func:`~napari_stpredict.demo.default_cache_dir`).
    config
        Training settings.
    progress, cancel
        Passed to training.

    Returns
    -------
    (path, trained)
        The model file, and whether it was trained in this call.
    """
    from napari_stpredict.training import train

    config = config or DemoConfig()
    data = Path(data)
    cache = cache_root(cache_dir)
    path = demo_model_path(data, cache, config)
    if path.is_file():
        return path, False
    manifest = demo_manifest(data, cache / "manifests" / f"{path.stem}.yaml", config.train_sections)
    train_config = dataclasses.replace(config.train, genes=demo_gene_panel(manifest, config))
    path.parent.mkdir(parents=True, exist_ok=True)
    train(manifest, train_config, out=path, progress=progress, cancel=cancel)
    if not path.is_file():
        raise StPredictError(f"{path}: training finished without writing the model file")
    return path, True


def demo_gene_panel(manifest: str | os.PathLike, config: DemoConfig) -> list[str]:
    """The demo model's genes: markers worth showing first, then highly variable genes.

    The markers (:attr:`DemoConfig.markers` and the default tumour signature) are kept when
    every training section measured them, so the heatmaps and the tumour layer of the demo
    always have something to show; the rest is the usual union of per-section highly
    variable genes (``config.train.n_top_genes`` each).
    """
    from napari_stpredict.st import read_sections
    from napari_stpredict.st.genesets import DEFAULT_TUMOR_GENES
    from napari_stpredict.st.panel import build_panel

    adatas = read_sections(manifest, check_image=False)
    panel = build_panel(
        adatas,
        markers="none",
        add_genes=[*config.markers, *DEFAULT_TUMOR_GENES],
        n_heg=0,
        n_hvg=config.train.n_top_genes,
    )
    return panel.genes


def pick_markers(genes: Sequence[str], preferred: Sequence[str], n: int = 3) -> list[str]:
    """Up to ``n`` genes to show: the preferred markers the model has, then the panel's first."""
    have = set(genes)
    out = [g for g in preferred if g in have][:n]
    for g in genes:
        if len(out) >= n:
            break
        if g not in out:
            out.append(g)
    return out
