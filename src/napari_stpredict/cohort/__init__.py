"""Cohort prediction: every slide of a study through the same session as the napari widget.

For each slide, :func:`predict_slide` locks ``OUT/<slide-name>/``, opens one prediction session
(slide → grid → tissue → store → engine, :mod:`napari_stpredict.inference.session`), predicts
the tissue tiles into ``OUT/<slide-name>/predictions.zarr`` and writes the exports asked for.
:func:`predict_cohort` checks every input up front, runs the slides on a scheduler from
:mod:`napari_stpredict.distributed` (in-process, a LocalCluster, or an existing dask cluster)
and writes ``OUT/summary.json``.

=========================  ===================================================================
:mod:`.inputs`             exports, slides and safe output names, model, output location,
                           per-slide checks (µm/px, grid size, exports' needs)
:mod:`.rows`               :class:`SlideJob` (what a worker gets), :class:`SlideRow` (the
                           summary row, built only there), done/summary JSON
:mod:`.slide`              one slide: lock, session, predict, exports, done marker
:mod:`.scheduler`          the run: check, schedule, collect rows, write ``summary.json``
=========================  ===================================================================

Resuming is free: the store keeps a done-mask (a killed run loses at most one batch per slide),
and ``OUT/<slide-name>/done.json`` is written last, atomically, when a slide is complete, so a
rerun skips finished slides (after verifying their store) and finishes the others. A slide
that fails is reported in the summary with its error (the traceback goes to
``OUT/<slide-name>/error.log``); the others go on. An export that cannot be made is listed with
its reason in the slide's row (``export_errors``); the slide is still done.

Layout of ``OUT``::

    OUT/summary.json                      one row per slide of the last run
    OUT/.stpredict-lock-<name>            advisory lock held while a process writes <name>
    OUT/<name>/.stpredict-output          ownership marker (only marked folders are written)
    OUT/<name>/predictions.zarr           the PredictionStore (genes × grid, NaN = not predicted)
    OUT/<name>/<name>.h5ad | .csv | _heatmaps.ome.tif | _tumor.geojson    the exports
    OUT/<name>/done.json                  written last: the slide is complete
"""

from __future__ import annotations

from napari_stpredict.cohort.inputs import (
    EXPORT_FORMATS,
    MAX_GRID_TILES,
    check_model,
    collect_slides,
    model_digest,
    parse_exports,
    slide_stem,
    slide_suffixes,
)
from napari_stpredict.cohort.rows import (
    DONE_FILE,
    ERROR_FILE,
    STORE_NAME,
    SUMMARY_FILE,
    SlideJob,
    SlideRow,
    read_done,
)
from napari_stpredict.cohort.scheduler import CohortResult, predict_cohort
from napari_stpredict.cohort.slide import is_skippable, predict_slide

__all__ = [
    "DONE_FILE",
    "ERROR_FILE",
    "EXPORT_FORMATS",
    "MAX_GRID_TILES",
    "STORE_NAME",
    "SUMMARY_FILE",
    "CohortResult",
    "SlideJob",
    "SlideRow",
    "check_model",
    "collect_slides",
    "is_skippable",
    "model_digest",
    "parse_exports",
    "predict_cohort",
    "predict_slide",
    "read_done",
    "slide_stem",
    "slide_suffixes",
]
