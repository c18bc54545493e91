"""OME-Zarr (OME-NGFF multiscales, v0.1–0.5; zarr v2 or v3 stores) read through zarr."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from napari_stpredict.errors import SlideError
from napari_stpredict.slide.sources import LevelSource, check_pixel_type, to_rgb

_UNITS_UM = {
    "angstrom": 1e-4, "picometer": 1e-6, "nanometer": 1e-3, "micrometer": 1.0, "µm": 1.0,
    "um": 1.0, "millimeter": 1e3, "centimeter": 1e4, "meter": 1e6, "inch": 25400.0,
}  # fmt: skip


def is_zarr_dir(path: Path) -> bool:
    """Whether ``path`` is a folder holding zarr group metadata."""
    return path.is_dir() and any(
        (path / name).is_file() for name in (".zgroup", ".zattrs", "zarr.json")
    )


class ZarrLevel(LevelSource):
    """One multiscale level: a zarr array with named axes, exposed as ``(y, x, rgb)``."""

    def __init__(self, array: Any, axes: list[str], downsample: tuple[float, float] | None):
        self.array = array
        self.axes = axes
        iy, ix = axes.index("y"), axes.index("x")
        self.shape = (int(array.shape[iy]), int(array.shape[ix]))
        self.chunks = (
            min(int(array.chunks[iy]), self.shape[0]),
            min(int(array.chunks[ix]), self.shape[1]),
        )
        self.downsample = downsample
        # all axes other than y, x, c are singletons: take index 0
        self._order = [a for a in axes if a in ("y", "x", "c")]

    def _index(self, ys: slice, xs: slice) -> tuple[Any, ...]:
        idx: list[Any] = []
        for a in self.axes:
            idx.append(ys if a == "y" else xs if a == "x" else slice(None) if a == "c" else 0)
        return tuple(idx)

    def _to_yxc(self, arr: Any) -> Any:
        order = self._order
        if "c" not in order:
            return arr[..., None] if isinstance(arr, np.ndarray) else arr[:, :, None]
        perm = [order.index("y"), order.index("x"), order.index("c")]
        return arr.transpose(perm)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        arr = np.asarray(self.array[self._index(slice(y0, y1), slice(x0, x1))])
        return np.ascontiguousarray(to_rgb(self._to_yxc(arr)))

    def to_dask(self, name: str) -> da.Array:
        arr = da.from_zarr(self.array, name=name)
        arr = self._to_yxc(arr[self._index(slice(None), slice(None))])
        if arr.shape[2] != 3:
            arr = arr.map_blocks(
                to_rgb,
                chunks=(*arr.chunks[:2], (3,)),
                dtype=np.uint8,
                meta=np.empty((0, 0, 0), np.uint8),
            )
        elif len(arr.chunks[2]) > 1:
            arr = arr.rechunk({2: 3})
        return arr


def _scale(transforms: list[dict[str, Any]] | None, n: int) -> list[float]:
    scale = [1.0] * n
    for t in transforms or []:
        if t.get("type") == "scale" and len(t.get("scale", [])) == n:
            scale = [a * float(b) for a, b in zip(scale, t["scale"], strict=True)]
    return scale


def open_omezarr(path: Path) -> dict[str, Any]:
    """Open an OME-Zarr multiscales image; return the pieces :class:`~.base.Slide` is built from."""
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r")
        attrs = dict(group.attrs)
    except Exception as err:
        raise SlideError(f"{path}: not a readable zarr store: {err}") from err
    ms = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    if not ms:
        raise SlideError(f"{path}: not an OME-Zarr image (no 'multiscales' metadata)")
    m = ms[0]
    datasets = m.get("datasets") or []
    if not datasets:
        raise SlideError(f"{path}: OME-Zarr multiscales lists no datasets")
    try:
        arrays = [group[d["path"]] for d in datasets]
    except Exception as err:
        raise SlideError(f"{path}: OME-Zarr dataset missing: {err}") from err
    ndim = arrays[0].ndim
    raw_axes = m.get("axes")
    if raw_axes is None:  # v0.1/0.2: always 5-D tczyx
        raw_axes = ["t", "c", "z", "y", "x"][-ndim:]
    names = [a["name"] if isinstance(a, dict) else str(a) for a in raw_axes]
    names = [n.lower() for n in names]
    if len(names) != ndim or "y" not in names or "x" not in names:
        raise SlideError(f"{path}: OME-Zarr axes {names} do not match the {ndim}-D arrays")
    for a, n in zip(names, arrays[0].shape, strict=True):
        if a not in ("y", "x", "c") and n != 1:
            raise SlideError(f"{path}: OME-Zarr axis '{a}' has size {n}; stacks are not supported")
    channels = arrays[0].shape[names.index("c")] if "c" in names else 1
    check_pixel_type(path, arrays[0].dtype, channels)

    global_scale = _scale(m.get("coordinateTransformations"), ndim)
    scales = [
        [
            g * s
            for g, s in zip(
                global_scale, _scale(d.get("coordinateTransformations"), ndim), strict=True
            )
        ]
        for d in datasets
    ]
    iy, ix = names.index("y"), names.index("x")
    sources = []
    for i, arr in enumerate(arrays):
        if 0 in arr.shape:
            raise SlideError(f"{path}: level {i} has zero size {tuple(arr.shape)}")
        has_scale = any(d.get("coordinateTransformations") for d in datasets)
        ds = (scales[i][iy] / scales[0][iy], scales[i][ix] / scales[0][ix]) if has_scale else None
        sources.append(ZarrLevel(arr, names, ds))

    mpp = None
    unit = raw_axes[ix].get("unit") if isinstance(raw_axes[ix], dict) else None
    factor = _UNITS_UM.get(unit) if unit else None
    if factor is not None and scales[0][ix] > 0:
        mpp = scales[0][ix] * factor
    meta = {
        "vendor": "ome-zarr",
        "ngff_version": m.get("version") or attrs.get("ome", {}).get("version"),
        "axes": "".join(names),
        "mpp_source": "OME-Zarr scale" if mpp else None,
    }
    return {"format": "ome-zarr", "sources": sources, "mpp": mpp, "metadata": meta, "closer": None}
