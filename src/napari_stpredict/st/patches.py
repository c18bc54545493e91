"""Training patches: one image crop of fixed physical size per spot, paired with its expression.

Crops are read with :meth:`napari_stpredict.slide.Slide.read_resampled`, the same call the
inference engine uses, so a model sees identical pixels in training and in napari. Slides are
opened lazily in each process (DataLoader workers re-open them; no file handle is pickled).
Small datasets are read once into memory (:meth:`PatchDataset.preload`): flips and 90°
rotations are exact on a cached crop, so augmentation does not need the slide again.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, Dataset

from napari_stpredict.errors import DatasetError, StPredictError
from napari_stpredict.progress import CancelToken, ProgressCallback, check_cancel, report
from napari_stpredict.st.genes import Normalization, library_size

#: ImageNet channel statistics (RGB, 0–1 scale) used by timm/torchvision backbones.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Datasets whose crops fit in this many bytes are cached in memory by default.
DEFAULT_CACHE_BYTES = 1 << 30

_SCALE = (1.0 / (255.0 * np.asarray(IMAGENET_STD, dtype=np.float32))).astype(np.float32)
_OFFSET = (
    -np.asarray(IMAGENET_MEAN, dtype=np.float32) / np.asarray(IMAGENET_STD, dtype=np.float32)
).astype(np.float32)


def patches_to_tensor(patches: np.ndarray) -> torch.Tensor:
    """uint8 RGB patches → ImageNet-normalised float32 tensor.

    Parameters
    ----------
    patches
        ``(N, P, P, 3)`` or ``(P, P, 3)`` uint8.

    Returns
    -------
    torch.Tensor
        ``(N, 3, P, P)`` (or ``(3, P, P)``) float32: ``(x / 255 - mean) / std``.
    """
    arr = np.asarray(patches)
    if arr.dtype != np.uint8 or arr.shape[-1] != 3 or arr.ndim not in (3, 4):
        raise ValueError(
            f"expected uint8 (N, P, P, 3) or (P, P, 3) patches, got {arr.dtype} {arr.shape}"
        )
    # numpy, not torch: no intra-op thread pool to contend for in DataLoader workers
    out = arr.astype(np.float32) * _SCALE + _OFFSET
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(out, -1, -3)))


def spot_rect(x: float, y: float, size: float) -> tuple[float, float, float, float]:
    """Level-0 rectangle ``(y0, x0, h, w)`` of side ``size`` centred on the spot ``(x, y)``."""
    half = size / 2.0
    return (y - half, x - half, size, size)


def _augment(img: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 symmetries of the square: ``k % 4`` quarter turns, mirrored if ``k >= 4``."""
    out = np.rot90(img, k % 4, axes=(0, 1))
    if k >= 4:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


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
        Random flips and 90° rotations (the 8 symmetries of the square, uniformly).
    normalization
        :class:`~napari_stpredict.st.genes.Normalization`, its dict, or a method name
        (default ``log1p_cpm`` with target sum 10⁴). Library sizes are over all genes.
    patch_px_level0
        Crop side in image pixels for sections whose mpp is unknown (``--patch-px``); ignored
        for sections with an mpp.
    cache
        Keep every crop in memory after :meth:`preload` (``None``: only when they fit in
        ``DEFAULT_CACHE_BYTES``).

    Items are dicts: ``image`` float32 ``(3, P, P)`` ImageNet-normalised, ``expr`` float32
    ``(G,)``, ``section`` (name), ``index`` (position in this dataset; see
    :attr:`spot_names` / :attr:`item_sections`).

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
    ) -> None:
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
            image = meta.get("image")
            if not image:
                raise DatasetError(
                    f"section {name!r}: no image, so no patches can be cut (give 'image' in the manifest; "
                    "sections without one serve measured-expression work only)"
                )
            mpp = meta.get("mpp")
            if mpp:
                size = self.patch_um / float(mpp)
            elif patch_px_level0 is not None:
                size = float(patch_px_level0)
            else:
                raise DatasetError(
                    f"section {name!r}: image {image} has no pixel size (mpp): set mpp or spot_pitch_um "
                    "in the manifest, or give the patch size in image pixels (patch_px_level0 / --patch-px)"
                )
            pos = a.var_names.get_indexer(self.genes)
            if (pos < 0).any():
                miss = [g for g, p in zip(self.genes, pos, strict=True) if p < 0]
                raise DatasetError(
                    f"section {name!r}: {len(miss)} of {len(self.genes)} panel genes are not measured "
                    f"({', '.join(miss[:5])}{', …' if len(miss) > 5 else ''})"
                )
            X = sp.csr_matrix(a.X)
            exprs.append(self.normalization(X[:, pos], library_size=library_size(X)))
            n = a.n_obs
            sec_idx.append(np.full(n, k, dtype=np.int32))
            centers.append(np.asarray(a.obsm["spatial"], dtype=np.float64)[:, :2])
            names.extend(f"{name}:{s}" for s in a.obs_names)
            self.section_names.append(name)
            self.images.append(str(image))
            self.mpps.append(float(mpp) if mpp else None)
            self.patch_size_px.append(size)
        self.expression: np.ndarray = np.concatenate(exprs).astype(np.float32)
        self.item_section: np.ndarray = np.concatenate(sec_idx)
        self.centers: np.ndarray = np.concatenate(centers)
        self.spot_names: list[str] = names

        nbytes = len(self) * self.patch_px * self.patch_px * 3
        self.cache = (nbytes <= DEFAULT_CACHE_BYTES) if cache is None else bool(cache)
        self._patches: np.ndarray | None = None
        self._slides: dict[int, Any] = {}
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
            "image_normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        }

    # ------------------------------------------------------------------ pixels
    def _slide(self, k: int):
        from napari_stpredict.slide import open_slide

        if os.getpid() != self._slides_pid:  # a forked worker: never share parent handles
            self._slides = {}
            self._slides_pid = os.getpid()
        slide = self._slides.get(k)
        if slide is None:
            try:
                slide = open_slide(self.images[k])
            except StPredictError as e:
                raise DatasetError(f"section {self.section_names[k]!r}: {e}") from None
            self._slides[k] = slide
        return slide

    def read_patch(self, i: int) -> np.ndarray:
        """The un-augmented crop of item ``i`` as ``(P, P, 3)`` uint8, from cache or slide."""
        if self._patches is not None:
            return self._patches[i]
        k = int(self.item_section[i])
        x, y = self.centers[i]
        y0, x0, h, w = spot_rect(float(x), float(y), self.patch_size_px[k])
        return self._slide(k).read_resampled(y0, x0, h, w, out_shape=(self.patch_px, self.patch_px))

    def preload(
        self,
        *,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> None:
        """Read every crop into memory, one slide open at a time.

        Call it in the main process before making a DataLoader (:func:`make_loader` does),
        so forked workers share the crops instead of each decoding every slide.
        """
        if self._patches is not None:
            return
        from napari_stpredict.slide import open_slide

        out = np.empty((len(self), self.patch_px, self.patch_px, 3), np.uint8)
        done = 0
        for k, path in enumerate(self.images):
            items = np.nonzero(self.item_section == k)[0]
            try:
                slide = open_slide(path)
            except StPredictError as e:
                raise DatasetError(f"section {self.section_names[k]!r}: {e}") from None
            with slide:
                for i in items:
                    if done % 64 == 0:
                        check_cancel(cancel, "reading patches")
                        report(progress, done, len(self), f"patches of {self.section_names[k]}")
                    x, y = self.centers[i]
                    y0, x0, h, w = spot_rect(float(x), float(y), self.patch_size_px[k])
                    out[i] = slide.read_resampled(
                        y0, x0, h, w, out_shape=(self.patch_px, self.patch_px)
                    )
                    done += 1
        report(progress, len(self), len(self), "patches read")
        self._patches = out

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        img = self.read_patch(i)
        if self.augment:
            img = _augment(img, int(torch.randint(0, 8, (1,)).item()))
        return {
            "image": patches_to_tensor(img),
            "expr": torch.from_numpy(self.expression[i].copy()),
            "section": self.section_names[int(self.item_section[i])],
            "index": i,
        }

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_slides"] = {}  # file handles never travel to another process
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._slides = {}
        self._slides_pid = os.getpid()

    def close(self) -> None:
        """Close the slides this process opened."""
        for s in self._slides.values():
            s.close()
        self._slides = {}


def _worker_init(worker_id: int) -> None:
    # one thread per worker: the workers themselves are the parallelism
    # (augmentation draws from torch's RNG, which the DataLoader seeds per worker)
    torch.set_num_threads(1)


def make_loader(
    dataset: PatchDataset,
    *,
    batch_size: int = 32,
    shuffle: bool = True,
    num_workers: int | None = None,
    device: str | torch.device | None = None,
    drop_last: bool = False,
    seed: int | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    worker_init_fn: Callable[[int], None] | None = None,
) -> DataLoader:
    """A DataLoader that keeps the CPU busy feeding the model.

    Parameters
    ----------
    dataset
        A :class:`PatchDataset`; when it caches, its crops are preloaded here first.
    batch_size, shuffle, drop_last
        As for :class:`torch.utils.data.DataLoader`.
    num_workers
        Worker processes, default ``min(2, cpu count)``: they read (or take from the cache),
        augment and normalise crops while the main process trains.
    device
        Training device: pinned memory is used for CUDA.
    seed
        Seeds the shuffling and augmentation (a fixed seed gives the same batches).
    progress, cancel
        For :meth:`PatchDataset.preload`.
    """
    if batch_size < 1:
        raise DatasetError(f"batch_size must be ≥ 1, got {batch_size}")
    if dataset.cache and not dataset.preloaded:
        dataset.preload(progress=progress, cancel=cancel)
    if num_workers is None:
        num_workers = min(2, os.cpu_count() or 1)
    dev = torch.device(device) if device is not None and str(device) != "auto" else None
    generator = torch.Generator()
    generator.manual_seed(int(seed) if seed is not None else int(torch.initial_seed() % 2**63))
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs.update(
            persistent_workers=True,
            prefetch_factor=4,
            worker_init_fn=worker_init_fn or _worker_init,
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        pin_memory=dev is not None and dev.type == "cuda",
        drop_last=drop_last,
        generator=generator,
        **kwargs,
    )
