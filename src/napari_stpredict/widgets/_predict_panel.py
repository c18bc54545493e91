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
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_stpredict.widgets._qt import check_box, dock_layout, section, spin_box
from napari_stpredict.widgets._state import PRESETS

#: Decimals shown by the µm/px box (the value itself is kept exact in the state).
MPP_DECIMALS = 6


def build_predict_ui(w: Any) -> None:
    """Create the controls as attributes of the PredictWidget ``w`` and connect them."""
    body = dock_layout(w)

    box = QWidget()
    form = QFormLayout(box)
    row = QHBoxLayout()
    w.model_edit = QLineEdit()
    w.model_edit.setPlaceholderText("model.safetensors")
    w.model_edit.returnPressed.connect(lambda: w.load_model(w.model_edit.text()))
    browse = QPushButton("Browse…")
    browse.clicked.connect(w._browse_model)
    row.addWidget(w.model_edit)
    row.addWidget(browse)
    form.addRow("File", row)
    w.model_info = QLabel("no model loaded")
    w.model_info.setWordWrap(True)
    w.model_info.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    form.addRow(w.model_info)
    w.device_label = QLabel("—")
    form.addRow("Device", w.device_label)
    body.add(section("Model", box))

    box = QWidget()
    form = QFormLayout(box)
    w.slide_combo = QComboBox()
    w.slide_combo.currentIndexChanged.connect(w._on_slide_choice)
    form.addRow("Layer", w.slide_combo)
    w.mpp_spin = spin_box(
        QDoubleSpinBox,
        0.0,
        100.0,
        decimals=MPP_DECIMALS,
        step=0.01,
        special="from slide",
        tooltip="µm per level-0 pixel; 'from slide' uses the slide layer's own value",
    )
    w.mpp_spin.editingFinished.connect(w._on_mpp_edited)
    form.addRow("µm/px", w.mpp_spin)
    w.stride_spin = spin_box(
        QDoubleSpinBox,
        0.0,
        10_000.0,
        decimals=1,
        step=10.0,
        special="patch size",
        suffix=" µm",
        tooltip="Distance between predicted tiles; half the patch size gives a finer map "
        "(4× the model calls)",
    )
    w.stride_spin.editingFinished.connect(w._on_stride_edited)
    form.addRow("Stride", w.stride_spin)
    w.slide_warning = QLabel("")
    w.slide_warning.setWordWrap(True)
    w.slide_warning.setStyleSheet("color: #e8a33d;")
    w.slide_warning.hide()
    form.addRow(w.slide_warning)
    body.add(section("Slide", box))

    box = QWidget()
    vbox = QVBoxLayout(box)
    row = QHBoxLayout()
    w.preset_combo = QComboBox()
    w.preset_combo.addItems(["Preset…", *PRESETS])
    w.preset_combo.activated.connect(w._on_preset)
    clear_genes = QPushButton("None")
    clear_genes.setToolTip("Deselect all genes")
    clear_genes.clicked.connect(lambda: w.set_genes([]))
    row.addWidget(w.preset_combo, 1)
    row.addWidget(clear_genes)
    vbox.addLayout(row)
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
    body.add(section("Genes", box))

    box = QWidget()
    vbox = QVBoxLayout(box)
    w.colorbar_check = check_box(
        "Colour bars with gene name and unit", w.set_colorbars, checked=True
    )
    vbox.addWidget(w.colorbar_check)
    w.smooth_check = check_box("Smooth (interpolate between tiles)", w.set_smooth)
    vbox.addWidget(w.smooth_check)
    w.uncertainty_check = check_box(
        "Uncertainty layer (models that provide one)", w.set_uncertainty
    )
    vbox.addWidget(w.uncertainty_check)
    body.add(section("Display", box))

    box = QWidget()
    vbox = QVBoxLayout(box)
    w.live_check = check_box(
        "Live: predict the visible tissue as you pan and zoom", w.set_live, checked=True
    )
    vbox.addWidget(w.live_check)
    row = QHBoxLayout()
    w.whole_button = QPushButton("Predict whole slide")
    w.whole_button.setToolTip("Predict every tissue tile of the slide (cached)")
    w.whole_button.clicked.connect(w.predict_whole_slide)
    w.cancel_button = QPushButton("Cancel")
    w.cancel_button.clicked.connect(w.cancel)
    w.cancel_button.setEnabled(False)
    w.clear_button = QPushButton("Clear cache")
    w.clear_button.setToolTip("Delete every cached prediction (all slides and models)")
    w.clear_button.clicked.connect(w.clear_cache)
    row.addWidget(w.whole_button)
    row.addWidget(w.cancel_button)
    row.addWidget(w.clear_button)
    vbox.addLayout(row)
    w.progress_bar = QProgressBar()
    w.progress_bar.setRange(0, 1)
    w.progress_bar.setValue(0)
    w.progress_bar.setFormat("idle")
    vbox.addWidget(w.progress_bar)
    w.status_label = QLabel("load a model and pick a slide")
    w.status_label.setWordWrap(True)
    vbox.addWidget(w.status_label)
    body.add(section("Prediction", box))
    #: a place for other docks' parts (E's measured-vs-predicted section)
    w.extra_sections = body
    body.layout_.addStretch(1)


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
