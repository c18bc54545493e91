"""napari sample data: the HER2ST breast cancer section C2 (H&E), as the demo shows it.

*File → Open Sample → ST Predict → HER2ST breast cancer section C2*. The slide comes from, in
order: ``$STPREDICT_DATA_DIR`` (a ``her2st`` folder or a folder holding one, e.g. a checkout's
``../shared/data``), the demo's data cache (filled by ``stpredict demo``), or a download of
that one image and its spot table (about 4 MB, pinned by SHA-256). When none works, the error
says what to do and napari shows it as a notification; no layer is added.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from napari_stpredict.errors import StPredictError

SAMPLE_SECTION = "C2"


def sample_slide() -> tuple[Path, float]:
    """The sample slide's path and µm per pixel, fetching them if needed.

    Raises
    ------
    StPredictError
        If the slide is neither available locally nor downloadable.
    """
    from napari_stpredict.demo import demo_data, section_mpp

    data = demo_data(sections=[SAMPLE_SECTION], what=("spots", "image"))
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
