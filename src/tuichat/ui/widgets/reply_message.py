"""An assistant reply: a live Markdown stream while it arrives, then one cheap Static.

Performance rules from measurements (docs in shared notes): the live reply streams into one `Markdown` widget
through `MarkdownStream`; a finished reply becomes a single `Static` holding a Rich Markdown renderable, because
a long chat slows down with the number of mounted widgets, not with parsing. Model text is never interpreted as
Textual markup, and it was cleaned of control sequences by the client.
"""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.markdown import Markdown as RichMarkdown
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widget import Widget
from textual.widgets import Markdown, Static
from textual.widgets.markdown import MarkdownStream

from tuichat.chat.turns import Turn, TurnState
from tuichat.server.metrics import format_reply_stats, reply_stats_from_dict

STATE_MARKS: dict[TurnState, str] = {
    "stopped": "■ stopped by you: partial reply",
    "interrupted": "⚠ interrupted: partial reply",
    "error": "⚠ failed: partial reply",
    "streaming": "… receiving",
}


def reply_renderable(text: str, state: TurnState) -> RenderableType:
    body: RenderableType = RichMarkdown(text or " ", code_theme="monokai", hyperlinks=False)
    mark = STATE_MARKS.get(state)
    if mark and state != "streaming":
        return Group(body, Text(mark, style="italic yellow"))
    return body


def stats_text(stats: dict[str, Any] | None) -> str:
    """The line under a reply, from the stats dict saved with it (older rows may lack some keys)."""
    parsed = reply_stats_from_dict(stats) if stats else None
    return format_reply_stats(parsed) if parsed is not None else ""


class ReplyMessage(Vertical):
    """An assistant reply: a live Markdown stream while it arrives, then one cheap Static."""

    def __init__(self, turn: Turn, live: bool = False) -> None:
        super().__init__(classes="message assistant")
        self.turn = turn
        self.live = live
        self._markdown: Markdown | None = None
        self._stream: MarkdownStream | None = None
        self._finishing = False

    def compose(self) -> ComposeResult:
        if self.live:
            self._markdown = Markdown("", classes="live")
            yield self._markdown
        else:
            yield Static(reply_renderable(self.turn.content, self.turn.state), classes="body")
            stats = stats_text(self.turn.stats)
            if stats:
                yield Static(Text(stats), classes="stats")

    async def write(self, text: str) -> None:
        if self._markdown is None:
            return
        if self._stream is None:
            self._stream = Markdown.get_stream(self._markdown)
        await self._stream.write(text)

    async def finish(self) -> None:
        """Swap the live Markdown for the cheap finished form (also fixes any fence left open mid-stream)."""
        self._finishing = True
        try:
            if self._stream is not None:
                await self._stream.stop()
                self._stream = None
            self.live = False
            await self.remove_children()
            self._markdown = None
            widgets: list[Widget] = [Static(reply_renderable(self.turn.content, self.turn.state), classes="body")]
            stats = stats_text(self.turn.stats)
            if stats:
                widgets.append(Static(Text(stats), classes="stats"))
            await self.mount_all(widgets)
        finally:
            self._finishing = False
        if stats_text(self.turn.stats) != stats:
            await self.show_stats()  # the stats changed while this ran (a token count came in)

    async def show_stats(self) -> None:
        """Redraw the stats line from `turn.stats` (a /v1/encode count arrived after the reply ended)."""
        if self.live or self._finishing:
            return  # finish() draws the line from the stats as they are by then
        text = stats_text(self.turn.stats)
        lines = self.query(".stats")
        if lines:
            line = lines.first()
            if isinstance(line, Static):
                line.update(Text(text))
        elif text:
            await self.mount(Static(Text(text), classes="stats"))
