"""The one-command demo: a public dataset, a small model trained on it, predictions on a slide.

``stpredict demo`` needs nothing but an internet connection the first time:

1. :func:`demo_data` fetches a few sections of the HER2ST breast cancer study (Andersson et al.,
   Nat. Commun. 2021) from the authors' GitHub repository ``almaan/her2st``: count tables, spot
   tables and full-resolution H&E images (about 19 MB). Every file is pinned by commit and
   SHA-256 with :mod:`pooch`, so what is trained on is exactly what was checked. ``data_dir``
   points at a local copy with the same layout instead (no network).
2. :func:`demo_model` trains a small CMRCNet on the training sections on the CPU, starting from
   the offline ImageNet EfficientNet-Lite0 (minutes), and caches the model file under a key
   made of the data's hashes and the training configuration, so the next run starts at once.
3. The held-out section (C2) is the slide shown (:func:`run_demo` predicts its tissue headless;
   ``stpredict demo`` without ``--no-viewer`` opens napari with live heatmaps instead).

Nothing here imports Qt or napari (the viewer lives in ``cli/demo_cmd.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_stpredict import __version__
from napari_stpredict.errors import DatasetError, StPredictError
from napari_stpredict.io_utils import atomic_path
from napari_stpredict.progress import CancelToken, ProgressCallback, check_cancel, report

__all__ = [
    "DEMO_SLIDE",
    "DEMO_TRAIN_SECTIONS",
    "HER2ST_FILES",
    "DemoConfig",
    "DemoInputs",
    "default_cache_dir",
    "demo_data",
    "demo_gene_panel",
    "demo_manifest",
    "demo_model",
    "find_local_data",
    "prepare_demo",
    "run_demo",
    "section_mpp",
]

# --------------------------------------------------------------------------------------------
# the dataset

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


def _required(sections: Sequence[str], *, what: Sequence[str] = ("counts", "spots", "image")):
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
    files = list(_required(sections, what=what))
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
    files = list(_required(sections, what=what))
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
    dest = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    dest = dest / "her2st"
    if _has_layout(dest, files) and all(_sha256(dest / f.local) == f.sha256 for f in files):
        return dest
    if not download:
        raise DatasetError(f"{dest}: demo data not downloaded yet (run `stpredict demo` once)")
    _fetch(files, dest, progress=progress)
    return dest


def _sha256(path: Path) -> str:
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


# --------------------------------------------------------------------------------------------
# the model


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """What the demo trains and shows.

    The default trains for a few minutes on a laptop CPU; :meth:`quick` is a seconds-long
    smoke-test version (tests, CI) whose model is not meant to be looked at.

    Attributes
    ----------
    train_sections, slide
        Sections learnt from, and the held-out section shown.
    method, backbone, pretrained
        See ``stpredict train``.
    epochs, max_steps, batch_size, lr, warmup_steps
        Training budget (a short warm-up: the run is only about a hundred steps).
    n_top_genes
        Highly variable genes per section (their union is the panel, after the markers).
    patch_um, patch_px
        Patch size; 112 µm at 1 µm/px keeps the CPU cost low.
    train_backbone
        ``"none"``: the pretrained backbone stays frozen and its features are computed once,
        so the heads train for many epochs in minutes on a CPU.
    max_cells
        Cells predicted by the headless demo (``None`` = all tissue cells).
    markers
        Genes shown first; they (and the tumour signature's genes) are always in the panel
        when the training sections measured them.
    """

    train_sections: tuple[str, ...] = DEMO_TRAIN_SECTIONS
    slide: str = DEMO_SLIDE
    method: str = "cmrc"
    backbone: str = "tf_efficientnet_lite0"
    pretrained: str = "offline"
    epochs: int = 6
    max_steps: int | None = None
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 10
    n_top_genes: int = 200
    patch_um: float = 112.0
    patch_px: int = 112
    train_backbone: str = "none"
    seed: int = 0
    max_cells: int | None = None
    markers: tuple[str, ...] = ("ERBB2", "KRT19", "CD74", "IGKC", "COL1A1", "MUC1", "GRB7")

    @classmethod
    def quick(cls) -> DemoConfig:
        """A tiny budget: two sections, a few steps, few cells (seconds on a CPU)."""
        return cls(
            train_sections=("C3",),
            epochs=1,
            max_steps=2,
            batch_size=8,
            n_top_genes=40,
            patch_px=32,
            max_cells=32,
        )

    def training_dict(self) -> dict[str, Any]:
        """The fields that change the trained model (part of the cache key)."""
        d = dataclasses.asdict(self)
        for k in ("slide", "max_cells"):
            d.pop(k)
        return d


def _data_key(data: Path, sections: Sequence[str]) -> str:
    h = hashlib.sha256()
    for f in _required(sections, what=("counts", "spots", "image")):
        h.update(f.local.encode())
        h.update(_sha256(data / f.local).encode())
    return h.hexdigest()


def demo_model_path(data: Path, cache_dir: Path, config: DemoConfig) -> Path:
    """Where the demo model for this data and configuration is cached."""
    key = hashlib.sha256(
        json.dumps(
            {
                "data": _data_key(data, config.train_sections),
                "config": config.training_dict(),
                "version": __version__,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]
    return cache_dir / "models" / f"her2st-demo-{key}.safetensors"


def demo_model(
    data: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    config: DemoConfig | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> tuple[Path, bool]:
    """The demo model file: from the cache, or trained now (CPU unless a GPU is there).

    Parameters
    ----------
    data
        The demo data folder (:func:`demo_data`).
    cache_dir
        Cache folder (default :func:`default_cache_dir`).
    config
        Training settings.
    progress, cancel
        Passed to training.

    Returns
    -------
    (path, trained)
        The model file, and whether it was trained in this call.
    """
    from napari_stpredict.training import TrainConfig, train

    config = config or DemoConfig()
    data = Path(data)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = demo_model_path(data, cache, config)
    if path.is_file():
        return path, False
    manifest = demo_manifest(data, cache / "manifests" / f"{path.stem}.yaml", config.train_sections)
    genes = demo_gene_panel(manifest, config)
    tc = TrainConfig(
        genes=genes,
        method=config.method,
        backbone=config.backbone,
        pretrained=config.pretrained,
        epochs=config.epochs,
        max_steps=config.max_steps,
        batch_size=config.batch_size,
        lr=config.lr,
        warmup_steps=config.warmup_steps,
        n_top_genes=config.n_top_genes,
        patch_um=config.patch_um,
        patch_px=config.patch_px,
        train_backbone=config.train_backbone,
        seed=config.seed,
        device="auto",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    train(manifest, tc, out=path, progress=progress, cancel=cancel)
    if not path.is_file():
        raise StPredictError(f"{path}: training finished without writing the model file")
    return path, True


def demo_gene_panel(manifest: str | os.PathLike, config: DemoConfig) -> list[str]:
    """The demo model's genes: markers worth showing first, then highly variable genes.

    The markers (:attr:`DemoConfig.markers` and the default tumour signature) are kept when
    every training section measured them, so the heatmaps and the tumour layer of the demo
    always have something to show; the rest is the usual union of per-section highly
    variable genes (``n_top_genes`` each).
    """
    from napari_stpredict.st import read_sections
    from napari_stpredict.st.genesets import DEFAULT_TUMOR_GENES
    from napari_stpredict.st.panel import build_panel

    adatas = read_sections(manifest, check_image=False)
    panel = build_panel(
        adatas,
        markers="none",
        add_genes=[*config.markers, *DEFAULT_TUMOR_GENES],
        n_heg=0,
        n_hvg=config.n_top_genes,
    )
    return panel.genes


def pick_markers(genes: Sequence[str], preferred: Sequence[str], n: int = 3) -> list[str]:
    """Up to ``n`` genes to show: the preferred markers the model has, then the panel's first."""
    have = set(genes)
    out = [g for g in preferred if g in have][:n]
    for g in genes:
        if len(out) >= n:
            break
        if g not in out:
            out.append(g)
    return out


# --------------------------------------------------------------------------------------------
# headless run


@dataclasses.dataclass(frozen=True)
class DemoInputs:
    """What the demo shows: a model file and a slide (with its µm per pixel).

    Attributes
    ----------
    model
        The model file.
    trained
        Whether the model was trained in this run (else it came from the cache or the user).
    slide
        The slide file.
    mpp
        µm per pixel to open the slide with (``None``: the file's own).
    data
        The demo data folder, when one was used.
    """

    model: Path
    trained: bool
    slide: Path
    mpp: float | None
    data: Path | None


def prepare_demo(
    *,
    data_dir: str | os.PathLike | None = None,
    model: str | os.PathLike | None = None,
    slide: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    config: DemoConfig | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    on_stage: Any = None,
) -> DemoInputs:
    """Get the demo's data and model ready (download and train only what is missing).

    Parameters are those of :func:`run_demo`.

    Returns
    -------
    DemoInputs
    """
    config = config or DemoConfig()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()

    def stage(msg: str) -> None:
        if on_stage is not None:
            on_stage(msg)

    if model is not None and not Path(model).expanduser().is_file():
        raise StPredictError(f"{Path(model).expanduser()}: model file not found")
    if slide is not None and not Path(slide).expanduser().exists():
        raise StPredictError(f"{Path(slide).expanduser()}: no such slide")
    data: Path | None = None
    if model is None or slide is None:
        stage("demo data")
        if model is None:
            sections, what = (config.slide, *config.train_sections), ("counts", "spots", "image")
        else:
            sections, what = (config.slide,), ("spots", "image")
        data = demo_data(
            data_dir=data_dir, cache_dir=cache, sections=sections, what=what, progress=progress
        )
    trained = False
    if model is None:
        assert data is not None
        cached = demo_model_path(data, cache, config).is_file()
        stage(
            "demo model (cached)" if cached else "training the demo model (cached for the next run)"
        )
        model_path, trained = demo_model(
            data, cache_dir=cache, config=config, progress=progress, cancel=cancel
        )
    else:
        model_path = Path(model).expanduser()
    check_cancel(cancel, "demo")
    if slide is None:
        assert data is not None
        return DemoInputs(
            model_path,
            trained,
            data / f"images/{config.slide}.jpg",
            section_mpp(data, config.slide),
            data,
        )
    return DemoInputs(model_path, trained, Path(slide).expanduser(), None, data)


def run_demo(
    *,
    data_dir: str | os.PathLike | None = None,
    model: str | os.PathLike | None = None,
    slide: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    config: DemoConfig | None = None,
    device: str = "auto",
    genes: Sequence[str] | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    on_stage: Any = None,
) -> dict[str, Any]:
    """The demo without a viewer: get data and model, predict the slide's tissue, summarise.

    Parameters
    ----------
    data_dir
        Local copy of the HER2ST files (default: download into the cache).
    model
        A model file to use instead of training the demo model.
    slide
        A slide to predict instead of the held-out HER2ST section.
    cache_dir
        Cache folder (data, models, predictions).
    config
        :class:`DemoConfig` (``DemoConfig.quick()`` for a smoke test).
    device
        Torch device for prediction.
    genes
        Genes summarised (default: :attr:`DemoConfig.markers` the model has).
    progress, cancel
        Progress of the current stage; cancel between batches.
    on_stage
        Called with a short line when a stage starts.

    Returns
    -------
    dict
        ``model``, ``trained`` (bool), ``slide``, ``mpp``, ``genes`` (count), ``markers``,
        ``cells`` (tissue cells), ``requested`` (cells asked for), ``predicted`` (cells predicted
        now), ``done`` (cells in the store), ``store``, ``marker_means`` {gene: mean predicted
        value}, ``tumor_fraction``, ``seconds``.
    """
    t0 = time.perf_counter()
    config = config or DemoConfig()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    inputs = prepare_demo(
        data_dir=data_dir,
        model=model,
        slide=slide,
        cache_dir=cache,
        config=config,
        progress=progress,
        cancel=cancel,
        on_stage=on_stage,
    )

    from napari_stpredict.inference.session import open_session
    from napari_stpredict.model import Predictor

    if on_stage is not None:
        on_stage(f"predicting {inputs.slide.name}")
    predictor = Predictor(inputs.model, device=device)
    if genes:  # before the prediction, not after it
        known = {g.upper(): g for g in predictor.genes}
        unknown = [g for g in genes if g.upper() not in known]
        if unknown:
            raise StPredictError(
                f"{inputs.model}: genes not predicted by the model: {', '.join(unknown)}"
            )
        markers = [known[g.upper()] for g in genes]
    else:
        markers = pick_markers(predictor.genes, config.markers)
    with open_session(
        slide_path=inputs.slide,
        predictor=predictor,
        mpp=inputs.mpp,
        cache_dir=cache / "predictions",
    ) as session:
        tissue, store = session.tissue, session.store
        cells = session.tissue_cell_list()
        if config.max_cells is not None and len(cells) > config.max_cells:
            # the cells nearest the tissue's centre: the part a viewer would show first
            centre = cells.mean(axis=0)
            order = np.argsort(((cells - centre) ** 2).sum(axis=1), kind="stable")
            cells = cells[np.sort(order[: config.max_cells])]
        before = int(store.is_done(cells).sum()) if len(cells) else 0
        for _ in session.engine.run(cells, cancel=cancel, progress=progress):
            pass
        mpp = session.slide.mpp
    values = store.read_cells(cells, markers) if len(cells) else np.empty((0, len(markers)))
    means = {
        g: (float(np.nanmean(values[:, k])) if np.isfinite(values[:, k]).any() else None)
        for k, g in enumerate(markers)
    }
    return {
        "model": str(inputs.model),
        "trained": inputs.trained,
        "slide": str(inputs.slide),
        "mpp": mpp,
        "genes": len(predictor.genes),
        "markers": markers,
        "cells": int(tissue.sum()),
        "requested": len(cells),
        "predicted": len(cells) - before,
        "done": int(store.n_done),
        "store": str(store.path),
        "marker_means": means,
        "tumor_fraction": _tumor_fraction(store, predictor, tissue),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _tumor_fraction(store, predictor, tissue: np.ndarray) -> float | None:
    """Share of predicted tissue cells above the Otsu tumour threshold (None if it cannot say)."""
    try:
        from napari_stpredict.tumor import tumor_map_for_store

        tmap = tumor_map_for_store(store, tissue=tissue & store.done_mask(), model=predictor)
    except StPredictError:
        return None  # e.g. no tumour marker in a small panel, too few cells for Otsu
    n = int((tissue & store.done_mask()).sum())
    return float(tmap.mask.sum()) / n if n else None
