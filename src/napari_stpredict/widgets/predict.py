"""The "Predict expression" dock widget: model, slide, genes, live heatmaps, whole slide.

UI wiring only: the work is done by the core (``slide``, ``model``, ``inference``) in worker
threads; :mod:`._live` schedules it from the camera and :mod:`._heatmaps` draws it. Every
method a button calls is public (``load_model``, ``set_slide_layer``, ``set_genes``,
``set_live``, ``predict_whole_slide``, ``cancel``, ``clear_cache``) so scripts, the
``stpredict view`` command and tests drive the same code as a user.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
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

from napari_stpredict.errors import StPredictError
from napari_stpredict.widgets import guard_llvm_clash
from napari_stpredict.widgets._heatmaps import HeatmapSet
from napari_stpredict.widgets._live import (
    Failed,
    LiveScheduler,
    PredictSession,
    open_session,
    slide_source,
)

if TYPE_CHECKING:
    import napari

#: Heatmaps are redrawn at most this often while batches land (ms).
REFRESH_MS = 100
#: Number of genes in the "highly expressed" preset.
N_HEG = 20
PRESET_HEG = "Highly expressed (training data)"
PRESET_MARKERS = "Breast-cancer markers"
PRESET_PAM50 = "PAM50"


def _notify(kind: str, text: str) -> None:
    from napari.utils.notifications import show_error, show_info, show_warning

    {"error": show_error, "warning": show_warning, "info": show_info}[kind](text)


def preset_genes(
    name: str, panel: Sequence[str], gene_stats: Mapping[str, np.ndarray] | None
) -> list[str]:
    """The genes of a preset that the model predicts, spelled as in ``panel``.

    Parameters
    ----------
    name
        :data:`PRESET_HEG`, :data:`PRESET_MARKERS` or :data:`PRESET_PAM50`.
    panel
        The model's genes.
    gene_stats
        Training-data statistics (``"mean"`` ranks the highly expressed genes).
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


def is_slide_layer(layer: Any) -> bool:
    """Whether a layer can be predicted on: an RGB image (ours, or any with a file)."""
    from napari.layers import Image

    if not isinstance(layer, Image):
        return False
    if (layer.metadata or {}).get("stpredict"):
        return False  # one of our heatmaps
    return bool((layer.metadata or {}).get("stpredict_slide")) or bool(layer.rgb)


class PredictWidget(QWidget):
    """Dock widget "Predict expression".

    Parameters
    ----------
    napari_viewer
        The viewer (npe2 passes it).
    cache_dir
        Prediction cache folder; ``None`` = the default (``$STPREDICT_CACHE_DIR`` or the
        user cache dir, see :func:`napari_stpredict.inference.store.default_cache_dir`).
    device
        ``"auto"`` (CUDA > MPS > CPU), ``"cpu"``, ``"cuda"``, ``"mps"``.

    Attributes
    ----------
    predictor
        The loaded :class:`~napari_stpredict.model.Predictor` (``None`` before a model).
    session
        The active :class:`~._live.PredictSession` (slide + model + grid + store + engine).
    heatmaps
        The active :class:`~._heatmaps.HeatmapSet`.
    scheduler
        The :class:`~._live.LiveScheduler` running the engine.
    """

    #: Emitted (GUI thread) when a session is ready: heatmap layers can be made.
    session_ready = Signal(object)
    #: Emitted when a model is loaded (the Predictor).
    model_loaded = Signal(object)

    def __init__(
        self,
        napari_viewer: napari.Viewer,
        *,
        cache_dir: str | os.PathLike | None = None,
        device: str = "auto",
    ) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.device_request = device
        self.predictor: Any = None
        self.model_path: Path | None = None
        self.session: PredictSession | None = None
        self.heatmaps: HeatmapSet | None = None
        self._slide_layer: Any = None
        self._selected: list[str] = []
        self._build_seq = 0
        self._model_seq = 0
        self._workers: set[Any] = set()
        self._clear_after_cancel = False
        self._loading_planes = 0
        self._closed = False
        # Not a Qt child: it must outlive this widget's C++ side long enough to stop its thread.
        self.scheduler = LiveScheduler(napari_viewer)
        self.scheduler.batch_landed.connect(self._on_batch)
        self.scheduler.job_started.connect(self._on_job_started)
        self.scheduler.job_finished.connect(self._on_job_finished)
        self.scheduler.progress.connect(self._on_progress)
        self.scheduler.busy_changed.connect(self._on_busy)
        self.scheduler.message.connect(self._set_status)
        self.scheduler.error.connect(self._on_error)
        self._flush_timer = QTimer(self)
        self._flush_timer.setSingleShot(True)
        self._flush_timer.setInterval(REFRESH_MS)
        self._last_flush = 0.0
        self._flush_timer.timeout.connect(self._flush)

        self._build_ui()
        self.viewer.layers.events.inserted.connect(self._refresh_slide_choices)
        self.viewer.layers.events.removed.connect(self._on_layer_removed)
        self._refresh_slide_choices()

        scheduler = self.scheduler
        # plain closures (no reference to self): run when the viewer window deletes us
        self.destroyed.connect(lambda *_: scheduler.shutdown(wait_s=0))

    # =========================================================================== UI
    def _build_ui(self) -> None:
        layout = QVBoxLayout(self)

        box = QGroupBox("Model")
        form = QFormLayout(box)
        row = QHBoxLayout()
        self.model_edit = QLineEdit()
        self.model_edit.setPlaceholderText("model.safetensors")
        self.model_edit.returnPressed.connect(lambda: self.load_model(self.model_edit.text()))
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse_model)
        row.addWidget(self.model_edit)
        row.addWidget(browse)
        form.addRow("File", row)
        self.model_info = QLabel("no model loaded")
        self.model_info.setWordWrap(True)
        self.model_info.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        form.addRow(self.model_info)
        self.device_label = QLabel("—")
        form.addRow("Device", self.device_label)
        layout.addWidget(box)

        box = QGroupBox("Slide")
        form = QFormLayout(box)
        self.slide_combo = QComboBox()
        self.slide_combo.currentIndexChanged.connect(self._on_slide_choice)
        form.addRow("Layer", self.slide_combo)
        self.mpp_spin = QDoubleSpinBox()
        self.mpp_spin.setDecimals(4)
        self.mpp_spin.setRange(0.0, 100.0)
        self.mpp_spin.setSingleStep(0.01)
        self.mpp_spin.setSpecialValueText("from slide")
        self.mpp_spin.setToolTip(
            "µm per level-0 pixel; 'from slide' uses the slide layer's own value"
        )
        self.mpp_spin.editingFinished.connect(self._rebuild_session)
        form.addRow("µm/px", self.mpp_spin)
        self.stride_spin = QDoubleSpinBox()
        self.stride_spin.setDecimals(1)
        self.stride_spin.setRange(0.0, 10_000.0)
        self.stride_spin.setSingleStep(10.0)
        self.stride_spin.setSpecialValueText("patch size")
        self.stride_spin.setSuffix(" µm")
        self.stride_spin.setToolTip(
            "Distance between predicted patches; half the patch size gives a smoother map "
            "(4× the model calls)"
        )
        self.stride_spin.editingFinished.connect(self._rebuild_session)
        form.addRow("Stride", self.stride_spin)
        self.slide_warning = QLabel("")
        self.slide_warning.setWordWrap(True)
        self.slide_warning.setStyleSheet("color: #e8a33d;")
        self.slide_warning.hide()
        form.addRow(self.slide_warning)
        layout.addWidget(box)

        box = QGroupBox("Genes")
        vbox = QVBoxLayout(box)
        row = QHBoxLayout()
        self.preset_combo = QComboBox()
        self.preset_combo.addItems(["Preset…", PRESET_HEG, PRESET_MARKERS, PRESET_PAM50])
        self.preset_combo.activated.connect(self._on_preset)
        clear_genes = QPushButton("None")
        clear_genes.setToolTip("Deselect all genes")
        clear_genes.clicked.connect(lambda: self.set_genes([]))
        row.addWidget(self.preset_combo, 1)
        row.addWidget(clear_genes)
        vbox.addLayout(row)
        self.search_edit = QLineEdit()
        self.search_edit.setPlaceholderText("search genes…")
        self.search_edit.setClearButtonEnabled(True)
        self.search_edit.textChanged.connect(self._filter_genes)
        vbox.addWidget(self.search_edit)
        self.gene_list = QListWidget()
        self.gene_list.setMinimumHeight(160)
        self.gene_list.itemChanged.connect(self._on_gene_item_changed)
        vbox.addWidget(self.gene_list, 1)
        self.genes_label = QLabel("0 selected")
        vbox.addWidget(self.genes_label)
        layout.addWidget(box, 1)

        box = QGroupBox("Prediction")
        vbox = QVBoxLayout(box)
        self.live_check = QCheckBox("Live: predict the visible tissue as you pan and zoom")
        self.live_check.setChecked(True)
        self.live_check.toggled.connect(self.set_live)
        vbox.addWidget(self.live_check)
        row = QHBoxLayout()
        self.whole_button = QPushButton("Predict whole slide")
        self.whole_button.setToolTip("Predict every tissue patch of the slide (cached)")
        self.whole_button.clicked.connect(self.predict_whole_slide)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        self.cancel_button.setEnabled(False)
        self.clear_button = QPushButton("Clear cache")
        self.clear_button.setToolTip("Delete every cached prediction (all slides and models)")
        self.clear_button.clicked.connect(self.clear_cache)
        row.addWidget(self.whole_button)
        row.addWidget(self.cancel_button)
        row.addWidget(self.clear_button)
        vbox.addLayout(row)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.progress_bar.setFormat("idle")
        vbox.addWidget(self.progress_bar)
        self.status_label = QLabel("load a model and pick a slide")
        self.status_label.setWordWrap(True)
        vbox.addWidget(self.status_label)
        layout.addWidget(box)

    def _set_status(self, text: str) -> None:
        self.status_label.setText(text)

    # =========================================================================== model
    def _browse_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Open a model file", "", "Model files (*.safetensors);;All files (*)"
        )
        if path:
            self.load_model(path)

    def load_model(self, path: str | os.PathLike, *, background: bool = True) -> None:
        """Load a model file (in a worker thread unless ``background`` is false).

        Errors (missing, corrupt or foreign file) are shown as a notification and in the
        widget; the previous model is dropped.
        """
        from napari.qt.threading import create_worker

        path = Path(str(path).strip()).expanduser()
        self.model_edit.setText(str(path))
        self._model_seq += 1
        seq = self._model_seq
        self._drop_session()
        self.predictor = None
        self.model_path = None
        self.model_info.setText(f"loading {path.name}…")
        self.model_info.setStyleSheet("")

        def work() -> Any:
            guard_llvm_clash()
            from napari_stpredict.model import Predictor

            try:
                return Predictor(path, device=self.device_request)
            except StPredictError as err:
                return Failed(err)
            except Exception as err:  # torch/timm failures on a foreign file
                return Failed(
                    StPredictError(f"{path}: cannot load model ({type(err).__name__}: {err})")
                )

        if not background:
            self._on_model_result(seq, path, work())
            return
        worker = create_worker(work, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(lambda result: self._on_model_result(seq, path, result))
        self._run(worker)

    def set_predictor(self, predictor: Any, model_path: str | os.PathLike | None = None) -> None:
        """Use an already loaded :class:`~napari_stpredict.model.Predictor` (no file read)."""
        self._model_seq += 1
        path = Path(model_path or getattr(predictor, "path", "model.safetensors"))
        self.model_edit.setText(str(path))
        self._drop_session()
        self._on_model_result(self._model_seq, path, predictor)

    def _run(self, worker: Any) -> None:
        self._workers.add(worker)
        worker.finished.connect(lambda: self._workers.discard(worker))
        worker.start()

    def _on_model_result(self, seq: int, path: Path, result: Any) -> None:
        if self._closed or seq != self._model_seq:
            return
        if isinstance(result, Failed):
            self.model_info.setText(f"✗ {result.error}")
            self.model_info.setStyleSheet("color: #e0533d;")
            self._on_error(str(result.error))
            return
        self.predictor = result
        self.model_path = path
        p = result
        sections = list(
            getattr(p, "training_sections", []) or p.metadata.get("training_sections", [])
        )
        shown = ", ".join(sections[:8]) + (
            f" … (+{len(sections) - 8})" if len(sections) > 8 else ""
        )
        patch = f"{p.patch_um:g} µm" if p.patch_um else "?"
        self.model_info.setText(
            f"<b>{path.name}</b><br>{len(p.genes)} genes · method {p.method} · backbone "
            f"{getattr(p, 'backbone', '?')}<br>patch {patch} → {p.patch_px} px<br>"
            f"trained on: {shown or '—'}"
        )
        self.model_info.setToolTip(", ".join(sections))
        dev = str(p.device)
        if getattr(p, "_amp", None) is not None:
            dev += " (AMP)"
        self.device_label.setText(f"{dev} · batch {getattr(p, 'batch_size', '?')}")
        self._fill_gene_list(p.genes)
        self.model_loaded.emit(p)
        self._rebuild_session()

    # =========================================================================== genes
    def _fill_gene_list(self, genes: Sequence[str]) -> None:
        keep = [g for g in self._selected if g in set(genes)]
        self.gene_list.blockSignals(True)
        self.gene_list.clear()
        for gene in genes:
            item = QListWidgetItem(gene)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(Qt.CheckState.Checked if gene in keep else Qt.CheckState.Unchecked)
            self.gene_list.addItem(item)
        self.gene_list.blockSignals(False)
        self._selected = keep
        self._filter_genes(self.search_edit.text())
        self.genes_label.setText(f"{len(keep)} selected of {len(genes)}")

    def _filter_genes(self, text: str) -> None:
        needle = text.strip().upper()
        for k in range(self.gene_list.count()):
            item = self.gene_list.item(k)
            item.setHidden(bool(needle) and needle not in item.text().upper())

    def _on_gene_item_changed(self, item: QListWidgetItem) -> None:
        genes = [g for g in self._selected if g != item.text()]
        if item.checkState() == Qt.CheckState.Checked:
            genes.append(item.text())
        self._apply_genes(genes)

    def _on_preset(self, index: int) -> None:
        name = self.preset_combo.itemText(index)
        self.preset_combo.setCurrentIndex(0)
        if self.predictor is None or index == 0:
            return
        genes = preset_genes(name, self.predictor.genes, self.predictor.gene_stats)
        if not genes:
            self._set_status(f"{name}: none of these genes is in the model's panel")
            return
        self.set_genes(genes)
        self._set_status(f"{name}: {len(genes)} genes")

    @property
    def genes(self) -> list[str]:
        """The selected genes (one heatmap layer each)."""
        return list(self._selected)

    def set_genes(self, genes: Sequence[str]) -> None:
        """Select exactly ``genes`` (names from the model's panel; case-insensitive).

        Raises
        ------
        StPredictError
            If no model is loaded or a gene is not predicted by the model.
        """
        if self.predictor is None:
            raise StPredictError("load a model before choosing genes")
        lookup = {g.upper(): g for g in self.predictor.genes}
        unknown = [g for g in genes if g.upper() not in lookup]
        if unknown:
            raise StPredictError(f"genes not predicted by the model: {', '.join(unknown)}")
        wanted = list(dict.fromkeys(lookup[g.upper()] for g in genes))
        self.gene_list.blockSignals(True)
        for k in range(self.gene_list.count()):
            item = self.gene_list.item(k)
            state = Qt.CheckState.Checked if item.text() in wanted else Qt.CheckState.Unchecked
            if item.checkState() != state:
                item.setCheckState(state)
        self.gene_list.blockSignals(False)
        self._apply_genes(wanted)

    def _apply_genes(self, genes: list[str]) -> None:
        self._selected = list(genes)
        n = len(self.predictor.genes) if self.predictor is not None else 0
        self.genes_label.setText(f"{len(genes)} selected of {n}")
        if self.heatmaps is not None:
            self._show_genes(self.heatmaps, genes)

    def _show_genes(self, heatmaps: HeatmapSet, genes: list[str]) -> None:
        from napari.qt.threading import create_worker

        before = set(heatmaps.genes)
        added = heatmaps.set_genes(genes, fill=False)
        new_layers = [heatmaps.layers[g] for g in added]
        # several new maps at once: show the first only, so they do not blend into mud
        if len(new_layers) > 1 or (new_layers and before):
            for layer in new_layers[1:]:
                layer.visible = False
        if new_layers:
            first = new_layers[0]
            self.viewer.layers.move(self.viewer.layers.index(first), len(self.viewer.layers))
            self.viewer.layers.selection.active = first
        if not added:
            return
        session = self.session
        index = {g: i for i, g in enumerate(heatmaps.panel)}

        def load() -> dict[str, np.ndarray]:
            return {g: session.read_plane(index[g]) for g in added}

        def fill(planes: dict[str, np.ndarray]) -> None:
            if self._closed or heatmaps is not self.heatmaps:
                return
            for gene, plane in planes.items():
                heatmaps.merge_plane(gene, plane)
            heatmaps.flush()

        self._loading_planes += 1

        def loaded(*_: Any) -> None:
            self._loading_planes -= 1

        worker = create_worker(load, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(fill)
        worker.errored.connect(lambda exc: self._on_error(f"reading the prediction cache: {exc}"))
        worker.finished.connect(loaded)
        self._run(worker)

    # =========================================================================== slide
    def _slide_candidates(self) -> list[Any]:
        return [layer for layer in self.viewer.layers if is_slide_layer(layer)]

    def _refresh_slide_choices(self, event: Any = None) -> None:
        candidates = self._slide_candidates()
        current = self._slide_layer
        self.slide_combo.blockSignals(True)
        self.slide_combo.clear()
        for layer in candidates:
            self.slide_combo.addItem(layer.name)
        self.slide_combo.blockSignals(False)
        if current is not None and current in candidates:
            self.slide_combo.setCurrentIndex(candidates.index(current))
        elif candidates:
            self.slide_combo.setCurrentIndex(0)
            self.set_slide_layer(candidates[0])
        else:
            self.slide_combo.setCurrentIndex(-1)

    def _on_slide_choice(self, index: int) -> None:
        candidates = self._slide_candidates()
        if 0 <= index < len(candidates) and candidates[index] is not self._slide_layer:
            self.set_slide_layer(candidates[index])

    @property
    def slide_layer(self) -> Any:
        """The Image layer being predicted on."""
        return self._slide_layer

    def set_slide_layer(self, layer: Any) -> None:
        """Predict on ``layer`` (an Image layer opened from a slide file)."""
        if layer is self._slide_layer:
            return
        self._slide_layer = layer
        candidates = self._slide_candidates()
        if layer in candidates and self.slide_combo.currentIndex() != candidates.index(layer):
            self.slide_combo.blockSignals(True)
            self.slide_combo.setCurrentIndex(candidates.index(layer))
            self.slide_combo.blockSignals(False)
        self.mpp_spin.blockSignals(True)
        self.mpp_spin.setValue(0.0)
        self.mpp_spin.blockSignals(False)
        self._rebuild_session()

    def set_mpp(self, mpp: float | None) -> None:
        """Override the slide's µm/px (``None`` = the file's value)."""
        self.mpp_spin.setValue(0.0 if mpp is None else float(mpp))
        self._rebuild_session()

    def set_stride(self, stride_um: float | None) -> None:
        """Set the grid stride in µm (``None`` = the patch size, no overlap)."""
        self.stride_spin.setValue(0.0 if stride_um is None else float(stride_um))
        self._rebuild_session()

    def _on_layer_removed(self, event: Any) -> None:
        layer = event.value
        if layer is self._slide_layer:
            was_busy = self.scheduler.busy
            orphans = list(self.heatmaps.layers.values()) if self.heatmaps is not None else []
            self._slide_layer = None
            self._drop_session(remove_layers=False)
            # heatmaps are registered to the slide: they go with it. Hidden at once (never drawn
            # without their slide: Mesa's llvmpipe crashed drawing them as the bottom layer
            # right after a multiscale slide was removed), removed once this event is over.
            for orphan in orphans:
                orphan.visible = False
            if orphans:
                QTimer.singleShot(0, lambda: self._remove_layers(orphans))
            if was_busy and not self._closed:
                _notify("warning", f"slide layer {layer.name!r} was removed: prediction stopped")
            self._set_status("slide layer removed")
        elif self.heatmaps is not None and layer in self.heatmaps.layers.values():
            gene = next(g for g, lyr in self.heatmaps.layers.items() if lyr is layer)
            self.heatmaps.forget_layer(layer)
            self._selected = [g for g in self._selected if g != gene]
            self._uncheck(gene)
        self._refresh_slide_choices()

    def _remove_layers(self, layers: list[Any]) -> None:
        with contextlib.suppress(RuntimeError, ValueError, KeyError):
            for layer in layers:
                if layer in self.viewer.layers:
                    self.viewer.layers.remove(layer)

    def _uncheck(self, gene: str) -> None:
        self.gene_list.blockSignals(True)
        for item in self.gene_list.findItems(gene, Qt.MatchFlag.MatchExactly):
            item.setCheckState(Qt.CheckState.Unchecked)
        self.gene_list.blockSignals(False)
        n = len(self.predictor.genes) if self.predictor is not None else 0
        self.genes_label.setText(f"{len(self._selected)} selected of {n}")

    # =========================================================================== session
    def _drop_session(self, *, remove_layers: bool = True) -> None:
        self._build_seq += 1  # a session being built for the old inputs is discarded
        self.scheduler.set_session(None)
        if self.heatmaps is not None:
            if remove_layers:
                for gene in list(self.heatmaps.layers):
                    self.heatmaps.remove_gene(gene)
            self.heatmaps.detach()
        self.heatmaps = None
        self.session = None

    def _rebuild_session(self) -> None:
        """(Re)open slide + grid + store + engine for the current inputs, in a worker."""
        from napari.qt.threading import create_worker

        self._drop_session()
        layer, predictor, model_path = self._slide_layer, self.predictor, self.model_path
        self.slide_warning.hide()
        if layer is None or predictor is None or model_path is None:
            return
        try:
            path, layer_mpp = slide_source(layer)
        except StPredictError as err:
            self._on_error(str(err))
            return
        # the µm/px box wins, then the one the layer was opened with (the file's, or given)
        mpp = self.mpp_spin.value() or layer_mpp
        stride = self.stride_spin.value() or None
        seq = self._build_seq
        cache_dir = self.cache_dir
        self._set_status(f"opening {Path(path).name}…")

        def work() -> Any:
            try:
                return open_session(
                    slide_path=path,
                    slide_layer=layer,
                    predictor=predictor,
                    model_path=model_path,
                    mpp=mpp,
                    stride_um=stride,
                    cache_dir=cache_dir,
                )
            except StPredictError as err:
                return Failed(err)

        worker = create_worker(work, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(lambda result: self._on_session(seq, result))
        worker.errored.connect(lambda exc: self._on_error(f"{type(exc).__name__}: {exc}"))
        self._run(worker)

    def _on_session(self, seq: int, result: Any) -> None:
        stale = self._closed or seq != self._build_seq
        if isinstance(result, PredictSession) and (
            stale or result.slide_layer not in self.viewer.layers
        ):
            result.close()  # built for inputs that changed meanwhile: release slide + threads
            return
        if stale:
            return
        if isinstance(result, Failed):
            self._on_error(str(result.error))
            return
        session: PredictSession = result
        for text in session.warnings:
            self.slide_warning.setText(f"⚠ {text}")
            self.slide_warning.show()
            _notify("warning", text)
        self.session = session
        self.heatmaps = HeatmapSet(
            self.viewer,
            slide_layer=session.slide_layer,
            grid=session.grid,
            panel=session.predictor.genes,
            gene_stats=session.predictor.gene_stats,
            metadata={
                "store": session.store_path,
                "model": str(session.model_path),
                "slide_path": session.slide_path,
            },
            read_plane=session.read_plane,
        )
        if self._selected:
            self._show_genes(self.heatmaps, self._selected)
        n_tissue = int(session.tissue.sum())
        gh, gw = session.grid.shape
        self._set_status(f"{Path(session.slide_path).name}: {gh}×{gw} cells, {n_tissue} on tissue")
        self.scheduler.live = self.live_check.isChecked()
        self.scheduler.set_session(session)
        self.session_ready.emit(session)

    # =========================================================================== running
    def set_live(self, on: bool) -> None:
        """Turn live prediction of the visible tissue on or off."""
        if self.live_check.isChecked() != bool(on):
            self.live_check.setChecked(bool(on))  # re-enters through the toggled signal
            return
        self.scheduler.live = bool(on)

    def predict_whole_slide(self) -> int:
        """Predict every tissue cell of the slide; returns how many cells are queued."""
        if self.session is None:
            self._set_status("load a model and pick a slide first")
            return 0
        return self.scheduler.predict_whole_slide()

    def cancel(self) -> None:
        """Stop the running prediction after its current batch."""
        self.scheduler.cancel()
        self._set_status("cancelling…" if self.scheduler.job is not None else "cancelled")

    def clear_cache(self) -> None:
        """Delete every cached prediction (running work is cancelled first)."""
        if self.scheduler.job is not None:
            self._clear_after_cancel = True
            self.scheduler.cancel()
            return
        self._do_clear_cache()

    def _do_clear_cache(self) -> None:
        from napari_stpredict.inference.store import clear_cache

        self._clear_after_cancel = False
        freed = clear_cache(self.cache_dir)
        self._set_status(f"cache cleared ({freed / 2**20:.1f} MB freed)")
        if self.session is not None:
            self._rebuild_session()

    def view_complete(self) -> bool:
        """Whether the visible tissue is fully predicted and drawn (no job running)."""
        return (
            self.session is not None
            and self.heatmaps is not None
            and self._loading_planes == 0
            and not self._flush_timer.isActive()
            and not self.heatmaps.dirty
            and self.scheduler.view_complete()
        )

    # -- scheduler signals ---------------------------------------------------------------------
    def _on_batch(self, session: PredictSession, cells: np.ndarray, values: np.ndarray) -> None:
        if session is not self.session or self.heatmaps is None:
            return
        self.heatmaps.update(cells, values)
        if self._flush_timer.isActive():
            return  # a redraw is already due
        wait_ms = REFRESH_MS - 1000 * (time.perf_counter() - self._last_flush)
        if wait_ms <= 0:
            self._flush()  # at most ~10 Hz, but without delaying a redraw that is allowed now
        else:
            self._flush_timer.start(int(wait_ms) + 1)

    def _flush(self) -> None:
        self._last_flush = time.perf_counter()
        if self.heatmaps is not None:
            self.heatmaps.flush()

    def _on_job_started(self, kind: str, total: int) -> None:
        self.cancel_button.setEnabled(True)
        self.progress_bar.setRange(0, max(total, 1))
        self.progress_bar.setValue(0)
        self.progress_bar.setFormat("%v / %m cells")
        what = "whole slide" if kind == "slide" else "view"
        self._set_status(f"predicting {total} cells ({what})…")

    def _on_busy(self, busy: bool) -> None:
        self.cancel_button.setEnabled(busy)

    def _on_progress(self, done: int, total: int) -> None:
        self.progress_bar.setRange(0, max(total, 1))
        self.progress_bar.setValue(done)

    def _on_job_finished(self, kind: str, outcome: Any) -> None:
        self._flush_timer.stop()
        self._flush()
        if self._clear_after_cancel and self.scheduler.job is None:
            self._do_clear_cache()
            return
        if outcome == "done":
            n = self.session.store.n_done if self.session is not None and kind == "slide" else None
            self._set_status(f"whole slide done ({n} cells)" if n is not None else "view predicted")
        elif outcome == "cancelled":
            if self.scheduler.job is None:
                self._set_status("cancelled")
        else:
            self._set_status(f"✗ {outcome}")

    def _on_error(self, text: str) -> None:
        self._set_status(f"✗ {text}")
        if not self._closed:
            _notify("error", text)

    # =========================================================================== teardown
    def close_workers(self, *, wait_s: float = 30.0) -> bool:
        """Cancel all work and wait for the worker threads; the widget is inert afterwards."""
        self._closed = True
        with contextlib.suppress(RuntimeError):  # the C++ side may be gone with the viewer
            self._flush_timer.stop()
        ok = self.scheduler.shutdown(wait_s=wait_s)
        deadline = time.monotonic() + wait_s
        for worker in list(self._workers):  # model / session / cache loads: short, not cancellable
            while worker.is_running and time.monotonic() < deadline:
                time.sleep(0.01)
            ok = ok and not worker.is_running
        try:
            self.viewer.layers.events.inserted.disconnect(self._refresh_slide_choices)
            self.viewer.layers.events.removed.disconnect(self._on_layer_removed)
        except (TypeError, ValueError, RuntimeError):
            pass
        return ok

    def closeEvent(self, event: Any) -> None:
        self.close_workers(wait_s=0)
        super().closeEvent(event)
