"""The "Export" dock widget: write heatmaps, tumour regions and per-cell tables to files.

UI wiring only: the files are written by :mod:`napari_stpredict.export` in a worker thread. The
prediction store, grid, model and slide come from the heatmap layers' metadata; the tumour mask
from the tumour Labels layer (so brush corrections a user painted are exported too). Public
methods (``set_source``, ``set_kinds``, ``set_folder``, ``export``) are what the button calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_stpredict.errors import StPredictError
from napari_stpredict.widgets._sources import (
    Failed,
    StoreSource,
    notify,
    open_store,
    slide_layer_of,
    store_sources,
    stpredict_meta,
)

if TYPE_CHECKING:
    import napari

#: (kind, check box text) in the order they are written.
KINDS: tuple[tuple[str, str], ...] = (
    ("ome-tiff", "Heatmaps: pyramidal OME-TIFF (QuPath, any OME reader)"),
    ("geojson", "Tumour regions: QuPath GeoJSON"),
    ("mask-ome-tiff", "Tumour mask: OME-TIFF"),
    ("h5ad", "Per-cell predictions: AnnData .h5ad (scanpy, squidpy)"),
    ("csv", "Per-cell predictions: CSV"),
    ("png", "Figure of the current view: PNG"),
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
        self._workers: set[Any] = set()
        self._build_ui()
        self.viewer.layers.events.inserted.connect(self._refresh_sources)
        self.viewer.layers.events.removed.connect(self._refresh_sources)
        self._refresh_sources()

    # =========================================================================== UI
    def _build_ui(self) -> None:
        layout = QVBoxLayout(self)
        box = QGroupBox("Predictions")
        form = QFormLayout(box)
        self.source_combo = QComboBox()
        self.source_combo.currentIndexChanged.connect(self._on_source_choice)
        form.addRow("Store", self.source_combo)
        self.all_genes_check = QCheckBox("All genes of the model (else: the genes shown)")
        form.addRow(self.all_genes_check)
        layout.addWidget(box)

        box = QGroupBox("What")
        vbox = QVBoxLayout(box)
        self.kind_checks: dict[str, QCheckBox] = {}
        for kind, text in KINDS:
            cb = QCheckBox(text)
            cb.setChecked(kind in ("ome-tiff", "geojson", "h5ad"))
            self.kind_checks[kind] = cb
            vbox.addWidget(cb)
        row = QHBoxLayout()
        self.figure_gene_combo = QComboBox()
        self.figure_gene_combo.setToolTip("Gene drawn in the figure")
        self.dpi_spin = QSpinBox()
        self.dpi_spin.setRange(30, 1200)
        self.dpi_spin.setValue(150)
        self.dpi_spin.setSuffix(" dpi")
        row.addWidget(self.figure_gene_combo, 1)
        row.addWidget(self.dpi_spin)
        vbox.addLayout(row)
        layout.addWidget(box)

        box = QGroupBox("Where")
        form = QFormLayout(box)
        row = QHBoxLayout()
        self.folder_edit = QLineEdit(str(Path.cwd()))
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        row.addWidget(self.folder_edit, 1)
        row.addWidget(browse)
        form.addRow("Folder", row)
        self.name_edit = QLineEdit()
        self.name_edit.setPlaceholderText("file name stem (default: the slide's name)")
        form.addRow("Name", self.name_edit)
        self.overwrite_check = QCheckBox("Overwrite existing files")
        form.addRow(self.overwrite_check)
        layout.addWidget(box)

        self.export_button = QPushButton("Export")
        self.export_button.clicked.connect(lambda: self.export())
        layout.addWidget(self.export_button)
        self.report = QPlainTextEdit()
        self.report.setReadOnly(True)
        self.report.setPlaceholderText("what was written appears here")
        self.report.setMinimumHeight(90)
        layout.addWidget(self.report, 1)

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Export to folder", self.folder_edit.text())
        if folder:
            self.set_folder(folder)

    # =========================================================================== sources
    def _refresh_sources(self, event: Any = None) -> None:
        current = self.source_combo.currentData()
        sources = store_sources(self.viewer)
        self.source_combo.blockSignals(True)
        self.source_combo.clear()
        for path, src in sources.items():
            self.source_combo.addItem(src.label, path)
        idx = self.source_combo.findData(current) if current else -1
        self.source_combo.setCurrentIndex(idx if idx >= 0 else (0 if sources else -1))
        self.source_combo.blockSignals(False)
        self._on_source_choice(self.source_combo.currentIndex())

    def _on_source_choice(self, index: int) -> None:
        src = self.source
        genes = src.genes_shown if src else []
        current = self.figure_gene_combo.currentText()
        self.figure_gene_combo.clear()
        self.figure_gene_combo.addItems(genes)
        if current in genes:
            self.figure_gene_combo.setCurrentText(current)
        if src is not None and not self.name_edit.text():
            self.name_edit.setPlaceholderText(Path(str(src.meta.get("slide_path") or "slide")).stem)

    @property
    def source(self) -> StoreSource | None:
        """The selected prediction store and its layers."""
        path = self.source_combo.currentData()
        return store_sources(self.viewer).get(path) if path else None

    def set_source(self, store: str) -> None:
        """Export the prediction store ``store`` (a path from a heatmap layer's metadata)."""
        self._refresh_sources()
        idx = self.source_combo.findData(str(store))
        if idx < 0:
            raise StPredictError(
                f"{store}: no heatmap layer of this prediction store in the viewer"
            )
        self.source_combo.setCurrentIndex(idx)

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
    def _plan(self) -> dict[str, Any]:
        """Everything the worker needs, read from the GUI on the GUI thread."""
        src = self.source
        if src is None:
            raise StPredictError(
                "export: no prediction store (add heatmaps with the Predict expression widget)"
            )
        kinds = [k for k, cb in self.kind_checks.items() if cb.isChecked()]
        if not kinds:
            raise StPredictError("export: tick at least one thing to export")
        folder = Path(self.folder_edit.text().strip()).expanduser()
        if not folder.is_dir():
            raise StPredictError(f"{folder}: output folder does not exist")
        genes = None if self.all_genes_check.isChecked() else (src.genes_shown or None)
        tumor = None
        if any(k in _TUMOR_KINDS for k in kinds) or src.tumor is not None:
            if src.tumor is None:
                if any(k in _TUMOR_KINDS for k in kinds):
                    raise StPredictError(
                        "export: no tumour layer for this store (use the Tumour localization widget first)"
                    )
            else:
                meta = stpredict_meta(src.tumor) or {}
                tumor = {
                    "mask": np.asarray(src.tumor.data) > 0,  # includes the user's brush edits
                    "genes": dict(
                        zip(meta.get("genes", []), meta.get("weights", []), strict=False)
                    ),
                    "threshold": meta.get("threshold"),
                    "method": meta.get("threshold_method", "manual"),
                    "smooth": meta.get("smooth_sigma_cells", 0.0),
                    "min_size": meta.get("min_size_cells", 0),
                }
        region = None
        if "png" in kinds:
            region = self._view_rect(src)
        name = self.name_edit.text().strip() or self.name_edit.placeholderText() or "slide"
        return {
            "store": src.store,
            "meta": dict(src.meta),
            "kinds": kinds,
            "folder": folder,
            "name": name,
            "genes": genes,
            "tumor": tumor,
            "region": region,
            "figure_gene": self.figure_gene_combo.currentText() or None,
            "dpi": int(self.dpi_spin.value()),
            "overwrite": self.overwrite_check.isChecked(),
        }

    def _view_rect(self, src: StoreSource) -> tuple[float, float, float, float] | None:
        """The canvas' view as a level-0 rectangle (``None``: the whole slide)."""
        from napari_stpredict.widgets._heatmaps import world_to_level0

        slide_layer = slide_layer_of(self.viewer, src)
        if slide_layer is None:
            return None
        center = np.asarray(self.viewer.camera.center, dtype=float)[-2:]
        zoom = float(self.viewer.camera.zoom)
        size = np.asarray(self.viewer.canvas.size, dtype=float)[-2:]
        if zoom <= 0 or not np.all(size > 0):
            return None
        half = size / (2.0 * zoom)
        a = world_to_level0(slide_layer, center - half)
        b = world_to_level0(slide_layer, center + half)
        return (float(a[0]), float(a[1]), float(b[0]), float(b[1]))

    def export(self, *, background: bool = True) -> None:
        """Write the ticked exports (worker thread); results go to the report and ``results``."""
        try:
            plan = self._plan()
        except StPredictError as err:
            self._done(err)
            return
        self.busy = True
        self.export_button.setEnabled(False)
        self.report.setPlainText("exporting…")
        if not background:
            self._done(_run_plan(plan))
            return
        from napari.qt.threading import create_worker

        worker = create_worker(_run_plan, plan, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(self._done)
        worker.finished.connect(lambda: self._workers.discard(worker))
        self._workers.add(worker)
        worker.start()

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


def _run_plan(plan: dict[str, Any]) -> Any:
    """Worker: open the store (and slide), build the tumour map, write the exports."""
    try:
        from napari_stpredict.export import export_figure, export_predictions
        from napari_stpredict.tumor import TumorMap, score_store

        store = open_store(plan["store"])
        meta = plan["meta"]
        model = meta.get("model") or None
        slide = None
        if any(k in plan["kinds"] for k in ("png", "h5ad")) and meta.get("slide_path"):
            from napari_stpredict.slide import open_slide

            slide = open_slide(meta["slide_path"], mpp=store.grid.mpp)
        tumor = None
        t = plan["tumor"]
        if t is not None:
            score = score_store(store, gene_set=t["genes"] or None, model=model)
            tumor = TumorMap(
                score,
                float(t["threshold"] or 0.0),
                t["mask"],
                t["method"],
                float(t["smooth"]),
                int(t["min_size"]),
            )
        kinds = [k for k in plan["kinds"] if k != "png"]
        results = []
        if kinds:
            results = export_predictions(
                store,
                plan["folder"],
                name=plan["name"],
                kinds=kinds,
                genes=plan["genes"],
                slide=slide,
                model=model,
                tumor=tumor,
                overwrite=plan["overwrite"],
            )
        if "png" in plan["kinds"]:
            gene = plan["figure_gene"] or store.genes[0]
            dst = Path(plan["folder"]) / f"{plan['name']}_{gene}.png"
            results.append(
                export_figure(
                    store,
                    dst,
                    gene=gene,
                    slide=slide,
                    region=plan["region"],
                    dpi=plan["dpi"],
                    tumor=tumor,
                    model=model,
                    overwrite=plan["overwrite"],
                )
            )
        return results
    except Exception as err:  # never let a worker error vanish: report it in the widget
        return Failed(err)


__all__ = ["KINDS", "ExportWidget"]
