"""A widget's virtual size kept without a second layout, for the widgets a streaming reply grows.

Textual stores each widget's virtual size as a reactive that asks for a layout whenever it changes. It only ever
changes during a layout, so the layout it asks for is a second one, in the next frame, that changes nothing but
repaints the whole message list again. Each step a streaming paragraph grew by cost two layouts and two full
repaints of the conversation (bench/RESULTS.md). The containers that grow with it (the reply, its Markdown, the
list around them) keep the virtual size as a plain value instead; their scrollbars are updated by the layout
itself.
"""

from __future__ import annotations

from textual.geometry import Size
from textual.reactive import Reactive


def virtual_size_without_relayout() -> Reactive[Size]:
    """A `virtual_size` for a container class: set by Textual's layout, asking for no layout of its own."""
    return Reactive(Size(0, 0), layout=False, repaint=False)
