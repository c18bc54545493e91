"""Spot pitch (centre-to-centre distance) measured on a spot grid, for the pixel size.

Square grids (legacy ST: 200 µm on the 1k array) and hexagonal grids (Visium: 100 µm) both have
a first neighbour shell at the pitch (4 and 6 neighbours); the next shell is at √2 and √3 times
the pitch, far enough to separate. ``mpp = spot_pitch_um / pitch_px``.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree


def estimate_spot_pitch(xy: np.ndarray) -> float | None:
    """Centre-to-centre distance of neighbouring spots, in the units of ``xy``.

    The median distance over all pairs of the first neighbour shell (pairs closer than 1.25 ×
    the median nearest-neighbour distance). On a square grid (legacy ST) that shell is the 4
    row/column neighbours, on a hexagonal grid (Visium) the 6 neighbours: in both the pitch
    is the distance between adjacent spots. Taking all shell pairs rather than each spot's
    nearest one avoids the downward bias of a minimum over noisy detected positions (HER2ST:
    290 px, agreeing with a fit of pixels on array coordinates, where nearest neighbours alone
    give 273 px).

    Returns
    -------
    float or None
        ``None`` for fewer than 3 spots.
    """
    xy = np.asarray(xy, dtype=np.float64)
    if len(xy) < 3:
        return None
    tree = cKDTree(xy)
    d, _ = tree.query(xy, k=2)
    nn = d[:, 1]
    nn = nn[nn > 0]
    if len(nn) == 0:
        return None
    d1 = float(np.median(nn))
    pairs = tree.query_pairs(1.25 * d1, output_type="ndarray")
    if len(pairs) == 0:
        return d1
    dist = np.linalg.norm(xy[pairs[:, 0]] - xy[pairs[:, 1]], axis=1)
    dist = dist[dist > 0]
    return float(np.median(dist)) if len(dist) else d1
