"""What a reader hands to :func:`napari_stpredict.st.section.read_section`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp


@dataclass
class RawSection:
    """A section as read from its files, before checks, aliases, labels and pixel size.

    Attributes
    ----------
    X
        Counts, spots × genes, CSR float32.
    genes
        Gene names as found (symbols or ids), one per column.
    spot_ids
        One id per row (table key, barcode or obs name).
    xy
        Spot centres ``(n, 2)`` (x, y) in the pixels of the section's image (scale applied).
    obs
        Extra per-spot columns worth keeping (array coordinates), indexed like ``spot_ids``.
    spot_diameter_px
        From the data when it says (Space Ranger scale factors), else ``None``.
    labels
        Per-spot labels carried by the data itself (h5ad ``obs``), else ``None``.
    spot_pitch_px
        Spot pitch measured on the complete spot grid of the file (including spots off the
        tissue or not in the matrix), when the reader has it; more reliable than the kept spots.
    n_dropped
        Rows of the counts/matrix that had no position.
    image
        The image the positions refer to, when the reader finds it itself (a SpatialData
        image element); ``None`` = the manifest's ``image``.
    mpp
        µm per pixel of that image when the data says (Visium HD, Xenium), else ``None``.
    """

    X: sp.csr_matrix
    genes: list[str]
    spot_ids: pd.Index
    xy: np.ndarray
    obs: pd.DataFrame = field(default_factory=pd.DataFrame)
    spot_diameter_px: float | None = None
    labels: pd.Series | None = None
    spot_pitch_px: float | None = None
    n_dropped: int = 0
    image: Path | None = None
    mpp: float | None = None
