"""The key bar under every screen: Textual's `Footer`, rebuilt only when the keys it shows change.

Textual's Footer rebuilds all of its key widgets (compose, styles, layout: 20-30 ms for the chat's nine keys) each
time a screen's bindings are refreshed, and Textual refreshes them on every focus change as well as on each
`refresh_bindings()`. Opening a saved chat did that four times in a row, ahead of the chat's first screen
(bench/RESULTS.md). This one waits for the frame, then rebuilds once, and only if a key, its label or its
tooltip differs from what is drawn. When only keys' states changed (Retry and Undo once a chat has turns), the
drawn keys are greyed or lit in place: a restored chat did that rebuild between its first frame and its history.
The first build (the keys are not composed before the first bindings refresh) waits while a screen says it is
`restoring` a saved chat: it took 30-50 ms, and it came before the chat's turns about every other start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from textual.widgets import Footer
from textual.widgets._footer import FooterKey

if TYPE_CHECKING:
    from textual.app import ComposeResult
    from textual.screen import Screen

KeyRow = tuple[tuple[str, str, str, str, bool, str], ...]


class KeyFooter(Footer):
    """A `Footer` that rebuilds at most once a frame, and only when what it shows changed."""

    _drawn: KeyRow | None = None  # the keys drawn by the last rebuild
    _pending = False  # a rebuild is asked for after this frame

    def compose(self) -> ComposeResult:
        # Each key Textual's Footer makes starts compact, then takes the footer's own setting when it mounts: two
        # class changes, each restyling the key and its two parts through the whole stylesheet (two of the three
        # style passes the bar's keys took, ~5 ms for the chat's nine). Made in their final state, they are styled
        # once. (The palette's key is not bound to the footer's setting: it stays compact.)
        for widget in super().compose():
            if isinstance(widget, FooterKey):
                compact = True if widget.has_class("-command-palette") else self.compact
                widget.set_reactive(FooterKey.compact, compact)
                widget.set_class(compact, "-compact", update=False)
            yield widget

    def shown_keys(self) -> KeyRow:
        """What the bar shows now: each shown key's key, label, description, action, state and tooltip."""
        app = self.app
        return tuple(
            (binding.key, app.get_key_display(binding), binding.description, binding.action, enabled, tooltip)
            for _node, binding, enabled, tooltip in self.screen.active_bindings.values()
            if binding.show or binding.key == app.COMMAND_PALETTE_BINDING
        )

    def bindings_changed(self, screen: Screen[Any]) -> None:
        self._bindings_ready = True
        if not screen.app.app_focus:
            return
        if getattr(screen, "restoring", False):
            return  # a saved chat is being drawn at start-up: the screen asks again once its turns are out
        if self.is_attached and screen is self.screen and not self._pending:
            self._pending = True
            self.call_after_refresh(self._rebuild_if_changed)

    async def _rebuild_if_changed(self) -> None:
        self._pending = False
        if not self.is_attached or getattr(self.screen, "restoring", False):
            return  # asked for before the restore began (the prompt's focus), run during it: the screen asks again
        shown, drawn = self.shown_keys(), self._drawn
        if shown == drawn:
            return
        self._drawn = shown
        if drawn is not None and _same_keys(shown, drawn):
            enabled: dict[str, bool] = {}
            for _key, _display, _description, action, on, _tooltip in shown:
                enabled.setdefault(action, on)  # Footer draws each action once, with its first binding
            for key in self.query(FooterKey).results():
                off = not enabled.get(key.action, True)
                if key._disabled != off:
                    key._disabled = off  # what a click on it checks
                    key.set_class(off, "-disabled")
            return
        await self.recompose()


def _same_keys(a: KeyRow, b: KeyRow) -> bool:
    """The same keys, labels, actions and tooltips, in the same order: only states may differ."""
    return len(a) == len(b) and all(x[:4] == y[:4] and x[5] == y[5] for x, y in zip(a, b, strict=True))
