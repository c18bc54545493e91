"""Small table helpers shared by the readers: delimiter by suffix, id templates, checks."""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import pandas as pd

from napari_stpredict.errors import DatasetError, first_line


def separator(path: Path) -> str:
    """``","`` for ``.csv`` (optionally gzipped), a tab otherwise (``.tsv``, ``.txt``)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".xz", ".zip"):
        suffixes = suffixes[:-1]
    return "," if suffixes and suffixes[-1] == ".csv" else "\t"


# what pandas raises for a file that is not a readable delimited table
TABLE_READ_ERRORS = (
    pd.errors.ParserError,
    pd.errors.EmptyDataError,
    UnicodeDecodeError,
    OSError,
    EOFError,
)


def unreadable_table(err: BaseException, *, where: str, what: str, path: Path) -> DatasetError:
    """The one-line error for a table that pandas cannot parse."""
    return DatasetError(f"{where}: {what} {path} cannot be read as a table: {first_line(err)}")


def read_table(path: Path, *, where: str, what: str, **kwargs) -> pd.DataFrame:
    """Read a delimited text table, turning parser failures into one-line errors."""
    try:
        df = pd.read_csv(path, sep=separator(path), comment=None, **kwargs)
    except FileNotFoundError:
        raise DatasetError(f"{where}: {what} not found: {path}") from None
    except TABLE_READ_ERRORS as e:
        raise unreadable_table(e, where=where, what=what, path=path) from None
    if df.shape[0] == 0:
        raise DatasetError(f"{where}: {what} {path} has no rows")
    return df


def template_fields(template: str) -> list[str]:
    """Column names used by an id template such as ``"{x}x{y}"``."""
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def format_ids(df: pd.DataFrame, template: str, *, where: str, what: str) -> pd.Index:
    """Build one id per row of ``df`` from ``template`` over its columns.

    Columns whose values are all integral (e.g. ``9.0``) are formatted as integers so that
    ``"{x}x{y}"`` gives ``"9x13"`` whatever dtype the parser chose. Format specs work as in
    :meth:`str.format`: ``"{x:.0f}x{y:.0f}"`` rounds float array coordinates.
    """
    names = template_fields(template)
    missing = [n for n in names if n not in df.columns]
    if missing:
        cols = ", ".join(map(str, list(df.columns)[:12]))
        raise DatasetError(
            f"{where}: {what} has no column {missing[0]!r} used by the id template "
            f"{template!r} (columns: {cols})"
        )
    empty = df[list(dict.fromkeys(names))].isna().any(axis=1)
    if empty.any():
        raise DatasetError(
            f"{where}: {what} has {int(empty.sum())} row(s) with empty id columns "
            f"({', '.join(dict.fromkeys(names))})"
        )
    values = {}
    for n in dict.fromkeys(names):
        col = df[n]
        if pd.api.types.is_float_dtype(col) and col.notna().all():
            arr = col.to_numpy()
            if np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
                col = col.astype(np.int64)
        values[n] = col.tolist()
    try:
        ids = [
            template.format(**dict(zip(values, row, strict=True)))
            for row in zip(*values.values(), strict=True)
        ]
    except (ValueError, TypeError) as e:
        raise DatasetError(f"{where}: id template {template!r} does not fit {what}: {e}") from None
    return pd.Index(ids)


def check_unique(ids: pd.Index, *, where: str, what: str) -> None:
    """Refuse duplicate spot ids (a join on them would be ambiguous)."""
    if not ids.is_unique:
        dup = ids[ids.duplicated()][0]
        raise DatasetError(f"{where}: {what} has duplicate spot id {dup!r}")


def pixel_xy(df: pd.DataFrame, columns: tuple[str, str], *, where: str, what: str) -> np.ndarray:
    """The two pixel columns as a finite float64 ``(n, 2)`` array (x, y)."""
    for c in columns:
        if c not in df.columns:
            cols = ", ".join(map(str, list(df.columns)[:12]))
            raise DatasetError(f"{where}: {what} has no pixel column {c!r} (columns: {cols})")
    try:
        xy = df[list(columns)].to_numpy(dtype=np.float64)
    except (ValueError, TypeError):
        raise DatasetError(
            f"{where}: {what} pixel columns {list(columns)} are not numeric"
        ) from None
    bad = ~np.isfinite(xy).all(axis=1)
    if bad.any():
        raise DatasetError(
            f"{where}: {what} has {int(bad.sum())} spot(s) with missing or non-finite pixel coordinates"
        )
    return xy


def selected_mask(df: pd.DataFrame, column: str | None, *, where: str, what: str) -> np.ndarray:
    """Rows to keep: all, or those whose ``column`` is 1/true."""
    if column is None:
        return np.ones(len(df), dtype=bool)
    if column not in df.columns:
        cols = ", ".join(map(str, list(df.columns)[:12]))
        raise DatasetError(f"{where}: {what} has no selected_column {column!r} (columns: {cols})")
    col = df[column]
    if pd.api.types.is_bool_dtype(col):
        return col.to_numpy(dtype=bool)
    if pd.api.types.is_numeric_dtype(col):
        return col.fillna(0).to_numpy() == 1
    return col.astype(str).str.strip().str.lower().isin(["1", "true", "yes"]).to_numpy()
