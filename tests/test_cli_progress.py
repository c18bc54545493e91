"""The CLI has one progress adapter (cli/_progress.Bars); every command uses it."""

from __future__ import annotations

from pathlib import Path

import napari_stpredict.cli as cli_pkg


def test_no_cli_command_builds_its_own_rich_progress():
    folder = Path(cli_pkg.__file__).parent
    own = [
        p.name
        for p in sorted(folder.glob("*.py"))
        if p.name != "_progress.py" and "rich.progress" in p.read_text(encoding="utf-8")
    ]
    assert own == [], f"use napari_stpredict.cli._progress.Bars instead in {own}"


def test_evaluate_progress_feeds_the_shared_bars():
    from napari_stpredict.cli._progress import Bars
    from napari_stpredict.cli.evaluate_cmd import _progress_pair

    with Bars(enabled=False) as bars:
        outer, inner = _progress_pair(bars)
        outer(0, 4, "fold 1 · ridge")
        inner(3, 10, "step")
        assert set(bars._tasks) == {"folds", "training"}
        training = {t.id: t for t in bars.progress.tasks}[bars._tasks["training"]]
        assert (training.completed, training.total) == (3, 10)
        outer(1, 4, "fold 2 · ridge")  # the next unit: its training bar starts again
        assert set(bars._tasks) == {"folds"}
        folds = {t.id: t for t in bars.progress.tasks}[bars._tasks["folds"]]
        assert (folds.completed, folds.total) == (1, 4)
        inner(1, 10)
        assert "training" in bars._tasks


def test_bars_draw_nothing_before_the_first_bar(capsys):
    """An error raised before any progress leaves stderr as one line."""
    import pytest

    from napari_stpredict.cli._progress import Bars

    with pytest.raises(RuntimeError), Bars():
        raise RuntimeError("bad input")
    assert capsys.readouterr().err == ""
    with Bars(unit="slides") as bars:
        bars.update("a", 1, 2, "x")
    assert "1/2" in capsys.readouterr().err
