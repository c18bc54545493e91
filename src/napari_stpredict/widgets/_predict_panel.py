"""The Qt controls of the "Predict expression" dock (layout only; :mod:`.predict` wires them).

Sections are collapsible and the whole body scrolls, so the dock fits a 1080p screen beside
the Tumour and Export docks.
"""

from __future__ import annotations

from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QVBoxLayout,
    QWidget,
)

from napari_stpredict.widgets._qt import (
    button_row,
    check_box,
    dock_layout,
    form_spin,
    path_row,
    push_button,
    section,
)
from napari_stpredict.widgets._state import PRESETS

#: Decimals shown by the µm/px box (the value itself is kept exact in the state).
MPP_DECIMALS = 6
#: What the "Test-time augmentation" choice does (its tooltip).
TTA_TOOLTIP = (
    "Average the prediction over flipped/rotated copies of each tile, as `stpredict predict` "
    "does for this model. Every view is one more backbone pass per tile: on a CPU the live "
    "view shows 1 view by default; on a CUDA GPU, the model's. Changing it reopens the session."
)


def build_predict_ui(w: Any) -> None:
    """Create the controls as attributes of the PredictWidget ``w`` and connect them."""
    body = dock_layout(w)
    body.add(section("Model", _model_box(w)))
    body.add(section("Slide", _slide_box(w)))
    body.add(section("Genes", _genes_box(w)))
    body.add(section("Display", _display_box(w)))
    body.add(section("Prediction", _prediction_box(w)))
    #: a place for other docks' parts (E's measured-vs-predicted section)
    w.extra_sections = body
    body.layout_.addStretch(1)


def _model_box(w: Any) -> QWidget:
    """Model file (edit + Browse), what it is, the device, the live view's TTA."""
    box = QWidget()
    form = QFormLayout(box)
    w.model_edit = QLineEdit()
    w.model_edit.setPlaceholderText("model.safetensors")
    w.model_edit.returnPressed.connect(lambda: w.load_model(w.model_edit.text()))
    form.addRow("File", path_row(w.model_edit, "Browse…", w._browse_model))
    w.model_info = QLabel("no model loaded")
    w.model_info.setWordWrap(True)
    w.model_info.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    form.addRow(w.model_info)
    w.device_label = QLabel("—")
    form.addRow("Device", w.device_label)
    w.tta_combo = QComboBox()
    w.tta_combo.setToolTip(TTA_TOOLTIP)
    w.tta_combo.activated.connect(w._on_tta_choice)
    w.tta_label = QLabel("Test-time augmentation")
    w.tta_label.setToolTip(TTA_TOOLTIP)
    # one full-width row: the long label would widen the form's label column
    form.addRow(button_row(w.tta_label, w.tta_combo, stretch=(0, 1)))
    w.tta_note = QLabel("")
    w.tta_note.setStyleSheet("color: #9a9a9a;")
    form.addRow(w.tta_note)
    show_tta_choice(w, [1], 1, label=str, note="")
    return box


def _slide_box(w: Any) -> QWidget:
    """Slide layer, exact µm/px, stride, and a warning line."""
    box = QWidget()
    form = QFormLayout(box)
    w.slide_combo = QComboBox()
    w.slide_combo.currentIndexChanged.connect(w._on_slide_choice)
    form.addRow("Layer", w.slide_combo)
    w.mpp_spin = form_spin(
        form, "µm/px", QDoubleSpinBox, 0.0, 100.0, w._on_mpp_edited,
        signal="editingFinished", decimals=MPP_DECIMALS, step=0.01, special="from slide",
        tooltip="µm per level-0 pixel; 'from slide' uses the slide layer's own value",
    )  # fmt: skip
    w.stride_spin = form_spin(
        form, "Stride", QDoubleSpinBox, 0.0, 10_000.0, w._on_stride_edited,
        signal="editingFinished", decimals=1, step=10.0, special="patch size", suffix=" µm",
        tooltip="Distance between predicted tiles; half the patch size gives a finer map "
        "(4× the model calls)",
    )  # fmt: skip
    w.slide_warning = QLabel("")
    w.slide_warning.setWordWrap(True)
    w.slide_warning.setStyleSheet("color: #e8a33d;")
    w.slide_warning.hide()
    form.addRow(w.slide_warning)
    return box


def _genes_box(w: Any) -> QWidget:
    """Preset menu + None, a search field, the checkable gene list, the count."""
    box = QWidget()
    vbox = QVBoxLayout(box)
    w.preset_combo = QComboBox()
    w.preset_combo.addItems(["Preset…", *PRESETS])
    w.preset_combo.activated.connect(w._on_preset)
    clear_genes = push_button("None", lambda: w.set_genes([]), tooltip="Deselect all genes")
    vbox.addLayout(button_row(w.preset_combo, clear_genes, stretch=(1, 0)))
    w.search_edit = QLineEdit()
    w.search_edit.setPlaceholderText("search genes…")
    w.search_edit.setClearButtonEnabled(True)
    w.search_edit.textChanged.connect(lambda text: filter_gene_list(w.gene_list, text))
    vbox.addWidget(w.search_edit)
    w.gene_list = QListWidget()
    w.gene_list.setMinimumHeight(90)
    w.gene_list.setMaximumHeight(180)
    w.gene_list.itemChanged.connect(w._on_gene_item_changed)
    vbox.addWidget(w.gene_list, 1)
    w.genes_label = QLabel("0 selected")
    vbox.addWidget(w.genes_label)
    return box


def _display_box(w: Any) -> QWidget:
    """Colour bars, smoothing, uncertainty layers (one check box each)."""
    box = QWidget()
    vbox = QVBoxLayout(box)
    for attr, text, slot, checked in (
        ("colorbar_check", "Colour bars with gene name and unit", w.set_colorbars, True),
        ("smooth_check", "Smooth (interpolate between tiles)", w.set_smooth, False),
        ("uncertainty_check", "Uncertainty layer (models that provide one)", w.set_uncertainty,
         False),
    ):  # fmt: skip
        setattr(w, attr, check_box(text, slot, checked=checked))
        vbox.addWidget(getattr(w, attr))
    return box


def _prediction_box(w: Any) -> QWidget:
    """Live check box, whole slide / cancel / clear cache, progress bar, status line."""
    box = QWidget()
    vbox = QVBoxLayout(box)
    w.live_check = check_box(
        "Live: predict the visible tissue as you pan and zoom", w.set_live, checked=True
    )
    vbox.addWidget(w.live_check)
    w.whole_button = push_button(
        "Predict whole slide", w.predict_whole_slide,
        tooltip="Predict every tissue tile of the slide (cached)",
    )  # fmt: skip
    w.cancel_button = push_button(
        "Cancel", w.cancel, tooltip="Stop after the current batch", enabled=False
    )
    w.clear_button = push_button(
        "Clear cache", w.clear_cache,
        tooltip="Delete every cached prediction (all slides and models)",
    )  # fmt: skip
    vbox.addLayout(button_row(w.whole_button, w.cancel_button, w.clear_button))
    w.progress_bar = QProgressBar()
    w.progress_bar.setRange(0, 1)
    w.progress_bar.setValue(0)
    w.progress_bar.setFormat("idle")
    vbox.addWidget(w.progress_bar)
    w.status_label = QLabel("load a model and pick a slide")
    w.status_label.setWordWrap(True)
    vbox.addWidget(w.status_label)
    return box


def show_tta_choice(w: Any, choices: list[int], current: int, *, label: Any, note: str) -> None:
    """Fill the TTA menu with ``choices`` (``label(views)`` each), select ``current``; the row
    and its note are hidden when there is nothing to choose (a model without TTA)."""
    combo = w.tta_combo
    combo.blockSignals(True)
    combo.clear()
    for views in choices:
        combo.addItem(label(views), views)
    combo.setCurrentIndex(max(combo.findData(current), 0))
    combo.blockSignals(False)
    visible = len(choices) > 1
    for widget in (w.tta_label, combo):
        widget.setVisible(visible)
    w.tta_note.setText(note)
    w.tta_note.setVisible(visible and bool(note))


def fill_gene_list(gene_list: QListWidget, genes: list[str], checked: set[str]) -> None:
    """Put ``genes`` in the list, ticking ``checked`` (no itemChanged signals)."""
    gene_list.blockSignals(True)
    gene_list.clear()
    for gene in genes:
        item = QListWidgetItem(gene)
        item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
        item.setCheckState(Qt.CheckState.Checked if gene in checked else Qt.CheckState.Unchecked)
        gene_list.addItem(item)
    gene_list.blockSignals(False)


def check_genes(gene_list: QListWidget, checked: set[str]) -> None:
    """Tick exactly ``checked`` (no itemChanged signals)."""
    gene_list.blockSignals(True)
    for k in range(gene_list.count()):
        item = gene_list.item(k)
        state = Qt.CheckState.Checked if item.text() in checked else Qt.CheckState.Unchecked
        if item.checkState() != state:
            item.setCheckState(state)
    gene_list.blockSignals(False)


def filter_gene_list(gene_list: QListWidget, text: str) -> None:
    """Hide genes that do not contain ``text`` (case-insensitive)."""
    needle = text.strip().upper()
    for k in range(gene_list.count()):
        item = gene_list.item(k)
        item.setHidden(bool(needle) and needle not in item.text().upper())
