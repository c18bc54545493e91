"""The "Measured vs predicted" dock: the user's spatial data over the predicted heatmap.

A thin Qt view over :mod:`napari_stpredict.st.measured`. Pick a heatmap layer (gene, store,
model and slide come from its metadata) and the spatial data of that slide (a dataset
manifest + section, an ``.h5ad`` with ``obsm["spatial"]`` or a Space Ranger ``outs``
folder); **Load spots** reads them in a worker, normalises them like the model's training
data and adds a Points layer, one disc per spot, coloured by the same gene with the same
colormap and contrast limits as the heatmap. The dock shows the Pearson r between measured
and predicted at the spots (the tile under each spot centre); **Show predicted** flips the
spot colours between the measured and the predicted value, so the two can be compared in
place. Spots whose tile is not predicted yet are drawn hollow; **Recompute r** re-reads the
store after more of the slide has been predicted.

The Points layer carries ``metadata["stpredict"] = {"kind": "measured", "gene", "source",
"store", "heatmap", "showing": "measured"|"predicted", "r", "n_spots"}``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QWidget,
)

from napari_stpredict.widgets._common import Failed, WorkerSet, notify, start_worker
from napari_stpredict.widgets._heatmaps import level0_to_world
from napari_stpredict.widgets._qt import button_row, dock_layout, path_row, push_button, section
from napari_stpredict.widgets._sources import stpredict_meta

if TYPE_CHECKING:
    import napari

#: Colour of spots whose tile has no prediction yet (RGBA), and their outline.
NO_VALUE_RGBA = (0.6, 0.6, 0.6, 0.0)
EDGE_RGBA = (1.0, 1.0, 1.0, 0.9)
NAME_SUFFIX = " (measured spots)"


def spot_colours(values: np.ndarray, layer: Any) -> np.ndarray:
    """RGBA of ``values`` through a heatmap layer's colormap and contrast limits (NaN → clear)."""
    lo, hi = (float(v) for v in layer.contrast_limits)
    t = (np.asarray(values, np.float64) - lo) / (hi - lo if hi > lo else 1.0)
    rgba = np.asarray(layer.colormap.map(np.clip(np.nan_to_num(t), 0.0, 1.0)), np.float32)
    rgba = rgba.reshape(-1, 4).copy()
    rgba[np.isnan(values)] = NO_VALUE_RGBA
    return rgba


def _load(source: str, section_name: str | None, heat_meta: dict, slide_shape) -> tuple:
    """Worker body: read + normalise the spots, open the store, compare (no Qt)."""
    from napari_stpredict.inference.store import PredictionStore
    from napari_stpredict.st.measured import compare, load_measured

    store = PredictionStore.from_path(heat_meta["store"])
    try:
        measured = load_measured(
            source,
            section=section_name or None,
            model=heat_meta.get("model") or None,
            genes=store.genes,
            slide_shape=slide_shape,
        )
        comparison = compare(measured, store)
    finally:
        store.close()
    return measured, comparison


def _recompare(measured: Any, store_path: str) -> Any:
    from napari_stpredict.inference.store import PredictionStore
    from napari_stpredict.st.measured import compare

    store = PredictionStore.from_path(store_path)
    try:
        return compare(measured, store)
    finally:
        store.close()


class MeasuredWidget(QWidget):
    """Compare the user's measured spots with the predicted heatmap of the same gene."""

    def __init__(self, napari_viewer: napari.Viewer, *, inline: bool = False) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.inline = inline  # tests and scripts: run the worker in this thread
        self.workers = WorkerSet()
        self.measured: Any = None
        self.comparison: Any = None
        self.points: Any = None
        self._heatmap: Any = None
        self._pending_section: str | None = None

        body = dock_layout(self)
        form_w = QWidget()
        form = QFormLayout(form_w)
        self.heatmap_combo = QComboBox()
        self.heatmap_combo.setToolTip("The predicted heatmap to compare with (gene, store, model)")
        form.addRow("Heatmap", self.heatmap_combo)
        self.source_edit = QLineEdit()
        self.source_edit.setPlaceholderText("manifest.yaml, data.h5ad or Space Ranger outs/")
        self.source_edit.editingFinished.connect(self._source_changed)
        row = path_row(
            self.source_edit, "…", self._browse, tooltip="Choose a manifest or .h5ad file"
        )
        form.addRow("Spatial data", row)
        self.section_combo = QComboBox()
        self.section_combo.setToolTip("The manifest section of this slide")
        form.addRow("Section", self.section_combo)
        self.load_button = push_button("Load spots", self.load)
        self.flip_button = QPushButton("Show predicted")
        self.flip_button.setCheckable(True)
        self.flip_button.setEnabled(False)
        self.flip_button.toggled.connect(self._flip)
        self.refresh_button = push_button("Recompute r", self.recompute, enabled=False)
        form.addRow(button_row(self.load_button, self.flip_button, self.refresh_button))
        self.r_label = QLabel("r: load the measured spots")
        self.r_label.setWordWrap(True)
        form.addRow(self.r_label)
        body.add(section("Measured vs predicted", form_w))
        body.layout_.addStretch(1)

        self.viewer.layers.events.inserted.connect(self._refresh_heatmaps)
        self.viewer.layers.events.removed.connect(self._refresh_heatmaps)
        self.heatmap_combo.currentIndexChanged.connect(self._heatmap_changed)
        self._refresh_heatmaps()

    # ------------------------------------------------------------------ inputs
    def _heatmap_layers(self) -> list[Any]:
        return [
            lyr
            for lyr in self.viewer.layers
            if (stpredict_meta(lyr) or {}).get("kind") == "heatmap"
        ]

    def _refresh_heatmaps(self, *_: Any) -> None:
        current = self.heatmap_combo.currentText()
        names = [lyr.name for lyr in self._heatmap_layers()]
        self.heatmap_combo.blockSignals(True)
        self.heatmap_combo.clear()
        self.heatmap_combo.addItems(names)
        if current in names:
            self.heatmap_combo.setCurrentText(current)
        self.heatmap_combo.blockSignals(False)
        if self.points is not None and self.points not in self.viewer.layers:
            self.points = None
        self._heatmap_changed()

    def heatmap_layer(self) -> Any:
        name = self.heatmap_combo.currentText()
        for lyr in self._heatmap_layers():
            if lyr.name == name:
                return lyr
        return None

    def _heatmap_changed(self, *_: Any) -> None:
        layer = self.heatmap_layer()
        if layer is self._heatmap:
            return
        if self._heatmap is not None:
            self._heatmap.events.contrast_limits.disconnect(self._recolour)
            self._heatmap.events.colormap.disconnect(self._recolour)
        self._heatmap = layer
        if layer is not None:
            layer.events.contrast_limits.connect(self._recolour)
            layer.events.colormap.connect(self._recolour)
        if self.comparison is not None:
            self._show()

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self,
            "Spatial data of this slide",
            "",
            "Manifest or AnnData (*.yaml *.yml *.json *.h5ad)",
        )
        if path:
            self.set_source(path)

    def set_source(self, path: str | Path, section_name: str | None = None) -> None:
        """Set the spatial data (and the manifest section) to load."""
        self.source_edit.setText(str(path))
        self._pending_section = section_name  # applied when the sections are listed
        self._source_changed()

    def _source_changed(self) -> None:
        from napari_stpredict.st.measured import manifest_sections

        # reading the manifest touches the file system: off the GUI thread
        start_worker(
            manifest_sections, self.source_edit.text().strip(),
            returned=self._sections_listed, workers=self.workers, inline=self.inline,
        )  # fmt: skip

    def _sections_listed(self, names: Any) -> None:
        if isinstance(names, Failed):
            self.r_label.setText(f"r: {names.text}")
            names = []
        pending = self._pending_section
        self.section_combo.clear()
        self.section_combo.addItems(names)
        self.section_combo.setEnabled(bool(names))
        if pending in names:
            self.section_combo.setCurrentText(pending)
        self._pending_section = None

    # ------------------------------------------------------------------ actions
    def load(self) -> None:
        """Read the spots and compare them with the heatmap's store (in a worker)."""
        layer = self.heatmap_layer()
        source = self.source_edit.text().strip()
        if layer is None or not source:
            self.r_label.setText("r: pick a heatmap layer and the slide's spatial data first")
            return
        meta = stpredict_meta(layer) or {}
        shape = (meta.get("grid") or {}).get("shape0")
        section_name = self.section_combo.currentText() if self.section_combo.count() else None
        self.load_button.setEnabled(False)
        self.r_label.setText("r: loading spots …")
        start_worker(
            _load, source, section_name, meta, tuple(shape) if shape else None,
            returned=self._loaded, workers=self.workers, inline=self.inline,
        )  # fmt: skip

    def _loaded(self, result: Any) -> None:
        self.load_button.setEnabled(True)
        if isinstance(result, Failed):
            self.r_label.setText(f"r: {result.text}")
            notify("error", result.text)
            return
        self.measured, self.comparison = result
        self.flip_button.setEnabled(True)
        self.refresh_button.setEnabled(True)
        self._show()

    def recompute(self) -> None:
        """Re-read the store (after more tiles were predicted) and update r and colours."""
        layer = self.heatmap_layer()
        if self.measured is None or layer is None:
            return
        store = (stpredict_meta(layer) or {})["store"]
        start_worker(
            _recompare, self.measured, store,
            returned=self._recompared, workers=self.workers, inline=self.inline,
        )  # fmt: skip

    def _recompared(self, result: Any) -> None:
        if isinstance(result, Failed):
            self.r_label.setText(f"r: {result.text}")
            return
        self.comparison = result
        self._show()

    def _flip(self, *_: Any) -> None:
        self.flip_button.setText(
            "Show measured" if self.showing == "predicted" else "Show predicted"
        )
        self._recolour()

    @property
    def showing(self) -> str:
        """``"measured"`` or ``"predicted"``: what the spot colours show."""
        return "predicted" if self.flip_button.isChecked() else "measured"

    # ------------------------------------------------------------------ display
    def gene(self) -> str | None:
        layer = self.heatmap_layer()
        return (stpredict_meta(layer) or {}).get("gene") if layer is not None else None

    def r_text(self) -> str:
        from napari_stpredict.st.measured import MIN_SPOTS

        gene, comp = self.gene(), self.comparison
        if comp is None or gene is None:
            return "r: load the measured spots"
        if gene not in comp.genes:
            return f"r: {gene} was not measured in this data"
        r = comp.r.get(gene, float("nan"))
        n_all = len(comp.cells)
        if comp.n_spots < MIN_SPOTS or math.isnan(r):
            return (
                f"{gene}: r needs ≥ {MIN_SPOTS} spots with a predicted tile ({comp.n_spots} of "
                f"{n_all} now): predict the tissue under the spots, then Recompute r"
            )
        return (
            f"{gene}: Pearson r = {r:.2f} between measured and predicted at {comp.n_spots} of "
            f"{n_all} spots (tile under each spot)"
        )

    def _values(self) -> np.ndarray | None:
        gene, comp = self.gene(), self.comparison
        if comp is None or gene is None or gene not in comp.genes:
            return None
        k = comp.index(gene)
        return (comp.predicted if self.showing == "predicted" else comp.measured)[:, k]

    def _show(self) -> None:
        """Add or update the Points layer over the heatmap's slide."""
        layer = self.heatmap_layer()
        self.r_label.setText(self.r_text())
        if layer is None or self.measured is None:
            return
        meta = stpredict_meta(layer) or {}
        slide = next(
            (lyr for lyr in self.viewer.layers if lyr.name == meta.get("slide_layer")), layer
        )
        yx = self.measured.xy[:, ::-1]
        if slide is not layer:
            pos = level0_to_world(slide, yx)
            unit = float(np.asarray(slide.scale)[-1])
        else:  # no slide layer: place through the grid's µm/px like the heatmap
            mpp = (meta.get("grid") or {}).get("mpp") or 1.0
            pos, unit = (yx - 0.5) * mpp, float(mpp)
        d = self.measured.diameter_px
        if not np.isfinite(d):
            d = self.measured.pitch_px / 2 if np.isfinite(self.measured.pitch_px) else 10.0
        gene = self.gene() or ""
        pmeta = {
            "kind": "measured",
            "gene": gene,
            "source": self.measured.source,
            "store": meta.get("store"),
            "heatmap": layer.name,
            "showing": self.showing,
            "r": (self.comparison.r.get(gene) if self.comparison is not None else None),
            "n_spots": self.comparison.n_spots if self.comparison is not None else 0,
        }
        if self.points is None or self.points not in self.viewer.layers:
            self.points = self.viewer.add_points(
                pos,
                size=d * unit,
                name=f"{self.measured.name}{NAME_SUFFIX}",
                border_color=[EDGE_RGBA],
                border_width=0.06,
                border_width_is_relative=True,
                face_color="transparent",
                metadata={"stpredict": pmeta},
            )
        else:
            self.points.data = pos
            self.points.metadata = {**self.points.metadata, "stpredict": pmeta}
        self._recolour()

    def _recolour(self, *_: Any) -> None:
        layer, values = self.heatmap_layer(), self._values()
        if self.points is None or layer is None or values is None:
            return
        self.points.face_color = spot_colours(values, layer)
        meta = dict(self.points.metadata.get("stpredict", {}))
        meta.update(showing=self.showing, gene=self.gene())
        self.points.metadata = {**self.points.metadata, "stpredict": meta}
        self.points.refresh()
        self.r_label.setText(self.r_text())

    def closeEvent(self, event: Any) -> None:
        self.workers.quit_all()
        super().closeEvent(event)
