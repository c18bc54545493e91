"""Expression normalization: raw counts → the model's expression values.

Library-size normalization to ``target_sum`` followed by ``log1p`` by default; the method is a
small JSON-able dict (:class:`Normalization`) stored in the model file so prediction and
evaluation undo nothing by guesswork. Re-exported by :mod:`napari_stpredict.st.genes`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp

from napari_stpredict.errors import DatasetError

__all__ = ["Normalization", "NormalizationMethod", "library_size", "normalize"]
NormalizationMethod = Literal["log1p_cpm", "log1p", "cpm", "none"]
_METHODS = ("log1p_cpm", "log1p", "cpm", "none")


@dataclass(frozen=True)
class Normalization:
    """How raw counts become the model's expression values.

    ``log1p_cpm``: ``log1p(counts / library_size * target_sum)`` (library size over all genes
    of the spot, not just the panel); ``cpm``: the same without the log; ``log1p``: log of raw
    counts; ``none``: raw counts.

    Examples
    --------
    >>> Normalization().to_dict()
    {'method': 'log1p_cpm', 'target_sum': 10000.0}
    """

    method: NormalizationMethod = "log1p_cpm"
    target_sum: float = 1e4

    def __post_init__(self) -> None:
        if self.method not in _METHODS:
            raise DatasetError(
                f"normalization method {self.method!r}: expected one of {', '.join(_METHODS)}"
            )
        if not (isinstance(self.target_sum, int | float) and self.target_sum > 0):
            raise DatasetError(
                f"normalization target_sum {self.target_sum!r}: expected a positive number"
            )
        object.__setattr__(self, "target_sum", float(self.target_sum))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description (goes into the model file)."""
        return {"method": self.method, "target_sum": self.target_sum}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | Normalization | str | None) -> Normalization:
        """Build from :meth:`to_dict` output, a method name, an instance or ``None`` (default)."""
        if d is None:
            return cls()
        if isinstance(d, Normalization):
            return d
        if isinstance(d, str):
            return cls(method=d)  # type: ignore[arg-type]
        unknown = set(d) - {"method", "target_sum"}
        if unknown:
            raise DatasetError(f"normalization: unknown key {sorted(unknown)[0]!r}")
        return cls(method=d.get("method", "log1p_cpm"), target_sum=d.get("target_sum", 1e4))

    def __call__(self, X, *, library_size: np.ndarray | None = None) -> np.ndarray:
        return normalize(
            X, method=self.method, target_sum=self.target_sum, library_size=library_size
        )


def library_size(X) -> np.ndarray:
    """Total counts per spot (row sums) as float64."""
    return _row_sums(X)


def _row_sums(X) -> np.ndarray:
    return np.asarray(X.sum(axis=1), dtype=np.float64).ravel()


def normalize(
    X,
    *,
    method: NormalizationMethod = "log1p_cpm",
    target_sum: float = 1e4,
    library_size: np.ndarray | None = None,
) -> np.ndarray:
    """Normalize a spots × genes count matrix.

    Parameters
    ----------
    X
        Counts (dense or sparse), spots × genes.
    method
        ``log1p_cpm`` (default), ``cpm``, ``log1p`` or ``none``; see :class:`Normalization`.
    target_sum
        Counts per spot after library-size scaling.
    library_size
        Per-spot totals to scale by; defaults to the row sums of ``X``. Pass the totals over
        all genes when ``X`` holds only a gene panel. Spots with zero total stay zero.

    Returns
    -------
    numpy.ndarray
        Dense float32, same shape as ``X``.
    """
    Normalization(method=method, target_sum=target_sum)  # validates
    dense = np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float64)
    if method in ("log1p_cpm", "cpm"):
        lib = (
            dense.sum(axis=1)
            if library_size is None
            else np.asarray(library_size, dtype=np.float64).ravel()
        )
        if lib.shape[0] != dense.shape[0]:
            raise DatasetError(f"library_size has {lib.shape[0]} values for {dense.shape[0]} spots")
        factor = np.divide(target_sum, lib, out=np.zeros_like(lib), where=lib > 0)
        dense = dense * factor[:, None]
    if method in ("log1p_cpm", "log1p"):
        dense = np.log1p(dense)
    return dense.astype(np.float32)
