"""Pillow's bilinear resize, bit for bit, in torch: patches resized on the model's device.

:meth:`Slide.read_resampled <napari_stpredict.slide.Slide.read_resampled>` cuts a window of
stored pixels around each patch and resizes it with Pillow (``Image.resize(size, BILINEAR,
box=...)``); on a CPU that resize is most of the engine's per-patch cost. Here the same
arithmetic runs batched in torch, so that on a GPU the reader threads only cut windows and the
device resizes them:

- :func:`plan_windows` — the window and box of every patch, exactly as ``read_resampled``
  computes them (vectorised);
- :func:`read_windows` — the windows' stored pixels through the engine's tile cache;
- :func:`bilinear_coefficients` — Pillow's ``precompute_coeffs`` + ``normalize_coeffs_8bpc``
  (``libImaging/Resample.c``): per output pixel, double-precision triangle weights normalised
  to sum 1, then fixed point with ``PRECISION_BITS = 32 - 8 - 2`` bits (box coordinates pass
  through ``float`` as in Pillow's C signature);
- :func:`resize_windows` — the two passes, each ``clip8((1 << 21) + Σ weight · pixel)`` with a
  uint8 clip between passes, in Pillow's order: horizontal first, except where Pillow 13 goes
  vertically first (:func:`vertical_first` asks the installed Pillow once per shape).
  Products and sums are integers below 2**33, so float64 matrix products are exact on any
  device and in any summation order.

The result equals ``read_resampled`` to the bit (tests/test_inference_patches.py checks random
boxes, up and down, against Pillow on the CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "PRECISION_BITS",
    "WindowPlan",
    "bilinear_coefficients",
    "plan_windows",
    "read_windows",
    "resize_windows",
    "vertical_first",
]

#: Fixed-point fraction bits of Pillow's 8-bit resampling (``Resample.c``).
PRECISION_BITS = 32 - 8 - 2
#: ``read_resampled`` cuts windows up to 64 MiB in one band; larger ones go another way.
_MAX_WINDOW_SIDE = 2048


@dataclass(frozen=True)
class WindowPlan:
    """Where each patch's pixels come from: one stored window and a box inside it.

    Attributes
    ----------
    levels
        ``(n,)`` pyramid level of each window.
    windows
        ``(n, 4)`` int64 ``(y0, x0, h, w)`` in that level's pixels (may extend past the level:
        outside = 255, as :meth:`Slide.read_region`).
    boxes
        ``(n, 4)`` float64 Pillow boxes ``(left, upper, right, lower)`` inside the window.
    out_px
        Side of each resized patch.
    """

    levels: np.ndarray
    windows: np.ndarray
    boxes: np.ndarray
    out_px: int

    @property
    def max_window(self) -> tuple[int, int]:
        """``(H, W)``: the largest window height and width (the batch buffer's)."""
        return int(self.windows[:, 2].max()), int(self.windows[:, 3].max())


def plan_windows(slide: Any, rects: np.ndarray, out_px: int) -> WindowPlan | None:
    """The windows ``read_resampled`` would cut for level-0 rectangles ``(y0, x0, h, w)``.

    Mirrors :meth:`Slide.read_resampled` (level choice, margins, box) with the same float
    operations, vectorised. ``None`` when a window would be cut in several bands there (sides
    over 2,048 px) or the slide does not expose its per-axis downsamples: read those on the
    CPU instead.
    """
    r = np.asarray(rects, dtype=np.float64).reshape(-1, 4)
    axis_ds = getattr(slide, "_axis_ds", None)  # per-axis downsample of each level
    if axis_ds is None or not len(r):
        return None
    o = float(out_px)
    y0, x0, h, w = r.T
    levels = np.array([slide.best_level(min(hh / o, ww / o)) for hh, ww in zip(h, w, strict=True)])
    dy = np.array([axis_ds[k][0] for k in levels], dtype=np.float64)
    dx = np.array([axis_ds[k][1] for k in levels], dtype=np.float64)
    ly0, lx0, lh, lw = y0 / dy, x0 / dx, h / dy, w / dx
    sy, sx = lh / o, lw / o
    my = np.ceil(np.maximum(sy, 1.0)) + 2
    mx = np.ceil(np.maximum(sx, 1.0)) + 2
    wx0 = np.floor(lx0) - mx
    wx1 = np.ceil(lx0 + lw) + mx
    by1 = ly0 + o * sy
    wy0 = np.floor(ly0) - my
    wy1 = np.ceil(by1) + my
    windows = np.stack([wy0, wx0, wy1 - wy0, wx1 - wx0], axis=1).astype(np.int64)
    if windows[:, 2:].max() > _MAX_WINDOW_SIDE:
        return None
    boxes = np.stack([lx0 - wx0, ly0 - wy0, lx0 + lw - wx0, by1 - wy0], axis=1)
    return WindowPlan(levels=levels, windows=windows, boxes=boxes, out_px=int(out_px))


def read_windows(plan: WindowPlan, region_reader: Any, out: np.ndarray) -> None:
    """Fill ``out[k, :h, :w]`` with window ``k`` (``region_reader`` = ``read_region``-like)."""
    for k, (level, (y, x, h, w)) in enumerate(zip(plan.levels, plan.windows, strict=True)):
        out[k, :h, :w] = region_reader(int(level), int(y), int(x), int(h), int(w))


def _taps(
    in_size: np.ndarray, in0: np.ndarray, in1: np.ndarray, out_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pillow's ``precompute_coeffs`` + ``normalize_coeffs_8bpc``, vectorised over images.

    Returns ``(xmin, count, fixed)``: ``(n, out)`` first input pixel and number of taps of
    each output pixel, and ``(n, out, ksize)`` the fixed-point weights (float64 integers).
    """
    in_size = np.asarray(in_size, dtype=np.int64)
    in0f = np.asarray(in0, dtype=np.float32)
    in1f = np.asarray(in1, dtype=np.float32)
    scale = (in1f - in0f).astype(np.float64) / out_size  # float subtraction, double division
    support = np.maximum(scale, 1.0)  # filterscale × the triangle's support of 1
    ss = 1.0 / support
    ksize = int(np.ceil(support.max())) * 2 + 1
    center = (
        in0f.astype(np.float64)[:, None] + (np.arange(out_size) + 0.5)[None, :] * scale[:, None]
    )
    xmin = np.maximum(np.trunc(center - support[:, None] + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(center + support[:, None] + 0.5), in_size[:, None]).astype(np.int64)
    count = xmax - xmin
    taps = np.zeros((*center.shape, ksize))
    total = np.zeros(center.shape)
    for x in range(ksize):
        arg = np.abs(((x + xmin) - center + 0.5) * ss[:, None])
        wx = np.where((x < count) & (arg < 1.0), 1.0 - arg, 0.0)
        taps[..., x] = wx
        total = total + wx  # in Pillow's order: the sum of the taps so far
    taps = np.divide(taps, total[..., None], out=taps, where=total[..., None] != 0)
    return xmin, count, np.trunc(0.5 + taps * (1 << PRECISION_BITS))


def bilinear_coefficients(
    in_size: np.ndarray, in0: np.ndarray, in1: np.ndarray, out_size: int, width: int
) -> np.ndarray:
    """Pillow's fixed-point bilinear weights as dense ``(n, out_size, width)`` float64 matrices.

    Parameters
    ----------
    in_size
        ``(n,)`` input length of each image along the axis (weights stop there).
    in0, in1
        ``(n,)`` box start and end along the axis (rounded to float32, as Pillow parses them).
    out_size
        Output length.
    width
        Columns of the matrices (≥ every ``in_size``; the batch's padded input length).

    Returns
    -------
    numpy.ndarray
        ``(n, out_size, width)``: integer weights (< 2**23), zero outside each pixel's support.
    """
    return _dense(*_taps(in_size, in0, in1, out_size), width)


def _dense(xmin: np.ndarray, count: np.ndarray, fixed: np.ndarray, width: int) -> np.ndarray:
    """Scatter taps ``(n, out, ksize)`` starting at ``xmin`` into ``(n, out, width)`` rows."""
    out_size = xmin.shape[1]
    ksize = fixed.shape[-1]
    dense = np.zeros((len(xmin), out_size, width + ksize))
    n_idx, o_idx = np.indices(xmin.shape)
    for x in range(ksize):
        dense[n_idx, o_idx, xmin + x] += np.where(x < count, fixed[..., x], 0.0)
    return dense[..., :width]


def _span(xmin: np.ndarray, count: np.ndarray) -> np.ndarray:
    """``(n,)`` input pixels a pass reads (Pillow's ``ybox_last - ybox_first``)."""
    return xmin[:, -1] + count[:, -1] - xmin[:, 0]


def _clip8(acc: Any) -> Any:
    """Pillow's ``clip8``: ``acc >> PRECISION_BITS`` clamped to 0..255 (as float64)."""
    import torch

    return torch.clamp(torch.floor(acc * (1.0 / (1 << PRECISION_BITS))), 0, 255)


def _two_passes(x: Any, kx: Any, ky: Any, vertical_first: bool) -> Any:
    """``(n, 3, H, W)`` float64 → ``(n, 3, oh, ow)``: both passes, a uint8 clip after each."""
    import torch

    half = float(1 << (PRECISION_BITS - 1))
    kx_t = kx[:, None].transpose(-1, -2)  # (n, 1, W, ow)
    ky_t = ky[:, None]  # (n, 1, oh, H)
    if vertical_first:
        cols = _clip8(torch.matmul(ky_t, x) + half)  # (n, 3, oh, W)
        return _clip8(torch.matmul(cols, kx_t) + half)
    rows = _clip8(torch.matmul(x, kx_t) + half)  # (n, 3, H, ow)
    return _clip8(torch.matmul(ky_t, rows) + half)


_ORDER: dict[tuple[Any, ...], bool] = {}


def _order_keys(
    sizes: np.ndarray,
    boxes: np.ndarray,
    out_shape: tuple[int, int],
    taps: tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]] | None = None,
) -> list[tuple]:
    """What Pillow's pass order may depend on, per window: sizes, box extent, pixels read.

    ``taps``: the ``(vertical, horizontal)`` :func:`_taps` when already computed.
    """
    oh, ow = out_shape
    if taps is None:
        taps = (
            _taps(sizes[:, 0], boxes[:, 1], boxes[:, 3], oh),
            _taps(sizes[:, 1], boxes[:, 0], boxes[:, 2], ow),
        )
    bf = boxes.astype(np.float32)
    cols = zip(
        sizes[:, 0].tolist(),
        sizes[:, 1].tolist(),
        (bf[:, 2] - bf[:, 0]).tolist(),
        (bf[:, 3] - bf[:, 1]).tolist(),
        _span(*taps[0][:2]).tolist(),
        _span(*taps[1][:2]).tolist(),
        strict=True,
    )
    return [(h, w, oh, ow, ex, ey, sy, sx) for h, w, ex, ey, sy, sx in cols]


def _dense_on(taps: tuple[np.ndarray, ...], width: int, device: Any) -> Any:
    """:func:`_dense` built on ``device`` from the small tap arrays (no large host copies)."""
    import torch

    xmin, count, fixed = (torch.from_numpy(a).to(device) for a in taps)
    ksize = fixed.shape[-1]
    k = torch.arange(ksize, device=device)
    values = torch.where(
        k < count[..., None], fixed, torch.zeros((), dtype=fixed.dtype, device=device)
    )
    dense = torch.zeros((*xmin.shape, width + ksize), dtype=torch.float64, device=device)
    dense.scatter_(2, xmin[..., None] + k, values)
    return dense[..., :width]


def vertical_first(shape: tuple[int, int], out_shape: tuple[int, int], box: np.ndarray) -> bool:
    """Whether the installed Pillow runs the vertical pass first for this resize.

    Pillow ≤ 12 always resamples horizontally first; Pillow 13 goes vertically first when the
    height shrinks much more than the width (python-pillow/Pillow#9549), judged from the rows
    and columns each pass reads. Rather than copy that rule, ask Pillow: resize a random window
    with Pillow and with both orders here, keep the order that matches, and reuse the answer
    for every resize with the same window, output, box extent and rows/columns read.

    Raises
    ------
    RuntimeError
        Neither order reproduces Pillow (a Pillow whose arithmetic differs from this port).
    """
    import torch
    from PIL import Image

    h, w = shape
    oh, ow = out_shape
    b = np.asarray(box, dtype=np.float64).reshape(1, 4)
    key = _order_keys(np.array([[h, w]]), b, (oh, ow))[0]
    if key in _ORDER:
        return _ORDER[key]
    kx = torch.from_numpy(bilinear_coefficients(np.array([w]), b[:, 0], b[:, 2], ow, w))
    ky = torch.from_numpy(bilinear_coefficients(np.array([h]), b[:, 1], b[:, 3], oh, h))
    matches = [True, True]
    for seed in range(4):
        img = np.random.default_rng(seed).integers(0, 256, (1, h, w, 3), dtype=np.uint8)
        pil = Image.fromarray(img[0]).resize((ow, oh), Image.Resampling.BILINEAR, box=tuple(b[0]))
        x = torch.from_numpy(img).permute(0, 3, 1, 2).to(torch.float64)
        for k, v in enumerate((False, True)):
            got = _two_passes(x, kx, ky, v)[0].permute(1, 2, 0).numpy()
            matches[k] = matches[k] and np.array_equal(got, np.asarray(pil))
        if matches[0] != matches[1] or not any(matches):
            break
    if not any(matches):
        raise RuntimeError(f"Pillow {Image.__version__}: bilinear resize not reproduced")
    _ORDER[key] = not matches[0]  # both match on every probe: either order will do
    return _ORDER[key]


def resize_windows(
    windows: Any, sizes: np.ndarray, boxes: np.ndarray, out_shape: tuple[int, int]
) -> Any:
    """Resize each window's box to ``out_shape`` exactly as Pillow's BILINEAR ``resize``.

    Parameters
    ----------
    windows
        ``(n, H, W, 3)`` uint8 torch tensor (any device): window ``k`` in ``[:h_k, :w_k]``.
    sizes
        ``(n, 2)`` ``(h_k, w_k)`` of each window.
    boxes
        ``(n, 4)`` Pillow boxes ``(left, upper, right, lower)`` in window pixels.
    out_shape
        ``(oh, ow)``.

    Returns
    -------
    torch.Tensor
        ``(n, oh, ow, 3)`` uint8 on the windows' device.
    """
    import torch

    n, hmax, wmax = (int(v) for v in windows.shape[:3])
    oh, ow = (int(v) for v in out_shape)
    sizes = np.asarray(sizes, dtype=np.int64).reshape(n, 2)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(n, 4)
    dev = windows.device
    taps_y = _taps(sizes[:, 0], boxes[:, 1], boxes[:, 3], oh)
    taps_x = _taps(sizes[:, 1], boxes[:, 0], boxes[:, 2], ow)
    kx, ky = _dense_on(taps_x, wmax, dev), _dense_on(taps_y, hmax, dev)
    keys = _order_keys(sizes, boxes, (oh, ow), (taps_y, taps_x))
    first = {key: k for k, key in reversed(list(enumerate(keys)))}  # one probe per key
    known = {key: vertical_first(tuple(sizes[k]), (oh, ow), boxes[k]) for key, k in first.items()}
    order = np.array([known[key] for key in keys])
    x = windows.permute(0, 3, 1, 2).to(torch.float64)  # (n, 3, H, W)
    out = torch.empty((n, 3, oh, ow), dtype=torch.float64, device=dev)
    for v in (False, True):
        idx = np.flatnonzero(order == v)
        if len(idx):
            sel = torch.from_numpy(idx).to(dev)
            out[sel] = _two_passes(x[sel], kx[sel], ky[sel], v)
    return out.to(torch.uint8).permute(0, 2, 3, 1).contiguous()
