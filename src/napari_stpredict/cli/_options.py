"""Options shared by several commands, spelt once (same flag, same help everywhere)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from napari_stpredict.errors import StPredictError

#: µm per pixel for slides whose file records none
Mpp = Annotated[
    float | None,
    typer.Option(
        "--mpp",
        help="µm per pixel for slides whose file records none (JPEG/PNG); others keep theirs.",
        show_default=False,
    ),
]

#: µm per pixel that replaces the file's own (a single slide: info, view)
MppOverride = Annotated[
    float | None,
    typer.Option("--mpp", help="µm per pixel, overriding the file.", show_default=False),
]

#: the model file of a prediction
ModelFile = Annotated[
    Path | None,
    typer.Option(
        "--model",
        "-m",
        help="Model file (.safetensors) from `stpredict train`.",
        show_default=False,
    ),
]

#: grid stride of a prediction
StrideUm = Annotated[
    float | None,
    typer.Option(
        "--stride-um",
        help="Grid stride in µm (default: the model's patch size).",
        show_default=False,
    ),
]

#: replace an existing output written by stpredict
Overwrite = Annotated[
    bool,
    typer.Option("--overwrite", help="Replace an existing output (only one written by stpredict)."),
]

#: torch device
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]

#: JSON on stdout
AsJson = Annotated[
    bool, typer.Option("--json", help="Print the result as JSON on stdout (progress on stderr).")
]


def flags_without_metavar() -> None:
    """Show boolean flags as flags in ``--help`` (typer prints ``--json <bool>`` otherwise)."""
    from typer import core

    cls = core.TyperOption
    original = getattr(cls, "display_type_rich", None)
    if original is None or getattr(cls, "_stpredict_flag_display", False):
        return  # older typer (< 0.29) shows flags as flags already, or patched before

    def display_type_rich(self, ctx):  # type: ignore[no-untyped-def]
        if getattr(self, "is_flag", False) or getattr(self, "is_bool_flag", False):
            return None
        return original(self, ctx)

    cls.display_type_rich = display_type_rich  # type: ignore[method-assign]
    cls._stpredict_flag_display = True  # type: ignore[attr-defined]


def split_commas(values: str | Sequence[str] | None) -> list[str]:
    """``"A,B"`` (or repeated options, each comma-separated) → ``["A", "B"]``; empty entries
    are dropped."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [part.strip() for v in values for part in v.split(",") if part.strip()]


def json_object_option(flag: str, text: str | None) -> dict[str, Any] | None:
    """The JSON object given to ``flag`` (``None`` when not given); one line when it is not
    valid JSON or not an object."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise StPredictError(f"{flag}: not valid JSON ({err.msg})") from None
    if not isinstance(value, dict):
        raise StPredictError(f"{flag}: expected a JSON object")
    return value


def train_config(options: Mapping[str, Any]) -> Any:
    """A :class:`~napari_stpredict.training.TrainConfig` with the given options over its own
    defaults (``None`` = keep the default), so every training default is written once, in
    ``training/config.py``; an option the config lacks is one line."""
    from napari_stpredict.training import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - names)
    if unknown:
        opts = ", ".join("--" + k.replace("_", "-") for k in unknown)
        raise StPredictError(f"{opts}: not a training option of this version")
    return dataclasses.replace(TrainConfig(), **given)
