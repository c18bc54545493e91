"""Heatmap layers: one napari Image layer per selected gene, registered to the slide layer.

Registration convention
-----------------------
The slide layer shows level-0 pixel ``(i, j)`` centred on world ``translate + scale * (i, j)``
(napari's pixel-centre convention), while the core's continuous frame puts pixel ``(i, j)`` on
``[i, i+1) × [j, j+1)``. A continuous level-0 coordinate ``c`` therefore sits at world
``translate + scale * (c - 0.5)``. A heatmap pixel ``(r, c)`` is grid cell ``(r, c)``; it is drawn
centred on the centre of that cell's patch footprint, with side = the grid stride:

    heatmap.scale     = slide.scale * stride_px
    heatmap.translate = world position of the centre of cell (0, 0)

so ``heatmap.get_value(world_centre_of_cell)`` is that cell's prediction. With the default
stride (= patch) each heatmap pixel covers exactly its patch; with a smaller stride (overlapping
patches) each pixel covers the central ``stride × stride`` part of its patch. Units follow the
slide layer (µm when the slide has an mpp, pixels otherwise). Layers that derive from a heatmap
(tumour labels, exports) should copy ``scale`` and ``translate`` from it.

The data of a heatmap layer is a float32 numpy array of the grid's shape (NaN = not predicted,
drawn transparent). It is small (the grid is the slide divided by the patch size: a 100k × 100k
px slide at 0.5 µm/px and 112 µm patches is 446 × 446 cells, 0.8 MB per gene) and is updated in
place as batches land; napari never computes statistics on it because contrast limits are fixed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_stpredict.widgets._common import keep_text_alive

if TYPE_CHECKING:
    import napari
    from napari.layers import Image

#: Suffix of heatmap layer names: ``"ERBB2 (predicted)"``.
NAME_SUFFIX = " (predicted)"
#: Colormap of heatmap layers; perceptually uniform, dark = low, light = high.
COLORMAP = "inferno"
#: Opacity of heatmap layers over the H&E (the tissue stays readable underneath).
OPACITY = 0.65
#: Blending of heatmap layers: translucent keeps colours true (additive would wash out on white).
BLENDING = "translucent"


def layer_name(gene: str) -> str:
    """Return the layer name for ``gene``: ``"ERBB2 (predicted)"``."""
    return f"{gene}{NAME_SUFFIX}"


def slide_transform(slide_layer: Any) -> tuple[np.ndarray, np.ndarray]:
    """Return the slide layer's level-0 ``(scale, translate)`` for the displayed (y, x) axes."""
    scale = np.asarray(slide_layer.scale, dtype=float)[-2:]
    translate = np.asarray(slide_layer.translate, dtype=float)[-2:]
    return scale, translate


def world_to_level0(slide_layer: Any, world_yx: Sequence[float] | np.ndarray) -> np.ndarray:
    """Map world ``(y, x)`` (the slide layer's units) to continuous level-0 pixel coordinates."""
    scale, translate = slide_transform(slide_layer)
    return (np.asarray(world_yx, dtype=float) - translate) / scale + 0.5


def level0_to_world(slide_layer: Any, px_yx: Sequence[float] | np.ndarray) -> np.ndarray:
    """Map continuous level-0 pixel ``(y, x)`` to world coordinates of the slide layer."""
    scale, translate = slide_transform(slide_layer)
    return translate + scale * (np.asarray(px_yx, dtype=float) - 0.5)


def heatmap_placement(
    grid: Any, slide_layer: Any
) -> tuple[tuple[float, float], tuple[float, float]]:
    """``(scale, translate)`` that register a grid-shaped layer on ``slide_layer``.

    Delegates to the one placement function, :func:`napari_stpredict.inference.grid.layer_placement`,
    with the slide layer's own level-0 scale and translate.
    """
    from napari_stpredict.inference.grid import layer_placement

    scale, translate = slide_transform(slide_layer)
    return layer_placement(grid, slide_scale=scale, slide_translate=translate)


def contrast_limits(
    gene_stats: Mapping[str, Any] | None, index: int, gene: str | None = None
) -> tuple[float, float]:
    """Contrast limits of a gene from the model's training data: its p01–p99 range.

    Reads ``gene_stats[gene]["p01"/"p99"]`` (the per-gene records of newer model files), else
    ``gene_stats["p01"/"p99"][index]`` (arrays of older files), else mean ± 2 sd, else
    ``(0, 1)``. Never looks at predicted values, so a colour means the same value on every
    slide and every view.
    """
    lo = hi = None
    rec = gene_stats.get(gene) if (gene_stats and gene is not None) else None
    if isinstance(rec, Mapping):
        if rec.get("p01") is not None and rec.get("p99") is not None:
            lo, hi = float(rec["p01"]), float(rec["p99"])
        elif rec.get("mean") is not None and (rec.get("sd") or rec.get("std")) is not None:
            m, s = float(rec["mean"]), float(rec.get("sd", rec.get("std")))
            lo, hi = max(m - 2 * s, 0.0), m + 2 * s
    elif gene_stats:
        if "p01" in gene_stats and "p99" in gene_stats:
            lo, hi = float(gene_stats["p01"][index]), float(gene_stats["p99"][index])
        elif "mean" in gene_stats and "std" in gene_stats:
            m, s = float(gene_stats["mean"][index]), float(gene_stats["std"][index])
            lo, hi = max(m - 2 * s, 0.0), m + 2 * s
    if lo is None or hi is None or not np.isfinite(lo) or not np.isfinite(hi):
        return 0.0, 1.0
    if hi <= lo:  # a gene that is constant in the training data
        hi = lo + max(abs(lo) * 0.1, 1e-3)
    return lo, hi


def model_gene_stats(predictor: Any) -> Mapping[str, Any] | None:
    """The model's per-gene training statistics: ``metadata["gene_stats"]`` when it holds
    per-gene records, else the Predictor's arrays."""
    meta = getattr(predictor, "metadata", None) or {}
    stats = meta.get("gene_stats") if isinstance(meta, Mapping) else None
    genes = list(getattr(predictor, "genes", []) or [])
    if isinstance(stats, Mapping) and genes and isinstance(stats.get(genes[0]), Mapping):
        return stats
    return getattr(predictor, "gene_stats", None) or stats


def units_text(model_metadata: Mapping[str, Any] | None) -> str:
    """The unit of predicted expression (e.g. ``ln(1 + counts per 10,000)``)."""
    from napari_stpredict.export._common import expression_units

    return expression_units(model_metadata)


# ---------------------------------------------------------------------------- legend overlay
_LEGEND_CLS: Any = None


def _legend_class() -> Any:
    """A layer text overlay whose text we set (napari's layer-name overlay shows the name
    only); registered with napari's vispy overlay table. ``None`` if napari changed."""
    global _LEGEND_CLS
    if _LEGEND_CLS is not None:
        return _LEGEND_CLS or None
    try:
        from napari._vispy.overlays.text import VispyLayerNameOverlay
        from napari._vispy.utils.visual import overlay_to_visual
        from napari.components.overlays.text import LayerNameOverlay

        class GeneLegendOverlay(LayerNameOverlay):  # type: ignore[misc,valid-type]
            """Gene name and unit above a heatmap's colour bar."""

            text: str = ""

        class VispyGeneLegend(VispyLayerNameOverlay):  # type: ignore[misc,valid-type]
            def _connect_events(self) -> None:
                self.overlay.events.text.connect(self._on_text_change)

            def _on_text_change(self) -> None:
                self.node.text = self.overlay.text
                self._on_position_change()

        overlay_to_visual[GeneLegendOverlay] = VispyGeneLegend
        _LEGEND_CLS = GeneLegendOverlay
    except Exception:  # a private napari API moved: fall back to the layer-name overlay
        _LEGEND_CLS = False
    return _LEGEND_CLS or None


#: Key of our legend overlay in ``layer._overlays``.
LEGEND_KEY = "stpredict_legend"


def set_legend(layer: Any, text: str, *, visible: bool) -> None:
    """Show napari's colour bar on ``layer`` with ``text`` (gene, unit) next to it."""
    layer.colorbar.visible = visible
    layer.colorbar.box = True
    layer.colorbar.position = "top_right"
    cls = _legend_class()
    if cls is None:
        layer.name_overlay.visible = visible
        layer.name_overlay.box = True
        layer.name_overlay.position = "top_right"
        return
    ov = layer._overlays.get(LEGEND_KEY)
    if ov is None:
        ov = cls(text=text, visible=visible, box=True, position="top_right", font_size=10)
        layer._overlays[LEGEND_KEY] = ov
    else:
        ov.text = text
        ov.visible = visible


def legend_text(layer: Any) -> str:
    """The legend text shown with ``layer``'s colour bar ("" when none)."""
    ov = getattr(layer, "_overlays", {}).get(LEGEND_KEY)
    if ov is not None:
        return str(ov.text) if ov.visible else ""
    return str(layer.name) if layer.name_overlay.visible else ""


def _units_of(layer: Any) -> dict[str, Any]:
    # same units as the slide (µm), else napari warns and drops units for rendering
    units = getattr(layer, "units", None)
    if units is None:
        return {}
    return {"units": tuple(str(u) for u in units)[-2:]}


class HeatmapSet:
    """The heatmap layers of one prediction session (one slide layer + model + grid).

    Parameters
    ----------
    viewer
        The napari viewer.
    slide_layer
        The slide's Image layer; heatmaps are registered to it.
    grid
        The session's TileGrid (``shape``, ``stride_px``, ``cell_px``, ``to_dict``).
    panel
        The model's genes, in the order of the prediction vectors.
    gene_stats
        Training statistics per gene (``p01``/``p99`` give the contrast limits, see
        :func:`contrast_limits`).
    metadata
        Base of ``layer.metadata["stpredict"]`` (``store``, ``model``, ``slide_path`` ...);
        ``kind``, ``gene``, ``slide_layer`` and ``grid`` are filled in here.
    read_plane
        ``read_plane(gene_index) -> (gh, gw) float32`` already-predicted values (NaN = not done).
        Slow (zarr): :meth:`set_genes` calls it only with ``fill=True`` (scripts, tests); the
        widget reads planes in a worker and calls :meth:`merge_plane`.
    units
        Unit of the values, shown under the gene name next to the colour bar.
    """

    def __init__(
        self,
        viewer: napari.Viewer,
        *,
        slide_layer: Image,
        grid: Any,
        panel: Sequence[str],
        gene_stats: Mapping[str, Any] | None,
        metadata: Mapping[str, Any],
        read_plane: Callable[[int], np.ndarray] | None = None,
        units: str = "ln(1 + counts per 10,000)",
    ) -> None:
        self.viewer = viewer
        keep_text_alive(viewer)  # removing a heatmap's colour bar must not crash napari
        self.slide_layer = slide_layer
        self.grid = grid
        self.panel = list(panel)
        self._index = {g: i for i, g in enumerate(self.panel)}
        self.gene_stats = gene_stats
        self.metadata = dict(metadata)
        self.read_plane = read_plane
        self.units = units
        self.colorbar = True
        self.smooth = False
        self.layers: dict[str, Image] = {}
        #: uncertainty (spread) layers, one per gene shown, when asked for and available
        self.spread_layers: dict[str, Image] = {}
        self._arrays: dict[str, np.ndarray] = {}
        self._dirty: set[Any] = set()

    # -- layers ------------------------------------------------------------------------------
    @property
    def genes(self) -> list[str]:
        """Genes that currently have a layer."""
        return list(self.layers)

    def index(self, gene: str) -> int:
        """Position of ``gene`` in the prediction vectors."""
        return self._index[gene]

    def gene_of(self, layer: Any) -> str | None:
        """The gene of one of our layers (heatmap or uncertainty), by identity."""
        for table in (self.layers, self.spread_layers):
            for gene, lyr in table.items():
                if lyr is layer:
                    return gene
        return None

    def layer_metadata(self, gene: str, kind: str = "heatmap") -> dict[str, Any]:
        """The ``layer.metadata["stpredict"]`` dict of ``gene``'s layer."""
        grid_dict = self.grid.to_dict() if hasattr(self.grid, "to_dict") else {}
        return {
            **self.metadata,
            "kind": kind,
            "gene": gene,
            "slide_layer": self.slide_layer.name,
            "grid": grid_dict,
        }

    def limits(self, gene: str) -> tuple[float, float]:
        """Fixed contrast limits of ``gene`` (training percentiles)."""
        return contrast_limits(self.gene_stats, self._index[gene], gene)

    def set_genes(self, genes: Sequence[str], *, fill: bool = True) -> list[str]:
        """Show exactly ``genes``: add missing layers, remove the layers of other genes.

        New layers are filled from the prediction store when ``fill`` is true (no model call).
        Returns the genes that were added.
        """
        unknown = [g for g in genes if g not in self._index]
        if unknown:
            raise KeyError(f"genes not predicted by the model: {', '.join(unknown)}")
        for gene in [g for g in {*self.layers, *self.spread_layers} if g not in genes]:
            self.remove_gene(gene)
        added = [g for g in genes if g not in self.layers]
        for gene in added:
            self._add_layer(gene)
        if fill and added and self.read_plane is not None:
            for gene in added:
                self.merge_plane(gene, self.read_plane(self._index[gene]))
        self.flush()
        return added

    def _new_layer(self, gene: str, arr: np.ndarray, kind: str, **kwargs: Any) -> Image:
        scale, translate = heatmap_placement(self.grid, self.slide_layer)
        return self.viewer.add_image(
            arr,
            scale=scale,
            translate=translate,
            opacity=OPACITY,
            blending=BLENDING,
            interpolation2d="linear" if self.smooth else "nearest",
            metadata={"stpredict": self.layer_metadata(gene, kind)},
            **_units_of(self.slide_layer),
            **kwargs,
        )

    def _add_layer(self, gene: str) -> Image:
        arr = np.full(tuple(int(s) for s in self.grid.shape), np.nan, dtype=np.float32)
        lo, hi = self.limits(gene)
        layer = self._new_layer(
            gene, arr, "heatmap", name=layer_name(gene), colormap=COLORMAP, contrast_limits=(lo, hi)
        )
        # napari must not recompute limits over a half-empty map
        layer.contrast_limits_range = (min(lo, 0.0), hi + (hi - lo))
        layer.contrast_limits = (lo, hi)
        set_legend(layer, f"{gene}\n{self.units}", visible=self.colorbar)
        self.layers[gene] = layer
        self._arrays[gene] = arr
        return layer

    def add_spread_layer(self, gene: str, plane: np.ndarray) -> Image:
        """Show the per-tile spread (uncertainty) of ``gene`` as a layer of its own."""
        old = self.spread_layers.pop(gene, None)
        if old is not None and old in self.viewer.layers:
            self.viewer.layers.remove(old)
        arr = np.asarray(plane, dtype=np.float32).copy()
        finite = arr[np.isfinite(arr)]
        hi = float(np.percentile(finite, 99)) if finite.size else 1.0
        layer = self._new_layer(
            gene,
            arr,
            "uncertainty",
            name=f"{gene} (uncertainty)",
            colormap="gray_r",
            contrast_limits=(0.0, hi if hi > 0 else 1.0),
        )
        set_legend(layer, f"{gene} spread (sd)\n{self.units}", visible=self.colorbar)
        self.spread_layers[gene] = layer
        return layer

    def remove_spread_layers(self) -> None:
        for gene in list(self.spread_layers):
            layer = self.spread_layers.pop(gene)
            if layer in self.viewer.layers:
                self.viewer.layers.remove(layer)

    def remove_gene(self, gene: str) -> None:
        """Remove ``gene``'s layers from the viewer (if still there) and stop updating them."""
        layer = self.layers.pop(gene, None)
        self._arrays.pop(gene, None)
        self._dirty.discard(gene)
        spread = self.spread_layers.pop(gene, None)
        for lyr in (layer, spread):
            if lyr is not None and lyr in self.viewer.layers:
                self.viewer.layers.remove(lyr)

    def forget_layer(self, layer: Any) -> str | None:
        """Stop tracking ``layer`` (the user removed it); returns its gene if it was a heatmap."""
        gene = None
        for g, lyr in list(self.layers.items()):
            if lyr is layer:
                self.layers.pop(g)
                self._arrays.pop(g, None)
                self._dirty.discard(g)
                gene = g
        for g, lyr in list(self.spread_layers.items()):
            if lyr is layer:
                self.spread_layers.pop(g)
        return gene

    def detach(self) -> None:
        """Stop updating all layers; they stay in the viewer with their last values."""
        self.layers.clear()
        self.spread_layers.clear()
        self._arrays.clear()
        self._dirty.clear()

    # -- display -----------------------------------------------------------------------------
    def set_display(self, *, colorbar: bool | None = None, smooth: bool | None = None) -> None:
        """Colour bars + legends on/off; smooth (linear) or tile (nearest) display."""
        if colorbar is not None:
            self.colorbar = bool(colorbar)
        if smooth is not None:
            self.smooth = bool(smooth)
        for gene, layer in list(self.layers.items()):
            set_legend(layer, f"{gene}\n{self.units}", visible=self.colorbar)
            layer.interpolation2d = "linear" if self.smooth else "nearest"
        for gene, layer in list(self.spread_layers.items()):
            set_legend(layer, f"{gene} spread (sd)\n{self.units}", visible=self.colorbar)
            layer.interpolation2d = "linear" if self.smooth else "nearest"

    # -- values ------------------------------------------------------------------------------
    def update(
        self, cells: np.ndarray, values: np.ndarray, spread: np.ndarray | None = None
    ) -> None:
        """Write a batch: ``cells`` (n, 2) grid indices, ``values`` (n, G) in panel order."""
        if len(cells) == 0 or not self._arrays:
            return
        cells = np.asarray(cells, dtype=np.intp)
        values = np.asarray(values)
        for gene, arr in self._arrays.items():
            arr[cells[:, 0], cells[:, 1]] = values[:, self._index[gene]]
            self._dirty.add(gene)
        if spread is not None:
            spread = np.asarray(spread)
            for gene, layer in self.spread_layers.items():
                layer.data[cells[:, 0], cells[:, 1]] = spread[:, self._index[gene]]
                self._dirty.add(("spread", gene))

    def merge_plane(self, gene: str, plane: np.ndarray) -> None:
        """Fill the not-yet-shown tiles of ``gene`` from a stored plane (NaN = not predicted)."""
        arr = self._arrays.get(gene)
        if arr is None:
            return
        plane = np.asarray(plane, dtype=np.float32)
        hole = np.isnan(arr)
        arr[hole] = plane[hole]
        self._dirty.add(gene)

    @property
    def dirty(self) -> bool:
        """Whether some layer has values not drawn yet."""
        return bool(self._dirty)

    def flush(self) -> None:
        """Redraw the layers whose values changed since the last flush."""
        for key in list(self._dirty):
            if isinstance(key, tuple):
                layer = self.spread_layers.get(key[1])
            else:
                layer = self.layers.get(key)
            if layer is not None and layer in self.viewer.layers:
                layer.refresh(highlight=False, extent=False)
        self._dirty.clear()

    def array(self, gene: str) -> np.ndarray:
        """The in-memory heatmap of ``gene`` (the layer's data)."""
        return self._arrays[gene]
