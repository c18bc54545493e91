"""Removing heatmaps with colour bars and drawing more layers must not crash napari.

napari 0.9.2 / vispy 0.17 under Xvfb (Mesa) segfaults when the last text visual on a canvas (a
colour bar's labels, a legend) is removed and any layer is drawn afterwards;
``widgets._common.keep_text_alive`` keeps one transparent text overlay drawn. The scenario runs
in a child process, so a crash fails this test instead of the whole session.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCENARIO = r"""
import sys, time
import numpy as np
import napari
from qtpy.QtWidgets import QApplication
from napari_stpredict.widgets._common import keep_text_alive
from napari_stpredict.widgets._heatmaps import set_legend

def pump(seconds):
    end = time.time() + seconds
    while time.time() < end:
        QApplication.processEvents()
        time.sleep(0.02)

viewer = napari.Viewer(show=True)
viewer.window.resize(900, 700)
viewer.add_image(np.random.default_rng(0).random((1500, 1500), dtype=np.float32), name="slide")
keep_text_alive(viewer)
keep_text_alive(viewer)  # idempotent
for round_ in range(2):
    heat = viewer.add_image(np.full((25, 25), np.nan, np.float32), scale=(60, 60),
                            colormap="magma", contrast_limits=(0, 1), name=f"ERBB2 {round_}")
    set_legend(heat, "ERBB2\nln(1 + counts per 10,000)", visible=True)
    pump(0.8)
    viewer.layers.remove(heat)  # the last colour bar goes
    pump(0.5)
viewer.add_points(np.random.default_rng(1).random((20, 2)) * 1500, name="spots")
again = viewer.add_image(np.random.default_rng(2).random((25, 25), dtype=np.float32),
                         scale=(60, 60), colormap="magma", name="GRB7")
set_legend(again, "GRB7\nln(1 + counts per 10,000)", visible=True)
pump(0.8)
shot = viewer.screenshot(canvas_only=True)
print("drawn", int(shot[..., :3].std() > 5), len(viewer.canvas.overlays), flush=True)
viewer.close()
"""


@pytest.mark.skipif(not os.environ.get("DISPLAY"), reason="needs a display (xvfb-run -a)")
def test_removing_colour_bars_then_drawing_does_not_crash(tmp_path):
    script = tmp_path / "scenario.py"
    script.write_text(SCENARIO)
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"napari crashed (rc {proc.returncode}): {proc.stderr[-2000:]}"
    assert "drawn 1" in proc.stdout, proc.stdout  # a real canvas, not a black one


def test_heatmaps_keep_a_text_visual_alive(c3_scene):
    from napari_stpredict.widgets._common import TEXT_KEEPALIVE_KEY

    scene = c3_scene()
    overlay = scene.viewer.canvas.overlays[TEXT_KEEPALIVE_KEY]
    assert overlay.visible and overlay.opacity == 0.0 and overlay.text == " "
