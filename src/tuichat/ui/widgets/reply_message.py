"""An assistant reply: a live Markdown stream while it arrives, then one cheap widget.

Performance rules from measurements (bench/PROFILE.md): the live reply streams into one `Markdown` child through
`MarkdownStream`; a finished reply is a single leaf widget (no children) drawing one Rich renderable, the body's
Markdown with the stats line under it, because a long chat costs per mounted widget (styles, message queue, line
caches, arrange work every frame), not per parsed character. While the reply streams its height grows in steps of
`GROW_STEP` rows, so most flushes change only the reply's own lines and not the layout of the list around it.
Model text is never interpreted as Textual markup, and it was cleaned of control sequences by the client.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.measure import Measurement
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual.content import Content
from textual.geometry import Region
from textual.strip import Strip
from textual.widgets import Static

from tuichat.chat.turns import Turn, TurnState
from tuichat.ui.frame_timer import PacedFrames
from tuichat.ui.render_cache import RenderCache, reply_key
from tuichat.ui.widgets.sizing import virtual_size_without_relayout

if TYPE_CHECKING:  # Markdown (markdown-it, pygments' lexers) loads with the first reply, not before the first frame
    from textual.widgets.markdown import MarkdownStream

    from tuichat.ui.widgets.live_markdown import LiveMarkdown

STATE_MARKS: dict[TurnState, str] = {
    "stopped": "■ stopped by you: partial reply",
    "interrupted": "⚠ interrupted: partial reply",
    "error": "⚠ failed: partial reply",
    "streaming": "… receiving",
}

# Rows the live reply's height grows by at a time: the message list is laid out again only when the text
# outgrows the reserved rows, not at every flush (the compositor then repaints just the reply).
GROW_STEP = 8
PLAIN_WAIT_S = 0.25  # the most the Markdown waits for a frame that draws the plain first words


# Characters that can make CommonMark draw text otherwise than as it is (emphasis, code, links, HTML and entities,
# escapes, tables, strikethrough, headings, quotes) or break it into blocks (a newline).
_MARKUP_CHARS = frozenset("\\`*_[]<>&|~#\n\r\t")
_BLOCK_START = re.compile(r"[-+=]|\d{1,9}[.)]")  # a list item, a setext underline or a rule, an ordered item


def looks_plain(text: str) -> bool:
    """Whether Markdown would draw `text` as one paragraph of exactly these characters (no leading space, which a
    paragraph drops; none of the characters above; no list or rule at the start). Then the first words can be
    drawn as they are and look the same when the live Markdown takes over."""
    return bool(text) and not text[0].isspace() and _MARKUP_CHARS.isdisjoint(text) and _BLOCK_START.match(text) is None


def reply_renderable(text: str, state: TurnState) -> RenderableType:
    from rich.markdown import Markdown as RichMarkdown

    body: RenderableType = RichMarkdown(text or " ", code_theme="monokai", hyperlinks=False)
    mark = STATE_MARKS.get(state)
    if mark and state != "streaming":
        return Group(body, Text(mark, style="italic yellow"))
    return body


def stats_text(stats: dict[str, Any] | None) -> str:
    """The line under a reply, from the stats dict saved with it (older rows may lack some keys)."""
    if not stats:
        return ""
    from tuichat.server.metrics import format_reply_stats, reply_stats_from_dict  # not needed by the first frame

    parsed = reply_stats_from_dict(stats)
    return format_reply_stats(parsed) if parsed is not None else ""


def warm_up_markdown() -> None:
    """Load and warm what the first reply draws with, so its first word does not wait for it: the modules, the
    live parser (built and run once) and Python's syntax highlighter (the most common fence; ~30 ms of regex
    compiling on its first block), and Rich's Unicode width tables."""
    import rich.markdown  # noqa: F401
    from rich.cells import cell_len
    from rich.syntax import Syntax

    from tuichat.ui.widgets.live_markdown import live_parser  # and with it Textual's Markdown widgets

    live_parser().parse("a *word* and `code`\n\n| a |\n| - |\n| b |\n")
    Syntax("", "python").highlight("x = 1\n")  # compiles the lexer class's patterns, which every highlighter shares
    # The first character outside Rich's quick single-width set (a dash, a curly quote, an ellipsis: common in
    # replies, and in tuichat's own "…") imports the width tables, in the middle of a reply (0.5 ms here; more on
    # a cold disk).
    cell_len("\u2026")


class DrawnOnce:
    """A renderable drawn once per width and reused: laying out a chat asks every finished reply for its height at
    each arrange pass, and Rich's Markdown renders (and syntax-highlights) the whole reply again each time. A
    restored chat of 10 replies was drawn ~25 times over before its first screen was still (bench/RESULTS.md).

    With a `RenderCache` and a key, the rows of a width are looked up there first, and what is drawn is kept
    there: a reply restored at a width it was drawn at before is then drawn without making its renderable at all
    (for a reply, without loading Markdown)."""

    def __init__(
        self,
        make: Callable[[], RenderableType],
        key: str | None = None,
        cache: RenderCache | None = None,
        msg_id: int | None = None,
    ) -> None:
        self._make = make
        self._renderable: RenderableType | None = None
        # kept in the cache only with the message it is drawn from, which the cache forgets with it
        self._kept_in = (cache, key, msg_id) if cache is not None and key is not None and msg_id is not None else None
        self._key: tuple[object, ...] | None = None
        self._lines: list[list[Segment]] = []

    @property
    def renderable(self) -> RenderableType:
        if self._renderable is None:
            self._renderable = self._make()
        return self._renderable

    def _render(self, console: Console, options: ConsoleOptions) -> list[list[Segment]]:
        stored = None
        if self._kept_in is not None:
            cache, key, msg_id = self._kept_in
            stored = reply_key(key, options.max_width, options.justify, options.overflow, options.no_wrap)
            lines = cache.get(stored)
            if lines is not None:
                return lines
        # the height a caller asks for only crops what it shows, so the lines of a width serve them all
        lines = console.render_lines(self.renderable, options.update(height=None), pad=False)
        if self._kept_in is not None and stored is not None:
            cache, _key, msg_id = self._kept_in
            cache.put(stored, lines, msg_id)
        return lines

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        key = (id(console), options.max_width, options.justify, options.overflow, options.no_wrap)
        if key != self._key:
            self._lines = self._render(console, options)
            self._key = key
        newline = Segment.line()
        for line in self._lines:
            yield from line
            yield newline

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement.get(console, options, self.renderable)


class ReplyMessage(Static):
    """An assistant reply: a live Markdown stream while it arrives, then one cheap widget."""

    # "stats": the same class the stats line had as a widget of its own, so every screen's `.assistant .stats` rule
    # (the chat's messages.tcss, the compare screen's compare.tcss) still colours it
    COMPONENT_CLASSES: ClassVar[set[str]] = {"stats"}
    virtual_size = virtual_size_without_relayout()

    def __init__(self, turn: Turn, live: bool = False) -> None:
        super().__init__("", classes="message assistant", markup=False)
        self.turn = turn
        self.live = live
        self._markdown: LiveMarkdown | None = None
        self._stream: MarkdownStream | None = None
        self._finishing = False
        self._stats_shown = ""  # the stats line as drawn: show_stats redraws only when it changed
        self._plain = ""  # the first words while this widget draws them itself (before the live Markdown)
        self._plain_drawn = False  # a frame has drawn them
        self._plain_until = 0.0  # the Markdown takes over by then, drawn or not
        self._writing = asyncio.Lock()  # a write, the Markdown's taking over and finish() go one at a time

    def compose(self) -> Any:
        # Nothing yet: the first words are drawn by this widget itself (`write`); the live Markdown comes after them.
        return ()

    def on_mount(self) -> None:
        if not self.live:
            self._draw_finished()

    def _draw_finished(self) -> None:
        # The stats line's colour is the theme's muted text, resolved through a component class: a Rich Text in
        # the same renderable as the body cannot name a Textual theme variable itself.
        self._stats_shown = stats = stats_text(self.turn.stats)
        text, state = self.turn.content, self.turn.state
        # only its colour (blended with the background, as Textual draws muted text); the background stays the
        # reply's own, which selection changes
        muted = self.get_component_rich_style("stats").color if stats else None

        def make() -> RenderableType:
            body = reply_renderable(text, state)
            return Group(body, Text(stats, style=Style(color=muted))) if stats else body

        cache = getattr(self.app, "render_cache", None)
        # a streaming reply's text still changes: only a finished one is worth keeping
        key = f"{state}\0{stats}\0{muted}\0{text}" if cache is not None and state != "streaming" else None
        # setting content, unlike update(), also forgets the height measured for the previous content
        self.content = DrawnOnce(make, key, cache, self.turn.msg_id)
        # ...but not, before the Mount event has been handled (on_mount), the visual Textual drew for the layout: a
        # screen busy enough to lay the reply out before its on_mount kept measuring the empty one, and the reply
        # stayed one row high (its first line only; a stopped reply's mark cut off, seen in CI under load)
        self._layout_cache.clear()

    async def write(self, text: str) -> None:
        """Add streamed text; it is in the widgets when this returns (the chat draws the first words in one frame
        with the message just sent). Plain first words are drawn as they are, by this widget; the live Markdown
        takes over right after their frame, or at once for text it would draw otherwise, or with the next write."""
        if not self.live:
            return
        async with self._writing:
            if self._markdown is None:
                if not self._plain:
                    self._hurry_frame()
                if not self._plain and looks_plain(text):
                    # The first word's frame then lays out and paints one widget, not a Markdown tree of three
                    # composed for it: 10 ms less of the main thread between Enter and that frame (bench/RESULTS.md).
                    self._plain = text
                    # the row a Markdown paragraph keeps under its text (its bottom margin), so nothing moves when
                    # the Markdown takes over; set inline, because a class change restyles the widget through the
                    # whole stylesheet (~1 ms here)
                    padding = self.styles.padding
                    self.styles.padding = (padding.top, padding.right, padding.bottom + 1, padding.left)
                    self.update(Content(text))
                    # Tell the screen about the new layout now, not at this widget's next idle: with the echo
                    # already drawn (a server slower than ECHO_WAIT_S), that idle came 25-35 ms later, and the words
                    # waited for it (chunk -> word 40 ms against 12 ms before plain words, stand-in at 4 chunks/s)
                    self._check_refresh()
                    self._plain_drawn = False
                    self._plain_until = time.monotonic() + PLAIN_WAIT_S
                    self.call_after_refresh(self._take_over_soon)
                    return
                await self._take_over(text)
                return
            if self._stream is not None:  # (set with the Markdown, by _take_over)
                await self._stream.write(text)
        self.call_after_refresh(self._reserve_rows)

    def _hurry_frame(self) -> None:
        # The first words' frame comes at once, not a frame period after the last one: the reply and the sent
        # message, newly mounted, were often drawn a second time (for their new sizes) just before the first chunk
        # came, and the words then waited 15 ms for the cap (bench/RESULTS.md, ninth session)
        screen = self.screen
        if isinstance(screen, PacedFrames):
            screen.draw_soon()

    def render_lines(self, crop: Region) -> list[Strip]:
        if self._plain:
            self._plain_drawn = True
        return super().render_lines(crop)

    def _take_over_soon(self) -> None:
        """After a frame, if it drew the plain words; else after the next one (a frame may come before the words'
        layout does, e.g. the status line's repaint, and a take-over then would hold the words back)."""
        if self._markdown is None and self._plain and self.live:
            if not self._plain_drawn and time.monotonic() < self._plain_until:
                # a timer, not another callback after refresh: on an idle screen (the reply scrolled away, another
                # screen on top) that one runs at once, and the wait would spin
                self.set_timer(1 / 60, self._take_over_soon)
                return
            self.run_worker(self._take_over_now(), group="markdown", exit_on_error=False)

    async def _take_over_now(self) -> None:
        async with self._writing:
            if self._markdown is None and self._plain and self.live and self.is_attached:
                await self._take_over("")

    async def _take_over(self, text: str) -> None:
        """Mount the live Markdown with the text so far (the plain words, then `text`) in one frame."""
        from tuichat.ui.widgets.live_markdown import LiveMarkdown

        text, self._plain = self._plain + text, ""
        with self.app.batch_update():  # the plain words stay until the Markdown shows them: no frame without them
            self._markdown = LiveMarkdown("", classes="live")
            await self.mount(self._markdown)
            self._stream = self._markdown.get_stream(self._markdown)
            if text:
                await self._markdown.append(text)
            self.styles.padding = None  # back to the stylesheet's
            self.update("")
        self.call_after_refresh(self._reserve_rows)

    def _reserve_rows(self) -> None:
        """Grow the reserved height in steps once the streamed text is about to outgrow it."""
        markdown = self._markdown
        if markdown is None or not self.live or not self.is_attached:  # (removed meanwhile: nothing to reserve)
            return
        markdown.settle_finished()
        if markdown.holds_rows():
            # its growing paragraph already holds rows in steps: a step of our own on top would only add blank
            # rows under the newest words (up to twice the step, at the bottom of the view)
            if self.styles.min_height is not None:
                self.styles.min_height = None
            return
        needed = markdown.outer_size.height + self.styles.gutter.height
        floor = self.styles.min_height
        reserved = floor.cells if floor is not None and floor.cells is not None else 0
        if needed >= reserved:
            self.styles.min_height = (needed // GROW_STEP + 1) * GROW_STEP

    async def finish(self) -> None:
        """Swap the live Markdown for the cheap finished form (also fixes any fence left open mid-stream)."""
        self._finishing = True
        try:
            async with self._writing:
                await self._finish()
        finally:
            self._finishing = False

    async def _finish(self) -> None:
        if self._plain:
            self._plain = ""
            self.styles.padding = None
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        self.live = False
        await self.remove_children()
        self._markdown = None
        self.styles.min_height = None  # the finished text takes exactly its own rows
        self._draw_finished()

    async def show_stats(self) -> None:
        """Redraw the stats line from `turn.stats` (a /v1/encode count arrived after the reply ended)."""
        if self.live or self._finishing:
            return  # finish() draws the line from the stats as they are by then
        if stats_text(self.turn.stats) != self._stats_shown:
            self._draw_finished()
