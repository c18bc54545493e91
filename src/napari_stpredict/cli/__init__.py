"""The ``stpredict`` command: a thin face over the core.

Each sub-command lives in its own module and registers itself on :data:`app`. Every
:class:`~napari_stpredict.errors.StPredictError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys

import typer

from napari_stpredict import __version__
from napari_stpredict.cli._options import flags_without_metavar
from napari_stpredict.errors import Cancelled, StPredictError

flags_without_metavar()

app = typer.Typer(
    name="stpredict",
    help="Predict spatial gene expression from H&E whole-slide images (CMRCNet).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"napari-stpredict {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Show the version."
    ),
) -> None:
    """Predict spatial gene expression from H&E whole-slide images (CMRCNet)."""


# Sub-commands register themselves on ``app`` when imported.
from napari_stpredict.cli import (  # noqa: E402, F401
    demo_cmd,
    evaluate_cmd,
    predict_cmd,
    slide_cmds,
    train_cmd,
    view_cmd,
)


def _sigterm_as_interrupt() -> None:
    """SIGTERM stops the command like Ctrl-C: temporaries are removed, committed work is kept."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError, AttributeError):  # not the main interpreter / platform
        pass


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit code (0 ok, 1 failures reported, 2 bad input, 130 cancel)."""
    _sigterm_as_interrupt()
    try:
        rv = app(args=argv, standalone_mode=False)
    except StPredictError as err:
        if isinstance(err, Cancelled):
            print(f"stpredict: cancelled: {err}", file=sys.stderr)
            return 130
        print(f"stpredict: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stpredict: cancelled", file=sys.stderr)
        return 130
    except OSError as err:
        # a full disk or an I/O error that no writer turned into a one-line error itself
        from napari_stpredict.io_utils import describe_os_error

        where = f"{err.filename}: " if getattr(err, "filename", None) else ""
        print(f"stpredict: error: {where}{describe_os_error(err)}", file=sys.stderr)
        return 2
    except MemoryError:
        print(
            "stpredict: error: out of memory (use a coarser --stride-um or fewer workers)",
            file=sys.stderr,
        )
        return 2
    except typer.Exit as ex:
        return ex.exit_code
    except Exception as ex:  # click usage errors and aborts
        # typer >= 0.17 vendors its own click: match both copies of the exception classes
        names = {cls.__name__ for cls in type(ex).__mro__}
        if "ClickException" in names:
            ex.show()  # type: ignore[attr-defined]
            return int(getattr(ex, "exit_code", 2))
        if "Abort" in names:
            print("stpredict: cancelled", file=sys.stderr)
            return 130
        if "Exit" in names:
            return int(getattr(ex, "exit_code", 0))
        raise
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
