"""File-system safety: atomic writes, confined output paths, ownership markers, locks, sweeps.

Every file or folder the package writes goes through :func:`atomic_path`: the data is written to
a temporary next to the target, named ``.stpredict-tmp-<target>-<pid>-<random><suffixes>``, and
renamed onto the target only when complete. A failed write (disk full, I/O error) becomes one
:class:`WriteError` line naming the target; the temporary is removed and the previous target is
kept. Temporaries left by a killed process are swept at the start of the next write of the same
target (:func:`sweep_temporaries`: only ours, only from processes that are gone and older than
this one).

Output folders and stores are replaced only when they carry our ownership marker
(:func:`is_ours`); an input that lies inside an output is refused (:func:`check_not_inside`);
an output name derived from user input is sanitised (:func:`safe_name`) and every path is proven
to lie inside its output folder (:func:`confined`). :func:`output_lock` is a per-output advisory
lock so a second process refuses in one line instead of corrupting the first.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from napari_stpredict.errors import StPredictError

#: prefix of every temporary file or folder written next to an output
TMP_PREFIX = ".stpredict-tmp-"
#: file in a folder output (OME-Zarr, a cohort slide folder) that says it was written by us
MARKER_FILE = ".stpredict-output"
#: attribute of a zarr group written by us (convert's OME-Zarr)
MARKER_ATTR = "stpredict_output"
#: names of lock files: ``.stpredict-lock-<output name>`` next to the output
LOCK_PREFIX = ".stpredict-lock-"
#: the wall-clock start of this process: temporaries newer than this may be someone else's
PROCESS_START = time.time()
_LEGACY_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-[0-9a-f]{8}")
_TMP_PID = re.compile(r"-(?P<pid>\d+)-[0-9a-f]{8}")


class WriteError(StPredictError):
    """An output could not be written (disk full, I/O error, read-only folder)."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


class OutputBusyError(StPredictError):
    """Another process is writing the same output."""


def describe_os_error(err: OSError) -> str:
    """``No space left on device (errno 28)``: the reason of an OSError, in one line."""
    reason = err.strerror or str(err) or type(err).__name__
    if err.errno:
        reason += f" (errno {err.errno})"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        reason += "; free some space and run again"
    return reason.splitlines()[0] if reason else type(err).__name__


def check_target(path: str | os.PathLike, *, overwrite: bool) -> Path:
    """Validate an output path before any work starts.

    Raises
    ------
    StPredictError
        If the target exists and ``overwrite`` is false, or its folder is missing or read-only.
    """
    target = Path(path)
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise StPredictError(f"{target}: already exists (pass overwrite=True / --overwrite)")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.exists():
        raise StPredictError(f"{target}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise StPredictError(f"{target}: folder {parent} is not writable")
    return target


# --------------------------------------------------------------------------------------------
# names and confinement


def safe_name(name: str, *, default: str = "slide") -> str:
    """A file-name-safe version of ``name``: no separators, no leading dots, never ``.``/``..``.

    >>> safe_name("...png"), safe_name("a/b c"), safe_name("..")
    ('slide', 'a_b_c', 'slide')
    """
    text = re.sub(r"[^\w.\-]+", "_", str(name)).strip("._ -")
    return text[:200] or default


def confined(root: str | os.PathLike, *parts: str) -> Path:
    """``root/parts...``, proven to lie inside ``root`` once symlinks are resolved.

    Raises
    ------
    StPredictError
        If a part is absolute, ``..``, or a symlink leads outside ``root``.
    """
    base = Path(root).resolve()
    path = base.joinpath(*parts)
    resolved = path.resolve()
    if resolved != base and base not in resolved.parents:
        raise StPredictError(
            f"{path}: resolves to {resolved}, outside the output folder {base} (refused)"
        )
    return path


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_not_inside(inputs: list[str | os.PathLike], output: str | os.PathLike, what: str) -> None:
    """Refuse an input that lies inside (or is, or contains) an output that may be replaced.

    Raises
    ------
    StPredictError
        Naming the input and the output.
    """
    out = Path(output).resolve()
    for raw in inputs:
        src = Path(raw).resolve()
        if _is_within(src, out) or _is_within(out, src):
            raise StPredictError(
                f"{raw}: the input lies inside the {what} {output} that would be written "
                "(choose another output location)"
            )


# --------------------------------------------------------------------------------------------
# ownership markers


def mark_ours(folder: str | os.PathLike, **info: object) -> None:
    """Write the ownership marker into a folder output we created."""
    p = Path(folder) / MARKER_FILE
    doc = {"owner": "napari-stpredict", "pid": os.getpid(), **info}
    p.write_text(json.dumps(doc, default=str) + "\n")


def is_ours(path: str | os.PathLike) -> bool:
    """True when ``path`` (a folder output) carries our ownership marker.

    Recognised: the :data:`MARKER_FILE`, a zarr group whose attributes hold
    :data:`MARKER_ATTR`, or the attributes of a :class:`PredictionStore`.
    """
    p = Path(path)
    if p.is_symlink():
        return False
    if p.is_file():
        return False
    if (p / MARKER_FILE).is_file():
        return True
    for meta in ("zarr.json", ".zattrs"):
        f = p / meta
        if not f.is_file():
            continue
        try:
            doc = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        attrs = doc.get("attributes", doc) if isinstance(doc, dict) else {}
        if isinstance(attrs, dict) and (MARKER_ATTR in attrs or "stpredict_store" in attrs):
            return True
    return False


def check_replaceable(path: str | os.PathLike) -> None:
    """Refuse to replace a folder that was not written by us (it may be a user's data).

    Files are left to ``check_target``/``--overwrite``; a folder is replaced only when marked.
    """
    p = Path(path)
    if p.is_symlink():
        raise StPredictError(f"{p}: is a symbolic link; refusing to replace it")
    if p.is_dir() and any(p.iterdir()) and not is_ours(p):
        raise StPredictError(
            f"{p}: exists and was not written by stpredict; refusing to replace it "
            "(move it away or choose another output)"
        )


# --------------------------------------------------------------------------------------------
# temporaries


def temp_name(target: Path, tag: str = "") -> Path:
    """The temporary path for ``target`` (same folder, recognisable prefix, same suffixes)."""
    tag = f"{tag}-" if tag else ""
    suffixes = "".join(target.suffixes[-2:]) if target.suffixes else ""
    return target.with_name(
        f"{TMP_PREFIX}{target.name}-{tag}{os.getpid()}-{uuid.uuid4().hex[:8]}{suffixes}"
    )


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        # a failed zarr write can still have chunk writes in flight on zarr's own event loop,
        # which recreate folders under a tree just removed: remove until it stays gone
        for _ in range(20):
            shutil.rmtree(p, ignore_errors=True)
            time.sleep(0.05)
            if not p.exists():
                break
    else:
        with contextlib.suppress(OSError):
            p.unlink()


def sweep_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove temporaries of ``target`` left by killed runs; return what was removed.

    Only entries named like our temporaries of this very target are touched, only when their
    process is gone (or unknown) and they are older than this process.
    """
    target = Path(target)
    folder = target.parent
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    ours = f"{TMP_PREFIX}{target.name}-"
    for entry in entries:
        name = entry.name
        if name.startswith(ours):
            m = _TMP_PID.match(name[len(ours) - 1 :]) or _TMP_PID.search(name[len(ours) - 1 :])
            pid = int(m.group("pid")) if m else None
        else:
            legacy = _LEGACY_TMP.match(name)
            if not legacy or legacy.group("name") != target.name:
                continue
            pid = None
        try:
            mtime = entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if mtime >= PROCESS_START or (pid is not None and _pid_alive(pid)):
            continue
        _remove(Path(entry.path))
        removed.append(Path(entry.path))
    return removed


#: scratch folders of ``convert`` from versions before the per-output temporaries
_LEGACY_PYRAMID = ".stpredict-pyramid-"
#: a legacy scratch folder untouched this long is a leftover, not a running conversion
_LEGACY_AGE_S = 3600.0


def sweep_legacy_scratch(folder: str | os.PathLike) -> list[Path]:
    """Remove ``.stpredict-pyramid-*`` folders of older versions left by killed conversions.

    They carry no process id, so only those untouched for an hour before this process started
    are removed.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(_LEGACY_PYRAMID) or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            if entry.stat(follow_symlinks=False).st_mtime >= PROCESS_START - _LEGACY_AGE_S:
                continue
        except OSError:
            continue
        _remove(Path(entry.path))
        removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds.

    Works for files and folders (e.g. a ``.zarr`` store). On error or cancel the temporary is
    removed, so an interrupted write never leaves a truncated file under the final name and the
    previous ``path`` is kept. An ``OSError`` (disk full, I/O error) becomes one
    :class:`WriteError` line naming ``path``. A folder target is replaced only when it is ours
    (:func:`check_replaceable`); a symlink at ``path`` is replaced, never followed.

    Examples
    --------
    >>> with atomic_path("out.csv") as tmp:  # doctest: +SKIP
    ...     tmp.write_text("a,b\\n")
    """
    target = check_target(path, overwrite=overwrite)
    if target.is_dir() and not target.is_symlink():
        check_replaceable(target)
    sweep_temporaries(target)
    # keep the suffixes so writers that dispatch on the extension still work
    tmp = temp_name(target)
    try:
        yield tmp
        old = None
        if target.is_dir() and not target.is_symlink():
            # move the old folder aside first: a rename is atomic, a delete is not
            old = temp_name(target, "old")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            _remove(old)
    except OSError as err:
        _remove(tmp)
        reason = describe_os_error(err)
        raise WriteError(f"{target}: could not be written: {reason}", reason) from None
    except BaseException:
        _remove(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a small text file atomically (a planted symlink is replaced, never followed)."""
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


# --------------------------------------------------------------------------------------------
# locks


@contextlib.contextmanager
def output_lock(
    path: str | os.PathLike, *, timeout: float = 0.0, what: str = "output"
) -> Iterator[None]:
    """Hold an advisory lock on an output for the block (``.stpredict-lock-<name>`` beside it).

    A second process asking for the same output waits up to ``timeout`` seconds, then refuses
    with one :class:`OutputBusyError` line; it never writes into the first one's output. The
    lock file exists only while the lock is held (POSIX: removed by its holder before release,
    and a waiter re-checks that the file it locked is still the one on disk).
    """
    target = Path(path)
    if not target.parent.is_dir():
        raise StPredictError(f"{target}: folder {target.parent} does not exist")
    lock_path = target.with_name(f"{LOCK_PREFIX}{target.name}")
    busy = OutputBusyError(
        f"{target}: another stpredict process is writing this {what}; "
        "wait for it to finish or choose another output"
    )
    try:
        import fcntl
    except ImportError:  # Windows: filelock's msvcrt lock (the file stays)
        from filelock import FileLock, Timeout

        lock = FileLock(str(lock_path), timeout=timeout, thread_local=False)
        try:
            lock.acquire()
        except Timeout:
            raise busy from None
        try:
            yield
        finally:
            lock.release()
        return
    fd = _posix_lock(lock_path, timeout, busy, fcntl)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)  # closing releases the lock


def _posix_lock(lock_path: Path, timeout: float, busy: Exception, fcntl) -> int:
    deadline = time.monotonic() + max(0.0, timeout)
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as err:
            if err.errno == errno.ELOOP:  # a symlink planted at the lock's name
                _remove(lock_path)
                continue
            raise WriteError(
                f"{lock_path}: cannot create the lock file: {describe_os_error(err)}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() >= deadline:
                raise busy from None
            time.sleep(0.1)
            continue
        try:
            same = os.stat(lock_path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            with contextlib.suppress(OSError):
                os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)  # the holder removed it between our open and our lock: try again


def free_bytes(folder: str | os.PathLike) -> int | None:
    """Free bytes on the file system holding ``folder`` (None when unknown)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def check_free_space(path: str | os.PathLike, needed: int, what: str) -> None:
    """Refuse up front when the file system of ``path`` has clearly less than ``needed`` bytes."""
    free = free_bytes(Path(path).parent)
    if free is not None and free < needed:
        reason = (
            f"not enough free space: about {needed / 1e6:.1f} MB needed, {free / 1e6:.1f} MB free"
        )
        raise WriteError(f"{path}: {reason} for the {what}", reason)
