"""Finding prediction stores, grids and tumour layers through layer metadata.

Widgets talk through layers: a heatmap layer carries ``layer.metadata["stpredict"]`` with
``kind="heatmap"``, ``store``, ``model``, ``grid``, ``slide_layer``, ``slide_path``; a tumour
Labels layer the same with ``kind="tumor"`` (see ``docs/architecture.md``). This module groups
layers by store so the Tumour and Export widgets can offer one entry per prediction store.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_stpredict.widgets._common import Failed, notify  # noqa: F401  (re-exported)

#: Name of the tumour Labels layer (per source, see :func:`tumor_layer_name`).
TUMOR_LAYER_SUFFIX = "tumour (stpredict)"


def stpredict_meta(layer: Any) -> dict[str, Any] | None:
    """A layer's ``metadata["stpredict"]`` dict, or ``None``."""
    meta = (getattr(layer, "metadata", None) or {}).get("stpredict")
    return dict(meta) if isinstance(meta, Mapping) and meta.get("store") else None


@dataclass
class StoreSource:
    """One prediction store shown in the viewer, with the layers that refer to it."""

    store: str
    meta: dict[str, Any]
    heatmaps: list[Any] = field(default_factory=list)
    tumor: Any = None

    @property
    def label(self) -> str:
        """Text for a combo box: slide name (store key)."""
        slide = Path(
            str(self.meta.get("slide_path") or self.meta.get("slide_layer") or "slide")
        ).name
        return f"{slide} — {Path(self.store).name[:12]}"

    @property
    def genes_shown(self) -> list[str]:
        """Genes that have a heatmap layer, in layer order."""
        out = []
        for lyr in self.heatmaps:
            g = (stpredict_meta(lyr) or {}).get("gene")
            if g and g not in out:
                out.append(str(g))
        return out

    @property
    def visible_genes(self) -> list[str]:
        """Genes of the visible heatmaps, top-most first (what the user is looking at)."""
        out = []
        for lyr in reversed(self.heatmaps):
            g = (stpredict_meta(lyr) or {}).get("gene")
            if g and lyr.visible and g not in out:
                out.append(str(g))
        return out

    @property
    def reference_layer(self) -> Any:
        """A layer whose ``scale``/``translate`` register a grid-shaped array on the slide."""
        return self.heatmaps[0] if self.heatmaps else self.tumor


def fill_source_combo(combo: Any, sources: Mapping[str, StoreSource], current: Any) -> int:
    """Refill a store combo box with ``sources`` (label, path) without emitting signals.

    ``current`` (a store path) stays selected when it is still there, else the first entry.
    Returns the index ``current`` was found at (-1 when it is gone or ``None``).
    """
    combo.blockSignals(True)
    combo.clear()
    for path, src in sources.items():
        combo.addItem(src.label, path)
    idx = combo.findData(current) if current else -1
    combo.setCurrentIndex(idx if idx >= 0 else (0 if sources else -1))
    combo.blockSignals(False)
    return idx


def source_index(combo: Any, store: Any) -> int:
    """The index of the prediction store ``store`` (a path) in a store combo box.

    Raises
    ------
    StPredictError
        No heatmap layer of that store in the viewer.
    """
    from napari_stpredict.errors import StPredictError

    idx = combo.findData(str(store))
    if idx < 0:
        raise StPredictError(f"{store}: no heatmap layer of this prediction store in the viewer")
    return idx


def store_sources(viewer: Any) -> dict[str, StoreSource]:
    """``{store path: StoreSource}`` for every store referred to by a layer, in layer order."""
    out: dict[str, StoreSource] = {}
    for layer in viewer.layers:
        meta = stpredict_meta(layer)
        if meta is None:
            continue
        src = out.setdefault(meta["store"], StoreSource(meta["store"], meta))
        kind = meta.get("kind", "heatmap")
        if kind == "tumor":
            src.tumor = layer
        elif kind == "heatmap":
            src.heatmaps.append(layer)
            if src.meta.get("kind") == "tumor":
                src.meta = meta
    return out


def tumor_layer_name(source: StoreSource) -> str:
    """``"<slide> tumour (stpredict)"``."""
    slide = Path(str(source.meta.get("slide_path") or "")).stem
    return f"{slide} {TUMOR_LAYER_SUFFIX}".strip()


def slide_layer_of(viewer: Any, source: StoreSource) -> Any:
    """The slide Image layer a source was predicted on (by name), or ``None``."""
    name = source.meta.get("slide_layer")
    for layer in viewer.layers:
        if layer.name == name:
            return layer
    return None


def open_store(path: str) -> Any:
    """Open a prediction store folder (core: raises StPredictError when it is gone)."""
    from napari_stpredict.inference.store import PredictionStore

    return PredictionStore.from_path(path)
