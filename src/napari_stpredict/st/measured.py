"""Measured vs predicted: a user's spatial data for a slide, compared with the predictions.

A scientist trusts the model on their tissue when its predictions agree with what was
measured there. This module (Qt-free; the napari dock ``widgets/measured.py`` is a thin view
on it) does three things:

1. :func:`load_measured` reads the spots of the slide from a manifest section, an ``.h5ad``
   with ``obsm["spatial"]``, or a Space Ranger ``outs`` folder, through the ``st`` readers
   (so aliases, checks and error messages are the training data's). Spot centres must be in
   the slide's level-0 pixels (the full-resolution image the spots were aligned to); pass
   ``scale`` when they are in another frame.
2. The counts are normalised **like the model's training data** (the model file's
   ``normalization``, with library sizes over all measured genes): a measured value and a
   predicted value of a gene are in the same unit, so they share a colour scale.
3. :func:`compare` takes, for every spot, the prediction of the grid tile whose heatmap pixel
   contains the spot centre (what the heatmap shows under the spot) and computes the Pearson r
   per gene over the spots whose tile is predicted (the same Pearson as ``evaluate``).

>>> m = load_measured("benchmarks/data/her2st.yaml", section="C3", model=model_path)  # doctest: +SKIP
>>> c = compare(m, store)                                                             # doctest: +SKIP
>>> c.r["ERBB2"], c.n_spots                                                           # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_stpredict.errors import DatasetError

__all__ = ["Comparison", "MeasuredSpots", "compare", "load_measured", "spot_cells"]

_MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
#: Fewer spots with a prediction than this: r is not reported (NaN).
MIN_SPOTS = 10


@dataclass
class MeasuredSpots:
    """Measured spots of one slide, normalised like the model.

    Attributes
    ----------
    name : str
        Section name (or the file's stem).
    source : str
        Where the data came from.
    xy : numpy.ndarray
        ``(n, 2)`` float64 spot centres ``(x, y)`` in continuous level-0 pixels of the slide.
    spot_ids : list of str
    genes : list of str
        Measured genes (symbols, aliases resolved).
    values : numpy.ndarray
        ``(n, len(genes))`` float32, normalised (``normalization``).
    normalization : dict
        ``{"method", "target_sum"}`` used.
    diameter_px, pitch_px : float
        Spot diameter and centre-to-centre distance in level-0 pixels (NaN when unknown).
    """

    name: str
    source: str
    xy: np.ndarray
    spot_ids: list[str]
    genes: list[str]
    values: np.ndarray
    normalization: dict[str, Any]
    diameter_px: float = float("nan")
    pitch_px: float = float("nan")
    _index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._index = {g: i for i, g in enumerate(self.genes)}

    @property
    def n_spots(self) -> int:
        return int(self.xy.shape[0])

    def has(self, gene: str) -> bool:
        return gene in self._index

    def gene(self, gene: str) -> np.ndarray:
        """``(n,)`` normalised measured values of one gene."""
        if gene not in self._index:
            raise DatasetError(f"{self.source}: gene {gene!r} was not measured")
        return self.values[:, self._index[gene]]


def _spec_for(path: Path, section: str | None, scale: float | str | None):
    """A :class:`SectionSpec` for a manifest section, an .h5ad file or a Space Ranger folder."""
    from napari_stpredict.st.manifest import SectionSpec, load_manifest

    if path.is_dir():
        has_matrix = any(
            (path / n).exists()
            for n in ("filtered_feature_bc_matrix.h5", "filtered_feature_bc_matrix")
        )
        if not (has_matrix and (path / "spatial").is_dir()):
            raise DatasetError(
                f"{path}: not a Space Ranger outs folder (needs filtered_feature_bc_matrix.h5 "
                "and spatial/)"
            )
        return SectionSpec(
            name=path.name, kind="visium", manifest=path, visium=path,
            scale=scale if scale is not None else "fullres",
        )  # fmt: skip
    if path.suffix.lower() == ".h5ad":
        return SectionSpec(name=path.stem, kind="h5ad", manifest=path, h5ad=path, scale=scale)
    if path.suffix.lower() in _MANIFEST_SUFFIXES:
        manifest = load_manifest(path)
        if section is None:
            if len(manifest.sections) != 1:
                raise DatasetError(f"{path}: name the section (one of {', '.join(manifest.names)})")
            return manifest.sections[0]
        return manifest.section(section)
    raise DatasetError(
        f"{path}: expected a dataset manifest (.yaml/.json), an .h5ad file or a Space Ranger "
        "outs folder"
    )


def manifest_sections(path: str | os.PathLike) -> list[str]:
    """Section names of a manifest (empty for an .h5ad file or a Space Ranger folder)."""
    p = Path(path).expanduser()
    if p.suffix.lower() not in _MANIFEST_SUFFIXES or not p.is_file():
        return []
    from napari_stpredict.st.manifest import load_manifest

    return load_manifest(p, check_files=False).names


def _normalization_of(model: Any) -> dict[str, Any]:
    if model is None:
        return {"method": "log1p_cpm", "target_sum": 1e4}
    if isinstance(model, Mapping):
        meta = model
    elif isinstance(model, str | os.PathLike):
        from napari_stpredict.model.header import read_model_header

        meta = read_model_header(model)
    else:  # a Predictor
        meta = getattr(model, "metadata", None) or {}
        norm = getattr(model, "normalization", None)
        if norm:
            return dict(norm)
    return dict(meta.get("normalization") or {"method": "log1p_cpm", "target_sum": 1e4})


def load_measured(
    source: str | os.PathLike,
    *,
    section: str | None = None,
    model: Any = None,
    scale: float | str | None = None,
    genes: Sequence[str] | None = None,
    slide_shape: tuple[int, int] | None = None,
) -> MeasuredSpots:
    """Read the measured spots of a slide and normalise them like ``model``'s training data.

    Parameters
    ----------
    source
        A dataset manifest (with ``section``), an ``.h5ad`` with ``obsm["spatial"]``, or a
        Space Ranger ``outs`` folder (full-resolution coordinates).
    section
        Manifest section name (optional when the manifest has one section).
    model
        The model whose normalisation to apply: a model file path, its metadata mapping or a
        Predictor; ``None`` = the default ``log1p_cpm`` at 10,000.
    scale
        ``.h5ad``/Space Ranger: multiplies the spot coordinates (a number, or ``hires``/
        ``lowres``/``fullres`` with the data's scale factors) when they are not in the slide's
        level-0 pixels; a manifest section uses its own ``scale``.
    genes
        Keep only these genes (those measured); library sizes still use all genes.
    slide_shape
        Level-0 ``(h, w)`` of the slide: refuse data whose spots mostly fall outside it.

    Raises
    ------
    DatasetError
        Unreadable data, or spots that do not lie on the slide; one line naming the file.
    """
    from napari_stpredict.st.genes import Normalization, library_size
    from napari_stpredict.st.section import read_section

    path = Path(source).expanduser()
    if not path.exists():
        raise DatasetError(f"{path}: no such file or folder")
    spec = _spec_for(path, section, scale)
    adata = read_section(spec, check_image=False)
    info = adata.uns.get("stpredict", {})
    xy = np.asarray(adata.obsm["spatial"], np.float64)  # the readers applied the scale
    if slide_shape is not None:
        h, w = slide_shape
        inside = (xy[:, 0] >= 0) & (xy[:, 1] >= 0) & (xy[:, 0] < w) & (xy[:, 1] < h)
        if inside.mean() < 0.5:
            raise DatasetError(
                f"{path}: {int((~inside).sum())} of {len(xy)} spots lie outside the slide "
                f"({w} x {h} px); are the coordinates in the slide's full-resolution pixels? "
                "(set scale)"
            )
    norm = Normalization.from_dict(_normalization_of(model))
    X = adata.X
    lib = library_size(X)
    all_genes = [str(g) for g in adata.var_names]
    if genes is not None:
        keep = [i for i, g in enumerate(all_genes) if g in set(genes)]
        X = X[:, keep]
        all_genes = [all_genes[i] for i in keep]
    values = np.asarray(norm(X, library_size=lib), dtype=np.float32)
    pitch = info.get("spot_pitch_px")
    diameter = info.get("spot_diameter_px")
    return MeasuredSpots(
        name=spec.name,
        source=str(path) + (f" [{spec.name}]" if path.suffix.lower() in _MANIFEST_SUFFIXES else ""),
        xy=xy,
        spot_ids=[str(s) for s in adata.obs_names],
        genes=all_genes,
        values=values,
        normalization=norm.to_dict(),
        diameter_px=float(diameter) if diameter else float("nan"),
        pitch_px=float(pitch) if pitch else float("nan"),
    )


def spot_cells(grid: Any, xy: np.ndarray) -> np.ndarray:
    """The grid cell whose heatmap pixel contains each spot centre.

    Returns
    -------
    numpy.ndarray
        ``(n, 2)`` int64 ``(i, j)``; ``-1`` for spots outside the grid.
    """
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    half, s = grid.cell_px / 2, grid.stride_px
    i = np.floor((xy[:, 1] - half) / s + 0.5).astype(np.int64)
    j = np.floor((xy[:, 0] - half) / s + 0.5).astype(np.int64)
    gh, gw = grid.shape
    out = np.stack([i, j], axis=1)
    out[(i < 0) | (j < 0) | (i >= gh) | (j >= gw)] = -1
    return out


@dataclass
class Comparison:
    """Measured vs predicted at the spots.

    Attributes
    ----------
    genes : list of str
        Genes both measured and predicted (store order).
    measured, predicted : numpy.ndarray
        ``(n_spots, len(genes))`` float32; ``predicted`` is NaN where the spot's tile is not
        predicted (yet) or lies off the grid.
    r : dict
        Pearson r per gene over the spots with a prediction (NaN with fewer than
        :data:`MIN_SPOTS` such spots).
    n_spots : int
        Spots with a prediction.
    cells : numpy.ndarray
        ``(n, 2)`` the tile of each spot (``-1`` = off the grid): predict these to complete r.
    """

    genes: list[str]
    measured: np.ndarray
    predicted: np.ndarray
    r: dict[str, float]
    n_spots: int
    cells: np.ndarray

    def index(self, gene: str) -> int:
        try:
            return self.genes.index(gene)
        except ValueError:
            raise DatasetError(f"gene {gene!r} is not both measured and predicted") from None

    def missing_cells(self) -> np.ndarray:
        """Unique tiles under spots that have no prediction yet: ``(m, 2)``."""
        todo = np.isnan(self.predicted).all(axis=1) & (self.cells[:, 0] >= 0)
        if not todo.any():
            return np.empty((0, 2), np.int64)
        return np.unique(self.cells[todo], axis=0)


def compare(
    measured: MeasuredSpots, store: Any, *, genes: Sequence[str] | None = None
) -> Comparison:
    """Per-gene Pearson r between measured and predicted expression at the spots.

    Parameters
    ----------
    measured
        From :func:`load_measured` (normalised like the store's model).
    store
        A :class:`~napari_stpredict.inference.store.PredictionStore` (``grid``, ``genes``,
        ``read_cells``, ``is_done``).
    genes
        Restrict to these genes (default: every gene both measured and predicted).

    Raises
    ------
    DatasetError
        When no gene is both measured and predicted.
    """
    from napari_stpredict.evaluation.metrics import pearson_per_gene

    wanted = list(genes) if genes is not None else list(store.genes)
    common = [g for g in wanted if measured.has(g) and g in set(store.genes)]
    if not common:
        raise DatasetError(
            f"{measured.source}: no gene is both measured and predicted "
            f"(measured e.g. {', '.join(measured.genes[:3])}; predicted e.g. "
            f"{', '.join(list(store.genes)[:3])})"
        )
    cells = spot_cells(store.grid, measured.xy)
    on_grid = cells[:, 0] >= 0
    pred = np.full((measured.n_spots, len(common)), np.nan, np.float32)
    if on_grid.any():
        done = np.zeros(measured.n_spots, bool)
        done[on_grid] = store.is_done(cells[on_grid])
        if done.any():
            pred[done] = store.read_cells(cells[done], common)
    meas = np.stack([measured.gene(g) for g in common], axis=1).astype(np.float32)
    ok = np.isfinite(pred).all(axis=1)
    n = int(ok.sum())
    if n >= MIN_SPOTS:
        r_all = pearson_per_gene(meas[ok], pred[ok])
        r = {g: float(v) for g, v in zip(common, r_all, strict=True)}
    else:
        r = {g: float("nan") for g in common}
    return Comparison(genes=common, measured=meas, predicted=pred, r=r, n_spots=n, cells=cells)
