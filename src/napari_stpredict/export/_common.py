"""What every export shares: the error type, the result record, atomic writing, provenance."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_stpredict.errors import StPredictError
from napari_stpredict.io_utils import WriteError, atomic_path, check_target, describe_os_error


class ExportError(StPredictError):
    """An export cannot be written (nothing predicted, bad option, unwritable target)."""


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote.

    Attributes
    ----------
    path
        The file written.
    kind
        ``"ome-tiff"``, ``"mask-ome-tiff"``, ``"geojson"``, ``"h5ad"``, ``"csv"`` or ``"png"``.
    n_cells, n_predicted
        Grid cells and predicted cells of the source predictions.
    detail
        A short description (channels, regions, size).
    """

    path: Path
    kind: str
    n_cells: int
    n_predicted: int
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    n_expected: int | None = None
    n_missing: int | None = None

    @property
    def partial(self) -> bool:
        """True when tiles that should be predicted are not (they are NaN or left out).

        With the tissue known (``n_missing``), only missing *tissue* tiles count; without it,
        any unpredicted grid tile does.
        """
        if self.n_missing is not None:
            return self.n_missing > 0
        return self.n_predicted < self.n_cells

    def message(self) -> str:
        """One line for the CLI or a notification."""
        text = f"wrote {self.path} ({self.kind}"
        text += f", {self.detail})" if self.detail else ")"
        if self.partial:
            if self.n_missing is not None and self.n_expected is not None:
                text += (
                    f"; partial: {self.n_missing} of {self.n_expected} tissue tiles "
                    "not predicted yet, left out"
                )
            else:
                text += (
                    f"; partial: {self.n_predicted} of {self.n_cells} grid tiles predicted, "
                    "the rest left out"
                )
        return text

    def __str__(self) -> str:
        return self.message()


@contextlib.contextmanager
def writing(path: str | os.PathLike, *, overwrite: bool, what: str) -> Iterator[Path]:
    """Atomic write of ``path`` with one-line errors.

    Checks the target before any work (exists without ``overwrite``, missing or read-only
    folder), yields a temporary path and renames it onto ``path`` when the block succeeds.
    """
    check_target(path, overwrite=overwrite)
    try:
        with atomic_path(path, overwrite=overwrite) as tmp:
            yield tmp
    except WriteError as err:
        raise ExportError(f"{path}: cannot write the {what} ({err.reason})") from None
    except StPredictError:
        raise
    except OSError as err:
        raise ExportError(f"{path}: cannot write the {what} ({describe_os_error(err)})") from None


def h5_safe(obj: Any) -> Any:
    """Make nested metadata storable in ``AnnData.uns`` (HDF5): drop None, lists → arrays."""
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            v = h5_safe(v)
            if v is not None:
                out[str(k)] = v
        return out
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (list, tuple)):
        items = [h5_safe(v) for v in obj if v is not None]
        if not items:
            return np.array([], dtype=str)
        if all(isinstance(v, str) for v in items):
            return np.array(items, dtype=object).astype(str)
        if all(isinstance(v, (bool, int, float, np.number)) for v in items):
            return np.asarray(items)
        return {str(i): v for i, v in enumerate(items)}
    if isinstance(obj, (str, bool, int, float, np.number, np.ndarray)):
        return obj
    return str(obj)


def json_safe(obj: Any) -> Any:
    """Make nested metadata JSON-serialisable (numpy scalars/arrays, paths)."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def expression_units(model_meta: Mapping[str, Any] | None) -> str:
    """Human-readable units of predicted expression from the model's normalisation record."""
    norm = (model_meta or {}).get("normalization") or {}
    if isinstance(norm, str):
        norm = {"method": norm}
    method = str(norm.get("method", "log1p_cpm"))
    target = norm.get("target_sum", 1e4)
    if method.startswith("log1p"):
        try:
            per = f"{float(target):,.0f}"
        except (TypeError, ValueError):
            per = str(target)
        return f"ln(1 + counts per {per})"
    return method
