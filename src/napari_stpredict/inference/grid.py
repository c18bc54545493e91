"""The slide cut into model patches: :class:`TileGrid`.

A grid cell is one model patch: a square of ``patch_um`` micrometres (``cell_px`` level-0
pixels), resampled to ``patch_px`` pixels before the model sees it. Cells start every
``stride_um`` (default: the patch size, no overlap; half a patch gives a smoother map with
four times the cells).

Coordinates
-----------
Level-0 pixel coordinates are continuous: pixel ``(i, j)`` covers ``[i, i+1) × [j, j+1)``.
Cell ``(i, j)`` covers the level-0 rectangle::

    y0 = i * stride_px,  x0 = j * stride_px,  y1 = y0 + cell_px,  x1 = x0 + cell_px

and its centre is ``(y0 + cell_px / 2, x0 + cell_px / 2)``. Micrometres are level-0 px × mpp.

Slides without a pixel size
---------------------------
When the slide's mpp is unknown the grid assumes the slide is at the model's own scale
(``patch_um / patch_px`` µm per pixel), so a cell is ``patch_px`` slide pixels and no
resampling happens. :attr:`TileGrid.mpp_assumed` is then true so the caller can warn that
the physical scale is a guess.

Heatmap registration
--------------------
A heatmap is a ``(gh, gw)`` image whose pixel ``(i, j)`` is cell ``(i, j)``. napari draws
image pixel ``k`` centred on ``k * scale + translate`` and the slide layer draws level-0 pixel
``k`` centred on ``k * slide_scale``, i.e. the continuous level-0 coordinate ``c`` sits at world
``(c - 0.5) * slide_scale``. Hence (see :meth:`TileGrid.heatmap_transform`)::

    scale     = stride in layer units        = stride_px * slide_scale
    translate = centre of cell (0, 0)        = (cell_px / 2 - 0.5) * slide_scale

with ``slide_scale = mpp`` (layer units µm) or ``1`` (layer units px, mpp unknown). Each
heatmap pixel then lies over the centre of its patch and spans one stride, which for the
default stride is exactly the patch footprint.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from napari_stpredict.errors import StPredictError

Units = Literal["px", "um", "layer"]

#: Version of :meth:`TileGrid.to_dict`; bumped when the geometry definition changes.
GRID_VERSION = 1


class _MaskLike(Protocol):
    mask: np.ndarray
    downsample: float

    def fraction(self, y0: float, x0: float, y1: float, x1: float) -> float: ...


@dataclass(frozen=True)
class TileGrid:
    """Model patches laid over a slide, with mappings between cells, level-0 px and µm.

    Parameters
    ----------
    shape0
        Level-0 ``(h, w)`` of the slide in pixels.
    mpp
        Micrometres per level-0 pixel, or ``None`` when unknown (the model's scale is assumed,
        see :attr:`mpp_assumed`).
    patch_um
        Side of a model patch in micrometres.
    patch_px
        Side of a model patch in pixels (the model's input size).
    stride_um
        Distance between neighbouring cell origins in micrometres; ``None`` = ``patch_um``.

    Examples
    --------
    >>> g = TileGrid((1000, 2000), 0.5, patch_um=112, patch_px=224)
    >>> g.shape, g.cell_px
    ((5, 9), 224.0)
    >>> g.cell_rect_px(1, 2)
    (224.0, 448.0, 448.0, 672.0)
    """

    shape0: tuple[int, int]
    mpp: float | None
    patch_um: float = field(kw_only=True)
    patch_px: int = field(kw_only=True)
    stride_um: float | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        try:
            h, w = (int(v) for v in self.shape0)
        except (TypeError, ValueError):
            raise StPredictError(f"shape0={self.shape0!r}: expected (height, width)") from None
        if h <= 0 or w <= 0:
            raise StPredictError(f"shape0={self.shape0!r}: slide size must be positive")
        object.__setattr__(self, "shape0", (h, w))
        if self.mpp is not None:
            object.__setattr__(self, "mpp", _positive(self.mpp, "mpp"))
        object.__setattr__(self, "patch_um", _positive(self.patch_um, "patch_um"))
        if int(self.patch_px) != self.patch_px or int(self.patch_px) <= 0:
            raise StPredictError(f"patch_px={self.patch_px!r}: must be a positive integer")
        object.__setattr__(self, "patch_px", int(self.patch_px))
        stride = self.patch_um if self.stride_um is None else self.stride_um
        object.__setattr__(self, "stride_um", _positive(stride, "stride_um"))

    # ----------------------------------------------------------------- construction
    @classmethod
    def for_slide(cls, slide: Any, predictor: Any, *, stride_um: float | None = None) -> TileGrid:
        """The grid of ``predictor``'s patches over ``slide``.

        Parameters
        ----------
        slide
            A :class:`~napari_stpredict.slide.Slide` (uses ``shape`` and ``mpp``).
        predictor
            A :class:`~napari_stpredict.model.Predictor` (uses ``patch_um`` and ``patch_px``).
            A model without a physical patch size (``patch_um is None``, trained on pixels)
            gets cells of ``patch_px`` slide pixels.
        stride_um
            Cell stride in µm; ``None`` = the patch size (no overlap).
        """
        patch_px = int(predictor.patch_px)
        patch_um = getattr(predictor, "patch_um", None)
        if patch_um is None:
            patch_um = patch_px * (slide.mpp if slide.mpp else 1.0)
        return cls(
            tuple(slide.shape[:2]),
            slide.mpp,
            patch_um=patch_um,
            patch_px=patch_px,
            stride_um=stride_um,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description (layer metadata, store attributes)."""
        return {
            "version": GRID_VERSION,
            "shape0": list(self.shape0),
            "mpp": self.mpp,
            "patch_um": self.patch_um,
            "patch_px": self.patch_px,
            "stride_um": self.stride_um,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TileGrid:
        """Rebuild a grid from :meth:`to_dict` output.

        Raises
        ------
        StPredictError
            If the dictionary is not a grid description of a known version.
        """
        try:
            version = int(data.get("version", GRID_VERSION))
            if version != GRID_VERSION:
                raise StPredictError(
                    f"tile grid version {version}: not supported (expected {GRID_VERSION})"
                )
            return cls(
                tuple(data["shape0"]),
                data["mpp"],
                patch_um=data["patch_um"],
                patch_px=data["patch_px"],
                stride_um=data.get("stride_um"),
            )
        except (KeyError, TypeError, AttributeError) as err:
            raise StPredictError(f"tile grid description {data!r}: missing or bad {err}") from None

    def key(self) -> str:
        """A short stable hash of the geometry (part of the prediction cache key)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    # ----------------------------------------------------------------- geometry
    @property
    def mpp_assumed(self) -> bool:
        """True when the slide has no mpp and the model's own scale is assumed."""
        return self.mpp is None

    @property
    def effective_mpp(self) -> float:
        """µm per level-0 px used for the geometry (the model's scale when mpp is unknown)."""
        return self.mpp if self.mpp is not None else self.patch_um / self.patch_px

    @property
    def cell_px(self) -> float:
        """Side of a cell (patch footprint) in level-0 pixels."""
        return self.patch_um / self.effective_mpp

    @property
    def stride_px(self) -> float:
        """Distance between neighbouring cell origins in level-0 pixels."""
        return float(self.stride_um) / self.effective_mpp

    @property
    def shape(self) -> tuple[int, int]:
        """``(gh, gw)``: the fewest cells whose footprints cover the whole slide."""
        return (self._n_cells(self.shape0[0]), self._n_cells(self.shape0[1]))

    @property
    def n_cells(self) -> int:
        """Number of cells ``gh * gw``."""
        gh, gw = self.shape
        return gh * gw

    def _n_cells(self, length: int) -> int:
        extra = (length - self.cell_px) / self.stride_px
        # 1e-9: a slide of exactly k cells must not get a (k+1)-th from rounding noise
        return max(1, math.ceil(extra - 1e-9) + 1)

    def cell_rect_px(self, i: int, j: int) -> tuple[float, float, float, float]:
        """Level-0 rectangle ``(y0, x0, y1, x1)`` of cell ``(i, j)`` (its patch footprint)."""
        y0 = i * self.stride_px
        x0 = j * self.stride_px
        return (y0, x0, y0 + self.cell_px, x0 + self.cell_px)

    def cell_rects_px(self, cells: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`cell_rect_px`: ``(n, 2)`` cells → ``(n, 4)`` float ``y0, x0, y1, x1``."""
        cells = np.asarray(cells, dtype=np.float64).reshape(-1, 2)
        origin = cells * self.stride_px
        return np.concatenate([origin, origin + self.cell_px], axis=1)

    def cell_center_px(self, i: float, j: float) -> tuple[float, float]:
        """Level-0 ``(y, x)`` of the centre of cell ``(i, j)``."""
        half = self.cell_px / 2
        return (i * self.stride_px + half, j * self.stride_px + half)

    def cell_centers_px(self, cells: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`cell_center_px`: ``(n, 2)`` → ``(n, 2)`` float level-0 ``y, x``."""
        cells = np.asarray(cells, dtype=np.float64).reshape(-1, 2)
        return cells * self.stride_px + self.cell_px / 2

    def cell_center_um(self, i: float, j: float) -> tuple[float, float]:
        """``(y, x)`` of the centre of cell ``(i, j)`` in micrometres."""
        y, x = self.cell_center_px(i, j)
        return (y * self.effective_mpp, x * self.effective_mpp)

    def cell_at(self, y: float, x: float, *, units: Units = "px") -> tuple[int, int] | None:
        """The cell whose heatmap pixel contains a point, or ``None`` outside the grid.

        With overlapping cells a point lies in several footprints; the heatmap pixel (one
        stride around the cell centre) is unique, so that is what is returned — the cell whose
        value is drawn under the point.
        """
        py, px = self.to_px(y, x, units=units)
        half = self.cell_px / 2
        i = math.floor((py - half) / self.stride_px + 0.5)
        j = math.floor((px - half) / self.stride_px + 0.5)
        gh, gw = self.shape
        if 0 <= i < gh and 0 <= j < gw:
            return (i, j)
        return None

    # ----------------------------------------------------------------- units
    @property
    def layer_scale(self) -> float:
        """Size of one level-0 pixel in the slide layer's units (mpp, or 1 when unknown)."""
        return self.mpp if self.mpp is not None else 1.0

    def to_px(self, y: float, x: float, *, units: Units = "px") -> tuple[float, float]:
        """Convert a point to continuous level-0 pixels.

        Parameters
        ----------
        y, x
            The point.
        units
            ``"px"``: continuous level-0 pixels (returned unchanged); ``"um"``: micrometres
            (level-0 px × mpp, the model's scale when mpp is unknown); ``"layer"``: napari world
            coordinates of the slide layer (scale = mpp or 1, pixel centres on integers).
        """
        if units == "px":
            return (float(y), float(x))
        if units == "um":
            return (y / self.effective_mpp, x / self.effective_mpp)
        if units == "layer":
            s = self.layer_scale
            return (y / s + 0.5, x / s + 0.5)
        raise StPredictError(f"units={units!r}: expected 'px', 'um' or 'layer'")

    def heatmap_transform(
        self,
        slide_scale: float | tuple[float, float] | None = None,
        slide_translate: tuple[float, float] = (0.0, 0.0),
    ) -> tuple[tuple[float, float], tuple[float, float]]:
        """``(scale, translate)`` of a heatmap Image layer registered to the slide layer.

        Same as :func:`layer_placement` (``layer_placement(self, ...)``).
        """
        return layer_placement(self, slide_scale=slide_scale, slide_translate=slide_translate)

    # ----------------------------------------------------------------- selections
    def cells_in_view(
        self,
        y0: float,
        x0: float,
        y1: float,
        x1: float,
        *,
        units: Units = "px",
        margin: int = 1,
    ) -> np.ndarray:
        """Cells whose heatmap pixels intersect a view rectangle, plus a margin.

        Parameters
        ----------
        y0, x0, y1, x1
            The view rectangle (corners in any order).
        units
            Units of the rectangle, see :meth:`to_px`.
        margin
            Extra cells on every side (prefetch around the view).

        Returns
        -------
        numpy.ndarray
            ``(n, 2)`` int64 ``(i, j)`` in row-major order, clipped to the grid (may be empty).
        """
        if margin < 0:
            raise StPredictError(f"margin={margin!r}: must be ≥ 0")
        ay, ax = self.to_px(y0, x0, units=units)
        by, bx = self.to_px(y1, x1, units=units)
        ry0, ry1 = sorted((ay, by))
        rx0, rx1 = sorted((ax, bx))
        i0, i1 = self._index_range(ry0, ry1, self.shape[0], margin)
        j0, j1 = self._index_range(rx0, rx1, self.shape[1], margin)
        if i1 <= i0 or j1 <= j0:
            return np.empty((0, 2), np.int64)
        ii, jj = np.meshgrid(np.arange(i0, i1), np.arange(j0, j1), indexing="ij")
        return np.stack([ii.ravel(), jj.ravel()], axis=1).astype(np.int64)

    def _index_range(self, a: float, b: float, n: int, margin: int) -> tuple[int, int]:
        # heatmap pixel k spans [c_k - stride/2, c_k + stride/2), c_k = k*stride + cell/2
        half, s = self.cell_px / 2, self.stride_px
        lo = math.floor((a - half) / s + 0.5) - margin
        hi = math.ceil((b - half) / s + 0.5) + margin  # exclusive
        if b == a:
            hi = max(hi, lo + 1 + 2 * margin)
        return max(lo, 0), min(hi, n)

    def tissue_fraction(self, mask: _MaskLike) -> np.ndarray:
        """Tissue fraction of every cell footprint, ``(gh, gw)`` float32 in ``[0, 1]``.

        Uses the mask's ``mask``/``downsample`` with a summed-area table (exact area-weighted
        coverage, vectorised); area outside the slide counts as background. Masks that expose
        only ``fraction(y0, x0, y1, x1)`` are queried cell by cell.
        """
        gh, gw = self.shape
        arr = getattr(mask, "mask", None)
        ds = getattr(mask, "downsample", None)
        if arr is None or ds is None:
            out = np.empty((gh, gw), np.float32)
            for i in range(gh):
                for j in range(gw):
                    out[i, j] = mask.fraction(*self.cell_rect_px(i, j))
            return out
        arr = np.asarray(arr, dtype=bool)
        ds = float(ds)
        mh, mw = arr.shape
        sat = np.zeros((mh + 1, mw + 1), np.float64)
        sat[1:, 1:] = arr.cumsum(0, dtype=np.float64).cumsum(1)
        # the integral of a piecewise-constant mask is bilinear inside each mask pixel, so a
        # bilinear lookup in the table is the exact area-weighted sum
        ys = (np.arange(gh) * self.stride_px) / ds
        xs = (np.arange(gw) * self.stride_px) / ds
        size = self.cell_px / ds
        y_lo, y_hi = np.clip(ys, 0, mh), np.clip(ys + size, 0, mh)
        x_lo, x_hi = np.clip(xs, 0, mw), np.clip(xs + size, 0, mw)

        def lookup(yv: np.ndarray, xv: np.ndarray) -> np.ndarray:
            y0 = np.minimum(np.floor(yv).astype(np.int64), mh - 1)
            x0 = np.minimum(np.floor(xv).astype(np.int64), mw - 1)
            fy = (yv - y0)[:, None]
            fx = (xv - x0)[None, :]
            a = sat[y0][:, x0]
            b = sat[y0][:, x0 + 1]
            c = sat[y0 + 1][:, x0]
            d = sat[y0 + 1][:, x0 + 1]
            return a * (1 - fy) * (1 - fx) + b * (1 - fy) * fx + c * fy * (1 - fx) + d * fy * fx

        total = lookup(y_hi, x_hi) - lookup(y_lo, x_hi) - lookup(y_hi, x_lo) + lookup(y_lo, x_lo)
        frac = total / (size * size)
        frac[frac < 1e-9] = 0.0  # summed-area round-off on empty cells
        return np.clip(frac, 0.0, 1.0).astype(np.float32)

    def tissue_cells(self, mask: _MaskLike, min_fraction: float = 0.2) -> np.ndarray:
        """Cells with at least ``min_fraction`` tissue: bool ``(gh, gw)``.

        Parameters
        ----------
        mask
            A :class:`~napari_stpredict.slide.TissueMask` (or anything with ``mask`` +
            ``downsample``, or with ``fraction(y0, x0, y1, x1)``).
        min_fraction
            Minimum tissue fraction of the patch footprint, in ``[0, 1]``.
        """
        if not 0.0 <= float(min_fraction) <= 1.0:
            raise StPredictError(f"min_fraction={min_fraction!r}: must be within [0, 1]")
        frac = self.tissue_fraction(mask)
        # > 0 always: a cell with no tissue at all is never predicted, even with min 0
        return (frac >= min_fraction) & (frac > 0)

    def __repr__(self) -> str:
        mpp = f"{self.mpp:.4g} µm/px" if self.mpp is not None else "mpp assumed"
        return (
            f"TileGrid(shape={self.shape}, cell={self.cell_px:.4g} px, "
            f"stride={self.stride_px:.4g} px, {self.patch_um:g} µm → {self.patch_px} px, {mpp})"
        )


def _positive(value: float, name: str) -> float:
    """``value`` as a float, or a one-line error naming ``name`` if not finite and > 0."""
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise StPredictError(f"{name}={value!r}: must be a positive number")
    return value


def layer_placement(
    grid: TileGrid,
    *,
    slide_scale: float | tuple[float, float] | np.ndarray | None = None,
    slide_translate: tuple[float, float] | np.ndarray = (0.0, 0.0),
) -> tuple[tuple[float, float], tuple[float, float]]:
    """``(scale, translate)`` that register a grid-shaped layer on a slide layer.

    The one placement function for everything drawn on the grid: heatmaps, the uncertainty
    layer, tumour labels and exported rasters. The slide layer draws level-0 pixel ``k``
    centred on ``slide_translate + slide_scale * k``; layer pixel ``(i, j)`` is grid cell
    ``(i, j)`` and is drawn centred on its patch centre, spanning one stride.

    Parameters
    ----------
    grid
        The tile grid.
    slide_scale
        The slide layer's level-0 ``scale`` (one number or ``(sy, sx)``); ``None`` = the
        grid's own :attr:`TileGrid.layer_scale` (mpp, or 1 when unknown).
    slide_translate
        The slide layer's ``translate`` (``(0, 0)`` for layers made by our reader).

    Returns
    -------
    tuple
        ``((sy, sx), (ty, tx))`` in the slide layer's world units.
    """
    s = np.broadcast_to(
        np.asarray(grid.layer_scale if slide_scale is None else slide_scale, dtype=float), (2,)
    )
    t0 = np.broadcast_to(np.asarray(slide_translate, dtype=float), (2,))
    step = s * grid.stride_px
    t = t0 + s * (grid.cell_px / 2 - 0.5)
    return (float(step[0]), float(step[1])), (float(t[0]), float(t[1]))
