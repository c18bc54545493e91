"""CLI sub-commands (being written: see the owning issue)."""

from __future__ import annotations

from napari_stpredict.cli import app  # noqa: F401
