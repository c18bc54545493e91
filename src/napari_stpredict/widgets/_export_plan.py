"""The Export dock's plan, Qt-free: :class:`TumorSpec` (the tumour layer as the export needs
it), :class:`ExportPlan` (everything an export needs, read from the dock on the GUI thread) and
:func:`run_export_plan` (opens the store and the slide, writes the files; run in a worker; the
slide it opens is closed again). Importable from :mod:`._state` too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_stpredict.errors import StPredictError

__all__ = ["ExportPlan", "TumorSpec", "run_export_plan"]


@dataclass(frozen=True)
class TumorSpec:
    """The tumour layer as the export needs it (its mask includes brush edits)."""

    mask: np.ndarray
    genes: dict[str, float]
    threshold: float | None
    method: str = "manual"
    smooth: float = 0.0
    min_size: int = 0

    @classmethod
    def from_layer(cls, data: Any, meta: Mapping[str, Any]) -> TumorSpec:
        """From a tumour Labels layer's data (tumour = label > 0) and ``metadata["stpredict"]``."""
        return cls(
            mask=np.asarray(data) > 0,  # includes the user's brush edits
            genes=dict(zip(meta.get("genes") or [], meta.get("weights") or [], strict=False)),
            threshold=meta.get("threshold"),
            method=meta.get("threshold_method", "manual"),
            smooth=float(meta.get("smooth_sigma_cells", 0.0)),
            min_size=int(meta.get("min_size_cells", 0)),
        )

    def tumor_map(self, store: Any, model: Any = None) -> Any:
        """The :class:`~napari_stpredict.tumor.TumorMap` of ``store`` with this mask (worker)."""
        from napari_stpredict.tumor import TumorMap, score_store

        score = score_store(store, gene_set=self.genes or None, model=model)
        return TumorMap(
            score, float(self.threshold or 0.0), self.mask, self.method, self.smooth, self.min_size
        )


@dataclass(frozen=True)
class ExportPlan:
    """Everything an export needs, read from the dock on the GUI thread."""

    store: str
    meta: dict[str, Any]
    kinds: tuple[str, ...]
    folder: Path
    name: str
    genes: list[str] | None = None
    tumor: TumorSpec | None = None
    region: tuple[float, float, float, float] | None = None
    figure_gene: str | None = None
    dpi: int = 150
    overwrite: bool = False
    #: SpatialData export: the slide image element, ``"auto"`` (≤ 2 µm/px) or ``None`` (none)
    image: str | None = "auto"
    #: bool ``(gh, gw)``: the tissue tiles of the session (exports are "partial" only when
    #: some of them are not predicted); ``None`` = unknown (every grid tile counts)
    tissue: Any = None

    def __post_init__(self) -> None:
        if self.image not in ("auto", None):
            raise StPredictError(f"export image {self.image!r}: expected 'auto' or None")


def run_export_plan(plan: ExportPlan) -> list[Any]:
    """Open the store (and the slide), build the tumour map, write the exports (worker)."""
    from napari_stpredict.export import export_figure, export_predictions
    from napari_stpredict.export._predictions import as_predictions
    from napari_stpredict.inference.store import PredictionStore

    if not plan.folder.is_dir():
        raise StPredictError(f"{plan.folder}: output folder does not exist")
    if "spatialdata" in plan.kinds:
        from napari_stpredict.export.spatialdata import require_spatialdata

        require_spatialdata("the SpatialData export")  # one line naming the extra, before work
    store = PredictionStore.from_path(plan.store)
    predictions = as_predictions(store)
    predictions.set_tissue(plan.tissue)  # "partial" = tissue tiles missing, not background
    model = plan.meta.get("model") or None
    slide = None
    try:
        wants_slide = ("png", "h5ad", "spatialdata")
        if any(k in plan.kinds for k in wants_slide) and plan.meta.get("slide_path"):
            from napari_stpredict.slide import open_slide

            slide = open_slide(plan.meta["slide_path"], mpp=store.grid.mpp)
        tumor = plan.tumor.tumor_map(store, model) if plan.tumor is not None else None
        kinds = [k for k in plan.kinds if k != "png"]
        if "spatialdata" in kinds and plan.image is None:
            kinds = ["spatialdata-no-image" if k == "spatialdata" else k for k in kinds]
        results: list[Any] = []
        if kinds:
            results = list(
                export_predictions(
                    predictions,
                    plan.folder,
                    name=plan.name,
                    kinds=kinds,
                    genes=plan.genes,
                    slide=slide,
                    model=model,
                    tumor=tumor,
                    overwrite=plan.overwrite,
                )
            )
        if "png" in plan.kinds:
            gene = plan.figure_gene or store.genes[0]
            dst = plan.folder / f"{plan.name}_{gene}.png"
            results.append(
                export_figure(
                    predictions,
                    dst,
                    gene=gene,
                    slide=slide,
                    region=plan.region,
                    dpi=plan.dpi,
                    tumor=tumor,
                    model=model,
                    overwrite=plan.overwrite,
                )
            )
        return results
    finally:
        if slide is not None:
            slide.close()
