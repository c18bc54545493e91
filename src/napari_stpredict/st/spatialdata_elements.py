"""Finding and placing the elements of a SpatialData object (helpers of ``st/spatialdata*.py``).

Element choice (the named one, else the only one), coordinate systems and their affine maps,
shape centroids, a table's counts, and reading a store or platform folder with its warnings
silenced and its failure turned into one line. Functions that touch ``spatialdata`` import it
when called (optional extra).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import scipy.sparse as sp

from napari_stpredict.errors import DatasetError, first_line

T = TypeVar("T")


def read_quietly(read: Callable[[], T], failure: str) -> T:
    """``read()`` with warnings silenced; any error becomes ``DatasetError(f"{failure} ({reason})")``.

    A foreign or corrupt store (or platform folder) raises many kinds of errors; the message
    names the place and keeps the first line of the reason.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return read()
    except Exception as e:
        raise DatasetError(f"{failure} ({first_line(e)})") from None


def element_names(container: Any) -> list[str]:
    """The names in an element container (``sdata.tables``, ``sdata.shapes``, …)."""
    return [str(k) for k in container]


def pick_element(
    kind: str, names: list[str], wanted: str | None, where: str, source: Path
) -> str | None:
    """The element called ``wanted``, else the only one; ``None`` when there is none."""
    if wanted is not None:
        if wanted not in names:
            raise DatasetError(
                f"{where}: field 'elements.{kind}': {source} has no {kind} {wanted!r} "
                f"({kind}s: {', '.join(names) or 'none'})"
            )
        return wanted
    if not names:
        return None
    if len(names) > 1:
        raise DatasetError(
            f"{where}: {source} has several {kind}s ({', '.join(names)}); "
            f"name one with elements: {{{kind}: NAME}}"
        )
    return names[0]


def affine_to(element: Any, cs: str) -> np.ndarray:
    """3 × 3 affine ``(x, y, 1)`` of an element into coordinate system ``cs``."""
    from spatialdata.transformations import get_transformation

    t = get_transformation(element, to_coordinate_system=cs)
    return np.asarray(
        t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=np.float64
    )


def coordinate_systems(element: Any) -> list[str]:
    """The coordinate systems an element has a transformation to."""
    from spatialdata.transformations import get_transformation

    return list(get_transformation(element, get_all=True))


def apply_affine(m: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """``(n, 2)`` points ``(x, y)`` mapped through the 3 × 3 affine ``m``."""
    return xy @ m[:2, :2].T + m[:2, 2]


def shape_centres(shapes: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """Centres ``(n, 2)`` (x, y) of a shapes element and circle diameters (else None)."""
    geom = shapes.geometry
    if "radius" in shapes.columns and (geom.geom_type == "Point").all():
        return np.stack([geom.x.to_numpy(), geom.y.to_numpy()], axis=1), 2.0 * shapes[
            "radius"
        ].to_numpy(dtype=np.float64)
    c = geom.centroid
    return np.stack([c.x.to_numpy(), c.y.to_numpy()], axis=1), None


def table_counts(table: Any, spec: Any, source: Path) -> tuple[sp.csr_matrix, list[str]]:
    """Counts (CSR) and gene symbols of a SpatialData table, read like an ``.h5ad`` section."""
    from napari_stpredict.st.h5ad import counts_and_genes

    return counts_and_genes(table, spec, f"the table in {source}")
