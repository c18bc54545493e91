"""The "Tumour localization" dock: a thresholded tumour score, drawn as outlines.

A thin Qt view over :class:`~._state.TumorState`. The score is computed once from the
prediction store in a worker (no model call) and kept; the threshold slider, smoothing and
minimum region recompute the mask from it (grid-sized arrays: instant, GUI thread).

Two layers per store:

- a Labels layer (tumour = 1; ``metadata["stpredict"]`` with ``kind="tumor"``, ``threshold`` and
  ``genes``) — the mask the Export dock and the GeoJSON writer use; hidden by default (turn it on
  to correct it with napari's brush: the outline follows the edits);
- a Shapes layer of the regions' outlines (exact tile edges, thin cyan lines) on top, with a
  legend on the canvas: readable over any heatmap, and the heatmaps stay visible under it.

Drawing those layers is :mod:`._tumor_layers`; this module is the dock (controls, store
choice, score worker, threshold).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSlider,
    QSpinBox,
    QWidget,
)

from napari_stpredict.errors import StPredictError
from napari_stpredict.tumor import DEFAULT_TUMOR_GENES, Signature, parse_gene_set, score_store
from napari_stpredict.widgets._common import Failed, notify, start_worker
from napari_stpredict.widgets._qt import button_row, dock_layout, form_spin, push_button, section
from napari_stpredict.widgets._sources import (
    StoreSource,
    fill_source_combo,
    open_store,
    source_index,
    store_sources,
)
from napari_stpredict.widgets._state import TumorState
from napari_stpredict.widgets._tumor_layers import (
    OPACITY,
    OUTLINE_SUFFIX,
    OUTLINE_WIDTH,
    TUMOR_RGBA,
    TumorLayersMixin,
)

if TYPE_CHECKING:
    import napari

__all__ = [
    "OPACITY",
    "OUTLINE_SUFFIX",
    "OUTLINE_WIDTH",
    "SLIDER_STEPS",
    "TUMOR_RGBA",
    "TumorWidget",
]

#: Steps of the threshold slider over the score range.
SLIDER_STEPS = 1000


class TumorWidget(TumorLayersMixin, QWidget):
    """Dock widget "Tumour localization".

    Attributes
    ----------
    state
        The Qt-free :class:`~._state.TumorState` (score, threshold, mask, area).
    layer
        The Labels layer (tumour = 1).
    outline
        The Shapes layer of the region outlines.
    """

    #: Emitted after a new score is in place (GUI thread).
    score_ready = Signal(object)
    #: Emitted after the mask changed: the :class:`~napari_stpredict.tumor.TumorArea`.
    mask_changed = Signal(object)

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.state = TumorState()
        self.state.events.connect("mask", self._on_mask)
        self.layer: Any = None
        self.outline: Any = None
        self.failed = False  #: the last compute ended with an error (shown in the readout)
        self._source: StoreSource | None = None
        self._workers: set[Any] = set()
        self._seq = 0
        self._build_ui()
        self.viewer.layers.events.inserted.connect(self._refresh_sources)
        self.viewer.layers.events.removed.connect(self._on_layer_removed)
        self._refresh_sources()

    # -- state mirrors (public names kept for scripts) ---------------------------------------
    score = property(lambda self: self.state.score)
    threshold = property(lambda self: self.state.threshold)
    threshold_method = property(lambda self: self.state.method)
    mask = property(lambda self: self.state.mask)
    area = property(lambda self: self.state.area)

    # =========================================================================== UI
    def _build_ui(self) -> None:
        body = dock_layout(self)
        box = QWidget()
        form = QFormLayout(box)
        self.source_combo = QComboBox()
        self.source_combo.setToolTip("The prediction store behind the heatmap layers")
        self.source_combo.currentIndexChanged.connect(self._on_source_choice)
        form.addRow("Store", self.source_combo)
        self.genes_edit = QLineEdit(", ".join(DEFAULT_TUMOR_GENES))
        self.genes_edit.setToolTip(
            "Genes of the signature, separated by commas; GENE:WEIGHT for a weight "
            "(e.g. COL1A1:-1 for a gene low in tumour). Score = weighted mean z-score against "
            "the model's training data."
        )
        self.genes_edit.returnPressed.connect(self.compute)
        form.addRow("Genes", self.genes_edit)
        self.default_button = push_button(
            "Default", lambda: self.set_gene_set(None), tooltip=", ".join(DEFAULT_TUMOR_GENES)
        )
        self.compute_button = push_button(
            "Compute score", lambda: self.compute(),
            tooltip="Read the predictions (no model call) and score every tile",
        )  # fmt: skip
        form.addRow(button_row(self.default_button, self.compute_button, stretch=(0, 1)))
        self.genes_info = QLabel("")
        self.genes_info.setWordWrap(True)
        form.addRow(self.genes_info)
        body.add(section("Tumour score", box))

        box = QWidget()
        form = QFormLayout(box)
        self.threshold_spin = QDoubleSpinBox()
        self.threshold_spin.setDecimals(3)
        self.threshold_spin.setSingleStep(0.05)
        self.threshold_spin.setToolTip("Tiles whose score is at least this are tumour")
        self.threshold_spin.valueChanged.connect(self._on_spin)
        form.addRow("Score ≥", self.threshold_spin)
        self.slider = QSlider(Qt.Orientation.Horizontal)
        self.slider.setRange(0, SLIDER_STEPS)
        self.slider.setToolTip("Threshold over the range of the scores (recomputed instantly)")
        self.slider.valueChanged.connect(self._on_slider)
        form.addRow(self.slider)
        self.auto_button = QPushButton("Auto (Otsu)")
        self.auto_button.setToolTip("Otsu's threshold of the scores of the predicted tissue tiles")
        self.auto_button.clicked.connect(self.auto_threshold)
        form.addRow(self.auto_button)
        self.smooth_spin = form_spin(
            form, "Smoothing", QDoubleSpinBox, 0.0, 20.0, self.set_smoothing, step=0.5,
            suffix=" tiles", tooltip="Gaussian smoothing of the score before thresholding (σ)",
        )  # fmt: skip
        self.min_size_spin = form_spin(
            form, "Min. region", QSpinBox, 0, 1_000_000, self.set_min_size, suffix=" tiles",
            tooltip="Drop tumour regions smaller than this many tiles",
        )  # fmt: skip
        body.add(section("Threshold", box))

        self.readout = QLabel("pick a prediction store and compute the score")
        self.readout.setWordWrap(True)
        self.readout.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        body.add(self.readout)
        body.layout_.addStretch(1)
        self._set_threshold_enabled(False)

    def _set_threshold_enabled(self, on: bool) -> None:
        for w in (
            self.slider,
            self.threshold_spin,
            self.auto_button,
            self.smooth_spin,
            self.min_size_spin,
        ):
            w.setEnabled(on)

    # =========================================================================== sources
    def _refresh_sources(self, event: Any = None) -> None:
        current = self._source.store if self._source else None
        sources = store_sources(self.viewer)
        idx = fill_source_combo(self.source_combo, sources, current)
        if sources and (current is None or idx < 0):
            self._on_source_choice(self.source_combo.currentIndex())
        elif current in sources:
            self._source = sources[current]
        elif not sources:
            self._source = None

    def _on_layer_removed(self, event: Any) -> None:
        if event.value is self.layer:
            self.layer = None
        if event.value is self.outline:
            self.outline = None
        self._refresh_sources()

    def _on_source_choice(self, index: int) -> None:
        path = self.source_combo.itemData(index) if index >= 0 else None
        src = store_sources(self.viewer).get(path) if path else None
        changed = (src.store if src else None) != (self._source.store if self._source else None)
        self._source = src
        if changed:
            self.state.clear()
            self._set_threshold_enabled(False)
            if src is not None and src.tumor is not None:
                self.layer = src.tumor

    def set_source(self, store: str) -> None:
        """Use the prediction store ``store`` (a path from a heatmap layer's metadata)."""
        self._refresh_sources()
        idx = source_index(self.source_combo, store)
        self.source_combo.setCurrentIndex(idx)
        self._on_source_choice(idx)

    # =========================================================================== score
    def set_gene_set(self, genes: Any) -> None:
        """Set the gene set (text, list, ``{gene: weight}`` or ``None`` = default)."""
        if genes is None:
            text = ", ".join(DEFAULT_TUMOR_GENES)
        elif isinstance(genes, str):
            text = genes
        else:
            text = Signature.create(genes).to_text()
        self.genes_edit.setText(text)

    def _signature(self) -> Signature | None:
        text = self.genes_edit.text().strip()
        if text == ", ".join(DEFAULT_TUMOR_GENES):
            return None  # the default: genes the model lacks are dropped and reported
        return parse_gene_set(text)

    def compute(self, *, background: bool = True) -> None:
        """Score every predicted tile of the store (worker thread; no model call).

        Errors (empty gene set, genes the model does not predict, nothing predicted yet) go to a
        notification and the readout.
        """
        src = self._source
        if src is None:
            self._fail("no prediction store: add heatmaps with the Predict expression widget")
            return
        try:
            sig = self._signature()
        except StPredictError as err:
            self._fail(str(err))
            return
        self._seq += 1
        seq = self._seq
        self.failed = False
        store_path, model = src.store, src.meta.get("model")
        self.readout.setText("computing the tumour score…")

        def work() -> Any:
            store = open_store(store_path)
            return store.grid, score_store(store, gene_set=sig, model=model or None)

        start_worker(
            work,
            returned=lambda result: self._on_score(seq, result),
            workers=None,
            inline=not background,
        )

    def _on_score(self, seq: int, result: Any) -> None:
        if seq != self._seq:
            return
        if isinstance(result, Failed):
            self._fail(result.text)
            return
        grid, score = result
        used = ", ".join(
            f"{g}" if w == 1 else f"{g}:{w:g}"
            for g, w in zip(score.genes, score.weights, strict=True)
        )
        info = f"using {used}"
        if score.missing:
            info += f"; not in the model: {', '.join(score.missing)}"
        self.genes_info.setText(info)
        self.genes_info.setStyleSheet("color: #e8a33d;" if score.missing else "")
        try:
            self.state.set_score(grid, score)
        except StPredictError as err:
            self._fail(str(err))
            return
        lo, hi = self.state.range
        self.threshold_spin.blockSignals(True)
        self.threshold_spin.setRange(lo, hi)
        self.threshold_spin.blockSignals(False)
        self._set_threshold_enabled(True)
        self._sync_threshold()
        self.score_ready.emit(score)

    def _fail(self, text: str) -> None:
        self.failed = True
        self.readout.setText(text)
        notify("error", text)

    # =========================================================================== threshold
    def auto_threshold(self) -> float | None:
        """Set Otsu's threshold of the (smoothed) scores of the predicted tiles."""
        try:
            value = self.state.auto_threshold()
        except StPredictError as err:
            self._fail(str(err))
            return None
        self._sync_threshold()
        return value

    def set_threshold(self, value: float, *, method: str = "manual") -> None:
        """Set the threshold (within the score range) and update the mask at once.

        Raises
        ------
        StPredictError
            Before a score exists, or outside the score range.
        """
        self.state.set_threshold(value, method=method)
        self._sync_threshold()

    def _sync_threshold(self) -> None:
        value = self.state.threshold
        if value is None:
            return
        lo, hi = self.state.range
        self.slider.blockSignals(True)
        self.threshold_spin.blockSignals(True)
        self.slider.setValue(round((value - lo) / (hi - lo) * SLIDER_STEPS))
        self.threshold_spin.setValue(value)
        self.slider.blockSignals(False)
        self.threshold_spin.blockSignals(False)

    def _on_slider(self, step: int) -> None:
        if self.state.score is not None:
            lo, hi = self.state.range
            self.set_threshold(lo + (hi - lo) * step / SLIDER_STEPS)

    def _on_spin(self, value: float) -> None:
        if self.state.score is not None:
            self.set_threshold(value)

    def set_smoothing(self, sigma: float) -> None:
        """Gaussian smoothing of the kept score (σ in tiles) before the threshold."""
        if self.smooth_spin.value() != sigma:
            self.smooth_spin.setValue(sigma)  # re-enters through valueChanged
            return
        self.state.set_smoothing(float(sigma))

    def set_min_size(self, tiles: int) -> None:
        """Drop tumour regions smaller than ``tiles`` grid tiles."""
        if self.min_size_spin.value() != tiles:
            self.min_size_spin.setValue(int(tiles))
            return
        self.state.set_min_size(int(tiles))

    def _on_mask(self, area: Any) -> None:
        self._update_layers()
        self.readout.setText(f"{area.text()} ({area.tissue_cells} predicted tiles)")
        self.mask_changed.emit(area)

    def tumor_map(self) -> Any:
        """The current state as a :class:`~napari_stpredict.tumor.TumorMap` (for exports)."""
        return self.state.tumor_map()

    def closeEvent(self, event: Any) -> None:
        self._seq += 1  # a score still being computed is dropped
        super().closeEvent(event)
