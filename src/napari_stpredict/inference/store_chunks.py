"""Whole-chunk reads and writes of a store array without zarr's per-chunk pipeline.

Writing a 32 × 32-cell block of a 785-gene store through ``zarr.Array.__setitem__`` costs
≈ 20–25 ms of CPU, of which ≈ 4 ms is compressing its 25 chunks: the rest is zarr's
asynchronous codec pipeline, paid once per chunk (docs/benchmarks.md, store writes). The
engine writes whole chunks only, so it encodes them itself, exactly as the array's metadata
says (little-endian bytes, then zstd), and replaces each chunk file atomically, as zarr's
``LocalStore`` does. :meth:`DirectChunks.for_array` accepts only arrays whose codecs it
reproduces byte for byte (the layout :func:`~napari_stpredict.inference.store_layout.
create_store` writes); anything else keeps going through zarr.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numcodecs
import numpy as np
import zarr

__all__ = ["DirectChunks"]


class DirectChunks:
    """Encode, decode and atomically replace whole chunks of one zarr v3 array on disc.

    Parameters
    ----------
    folder
        The array's folder (holding its ``zarr.json``).
    chunk_shape, dtype, fill_value
        From the array's metadata.
    level, checksum
        Its zstd codec's settings.
    """

    def __init__(
        self,
        folder: Path,
        chunk_shape: tuple[int, ...],
        dtype: np.dtype,
        fill_value: object,
        *,
        level: int,
        checksum: bool,
    ) -> None:
        self.folder = Path(folder)
        self.chunk_shape = tuple(int(c) for c in chunk_shape)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.fill_value = fill_value
        self._codec = numcodecs.Zstd(level=level, checksum=checksum)

    @classmethod
    def for_array(cls, array: zarr.Array, folder: Path) -> DirectChunks | None:
        """The direct path for ``array`` stored in ``folder``; ``None`` when its layout is not
        the plain one this class reproduces (other codecs, sharding, chunk keys or grids)."""
        meta = array.metadata.to_dict()
        codecs = meta.get("codecs", [])
        keys = meta.get("chunk_key_encoding", {})
        grid = meta.get("chunk_grid", {})
        if (
            meta.get("zarr_format") != 3
            or len(codecs) != 2
            or codecs[0].get("name") != "bytes"
            or codecs[0].get("configuration", {}).get("endian", "little") != "little"
            or codecs[1].get("name") != "zstd"
            or keys != {"name": "default", "configuration": {"separator": "/"}}
            or grid.get("name") != "regular"
        ):
            return None
        config = codecs[1].get("configuration", {})
        return cls(
            folder,
            array.chunks,
            array.dtype,
            array.fill_value,
            level=int(config.get("level", 0)),
            checksum=bool(config.get("checksum", False)),
        )

    def path(self, coords: tuple[int, ...]) -> Path:
        """The file of chunk ``coords``."""
        return self.folder / "c" / Path(*(str(int(c)) for c in coords))

    def read(self, coords: tuple[int, ...]) -> np.ndarray:
        """Chunk ``coords`` as a writable array of the full chunk shape (fill value if absent)."""
        try:
            data = self.path(coords).read_bytes()
        except FileNotFoundError:
            return np.full(self.chunk_shape, self.fill_value, self.dtype)
        raw = self._codec.decode(data)
        return np.frombuffer(raw, self.dtype).reshape(self.chunk_shape).copy()

    def write(self, coords: tuple[int, ...], chunk: np.ndarray) -> None:
        """Replace chunk ``coords`` with ``chunk`` (padded with the fill value at the edges).

        The bytes go to a temporary sibling that is renamed over the chunk file, so a reader
        sees the old chunk or the new one, never a torn one.
        """
        chunk = np.asarray(chunk)
        if chunk.shape != self.chunk_shape:
            full = np.full(self.chunk_shape, self.fill_value, self.dtype)
            full[tuple(slice(0, n) for n in chunk.shape)] = chunk
            chunk = full
        data = self._codec.encode(np.ascontiguousarray(chunk, dtype=self.dtype))
        target = self.path(coords)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.{uuid.uuid4().hex}.partial")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
