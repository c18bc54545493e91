"""Training data: sections → panel → normalised expression, the split, and patch reading."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_stpredict.errors import DatasetError
from napari_stpredict.progress import check_cancel
from napari_stpredict.training.config import TrainConfig

__all__ = ["PatchSource", "TrainData", "prepare_data"]


@dataclass
class TrainData:
    """Sections, panel, normalised expression, the patch dataset and the train/val split."""

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
    panel: Any = None  # st.panel.Panel: the genes and what they say about the markers


def load_manifest_any(manifest):
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


def prepare_data(manifest, config: TrainConfig, sections, *, progress, cancel) -> TrainData:
    """Read and check the sections, pick the panel, normalise, split train/validation."""
    from napari_stpredict.st import Normalization

    m = load_manifest_any(manifest)
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

    panel = _select_panel(adatas, train_adatas, config, m.genes)
    genes = panel.genes
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

    train_idx, val_idx = _split(
        int(sum(a.n_obs for a in train_adatas)), expr.shape[0], config, has_val=bool(val_names)
    )
    return TrainData(
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
        spot_keys=[_spot_key(a) for a in adatas],
        panel=panel,
    )


def _select_panel(adatas, train_adatas, config: TrainConfig, manifest_genes):
    """The panel (an ``st.panel.Panel``): a given gene list, else the default panel —
    markers ∪ HEG ∪ HVG chosen by the training sections and measured in every section."""
    from napari_stpredict.st import load_gene_list, select_genes
    from napari_stpredict.st.panel import build_panel, describe_panel

    gene_source = config.genes if config.genes is not None else manifest_genes
    if gene_source is None:
        return build_panel(
            train_adatas,
            markers=config.markers,
            add_genes=config.add_genes,
            n_heg=config.n_heg_genes,
            n_hvg=config.n_top_genes,
            measured_in=adatas[len(train_adatas) :],
        )
    if config.add_genes:
        listed = (
            load_gene_list(gene_source)
            if isinstance(gene_source, str | os.PathLike)
            else list(gene_source)
        )
        gene_source = [*listed, *config.add_genes]
    genes = select_genes(adatas, gene_list=gene_source, missing=config.missing_genes)
    return describe_panel(genes, config.markers, add_genes=config.add_genes)


def _split(n_train_spots: int, n_all: int, config: TrainConfig, *, has_val: bool):
    """Training and validation item indices (validation sections, else a seeded random fraction)."""
    train_idx = np.arange(n_train_spots)
    val_idx = np.arange(n_train_spots, n_all)
    if not has_val and config.val_fraction > 0:
        rng = np.random.default_rng(config.seed)
        perm = rng.permutation(n_train_spots)
        n_val = round(n_train_spots * config.val_fraction)
        if n_val >= 2:
            val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    if len(train_idx) < 2:
        raise DatasetError(f"only {len(train_idx)} training spots: need at least 2")
    return train_idx, val_idx


def _spot_key(adata) -> str:
    """Content key of a section's image and spots (frozen-feature cache files)."""
    sec = adata.uns["stpredict"]["section"]
    xy = np.asarray(adata.obsm["spatial"])
    return hashlib.sha1(
        f"{sec}|{adata.uns['stpredict'].get('image')}|{xy.tobytes().hex()}".encode()
    ).hexdigest()


class PatchSource:
    """uint8 patches by dataset index, read ahead in threads, optionally kept in memory.

    Reads go through :meth:`napari_stpredict.st.PatchDataset.read_patches` (the engine's
    reader, :func:`napari_stpredict.slide.patches.read_patches`): identical pixels to inference.
    """

    def __init__(
        self,
        dataset,
        n: int,
        patch_px: int,
        *,
        cache: bool,
        workers: int,
        scales: tuple[float, ...] = (1.0,),
    ) -> None:
        self.dataset = dataset
        self.scales = tuple(float(s) for s in scales)
        fields = () if len(self.scales) == 1 else (len(self.scales),)
        self.cache = np.zeros((n, *fields, patch_px, patch_px, 3), np.uint8) if cache else None
        self.have = np.zeros(n, bool)
        self.pool = ThreadPoolExecutor(
            max_workers=max(1, workers), thread_name_prefix="stpredict-patch"
        )
        # batches are assembled in their own thread: a batch task waiting on read tasks in the
        # same pool could deadlock once every pool thread is such a waiting batch task
        self.batches = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stpredict-batch")

    def _read_fields(self, idx: np.ndarray) -> np.ndarray:
        reads = [self.dataset.read_patches(idx, executor=self.pool, scale=s) for s in self.scales]
        return reads[0] if len(reads) == 1 else np.stack(reads, axis=1)

    def read(self, idx: np.ndarray) -> np.ndarray:
        """uint8 ``(B, P, P, 3)`` (or ``(B, F, P, P, 3)`` with context) of items ``idx``."""
        idx = np.asarray(idx)
        if self.cache is None:
            return self._read_fields(idx)
        todo = idx[~self.have[idx]]
        if len(todo):
            todo = np.unique(todo)
            self.cache[todo] = self._read_fields(todo)
            self.have[todo] = True
        return self.cache[idx]

    def submit(self, idx: np.ndarray, transform: Callable | None = None) -> Future:
        """Start reading a batch in the background (a future of uint8 ``(B, P, P, 3)``, or of
        ``transform(patches)``, computed in the same background thread)."""
        if transform is None:
            return self.batches.submit(self.read, np.asarray(idx))
        return self.batches.submit(lambda: transform(self.read(np.asarray(idx))))

    def iterate(
        self,
        batches: Sequence[np.ndarray],
        *,
        transform: Callable | None = None,
        cancel=None,
        what: str = "training",
    ):
        """Yield ``(idx, patches)`` per batch; the next batch is read (and transformed, e.g.
        augmented) in the background while this one is used. Batches are read in order by one
        thread, so a seeded ``transform`` draws its random numbers in a fixed order."""
        fut = self.submit(batches[0], transform) if len(batches) else None
        for s, idx in enumerate(batches):
            check_cancel(cancel, what)
            cur = fut
            if s + 1 < len(batches):
                fut = self.submit(batches[s + 1], transform)
            yield idx, cur.result()

    def close(self) -> None:
        self.batches.shutdown(wait=True, cancel_futures=True)
        self.pool.shutdown(wait=True, cancel_futures=True)
