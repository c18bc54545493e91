"""napari sample data: the HER2ST breast cancer section C2 (H&E), as the demo shows it.

*File → Open Sample → ST Predict → HER2ST breast cancer section C2*. The slide comes from, in
order: ``$STPREDICT_DATA_DIR`` (a ``her2st`` folder or a folder holding one, e.g. a checkout's
``../shared/data``), the folder last given to ``stpredict demo --data-dir`` (remembered in the
demo cache, :func:`remember_local_data`), the demo's data cache (filled by ``stpredict demo``),
or a download of that one image and its spot table (about 4 MB, pinned by SHA-256). When none works, the error
says what to do and napari shows it as a notification; no layer is added.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from napari_stpredict.errors import StPredictError

SAMPLE_SECTION = "C2"
#: File in the demo cache naming the local data folder ``stpredict demo --data-dir`` used.
LOCAL_DATA_FILE = "local_data.json"


def _local_data_record(cache_dir: str | os.PathLike | None = None) -> Path:
    from napari_stpredict.demo import default_cache_dir

    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base / LOCAL_DATA_FILE


def remember_local_data(
    folder: str | os.PathLike, cache_dir: str | os.PathLike | None = None
) -> None:
    """Record ``folder`` (a local HER2ST copy) so *Open Sample* uses it instead of downloading."""
    from napari_stpredict.io_utils import atomic_path

    dst = _local_data_record(cache_dir)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(dst, overwrite=True) as tmp:
            Path(tmp).write_text(json.dumps({"data_dir": str(Path(folder).resolve())}))
    except (OSError, StPredictError):
        pass  # best effort: the sample then falls back to the cache or a download


def remembered_local_data(cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The folder recorded by :func:`remember_local_data`, or ``None``."""
    try:
        rec = json.loads(_local_data_record(cache_dir).read_text())
        return Path(rec["data_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def sample_slide() -> tuple[Path, float]:
    """The sample slide's path and µm per pixel, fetching them if needed.

    Raises
    ------
    StPredictError
        If the slide is neither available locally nor downloadable.
    """
    from napari_stpredict.demo import DATA_ENV, demo_data, find_local_data, section_mpp

    what = ("spots", "image")
    data = None
    if not os.environ.get(DATA_ENV):  # the environment variable wins
        data = find_local_data(remembered_local_data(), [SAMPLE_SECTION], what=what)
    if data is None:
        data = demo_data(sections=[SAMPLE_SECTION], what=what)
    return data / f"images/{SAMPLE_SECTION}.jpg", section_mpp(data, SAMPLE_SECTION)


def her2st_sample() -> list[tuple[Any, dict[str, Any], str]]:
    """npe2 sample data: the HER2ST section C2 as a multiscale RGB image layer (µm units).

    Returns
    -------
    list of LayerData tuples
        One image layer.

    Raises
    ------
    StPredictError
        When the data is neither local nor downloadable; napari shows the message.
    """
    try:
        path, mpp = sample_slide()
    except StPredictError as err:
        raise StPredictError(f"HER2ST sample not available: {err}") from None
    from napari_stpredict._reader import slide_layer_data
    from napari_stpredict.slide import open_slide

    data, kwargs, kind = slide_layer_data(open_slide(path, mpp=mpp))
    kwargs = {**kwargs, "name": f"HER2ST {SAMPLE_SECTION} (H&E)"}
    return [(data, kwargs, kind)]
