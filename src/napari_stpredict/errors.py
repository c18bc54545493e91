"""Exceptions shared by the core, the CLI and the widgets.

Every user-facing failure is a :class:`StPredictError` (or subclass) whose message is one line
naming the file or value and the reason. The CLI prints ``str(err)`` and exits 2; the widgets
show it as a napari notification.
"""

from __future__ import annotations


class StPredictError(Exception):
    """A user-facing error: bad input, unreadable file, impossible request."""


class SlideError(StPredictError):
    """A slide cannot be opened or read (missing, unknown format, corrupt, unsupported pixels)."""


class DatasetError(StPredictError):
    """A dataset manifest or spatial transcriptomics section is invalid."""


class ModelFileError(StPredictError):
    """A model file is missing, corrupt, not ours, or from an incompatible version."""


class Cancelled(StPredictError):
    """Long work was cancelled by the user."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type name when the message is empty."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
