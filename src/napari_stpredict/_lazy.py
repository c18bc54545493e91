"""Lazy package attributes: names imported from their module on first use (PEP 562).

``import napari_stpredict`` runs at napari's plugin scan and ``stpredict --help`` on every
call, so packages keep torch, timm, scikit-image and zarr writing code out of their import.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_getattr"]


def lazy_getattr(package: str, where: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports each name of ``where`` (name →
    module) when it is first asked for.

    Examples
    --------
    >>> __getattr__ = lazy_getattr(__name__, {"train": "napari_stpredict.training.run"})
    """

    def __getattr__(name: str) -> Any:
        if name in where:
            return getattr(importlib.import_module(where[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
