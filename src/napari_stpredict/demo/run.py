"""The demo's run: get data and model ready (:func:`prepare_demo`), then predict headless
(:func:`run_demo`) or hand the inputs to the viewer (``cli/demo_cmd.py``)."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_stpredict.demo.dataset import cache_root, demo_data, section_mpp
from napari_stpredict.demo.model import DemoConfig, demo_model, demo_model_path, pick_markers
from napari_stpredict.errors import StPredictError
from napari_stpredict.progress import CancelToken, ProgressCallback, check_cancel

__all__ = ["DemoInputs", "genes_to_show", "model_genes", "prepare_demo", "run_demo"]


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


def model_genes(predictor: Any, wanted: Sequence[str], model: str | os.PathLike) -> list[str]:
    """``wanted`` as the model spells them (matched case-insensitively).

    Raises
    ------
    StPredictError
        One line naming the model file and the genes it does not predict.
    """
    from napari_stpredict.st.genesets import match_genes

    index, missing = match_genes(predictor.genes, wanted)
    if missing:
        raise StPredictError(f"{model}: genes not predicted by the model: {', '.join(missing)}")
    return [predictor.genes[i] for i in index]


def genes_to_show(
    predictor: Any,
    wanted: Sequence[str] | None,
    preferred: Sequence[str],
    model: str | os.PathLike,
) -> list[str]:
    """The genes the demo shows: ``wanted`` (checked, :func:`model_genes`), else up to three
    of the ``preferred`` markers the model has (:func:`~napari_stpredict.demo.pick_markers`)."""
    if wanted:
        return model_genes(predictor, wanted, model)
    return pick_markers(predictor.genes, preferred)


def _check_given_files(model: str | os.PathLike | None, slide: str | os.PathLike | None) -> None:
    if model is not None and not Path(model).expanduser().is_file():
        raise StPredictError(f"{Path(model).expanduser()}: model file not found")
    if slide is not None and not Path(slide).expanduser().exists():
        raise StPredictError(f"{Path(slide).expanduser()}: no such slide")


def prepare_demo(
    *,
    data_dir: str | os.PathLike | None = None,
    model: str | os.PathLike | None = None,
    slide: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    config: DemoConfig | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> DemoInputs:
    """Get the demo's data and model ready (download and train only what is missing).

    Parameters are those of :func:`run_demo`.

    Returns
    -------
    DemoInputs
    """
    config = config or DemoConfig()
    cache = cache_root(cache_dir)
    stage = on_stage or (lambda _msg: None)
    _check_given_files(model, slide)
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
        slide_path = data / f"images/{config.slide}.jpg"
        return DemoInputs(model_path, trained, slide_path, section_mpp(data, config.slide), data)
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
    on_stage: Callable[[str], None] | None = None,
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
    cache = cache_root(cache_dir)
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
    from napari_stpredict.model import Predictor

    if on_stage is not None:
        on_stage(f"predicting {inputs.slide.name}")
    predictor = Predictor(inputs.model, device=device)
    markers = genes_to_show(predictor, genes, config.markers, inputs.model)  # before predicting
    run = _predict_cells(inputs, predictor, cache, config.max_cells, progress, cancel)
    return {
        "model": str(inputs.model),
        "trained": inputs.trained,
        "slide": str(inputs.slide),
        "mpp": run.mpp,
        "genes": len(predictor.genes),
        "markers": markers,
        "cells": int(run.tissue.sum()),
        "requested": len(run.cells),
        "predicted": len(run.cells) - run.before,
        "done": int(run.store.n_done),
        "store": str(run.store.path),
        "marker_means": _marker_means(run.store, run.cells, markers),
        "tumor_fraction": _tumor_fraction(run.store, predictor, run.tissue),
        "seconds": round(time.perf_counter() - t0, 2),
    }


@dataclasses.dataclass(frozen=True)
class _DemoRun:
    """What the headless prediction did: the cells asked for, how many were done before,
    the tissue mask, the store and the slide's µm per pixel."""

    cells: np.ndarray
    before: int
    tissue: np.ndarray
    store: Any
    mpp: float | None


def _predict_cells(
    inputs: DemoInputs,
    predictor: Any,
    cache: Path,
    max_cells: int | None,
    progress: ProgressCallback | None,
    cancel: CancelToken | None,
) -> _DemoRun:
    """Predict the slide's tissue cells (the ``max_cells`` nearest the tissue's centre) into
    the demo's prediction cache."""
    from napari_stpredict.inference.session import open_session

    with open_session(
        slide_path=inputs.slide,
        predictor=predictor,
        mpp=inputs.mpp,
        cache_dir=cache / "predictions",
    ) as session:
        cells = _central_cells(session.tissue_cell_list(), max_cells)
        store = session.store
        before = int(store.is_done(cells).sum()) if len(cells) else 0
        for _ in session.engine.run(cells, cancel=cancel, progress=progress):
            pass
        return _DemoRun(cells, before, session.tissue, store, session.slide.mpp)


def _central_cells(cells: np.ndarray, max_cells: int | None) -> np.ndarray:
    """At most ``max_cells`` of ``cells``: those nearest the tissue's centre (the part a viewer
    would show first), in their original order."""
    if max_cells is None or len(cells) <= max_cells:
        return cells
    centre = cells.mean(axis=0)
    order = np.argsort(((cells - centre) ** 2).sum(axis=1), kind="stable")
    return cells[np.sort(order[:max_cells])]


def _marker_means(store: Any, cells: np.ndarray, markers: list[str]) -> dict[str, float | None]:
    """Mean predicted value of each marker over ``cells`` (``None`` when none is predicted)."""
    values = store.read_cells(cells, markers) if len(cells) else np.empty((0, len(markers)))
    return {
        g: (float(np.nanmean(values[:, k])) if np.isfinite(values[:, k]).any() else None)
        for k, g in enumerate(markers)
    }


def _tumor_fraction(store: Any, predictor: Any, tissue: np.ndarray) -> float | None:
    """Share of predicted tissue cells above the Otsu tumour threshold (None if it cannot say)."""
    try:
        from napari_stpredict.tumor import tumor_map_for_store

        tmap = tumor_map_for_store(store, tissue=tissue & store.done_mask(), model=predictor)
    except StPredictError:
        return None  # e.g. no tumour marker in a small panel, too few cells for Otsu
    n = int((tissue & store.done_mask()).sum())
    return float(tmap.mask.sum()) / n if n else None
