"""Tissue mask: Otsu threshold on a low-resolution view of the slide.

Stained tissue is coloured; glass is white or grey, and masked-out backgrounds or scanner
borders are black. So the score is the colour saturation ``max(rgb) − min(rgb)``, thresholded
with Otsu, and near-black pixels are never tissue. Small specks are removed and small holes
filled. The mask lives at a low resolution (longest side ≤ ``max_size``) and answers
"what fraction of this level-0 rectangle is tissue" in O(1) through an integral image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from napari_stpredict.slide.base import Slide

#: Pixels darker than this (max channel) are background (black masks, scanner borders).
DARK = 25
#: Saturation threshold floor: on slides that are mostly background Otsu can split noise.
MIN_THRESHOLD = 8


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
        The saturation threshold used (0–255).
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


def tissue_mask(slide: Slide, *, max_size: int = 2048) -> TissueMask:
    """Detect tissue on a low-resolution view of ``slide``.

    Parameters
    ----------
    slide
        The slide.
    max_size
        Longest side of the mask in pixels; the view is read with
        :meth:`Slide.read_resampled` from the coarsest adequate level.

    Returns
    -------
    TissueMask
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    h, w = slide.shape
    d = max(1.0, max(h, w) / max_size)
    mh, mw = max(1, round(h / d)), max(1, round(w / d))
    d = max(h / mh, w / mw)
    rgb = slide.read_resampled(0, 0, mh * d, mw * d, out_shape=(mh, mw))
    mx = rgb.max(axis=2).astype(np.float32)
    # light smoothing: Otsu should split tissue from background, not pale from dark tissue
    sat = ndimage.gaussian_filter(mx - rgb.min(axis=2), sigma=1.0)
    dark = mx < DARK
    # black backgrounds have no saturation either, so they stay in the histogram as background
    if sat.size == 0 or float(sat.min()) == float(sat.max()):
        thr = float(MIN_THRESHOLD)
    else:
        thr = max(float(threshold_otsu(sat)), float(MIN_THRESHOLD))
    mask = (sat > thr) & ~dark
    # clean-up scaled to the mask: remove specks, fill small holes (≈ 50 µm at 0.5 µm/px)
    r = max(1, round(min(mh, mw) / 512))
    st = ndimage.generate_binary_structure(2, 1)
    mask = ndimage.binary_opening(mask, structure=st, iterations=r)
    mask = ndimage.binary_closing(mask, structure=st, iterations=r, border_value=0)
    labels, n = ndimage.label(mask)
    if n:
        sizes = np.bincount(labels.ravel())
        keep = sizes >= max(4, int(1e-4 * mask.size))
        keep[0] = False
        mask = keep[labels]
    return TissueMask(mask=mask, downsample=float(d), threshold=thr)
