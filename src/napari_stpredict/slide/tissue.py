"""Tissue mask: stained, textured, in-focus matter on a low-resolution view of the slide.

Glass is not always white: legacy ST slides are tinted pink, stain smears (pale eosin) lie
beside the section, scanners blur dust and fiducial frames, and pathologists draw pen marks.
So "coloured" is not enough. A pixel is tissue when

1. it absorbs light: optical density (OD) relative to the slide's own glass colour (a high
   percentile of the bright pixels, so a tinted glass has OD 0) above a floor;
2. it has **texture**: the local mean of the OD gradient magnitude over ≈ 50 µm (cells,
   nuclei, fibres) above the glass's own texture noise (its 99th percentile, kept within fixed
   bounds). Smears, blurred regions and out-of-focus dust are smooth and fail this test;
3. it is not ink: green/blue-green pen (OD of green below red and blue, unlike haematoxylin and
   eosin) and black marker (dark over 20 µm) are excluded, as are black masked backgrounds and
   scanner borders.

The raw mask is cleaned in physical units: closing (≈ 30 µm) to join a section's texture,
trimmed back to absorbing pixels, holes up to 0.25 mm² filled (lumens, fat inside the
section), objects under 0.02 mm² removed (dust, specks), and thin bands along the image border
(scanner and cover-slip edges) dropped. The view is ≈ 4 µm/px (coarser when the longest side
would exceed ``max_size``); the mask answers "what fraction of this level-0 rectangle is tissue"
exactly through an integral image.

Validated against the spatial arrays' "under tissue" spot flags (HER2ST B4, C2–C4, MOB1–3):
``benchmarks/tissue_validation.py`` and the tissue section of docs/benchmarks.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from napari_stpredict.slide.base import Slide

#: Pixels darker than this (max channel) are background (black masks, scanner borders).
DARK = 25
#: Glass colour = this percentile (per channel) of the non-dark pixels ...
GLASS_PERCENTILE = 95
#: ... unless it is darker than this (no glass in view): then white.
MIN_GLASS = 150
#: Optical density floor (sum over R, G, B, relative to the glass) of tissue, raised to this
#: fraction of the median OD of the slide's textured pixels for strongly stained sections.
MIN_OD = 0.15
OD_FRACTION = 0.35
#: Texture: OD gradient magnitude averaged over a window of this side (µm) ...
TEXTURE_UM = 50.0
#: ... above the 99th percentile of the glass's texture, kept within these bounds (glass
#: noise p99 is 0.01–0.045 on the validation slides; the faintest 5 % of tissue is ≥ 0.053).
MIN_TEXTURE = 0.04
MAX_TEXTURE = 0.08
#: Green/teal ink: OD of green below this fraction of both red and blue OD ...
INK_RATIO = 0.8
#: ... with at least this total OD; black marker: max channel below BLACK_INK over 20 µm.
INK_MIN_OD = 0.3
BLACK_INK = 40
#: Clean-up, in physical units: closing radius (µm), largest hole filled (µm²), smallest object (µm²).
CLOSE_UM = 30.0
HOLE_UM2 = 0.25e6
MIN_OBJECT_UM2 = 0.02e6
#: Objects touching the image border no thicker than this (µm) are scanner/cover-slip edges.
BORDER_BAND_UM = 100.0
#: µm per level-0 pixel assumed when a slide has none (a 20× scan).
DEFAULT_MPP = 0.5
#: Resolution of the view the mask is computed on (µm per pixel), unless max_size forces coarser.
WORK_UM = 4.0


@dataclass
class TissueMask:
    """A boolean tissue mask at low resolution.

    Attributes
    ----------
    mask : numpy.ndarray
        ``(mh, mw)`` bool, True = tissue.
    downsample : float
        Level-0 pixels per mask pixel (same on both axes).
    threshold : float
        The texture threshold used (OD gradient energy; see the module docstring).
    """

    mask: np.ndarray
    downsample: float
    threshold: float = 0.0
    _integral: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        m = np.asarray(self.mask, dtype=bool)
        self.mask = m
        integral = np.zeros((m.shape[0] + 1, m.shape[1] + 1), np.float64)
        integral[1:, 1:] = np.cumsum(np.cumsum(m, axis=0, dtype=np.float64), axis=1)
        self._integral = integral

    def _area(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        # tissue area in [0, y) × [0, x) (mask px): the integral image interpolated bilinearly,
        # which is exact for area-weighted partial pixels
        mh, mw = self.mask.shape
        y = np.clip(y, 0.0, mh)
        x = np.clip(x, 0.0, mw)
        iy = np.minimum(np.floor(y).astype(np.int64), mh - 1)
        ix = np.minimum(np.floor(x).astype(np.int64), mw - 1)
        fy, fx = y - iy, x - ix
        s = self._integral
        return (
            s[iy, ix] * (1 - fy) * (1 - fx)
            + s[iy + 1, ix] * fy * (1 - fx)
            + s[iy, ix + 1] * (1 - fy) * fx
            + s[iy + 1, ix + 1] * fy * fx
        )

    def fraction(self, y0, x0, y1, x1):
        """Tissue fraction of the level-0 rectangle ``[y0, y1) × [x0, x1)``.

        Accepts scalars or broadcastable arrays (many rectangles at once). Parts of the
        rectangle outside the slide count as background.

        Returns
        -------
        float or numpy.ndarray
            Values in ``[0, 1]``; 0 for empty rectangles.
        """
        d = self.downsample
        y0, x0, y1, x1 = (np.asarray(v, dtype=np.float64) / d for v in (y0, x0, y1, x1))
        area = np.clip(y1 - y0, 0, None) * np.clip(x1 - x0, 0, None)
        tissue = self._area(y1, x1) - self._area(y0, x1) - self._area(y1, x0) + self._area(y0, x0)
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(area > 0, tissue / np.where(area > 0, area, 1), 0.0)
        frac = np.clip(frac, 0.0, 1.0)
        return float(frac) if frac.ndim == 0 else frac

    def fraction_total(self) -> float:
        """Fraction of the whole slide covered by tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0


def _glass_colour(rgb: np.ndarray, usable: np.ndarray) -> np.ndarray:
    """Per-channel glass colour: a high percentile of the usable pixels (white if none bright)."""
    pix = rgb[usable]
    if pix.shape[0] < 16:
        return np.full(3, 255.0, np.float32)
    glass = np.percentile(pix, GLASS_PERCENTILE, axis=0).astype(np.float32)
    if float(glass.min()) < MIN_GLASS:  # no bright glass on view (a crop of solid tissue)
        return np.full(3, 255.0, np.float32)
    return glass


def _scores(rgb: np.ndarray, mpp_work: float) -> tuple[np.ndarray, ...]:
    """``(od, od_fine, texture, ink, dark)`` per pixel of a low-resolution RGB view."""
    from scipy import ndimage

    rgbf = rgb.astype(np.float32)
    mx = np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2]).astype(np.float32)
    dark = mx < DARK
    glass = _glass_colour(rgbf, ~dark)
    od_c = np.log(np.maximum(glass + 1.0, 1.0) / (rgbf + 1.0))
    od_c = np.clip(od_c, 0.0, None)
    od = od_c.sum(axis=2)
    grad = ndimage.gaussian_gradient_magnitude(od, sigma=1.0)
    size = max(3, round(TEXTURE_UM / mpp_work) | 1)
    texture = ndimage.uniform_filter(grad, size=size)
    od_s = ndimage.uniform_filter(od, size=size)
    od_fine = ndimage.uniform_filter(od, size=max(1, round(8 / mpp_work)))
    r, g, b = od_c[..., 0], od_c[..., 1], od_c[..., 2]
    green_ink = (g < INK_RATIO * r) & (g < INK_RATIO * b) & (od > INK_MIN_OD)
    # black marker: dark over ≈ 20 µm (clusters of dark nuclei are not that dark on average)
    black_ink = ndimage.uniform_filter(mx, size=max(1, round(20 / mpp_work))) < BLACK_INK
    # the texture and OD windows straddle an ink stroke's edge: exclude that margin too
    ink = ndimage.maximum_filter(green_ink | black_ink, size=size + 2)
    return od_s, od_fine, texture, ink, dark


def tissue_mask(slide: Slide, *, max_size: int = 2048) -> TissueMask:
    """Detect tissue on a low-resolution view of ``slide``.

    Parameters
    ----------
    slide
        The slide. Its ``mpp`` sets the physical sizes of the clean-up (0.5 µm/px assumed
        when unknown or a suspect screen default).
    max_size
        Longest side of the mask in pixels. The view is read with
        :meth:`Slide.read_resampled` from the coarsest adequate level, at about
        ``WORK_UM`` (4) µm per pixel, or coarser when ``max_size`` demands it.

    Returns
    -------
    TissueMask
    """
    from scipy import ndimage

    h, w = slide.shape
    meta = getattr(slide, "metadata", {}) or {}
    suspect = meta.get("mpp_suspect") and meta.get("mpp_source") != "user"
    mpp = slide.mpp if (slide.mpp and not suspect) else DEFAULT_MPP  # 72 dpi is not a scan
    # the view: about WORK_UM µm per pixel (texture is calibrated there), coarser if the
    # longest side would exceed max_size
    d = max(1.0, max(h, w) / max_size, WORK_UM / mpp)
    mh, mw = max(1, round(h / d)), max(1, round(w / d))
    d = max(h / mh, w / mw)
    rgb = slide.read_resampled(0, 0, mh * d, mw * d, out_shape=(mh, mw))
    mpp_work = mpp * d
    od, od_fine, texture, ink, dark = _scores(rgb, mpp_work)
    usable = ~dark & ~ink & (od > MIN_OD)
    # the texture threshold follows the glass's own noise (JPEG blocks, dust, the array's
    # printed spots): its 99th percentile, kept within [MIN_TEXTURE, MAX_TEXTURE]
    glass = ~dark & (od <= MIN_OD)
    noise = float(np.percentile(texture[glass], 99)) if glass.sum() >= 16 else 0.0
    thr = min(max(noise, MIN_TEXTURE), MAX_TEXTURE)
    mask = usable & (texture > thr)
    # faint residue (mountant, dust trails) is textured but barely absorbs: the OD floor rises
    # with the section's own staining (a fraction of the median OD of the textured pixels)
    if mask.any():
        od_thr = max(MIN_OD, OD_FRACTION * float(np.median(od[mask])))
        mask &= od > od_thr

    def px(um: float) -> float:
        return um / mpp_work

    st = ndimage.generate_binary_structure(2, 1)
    r_close = max(1, round(px(CLOSE_UM)))
    mask = ndimage.binary_closing(mask, structure=st, iterations=r_close, border_value=0)
    # the windows blur the border outwards: trim to pixels that absorb (≈ 8 µm scale) ...
    mask &= od_fine > MIN_OD
    # ... then fill holes up to HOLE_UM2 (lumens, fat), keep larger empty areas open
    holes = ndimage.binary_fill_holes(mask) & ~mask
    if holes.any():
        hl, _ = ndimage.label(holes)
        hs = np.bincount(hl.ravel())
        fill = hs <= max(1.0, HOLE_UM2 / mpp_work**2)
        fill[0] = False
        mask |= fill[hl]
    mask &= ~dark & ~ink
    labels, n = ndimage.label(mask)
    if n:
        sizes = np.bincount(labels.ravel())
        keep = sizes >= max(4.0, MIN_OBJECT_UM2 / mpp_work**2)
        keep[0] = False
        # scanner borders and cover-slip edges: thin objects lying along the image border
        thin = px(BORDER_BAND_UM)
        for k, sl in enumerate(ndimage.find_objects(labels), start=1):
            if sl is None or not keep[k]:
                continue
            ys, xs = sl
            along_y = (xs.start == 0 or xs.stop == mw) and (xs.stop - xs.start) <= thin
            along_x = (ys.start == 0 or ys.stop == mh) and (ys.stop - ys.start) <= thin
            if along_x or along_y:
                keep[k] = False
        mask = keep[labels]
    return TissueMask(mask=mask, downsample=float(d), threshold=thr)
