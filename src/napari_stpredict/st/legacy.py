"""Tables of counts + spot positions: legacy Spatial Transcriptomics and any tabular export.

The counts table is spots × genes (``transpose: true`` for genes × spots), tab- or
comma-separated by suffix, optionally gzipped, with spot ids in the first column. The spot table
has one row per spot with the columns named by the id template (``{x}x{y}`` for legacy ST array
coordinates) and the pixel columns. Rows are joined on the id; counts rows without a spot-table
row (and spot rows that are not selected) are dropped.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from napari_stpredict.errors import DatasetError
from napari_stpredict.st._raw import RawSection
from napari_stpredict.st._tables import (
    TABLE_READ_ERRORS,
    check_unique,
    format_ids,
    pixel_xy,
    read_table,
    selected_mask,
    separator,
    unreadable_table,
)
from napari_stpredict.st.manifest import SectionSpec
from napari_stpredict.st.pitch import estimate_spot_pitch

_CHUNK_ROWS = 512


def _check_block(block: np.ndarray, *, where: str, path, ids) -> None:
    if not np.isfinite(block).all():
        r = int(np.nonzero(~np.isfinite(block).all(axis=1))[0][0])
        raise DatasetError(
            f"{where}: counts {path} has NaN/empty or infinite values (spot {ids[r]!r})"
        )
    if (block < 0).any():
        r = int(np.nonzero((block < 0).any(axis=1))[0][0])
        raise DatasetError(f"{where}: counts {path} has negative values (spot {ids[r]!r})")


def read_counts_table(spec: SectionSpec) -> tuple[sp.csr_matrix, list[str], pd.Index]:
    """Read the counts table of a table section into CSR float32 (spots × genes).

    Returns
    -------
    X, genes, spot_ids

    Raises
    ------
    DatasetError
        Unreadable file, non-numeric/NaN/negative counts, duplicate spot ids or gene-less table.
    """
    path = spec.counts
    assert path is not None
    where = spec.where
    kwargs = {"sep": separator(path), "index_col": 0}
    blocks: list[sp.csr_matrix] = []
    ids: list[str] = []
    genes: list[str] | None = None
    try:
        if spec.transpose:
            df = pd.read_csv(path, **kwargs)
            chunks = [df.T]
        else:
            chunks = pd.read_csv(path, chunksize=_CHUNK_ROWS, **kwargs)
        for chunk in chunks:
            if genes is None:
                genes = [str(g) for g in chunk.columns]
            chunk_ids = [str(i) for i in chunk.index]
            try:
                block = chunk.to_numpy(dtype=np.float32)
            except (ValueError, TypeError):
                raise DatasetError(
                    f"{where}: counts {path} has non-numeric values (expected spots × genes "
                    f"with spot ids in the first column{'' if spec.transpose else '; genes × spots needs transpose: true'})"
                ) from None
            _check_block(block, where=where, path=path, ids=chunk_ids)
            blocks.append(sp.csr_matrix(block))
            ids.extend(chunk_ids)
    except DatasetError:
        raise
    except TABLE_READ_ERRORS as e:
        raise unreadable_table(e, where=where, what="counts", path=path) from None
    if not genes or not ids:
        raise DatasetError(f"{where}: counts {path} has no genes or no spots")
    X = sp.vstack(blocks, format="csr").astype(np.float32)
    spot_ids = pd.Index(ids)
    check_unique(spot_ids, where=where, what=f"counts {path}")
    return X, genes, spot_ids


def _ids_and_xy(
    df: pd.DataFrame, id_template: str, pixel_columns, scale: float, where: str, what: str
) -> tuple[pd.Index, np.ndarray]:
    """Unique spot ids (from the id template) and pixel centres × ``scale`` of a spot table."""
    ids = format_ids(df, id_template, where=where, what=what)
    check_unique(ids, where=where, what=what)
    return ids, pixel_xy(df, pixel_columns, where=where, what=what) * scale


def _positions(wanted: pd.Index, index: pd.Index, error: str) -> np.ndarray:
    """Position of each ``wanted`` id in ``index`` (-1 where absent); ``error`` if none is."""
    pos = index.get_indexer(wanted)
    if not (pos >= 0).any():
        raise DatasetError(error)
    return pos


def read_table_section(spec: SectionSpec) -> RawSection:
    """Read a ``counts`` + ``spots`` section (legacy ST and other tables).

    Spot centres are the spot table's pixel columns × ``scale`` (or, with ``coordinates``, the
    override table's pixel columns × its scale).

    Raises
    ------
    DatasetError
        Bad tables, missing columns, or no counts row matching the spot table.
    """
    where = spec.where
    X, genes, count_ids = read_counts_table(spec)

    assert spec.spots is not None
    spots = read_table(spec.spots, where=where, what="spots table")
    what = f"spots table {spec.spots}"
    # the pitch is measured on every row of the spot table (off-tissue spots included)
    pixel_xy(spots.iloc[:0], spec.pixel_columns, where=where, what=what)  # columns exist
    all_xy = (
        spots[list(spec.pixel_columns)].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    )
    all_xy = all_xy[np.isfinite(all_xy).all(axis=1)]
    spots = spots.loc[selected_mask(spots, spec.selected_column, where=where, what=what)]
    if len(spots) == 0:
        raise DatasetError(f"{where}: {what} has no selected spots ({spec.selected_column} == 1)")
    scale = 1.0 if spec.scale is None else float(spec.scale)
    spot_ids, xy = _ids_and_xy(spots, spec.spot_id, spec.pixel_columns, scale, where, what)
    pitch = estimate_spot_pitch(all_xy)
    pitch = pitch * scale if pitch is not None else None
    obs = spots.drop(columns=list(spec.pixel_columns)).set_axis(spot_ids)

    if spec.coordinates is not None:
        ct = spec.coordinates
        cwhat = f"coordinates table {ct.table}"
        cdf = read_table(ct.table, where=where, what="coordinates table")
        cids, cxy = _ids_and_xy(cdf, ct.spot_id, ct.pixel_columns, ct.scale, where, cwhat)
        pos = _positions(
            spot_ids,
            cids,
            f"{where}: no spot of {what} matches {cwhat} (ids like {spot_ids[0]!r} vs "
            f"{cids[0]!r}; check coordinates.spot_id)",
        )
        keep = pos >= 0
        spot_ids, obs = spot_ids[keep], obs.loc[keep]
        xy = cxy[pos[keep]]
        pitch = estimate_spot_pitch(cxy)

    pos = _positions(
        count_ids,
        spot_ids,
        f"{where}: no counts row matches the spots table (counts ids like {count_ids[0]!r}, "
        f"spot ids like {spot_ids[0]!r} from template {spec.spot_id!r})",
    )
    in_both = pos >= 0
    rows = np.nonzero(in_both)[0]
    return RawSection(
        X=X[rows],
        genes=genes,
        spot_ids=count_ids[rows],
        xy=xy[pos[rows]],
        obs=obs.iloc[pos[rows]].set_axis(count_ids[rows]),
        spot_pitch_px=pitch,
        n_dropped=int((~in_both).sum()),
    )
