"""The `stpredict` entry point: usage errors and bad input are one line + exit 2, never a traceback."""

from __future__ import annotations

import os
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


def test_train_help_shows_train_config_defaults_without_torch() -> None:
    """Each training flag shows TrainConfig's own default (written once, in training/config.py),
    and building the help does not import torch (it costs > 1 s per call)."""
    from napari_stpredict.training.config import TrainConfig

    probe = (
        "import sys\n"
        "from napari_stpredict.cli import main\n"
        "try:\n"
        "    main(['train', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('TORCH', 'torch' in sys.modules)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert "TORCH False" in res.stdout, res.stdout[-500:] + res.stderr[-500:]
    cfg = TrainConfig()
    lines = res.stdout.splitlines()  # 200 columns: one line per option
    for flag in ("--method", "--backbone", "--epochs", "--tta", "--context", "--top-k"):
        value = getattr(cfg, flag[2:].replace("-", "_"))
        line = next(ln for ln in lines if f" {flag} " in ln)
        assert f"[default: ({value})]" in line, line
