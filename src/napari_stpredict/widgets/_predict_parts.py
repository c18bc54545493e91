"""The genes, display and slide parts of the "Predict expression" dock (mixins of
:class:`~.predict.PredictWidget`; split off to keep each module readable).

- :class:`GenesMixin` — gene list, presets, heatmap layers filled from the cache (worker), colour
  bars, smooth display, uncertainty layers.
- :class:`SlideMixin` — slide layer choice, exact µm/px, stride, layer removal (deleting a
  heatmap unticks its gene).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from qtpy.QtCore import Qt, QTimer

from napari_stpredict.errors import StPredictError
from napari_stpredict.widgets._common import Failed, notify, start_worker
from napari_stpredict.widgets._heatmaps import HeatmapSet
from napari_stpredict.widgets._live import slide_source
from napari_stpredict.widgets._predict_panel import MPP_DECIMALS, check_genes


def is_slide_layer(layer: Any) -> bool:
    """Whether a layer can be predicted on: an RGB image (ours, or any with a file)."""
    from napari.layers import Image

    if not isinstance(layer, Image):
        return False
    if (layer.metadata or {}).get("stpredict"):
        return False  # one of our heatmaps
    return bool((layer.metadata or {}).get("stpredict_slide")) or bool(layer.rgb)


class GenesMixin:
    """Genes and display of the Predict dock (needs the PredictWidget's attributes)."""

    # =========================================================================== genes
    def _update_genes_label(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.genes_label.setText(f"{len(self.state.genes)} selected of {len(self.state.panel)}")

    def _on_gene_item_changed(self, item: Any) -> None:
        genes = [g for g in self.state.genes if g != item.text()]
        if item.checkState() == Qt.CheckState.Checked:
            genes.append(item.text())
        self.state.set_genes(genes)

    def _on_preset(self, index: int) -> None:
        name = self.preset_combo.itemText(index)
        self.preset_combo.setCurrentIndex(0)
        if self.predictor is None or index == 0:
            return
        genes = self.state.preset(name)
        if not genes:
            self._set_status(f"{name}: none of these genes is in the model's panel")
            return
        self.set_genes(genes)
        self._set_status(f"{name}: {len(genes)} genes")

    def set_genes(self, genes: Sequence[str]) -> None:
        """Select exactly ``genes`` (names from the model's panel; case-insensitive).

        Raises
        ------
        StPredictError
            If no model is loaded or a gene is not predicted by the model.
        """
        self.state.set_genes(genes)

    def _on_genes(self, genes: list[str]) -> None:
        with contextlib.suppress(RuntimeError):
            check_genes(self.gene_list, set(genes))
        self._update_genes_label()
        if self.heatmaps is not None and not self._closed:
            self._show_genes(self.heatmaps, genes)

    def _show_genes(self, heatmaps: HeatmapSet, genes: list[str]) -> None:
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
        if added:
            self._load_planes(heatmaps, added)
        if self.state.uncertainty:
            self._load_spread(heatmaps)

    def _load_planes(self, heatmaps: HeatmapSet, genes: list[str]) -> None:
        """Fill new layers from the cache (a zarr read: in a worker)."""
        session = self.session
        if session is None:
            return
        index = {g: heatmaps.index(g) for g in genes}

        def fill(planes: Any) -> None:
            self._loading_planes -= 1
            if isinstance(planes, Failed):
                self._on_error(f"reading the prediction cache: {planes.text}")
                return
            if self._closed or heatmaps is not self.heatmaps:
                return
            for gene, plane in planes.items():
                heatmaps.merge_plane(gene, plane)
            heatmaps.flush()

        self._loading_planes += 1
        start_worker(
            lambda: {g: session.read_plane(i) for g, i in index.items()},
            returned=fill,
            workers=self.workers,
        )

    # =========================================================================== display
    def set_colorbars(self, on: bool) -> None:
        """Show napari's colour bar, gene name and unit on every heatmap."""
        self.state.set_display(colorbar=on)

    def set_smooth(self, on: bool) -> None:
        """Interpolate heatmaps linearly between tile centres (else one flat square per tile)."""
        self.state.set_display(smooth=on)

    def set_uncertainty(self, on: bool) -> None:
        """Add an uncertainty (spread) layer per gene shown, when the store has one."""
        self.state.set_display(uncertainty=on)

    def _on_display(self) -> None:
        s = self.state
        for check, value in (
            (self.colorbar_check, s.colorbar),
            (self.smooth_check, s.smooth),
            (self.uncertainty_check, s.uncertainty),
        ):
            if check.isChecked() != value:
                check.blockSignals(True)
                check.setChecked(value)
                check.blockSignals(False)
        heatmaps = self.heatmaps
        if heatmaps is None:
            return
        heatmaps.set_display(colorbar=s.colorbar, smooth=s.smooth)
        if s.uncertainty:
            self._load_spread(heatmaps)
        else:
            heatmaps.remove_spread_layers()

    def _load_spread(self, heatmaps: HeatmapSet) -> None:
        """Read the spread planes of the genes shown (worker) and add their layers."""
        session = self.session
        spread = getattr(getattr(session, "store", None), "spread", None)
        if session is None:
            return
        if spread is None:
            self._set_status("this model gives no uncertainty (no spread in its predictions)")
            return
        genes = [g for g in heatmaps.genes if g not in heatmaps.spread_layers]
        if not genes:
            return
        done = None if self.scheduler.done is None else self.scheduler.done.copy()
        index = {g: heatmaps.index(g) for g in genes}

        def read() -> dict[str, np.ndarray]:
            out = {}
            for g, i in index.items():
                plane = np.array(spread[i], dtype=np.float32)
                if done is not None:
                    plane[~done] = np.nan
                out[g] = plane
            return out

        def show(planes: Any) -> None:
            if isinstance(planes, Failed):
                self._on_error(f"reading the uncertainty: {planes.text}")
            elif not self._closed and heatmaps is self.heatmaps and self.state.uncertainty:
                for g, plane in planes.items():
                    heatmaps.add_spread_layer(g, plane)

        start_worker(read, returned=show, workers=self.workers)


class SlideMixin:
    """Slide inputs of the Predict dock (needs the PredictWidget's attributes)."""

    # =========================================================================== slide
    def _slide_candidates(self) -> list[Any]:
        return [layer for layer in self.viewer.layers if is_slide_layer(layer)]

    def _refresh_slide_choices(self, event: Any = None) -> None:
        if self._closed:
            return
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
        self._show_mpp(None)
        try:
            path, layer_mpp = slide_source(layer) if layer is not None else (None, None)
        except StPredictError as err:
            self.state.set_slide(None, None)
            self._on_error(str(err))
            return
        self.state.set_slide(path, layer_mpp)  # emits "inputs": a new session

    def _show_mpp(self, mpp: float | None) -> None:
        self.mpp_spin.blockSignals(True)
        self.mpp_spin.setValue(0.0 if mpp is None else float(mpp))
        self.mpp_spin.blockSignals(False)

    def set_mpp(self, mpp: float | None) -> None:
        """Override the slide's µm/px (``None`` = the file's value), kept at full precision."""
        self._show_mpp(mpp)
        self.state.set_mpp(mpp)

    def _on_mpp_edited(self) -> None:
        shown = self.mpp_spin.value()
        kept = self.state.mpp_override or 0.0
        if abs(shown - kept) < 0.5 * 10.0**-MPP_DECIMALS:
            return  # the box shows the kept value rounded: keep the exact one
        self.state.set_mpp(shown or None)

    def set_stride(self, stride_um: float | None) -> None:
        """Set the grid stride in µm (``None`` = the patch size, no overlap)."""
        self.stride_spin.blockSignals(True)
        self.stride_spin.setValue(0.0 if stride_um is None else float(stride_um))
        self.stride_spin.blockSignals(False)
        self.state.set_stride(stride_um)

    def _on_stride_edited(self) -> None:
        self.state.set_stride(self.stride_spin.value() or None)

    def _on_layer_removed(self, event: Any) -> None:
        if self._closed:
            return
        layer = event.value
        if layer is self._slide_layer:
            was_busy = self.scheduler.busy
            orphans = list(self.heatmaps.layers.values()) if self.heatmaps is not None else []
            orphans += list(self.heatmaps.spread_layers.values()) if self.heatmaps else []
            self._slide_layer = None
            self._drop_session(remove_layers=False)
            # heatmaps are registered to the slide: they go with it. Hidden at once (never drawn
            # without their slide: Mesa's llvmpipe crashed drawing them as the bottom layer
            # right after a multiscale slide was removed), removed once this event is over.
            for orphan in orphans:
                orphan.visible = False
            if orphans:
                QTimer.singleShot(0, lambda: self._remove_layers(orphans))
            if was_busy:
                notify("warning", f"slide layer {layer.name!r} was removed: prediction stopped")
            self._set_status("slide layer removed")
        elif self.heatmaps is not None:
            gene = self.heatmaps.forget_layer(layer)
            if gene is not None:  # the user deleted a heatmap: untick its gene
                self.state.drop_gene(gene)
        self._refresh_slide_choices()

    def _remove_layers(self, layers: list[Any]) -> None:
        with contextlib.suppress(RuntimeError, ValueError, KeyError):
            for layer in layers:
                if layer in self.viewer.layers:
                    self.viewer.layers.remove(layer)
