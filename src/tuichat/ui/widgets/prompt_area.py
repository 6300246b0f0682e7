"""The prompt: a multi-line TextArea where Enter sends, the newline keys add a line and pastes never send.

Its cursor blinks only while someone is typing: after `BLINK_REST_S` without a key it stays lit and still, as
terminals' cursors do, because each blink is a redraw and a write to the terminal (most of an idle chat's CPU).
The next key, paste, click or focus starts it blinking again.

TextArea works out its theme's fallback styles from CSS at every render (~1 ms: a dozen component styles); the
prompt renders at each key, at Enter and at each blink, so it does that once per style change instead.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

from textual import events
from textual.binding import BindingType
from textual.geometry import Region
from textual.message import Message
from textual.strip import Strip
from textual.widgets import TextArea

from tuichat.keymap import keys_for
from tuichat.ui.keyids import binding


def _has_command_modifier(key: str) -> bool:
    *modifiers, _base = key.split("+")
    return bool(set(modifiers) & {"ctrl", "alt", "meta", "super", "hyper"})


class PromptArea(TextArea):
    """Multi-line prompt: Enter sends; Ctrl+J or Shift+Enter inserts a newline; pastes never send.

    A key with Ctrl or Alt never types: Textual reports some of them with a printable character (Alt+U as "u"),
    and the TextArea would insert it instead of letting the app's binding act.
    """

    BINDINGS: ClassVar[list[BindingType]] = [binding("newline", show=False)]

    # TextArea's own F6 ("select line") would shadow the app's undo key; the prompt gives it up.
    GIVEN_UP: ClassVar[frozenset[str]] = frozenset({"select_line"})

    # The newline keys act here, at once: a binding runs only after the key bubbled up to the app, and
    # characters typed right after it would land before the new line. The app sets these from the keymap.
    newline_keys: frozenset[str] = frozenset(keys_for("newline"))

    _theme_styled: object | None = None  # the theme whose fallback styles were last read from CSS

    BLINK_REST_S: ClassVar[float] = 10.0  # seconds without a key after which the cursor stops blinking

    class Submitted(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", **kwargs)
        self._last_activity = time.monotonic()

    def notify_style_update(self) -> None:
        self._theme_styled = None  # a CSS, focus or app-theme change: the theme's fallbacks are read again
        super().notify_style_update()

    def render_lines(self, crop: Region) -> list[Strip]:
        theme = self._theme
        if theme is not None and theme is not self._theme_styled:
            theme.apply_css(self)  # what TextArea.render_lines does each time
            self._theme_styled = theme
        return super(TextArea, self).render_lines(crop)  # past TextArea's own, which would read them again

    @property
    def blinking(self) -> bool:
        """Whether the cursor is blinking now (False once it rests, or when blinking is off or unfocused)."""
        return self.is_mounted and self.blink_timer._active.is_set()

    def _restart_blink(self) -> None:
        # TextArea calls this on every key, paste, click and focus: each one is activity that wakes the cursor.
        self._last_activity = time.monotonic()
        super()._restart_blink()  # its timer reset() also wakes a timer paused by resting

    def _toggle_cursor_blink_visible(self) -> None:
        # The blink timer's own tick checks for rest, so resting needs no timer of its own.
        if time.monotonic() - self._last_activity >= self.BLINK_REST_S:
            self._pause_blink(visible=True)
            return
        super()._toggle_cursor_blink_visible()

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            # A paste arrives as one Paste event, not as key presses, so pasted newlines never get here.
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self.text))
            return
        if event.key in self.newline_keys:
            event.stop()
            event.prevent_default()
            self.action_newline()
            return
        if _has_command_modifier(event.key):
            # Typed nowhere, and still on its way to the bindings (prevent_default would stop those too).
            event.character = None
        await super()._on_key(event)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in self.GIVEN_UP:
            return False  # the key goes on to the app's bindings
        return super().check_action(action, parameters)

    def action_newline(self) -> None:
        self.insert("\n")
