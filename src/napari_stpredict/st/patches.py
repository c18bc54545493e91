"""Training patches: one image crop of fixed physical size per spot, paired with its expression.

Crops are read with :func:`napari_stpredict.slide.patches.read_patches` — bit-identical to
:meth:`napari_stpredict.slide.Slide.read_resampled`, the call the inference engine makes — so a
model sees identical pixels in training and in napari; they become encoder input only through
:func:`napari_stpredict.model.preprocess.encoder_input`. Slides are opened lazily in each
process (no file handle is pickled). Small datasets are read once into memory
(:meth:`PatchDataset.preload`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import Dataset

from napari_stpredict.errors import DatasetError, StPredictError
from napari_stpredict.progress import CancelToken, ProgressCallback, check_cancel, report
from napari_stpredict.st.normalization import Normalization, library_size

#: Datasets whose crops fit in this many bytes are cached in memory by default.
DEFAULT_CACHE_BYTES = 1 << 30
#: Decoded slide tiles kept per section while reading (see :class:`~napari_stpredict.slide.patches.TileCache`).
TILE_CACHE_BYTES = 32 * 2**20


def spot_rect(x: float, y: float, size: float) -> tuple[float, float, float, float]:
    """Level-0 rectangle ``(y0, x0, h, w)`` of side ``size`` centred on the spot ``(x, y)``."""
    half = size / 2.0
    return (y - half, x - half, size, size)


def _check_arguments(
    adatas: Sequence,
    genes: Sequence[str],
    patch_um: float,
    patch_px: int,
    patch_px_level0: float | None,
) -> None:
    """Refuse an empty dataset or panel and non-positive patch sizes."""
    if not adatas:
        raise DatasetError("no sections given to the patch dataset")
    if not genes:
        raise DatasetError("empty gene panel")
    if not (patch_um > 0 and int(patch_px) > 0):
        raise DatasetError(
            f"patch size must be positive (patch_um={patch_um}, patch_px={patch_px})"
        )
    if patch_px_level0 is not None and not patch_px_level0 > 0:
        raise DatasetError(f"patch_px_level0 must be positive, got {patch_px_level0}")


def _crop_geometry(
    name: str, meta: Mapping[str, Any], patch_um: float, patch_px_level0: float | None
) -> tuple[Any, float | None, float]:
    """``(image, mpp, crop side in level-0 px)`` of a section (``uns["stpredict"]`` = ``meta``).

    The side is ``patch_um / mpp``, or ``patch_px_level0`` for a section without an mpp.
    """
    image = meta.get("image")
    if not image:
        raise DatasetError(
            f"section {name!r}: no image, so no patches can be cut (give 'image' in the manifest; "
            "sections without one serve measured-expression work only)"
        )
    mpp = meta.get("mpp")
    if mpp:
        return image, float(mpp), patch_um / float(mpp)
    if patch_px_level0 is not None:
        return image, None, float(patch_px_level0)
    raise DatasetError(
        f"section {name!r}: image {image} has no pixel size (mpp): set mpp or spot_pitch_um "
        "in the manifest, or give the patch size in image pixels (patch_px_level0 / --patch-px)"
    )


def _panel_expression(
    adata: Any, name: str, genes: list[str], normalization: Normalization
) -> np.ndarray:
    """The section's panel genes, normalized with library sizes over all its genes."""
    pos = adata.var_names.get_indexer(genes)
    if (pos < 0).any():
        miss = [g for g, p in zip(genes, pos, strict=True) if p < 0]
        raise DatasetError(
            f"section {name!r}: {len(miss)} of {len(genes)} panel genes are not measured "
            f"({', '.join(miss[:5])}{', …' if len(miss) > 5 else ''})"
        )
    X = sp.csr_matrix(adata.X)
    return normalization(X[:, pos], library_size=library_size(X))


class PatchDataset(Dataset):
    """Spot-centred H&E crops with their normalized expression, for training.

    Parameters
    ----------
    adatas
        Sections from :func:`~napari_stpredict.st.read_sections` (each with an image).
    genes
        The gene panel (every gene must be in every section).
    patch_um
        Side of a crop in micrometres (default 112 µm, the paper's 224 px at 0.5 µm/px).
    patch_px
        Side of the returned crop in pixels (default 224).
    augment
        Random flips and 90° rotations (the 8 symmetries of the square, uniformly, from torch's
        global RNG) in :meth:`__getitem__`.
    normalization
        :class:`~napari_stpredict.st.genes.Normalization`, its dict, or a method name
        (default ``log1p_cpm`` with target sum 10⁴). Library sizes are over all genes.
    patch_px_level0
        Crop side in image pixels for sections whose mpp is unknown (``--patch-px``); ignored
        for sections with an mpp.
    cache
        Keep every crop in memory after :meth:`preload` (``None``: only when they fit in
        ``DEFAULT_CACHE_BYTES``).
    input_spec
        The :class:`~napari_stpredict.model.preprocess.InputSpec` of :meth:`__getitem__`'s
        ``image`` (default: this geometry with ImageNet mean/std).

    Items are dicts: ``image`` float32 ``(3, P, P)`` (:func:`~napari_stpredict.model.
    preprocess.encoder_input` of the crop), ``expr`` float32 ``(G,)``, ``section`` (name),
    ``index`` (position in this dataset; see :attr:`spot_names` / :attr:`item_sections`).
    Training itself reads uint8 crops (:meth:`read_patches`).

    Raises
    ------
    DatasetError
        A section without an image, without mpp and no ``patch_px_level0``, or missing a gene.
    """

    def __init__(
        self,
        adatas: Sequence,
        genes: Sequence[str],
        *,
        patch_um: float = 112.0,
        patch_px: int = 224,
        augment: bool = False,
        normalization: Normalization | Mapping[str, Any] | str | None = None,
        patch_px_level0: float | None = None,
        cache: bool | None = None,
        input_spec: Any = None,
    ) -> None:
        _check_arguments(adatas, genes, patch_um, patch_px, patch_px_level0)
        self.genes = [str(g) for g in genes]
        self.patch_um = float(patch_um)
        self.patch_px = int(patch_px)
        self.augment = bool(augment)
        self.normalization = Normalization.from_dict(normalization)

        self.section_names: list[str] = []
        self.images: list[str] = []
        self.mpps: list[float | None] = []
        self.patch_size_px: list[float] = []  # crop side in each section's level-0 px
        exprs, sec_idx, centers, names = [], [], [], []
        for k, a in enumerate(adatas):
            meta = a.uns.get("stpredict", {})
            name = str(meta.get("section", f"section{k}"))
            image, mpp, size = _crop_geometry(name, meta, self.patch_um, patch_px_level0)
            exprs.append(_panel_expression(a, name, self.genes, self.normalization))
            sec_idx.append(np.full(a.n_obs, k, dtype=np.int32))
            centers.append(np.asarray(a.obsm["spatial"], dtype=np.float64)[:, :2])
            names.extend(f"{name}:{s}" for s in a.obs_names)
            self.section_names.append(name)
            self.images.append(str(image))
            self.mpps.append(mpp)
            self.patch_size_px.append(size)
        self.expression: np.ndarray = np.concatenate(exprs).astype(np.float32)
        self.item_section: np.ndarray = np.concatenate(sec_idx)
        self.centers: np.ndarray = np.concatenate(centers)
        self.spot_names: list[str] = names

        nbytes = len(self) * self.patch_px * self.patch_px * 3
        self.cache = (nbytes <= DEFAULT_CACHE_BYTES) if cache is None else bool(cache)
        if input_spec is None:
            from napari_stpredict.model.preprocess import InputSpec

            input_spec = InputSpec(self.patch_um, self.patch_px)
        self.input_spec = input_spec
        self._patches: np.ndarray | None = None
        self._slides: dict[int, Any] = {}
        self._tiles: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._slides_pid = os.getpid()

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return int(self.expression.shape[0])

    @property
    def n_genes(self) -> int:
        """Number of genes in the panel."""
        return len(self.genes)

    @property
    def item_sections(self) -> list[str]:
        """Section name of every item, in dataset order."""
        return [self.section_names[k] for k in self.item_section]

    @property
    def preloaded(self) -> bool:
        """Whether every crop is in memory."""
        return self._patches is not None

    def config(self) -> dict[str, Any]:
        """JSON-able patch settings (for the model file)."""
        return {
            "patch_um": self.patch_um,
            "patch_px": self.patch_px,
            "normalization": self.normalization.to_dict(),
            "image_normalization": {
                "mean": list(self.input_spec.mean),
                "std": list(self.input_spec.std),
            },
        }

    # ------------------------------------------------------------------ pixels
    def _slide(self, k: int):
        from napari_stpredict.slide import open_slide

        with self._lock:  # one open (and decode) per slide, whichever thread asks first
            if os.getpid() != self._slides_pid:  # a forked worker: never share parent handles
                self._slides, self._tiles = {}, {}
                self._slides_pid = os.getpid()
            slide = self._slides.get(k)
            if slide is None:
                try:
                    slide = open_slide(self.images[k])
                except StPredictError as e:
                    raise DatasetError(f"section {self.section_names[k]!r}: {e}") from None
                self._slides[k] = slide
            return slide

    def _tile_cache(self, k: int):
        from napari_stpredict.slide.patches import TileCache

        slide = self._slide(k)
        with self._lock:
            cache = self._tiles.get(k)
            if cache is None:
                cache = self._tiles[k] = TileCache(slide, max_bytes=TILE_CACHE_BYTES)
            return cache

    def read_patches(
        self,
        indices: Sequence[int] | np.ndarray,
        *,
        executor: Executor | None = None,
        scale: float = 1.0,
    ) -> np.ndarray:
        """Un-augmented crops of items ``indices`` as ``(n, P, P, 3)`` uint8 (cache or slide).

        Read per section with :func:`napari_stpredict.slide.patches.read_patches` (the
        engine's reader: bit-identical to ``Slide.read_resampled``), in ``executor``'s threads.
        ``scale`` > 1 reads a wider field of view around the same centre (context), still
        ``P`` pixels a side.
        """
        from napari_stpredict.slide.patches import read_patches

        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if self._patches is not None and scale == 1.0:
            return self._patches[idx]
        out = np.empty((len(idx), self.patch_px, self.patch_px, 3), np.uint8)
        secs = self.item_section[idx]
        for k in np.unique(secs):
            sel = np.nonzero(secs == k)[0]
            out[sel] = read_patches(
                self._slide(int(k)),
                self.centers[idx[sel]],
                self.patch_size_px[int(k)] * float(scale),
                self.patch_px,
                executor=executor,
                cache=self._tile_cache(int(k)),
            )
        return out

    def read_patch(self, i: int) -> np.ndarray:
        """The un-augmented crop of item ``i`` as ``(P, P, 3)`` uint8, from cache or slide."""
        return self.read_patches([int(i)])[0]

    def preload(
        self,
        *,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> None:
        """Read every crop into memory, one slide open at a time."""
        if self._patches is not None:
            return
        out = np.empty((len(self), self.patch_px, self.patch_px, 3), np.uint8)
        done = 0
        for k, name in enumerate(self.section_names):
            items = np.nonzero(self.item_section == k)[0]
            for start in range(0, len(items), 64):
                check_cancel(cancel, "reading patches")
                report(progress, done, len(self), f"patches of {name}")
                part = items[start : start + 64]
                out[part] = self.read_patches(part)
                done += len(part)
            self._close_section(k)  # one slide open at a time
        report(progress, len(self), len(self), "patches read")
        self._patches = out

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        from napari_stpredict.model.preprocess import augment, encoder_input

        img = torch.from_numpy(self.read_patches([i]))
        if self.augment:
            img = augment(img, None)
        return {
            "image": encoder_input(img, self.input_spec)[0],
            "expr": torch.from_numpy(self.expression[i].copy()),
            "section": self.section_names[int(self.item_section[i])],
            "index": i,
        }

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_slides"] = {}  # file handles never travel to another process
        state["_tiles"] = {}
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._slides, self._tiles = {}, {}
        self._lock = threading.Lock()
        self._slides_pid = os.getpid()

    def _close_section(self, k: int) -> None:
        with self._lock:
            self._tiles.pop(k, None)
            slide = self._slides.pop(k, None)
        if slide is not None:
            slide.close()

    def close(self) -> None:
        """Close the slides this process opened."""
        for k in list(self._slides):
            self._close_section(k)
