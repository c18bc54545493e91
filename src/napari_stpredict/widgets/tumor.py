"""The "Tumour localization" dock widget: a thresholded tumour score as a Labels layer.

UI wiring only. The score is computed once from the prediction store (a worker thread reads the
gene planes; no model call) and kept; moving the threshold slider, the smoothing or the minimum
region size recomputes the mask from that kept score on the GUI thread (grid-sized arrays:
instant). The Labels layer (tumour = 1) is registered like the heatmaps and carries
``metadata["stpredict"]`` with ``kind="tumor"``, ``threshold`` and ``genes`` so the Export widget
and the GeoJSON writer find everything through it. Public methods (``set_source``,
``set_gene_set``, ``compute``, ``set_threshold``, ``auto_threshold``, ``set_smoothing``,
``set_min_size``) are what the buttons call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSlider,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_stpredict.errors import StPredictError
from napari_stpredict.tumor import (
    DEFAULT_TUMOR_GENES,
    Signature,
    TumorArea,
    TumorMap,
    TumorScore,
    otsu_threshold,
    parse_gene_set,
    score_store,
    smooth_score,
    tumor_area,
    tumor_mask,
)
from napari_stpredict.widgets._sources import (
    Failed,
    StoreSource,
    notify,
    open_store,
    store_sources,
    tumor_layer_name,
)

if TYPE_CHECKING:
    import napari

#: Steps of the threshold slider over the score range.
SLIDER_STEPS = 1000
#: Colour of tumour cells (RGBA) and layer opacity.
TUMOR_RGBA = (0.9, 0.1, 0.1, 1.0)
OPACITY = 0.4


class TumorWidget(QWidget):
    """Dock widget "Tumour localization".

    Parameters
    ----------
    napari_viewer
        The viewer (npe2 passes it).

    Attributes
    ----------
    score
        The kept raw :class:`~napari_stpredict.tumor.TumorScore` (``None`` before
        :meth:`compute`).
    threshold
        The current threshold.
    mask
        The current (gh, gw) bool tumour mask.
    layer
        The Labels layer (tumour = 1).
    """

    #: Emitted after a new score is in place (GUI thread).
    score_ready = Signal(object)
    #: Emitted after the mask changed: the :class:`~napari_stpredict.tumor.TumorArea`.
    mask_changed = Signal(object)

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.score: TumorScore | None = None
        self.threshold: float | None = None
        self.threshold_method = "otsu"
        self.mask: np.ndarray | None = None
        self.area: TumorArea | None = None
        self.layer: Any = None
        self._source: StoreSource | None = None
        self._grid: Any = None
        self._smoothed: np.ndarray | None = None
        self._range = (0.0, 1.0)
        self._workers: set[Any] = set()
        self._seq = 0
        self._build_ui()
        self.viewer.layers.events.inserted.connect(self._refresh_sources)
        self.viewer.layers.events.removed.connect(self._on_layer_removed)
        self._refresh_sources()

    # =========================================================================== UI
    def _build_ui(self) -> None:
        layout = QVBoxLayout(self)
        box = QGroupBox("Predictions")
        form = QFormLayout(box)
        self.source_combo = QComboBox()
        self.source_combo.setToolTip("The prediction store behind the heatmap layers")
        self.source_combo.currentIndexChanged.connect(self._on_source_choice)
        form.addRow("Store", self.source_combo)
        layout.addWidget(box)

        box = QGroupBox("Tumour score")
        form = QFormLayout(box)
        self.genes_edit = QLineEdit(", ".join(DEFAULT_TUMOR_GENES))
        self.genes_edit.setToolTip(
            "Genes of the signature, separated by commas; GENE:WEIGHT for a weight "
            "(e.g. COL1A1:-1 for a gene low in tumour). Score = weighted mean z-score against "
            "the model's training data."
        )
        self.genes_edit.returnPressed.connect(self.compute)
        form.addRow("Genes", self.genes_edit)
        row = QHBoxLayout()
        self.default_button = QPushButton("Default")
        self.default_button.setToolTip("ERBB2, KRT19, EPCAM, KRT8, KRT18, CDH1 (see docs)")
        self.default_button.clicked.connect(lambda: self.set_gene_set(None))
        self.compute_button = QPushButton("Compute score")
        self.compute_button.setToolTip("Read the predictions (no model call) and score every cell")
        self.compute_button.clicked.connect(self.compute)
        row.addWidget(self.default_button)
        row.addWidget(self.compute_button, 1)
        form.addRow(row)
        self.genes_info = QLabel("")
        self.genes_info.setWordWrap(True)
        form.addRow(self.genes_info)
        layout.addWidget(box)

        box = QGroupBox("Threshold")
        form = QFormLayout(box)
        self.threshold_spin = QDoubleSpinBox()
        self.threshold_spin.setDecimals(3)
        self.threshold_spin.setSingleStep(0.05)
        self.threshold_spin.setToolTip("Cells whose score is at least this are tumour")
        self.threshold_spin.valueChanged.connect(self._on_spin)
        form.addRow("Score ≥", self.threshold_spin)
        self.slider = QSlider(Qt.Orientation.Horizontal)
        self.slider.setRange(0, SLIDER_STEPS)
        self.slider.setToolTip("Threshold over the range of the scores (recomputed instantly)")
        self.slider.valueChanged.connect(self._on_slider)
        form.addRow(self.slider)
        self.auto_button = QPushButton("Auto (Otsu)")
        self.auto_button.setToolTip("Otsu's threshold of the scores of the predicted tissue cells")
        self.auto_button.clicked.connect(self.auto_threshold)
        form.addRow(self.auto_button)
        self.smooth_spin = QDoubleSpinBox()
        self.smooth_spin.setRange(0.0, 20.0)
        self.smooth_spin.setSingleStep(0.5)
        self.smooth_spin.setSuffix(" cells")
        self.smooth_spin.setToolTip(
            "Gaussian smoothing of the score before thresholding (σ in grid cells)"
        )
        self.smooth_spin.valueChanged.connect(self.set_smoothing)
        form.addRow("Smoothing", self.smooth_spin)
        self.min_size_spin = QSpinBox()
        self.min_size_spin.setRange(0, 1_000_000)
        self.min_size_spin.setSuffix(" cells")
        self.min_size_spin.setToolTip("Drop tumour regions smaller than this many grid cells")
        self.min_size_spin.valueChanged.connect(self.set_min_size)
        form.addRow("Min. region", self.min_size_spin)
        layout.addWidget(box)

        self.readout = QLabel("pick a prediction store and compute the score")
        self.readout.setWordWrap(True)
        self.readout.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(self.readout)
        layout.addStretch(1)
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
        self.source_combo.blockSignals(True)
        self.source_combo.clear()
        for path, src in sources.items():
            self.source_combo.addItem(src.label, path)
        idx = self.source_combo.findData(current) if current else -1
        self.source_combo.setCurrentIndex(idx if idx >= 0 else (0 if sources else -1))
        self.source_combo.blockSignals(False)
        if sources and (current is None or idx < 0):
            self._on_source_choice(self.source_combo.currentIndex())
        elif current in sources:
            self._source = sources[current]
        elif not sources:
            self._source = None

    def _on_layer_removed(self, event: Any) -> None:
        if event.value is self.layer:
            self.layer = None
        self._refresh_sources()

    def _on_source_choice(self, index: int) -> None:
        path = self.source_combo.itemData(index) if index >= 0 else None
        sources = store_sources(self.viewer)
        src = sources.get(path) if path else None
        changed = (src.store if src else None) != (self._source.store if self._source else None)
        self._source = src
        if changed:
            self.score = None
            self._set_threshold_enabled(False)
            if src is not None and src.tumor is not None:
                self.layer = src.tumor

    def set_source(self, store: str) -> None:
        """Use the prediction store ``store`` (a path from a heatmap layer's metadata)."""
        self._refresh_sources()
        idx = self.source_combo.findData(str(store))
        if idx < 0:
            raise StPredictError(
                f"{store}: no heatmap layer of this prediction store in the viewer"
            )
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
        """Score every predicted cell of the store (worker thread; no model call).

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
        store_path, model = src.store, src.meta.get("model")
        self.readout.setText("computing the tumour score…")

        def work() -> Any:
            try:
                store = open_store(store_path)
                return store.grid, score_store(store, gene_set=sig, model=model or None)
            except Exception as err:  # reported in the widget, never lost in the thread
                return Failed(err)

        if not background:
            self._on_score(seq, src, work())
            return
        from napari.qt.threading import create_worker

        worker = create_worker(work, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(lambda result: self._on_score(seq, src, result))
        worker.finished.connect(lambda: self._workers.discard(worker))
        self._workers.add(worker)
        worker.start()

    def _on_score(self, seq: int, src: StoreSource, result: Any) -> None:
        if seq != self._seq:
            return
        if isinstance(result, Failed):
            self._fail(result.text)
            return
        grid, score = result
        if not score.predicted.any():
            self._fail("nothing is predicted yet: let the heatmaps fill in first")
            return
        self._grid = grid
        self.score = score
        used = ", ".join(
            f"{g}" if w == 1 else f"{g}:{w:g}"
            for g, w in zip(score.genes, score.weights, strict=True)
        )
        info = f"using {used}"
        if score.missing:
            info += f"; not in the model: {', '.join(score.missing)}"
        self.genes_info.setText(info)
        self.genes_info.setStyleSheet("color: #e8a33d;" if score.missing else "")
        self._smoothed = smooth_score(score.score, self.smooth_spin.value())
        lo, hi = score.range()
        self._range = (lo, hi if hi > lo else lo + 1e-6)
        self.threshold_spin.blockSignals(True)
        self.threshold_spin.setRange(lo, self._range[1])
        self.threshold_spin.blockSignals(False)
        self._set_threshold_enabled(True)
        if self.threshold is None or not lo <= self.threshold <= hi:
            self.auto_threshold()
        else:
            self.set_threshold(self.threshold, method=self.threshold_method)
        self.score_ready.emit(score)

    def _fail(self, text: str) -> None:
        self.readout.setText(text)
        notify("error", text)

    # =========================================================================== threshold
    def auto_threshold(self) -> float | None:
        """Set Otsu's threshold of the (smoothed) scores of the predicted cells."""
        if self.score is None or self._smoothed is None:
            return None
        try:
            thr = otsu_threshold(self._smoothed)
        except StPredictError as err:
            self._fail(str(err))
            return None
        self.set_threshold(min(max(thr, self._range[0]), self._range[1]), method="otsu")
        return self.threshold

    def set_threshold(self, value: float, *, method: str = "manual") -> None:
        """Set the threshold (within the score range) and update the mask at once.

        Raises
        ------
        StPredictError
            Before a score exists, or outside the score range.
        """
        if self.score is None:
            raise StPredictError("tumour threshold: compute the score first")
        lo, hi = self._range
        value = float(value)
        if not lo - 1e-9 <= value <= hi + 1e-9:
            raise StPredictError(
                f"threshold {value:.4g}: outside the score range [{lo:.4g}, {hi:.4g}]"
            )
        self.threshold = value
        self.threshold_method = method
        self.slider.blockSignals(True)
        self.threshold_spin.blockSignals(True)
        self.slider.setValue(round((value - lo) / (hi - lo) * SLIDER_STEPS))
        self.threshold_spin.setValue(value)
        self.slider.blockSignals(False)
        self.threshold_spin.blockSignals(False)
        self._apply()

    def _on_slider(self, step: int) -> None:
        if self.score is None:
            return
        lo, hi = self._range
        self.set_threshold(lo + (hi - lo) * step / SLIDER_STEPS)

    def _on_spin(self, value: float) -> None:
        if self.score is not None:
            self.set_threshold(value)

    def set_smoothing(self, sigma: float) -> None:
        """Gaussian smoothing of the kept score (σ in cells) before the threshold."""
        if self.smooth_spin.value() != sigma:
            self.smooth_spin.setValue(sigma)
            return
        if self.score is not None:
            self._smoothed = smooth_score(self.score.score, float(sigma))
            self._apply()

    def set_min_size(self, cells: int) -> None:
        """Drop tumour regions smaller than ``cells`` grid cells."""
        if self.min_size_spin.value() != cells:
            self.min_size_spin.setValue(int(cells))
            return
        if self.score is not None:
            self._apply()

    def _apply(self) -> None:
        """Mask from the kept (smoothed) score: no store read, no model call."""
        assert self.score is not None and self._smoothed is not None and self.threshold is not None
        self.mask = tumor_mask(
            self._smoothed, self.threshold, min_size=self.min_size_spin.value(), check_range=False
        )
        self.area = tumor_area(self.mask, self._grid, tissue=self.score.predicted)
        self._update_layer()
        self.readout.setText(f"{self.area.text()} ({self.area.tissue_cells} predicted cells)")
        self.mask_changed.emit(self.area)

    # =========================================================================== layer
    def layer_metadata(self) -> dict[str, Any]:
        """``metadata["stpredict"]`` of the Labels layer (``kind="tumor"``)."""
        assert self._source is not None and self.score is not None
        base = {k: v for k, v in self._source.meta.items() if k != "gene"}
        return {
            **base,
            "kind": "tumor",
            "threshold": float(self.threshold or 0.0),
            "threshold_method": self.threshold_method,
            "genes": list(self.score.genes),
            "weights": list(self.score.weights),
            "smooth_sigma_cells": float(self.smooth_spin.value()),
            "min_size_cells": int(self.min_size_spin.value()),
        }

    def _update_layer(self) -> None:
        assert self.mask is not None and self._source is not None
        data = self.mask.astype(np.uint8)
        meta = {"stpredict": self.layer_metadata()}
        if (
            self.layer is not None
            and self.layer in self.viewer.layers
            and self.layer.data.shape == data.shape
        ):
            self.layer.data[...] = data
            self.layer.metadata = meta
            self.layer.refresh()
            return
        from napari.utils.colormaps import DirectLabelColormap

        ref = self._source.reference_layer
        kwargs = {}
        if ref is not None:
            kwargs = {"scale": tuple(ref.scale)[-2:], "translate": tuple(ref.translate)[-2:]}
            units = getattr(ref, "units", None)
            if units is not None:
                # same units as the heatmaps and the slide, else napari drops units for all
                kwargs["units"] = tuple(str(u) for u in units)[-2:]
        cmap = DirectLabelColormap(color_dict={None: (0, 0, 0, 0), 0: (0, 0, 0, 0), 1: TUMOR_RGBA})
        self.layer = self.viewer.add_labels(
            data,
            name=tumor_layer_name(self._source),
            opacity=OPACITY,
            metadata=meta,
            colormap=cmap,
            **kwargs,
        )

    def tumor_map(self) -> TumorMap:
        """The current state as a :class:`~napari_stpredict.tumor.TumorMap` (for exports)."""
        if self.score is None or self.mask is None or self.threshold is None:
            raise StPredictError("tumour map: compute the score first")
        return TumorMap(
            self.score,
            self.threshold,
            self.mask.copy(),
            self.threshold_method,
            float(self.smooth_spin.value()),
            int(self.min_size_spin.value()),
        )

    def closeEvent(self, event: Any) -> None:
        for w in list(self._workers):
            w.quit()
        super().closeEvent(event)
