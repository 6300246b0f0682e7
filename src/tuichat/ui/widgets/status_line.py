"""The one-line status under the chat: connection state, server, model, and the last reply's figures."""

from __future__ import annotations

from typing import Any

from textual.content import Content
from textual.widgets import Static


class StatusLine(Static):
    """One line: connection state, server, model, and the last reply's speed and token use."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("", markup=False, **kwargs)
        self.state = "connecting"
        self.url = ""
        self.model = ""
        self.last = ""
        self.extra = ""

    def set(
        self,
        *,
        state: str | None = None,
        url: str | None = None,
        model: str | None = None,
        last: str | None = None,
        extra: str | None = None,
    ) -> None:
        """Change some parts of the line; the others stay as they are."""
        self.state = self.state if state is None else state
        self.url = self.url if url is None else url
        self.model = self.model if model is None else model
        self.last = self.last if last is None else last
        self.extra = self.extra if extra is None else extra
        self.refresh_line()

    def refresh_line(self) -> None:
        # the terminal's own colours, as in a Rich Text (to Content, a bare "green" is the CSS colour)
        colours = {
            "ready": "ansi_green",
            "streaming": "ansi_cyan",
            "connecting": "ansi_yellow",
            "starting": "ansi_yellow",
        }
        colour = colours.get(self.state.split(":")[0], "ansi_red")
        # Textual's own Content, not a Rich Text: it is drawn without Rich's console (the line is in the frame of
        # every reply's first word, where a Rich Text cost ~0.8 ms to draw)
        pieces: list[str | tuple[str, str]] = [("● ", colour), (self.state, colour)]
        for part in (self.url.removeprefix("http://"), self.model, self.last, self.extra):
            if part:
                pieces += [(" · ", "dim"), part]
        line = Content.assemble(*pieces).truncate(max(10, self.size.width or 200), ellipsis=True)
        # one row as wide as the screen (chat.tcss) whatever it says: a repaint, not a layout of the whole screen
        self.update(line, layout=False)

    def on_resize(self) -> None:
        self.refresh_line()
