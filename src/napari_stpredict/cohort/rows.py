"""The typed records of a cohort run: what a worker gets (:class:`SlideJob`) and what it
returns (:class:`SlideRow`, one summary row per slide). Rows are built here and nowhere else."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from napari_stpredict.errors import StPredictError
from napari_stpredict.io_utils import write_text_atomic

DONE_FILE = "done.json"
STORE_NAME = "predictions"  # OUT/<name>/predictions.zarr
ERROR_FILE = "error.log"
SUMMARY_FILE = "summary.json"
#: row statuses: finished now, finished before, failed, not run (cancelled)
STATUSES = ("done", "skipped", "failed", "cancelled")


@dataclasses.dataclass(frozen=True)
class SlideJob:
    """Everything one worker needs to predict one slide (picklable).

    Attributes
    ----------
    slide
        Slide path.
    name
        Output folder name under ``out`` (sanitised: never ``..``, never a path).
    model
        Model file path.
    model_sha256
        Digest of the model file (computed once by the client).
    out
        The cohort's output folder.
    exports
        Export names (:data:`~napari_stpredict.cohort.EXPORT_FORMATS`).
    stride_um
        Grid stride in µm (default: the patch size, no overlap).
    batch_size
        Patches per model call (default: the Predictor's).
    device
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
    mpp
        µm per pixel for a slide whose file does not record one (the file's value wins).
    min_tissue
        Minimum tissue fraction of a tile to be predicted.
    overwrite_exports
        Replace existing export files.
    skip_exports
        ``{export: reason}`` of exports known up front not to be possible with this model.
    tta
        Test-time augmentation for every slide (1, 2, 4 or 8; ``None``: the model file's).
    """

    slide: str
    name: str
    model: str
    model_sha256: str
    out: str
    exports: tuple[str, ...] = ()
    stride_um: float | None = None
    batch_size: int | None = None
    device: str = "auto"
    mpp: float | None = None
    min_tissue: float = 0.2
    overwrite_exports: bool = True
    skip_exports: tuple[tuple[str, str], ...] = ()
    tta: int | None = None

    @property
    def folder(self) -> Path:
        """``OUT/<name>``."""
        return Path(self.out) / self.name

    def config_key(self) -> dict[str, Any]:
        """What must match for a finished slide to be skipped on a rerun (``tta`` only when
        it overrides the model's, so markers of earlier runs still match)."""
        key: dict[str, Any] = {
            "slide": str(Path(self.slide).resolve()),
            "model_sha256": self.model_sha256,
            "stride_um": self.stride_um,
            "mpp": self.mpp,
            "min_tissue": self.min_tissue,
        }
        if self.tta is not None:
            key["tta"] = self.tta
        return key


def worker_name() -> str:
    """``host:pid`` of the process running a job (summary rows say where a slide ran)."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclasses.dataclass
class SlideRow(Mapping[str, Any]):
    """One slide of the summary (``summary.json``, the table, ``on_slide_done``).

    Read as a mapping too (``row["status"]``), so JSON and older callers see the same keys.

    Attributes
    ----------
    status
        ``"done"``, ``"skipped"``, ``"failed"`` or ``"cancelled"``.
    cells
        Tissue tiles of the slide (None when it failed before the grid was known).
    predicted
        Tiles predicted by this run.
    outputs
        ``{export: file name}`` written.
    export_errors
        ``{export: reason}`` of exports that could not be made (the slide is still done).
    notes
        Things the user should know that did not stop the slide (a store healed: tiles
        predicted again).
    """

    slide: str
    name: str
    status: str
    cells: int | None = None
    predicted: int = 0
    time_s: float | None = None
    error: str | None = None
    outputs: dict[str, str] = dataclasses.field(default_factory=dict)
    export_errors: dict[str, str] = dataclasses.field(default_factory=dict)
    worker: str | None = None
    model_cached: bool | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    # ---------------------------------------------------------------- the one place rows are made
    @classmethod
    def done(
        cls,
        job: SlideJob,
        *,
        cells: int,
        predicted: int,
        seconds: float,
        outputs: Mapping[str, str],
        export_errors: Mapping[str, str],
        model_cached: bool | None,
        notes: list[str] | None = None,
    ) -> SlideRow:
        """A slide predicted (and exported) by this run."""
        return cls(
            job.slide,
            job.name,
            "done",
            int(cells),
            int(predicted),
            round(seconds, 3),
            None,
            dict(outputs),
            dict(export_errors),
            worker_name(),
            model_cached,
            list(notes or []),
        )

    @classmethod
    def skipped(cls, job: SlideJob, marker: Mapping[str, Any], seconds: float) -> SlideRow:
        """A slide whose done marker (and store) says it is finished."""
        return cls(
            job.slide,
            job.name,
            "skipped",
            int(marker.get("cells", 0)),
            0,
            round(seconds, 3),
            None,
            dict(marker.get("outputs", {})),
            dict(marker.get("export_errors", {})),
            worker_name(),
            None,
        )

    @classmethod
    def failed(cls, job: SlideJob, err: BaseException, seconds: float) -> SlideRow:
        """A slide that failed: one line here, the traceback in ``OUT/<name>/error.log``."""
        msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
        if not isinstance(err, StPredictError):
            msg = f"{type(err).__name__}: {msg}" if msg else type(err).__name__
        from napari_stpredict.io_utils import OutputBusyError

        if not isinstance(err, OutputBusyError):  # that folder is another process's now
            write_error_log(job, err)
        return cls(job.slide, job.name, "failed", None, 0, round(seconds, 3), msg or "failed")

    @classmethod
    def cancelled(cls, job: SlideJob) -> SlideRow:
        """A slide the run did not reach (cancelled)."""
        return cls(job.slide, job.name, "cancelled")

    # ---------------------------------------------------------------- mapping view
    def to_dict(self) -> dict[str, Any]:
        """The JSON row of ``summary.json``."""
        return dataclasses.asdict(self)

    def __getitem__(self, key: str) -> Any:
        if key not in _FIELDS:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(_FIELDS)

    def __len__(self) -> int:
        return len(_FIELDS)


_FIELDS = tuple(f.name for f in dataclasses.fields(SlideRow))


def write_error_log(job: SlideJob, err: BaseException) -> None:
    """The traceback of a failed slide into ``OUT/<name>/error.log`` (best effort).

    Written atomically: a symlink planted at ``error.log`` is replaced, never followed.
    """
    from napari_stpredict.io_utils import confined, is_ours, mark_ours

    try:
        folder = confined(job.out, job.name)
        if not folder.is_dir() or folder.is_symlink():
            folder.mkdir(parents=False, exist_ok=False)
            mark_ours(folder, slide=job.slide)
        elif not is_ours(folder) and not (folder / DONE_FILE).exists():
            return  # not our folder: write nothing into it
        tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        write_text_atomic(folder / ERROR_FILE, tb)
    except (OSError, StPredictError):
        pass


def read_done(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The done marker of a slide folder, or None when absent or unreadable."""
    p = Path(folder) / DONE_FILE
    if p.is_symlink():
        return None
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def json_default(obj: Any) -> Any:
    """``json.dumps(default=...)`` for numpy scalars, paths and rows."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, SlideRow):
        return obj.to_dict()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically; a full disk is one :class:`~napari_stpredict.io_utils.WriteError`."""
    write_text_atomic(path, json.dumps(data, indent=2, default=json_default) + "\n")
