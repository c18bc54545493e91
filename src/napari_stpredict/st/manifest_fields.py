"""Readers of single manifest fields: each returns a checked value or raises a one-line error.

Every error is a :class:`~napari_stpredict.errors.DatasetError` that starts with the manifest,
the section and the field (``MANIFEST: section 'NAME': field 'f': reason``), built by
:class:`FieldContext`. Used by :func:`napari_stpredict.st.manifest.load_manifest`.
"""

from __future__ import annotations

import difflib
import os
import string
from pathlib import Path

from napari_stpredict.errors import DatasetError
from napari_stpredict.st.manifest_types import (
    ELEMENT_KEYS,
    NAMED_SCALES,
    CoordinateTable,
    SpatialDataElements,
)

#: keys of a section's ``coordinates:`` mapping
COORDINATE_KEYS = {"table", "spot_id", "pixel_columns", "scale"}


class FieldContext:
    """Where we are in the manifest, for one-line error messages."""

    def __init__(self, manifest: Path, section: str | None = None) -> None:
        self.manifest = manifest
        self.section = section

    def fail(self, fieldname: str | None, reason: str) -> DatasetError:
        where = str(self.manifest)
        if self.section is not None:
            where += f": section {self.section!r}"
        if fieldname:
            where += f": field {fieldname!r}"
        return DatasetError(f"{where}: {reason}")


def did_you_mean(key: str, allowed: set[str]) -> str:
    """`` (did you mean 'X'?)`` for the closest allowed key, or ``""``."""
    close = difflib.get_close_matches(key, sorted(allowed), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_keys(ctx: FieldContext, raw: dict, allowed: set[str], what: str) -> None:
    """Refuse the first key of ``raw`` not in ``allowed`` (with a suggestion)."""
    for key in raw:
        if key not in allowed:
            raise ctx.fail(str(key), f"unknown {what} key{did_you_mean(str(key), allowed)}")


def str_field(ctx: FieldContext, raw: dict, key: str, default: str | None = None) -> str | None:
    """A non-empty string (numbers are taken as their text), ``default`` when absent."""
    v = raw.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, str | int | float):
        raise ctx.fail(key, f"expected a string, got {type(v).__name__}")
    v = str(v)
    if not v.strip():
        raise ctx.fail(key, "is empty")
    return v


def positive_field(ctx: FieldContext, raw: dict, key: str) -> float | None:
    """A finite number > 0, ``None`` when absent."""
    v = raw.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ctx.fail(key, f"expected a positive number, got {v!r}")
    if not (float(v) > 0 and float(v) < float("inf")):
        raise ctx.fail(key, f"expected a positive number, got {v!r}")
    return float(v)


def columns_field(
    ctx: FieldContext, raw: dict, key: str, default: tuple[str, str]
) -> tuple[str, str]:
    """Two column names ``[x_column, y_column]``, ``default`` when absent."""
    v = raw.get(key)
    if v is None:
        return default
    if (
        not isinstance(v, list | tuple)
        or len(v) != 2
        or not all(isinstance(c, str) and c for c in v)
    ):
        raise ctx.fail(key, f"expected two column names [x_column, y_column], got {v!r}")
    return (v[0], v[1])


def template_field(ctx: FieldContext, raw: dict, key: str, default: str | None) -> str | None:
    """A spot-id template naming columns (``"{x}x{y}"``), ``default`` when absent."""
    v = str_field(ctx, raw, key, default)
    if v is None:
        return None
    try:
        parsed = list(string.Formatter().parse(v))
    except ValueError as e:
        raise ctx.fail(key, f"bad template {v!r}: {e}") from None
    names = [f for _, f, _, _ in parsed if f is not None]
    if not names:
        raise ctx.fail(key, f'template {v!r} names no column (write e.g. "{{x}}x{{y}}")')
    if any(n == "" or n.isdigit() for n in names):
        raise ctx.fail(key, f'template {v!r}: fields must be column names, e.g. "{{x}}x{{y}}"')
    return v


def path_field(
    ctx: FieldContext, raw: dict, key: str, base: Path, *, check: bool, folder: bool = False
) -> Path | None:
    """A path (``~`` and ``$VARS`` expanded, relative to ``base``), checked to exist as a file
    (or a ``folder``) when ``check``; ``None`` when absent."""
    v = raw.get(key)
    if v is None:
        return None
    if not isinstance(v, str) or not v.strip():
        raise ctx.fail(key, f"expected a path, got {v!r}")
    p = Path(os.path.expandvars(os.path.expanduser(v)))
    if not p.is_absolute():
        p = base / p
    p = Path(os.path.normpath(p))
    if check:
        if not p.exists():
            raise ctx.fail(key, f"not found: {p}")
        if folder and not p.is_dir():
            raise ctx.fail(key, f"not a folder: {p}")
        if not folder and p.is_dir():
            raise ctx.fail(key, f"is a folder, expected a file: {p}")
    return p


def scale_field(ctx: FieldContext, raw: dict, key: str, kind: str) -> float | str | None:
    """A positive number, or for visium/h5ad sections one of :data:`NAMED_SCALES`."""
    v = raw.get(key)
    if v is None:
        return None
    if isinstance(v, str) and kind in ("visium", "h5ad"):
        if v not in NAMED_SCALES:
            raise ctx.fail(key, f"expected a number or one of {', '.join(NAMED_SCALES)}, got {v!r}")
        return v
    return positive_field(ctx, raw, key)


def bool_field(ctx: FieldContext, raw: dict, key: str) -> bool:
    """``true``/``false`` (default ``false``)."""
    v = raw.get(key, False)
    if not isinstance(v, bool):
        raise ctx.fail(key, f"expected true/false, got {v!r}")
    return v


def bin_size_field(ctx: FieldContext, raw: dict) -> int | None:
    """``bin_size``: a positive whole number of µm, ``None`` when absent."""
    v = raw.get("bin_size")
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
        raise ctx.fail("bin_size", f"expected a positive whole number of µm (2, 8, 16), got {v!r}")
    return v


def coordinates_field(
    ctx: FieldContext, raw: dict, base: Path, *, check: bool
) -> CoordinateTable | None:
    """``coordinates``: a second table of spot pixel positions, ``None`` when absent."""
    c = raw.get("coordinates")
    if c is None:
        return None
    if not isinstance(c, dict):
        raise ctx.fail(
            "coordinates", "expected a mapping with table, spot_id, pixel_columns, scale"
        )
    for k in c:
        if k not in COORDINATE_KEYS:
            raise ctx.fail(
                f"coordinates.{k}", f"unknown key{did_you_mean(str(k), COORDINATE_KEYS)}"
            )
    table = path_field(ctx, c, "table", base, check=check)
    if table is None:
        raise ctx.fail("coordinates.table", "missing")
    return CoordinateTable(
        table=table,
        spot_id=template_field(ctx, c, "spot_id", "{x}x{y}") or "{x}x{y}",
        pixel_columns=columns_field(ctx, c, "pixel_columns", ("pixel_x", "pixel_y")),
        scale=positive_field(ctx, c, "scale") or 1.0,
    )


def elements_field(ctx: FieldContext, raw: dict) -> SpatialDataElements | None:
    """``elements``: SpatialData element names, ``None`` when absent."""
    e = raw.get("elements")
    if e is None:
        return None
    if not isinstance(e, dict):
        raise ctx.fail(
            "elements", f"expected a mapping with {', '.join(ELEMENT_KEYS)} (element names)"
        )
    for k in e:
        if k not in ELEMENT_KEYS:
            raise ctx.fail(f"elements.{k}", f"unknown key{did_you_mean(str(k), set(ELEMENT_KEYS))}")
    return SpatialDataElements(**{k: str_field(ctx, e, k) for k in ELEMENT_KEYS})
