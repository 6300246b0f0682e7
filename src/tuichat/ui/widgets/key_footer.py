"""The key bar under every screen: Textual's `Footer`, rebuilt only when the keys it shows change.

Textual's Footer rebuilds all of its key widgets (compose, styles, layout: 20-30 ms for the chat's nine keys) each
time a screen's bindings are refreshed, and Textual refreshes them on every focus change as well as on each
`refresh_bindings()`. Opening a saved chat did that four times in a row, ahead of the chat's first screen
(bench/RESULTS.md). This one waits for the frame, then rebuilds once, and only if a key, its label, its state or
its tooltip differs from what is drawn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from textual.widgets import Footer

if TYPE_CHECKING:
    from textual.screen import Screen

KeyRow = tuple[tuple[str, str, str, str, bool, str], ...]


class KeyFooter(Footer):
    """A `Footer` that rebuilds at most once a frame, and only when what it shows changed."""

    _drawn: KeyRow | None = None  # the keys drawn by the last rebuild
    _pending = False  # a rebuild is asked for after this frame

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
        if self.is_attached and screen is self.screen and not self._pending:
            self._pending = True
            self.call_after_refresh(self._rebuild_if_changed)

    async def _rebuild_if_changed(self) -> None:
        self._pending = False
        if not self.is_attached:
            return
        shown = self.shown_keys()
        if shown != self._drawn:
            self._drawn = shown
            await self.recompose()
