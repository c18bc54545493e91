"""The "Export" dock widget: write heatmaps, tumour regions and per-tile tables to files.

A thin Qt view: it reads the dock into a typed :class:`~._state.ExportPlan` on the GUI thread
and :func:`~._state.run_export_plan` writes the files in a worker thread. The
prediction store, grid, model and slide come from the heatmap layers' metadata; the tumour mask
from the tumour Labels layer (so brush corrections a user painted are exported too). The
SpatialData target (optional extra) writes one ``.zarr`` with or without the slide image. Public
methods (``set_source``, ``set_kinds``, ``set_folder``, ``export``) are what the button calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_stpredict.errors import StPredictError
from napari_stpredict.widgets._common import Failed, notify, start_worker, view_rect_px
from napari_stpredict.widgets._qt import dock_layout, path_row, section
from napari_stpredict.widgets._sources import (
    StoreSource,
    fill_source_combo,
    slide_layer_of,
    source_index,
    store_sources,
    stpredict_meta,
)
from napari_stpredict.widgets._state import ExportPlan, TumorSpec, run_export_plan

if TYPE_CHECKING:
    import napari

#: (kind, check box text) in the order they are written.
KINDS: tuple[tuple[str, str], ...] = (
    ("ome-tiff", "Heatmaps (OME-TIFF)"),
    ("geojson", "Tumour regions (GeoJSON)"),
    ("mask-ome-tiff", "Tumour mask (OME-TIFF)"),
    ("h5ad", "Per-tile table (.h5ad)"),
    ("csv", "Per-tile table (CSV)"),
    ("png", "Figure of the view (PNG)"),
    ("spatialdata", "SpatialData (.zarr)"),
)
#: Tooltips of the check boxes.
KIND_TIPS = {
    "ome-tiff": "Pyramidal OME-TIFF, one channel per gene (QuPath, any OME reader)",
    "geojson": "Tumour regions as QuPath GeoJSON annotations",
    "mask-ome-tiff": "The tumour mask (brush edits included) as an OME-TIFF",
    "h5ad": "Predicted expression per tile as AnnData (scanpy, squidpy)",
    "csv": "Predicted expression per tile as CSV",
    "png": "The current view with one gene's heatmap, its colour bar and a scale bar",
    "spatialdata": "One SpatialData store: tiles + table + tumour regions + slide image, in µm "
    "(napari-spatialdata, squidpy); needs the optional extra napari-stpredict[spatialdata]",
}
#: SpatialData image element choices: (text, ExportPlan.image)
SD_IMAGES: tuple[tuple[str, str | None], ...] = (
    ("Slide image: auto (≤ 2 µm/px)", "auto"),
    ("No slide image", None),
)
_TUMOR_KINDS = ("geojson", "mask-ome-tiff")


class ExportWidget(QWidget):
    """Dock widget "Export".

    Parameters
    ----------
    napari_viewer
        The viewer (npe2 passes it).

    Attributes
    ----------
    results
        The :class:`~napari_stpredict.export.ExportResult` list of the last export.
    """

    #: Emitted (GUI thread) with the list of results (or a StPredictError) when an export ends.
    finished = Signal(object)

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.results: list[Any] = []
        self.busy = False
        self._figure_gene_chosen = False  # the user picked the figure's gene themselves
        self._build_ui()
        self.viewer.layers.events.inserted.connect(self._refresh_sources)
        self.viewer.layers.events.removed.connect(self._refresh_sources)
        self._refresh_sources()

    # =========================================================================== UI
    def _build_ui(self) -> None:
        body = dock_layout(self)
        box = QWidget()
        form = QFormLayout(box)
        self.source_combo = QComboBox()
        self.source_combo.currentIndexChanged.connect(self._on_source_choice)
        form.addRow("Store", self.source_combo)
        self.all_genes_check = QCheckBox("All genes of the model (else: the genes shown)")
        form.addRow(self.all_genes_check)
        body.add(section("Predictions", box))

        box = QWidget()
        vbox = QVBoxLayout(box)
        self.kind_checks: dict[str, QCheckBox] = {}
        for kind, text in KINDS:
            cb = QCheckBox(text)
            cb.setToolTip(KIND_TIPS[kind])
            cb.setChecked(kind in ("ome-tiff", "geojson", "h5ad"))
            self.kind_checks[kind] = cb
            vbox.addWidget(cb)
        row = QHBoxLayout()
        self.figure_gene_combo = QComboBox()
        self.figure_gene_combo.setToolTip(
            "Gene drawn in the figure (default: the top visible heatmap)"
        )
        self.figure_gene_combo.activated.connect(self._on_figure_gene_picked)
        self.dpi_spin = QSpinBox()
        self.dpi_spin.setRange(30, 1200)
        self.dpi_spin.setValue(150)
        self.dpi_spin.setSuffix(" dpi")
        row.addWidget(self.figure_gene_combo, 1)
        row.addWidget(self.dpi_spin)
        vbox.addLayout(row)
        self.sd_image_combo = QComboBox()
        for text, value in SD_IMAGES:
            self.sd_image_combo.addItem(text, value)
        self.sd_image_combo.setToolTip(
            "Image element of the SpatialData export: the coarsest slide level at or below "
            "2 µm/px, or none (a small file with tiles, table and tumour regions only)"
        )
        vbox.addWidget(self.sd_image_combo)
        self.sd_extra_label = QLabel()
        self.sd_extra_label.setWordWrap(True)
        vbox.addWidget(self.sd_extra_label)
        self.kind_checks["spatialdata"].toggled.connect(self._update_spatialdata)
        self._update_spatialdata()
        body.add(section("What", box))

        box = QWidget()
        form = QFormLayout(box)
        self.folder_edit = QLineEdit(str(Path.cwd()))
        form.addRow("Folder", path_row(self.folder_edit, "Browse…", self._browse))
        self.name_edit = QLineEdit()
        self.name_edit.setPlaceholderText("file name stem (default: the slide's name)")
        form.addRow("Name", self.name_edit)
        self.overwrite_check = QCheckBox("Overwrite existing files")
        form.addRow(self.overwrite_check)
        body.add(section("Where", box))

        self.export_button = QPushButton("Export")
        self.export_button.clicked.connect(lambda: self.export())
        body.add(self.export_button)
        self.report = QPlainTextEdit()
        self.report.setReadOnly(True)
        self.report.setPlaceholderText("what was written appears here")
        self.report.setMinimumHeight(60)
        self.report.setMaximumHeight(140)
        body.add(self.report)
        body.layout_.addStretch(1)

    def _update_spatialdata(self, checked: bool | None = None) -> None:
        """Image choice only with SpatialData ticked; the missing extra said in one line."""
        from napari_stpredict.export.spatialdata import have_spatialdata, missing_extra_message

        ticked = self.kind_checks["spatialdata"].isChecked()
        self.sd_image_combo.setEnabled(ticked)
        missing = not have_spatialdata()
        self.sd_extra_label.setText(
            missing_extra_message("the SpatialData export") if missing else ""
        )
        self.sd_extra_label.setVisible(missing)

    def set_spatialdata_image(self, image: str | None) -> None:
        """SpatialData image element: ``"auto"`` or ``None`` (see :data:`SD_IMAGES`)."""
        values = [value for _text, value in SD_IMAGES]
        if image not in values:
            raise StPredictError(f"export image {image!r}: choose 'auto' or None")
        self.sd_image_combo.setCurrentIndex(values.index(image))

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Export to folder", self.folder_edit.text())
        if folder:
            self.set_folder(folder)

    # =========================================================================== sources
    def _refresh_sources(self, event: Any = None) -> None:
        current = self.source_combo.currentData()
        fill_source_combo(self.source_combo, store_sources(self.viewer), current)
        self._on_source_choice(self.source_combo.currentIndex())

    def _figure_genes(self, src: StoreSource | None) -> list[str]:
        """Genes offered for the figure: visible heatmaps (top-most first), then the others."""
        if src is None:
            return []
        visible = src.visible_genes
        return visible + [g for g in src.genes_shown if g not in visible]

    def _on_source_choice(self, index: int) -> None:
        src = self.source
        genes = self._figure_genes(src)
        current = self.figure_gene_combo.currentText()
        self.figure_gene_combo.clear()
        self.figure_gene_combo.addItems(genes)
        if self._figure_gene_chosen and current in genes:
            self.figure_gene_combo.setCurrentText(current)
        if src is not None and not self.name_edit.text():
            self.name_edit.setPlaceholderText(Path(str(src.meta.get("slide_path") or "slide")).stem)

    def _on_figure_gene_picked(self, index: int) -> None:
        self._figure_gene_chosen = index >= 0

    def figure_gene(self) -> str | None:
        """The gene the figure draws: the user's pick, else the top visible heatmap's gene."""
        src = self.source
        genes = self._figure_genes(src)
        current = self.figure_gene_combo.currentText() or None
        if self._figure_gene_chosen and current in genes:
            return current
        return genes[0] if genes else current

    @property
    def source(self) -> StoreSource | None:
        """The selected prediction store and its layers."""
        path = self.source_combo.currentData()
        return store_sources(self.viewer).get(path) if path else None

    def set_source(self, store: str) -> None:
        """Export the prediction store ``store`` (a path from a heatmap layer's metadata)."""
        self._refresh_sources()
        self.source_combo.setCurrentIndex(source_index(self.source_combo, store))

    def set_kinds(self, kinds: list[str]) -> None:
        """Tick exactly ``kinds`` (see :data:`KINDS`)."""
        unknown = [k for k in kinds if k not in self.kind_checks]
        if unknown:
            raise StPredictError(
                f"export kinds {unknown}: choose from {', '.join(self.kind_checks)}"
            )
        for k, cb in self.kind_checks.items():
            cb.setChecked(k in kinds)

    def set_folder(self, folder: str | Path) -> None:
        """Set the output folder."""
        self.folder_edit.setText(str(folder))

    # =========================================================================== export
    def plan(self) -> ExportPlan:
        """Everything the worker needs, read from the dock (GUI thread, no file access)."""
        src = self.source
        if src is None:
            raise StPredictError(
                "export: no prediction store (add heatmaps with the Predict expression widget)"
            )
        kinds = tuple(k for k, cb in self.kind_checks.items() if cb.isChecked())
        if not kinds:
            raise StPredictError("export: tick at least one thing to export")
        folder = Path(self.folder_edit.text().strip()).expanduser()
        if "spatialdata" in kinds:
            from napari_stpredict.export.spatialdata import (
                have_spatialdata,
                missing_extra_message,
            )

            if not have_spatialdata():
                raise StPredictError(missing_extra_message("the SpatialData export"))
        genes = None if self.all_genes_check.isChecked() else (src.genes_shown or None)
        tumor = None
        if src.tumor is not None:
            # the mask includes the user's brush edits
            tumor = TumorSpec.from_layer(src.tumor.data, stpredict_meta(src.tumor) or {})
        elif any(k in _TUMOR_KINDS for k in kinds):
            raise StPredictError(
                "export: no tumour layer for this store (use the Tumour localization widget first)"
            )
        region = None
        if "png" in kinds:
            region = view_rect_px(self.viewer, slide_layer_of(self.viewer, src))
        name = self.name_edit.text().strip() or self.name_edit.placeholderText() or "slide"
        return ExportPlan(
            store=src.store,
            meta=dict(src.meta),
            kinds=kinds,
            folder=folder,
            name=name,
            genes=genes,
            tumor=tumor,
            region=region,
            figure_gene=self.figure_gene(),
            dpi=int(self.dpi_spin.value()),
            overwrite=self.overwrite_check.isChecked(),
            image=SD_IMAGES[max(self.sd_image_combo.currentIndex(), 0)][1],
            tissue=src.meta.get("tissue"),
        )

    def export(self, *, background: bool = True) -> None:
        """Write the ticked exports (worker thread); results go to the report and ``results``."""
        try:
            plan = self.plan()
        except StPredictError as err:
            self._done(Failed(err))
            return
        self.busy = True
        self.export_button.setEnabled(False)
        self.report.setPlainText("exporting…")
        start_worker(run_export_plan, plan, returned=self._done, inline=not background)

    def _done(self, result: Any) -> None:
        self.busy = False
        self.export_button.setEnabled(True)
        if isinstance(result, BaseException):
            result = Failed(result)
        if isinstance(result, Failed):
            text = result.text
            self.report.setPlainText(f"error: {text}")
            notify("error", text)
            self.finished.emit(result.error)
            return
        self.results = list(result)
        lines = [r.message() for r in self.results]
        self.report.setPlainText("\n".join(lines))
        notify(
            "info",
            f"exported {len(lines)} file{'s' if len(lines) != 1 else ''} to {self.results[0].path.parent}",
        )
        self.finished.emit(self.results)


__all__ = ["KINDS", "SD_IMAGES", "ExportWidget"]
