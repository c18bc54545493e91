"""Qt building blocks shared by the docks: a scrolling body and collapsible sections.

Every dock puts its sections in a :class:`DockBody` (a scroll area): the three docks then fit a
1920 × 1080 screen together, each scrolling instead of growing the window.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qtpy.QtCore import QSize, Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QFormLayout,
    QFrame,
    QHBoxLayout,
    QLineEdit,
    QPushButton,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

#: Most height a dock asks for (its contents scroll beyond it).
MAX_HINT_HEIGHT = 420
#: Least height a dock needs.
MIN_HEIGHT = 120


class DockBody(QScrollArea):
    """A vertical scroll area holding a dock's sections; small size hints by design."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.inner = QWidget()
        self.layout_ = QVBoxLayout(self.inner)
        self.layout_.setContentsMargins(4, 4, 4, 4)
        self.setWidget(self.inner)

    def add(self, widget: QWidget, stretch: int = 0) -> QWidget:
        self.layout_.addWidget(widget, stretch)
        return widget

    def sizeHint(self) -> QSize:
        hint = self.inner.sizeHint()
        return QSize(hint.width() + 16, min(hint.height() + 8, MAX_HINT_HEIGHT))

    def minimumSizeHint(self) -> QSize:
        return QSize(min(self.inner.minimumSizeHint().width() + 16, 360), MIN_HEIGHT)


def section(title: str, content: QWidget, *, expanded: bool = True) -> QWidget:
    """A collapsible section (superqt's QCollapsible) around ``content``."""
    from superqt import QCollapsible

    box = QCollapsible(title)
    box.addWidget(content)
    box.layout().setContentsMargins(0, 0, 0, 0)
    if expanded:
        box.expand(animate=False)
    else:
        box.collapse(animate=False)
    return box


def dock_layout(widget: QWidget) -> DockBody:
    """Give ``widget`` a scrolling body and return it."""
    outer = QVBoxLayout(widget)
    outer.setContentsMargins(0, 0, 0, 0)
    body = DockBody(widget)
    outer.addWidget(body)
    return body


def spin_box(
    cls: type,
    lo: float,
    hi: float,
    *,
    tooltip: str,
    step: float | None = None,
    decimals: int | None = None,
    special: str | None = None,
    suffix: str | None = None,
) -> Any:
    """A ``QSpinBox``/``QDoubleSpinBox`` (``cls``) over ``[lo, hi]`` with the given settings."""
    spin = cls()
    if decimals is not None:
        spin.setDecimals(decimals)
    spin.setRange(lo, hi)
    if step is not None:
        spin.setSingleStep(step)
    if special is not None:
        spin.setSpecialValueText(special)
    if suffix is not None:
        spin.setSuffix(suffix)
    spin.setToolTip(tooltip)
    return spin


def check_box(text: str, on_toggle: Callable[[bool], Any], *, checked: bool = False) -> QCheckBox:
    """A check box (ticked when ``checked``, set before ``on_toggle`` is connected)."""
    box = QCheckBox(text)
    if checked:
        box.setChecked(True)
    box.toggled.connect(on_toggle)
    return box


def push_button(
    text: str, on_click: Callable[..., Any], *, tooltip: str | None = None, enabled: bool = True
) -> QPushButton:
    """A push button calling ``on_click`` (with an optional tooltip; disabled unless
    ``enabled``)."""
    button = QPushButton(text)
    if tooltip is not None:
        button.setToolTip(tooltip)
    button.clicked.connect(on_click)
    button.setEnabled(enabled)
    return button


def button_row(*widgets: QWidget, stretch: tuple[int, ...] | None = None) -> QHBoxLayout:
    """``widgets`` side by side (``stretch``: one factor each; default none)."""
    row = QHBoxLayout()
    for k, widget in enumerate(widgets):
        row.addWidget(widget, stretch[k] if stretch is not None else 0)
    return row


def path_row(
    edit: QLineEdit, text: str, on_browse: Callable[[], Any], *, tooltip: str | None = None
) -> QHBoxLayout:
    """``edit`` with a browse button (``text``, calling ``on_browse``) at its right."""
    return button_row(edit, push_button(text, on_browse, tooltip=tooltip), stretch=(1, 0))


def form_spin(
    form: QFormLayout,
    label: str,
    cls: type,
    lo: float,
    hi: float,
    on_change: Callable[..., Any],
    *,
    signal: str = "valueChanged",
    **settings: Any,
) -> Any:
    """A :func:`spin_box` added to ``form`` as the row ``label``, ``signal`` → ``on_change``.

    ``settings`` are :func:`spin_box`'s keywords (``tooltip`` at least); ``signal`` is
    ``"valueChanged"`` (every step) or ``"editingFinished"`` (Enter / focus out).
    """
    spin = spin_box(cls, lo, hi, **settings)
    getattr(spin, signal).connect(on_change)
    form.addRow(label, spin)
    return spin
