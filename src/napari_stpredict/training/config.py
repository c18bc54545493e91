"""The options of a training run (:class:`TrainConfig`) and its result (:class:`TrainResult`)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_stpredict.errors import StPredictError

__all__ = ["RESUME_MUTABLE", "TRAIN_BACKBONE_MODES", "TrainConfig", "TrainResult", "method_kwargs"]

TRAIN_BACKBONE_MODES = ("auto", "all", "last", "none")
# Config fields a resumed run may change (the rest must match the interrupted run).
RESUME_MUTABLE = frozenset(
    {"epochs", "max_steps", "device", "num_workers", "cache", "cache_max_gb", "feature_cache_dir"}
)


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in the model file's ``config``).

    Attributes
    ----------
    method
        ``"bleep"`` (default), ``"cmrc"`` (CMRCNet), ``"regression"`` (ST-Net style) or
        ``"ridge"``. The default is the method that measured best on held-out HER2ST sections
        with the default TTA and context (docs/benchmarks.md, section evaluation: BLEEP 0.190,
        ridge 0.184, CMRCNet 0.174 PCC HEG@50; CMRCNet and BLEEP tie across patients and on
        the mouse olfactory bulb) and trains its heads ~100× faster than CMRCNet.
    backbone, pretrained
        timm name and weights (``auto|offline|hub|none|PATH``).
    epochs, batch_size, lr, weight_decay
        Optimisation (AdamW; heads at ``lr``, backbone at ``lr * backbone_lr_scale``; linear
        warm-up then cosine decay per step; gradient norm clipped at ``grad_clip``).
    genes, n_top_genes
        Gene panel: a list of names or a gene list file; else the manifest's ``genes:`` file;
        else the default panel (:func:`napari_stpredict.st.panel.build_panel`): the markers
        ∪ the top ``n_heg_genes`` highly expressed genes ∪ the union of each training section's
        top ``n_top_genes`` highly variable genes, each measured in every section.
    markers, add_genes, n_heg_genes
        Marker set of the default panel (``breast``, ``pan-cancer``, ``none`` or a gene list
        file; its tumour signature comes with it), extra genes (also added to a given list),
        and the number of highly expressed genes (0 = none).
    missing_genes
        Genes of the list not measured in every section: ``"error"`` (default) or ``"drop"``.
    patch_um, patch_px
        Patch side in µm and in pixels (default 112 µm → 224 px). Without a pixel size for a
        section's image, ``patch_px`` must be given and patches are ``patch_px`` image pixels.
    val_sections, val_fraction
        Validation sections, or else a random fraction of the training spots.
    device
        ``auto|cpu|cuda|mps``; AMP (bf16/fp16) and channels-last on CUDA.
    seed
        Seeds the split, data order, augmentation and initialisation (deterministic on CPU).
    max_steps, steps_per_epoch
        Caps for tests and quick runs (total optimizer steps; steps in one epoch).
    train_backbone
        ``auto`` (default: ``all`` on CUDA; on a CPU/MPS ``last`` when its measured cost fits
        :data:`AUTO_BUDGET_S`, else ``none``; see :mod:`napari_stpredict.training.auto`),
        ``all``, ``last`` or ``none`` (frozen, cached features: the CPU-budget mode).
    top_k
        Retrieval neighbours stored in the model file (the paper: 50).
    normalization
        ``{"method": "log1p_cpm", "target_sum": 1e4}`` (see :class:`napari_stpredict.st.Normalization`).
    num_workers
        Threads reading patches ahead (default: CPU count, at most 4).
    augment
        Random flips and 90° rotations of training patches (not with cached frozen features).
    stain_augment, stain_strength
        Stain jitter of training patches (:func:`napari_stpredict.model.preprocess.augment`):
        ``auto`` (``hed`` when the backbone trains, ``none`` when it is frozen), ``none``,
        ``hed``, ``color`` or ``hed+color``; ``stain_strength`` scales its amplitude. Drawn from
        the seeded augmentation generator, so runs repeat exactly.
    context
        ``0`` (none) or the side of a second, wider field of view around each spot as a
        multiple of ``patch_um`` (default ``3``), resampled to ``patch_px`` and encoded by the
        same backbone (see :class:`~napari_stpredict.model.preprocess.InputSpec`): 2× the
        backbone passes per tile.
    tta
        Symmetries averaged at inference (1, 2, 4 or default 8), recorded in the model file;
        each is one more backbone pass per field (8 with context = 16 passes per tile). With a
        frozen backbone the training features are averaged over the same views. ``predict``
        and ``evaluate`` use the file's value; the live view on a CPU uses 1
        (:func:`~napari_stpredict.model.predictor.live_view_tta`).
    cache, cache_max_gb
        ``auto`` keeps uint8 patches in memory when they fit in ``cache_max_gb``; ``memory``
        always; ``none`` never.
    feature_cache_dir
        With ``train_backbone="none"``: a folder where frozen backbone features are kept
        across runs (keyed by backbone, weights, patch geometry, image and spots), so several
        methods / folds on the same data extract them once.
    model_kwargs
        Method hyper-parameters (``proj_dim``, ``temperature``, ``mask_prob``,
        ``n_gene_tokens``, ``fusion_depth``, ...).
    """

    method: str = "bleep"
    backbone: str = "tf_efficientnet_lite0"
    pretrained: str = "auto"
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    backbone_lr_scale: float = 0.1
    weight_decay: float = 1e-3
    warmup_steps: int = 100
    grad_clip: float = 1.0
    genes: list[str] | str | None = None
    n_top_genes: int = 1000
    missing_genes: str = "error"
    markers: str = "breast"
    add_genes: list[str] | None = None
    n_heg_genes: int = 250
    patch_um: float | None = 112.0
    patch_px: int | None = None
    val_sections: list[str] | None = None
    val_fraction: float = 0.1
    device: str = "auto"
    seed: int = 0
    max_steps: int | None = None
    steps_per_epoch: int | None = None
    train_backbone: str = "auto"
    top_k: int = 50
    normalization: dict[str, Any] = field(
        default_factory=lambda: {"method": "log1p_cpm", "target_sum": 1e4}
    )
    num_workers: int | None = None
    augment: bool = True
    stain_augment: str = "auto"
    stain_strength: float = 1.0
    context: float = 3.0
    tta: int = 8
    cache: str = "auto"
    cache_max_gb: float = 4.0
    feature_cache_dir: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable copy."""
        d = dataclasses.asdict(self)
        if isinstance(d["genes"], os.PathLike):
            d["genes"] = str(d["genes"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict` (unknown keys are refused)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise StPredictError(f"training config: unknown option {sorted(unknown)[0]!r}")
        return cls(**d)

    def validate(self) -> None:
        """Raise :class:`StPredictError` naming the first bad value."""
        from napari_stpredict.model.methods import list_methods
        from napari_stpredict.model.preprocess import STAIN_AUGMENTS

        if self.method not in list_methods():
            raise StPredictError(f"method={self.method!r}: choose from {', '.join(list_methods())}")
        if self.train_backbone not in TRAIN_BACKBONE_MODES:
            raise StPredictError(
                f"train_backbone={self.train_backbone!r}: choose auto, all, last or none"
            )
        if self.stain_augment not in ("auto", *STAIN_AUGMENTS):
            raise StPredictError(
                f"stain_augment={self.stain_augment!r}: choose auto, {', '.join(STAIN_AUGMENTS)}"
            )
        if self.missing_genes not in ("error", "drop"):
            raise StPredictError(f"missing_genes={self.missing_genes!r}: choose error or drop")
        from napari_stpredict.st.genesets import marker_set

        marker_set(self.markers)  # a known name or an existing gene list file, else one line
        if self.cache not in ("auto", "memory", "none"):
            raise StPredictError(f"cache={self.cache!r}: choose auto, memory or none")
        checks = [
            ("epochs", self.epochs, self.epochs >= 1),
            ("batch_size", self.batch_size, self.batch_size >= 2),
            ("lr", self.lr, self.lr > 0),
            ("top_k", self.top_k, self.top_k >= 1),
            ("n_top_genes", self.n_top_genes, self.n_top_genes >= 1),
            ("n_heg_genes", self.n_heg_genes, self.n_heg_genes >= 0),
            ("val_fraction", self.val_fraction, 0.0 <= self.val_fraction < 1.0),
            ("patch_um", self.patch_um, self.patch_um is None or self.patch_um > 0),
            ("patch_px", self.patch_px, self.patch_px is None or self.patch_px >= 16),
            ("max_steps", self.max_steps, self.max_steps is None or self.max_steps >= 1),
            (
                "steps_per_epoch",
                self.steps_per_epoch,
                self.steps_per_epoch is None or self.steps_per_epoch >= 1,
            ),
            ("backbone_lr_scale", self.backbone_lr_scale, self.backbone_lr_scale >= 0),
            ("stain_strength", self.stain_strength, 0 <= self.stain_strength <= 4),
            ("context", self.context, self.context == 0 or self.context > 1),
            ("tta", self.tta, self.tta in (1, 2, 4, 8)),
        ]
        for name, value, ok in checks:
            if not ok:
                raise StPredictError(f"{name}={value!r}: out of range")


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes
    ----------
    model_path
        The written model file.
    history
        One dict per epoch (``epoch``, ``steps``, ``train_loss``, ``train_<part>``,
        ``val_loss``, ``val_<part>``, ``val_pcc``, ``lr``, ``seconds``, ``patches_per_s``).
    best_epoch
        The epoch (1-based) whose weights were saved.
    metadata
        The model file's metadata.
    resumed_from
        The epoch a resumed run started after, else ``None``.
    plan
        What ``auto`` options became and why (``train_backbone``, ``reason``,
        ``stain_augment``, ``est_epoch_s``).
    """

    model_path: Path
    history: list[dict[str, Any]]
    best_epoch: int
    metadata: dict[str, Any]
    resumed_from: int | None = None
    plan: dict[str, Any] = field(default_factory=dict)


def method_kwargs(config: TrainConfig) -> dict[str, Any]:
    """``model_kwargs`` this method accepts; keys only other methods know are left out, so one
    config can train every method (cross-validation); keys no method knows are an error."""
    from napari_stpredict.model.methods import list_methods, method_hparams

    known = set().union(*(method_hparams(m) for m in list_methods()))
    unknown = sorted(set(config.model_kwargs) - known)
    if unknown:
        raise StPredictError(
            f"model_kwargs: unknown hyper-parameter {unknown[0]!r} (known: {', '.join(sorted(known))})"
        )
    mine = method_hparams(config.method)
    return {k: v for k, v in config.model_kwargs.items() if k in mine}
