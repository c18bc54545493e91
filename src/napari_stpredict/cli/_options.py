"""Options shared by several commands, spelt once (same flag, same help everywhere)."""

from __future__ import annotations

from typing import Annotated

import typer

#: µm per pixel for slides whose file records none
Mpp = Annotated[
    float | None,
    typer.Option(
        "--mpp",
        help="µm per pixel for slides whose file records none (JPEG/PNG); others keep theirs.",
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
