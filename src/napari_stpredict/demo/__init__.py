"""The one-command demo: a public dataset, a small model trained on it, predictions on a slide.

``stpredict demo`` needs nothing but an internet connection the first time:

1. :func:`demo_data` fetches a few sections of the HER2ST breast cancer study (Andersson et al.,
   Nat. Commun. 2021) from the authors' GitHub repository ``almaan/her2st``: count tables, spot
   tables and full-resolution H&E images (about 19 MB). Every file is pinned by commit and
   SHA-256 with :mod:`pooch`, so what is trained on is exactly what was checked. ``data_dir``
   points at a local copy with the same layout instead (no network).
2. :func:`demo_model` trains a small BLEEP model (the default method) on the training sections on the CPU, starting from
   the offline ImageNet EfficientNet-Lite0 (minutes), and caches the model file under a key
   made of the data's hashes and the training configuration, so the next run starts at once.
3. The held-out section (C2) is the slide shown (:func:`run_demo` predicts its tissue headless;
   ``stpredict demo`` without ``--no-viewer`` opens napari with live heatmaps instead).

=====================  =========================================================================
:mod:`.dataset`        the pinned HER2ST files, local copy or download, manifest, µm per pixel
:mod:`.model`          :class:`DemoConfig` (a :class:`~napari_stpredict.training.TrainConfig`
                       with the demo's changes), the model cache, the gene panel, markers
:mod:`.run`            :func:`prepare_demo` (data + model), :func:`run_demo` (headless)
=====================  =========================================================================

Nothing here imports Qt or napari (the viewer lives in ``cli/demo_cmd.py``).
"""

from __future__ import annotations

from napari_stpredict.demo.dataset import (
    DATA_ENV,
    DEMO_SLIDE,
    DEMO_TRAIN_SECTIONS,
    HER2ST_FILES,
    HER2ST_REPO,
    HER2ST_URL,
    MIRROR_ENV,
    SPOT_PITCH_UM,
    RemoteFile,
    cache_root,
    default_cache_dir,
    demo_data,
    demo_manifest,
    find_local_data,
    section_mpp,
)
from napari_stpredict.demo.model import (
    DemoConfig,
    demo_gene_panel,
    demo_model,
    demo_model_path,
    demo_train_config,
    pick_markers,
)
from napari_stpredict.demo.run import (
    DemoInputs,
    genes_to_show,
    model_genes,
    prepare_demo,
    run_demo,
)

__all__ = [
    "DATA_ENV",
    "DEMO_SLIDE",
    "DEMO_TRAIN_SECTIONS",
    "HER2ST_FILES",
    "HER2ST_REPO",
    "HER2ST_URL",
    "MIRROR_ENV",
    "SPOT_PITCH_UM",
    "DemoConfig",
    "DemoInputs",
    "RemoteFile",
    "cache_root",
    "default_cache_dir",
    "demo_data",
    "demo_gene_panel",
    "demo_manifest",
    "demo_model",
    "demo_model_path",
    "demo_train_config",
    "find_local_data",
    "genes_to_show",
    "model_genes",
    "pick_markers",
    "prepare_demo",
    "run_demo",
    "section_mpp",
]
