"""The layers of the "Tumour localization" dock (a mixin of :class:`~.tumor.TumorWidget`).

- the Labels layer (tumour = 1, ``metadata["stpredict"]`` with ``kind="tumor"``), hidden by
  default, placed like the heatmaps; brush edits redraw the outline;
- the Shapes layer of the regions' outlines (exact tile edges) and the canvas legend.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_stpredict.widgets._heatmaps import level0_to_world
from napari_stpredict.widgets._sources import slide_layer_of, tumor_layer_name

#: Colour of tumour outlines and of the Labels layer (RGBA).
TUMOR_RGBA = (0.0, 0.95, 1.0, 1.0)
#: Opacity of the Labels layer when the user turns it on.
OPACITY = 0.35
#: Outline width as a fraction of a tile's side.
OUTLINE_WIDTH = 0.08
OUTLINE_SUFFIX = " outline"


class TumorLayersMixin:
    """Labels + outline layers of the tumour dock (needs the TumorWidget's attributes:
    ``viewer``, ``state``, ``layer``, ``outline``, ``_source``)."""

    def layer_metadata(self) -> dict[str, Any]:
        """``metadata["stpredict"]`` of the Labels layer (``kind="tumor"``)."""
        assert self._source is not None and self.state.score is not None
        base = {k: v for k, v in self._source.meta.items() if k != "gene"}
        s = self.state
        return {
            **base,
            "kind": "tumor",
            "threshold": float(s.threshold or 0.0),
            "threshold_method": s.method,
            "genes": list(s.score.genes),
            "weights": list(s.score.weights),
            "smooth_sigma_cells": float(s.sigma),
            "min_size_cells": int(s.min_size),
        }

    def _placement(self) -> dict[str, Any]:
        ref = self._source.reference_layer if self._source is not None else None
        if ref is None:
            return {}
        kwargs: dict[str, Any] = {
            "scale": tuple(ref.scale)[-2:],
            "translate": tuple(ref.translate)[-2:],
        }
        units = getattr(ref, "units", None)
        if units is not None:  # same units as heatmaps and slide, else napari drops them all
            kwargs["units"] = tuple(str(u) for u in units)[-2:]
        return kwargs

    def _update_layers(self) -> None:
        mask = self.state.mask
        assert mask is not None and self._source is not None
        data = mask.astype(np.uint8)
        meta = {"stpredict": self.layer_metadata()}
        layer = self.layer
        if layer is not None and layer in self.viewer.layers and layer.data.shape == data.shape:
            layer.data[...] = data
            layer.metadata = meta
            layer.refresh()
        else:
            from napari.utils.colormaps import DirectLabelColormap

            cmap = DirectLabelColormap(
                color_dict={None: (0, 0, 0, 0), 0: (0, 0, 0, 0), 1: TUMOR_RGBA}
            )
            active = self.viewer.layers.selection.active
            self.layer = self.viewer.add_labels(
                data,
                name=tumor_layer_name(self._source),
                opacity=OPACITY,
                metadata=meta,
                colormap=cmap,
                visible=False,  # the outline shows it; turn on to paint corrections
                **self._placement(),
            )
            self.layer.events.paint.connect(lambda *_: self._draw_outline(self.layer.data > 0))
            if active is not None and active in self.viewer.layers:
                self.viewer.layers.selection.active = active  # the heatmap stays selected
        self._draw_outline(mask)

    def _draw_outline(self, mask: np.ndarray) -> None:
        """Thin outlines of the regions (exact tile edges) in a Shapes layer on top."""
        from napari_stpredict.tumor import mask_to_polygons

        src = self._source
        if src is None or self.state.grid is None:
            return
        grid = self.state.grid
        slide_layer = slide_layer_of(self.viewer, src)
        rings: list[np.ndarray] = []
        for poly in mask_to_polygons(np.asarray(mask, dtype=bool), grid):
            for part in getattr(poly, "geoms", [poly]):
                for ring in (part.exterior, *part.interiors):
                    xy = np.asarray(ring.coords, dtype=float)[:-1]
                    yx = xy[:, ::-1]
                    if slide_layer is not None:
                        yx = level0_to_world(slide_layer, yx)
                    rings.append(yx)
        stride_world = float(self._placement().get("scale", (grid.stride_px,))[0])
        width = OUTLINE_WIDTH * stride_world
        name = tumor_layer_name(src) + OUTLINE_SUFFIX
        outline = self.outline
        if outline is None or outline not in self.viewer.layers:
            active = self.viewer.layers.selection.active
            kwargs: dict[str, Any] = {}
            units = self._placement().get("units")
            if units is not None:
                kwargs["units"] = units
            outline = self.viewer.add_shapes(
                name=name,
                edge_color=[TUMOR_RGBA],
                face_color=[(0, 0, 0, 0)],
                edge_width=width,
                metadata={"stpredict_outline": {"store": src.store}},
                **kwargs,
            )
            self.outline = outline
            if active is not None and active in self.viewer.layers:
                self.viewer.layers.selection.active = active
        outline.data = []
        if rings:
            outline.add_polygons(
                rings, edge_width=width, edge_color=TUMOR_RGBA, face_color=(0, 0, 0, 0)
            )
        self._legend(len(rings))

    def _legend(self, n_rings: int) -> None:
        """A canvas legend for the outlines (napari's text overlay)."""
        overlay = self.viewer.canvas.overlays.text if hasattr(self.viewer, "canvas") else None
        if overlay is None:
            return
        s = self.state
        overlay.text = (
            f"▭ tumour regions (score ≥ {s.threshold:.2f}, {s.method})" if s.threshold else ""
        )
        overlay.color = TUMOR_RGBA
        overlay.position = "bottom_left"
        overlay.box = True
        overlay.visible = True
