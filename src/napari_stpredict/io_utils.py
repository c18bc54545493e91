"""Small file-system helpers: atomic writes and overwrite checks."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from napari_stpredict.errors import StPredictError


def check_target(path: str | os.PathLike, *, overwrite: bool) -> Path:
    """Validate an output path before any work starts.

    Raises
    ------
    StPredictError
        If the target exists and ``overwrite`` is false, or its folder is missing or read-only.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise StPredictError(f"{target}: already exists (pass overwrite=True / --overwrite)")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.exists():
        raise StPredictError(f"{target}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise StPredictError(f"{target}: folder {parent} is not writable")
    return target


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds.

    Works for files and folders (e.g. a ``.zarr`` store). On error or cancel the temporary is
    removed, so an interrupted write never leaves a truncated file under the final name.

    Examples
    --------
    >>> with atomic_path("out.csv") as tmp:  # doctest: +SKIP
    ...     tmp.write_text("a,b\\n")
    """
    target = check_target(path, overwrite=overwrite)
    # keep the suffixes so writers that dispatch on the extension still work
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}{''.join(target.suffixes)}")
    try:
        yield tmp
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise
