"""Training: a dataset manifest → a model file (CMRCNet, BLEEP or direct regression).

The loop is plain PyTorch with no hidden framework:

* data: sections are read and checked before anything trains (one-line
  :class:`~napari_stpredict.errors.DatasetError` otherwise); expression is normalised once in
  memory; image patches come from :class:`napari_stpredict.st.PatchDataset`, are read ahead in
  threads and kept in memory as uint8 after their first read when they fit (``cache``), so
  later epochs cost only the model; flips / 90° rotations are applied per batch.
* ``train_backbone``: ``all`` (fine-tune everything), ``last`` (only the backbone's last
  stage) or ``none`` (frozen backbone: its features are computed once per spot and cached, so
  an epoch costs only the heads — the CPU-budget mode used by ``stpredict evaluate``).
* every epoch ends with a validation pass (``val_sections`` or a random spot split) and a
  resumable state file next to the output (weights, optimizer, step, RNG states, history;
  safetensors + JSON, no pickle). The best epoch by validation loss is what gets saved.
* the reference bank of the model file holds the training spots only (expression embeddings +
  normalised expression + section per spot).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_stpredict.errors import DatasetError, StPredictError
from napari_stpredict.progress import CancelToken, ProgressCallback, check_cancel, report

__all__ = ["TrainConfig", "TrainResult", "state_path_for", "train"]

STATE_FORMAT = "napari-stpredict-train-state"
STATE_VERSION = 1
# Config fields a resumed run may change (the rest must match the interrupted run).
_RESUME_MUTABLE = {
    "epochs",
    "max_steps",
    "device",
    "num_workers",
    "cache",
    "cache_max_gb",
    "feature_cache_dir",
}


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in the model file's ``config``).

    Attributes
    ----------
    method
        ``"cmrc"`` (CMRCNet), ``"bleep"`` or ``"regression"`` (ST-Net style).
    backbone, pretrained
        timm name and weights (``auto|offline|hub|none|PATH``).
    epochs, batch_size, lr, weight_decay
        Optimisation (AdamW; heads at ``lr``, backbone at ``lr * backbone_lr_scale``; linear
        warm-up then cosine decay per step; gradient norm clipped at ``grad_clip``).
    genes, n_top_genes
        Gene panel: a list of names or a gene list file; else the manifest's ``genes:`` file;
        else the union of each section's top ``n_top_genes`` highly variable genes.
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
        ``all``, ``last`` or ``none`` (frozen, cached features: the CPU-budget mode).
    top_k
        Retrieval neighbours stored in the model file (the paper: 50).
    normalization
        ``{"method": "log1p_cpm", "target_sum": 1e4}`` (see :class:`napari_stpredict.st.Normalization`).
    num_workers
        Threads reading patches ahead (default: CPU count, at most 4).
    augment
        Random flips and 90° rotations of training patches (not with cached frozen features).
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

    method: str = "cmrc"
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
    patch_um: float | None = 112.0
    patch_px: int | None = None
    val_sections: list[str] | None = None
    val_fraction: float = 0.1
    device: str = "auto"
    seed: int = 0
    max_steps: int | None = None
    steps_per_epoch: int | None = None
    train_backbone: str = "all"
    top_k: int = 50
    normalization: dict[str, Any] = field(
        default_factory=lambda: {"method": "log1p_cpm", "target_sum": 1e4}
    )
    num_workers: int | None = None
    augment: bool = True
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

        if self.method not in list_methods():
            raise StPredictError(f"method={self.method!r}: choose from {', '.join(list_methods())}")
        if self.train_backbone not in ("all", "last", "none"):
            raise StPredictError(
                f"train_backbone={self.train_backbone!r}: choose all, last or none"
            )
        if self.missing_genes not in ("error", "drop"):
            raise StPredictError(f"missing_genes={self.missing_genes!r}: choose error or drop")
        if self.cache not in ("auto", "memory", "none"):
            raise StPredictError(f"cache={self.cache!r}: choose auto, memory or none")
        checks = [
            ("epochs", self.epochs, self.epochs >= 1),
            ("batch_size", self.batch_size, self.batch_size >= 2),
            ("lr", self.lr, self.lr > 0),
            ("top_k", self.top_k, self.top_k >= 1),
            ("n_top_genes", self.n_top_genes, self.n_top_genes >= 1),
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
    """

    model_path: Path
    history: list[dict[str, Any]]
    best_epoch: int
    metadata: dict[str, Any]
    resumed_from: int | None = None


def state_path_for(out: str | os.PathLike) -> Path:
    """The resumable state file kept next to ``out`` while training runs."""
    p = Path(out)
    stem = p.name[: -len(".safetensors")] if p.name.endswith(".safetensors") else p.name
    return p.with_name(f"{stem}.train-state.safetensors")


# ------------------------------------------------------------------------------------------------
# data


@dataclass
class _Data:
    genes: list[str]
    patch_um: float | None
    patch_px: int
    section_names: list[str]  # training sections, in order
    train_sections: list[str]
    val_sections: list[str]
    dataset: Any  # PatchDataset over all used sections (train + val)
    expr: np.ndarray  # (N, G) normalised expression of every dataset item
    section_index: np.ndarray  # (N,) index into all_sections
    all_sections: list[str]
    train_idx: np.ndarray
    val_idx: np.ndarray
    spot_keys: list[str] = field(default_factory=list)


def _load_manifest(manifest):
    from napari_stpredict.st import Manifest, load_manifest

    if isinstance(manifest, Manifest):
        return manifest
    return load_manifest(manifest)


_SECTION_CACHE: OrderedDict[str, Any] = OrderedDict()
_SECTION_CACHE_SIZE = 12


def _section_key(spec) -> str:
    d = spec.to_dict()
    stamps = {}
    for k, v in d.items():
        if isinstance(v, str) and k in (
            "image",
            "counts",
            "spots",
            "visium",
            "h5ad",
            "labels",
            "manifest",
        ):
            with contextlib.suppress(OSError):
                st = os.stat(v)
                stamps[k] = (st.st_mtime_ns, st.st_size)
    return json.dumps([d, stamps], sort_keys=True, default=str)


def _read_sections_cached(m, names: list[str], *, progress, cancel) -> list:
    """read_sections with a small in-process cache (cross-validation trains many times)."""
    from napari_stpredict.st import read_sections

    specs = [m.section(n) for n in names]
    keys = [_section_key(s) for s in specs]
    missing = [n for n, k in zip(names, keys, strict=True) if k not in _SECTION_CACHE]
    if missing:
        fresh = read_sections(
            m, sections=missing, require_images=True, progress=progress, cancel=cancel
        )
        for n, a in zip(missing, fresh, strict=True):
            _SECTION_CACHE[keys[names.index(n)]] = a
    out = []
    for k in keys:
        _SECTION_CACHE.move_to_end(k)
        out.append(_SECTION_CACHE[k])
    while len(_SECTION_CACHE) > _SECTION_CACHE_SIZE:
        _SECTION_CACHE.popitem(last=False)
    return out


def _resolve_patch(adatas, config: TrainConfig) -> tuple[float | None, int]:
    no_mpp = [a.uns["stpredict"]["section"] for a in adatas if not a.uns["stpredict"].get("mpp")]
    if no_mpp:
        if config.patch_px is None:
            raise DatasetError(
                f"section {no_mpp[0]!r}: the image has no pixel size (mpp); set 'mpp' or "
                "'spot_pitch_um' in the manifest, or give --patch-px"
            )
        if len(no_mpp) < len(adatas):
            warnings.warn(
                f"sections {', '.join(no_mpp)} have no pixel size: all patches are taken as "
                f"{config.patch_px} image pixels (patch_um ignored)",
                stacklevel=3,
            )
        return None, int(config.patch_px)
    return float(config.patch_um or 112.0), int(config.patch_px or 224)


def _prepare_data(manifest, config: TrainConfig, sections, *, progress, cancel) -> _Data:
    from napari_stpredict.st import Normalization, select_genes

    m = _load_manifest(manifest)
    names = list(m.names)
    val_names = list(config.val_sections or [])
    for n in [*(sections or []), *val_names]:
        if n not in names:
            raise DatasetError(f"{m.path}: no section {n!r} (sections: {', '.join(names)})")
    train_names = [n for n in (sections if sections is not None else names) if n not in val_names]
    if sections is not None and set(sections) & set(val_names):
        overlap = sorted(set(sections) & set(val_names))[0]
        raise DatasetError(f"section {overlap!r} is both a training and a validation section")
    if not train_names:
        raise DatasetError(f"{m.path}: no training sections left (all are validation sections)")
    all_names = train_names + val_names
    adatas = _read_sections_cached(m, all_names, progress=progress, cancel=cancel)
    train_adatas = adatas[: len(train_names)]

    gene_source = config.genes if config.genes is not None else m.genes
    if gene_source is not None:
        genes = select_genes(adatas, gene_list=gene_source, missing=config.missing_genes)
    else:
        genes = select_genes(adatas, n_top=config.n_top_genes)
        # val sections must not pick the panel: recompute on training sections, keep shared genes
        if val_names:
            genes = select_genes(train_adatas, n_top=config.n_top_genes)
            shared = set.intersection(*(set(a.var_names) for a in adatas))
            genes = [g for g in genes if g in shared]
            if not genes:
                raise DatasetError(
                    "no highly variable gene of the training sections is in the validation sections"
                )

    patch_um, patch_px = _resolve_patch(adatas, config)
    norm = Normalization.from_dict(config.normalization)
    from napari_stpredict.st import PatchDataset

    dataset = PatchDataset(
        adatas,
        genes,
        patch_um=patch_um if patch_um is not None else 112.0,
        patch_px=patch_px,
        augment=False,
        normalization=norm.to_dict(),
        patch_px_level0=float(patch_px) if patch_um is None else None,
        cache=False,  # training keeps its own lazily filled uint8 cache
    )
    expr = np.asarray(dataset.expression, dtype=np.float32)
    section_index = np.asarray(dataset.item_section, dtype=np.int32)
    if not np.isfinite(expr).all():
        raise DatasetError("normalised expression has NaN/infinite values (check the counts)")

    n_train_spots = int(sum(a.n_obs for a in train_adatas))
    train_idx = np.arange(n_train_spots)
    val_idx = np.arange(n_train_spots, expr.shape[0])
    if not val_names and config.val_fraction > 0:
        rng = np.random.default_rng(config.seed)
        perm = rng.permutation(n_train_spots)
        n_val = round(n_train_spots * config.val_fraction)
        if n_val >= 2:
            val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    if len(train_idx) < 2:
        raise DatasetError(f"only {len(train_idx)} training spots: need at least 2")
    keys = []
    for a in adatas:
        sec = a.uns["stpredict"]["section"]
        xy = np.asarray(a.obsm["spatial"])
        keys.append(
            hashlib.sha1(
                f"{sec}|{a.uns['stpredict'].get('image')}|{xy.tobytes().hex()}".encode()
            ).hexdigest()
        )
    return _Data(
        genes=list(genes),
        patch_um=patch_um,
        patch_px=patch_px,
        section_names=train_names,
        train_sections=train_names,
        val_sections=val_names,
        dataset=dataset,
        expr=expr,
        section_index=section_index,
        all_sections=all_names,
        train_idx=train_idx,
        val_idx=val_idx,
        spot_keys=keys,
    )


def _read_uint8(dataset, i: int) -> np.ndarray:
    """One un-augmented patch as (P, P, 3) uint8 RGB."""
    return np.asarray(dataset.read_patch(int(i)))


class _PatchSource:
    """uint8 patches by dataset index: read in threads, optionally kept in memory."""

    def __init__(self, dataset, n: int, patch_px: int, *, cache: bool, workers: int) -> None:
        self.dataset = dataset
        self.cache = np.zeros((n, patch_px, patch_px, 3), np.uint8) if cache else None
        self.have = np.zeros(n, bool)
        self.pool = ThreadPoolExecutor(
            max_workers=max(1, workers), thread_name_prefix="stpredict-patch"
        )
        self.workers = max(1, workers)
        # batches are assembled in their own thread: a batch task waiting on read tasks in the
        # same pool could deadlock once every pool thread is such a waiting batch task
        self.batches = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stpredict-batch")
        self._item_section = np.asarray(dataset.item_section)
        self._opened: set[int] = set()

    def _read_many(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), *self._shape()), np.uint8)
        todo = []
        for j, i in enumerate(idx):
            if self.cache is not None and self.have[i]:
                out[j] = self.cache[i]
            else:
                todo.append((j, int(i)))
        if todo:
            # the first read of a section opens (and may decode) its slide: do it once, serially,
            # so parallel readers do not each open the same image
            for j, i in todo[:]:
                sec = int(self._item_section[i])
                if sec not in self._opened:
                    arr = _read_uint8(self.dataset, i)
                    self._opened.add(sec)
                    out[j] = arr
                    if self.cache is not None:
                        self.cache[i] = arr
                        self.have[i] = True
                    todo.remove((j, i))
            parts = [todo[k :: self.workers] for k in range(self.workers)]
            futs = [self.pool.submit(self._read_part, p) for p in parts if p]
            for f in futs:
                for j, i, arr in f.result():
                    out[j] = arr
                    if self.cache is not None:
                        self.cache[i] = arr
                        self.have[i] = True
        return out

    def _read_part(self, part):
        return [(j, i, _read_uint8(self.dataset, i)) for j, i in part]

    def _shape(self):
        return (
            self.cache.shape[1:] if self.cache is not None else _read_uint8(self.dataset, 0).shape
        )

    def submit(self, idx: np.ndarray) -> Future:
        """Start reading a batch in the background (returns a future of uint8 (B, P, P, 3))."""
        return self.batches.submit(self._read_many, np.asarray(idx))

    def close(self) -> None:
        self.batches.shutdown(wait=True, cancel_futures=True)
        self.pool.shutdown(wait=True, cancel_futures=True)


def _normalise(batch_u8: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    from napari_stpredict.model.encoders import IMAGENET_MEAN, IMAGENET_STD

    x = batch_u8.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flip + 90° rotation per sample (the 8 symmetries of a square patch)."""
    codes = torch.randint(0, 8, (x.shape[0],), generator=gen).tolist()
    out = []
    for xi, c in zip(x, codes, strict=True):
        if c & 4:
            xi = xi.flip(-1)
        out.append(torch.rot90(xi, c & 3, dims=(-2, -1)))
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------
# frozen backbone features


class _FeatureStore:
    """Frozen-backbone features per dataset item, computed once (optionally kept on disk)."""

    def __init__(
        self,
        model,
        source: _PatchSource,
        data: _Data,
        config: TrainConfig,
        device,
        *,
        need_tokens: bool,
    ):
        self.model, self.source, self.data, self.device = model, source, data, device
        self.need_tokens = need_tokens
        self.config = config
        self.pooled: torch.Tensor | None = None
        self.tokens: torch.Tensor | None = None

    def _cache_file(self, section_i: int) -> Path | None:
        if not self.config.feature_cache_dir:
            return None
        key = json.dumps(
            [
                self.config.backbone,
                str(getattr(self.model, "pretrained_source", "")),
                self.data.patch_um,
                self.data.patch_px,
                self.data.spot_keys[section_i],
            ]
        )
        h = hashlib.sha1(key.encode()).hexdigest()[:20]
        return Path(self.config.feature_cache_dir) / f"features-{h}.safetensors"

    @torch.no_grad()
    def build(self, *, progress, cancel, amp) -> None:
        from safetensors.torch import load_file, save_file

        from napari_stpredict.io_utils import atomic_path

        n = self.data.expr.shape[0]
        enc = self.model.encoder
        enc.eval()
        pooled_parts, token_parts = [], []
        done = 0
        for s in range(len(self.data.all_sections)):
            idx = np.nonzero(self.data.section_index == s)[0]
            f = self._cache_file(s)
            if f is not None and f.is_file():
                with contextlib.suppress(Exception):
                    t = load_file(str(f))
                    if t["pooled"].shape[0] == len(idx) and (not self.need_tokens or "tokens" in t):
                        pooled_parts.append(t["pooled"])
                        if self.need_tokens:
                            token_parts.append(t["tokens"])
                        done += len(idx)
                        continue
            sec_pooled, sec_tokens = [], []
            bs = max(self.config.batch_size, 32)
            for start in range(0, len(idx), bs):
                check_cancel(cancel, "training")
                u8 = torch.from_numpy(self.source.submit(idx[start : start + bs]).result())
                x = _normalise(u8, self.device, self.device.type == "cuda")
                with amp():
                    tok, pool = enc(x)
                sec_pooled.append(pool.float().cpu())
                if self.need_tokens:
                    sec_tokens.append(tok.to(torch.float16).cpu())
                done += len(u8)
                report(progress, done, n, "extracting frozen backbone features")
            t = {"pooled": torch.cat(sec_pooled)}
            if self.need_tokens:
                t["tokens"] = torch.cat(sec_tokens)
            if f is not None:
                f.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(f) as tmp:
                    save_file(t, str(tmp))
            pooled_parts.append(t["pooled"])
            if self.need_tokens:
                token_parts.append(t["tokens"])
        self.pooled = torch.cat(pooled_parts)
        self.tokens = torch.cat(token_parts) if self.need_tokens else None
        assert self.pooled.shape[0] == n

    def get(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        ii = torch.from_numpy(np.asarray(idx))
        pooled = self.pooled[ii].to(self.device)
        if self.tokens is not None:
            tokens = self.tokens[ii].to(self.device).float()
        else:
            tokens = pooled[:, None, :]
        return tokens, pooled


# ------------------------------------------------------------------------------------------------
# state file (resume)


def _config_fingerprint(config: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in config.to_dict().items() if k not in _RESUME_MUTABLE}


def _save_state(
    path: Path, *, model, best_state, optimizer, scaler, gen, info: dict[str, Any]
) -> None:
    from safetensors.torch import save_file

    from napari_stpredict.io_utils import atomic_path

    tensors: dict[str, torch.Tensor] = {}
    # CPU tensors are written as they are (no copies): save_file only reads them
    for k, v in model.state_dict().items():
        tensors[f"model.{k}"] = v.detach().cpu().contiguous()
    if best_state is not None:
        for k, v in best_state.items():
            tensors[f"best.{k}"] = v.detach().cpu().contiguous()
    osd = optimizer.state_dict()
    opt_scalars: dict[str, dict[str, Any]] = {}
    for pid, st in osd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = val.detach().cpu().contiguous()
            else:
                opt_scalars.setdefault(str(pid), {})[key] = val
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.augment"] = gen.get_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    meta = dict(info)
    meta["optimizer"] = {"param_groups": osd["param_groups"], "scalars": opt_scalars}
    meta["scaler"] = scaler.state_dict() if scaler is not None else None
    header = {
        "format": STATE_FORMAT,
        "format_version": str(STATE_VERSION),
        "state": json.dumps(meta),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)


def _load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            if header.get("format") != STATE_FORMAT:
                raise StPredictError(f"{path}: not a napari-stpredict training state file")
            if header.get("format_version") != str(STATE_VERSION):
                raise StPredictError(
                    f"{path}: training state version {header.get('format_version')} not supported"
                )
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
        return tensors, json.loads(header["state"])
    except StPredictError:
        raise
    except Exception as err:
        raise StPredictError(
            f"{path}: corrupt training state ({str(err).splitlines()[0] if str(err) else type(err).__name__}); delete it to start over"
        ) from None


# ------------------------------------------------------------------------------------------------
# the loop


def _method_kwargs(config: TrainConfig) -> dict[str, Any]:
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


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * t))


def _pearson_per_gene(pred: np.ndarray, true: np.ndarray) -> float:
    p = pred - pred.mean(0)
    t = true - true.mean(0)
    denom = np.sqrt((p**2).sum(0) * (t**2).sum(0))
    ok = denom > 0
    if not ok.any():
        return float("nan")
    return float(((p * t).sum(0)[ok] / denom[ok]).mean())


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

    Returns
    -------
    TrainResult

    Raises
    ------
    StPredictError
        Bad options or data (before any training starts); ``Cancelled`` when cancelled.
    """
    from napari_stpredict.io_utils import check_target
    from napari_stpredict.model.checkpoint import compute_gene_stats, save_model_file
    from napari_stpredict.model.methods import build_model
    from napari_stpredict.model.predictor import amp_dtype, resolve_device

    config = config or TrainConfig()
    config.validate()
    _method_kwargs(config)
    out = Path(out)
    if out.suffix != ".safetensors":
        raise StPredictError(f"{out}: the model file must end in .safetensors")
    check_target(out, overwrite=overwrite)
    state_path = state_path_for(out)
    device = resolve_device(config.device)

    state_tensors = state_info = None
    if resume:
        if state_path.is_file():
            state_tensors, state_info = _load_state(state_path)
            old = state_info["config_fingerprint"]
            new = _config_fingerprint(config)
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if diff:
                raise StPredictError(
                    f"{state_path}: was made with a different {diff[0]} "
                    f"({old.get(diff[0])!r} vs {new.get(diff[0])!r}); use the same options or start over"
                )
        else:
            warnings.warn(
                f"--resume: no state file {state_path}; starting from scratch", stacklevel=2
            )

    data = _prepare_data(manifest, config, sections, progress=progress, cancel=cancel)
    if state_info is not None and state_info["genes"] != data.genes:
        raise StPredictError(f"{state_path}: the gene panel changed since the interrupted run")

    torch.manual_seed(config.seed)
    model = build_model(
        config.method,
        n_genes=len(data.genes),
        backbone=config.backbone,
        pretrained=config.pretrained,
        **_method_kwargs(config),
    )
    model.encoder.set_trainable(config.train_backbone)
    channels_last = device.type == "cuda"
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    adt = amp_dtype(device)

    def amp():
        return torch.autocast("cuda", dtype=adt) if adt is not None else contextlib.nullcontext()

    scaler = torch.amp.GradScaler("cuda") if adt == torch.float16 else None

    enc_params = [p for p in model.encoder.parameters() if p.requires_grad]
    enc_ids = {id(p) for p in model.encoder.parameters()}
    head_params = [p for p in model.parameters() if id(p) not in enc_ids and p.requires_grad]
    groups = [{"params": head_params, "lr": config.lr, "base_lr": config.lr}]
    if enc_params and config.backbone_lr_scale > 0:
        blr = config.lr * config.backbone_lr_scale
        groups.append({"params": enc_params, "lr": blr, "base_lr": blr})
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)

    n_items = data.expr.shape[0]
    workers = config.num_workers if config.num_workers is not None else min(4, os.cpu_count() or 1)
    patch_bytes = n_items * data.patch_px * data.patch_px * 3
    use_cache = config.cache == "memory" or (
        config.cache == "auto" and patch_bytes <= config.cache_max_gb * 2**30
    )
    frozen = config.train_backbone == "none"
    source = _PatchSource(
        data.dataset, n_items, data.patch_px, cache=use_cache and not frozen, workers=workers
    )
    gen = torch.Generator().manual_seed(config.seed)

    n_train = len(data.train_idx)
    bs = min(config.batch_size, n_train)
    steps_per_epoch = max(1, n_train // bs)
    if config.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.steps_per_epoch)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    warmup = min(config.warmup_steps, total_steps // 10)

    history: list[dict[str, Any]] = []
    best_epoch, best_val, best_state = 0, float("inf"), None
    start_epoch, global_step, resumed_from = 0, 0, None
    if state_tensors is not None:
        model.load_state_dict(
            {k[6:]: v for k, v in state_tensors.items() if k.startswith("model.")}
        )
        best = {k[5:]: v for k, v in state_tensors.items() if k.startswith("best.")}
        best_state = best or None
        opt_meta = state_info["optimizer"]
        opt_state: dict[int, dict[str, Any]] = {}
        for k, v in state_tensors.items():
            if k.startswith("optim."):
                _, pid, key = k.split(".", 2)
                opt_state.setdefault(int(pid), {})[key] = v
        for pid, sc in opt_meta["scalars"].items():
            opt_state.setdefault(int(pid), {}).update(sc)
        optimizer.load_state_dict({"state": opt_state, "param_groups": opt_meta["param_groups"]})
        if scaler is not None and state_info.get("scaler"):
            scaler.load_state_dict(state_info["scaler"])
        torch.set_rng_state(state_tensors["rng.torch"])
        gen.set_state(state_tensors["rng.augment"])
        if torch.cuda.is_available():
            cuda_states = [
                state_tensors[k] for k in sorted(state_tensors) if k.startswith("rng.cuda.")
            ]
            if len(cuda_states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda_states)
        history = list(state_info["history"])
        start_epoch = resumed_from = int(state_info["epoch"])
        global_step = int(state_info["global_step"])
        best_epoch, best_val = int(state_info["best_epoch"]), float(state_info["best_val"])

    features = None
    prev_det = torch.are_deterministic_algorithms_enabled()
    try:
        if device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        if frozen:
            features = _FeatureStore(
                model, source, data, config, device, need_tokens=config.method == "cmrc"
            )
            features.build(progress=progress, cancel=cancel, amp=amp)

        def batch_inputs(idx: np.ndarray, fut: Future | None, *, train_mode: bool):
            expr = torch.from_numpy(data.expr[idx]).to(device)
            if features is not None:
                tokens, pooled = features.get(idx)
                return ("features", tokens, pooled), expr
            u8 = torch.from_numpy(fut.result())
            if train_mode and config.augment:
                u8 = _augment(u8.permute(0, 3, 1, 2), gen).permute(0, 2, 3, 1)
            return ("images", _normalise(u8, device, channels_last)), expr

        def run_loss(inputs, expr):
            with amp():
                if inputs[0] == "features":
                    return model.loss_from_features(inputs[1], inputs[2], expr)
                return model.loss(inputs[1], expr)

        for epoch in range(start_epoch, config.epochs):
            if global_step >= total_steps:
                break
            t0 = time.perf_counter()
            model.train()
            order = data.train_idx[
                torch.randperm(
                    n_train, generator=torch.Generator().manual_seed(config.seed * 100003 + epoch)
                ).numpy()
            ]
            steps = min(steps_per_epoch, total_steps - global_step)
            batches = [order[i * bs : (i + 1) * bs] for i in range(steps)]
            sums: dict[str, float] = {}
            fut = source.submit(batches[0]) if features is None else None
            seen = 0
            for s, idx in enumerate(batches):
                check_cancel(cancel, "training")
                cur = fut
                if features is None and s + 1 < len(batches):
                    fut = source.submit(batches[s + 1])
                inputs, expr = batch_inputs(idx, cur, train_mode=True)
                factor = _lr_factor(global_step, total_steps, warmup)
                for g in optimizer.param_groups:
                    g["lr"] = g["base_lr"] * factor
                losses = run_loss(inputs, expr)
                loss = losses["loss"]
                if not torch.isfinite(loss):
                    raise StPredictError(
                        f"epoch {epoch + 1} step {s + 1}: loss is {float(loss)} (try a lower --lr)"
                    )
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                else:
                    loss.backward()
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(
                        [p for g in optimizer.param_groups for p in g["params"]], config.grad_clip
                    )
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                global_step += 1
                seen += len(idx)
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                report(
                    progress,
                    s + 1,
                    steps,
                    f"epoch {epoch + 1}/{config.epochs} loss {sums['loss'] / (s + 1):.4f}",
                )
            train_seconds = time.perf_counter() - t0
            entry: dict[str, Any] = {
                "epoch": epoch + 1,
                "steps": steps,
                "global_step": global_step,
                "lr": optimizer.param_groups[0]["lr"],
            }
            entry.update(
                {f"train_{k}" if k != "loss" else "train_loss": v / steps for k, v in sums.items()}
            )
            entry.update(
                _validate(
                    model, data, source, features, batch_inputs, run_loss, bs, cancel, config.top_k
                )
            )
            entry["seconds"] = round(time.perf_counter() - t0, 3)
            entry["patches_per_s"] = round(seen / train_seconds, 2) if train_seconds > 0 else None
            score = entry.get("val_loss", entry["train_loss"])
            if score < best_val or best_state is None:
                best_val, best_epoch = score, epoch + 1
                # a frozen backbone never changes: the snapshot keeps the trained part only
                best_state = {
                    k: v.detach().cpu().clone()
                    for k, v in model.state_dict().items()
                    if not (frozen and k.startswith("encoder."))
                }
            history.append(entry)
            _save_state(
                state_path,
                model=model,
                best_state=best_state,
                optimizer=optimizer,
                scaler=scaler,
                gen=gen,
                info={
                    "epoch": epoch + 1,
                    "global_step": global_step,
                    "history": history,
                    "best_epoch": best_epoch,
                    "best_val": best_val,
                    "genes": data.genes,
                    "config_fingerprint": _config_fingerprint(config),
                },
            )
            if on_epoch is not None:
                on_epoch(entry)

        if best_state is not None:
            model.load_state_dict(best_state, strict=not frozen)
        model.eval()
        check_cancel(cancel, "training")
        report(progress, 0, 1, "building reference bank")
        tr = data.train_idx
        bank_expr = data.expr[tr]
        bank_emb = None
        if model.retrieval:
            with torch.no_grad():
                parts = [
                    model.encode_expr(torch.from_numpy(bank_expr[i : i + 4096]).to(device))
                    .float()
                    .cpu()
                    for i in range(0, len(tr), 4096)
                ]
            bank_emb = torch.cat(parts)
        report(progress, 1, 1, "building reference bank")
        train_sec_index = data.section_index[tr]
        metadata = {
            "genes": data.genes,
            "normalization": dict(config.normalization),
            "patch_um": data.patch_um,
            "patch_px": data.patch_px,
            # sections without a pixel size: patches are this many image pixels, unresampled
            "patch_px_level0": float(data.patch_px) if data.patch_um is None else None,
            "top_k": config.top_k,
            "training_sections": data.train_sections,
            "validation_sections": data.val_sections,
            "bank_sections": data.all_sections,
            "gene_stats": compute_gene_stats(bank_expr),
            "pretrained": str(config.pretrained)
            if model.pretrained_source == "none" and config.pretrained == "none"
            else model.pretrained_source,
            "metrics": {
                "best_epoch": best_epoch,
                "best_val_loss": best_val if math.isfinite(best_val) else None,
                "epochs_run": len(history),
                "steps": global_step,
                "n_train_spots": len(data.train_idx),
                "n_val_spots": len(data.val_idx),
                **(
                    {
                        k: v
                        for k, v in history[best_epoch - 1].items()
                        if k.startswith(("val_", "train_"))
                    }
                    if history and best_epoch
                    else {}
                ),
            },
            "history": history,
            "config": config.to_dict(),
        }
        if model.retrieval and min(config.top_k, len(tr)) < config.top_k:
            warnings.warn(
                f"top_k={config.top_k} exceeds the {len(tr)} bank spots; all are used", stacklevel=2
            )
        model_cpu = model.to("cpu").to(memory_format=torch.contiguous_format)
        save_model_file(
            out,
            model_cpu,
            bank_embeddings=bank_emb,
            bank_expression=bank_expr if model.retrieval else None,
            bank_section_index=train_sec_index,
            metadata=metadata,
            overwrite=overwrite or resume,
        )
        with contextlib.suppress(FileNotFoundError):
            state_path.unlink()
        from napari_stpredict.model.checkpoint import load_model_file

        meta = load_model_file(out, verify=False).metadata
        return TrainResult(
            model_path=out,
            history=history,
            best_epoch=best_epoch,
            metadata=meta,
            resumed_from=resumed_from,
        )
    finally:
        source.close()
        with contextlib.suppress(Exception):
            data.dataset.close()  # decoded JPEG/PNG sections can be large
        torch.use_deterministic_algorithms(prev_det)


@torch.no_grad()
def _validate(
    model, data: _Data, source, features, batch_inputs, run_loss, bs: int, cancel, top_k: int = 50
) -> dict[str, Any]:
    """Validation losses (eval mode: no masking, no dropout) and mean per-gene Pearson r."""
    if len(data.val_idx) == 0:
        return {}
    model.eval()
    sums: dict[str, float] = {}
    n_batches = 0
    preds = []
    vbs = max(2, bs)
    batches = [data.val_idx[i : i + vbs] for i in range(0, len(data.val_idx), vbs)]
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches[-2] = np.concatenate([batches[-2], batches[-1]])
        batches.pop()
    fut = source.submit(batches[0]) if features is None else None
    for s, idx in enumerate(batches):
        check_cancel(cancel, "training")
        cur = fut
        if features is None and s + 1 < len(batches):
            fut = source.submit(batches[s + 1])
        inputs, expr = batch_inputs(idx, cur, train_mode=False)
        losses = run_loss(inputs, expr)
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n_batches += 1
        if inputs[0] == "features":
            preds.append(model.image_from_features(inputs[1], inputs[2]).float().cpu())
        else:
            preds.append(model.encode_image(inputs[1]).float().cpu())
    out = {f"val_{k}" if k != "loss" else "val_loss": v / n_batches for k, v in sums.items()}
    emb = torch.cat(preds)
    true = data.expr[data.val_idx]
    if model.retrieval:
        from napari_stpredict.model.retrieval import topk_mean_expression

        bank_expr = torch.from_numpy(data.expr[data.train_idx])
        dev = next(model.parameters()).device
        bank_emb = torch.cat(
            [
                model.encode_expr(bank_expr[i : i + 4096].to(dev)).float().cpu()
                for i in range(0, len(bank_expr), 4096)
            ]
        )
        pred = topk_mean_expression(emb, bank_emb, bank_expr, k=top_k).numpy()
    else:
        pred = emb.numpy()
    out["val_pcc"] = _pearson_per_gene(pred, true)
    out["val_mse"] = float(((pred - true) ** 2).mean())
    model.train()
    return out
