"""Everything checked before a cohort starts: exports, slides and their output names, the model,
the output location, and each slide against the options (µm/px, grid size, exports' needs).

Bad input is a one-line :class:`~napari_stpredict.errors.StPredictError` raised here, before any
slide is predicted.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from napari_stpredict.errors import ModelFileError, SlideError, StPredictError
from napari_stpredict.io_utils import check_not_inside, confined, safe_name

#: export names accepted by ``--export`` (:data:`napari_stpredict.export.EXPORT_KINDS`)
EXPORT_FORMATS = (
    "h5ad",
    "csv",
    "ome-tiff",
    "geojson",
    "mask-ome-tiff",
    "png",
    "spatialdata",
    "spatialdata-no-image",
)
#: exports that need the tumour layer (a model that can score the tumour signature)
TUMOR_EXPORTS = ("geojson", "mask-ome-tiff")
_MULTI_SUFFIXES = (".ome.tiff", ".ome.tif", ".ome.zarr")
#: a grid larger than this is refused before any work (memory and time would explode)
MAX_GRID_TILES = 4_000_000
#: symmetries of the square a prediction may average (test-time augmentation)
TTA_CHOICES = (1, 2, 4, 8)


def check_tta(tta: int | None, flag: str = "--tta") -> None:
    """Refuse a test-time augmentation other than 1, 2, 4 or 8 (``None``: the model's) in one
    line, before any model is loaded."""
    if tta is not None and tta not in TTA_CHOICES:
        raise StPredictError(f"{flag} {tta}: choose 1, 2, 4 or 8 (flips/rotations averaged)")


def check_options(
    *,
    stride_um: float | None,
    batch_size: int | None,
    mpp: float | None,
    min_tissue: float,
    tta: int | None = None,
) -> None:
    """The cohort's numeric options, each refused in one line when out of range."""
    if stride_um is not None and not stride_um > 0:
        raise StPredictError(f"--stride-um {stride_um}: must be positive")
    if batch_size is not None and batch_size < 1:
        raise StPredictError(f"--batch-size {batch_size}: must be at least 1")
    if mpp is not None and not mpp > 0:
        raise StPredictError(f"--mpp {mpp}: must be positive")
    if not 0.0 <= min_tissue <= 1.0:
        raise StPredictError(f"min_tissue {min_tissue}: must be within [0, 1]")
    check_tta(tta)


def slide_suffixes() -> tuple[str, ...]:
    """File extensions taken from a folder given as a slide argument: what ``open_slide`` reads."""
    from napari_stpredict.slide.opener import SLIDE_SUFFIXES

    return tuple(SLIDE_SUFFIXES)


def parse_exports(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """Parse ``--export h5ad,geojson,...`` into a tuple of known export names.

    Raises
    ------
    StPredictError
        On an unknown name.
    """
    if value is None:
        return ()
    from napari_stpredict.export.bundle import parse_kinds

    out = parse_kinds(
        value,
        EXPORT_FORMATS,
        lambda raw: StPredictError(
            f"--export {raw!r}: unknown export (choose from {', '.join(EXPORT_FORMATS)})"
        ),
    )
    if any(e.startswith("spatialdata") for e in out):
        from napari_stpredict.export.spatialdata import have_spatialdata, missing_extra_message

        if not have_spatialdata():
            raise StPredictError(missing_extra_message("--export spatialdata"))
        if "spatialdata" in out and "spatialdata-no-image" in out:
            raise StPredictError(
                "--export: spatialdata and spatialdata-no-image name the same store"
            )
    return tuple(out)


def slide_stem(path: str | os.PathLike) -> str:
    """The name of a slide without its (multi-part) extension: ``a/b.ome.tif`` → ``b``."""
    name = Path(path).name
    low = name.lower()
    for suf in _MULTI_SUFFIXES:
        if low.endswith(suf):
            return name[: -len(suf)]
    return Path(name).stem or name


def _is_slide_file(p: Path) -> bool:
    if p.name.startswith("."):
        return False
    return p.name.lower().endswith(slide_suffixes())


def collect_slides(paths: Sequence[str | os.PathLike]) -> list[tuple[Path, str]]:
    """Expand the slide arguments and give each slide a unique, safe output name.

    A folder that is not itself a slide (an OME-Zarr is one) contributes the slide files directly
    inside it, sorted. A file given twice (or through a symlink) counts once. Output names are
    the slide stems made file-name safe (``...png`` → ``slide``, never ``..`` or a path); slides
    sharing a name get their parent folder's name prepended (``patientA__slide1``), then a
    counter.

    Returns
    -------
    list of (path, name)

    Raises
    ------
    StPredictError
        If a path does not exist, a folder holds no slide, or nothing is left.
    """
    files: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            raise SlideError(f"{p}: no such file or folder")
        if p.is_dir() and not p.name.lower().endswith(".zarr"):
            found = sorted(c for c in p.iterdir() if _is_slide_file(c))
            if not found:
                raise SlideError(f"{p}: folder holds no slide file ({', '.join(slide_suffixes())})")
            files.extend(found)
        else:
            files.append(p)
    seen: set[Path] = set()
    unique: list[Path] = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    if not unique:
        raise StPredictError("no slides given")
    stems = [safe_name(slide_stem(f)) for f in unique]
    counts = {s: stems.count(s) for s in stems}
    names: list[str] = []
    for f, s in zip(unique, stems, strict=True):
        name = s if counts[s] == 1 else safe_name(f"{f.absolute().parent.name}__{s}")
        base, k = name, 2
        while name.lower() in {n.lower() for n in names}:
            name = f"{base}-{k}"
            k += 1
        names.append(name)
    return list(zip(unique, names, strict=True))


def model_digest(path: str | os.PathLike) -> str:
    """sha256 of a model file (hex): names the model in done markers and store keys."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def check_model(path: str | os.PathLike) -> dict[str, Any]:
    """Validate a model file before any slide is touched; return its metadata.

    Raises
    ------
    ModelFileError
        If the file is missing or not a valid stpredict model file.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelFileError(f"{p}: model file not found")
    from napari_stpredict.model import load_model_file

    return dict(load_model_file(p).metadata)


def check_output(out: str | os.PathLike, pairs: Sequence[tuple[Path, str]]) -> Path:
    """Create the output folder and prove every slide folder lies inside it.

    Refuses, before any work: a slide that lies inside the output it would be written to (an
    OME-Zarr at ``OUT/<name>/predictions.zarr``), an output inside a slide, and a slide folder
    that is a symlink leading outside ``OUT``.
    """
    out_dir = Path(out).expanduser()
    for path, _ in pairs:
        src = path.resolve()
        if src == out_dir.resolve() or src in out_dir.resolve().parents:
            raise StPredictError(
                f"{out_dir}: the output folder lies inside the slide {path} (choose another --out)"
            )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StPredictError(
            f"{out_dir}: cannot create the output folder ({err.strerror})"
        ) from err
    if not os.access(out_dir, os.W_OK):
        raise StPredictError(f"{out_dir}: output folder is not writable")
    folders = [confined(out_dir, name) for _, name in pairs]
    for path, _ in pairs:
        check_not_inside([path], out_dir / "summary.json", "summary")
        for folder in folders:
            src = path.resolve()
            dst = folder.resolve()
            if src == dst or dst in src.parents:
                raise StPredictError(
                    f"{path}: the slide lies inside its output folder {folder} that predict "
                    "writes and replaces (move the slide or choose another --out)"
                )
    return out_dir


def grid_tiles(shape: Sequence[int], mpp: float, stride_um: float) -> int:
    """Tiles of a grid of ``stride_um`` over a slide of ``shape`` level-0 px at ``mpp``."""
    h, w = int(shape[0]), int(shape[1])
    return math.ceil(h * mpp / stride_um) * math.ceil(w * mpp / stride_um)


def check_slides(
    pairs: Sequence[tuple[Path, str]],
    *,
    mpp: float | None,
    stride_um: float | None,
    patch_um: float | None,
    max_tiles: int = MAX_GRID_TILES,
) -> None:
    """Each slide against the options, reading only its header (before any work).

    Refuses a slide that records no µm/px when ``--mpp`` is not given, and a grid of more than
    ``max_tiles`` tiles (``--stride-um 0.001``). A slide that cannot be opened is left to its
    row (it fails there, the others go on).
    """
    from napari_stpredict.slide import open_slide

    for path, _name in pairs:
        try:
            slide = open_slide(path)
        except (StPredictError, OSError, ValueError):
            continue
        with slide:
            slide_mpp = slide.mpp or mpp
            if slide_mpp is None:
                raise StPredictError(
                    f"{path}: the file records no pixel size (µm/px); pass --mpp "
                    "(e.g. --mpp 0.5 for a 20x scan)"
                )
            stride = stride_um or patch_um
            if stride:
                n = grid_tiles(slide.shape, slide_mpp, stride)
                if n > max_tiles:
                    raise StPredictError(
                        f"--stride-um {stride:g}: {n:,} tiles over {path.name} "
                        f"({slide.shape[1]} x {slide.shape[0]} px at {slide_mpp:.3g} µm/px); "
                        f"at most {max_tiles:,} (use a coarser stride)"
                    )


def export_skips(exports: Sequence[str], metadata: Mapping[str, Any]) -> dict[str, str]:
    """``{export: reason}`` for exports this model cannot make (checked once, up front).

    A tumour export (GeoJSON, mask) needs a model that predicts enough genes of its tumour
    signature; without them the slide is still predicted and its other exports written.
    """
    wanted = [e for e in exports if e in TUMOR_EXPORTS]
    if not wanted:
        return {}
    try:
        from napari_stpredict.st.genesets import tumour_support
    except ImportError:  # pragma: no cover - gene sets module absent
        return {}
    try:
        ok, reason = tumour_support(dict(metadata))
    except StPredictError as err:
        ok, reason = False, str(err)
    return {} if ok else dict.fromkeys(wanted, reason)
