"""Pseudo-spots: bins, cells or transcripts summed into spot-sized discs on a square grid.

Visium HD bins and Xenium cells (``st/spatialdata_platforms.py``) become Visium-like spots —
discs of ``spot_um`` (default 55 µm) every ``pitch_um`` (default 100 µm) — so the model trains
on the same kind of target whatever the platform. Plain numpy/scipy: no optional extra needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from napari_stpredict.errors import DatasetError

#: pseudo-spot defaults (Visium: 55 µm spots, 100 µm centre to centre)
PSEUDO_SPOT_UM = 55.0
PSEUDO_PITCH_UM = 100.0


@dataclass
class PseudoSpots:
    """Observations (bins, cells, transcripts) summed into spots on a square grid.

    Attributes
    ----------
    X
        (n_spots, genes) CSR float32, the summed counts.
    centers
        (n_spots, 2) spot centres ``(x, y)`` in the input's units (µm).
    rows, cols
        Grid row/column of each spot.
    n_members
        Observations summed into each spot.
    ids
        ``"r{row}_c{col}"`` per spot.
    """

    X: sp.csr_matrix
    centers: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    n_members: np.ndarray
    ids: list[str]


def aggregate_pseudo_spots(
    xy_um: np.ndarray,
    X: Any,
    *,
    spot_um: float = PSEUDO_SPOT_UM,
    pitch_um: float = PSEUDO_PITCH_UM,
    origin: tuple[float, float] | None = None,
    min_members: int = 1,
) -> PseudoSpots:
    """Sum observations into discs of ``spot_um`` centred every ``pitch_um`` on a square grid.

    An observation (bin, cell or transcript at ``xy_um``) belongs to every disc whose centre is
    within ``spot_um / 2`` of it (discs overlap when ``spot_um > pitch_um``); observations
    between discs are left out, as on a Visium array. Grid centres are
    ``origin + (col, row) × pitch_um``; ``origin`` defaults to the lower-left corner of the
    data plus half a spot.

    Parameters
    ----------
    xy_um
        (n, 2) positions ``(x, y)`` in µm.
    X
        (n, genes) counts (dense or sparse); transcripts: one-hot rows.
    min_members
        Spots with fewer observations are dropped.

    Raises
    ------
    DatasetError
        Bad sizes, shapes that do not match, or no spot with ``min_members`` observations.
    """
    xy, Xs = _checked_inputs(xy_um, X, spot_um, pitch_um)
    ok = np.isfinite(xy).all(axis=1)
    r = spot_um / 2.0
    if origin is None:
        lo = xy[ok].min(axis=0) if ok.any() else np.zeros(2)
        origin = (float(lo[0] + r), float(lo[1] + r))
    ox, oy = origin
    obs, rows, cols = _disc_members(xy, ok, origin, spot_um, pitch_um)
    keys = np.stack([rows, cols], axis=1)
    uniq, spot_of = np.unique(keys, axis=0, return_inverse=True)
    spot_of = spot_of.ravel()
    # membership matrix: spots × observations
    A = sp.csr_matrix(
        (np.ones(len(obs), dtype=np.float32), (spot_of, obs)), shape=(len(uniq), len(xy))
    )
    n_members = np.asarray(A.sum(axis=1)).ravel().astype(np.int64)
    keep = n_members >= int(min_members)
    if not keep.any():
        raise DatasetError(f"pseudo-spots: no spot has {min_members} or more observations")
    A = A[keep]
    uniq = uniq[keep]
    Y = sp.csr_matrix(A @ Xs, dtype=np.float32)
    centers = np.stack([ox + uniq[:, 1] * pitch_um, oy + uniq[:, 0] * pitch_um], axis=1)
    ids = [f"r{a}_c{b}" for a, b in uniq]
    return PseudoSpots(Y, centers, uniq[:, 0], uniq[:, 1], n_members[keep], ids)


def _checked_inputs(
    xy_um: np.ndarray, X: Any, spot_um: float, pitch_um: float
) -> tuple[np.ndarray, sp.csr_matrix]:
    """Positions as float64 ``(n, 2)`` and counts as CSR float32, sizes and shapes checked."""
    xy = np.asarray(xy_um, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise DatasetError(f"pseudo-spots: positions must be (n, 2), got {xy.shape}")
    if not (spot_um > 0 and pitch_um > 0 and math.isfinite(spot_um) and math.isfinite(pitch_um)):
        raise DatasetError(
            f"pseudo-spots: size {spot_um!r} and pitch {pitch_um!r} must be positive µm"
        )
    Xs = sp.csr_matrix(X, dtype=np.float32)
    if Xs.shape[0] != len(xy):
        raise DatasetError(f"pseudo-spots: {len(xy)} positions but {Xs.shape[0]} rows of counts")
    return xy, Xs


def _disc_members(
    xy: np.ndarray,
    ok: np.ndarray,
    origin: tuple[float, float],
    spot_um: float,
    pitch_um: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(observation, grid row, grid column)`` of every observation–disc pair.

    Each observation is tested against the grid centres around it, ``reach`` pitches either
    way (discs larger than the pitch overlap, so one observation can be in several).
    """
    ox, oy = origin
    r = spot_um / 2.0
    gx = np.where(ok, (xy[:, 0] - ox) / pitch_um, np.nan)
    gy = np.where(ok, (xy[:, 1] - oy) / pitch_um, np.nan)
    reach = math.ceil(r / pitch_um)
    obs_l, row_l, col_l = [], [], []
    for dr in range(-reach, reach + 1):
        for dc in range(-reach, reach + 1):
            with np.errstate(invalid="ignore"):
                c = np.floor(gx + 0.5) + dc
                rr = np.floor(gy + 0.5) + dr
                d2 = ((gx - c) ** 2 + (gy - rr) ** 2) * pitch_um**2
                hit = ok & (d2 <= r * r + 1e-9)
            idx = np.nonzero(hit)[0]
            obs_l.append(idx)
            row_l.append(rr[idx].astype(np.int64))
            col_l.append(c[idx].astype(np.int64))
    obs = np.concatenate(obs_l)
    if not len(obs):
        raise DatasetError(
            f"pseudo-spots: no observation lies within {spot_um:g} µm spots every {pitch_um:g} µm"
        )
    return obs, np.concatenate(row_l), np.concatenate(col_l)
