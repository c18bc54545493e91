"""The `stpredict` entry point: usage errors and bad input are one line + exit 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys

from napari_stpredict import __version__
from napari_stpredict.cli import main


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "napari_stpredict", *args],
        capture_output=True,
        text=True,
        check=False,
    )


def test_version(capsys) -> None:
    assert main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out


def test_missing_argument_is_a_usage_error_not_a_traceback() -> None:
    res = _run("train")
    assert res.returncode == 2
    assert "Missing argument" in res.stderr
    assert "Traceback" not in res.stderr


def test_unknown_command_and_missing_file() -> None:
    res = _run("no-such-command")
    assert res.returncode == 2
    assert "No such command" in res.stderr
    res = _run("info", "/definitely/not/here.svs")
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "/definitely/not/here.svs" in lines[0]
    assert "Traceback" not in res.stderr
