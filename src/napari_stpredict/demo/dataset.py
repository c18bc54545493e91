"""The demo's data: a few HER2ST sections pinned by commit and SHA-256, found locally or fetched.

:func:`demo_data` looks at ``--data-dir``, ``$STPREDICT_DATA_DIR`` and the cache, and downloads
what is missing from GitHub (``almaan/her2st``) or a mirror with :mod:`pooch`;
:func:`demo_manifest` writes the dataset manifest ``stpredict train`` reads; :func:`section_mpp`
gives the JPEGs' µm per pixel from their spot grid.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from napari_stpredict.errors import DatasetError, StPredictError
from napari_stpredict.io_utils import atomic_path
from napari_stpredict.progress import ProgressCallback, report

__all__ = [
    "DATA_ENV",
    "DEMO_SLIDE",
    "DEMO_TRAIN_SECTIONS",
    "HER2ST_FILES",
    "MIRROR_ENV",
    "SPOT_PITCH_UM",
    "RemoteFile",
    "cache_root",
    "default_cache_dir",
    "demo_data",
    "demo_manifest",
    "find_local_data",
    "section_mpp",
]

#: the repository and commits the files are pinned to (raw.githubusercontent.com URLs)
HER2ST_REPO = "almaan/her2st"
HER2ST_URL = "https://raw.githubusercontent.com/{repo}/{commit}/{path}"
#: a mirror with the same ``{commit}/{path}`` layout can replace GitHub (e.g. on a closed network)
MIRROR_ENV = "STPREDICT_HER2ST_MIRROR"
#: a local copy of the data (the ``her2st`` folder, or a folder holding one)
DATA_ENV = "STPREDICT_DATA_DIR"
_COUNTS_COMMIT = "e75e5c53a994726a8ad251aaf653a02d7932eb6a"
_DATA_COMMIT = "9f2260c6aa8347996955d53f0a5f06ac14c93470"


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """One pinned file of the demo dataset.

    Attributes
    ----------
    local
        Path inside the local data folder (``counts/C2.tsv.gz``, ``images/C2.jpg``, ...).
    commit
        Commit of ``almaan/her2st`` the file is taken from.
    path
        Path of the file in that repository.
    sha256
        Its SHA-256.
    """

    local: str
    commit: str
    path: str
    sha256: str

    def url(self, mirror: str | None = None) -> str:
        """Download URL (GitHub, or ``{mirror}/{commit}/{path}``)."""
        if mirror:
            return f"{mirror.rstrip('/')}/{self.commit}/{self.path}"
        return HER2ST_URL.format(repo=HER2ST_REPO, commit=self.commit, path=self.path)


def _files() -> dict[str, dict[str, RemoteFile]]:
    images = {
        "B4": "data/ST-imgs/B/B4/BT10737_D2_HE.jpg",
        "C2": "data/ST-imgs/C/C2/5714_HE_BT_C2.jpg",
        "C3": "data/ST-imgs/C/C3/5714_HE_BT_D1.jpg",
        "C4": "data/ST-imgs/C/C4/5714_HE_BT_D2.jpg",
    }
    sha = {
        "counts/B4.tsv.gz": "e38231c2a38c9bc7e6d550eec0e527c1869ee0e525fc913e708d1323c34f5ebb",
        "counts/C2.tsv.gz": "c1c59ea6cffae36b9ecb561b8e2a97e3aa5f4085f748e991a0e330ed9d09773d",
        "counts/C3.tsv.gz": "e00c55a3eb9caac5d9c71b8906aae8be8b38f93e23938f4a0ebee17683ef6a2a",
        "counts/C4.tsv.gz": "33201f76d41d7131dc600a0f87d9a70383af3503e81698b4d11e6f2e8d73e9da",
        "spots/B4_selection.tsv": "192b46f3ca414c85753a01a4fb5760a697ca6c0a1aadb949c4687cc6efa9faa0",
        "spots/C2_selection.tsv": "235b5f4306b3b57c628ffc82c98c7109602474fbcc79a917b9c50517f99b6b1c",
        "spots/C3_selection.tsv": "7fd76c13370b7804ac3bb377b846d22485cf9223f9dd8dfc25be06e5aaf65755",
        "spots/C4_selection.tsv": "47e79f3b9dbfa3a8c18af9e948ba7ba4bf0a75ea1b4c292bc714ced7d0917d4c",
        "images/B4.jpg": "3cb165614ce2a13426381e450220dccac980cc9bda6a90fb041c28ca0e2c753d",
        "images/C2.jpg": "26e2f73ae840cdd46c5bba405aae181f13a56a376b9848dff23f7a9c5de7f19e",
        "images/C3.jpg": "0005a92674014d473040a28f0afca89ce5fa5c44019b479b638ceb3272ceb568",
        "images/C4.jpg": "f40607eb1d5f0d125decd71c48b0c5d29cf6776ad92297fd185631208c82d6f2",
    }
    out: dict[str, dict[str, RemoteFile]] = {}
    for s, img in images.items():
        out[s] = {
            "counts": RemoteFile(
                f"counts/{s}.tsv.gz",
                _COUNTS_COMMIT,
                f"data/ST-cnts/{s}.tsv.gz",
                sha[f"counts/{s}.tsv.gz"],
            ),
            "spots": RemoteFile(
                f"spots/{s}_selection.tsv",
                _DATA_COMMIT,
                f"data/ST-spotfiles/{s}_selection.tsv",
                sha[f"spots/{s}_selection.tsv"],
            ),
            "image": RemoteFile(f"images/{s}.jpg", _DATA_COMMIT, img, sha[f"images/{s}.jpg"]),
        }
    return out


#: section → {"counts" | "spots" | "image": RemoteFile}
HER2ST_FILES: dict[str, dict[str, RemoteFile]] = _files()
#: the slide shown by the demo (held out of training)
DEMO_SLIDE = "C2"
#: sections the demo model learns from (patient C's other sections and one of patient B)
DEMO_TRAIN_SECTIONS = ("B4", "C3", "C4")
#: legacy ST: spots 100 µm wide on a 200 µm grid; gives the JPEGs' µm per pixel
SPOT_PITCH_UM = 200.0


def default_cache_dir() -> Path:
    """The demo's cache: ``$STPREDICT_CACHE_DIR/demo`` or ``<user cache>/napari-stpredict/demo``."""
    env = os.environ.get("STPREDICT_CACHE_DIR")
    if env:
        return Path(env).expanduser() / "demo"
    import platformdirs

    return Path(platformdirs.user_cache_dir("napari-stpredict", appauthor=False)) / "demo"


def cache_root(cache_dir: str | os.PathLike | None) -> Path:
    """``cache_dir`` (``~`` expanded), or :func:`default_cache_dir` when it is ``None``."""
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def required_files(
    sections: Sequence[str], *, what: Sequence[str] = ("counts", "spots", "image")
) -> Iterator[RemoteFile]:
    """The pinned files of ``sections`` (``what`` of each); an unknown section is one line."""
    for s in sections:
        if s not in HER2ST_FILES:
            raise StPredictError(
                f"section {s!r}: not in the demo dataset (choose from {', '.join(HER2ST_FILES)})"
            )
        for w in what:
            yield HER2ST_FILES[s][w]


def _has_layout(folder: Path, files: Sequence[RemoteFile]) -> bool:
    return all((folder / f.local).is_file() for f in files)


def find_local_data(
    candidate: str | os.PathLike | None,
    sections: Sequence[str],
    *,
    what=("counts", "spots", "image"),
) -> Path | None:
    """A folder holding the demo files for ``sections``, or None.

    ``candidate`` may be the ``her2st`` folder itself or a folder containing ``her2st/`` (like
    ``../shared/data``).
    """
    if candidate is None:
        return None
    files = list(required_files(sections, what=what))
    base = Path(candidate).expanduser()
    for folder in (base, base / "her2st"):
        if folder.is_dir() and _has_layout(folder, files):
            return folder
    return None


def demo_data(
    *,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    sections: Sequence[str] = (DEMO_SLIDE, *DEMO_TRAIN_SECTIONS),
    what: Sequence[str] = ("counts", "spots", "image"),
    download: bool = True,
    progress: ProgressCallback | None = None,
) -> Path:
    """The folder with the demo sections' files, downloading them if needed.

    Looks, in order, at ``data_dir`` (an error if it lacks a file), ``$STPREDICT_DATA_DIR``, and
    ``<cache_dir>/her2st`` — which is filled from GitHub (or ``$STPREDICT_HER2ST_MIRROR``) with
    files checked against their pinned SHA-256.

    Parameters
    ----------
    data_dir
        A local copy: the ``her2st`` folder (``counts/``, ``spots/``, ``images/``) or its parent.
    cache_dir
        Where downloads go (default :func:`default_cache_dir`).
    sections
        Sections needed.
    what
        Which files of each section (``"counts"``, ``"spots"``, ``"image"``).
    download
        Allow downloading.
    progress
        ``progress(files_done, files_total, name)``.

    Returns
    -------
    pathlib.Path
        The folder (``counts/``, ``spots/``, ``images/`` inside).

    Raises
    ------
    DatasetError
        ``data_dir`` lacks files, or the download failed or did not match its hash.
    """
    files = list(required_files(sections, what=what))
    if data_dir is not None:
        found = find_local_data(data_dir, sections, what=what)
        if found is None:
            base = Path(data_dir).expanduser()
            missing = next(f.local for f in files if not (base / f.local).is_file())
            raise DatasetError(
                f"{base}: not a HER2ST demo folder (missing {missing}; expected counts/, "
                "spots/ and images/ as in almaan/her2st, or a folder holding her2st/)"
            )
        return found
    found = find_local_data(os.environ.get(DATA_ENV), sections, what=what)
    if found is not None:
        return found
    dest = cache_root(cache_dir) / "her2st"
    if _has_layout(dest, files) and all(file_sha256(dest / f.local) == f.sha256 for f in files):
        return dest
    if not download:
        raise DatasetError(f"{dest}: demo data not downloaded yet (run `stpredict demo` once)")
    _fetch(files, dest, progress=progress)
    return dest


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fetch(files: Sequence[RemoteFile], dest: Path, *, progress: ProgressCallback | None) -> None:
    import pooch

    mirror = os.environ.get(MIRROR_ENV) or None
    registry = pooch.create(
        path=dest,
        base_url="",
        registry={f.local: f"sha256:{f.sha256}" for f in files},
        urls={f.local: f.url(mirror) for f in files},
        retry_if_failed=2,
    )
    for k, f in enumerate(files):
        report(progress, k, len(files), f.local)
        try:
            registry.fetch(f.local)
        except Exception as err:  # network down, 404, hash mismatch (pooch removes the file)
            raise DatasetError(
                f"{f.url(mirror)}: download failed ({type(err).__name__}: "
                f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}); without "
                "internet, point --data-dir or STPREDICT_DATA_DIR at a local copy of the HER2ST files"
            ) from err
    report(progress, len(files), len(files), "data ready")


def demo_manifest(data: str | os.PathLike, dst: str | os.PathLike, sections: Sequence[str]) -> Path:
    """Write a dataset manifest (YAML) for HER2ST ``sections`` of ``data`` to ``dst``.

    The schema is the one ``stpredict train`` takes (see ``docs/datasets.md``); paths are
    absolute so the manifest may live anywhere (the data folder can be read-only).
    """
    import yaml

    data = Path(data).resolve()
    doc = {
        "name": "her2st-demo",
        "description": "HER2ST sections (Andersson et al. 2021, almaan/her2st) for stpredict demo",
        "defaults": {
            "spot_id": "{x}x{y}",
            "pixel_columns": ["pixel_x", "pixel_y"],
            "spot_pitch_um": SPOT_PITCH_UM,
        },
        "sections": [
            {
                "name": s,
                "patient": s[0],
                "image": str(data / f"images/{s}.jpg"),
                "counts": str(data / f"counts/{s}.tsv.gz"),
                "spots": str(data / f"spots/{s}_selection.tsv"),
            }
            for s in sections
        ],
    }
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst, overwrite=True) as tmp:
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    return dst


def section_mpp(data: str | os.PathLike, section: str) -> float:
    """µm per pixel of a HER2ST image, from its spot grid (200 µm pitch).

    The JPEGs carry no pixel size; the spot pitch in pixels is measured the way the dataset
    reader measures it for training (:func:`napari_stpredict.st.estimate_spot_pitch` over the
    spot table), so the slide shown is at the scale the model learnt.
    """
    import pandas as pd

    from napari_stpredict.st import estimate_spot_pitch

    path = Path(data) / f"spots/{section}_selection.tsv"
    try:
        df = pd.read_csv(path, sep="\t")
        xy = df[["pixel_x", "pixel_y"]].to_numpy(float)
    except (OSError, KeyError, ValueError) as err:
        raise DatasetError(f"{path}: cannot read the spot table ({err})") from err
    pitch = estimate_spot_pitch(xy)
    if not pitch:
        raise DatasetError(f"{path}: too few spots to infer the pixel size")
    return SPOT_PITCH_UM / float(pitch)
