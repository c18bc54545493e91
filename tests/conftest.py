"""Shared fixtures: the real data in ../shared/data and a tiny trained model.

Tests that need the real data skip with a reason when the folder is absent. The folder can be
moved with the environment variable ``STPREDICT_SHARED_DATA``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("STPREDICT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session", autouse=True)
def _private_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """Point ``STPREDICT_CACHE_DIR`` into the run's temporary folder: tests never write into
    the user's own cache (``~/.cache/napari-stpredict``), and a passing run leaves nothing."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STPREDICT_CACHE_DIR", str(tmp_path_factory.mktemp("user-cache")))
        yield


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real test data not found at {path} (set STPREDICT_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real public data (``../shared/data``)."""
    return _need(SHARED_DATA)


@pytest.fixture(scope="session")
def wsi_dir(shared_data: Path) -> Path:
    """Real slide files for reader tests."""
    return _need(shared_data / "wsi")


@pytest.fixture(scope="session")
def her2st_dir(shared_data: Path) -> Path:
    """HER2ST legacy ST sections (counts, spots, images, labels)."""
    return _need(shared_data / "her2st")


@pytest.fixture(scope="session")
def mob_dir(shared_data: Path) -> Path:
    """STUtility mouse olfactory bulb sections."""
    return _need(shared_data / "mob")


@pytest.fixture(scope="session")
def benchmarks_data_dir() -> Path:
    """The manifests under benchmarks/data (they point at ../shared/data)."""
    return REPO_ROOT / "benchmarks" / "data"


def _her2st_mpp(her2st_dir: Path, section: str) -> float:
    """µm/px of a HER2ST image from its spot grid (legacy ST: 200 µm array pitch)."""
    import numpy as np
    import pandas as pd

    d = pd.read_csv(her2st_dir / "spots" / f"{section}_selection.tsv", sep="\t")
    fit_x = np.polyfit(d["x"], d["pixel_x"], 1)[0]
    fit_y = np.polyfit(d["y"], d["pixel_y"], 1)[0]
    px_per_step = (fit_x + fit_y) / 2
    return 200.0 / px_per_step


@pytest.fixture(scope="session")
def her2st_mpp(her2st_dir: Path):
    """``her2st_mpp(section)``: µm/px of a HER2ST image from its 200 µm spot grid."""
    return lambda section: _her2st_mpp(her2st_dir, section)


@pytest.fixture(scope="session")
def real_store(tmp_path_factory, her2st_dir: Path, tiny_model_file):
    """``(store, model_path)``: HER2ST C3 (real H&E) with a block of tissue cells predicted.

    The tiny model (trained on B4 + C2) predicts a 10 × 10 block of cells around the middle of
    the held-out C3 (tissue cells only, like the live view), so the store is partially
    predicted, as in real use.
    """
    import numpy as np

    from napari_stpredict.inference.engine import Engine
    from napari_stpredict.inference.grid import TileGrid
    from napari_stpredict.inference.store import PredictionStore
    from napari_stpredict.model import Predictor
    from napari_stpredict.slide import open_slide

    slide = open_slide(her2st_dir / "images" / "C3.jpg", mpp=_her2st_mpp(her2st_dir, "C3"))
    predictor = Predictor(tiny_model_file, device="cpu")
    grid = TileGrid.for_slide(slide, predictor)
    store = PredictionStore.for_slide(
        slide, predictor, grid, cache_dir=tmp_path_factory.mktemp("real_store")
    )
    gh, gw = grid.shape
    ii, jj = np.mgrid[gh // 2 - 5 : gh // 2 + 5, gw // 2 - 5 : gw // 2 + 5]
    engine = Engine(slide, predictor, grid, store)
    try:
        for _ in engine.run(np.stack([ii.ravel(), jj.ravel()], axis=1)):
            pass
    finally:
        engine.close()
    return store, Path(tiny_model_file)


# --------------------------------------------------------------------------------------------
# a tiny trained model (model/ and training.py)

#: Marker genes the tiny model always predicts (on top of the 785-gene HER2ST panel), so
#: heatmap, tumour and export tests can use them. KRT5 is dropped: not measured in B4/C2.
TINY_MODEL_MARKERS = (
    "ERBB2", "GRB7", "ESR1", "PGR", "MKI67", "TOP2A", "KRT8", "KRT18", "EPCAM", "FOXA1",
    "CCND1", "MUC1", "FASN", "SCD", "PTPRC", "CD74", "COL1A1", "KRT5",
)  # fmt: skip


@pytest.fixture(scope="session")
def tiny_model_config():
    """The :class:`~napari_stpredict.training.TrainConfig` of :func:`tiny_model_file`."""
    import numpy as np

    from napari_stpredict.training import TrainConfig

    panel = SHARED_DATA / "genelists" / "hist2st_her_hvg_cut_1000.npy"
    genes = [str(g) for g in np.load(panel, allow_pickle=False)] if panel.exists() else []
    return TrainConfig(
        method="cmrc",
        backbone="tf_efficientnet_lite0",
        pretrained="offline",
        genes=list(dict.fromkeys([*TINY_MODEL_MARKERS, *genes])),
        missing_genes="drop",
        patch_um=112.0,
        patch_px=64,
        epochs=1,
        max_steps=2,
        batch_size=16,
        val_fraction=0.04,
        device="cpu",
        seed=0,
        num_workers=2,
        # pinned, not the training defaults (8 views + a context field = 16 backbone passes
        # per tile): the tests that use this model need it fast, not accurate
        tta=1,
        context=0.0,
    )


@pytest.fixture(scope="session")
def tiny_model_file(her2st_dir, benchmarks_data_dir, tiny_model_config, tmp_path_factory) -> Path:
    """A CMRCNet model file trained for 2 steps on HER2ST B4 + C2, cached for the session.

    Real weights (offline ImageNet EfficientNet-Lite0 backbone, fine-tuned 2 steps), a real
    reference bank (the ~430 training spots), 64 px patches of 112 µm, ~800 genes (the HER2ST
    panel plus :data:`TINY_MODEL_MARKERS`), top-k 50. Load it with
    ``napari_stpredict.model.Predictor(tiny_model_file, device="cpu")``.
    """
    import warnings

    from napari_stpredict.training import train

    manifest = benchmarks_data_dir / "her2st.yaml"
    if not manifest.exists():
        pytest.skip(f"dataset manifest {manifest} not found")
    out = tmp_path_factory.mktemp("tiny_model") / "tiny_cmrc.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dropped genes of the panel
        train(manifest, tiny_model_config, out=out, sections=["B4", "C2"])
    return out


# ----------------------------------------------------------------------------- napari scenes
@pytest.fixture
def c3_scene(make_napari_viewer, real_store):
    """Factory: a shown viewer with the C3 slide and heatmaps of :func:`real_store`, laid out as
    the Predict dock lays them out. ``build(size=(w, h), genes=…, hidden=…, tissue=…,
    gene_stats=…)`` returns a namespace with ``viewer, store, model_path, slide, heat``.
    ``tissue=True`` passes the predicted block as the session's tissue (exports are complete);
    ``gene_stats`` defaults to the model header's.
    """
    from types import SimpleNamespace

    import numpy as np

    def build(
        *, size=None, genes=("ERBB2", "KRT8"), hidden=(), tissue=False, gene_stats=None
    ) -> SimpleNamespace:
        from napari_stpredict.model.header import header_gene_stats
        from napari_stpredict.slide import open_slide
        from napari_stpredict.tumor import read_model_metadata
        from napari_stpredict.widgets._heatmaps import HeatmapSet

        store, model_path = real_store
        slide_path = store.info["slide"]["path"]
        slide = open_slide(slide_path, mpp=store.grid.mpp)
        viewer = make_napari_viewer(show=True)
        if size is not None:
            viewer.window.resize(*size)
        slide_layer = viewer.add_image(
            slide.levels,
            multiscale=True,
            rgb=True,
            name="C3",
            scale=slide.layer_scale,
            metadata={"stpredict_slide": {"path": slide_path, "mpp": slide.mpp}},
        )
        if gene_stats is None:
            gene_stats = header_gene_stats(read_model_metadata(model_path))
        metadata = {"store": str(store.path), "model": str(model_path), "slide_path": slide_path}
        if tissue:
            metadata["tissue"] = np.asarray(store.done_mask(), bool)
        heat = HeatmapSet(
            viewer,
            slide_layer=slide_layer,
            grid=store.grid,
            panel=store.genes,
            gene_stats=gene_stats,
            metadata=metadata,
            read_plane=lambda i: store.read(i),
        )
        heat.set_genes(list(genes))
        for gene in hidden:
            heat.layers[gene].visible = False
        return SimpleNamespace(
            viewer=viewer, store=store, model_path=model_path, slide=slide, heat=heat
        )

    return build


@pytest.fixture
def look_at_predictions():
    """``look(viewer, store, qtbot, fill=0.95)``: centre the camera on the predicted block and
    zoom so it fills ``fill`` of the canvas (call it after docks are added)."""
    import numpy as np

    from napari_stpredict.widgets._common import camera_of

    def look(viewer, store, qtbot, fill: float = 0.95) -> None:
        qtbot.wait(100)
        done = np.argwhere(np.asarray(store.done[...]))
        (i0, j0), (i1, j1) = done.min(0), done.max(0) + 1
        y0, x0, _, _ = store.grid.cell_rect_px(i0, j0)
        y1, x1, _, _ = store.grid.cell_rect_px(i1, j1)
        s = store.grid.mpp
        camera_of(viewer).center = ((y0 + y1) / 2 * s, (x0 + x1) / 2 * s)
        h, w = viewer.canvas.size
        camera_of(viewer).zoom = fill * min(h / ((y1 - y0) * s), w / ((x1 - x0) * s))
        qtbot.wait(300)

    return look
