"""The evaluation's view of sections and models: measured expression, spot patches, predictions.

Everything that touches ``st/``, ``slide/`` and ``model/`` goes through this module so the
protocol itself stays a few loops over folds and methods.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_stpredict.errors import DatasetError, ModelFileError
from napari_stpredict.progress import CancelToken, ProgressCallback, check_cancel, report

__all__ = [
    "ModelInfo",
    "SectionData",
    "load_section",
    "measured_expression",
    "model_info",
    "predict_section",
    "section_patches",
    "spot_patches",
]


@dataclass
class SectionData:
    """One section read once and reused by every fold that tests it."""

    name: str
    adata: Any  # anndata.AnnData, raw counts
    xy: np.ndarray  # (n, 2) spot centres, full-resolution image px
    image: str  # "" when the section has no image (measured expression only)
    mpp: float | None
    labels: np.ndarray | None


@dataclass
class ModelInfo:
    """What the evaluation needs to know about a model file."""

    path: str
    method: str
    genes: list[str]
    normalization: Any
    training_sections: list[str] | None
    bank_sections: list[str] | None
    metadata: dict


def load_section(spec: Any) -> SectionData:
    """Read a manifest section (``st.read_section``) into a :class:`SectionData`."""
    from napari_stpredict.st import read_section

    ad = read_section(spec)
    uns = dict(ad.uns.get("stpredict", {}))
    labels = None
    if "label" in ad.obs.columns:
        col = ad.obs["label"]
        labels = np.array(
            [
                None if (v is None or (isinstance(v, float) and np.isnan(v))) else str(v)
                for v in col
            ],
            dtype=object,
        )
        if all(v is None for v in labels):
            labels = None
    name = str(uns.get("section", getattr(spec, "name", "section")))
    return SectionData(
        name=name,
        adata=ad,
        xy=np.asarray(ad.obsm["spatial"], dtype=np.float64),
        image=str(uns.get("image") or ""),
        mpp=None if uns.get("mpp") is None else float(uns["mpp"]),
        labels=labels,
    )


def measured_expression(
    section: SectionData, genes: Sequence[str], normalization: Any
) -> np.ndarray:
    """``(n_spots, len(genes))`` float32 measured expression, normalised as the model's targets.

    Library sizes are over all genes of the spot, as in the training patch dataset. Genes the
    section lacks are 0.
    """
    import scipy.sparse as sp

    from napari_stpredict.st.genes import Normalization, library_size

    ad = section.adata
    X = sp.csr_matrix(ad.X)
    pos = np.asarray(ad.var_names.get_indexer(list(genes)))
    have = pos >= 0
    out = np.zeros((ad.n_obs, len(genes)), dtype=np.float32)
    if have.any():
        norm = Normalization.from_dict(normalization)
        out[:, have] = norm(X[:, pos[have]], library_size=library_size(X))
    return out


def spot_patches(
    section: SectionData,
    *,
    patch_um: float | None,
    patch_px: int,
    patch_px_level0: float | None = None,
    start: int = 0,
    stop: int | None = None,
    slide: Any = None,
) -> np.ndarray:
    """``(n, patch_px, patch_px, 3)`` uint8 patches centred on spots ``start:stop``.

    Read with ``Slide.read_resampled`` at the model's scale, exactly like the training patch
    dataset and the inference engine (side ``patch_um / mpp`` level-0 px, or ``patch_px_level0``
    for a model trained on images without a pixel size).
    """
    from napari_stpredict.st.patches import spot_rect

    if patch_um is not None:
        if section.mpp is None or not np.isfinite(section.mpp) or section.mpp <= 0:
            raise DatasetError(
                f"section {section.name}: unknown µm per pixel (give mpp or spot_pitch_um)"
            )
        side = patch_um / section.mpp
    elif patch_px_level0:
        side = float(patch_px_level0)
    else:
        raise DatasetError(
            f"section {section.name}: the model has no patch size in µm nor image px"
        )
    if slide is None:
        from napari_stpredict.slide import open_slide

        slide = open_slide(section.image)
    xy = section.xy[start:stop]
    out = np.empty((len(xy), patch_px, patch_px, 3), dtype=np.uint8)
    for k, (x, y) in enumerate(xy):
        y0, x0, h, w = spot_rect(float(x), float(y), side)
        out[k] = slide.read_resampled(y0, x0, h, w, out_shape=(patch_px, patch_px))
    return out


def _patch_px_level0(predictor: Any) -> float | None:
    meta = predictor.metadata
    return meta.get("patch_px_level0") or (meta.get("config") or {}).get("patch_px_level0")


def section_patches(
    predictor: Any,
    section: SectionData,
    *,
    batch_size: int = 64,
    cancel: CancelToken | None = None,
) -> np.ndarray:
    """Every spot patch of ``section`` at ``predictor``'s scale: ``(n, P, P, 3)`` uint8, or
    ``(n, F, P, P, 3)`` for a model with a context field (``predictor.input_spec.fields()``:
    the patch, then the wider field around the same centre, resampled to ``P``)."""
    from napari_stpredict.slide import open_slide

    if not section.image:
        raise DatasetError(f"section {section.name}: no image, so nothing can be predicted")
    slide = open_slide(section.image)
    n = section.xy.shape[0]
    spec = getattr(predictor, "input_spec", None)
    scales = tuple(getattr(spec, "scales", (1.0,)))
    level0 = _patch_px_level0(predictor)
    p = predictor.patch_px
    out = np.empty((n, len(scales), p, p, 3), dtype=np.uint8)
    for start in range(0, n, batch_size):
        check_cancel(cancel, "evaluation")
        stop = min(n, start + batch_size)
        for f, scale in enumerate(scales):
            out[start:stop, f] = spot_patches(
                section,
                patch_um=None if predictor.patch_um is None else predictor.patch_um * scale,
                patch_px=p,
                patch_px_level0=None if level0 is None else float(level0) * scale,
                start=start,
                stop=stop,
                slide=slide,
            )
    return out[:, 0] if len(scales) == 1 else out


def predict_section(
    predictor: Any,
    section: SectionData,
    *,
    patches: np.ndarray | None = None,
    batch_size: int = 64,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> np.ndarray:
    """Predict every spot of ``section`` with a ``model.Predictor``: ``(n_spots, G)`` float32.

    ``patches`` (from :func:`section_patches`) skips reading the slide again.
    """
    if patches is None:
        patches = section_patches(predictor, section, batch_size=batch_size, cancel=cancel)
    n = section.xy.shape[0]
    if patches.shape[0] != n:
        raise ValueError(f"section {section.name}: {patches.shape[0]} patches for {n} spots")
    out = np.empty((n, len(predictor.genes)), dtype=np.float32)
    for start in range(0, n, batch_size):
        check_cancel(cancel, "evaluation")
        stop = min(n, start + batch_size)
        out[start:stop] = predictor.predict(patches[start:stop])
        report(progress, stop, n, f"predict {section.name}")
    return out


def model_info(path: str) -> ModelInfo:
    """Read the metadata and the bank's section names of a model file (no weights loaded)."""
    from napari_stpredict.model import load_model_file

    mf = load_model_file(path)
    meta = dict(mf.metadata)
    genes = meta.get("genes")
    if not genes:
        raise ModelFileError(f"{path}: metadata lists no genes")
    listed = meta.get("bank_sections")
    bank: list[str] | None = None
    if mf.bank_embeddings is not None:
        # every section named by a bank spot, plus the ones the metadata lists
        names = [str(b) for b in (listed or [])]
        idx = np.unique(np.asarray(mf.bank_section_index)).tolist()
        bad = [i for i in idx if not 0 <= i < len(names)]
        if bad:
            raise ModelFileError(f"{path}: bank spots point at unknown sections {bad[:5]}")
        bank = list(dict.fromkeys([names[i] for i in idx] + names))
    elif listed:
        bank = [str(b) for b in listed]
    return ModelInfo(
        path=str(path),
        method=str(meta.get("method", "model")),
        genes=list(genes),
        normalization=meta.get("normalization"),
        training_sections=meta.get("training_sections"),
        bank_sections=bank,
        metadata=meta,
    )
