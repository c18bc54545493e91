"""Qt-free state of the docks (napari-spatialdata's ``DataModel`` idea).

Each dock keeps what the user chose and what was computed in one plain Python object with
callbacks (:class:`Events`); the Qt widgets only mirror it and forward clicks. The objects are
testable without a display and without napari, and a script may drive them directly.

- :class:`PredictState` — model, the live view's test-time augmentation, slide inputs (exact
  µm/px: the cache key must equal the CLI's), stride, selected genes, display options (colour
  bars, smooth, uncertainty), progress in tiles.
- :class:`TumorState` — the kept tumour score, threshold, smoothing, minimum region, the mask.
- :class:`ExportPlan` + :func:`run_export_plan` (in :mod:`._export_plan`, importable from here)
  — everything an export needs, typed, run in a worker; the slide it opens is closed again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_stpredict.errors import StPredictError

__all__ = [
    "N_HEG",
    "PRESETS",
    "PRESET_HEG",
    "PRESET_MARKERS",
    "PRESET_PAM50",
    "TTA_VIEWS",
    "Events",
    "ExportPlan",
    "PredictState",
    "TumorSpec",
    "TumorState",
    "model_file_tta",
    "optional_positive",
    "preset_genes",
    "run_export_plan",
]

#: Number of genes in the "highly expressed" preset.
N_HEG = 20
PRESET_HEG = "Highly expressed (training data)"
PRESET_MARKERS = "Breast-cancer markers"
PRESET_PAM50 = "PAM50"
PRESETS = (PRESET_HEG, PRESET_MARKERS, PRESET_PAM50)
#: Test-time augmentation views a Predictor accepts (symmetries of the square averaged).
TTA_VIEWS = (1, 2, 4, 8)


class Events:
    """A minimal callback hub: ``events.connect("name", cb)``; ``events.emit("name", *args)``."""

    def __init__(self, *names: str) -> None:
        self._callbacks: dict[str, list[Callable[..., Any]]] = {n: [] for n in names}

    def connect(self, name: str, callback: Callable[..., Any]) -> None:
        self._callbacks[name].append(callback)

    def disconnect_all(self) -> None:
        for cbs in self._callbacks.values():
            cbs.clear()

    def emit(self, name: str, *args: Any) -> None:
        for cb in list(self._callbacks[name]):
            cb(*args)


def preset_genes(
    name: str, panel: Sequence[str], gene_stats: Mapping[str, np.ndarray] | None
) -> list[str]:
    """The genes of a preset that the model predicts, spelled as in ``panel``.

    ``gene_stats["mean"]`` ranks the highly expressed genes.
    """
    if name == PRESET_HEG:
        if not gene_stats or "mean" not in gene_stats:
            return []
        mean = np.nan_to_num(np.asarray(gene_stats["mean"], dtype=float), nan=-np.inf)
        return [panel[i] for i in np.argsort(-mean, kind="stable")[:N_HEG]]
    from napari_stpredict.evaluation.markers import BREAST_CANCER_MARKERS, PAM50, match_genes

    wanted = {PRESET_MARKERS: BREAST_CANCER_MARKERS, PRESET_PAM50: PAM50}.get(name)
    if wanted is None:
        raise KeyError(f"{name}: unknown gene preset")
    idx, _missing = match_genes(panel, wanted)
    return [panel[i] for i in idx]


# ======================================================================================= predict
@dataclass
class PredictState:
    """What the "Predict expression" dock shows and asks for.

    Events: ``model`` (predictor or None), ``tta`` (the live view's TTA asked for: the
    predictor is rebuilt with it, then a new session), ``inputs`` (slide, µm/px or stride
    changed: a new session is due), ``genes`` (selected list), ``display`` (colour bar / smooth /
    uncertainty), ``progress`` (done, total tiles), ``status`` (text).
    """

    predictor: Any = None
    model_path: Path | None = None
    #: test-time augmentation of the model file (the views ``stpredict predict`` averages)
    model_tta: int = 1
    #: test-time augmentation of the live view (the session's Predictor)
    tta: int = 1
    slide_path: str | None = None
    layer_mpp: float | None = None
    mpp_override: float | None = None  #: exact, never rounded (the cache key depends on it)
    stride_um: float | None = None
    genes: list[str] = field(default_factory=list)
    colorbar: bool = True
    smooth: bool = False
    uncertainty: bool = False
    progress: tuple[int, int] = (0, 0)
    status: str = "load a model and pick a slide"
    events: Events = field(
        default_factory=lambda: Events(
            "model", "tta", "inputs", "genes", "display", "progress", "status"
        ),
        repr=False,
    )

    # -- model -----------------------------------------------------------------------------
    def set_model(self, predictor: Any, path: Path | None) -> None:
        """Use ``predictor`` (its TTA is the live view's; the file's is :attr:`model_tta`)."""
        self.predictor, self.model_path = predictor, path
        self.model_tta = model_file_tta(predictor)
        self.tta = int(getattr(predictor, "tta", 1)) if predictor is not None else 1
        panel = set(predictor.genes) if predictor is not None else set()
        self.genes = [g for g in self.genes if g in panel]
        self.events.emit("model", predictor)
        self.events.emit("inputs")

    @property
    def panel(self) -> list[str]:
        return list(self.predictor.genes) if self.predictor is not None else []

    # -- test-time augmentation of the live view -------------------------------------------
    def request_tta(self, views: int) -> bool:
        """Ask for ``views`` TTA views in the live view; ``True`` (event ``tta``) if it changed.

        The dock then rebuilds the Predictor with ``tta=views`` (off the GUI thread) and a new
        session follows, as for a new model (the cache key includes the TTA).
        """
        views = int(views)
        if views not in TTA_VIEWS:
            raise StPredictError(f"test-time augmentation {views}: choose 1, 2, 4 or 8 views")
        if self.predictor is None:
            raise StPredictError("load a model before choosing test-time augmentation")
        if views == self.tta:
            return False
        self.tta = views
        self.events.emit("tta", views)
        return True

    @property
    def tta_choices(self) -> list[int]:
        """Views the dock offers: 1 and the model's (and the current one, if other)."""
        return sorted({1, self.model_tta, self.tta})

    def tta_label(self, views: int) -> str:
        """``"1 view (fast)"``, ``"8 views (as predict)"`` (the model's), ``"2 views"``."""
        if views == 1:
            return "1 view (fast)"
        return f"{views} views" + (" (as predict)" if views == self.model_tta else "")

    @property
    def tta_note(self) -> str:
        """One line on the cost of the model's TTA (empty when the model has none)."""
        n = self.model_tta
        return f"{n} views: {n}× slower per tile" if n > 1 else ""

    # -- slide inputs ----------------------------------------------------------------------
    def set_slide(self, path: str | None, layer_mpp: float | None) -> None:
        self.slide_path, self.layer_mpp, self.mpp_override = path, layer_mpp, None
        self.events.emit("inputs")

    def set_mpp(self, mpp: float | None) -> None:
        """Override µm/px (``None`` or 0 = the slide's own), kept at full precision."""
        self._set_input("mpp_override", optional_positive(mpp, f"µm/px {mpp!r}"))

    def set_stride(self, stride_um: float | None) -> None:
        """Distance between tiles in µm (``None`` or 0 = the patch size)."""
        self._set_input("stride_um", optional_positive(stride_um, f"stride {stride_um!r} µm"))

    def _set_input(self, name: str, value: float | None) -> None:
        if value != getattr(self, name):
            setattr(self, name, value)
            self.events.emit("inputs")

    @property
    def mpp(self) -> float | None:
        """µm/px used for the session: the override, else the slide layer's."""
        return self.mpp_override or self.layer_mpp

    @property
    def ready(self) -> bool:
        return self.predictor is not None and self.model_path is not None and bool(self.slide_path)

    # -- genes -----------------------------------------------------------------------------
    def resolve_genes(self, genes: Sequence[str]) -> list[str]:
        """Genes spelled as in the model's panel (case-insensitive), duplicates dropped."""
        if self.predictor is None:
            raise StPredictError("load a model before choosing genes")
        lookup = {g.upper(): g for g in self.predictor.genes}
        unknown = [g for g in genes if g.upper() not in lookup]
        if unknown:
            raise StPredictError(f"genes not predicted by the model: {', '.join(unknown)}")
        return list(dict.fromkeys(lookup[g.upper()] for g in genes))

    def set_genes(self, genes: Sequence[str]) -> None:
        wanted = self.resolve_genes(genes)
        if wanted != self.genes:
            self.genes = wanted
            self.events.emit("genes", list(wanted))

    def drop_gene(self, gene: str) -> None:
        """The user deleted the gene's layer: untick it (no layer is removed again)."""
        if gene in self.genes:
            self.genes = [g for g in self.genes if g != gene]
            self.events.emit("genes", list(self.genes))

    def preset(self, name: str) -> list[str]:
        if self.predictor is None:
            return []
        return preset_genes(name, self.predictor.genes, self.predictor.gene_stats)

    # -- display ---------------------------------------------------------------------------
    def set_display(self, **options: bool) -> None:
        changed = False
        for key, value in options.items():
            if key not in ("colorbar", "smooth", "uncertainty"):
                raise KeyError(key)
            if getattr(self, key) != bool(value):
                setattr(self, key, bool(value))
                changed = True
        if changed:
            self.events.emit("display")

    # -- progress / status -----------------------------------------------------------------
    def set_progress(self, done: int, total: int) -> None:
        self.progress = (int(done), int(total))
        self.events.emit("progress", *self.progress)

    def set_status(self, text: str) -> None:
        self.status = text
        self.events.emit("status", text)


def optional_positive(value: float | None, what: str) -> float | None:
    """``None`` for ``None``/0, else ``value`` as a float that must be finite and > 0.

    Raises
    ------
    StPredictError
        ``"<what>: must be a positive number"``.
    """
    out = float(value) if value else None
    if out is not None and not (np.isfinite(out) and out > 0):
        raise StPredictError(f"{what}: must be a positive number")
    return out


def model_file_tta(predictor: Any) -> int:
    """The test-time augmentation the model file records (``metadata["input"]["tta"]``; 1 for
    files without it), whatever the Predictor was told to use."""
    if predictor is None:
        return 1
    from napari_stpredict.model.preprocess import InputSpec

    try:
        return int(InputSpec.from_metadata(predictor.metadata).tta)
    except (StPredictError, KeyError, TypeError, ValueError, AttributeError):  # a stand-in
        return int(getattr(predictor, "tta", 1))


# ======================================================================================= tumour
@dataclass
class TumorState:
    """The kept tumour score and the threshold/smoothing/minimum-size that make the mask.

    The score is computed once (worker); every other change recomputes the mask from it on the
    caller's thread (grid-sized arrays: instant). Event ``mask`` gets the
    :class:`~napari_stpredict.tumor.TumorArea`.
    """

    score: Any = None
    grid: Any = None
    threshold: float | None = None
    method: str = "otsu"
    sigma: float = 0.0
    min_size: int = 0
    mask: np.ndarray | None = None
    area: Any = None
    smoothed: np.ndarray | None = None
    range: tuple[float, float] = (0.0, 1.0)
    events: Events = field(default_factory=lambda: Events("score", "mask"), repr=False)

    def clear(self) -> None:
        self.score = self.smoothed = self.mask = self.area = None

    def set_score(self, grid: Any, score: Any) -> None:
        from napari_stpredict.tumor import smooth_score

        if not score.predicted.any():
            raise StPredictError("nothing is predicted yet: let the heatmaps fill in first")
        self.grid, self.score = grid, score
        self.smoothed = smooth_score(score.score, self.sigma)
        lo, hi = score.range()
        self.range = (lo, hi if hi > lo else lo + 1e-6)
        self.events.emit("score", score)
        if self.threshold is None or not lo <= self.threshold <= hi:
            self.auto_threshold()
        else:
            self.set_threshold(self.threshold, method=self.method)

    def auto_threshold(self) -> float | None:
        """Otsu's threshold of the (smoothed) scores of the predicted tiles."""
        from napari_stpredict.tumor import otsu_threshold

        if self.score is None or self.smoothed is None:
            return None
        thr = otsu_threshold(self.smoothed)
        self.set_threshold(min(max(thr, self.range[0]), self.range[1]), method="otsu")
        return self.threshold

    def set_threshold(self, value: float, *, method: str = "manual") -> None:
        if self.score is None:
            raise StPredictError("tumour threshold: compute the score first")
        lo, hi = self.range
        value = float(value)
        if not lo - 1e-9 <= value <= hi + 1e-9:
            raise StPredictError(
                f"threshold {value:.4g}: outside the score range [{lo:.4g}, {hi:.4g}]"
            )
        self.threshold, self.method = value, method
        self.apply()

    def set_smoothing(self, sigma: float) -> None:
        from napari_stpredict.tumor import smooth_score

        self.sigma = float(sigma)
        if self.score is not None:
            self.smoothed = smooth_score(self.score.score, self.sigma)
            self.apply()

    def set_min_size(self, tiles: int) -> None:
        self.min_size = int(tiles)
        if self.score is not None:
            self.apply()

    def apply(self) -> None:
        """Mask from the kept (smoothed) score: no store read, no model call."""
        from napari_stpredict.tumor import tumor_area, tumor_mask

        if self.score is None or self.smoothed is None or self.threshold is None:
            return
        self.mask = tumor_mask(
            self.smoothed, self.threshold, min_size=self.min_size, check_range=False
        )
        self.area = tumor_area(self.mask, self.grid, tissue=self.score.predicted)
        self.events.emit("mask", self.area)

    def tumor_map(self) -> Any:
        from napari_stpredict.tumor import TumorMap

        if self.score is None or self.mask is None or self.threshold is None:
            raise StPredictError("tumour map: compute the score first")
        return TumorMap(
            self.score, self.threshold, self.mask.copy(), self.method, self.sigma, self.min_size
        )


# the export plan lives in its own module; its names stay importable from here
from napari_stpredict.widgets._export_plan import (  # noqa: E402
    ExportPlan,
    TumorSpec,
    run_export_plan,
)
