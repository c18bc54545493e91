"""The model part of the "Predict expression" dock (a mixin of :class:`~.predict.PredictWidget`).

- :meth:`ModelMixin.load_model` / :meth:`ModelMixin.set_predictor` — a model file becomes the
  dock's :class:`~napari_stpredict.model.Predictor`, built in a worker thread (never on the GUI
  thread), with the live view's test-time augmentation;
- :meth:`ModelMixin.set_tta` — the "Test-time augmentation" choice: the Predictor is rebuilt with
  the new number of views (worker) and the session reopened, as for a new model (the prediction
  cache is keyed by the TTA too).

The default TTA is :func:`napari_stpredict.model.predictor.live_view_tta`: the model's own on a
CUDA GPU, 1 view on a CPU/MPS, where every extra view is one more backbone pass per tile while
the user pans.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qtpy.QtWidgets import QFileDialog

from napari_stpredict.errors import StPredictError
from napari_stpredict.widgets import guard_llvm_clash
from napari_stpredict.widgets._common import Failed, start_worker
from napari_stpredict.widgets._predict_panel import (
    fill_gene_list,
    filter_gene_list,
    show_tta_choice,
)


def build_predictor(path: Path, device: Any, tta: int | None, **options: Any) -> Any:
    """``Predictor(path, device=device, tta=…, **options)`` (run it in a worker: reads the file,
    builds the network). ``tta=None``: :func:`~napari_stpredict.model.predictor.live_view_tta`
    of the file's TTA on ``device``; ``options``: other Predictor settings (batch size, …).

    Raises
    ------
    StPredictError
        Missing, corrupt or foreign file (one line naming it).
    """
    guard_llvm_clash()
    from napari_stpredict.model import Predictor
    from napari_stpredict.model.header import read_model_header
    from napari_stpredict.model.predictor import live_view_tta
    from napari_stpredict.model.preprocess import InputSpec

    try:
        if tta is None:
            tta = live_view_tta(InputSpec.from_metadata(read_model_header(path)).tta, device)
        return Predictor(path, device=device, tta=tta, **options)
    except StPredictError:
        raise
    except Exception as err:  # torch/timm failures on a foreign file
        raise StPredictError(f"{path}: cannot load model ({type(err).__name__}: {err})") from None


def same_settings(predictor: Any) -> dict[str, Any]:
    """The settings of ``predictor`` a rebuild with another TTA keeps (device, batch size,
    retrieval overrides), as :func:`build_predictor` keywords."""
    names = ("batch_size", "top_k", "weighting", "temperature")
    options = {n: getattr(predictor, n) for n in names if getattr(predictor, n, None) is not None}
    return {"device": str(predictor.device), **options}


class ModelMixin:
    """Model file, Predictor and TTA of the Predict dock (needs the PredictWidget's attributes)."""

    def _browse_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Open a model file", "", "Model files (*.safetensors);;All files (*)"
        )
        if path:
            self.load_model(path)

    def load_model(
        self, path: str | os.PathLike, *, background: bool = True, tta: int | None = None
    ) -> None:
        """Load a model file (in a worker thread unless ``background`` is false).

        ``tta``: the live view's test-time augmentation (1, 2, 4 or 8 views); ``None`` = the
        model's on a CUDA GPU, 1 on a CPU/MPS (:func:`~napari_stpredict.model.predictor.
        live_view_tta`). Errors (missing, corrupt or foreign file) are shown as a notification
        and in the widget; the previous model is dropped.
        """
        path = Path(str(path).strip()).expanduser()
        self.model_edit.setText(str(path))
        self._start_model_build(path, tta, {"device": self.device_request}, background=background)

    def set_predictor(
        self, predictor: Any, model_path: str | os.PathLike | None = None, *, tta: int | None = None
    ) -> None:
        """Use an already loaded :class:`~napari_stpredict.model.Predictor` (no file read).

        ``tta``: ``None`` keeps the predictor's own test-time augmentation; another number of
        views rebuilds it from ``model_path`` with that TTA (worker thread).
        """
        path = Path(model_path or getattr(predictor, "path", "model.safetensors"))
        self.model_edit.setText(str(path))
        if tta is not None and int(tta) != int(getattr(predictor, "tta", 1)):
            self._start_model_build(path, int(tta), same_settings(predictor), background=True)
            return
        self._model_seq += 1
        self._drop_session()
        self._on_model_result(self._model_seq, path, predictor)

    def set_tta(self, views: int) -> None:
        """Average ``views`` test-time augmentation views in the view (1 = fast; the model's =
        as ``stpredict predict``). The Predictor is rebuilt in a worker and the session reopened.

        Raises
        ------
        StPredictError
            No model loaded, or not 1, 2, 4 or 8 views.
        """
        self.state.request_tta(views)  # event "tta" → _on_tta_requested

    def _on_tta_requested(self, views: int) -> None:
        predictor, path = self.state.predictor, self.state.model_path
        if predictor is None or path is None or self._closed:
            return
        self._start_model_build(path, int(views), same_settings(predictor), background=True)

    def _on_tta_choice(self, index: int) -> None:
        views = self.tta_combo.itemData(index)
        if views is not None and self.state.predictor is not None:
            self.set_tta(int(views))

    def _start_model_build(
        self, path: Path, tta: int | None, options: dict[str, Any], *, background: bool
    ) -> None:
        """Drop the model and session; :func:`build_predictor` in a worker (``options``:
        ``device`` and other Predictor settings)."""
        self._model_seq += 1
        seq = self._model_seq
        self._drop_session()
        self.state.predictor, self.state.model_path = None, None
        what = f" ({tta} views)" if tta and tta > 1 else ""
        self.model_info.setText(f"loading {path.name}{what}…")
        self.model_info.setStyleSheet("")
        self.tta_combo.setEnabled(False)
        start_worker(
            build_predictor,
            path,
            tta=tta,
            **options,
            returned=lambda result: self._on_model_result(seq, path, result),
            workers=self.workers,
            inline=not background,
        )

    def _on_model_result(self, seq: int, path: Path, result: Any) -> None:
        if self._closed or seq != self._model_seq:
            return
        self.tta_combo.setEnabled(True)
        if isinstance(result, Failed):
            self.model_info.setText(f"✗ {result.text}")
            self.model_info.setStyleSheet("color: #e0533d;")
            self._on_error(result.text)
            return
        p = result
        self._show_model_info(p, path)
        keep = set(self.state.genes) & set(p.genes)
        fill_gene_list(self.gene_list, list(p.genes), keep)
        filter_gene_list(self.gene_list, self.search_edit.text())
        self.state.set_model(p, path)  # emits "inputs": a new session
        s = self.state
        show_tta_choice(self, s.tta_choices, s.tta, label=s.tta_label, note=s.tta_note)
        self._update_genes_label()
        self.model_loaded.emit(p)

    def _show_model_info(self, p: Any, path: Path) -> None:
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
        dev = str(p.device) + (" (AMP)" if getattr(p, "_amp", None) is not None else "")
        self.device_label.setText(f"{dev} · batch {getattr(p, 'batch_size', '?')}")
