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
    """Return ``(scale, translate)`` that register a grid-shaped heatmap on ``slide_layer``.

    Parameters
    ----------
    grid
        The :class:`~napari_stpredict.inference.TileGrid` the predictions live on.
    slide_layer
        The napari Image layer of the slide (its level-0 scale and translate are used).
    """
    scale, _ = slide_transform(slide_layer)
    stride = np.broadcast_to(np.asarray(grid.stride_px, dtype=float), (2,))
    y0, x0, y1, x1 = grid.cell_rect_px(0, 0)
    centre = level0_to_world(slide_layer, ((y0 + y1) / 2.0, (x0 + x1) / 2.0))
    hm_scale = scale * stride
    return (float(hm_scale[0]), float(hm_scale[1])), (float(centre[0]), float(centre[1]))


def cell_centre_world(grid: Any, slide_layer: Any, i: int, j: int) -> np.ndarray:
    """Return the world ``(y, x)`` of the centre of grid cell ``(i, j)``."""
    y0, x0, y1, x1 = grid.cell_rect_px(i, j)
    return level0_to_world(slide_layer, ((y0 + y1) / 2.0, (x0 + x1) / 2.0))


def contrast_limits(gene_stats: Mapping[str, np.ndarray] | None, index: int) -> tuple[float, float]:
    """Contrast limits of gene ``index`` from the training data: its p01–p99 range.

    Falls back to mean ± 2 std, then to ``(0, 1)``, when percentiles are missing; never looks at
    predicted values, so the colours of a gene mean the same thing on every slide.
    """
    lo = hi = None
    if gene_stats:
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
        The session's TileGrid (``shape``, ``stride_px``, ``cell_rect_px``, ``to_dict``).
    panel
        The model's genes, in the order of the prediction vectors.
    gene_stats
        Training-data statistics per gene (``p01``/``p99`` give the contrast limits).
    metadata
        Base of ``layer.metadata["stpredict"]`` (``store``, ``model``, ``slide_path`` ...);
        ``kind``, ``gene``, ``slide_layer`` and ``grid`` are filled in here.
    read_plane
        ``read_plane(gene_index) -> (gh, gw) float32`` already-predicted values (NaN = not done);
        used to fill a new layer from the cache without a model call. May be slow: call
        :meth:`fill_from_store` from a worker thread, or let :meth:`set_genes` do it inline.
    """

    def __init__(
        self,
        viewer: napari.Viewer,
        *,
        slide_layer: Image,
        grid: Any,
        panel: Sequence[str],
        gene_stats: Mapping[str, np.ndarray] | None,
        metadata: Mapping[str, Any],
        read_plane: Callable[[int], np.ndarray] | None = None,
    ) -> None:
        self.viewer = viewer
        self.slide_layer = slide_layer
        self.grid = grid
        self.panel = list(panel)
        self._index = {g: i for i, g in enumerate(self.panel)}
        self.gene_stats = gene_stats
        self.metadata = dict(metadata)
        self.read_plane = read_plane
        self.layers: dict[str, Image] = {}
        self._arrays: dict[str, np.ndarray] = {}
        self._dirty: set[str] = set()

    # -- layers ------------------------------------------------------------------------------
    @property
    def genes(self) -> list[str]:
        """Genes that currently have a layer."""
        return list(self.layers)

    def layer_metadata(self, gene: str) -> dict[str, Any]:
        """The ``layer.metadata["stpredict"]`` dict of ``gene``'s layer."""
        grid_dict = self.grid.to_dict() if hasattr(self.grid, "to_dict") else {}
        return {
            **self.metadata,
            "kind": "heatmap",
            "gene": gene,
            "slide_layer": self.slide_layer.name,
            "grid": grid_dict,
        }

    def set_genes(self, genes: Sequence[str], *, fill: bool = True) -> list[str]:
        """Show exactly ``genes``: add missing layers, remove the layers of other genes.

        New layers are filled from the prediction store when ``fill`` is true (no model call).
        Returns the genes that were added.
        """
        unknown = [g for g in genes if g not in self._index]
        if unknown:
            raise KeyError(f"genes not predicted by the model: {', '.join(unknown)}")
        for gene in [g for g in self.layers if g not in genes]:
            self.remove_gene(gene)
        added = [g for g in genes if g not in self.layers]
        for gene in added:
            self._add_layer(gene)
        if fill and added and self.read_plane is not None:
            for gene in added:
                self.merge_plane(gene, self.read_plane(self._index[gene]))
        self.flush()
        return added

    def _add_layer(self, gene: str) -> Image:
        shape = tuple(int(s) for s in self.grid.shape)
        arr = np.full(shape, np.nan, dtype=np.float32)
        scale, translate = heatmap_placement(self.grid, self.slide_layer)
        lo, hi = contrast_limits(self.gene_stats, self._index[gene])
        layer = self.viewer.add_image(
            arr,
            name=layer_name(gene),
            scale=scale,
            translate=translate,
            colormap=COLORMAP,
            contrast_limits=(lo, hi),
            opacity=OPACITY,
            blending=BLENDING,
            interpolation2d="nearest",
            metadata={"stpredict": self.layer_metadata(gene)},
            **_units_of(self.slide_layer),
        )
        # napari must not recompute limits over a half-empty map
        layer.contrast_limits_range = (min(lo, 0.0), hi + (hi - lo))
        layer.contrast_limits = (lo, hi)
        self.layers[gene] = layer
        self._arrays[gene] = arr
        return layer

    def remove_gene(self, gene: str) -> None:
        """Remove ``gene``'s layer from the viewer (if still there) and stop updating it."""
        layer = self.layers.pop(gene, None)
        self._arrays.pop(gene, None)
        self._dirty.discard(gene)
        if layer is not None and layer in self.viewer.layers:
            self.viewer.layers.remove(layer)

    def forget_layer(self, layer: Any) -> None:
        """Stop tracking ``layer`` (the user removed it from the viewer)."""
        for gene, lyr in list(self.layers.items()):
            if lyr is layer:
                self.layers.pop(gene)
                self._arrays.pop(gene, None)
                self._dirty.discard(gene)

    def detach(self) -> None:
        """Stop updating all layers; they stay in the viewer with their last values."""
        self.layers.clear()
        self._arrays.clear()
        self._dirty.clear()

    # -- values ------------------------------------------------------------------------------
    def update(self, cells: np.ndarray, values: np.ndarray) -> None:
        """Write a batch: ``cells`` (n, 2) grid indices, ``values`` (n, G) in panel order."""
        if len(cells) == 0 or not self._arrays:
            return
        cells = np.asarray(cells, dtype=np.intp)
        values = np.asarray(values)
        for gene, arr in self._arrays.items():
            arr[cells[:, 0], cells[:, 1]] = values[:, self._index[gene]]
            self._dirty.add(gene)

    def merge_plane(self, gene: str, plane: np.ndarray) -> None:
        """Fill the not-yet-shown cells of ``gene`` from a stored plane (NaN = not predicted)."""
        arr = self._arrays.get(gene)
        if arr is None:
            return
        plane = np.asarray(plane, dtype=np.float32)
        hole = np.isnan(arr)
        arr[hole] = plane[hole]
        self._dirty.add(gene)

    def clear_values(self) -> None:
        """Blank every layer (after the cache was cleared)."""
        for gene, arr in self._arrays.items():
            arr[...] = np.nan
            self._dirty.add(gene)

    @property
    def dirty(self) -> bool:
        """Whether some layer has values not drawn yet."""
        return bool(self._dirty)

    def flush(self) -> None:
        """Redraw the layers whose values changed since the last flush."""
        for gene in list(self._dirty):
            layer = self.layers.get(gene)
            if layer is not None and layer in self.viewer.layers:
                layer.refresh(highlight=False, extent=False)
        self._dirty.clear()

    def array(self, gene: str) -> np.ndarray:
        """The in-memory heatmap of ``gene`` (the layer's data)."""
        return self._arrays[gene]
