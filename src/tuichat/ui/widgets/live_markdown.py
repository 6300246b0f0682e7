"""The Markdown a reply streams into: Textual's, with a paragraph that grows in steps instead of at every flush.

Textual's `MarkdownParagraph` asks for a layout of the whole screen each time its text changes, so every flush of
a streaming reply (about 20 a second) rearranged every widget on screen: about a fifth of the CPU of a fast stream
(bench/RESULTS.md, third session). `LiveParagraph` reserves its rows `ROWS_STEP` at a time and, while its text
still fits them, is only repainted. Whether it fits is decided without wrapping: every source line takes at most
ceil(cells / (width - longest word)) rows under word wrap, so the reserved rows never cut text off; they may leave
a few blank rows under the last line while the reply streams. A paragraph shorter than one step is sized as
Textual sizes it. A paragraph that is no longer the last block
(`settle`) and the finished reply (a plain widget of its own) take exactly their rows.

While it holds rows, the paragraph also keeps its wrapped rows between flushes. Word wrap is greedy, so text
appended to a paragraph can change only its last row and the rows after it: those are wrapped again and marked
for repaint, and the rows above are neither wrapped nor drawn again. Textual's own paragraph wrapped and drew
the whole paragraph at every flush, a sixth of a fast stream's CPU once it was long (bench/RESULTS.md).

Every flush parses the reply's last block again, so the parser is built once (`live_parser`), not at each
flush as Textual's default does, and it is Rich's Markdown (what the finished reply is drawn with), without
the link finder: its scan of the whole block was another tenth of a long paragraph's CPU, and the finished
reply does not make links either.
"""

from __future__ import annotations

from functools import cache

from markdown_it import MarkdownIt
from markdown_it.token import Token
from rich._wrap import divide_line
from rich.cells import cell_len
from rich.segment import Segment
from rich.style import Style as RichStyle
from textual import on
from textual.app import ComposeResult
from textual.content import Content
from textual.events import Mount
from textual.geometry import Region
from textual.strip import Strip
from textual.style import Style
from textual.visual import Visual
from textual.widgets import Markdown
from textual.widgets._markdown import MarkdownBlock, MarkdownParagraph

from tuichat.ui.widgets.sizing import virtual_size_without_relayout

ROWS_STEP = 4  # rows a growing paragraph reserves at a time (at most this many blank rows under its last line)


@cache
def live_parser() -> MarkdownIt:
    """The one parser of every live reply: CommonMark with tables and strikethrough, as Rich parses a finished
    reply (markdown-it keeps no state between parses)."""
    return MarkdownIt().enable("strikethrough").enable("table")


def rows_at_most(text: str, width: int) -> int | None:
    """An upper bound of the rows `text` takes when word-wrapped to `width` cells, or None when there is no cheap
    one (a word as wide as a row, which is folded: text without spaces, such as Chinese, or a long URL)."""
    rows = 0
    for line in text.split("\n"):
        ascii_only = line.isascii()  # then a character is a cell, and the lengths are counted in C
        cells = len(line) if ascii_only else cell_len(line)
        if cells <= width:
            rows += 1
            continue
        words = line.split()
        longest = max(map(len if ascii_only else cell_len, words), default=0)
        if longest >= width:
            return None
        # a row ends only where the next word does not fit, so each holds at least width - longest cells
        rows += -(-cells // (width - longest)) + 1
    return rows


def last_row_start(text: str, width: int) -> int:
    """Where in `text` its last row begins when word-wrapped to `width` cells as Textual wraps a paragraph."""
    line_start = text.rfind("\n") + 1  # a hard break always starts a row
    offsets = divide_line(text[line_start:], width, fold=True)
    return line_start + (offsets[-1] if offsets else 0)


def _shifted(strips: list[Strip], dx: int, dy: int) -> list[Strip]:
    """The rows of a paragraph's tail as rows of the whole: Textual stores in each segment where its text is in
    the paragraph (source line y, character x), which text selection reads. Rows wrapped from a tail count from
    the tail's start: x moves by `dx` on its first source line, and y by `dy` (the hard breaks before it)."""
    if not dx and not dy:
        return strips
    moved: list[Strip] = []
    for strip in strips:
        segments: list[Segment] = []
        for segment in strip:
            style = segment.style
            offset = style.meta.get("offset") if style is not None and style._meta else None
            if offset is not None and style is not None:
                x, y = offset
                meta = {**style.meta, "offset": (x + dx if y == 0 else x, y + dy)}
                segment = Segment(segment.text, style + RichStyle.from_meta(meta), segment.control)
            segments.append(segment)
        moved.append(Strip(segments, strip.cell_length))
    return moved


def _spans_before(content: Content, end: int) -> list[tuple[int, int, object]]:
    return [(start, min(stop, end), style) for start, stop, style in content.spans if start < end]


class LiveParagraph(MarkdownParagraph):
    """A top-level paragraph of the streaming reply: repainted, not laid out again, while its text fits its rows,
    and wrapped and drawn again only from its last row on."""

    virtual_size = virtual_size_without_relayout()
    reserved = 0  # rows held for the text (0: sized by its content, as Textual's paragraph is)
    _reserved_width = 0  # the content width the rows were worked out for
    _rows: list[Strip] | None = None  # the text's rows, while rows are held
    _rows_of: Content | None = None  # the text `_rows` were made from
    _rows_key: tuple[int, Style] | None = None  # and for which width and style
    _last_start = 0  # where in `_rows_of` its last row begins

    def render(self) -> Content:
        # the text as set, not Static's copy: a flush that fits the held rows does not go through update()
        return self._content

    def set_content(self, content: Content) -> None:
        self._content = content
        width = self.content_size.width
        laid_out = width > 0 and self.parent is self._markdown and self._plain_wrap()
        needed = rows_at_most(content.plain, width) if laid_out else None
        if needed is None or (needed < ROWS_STEP and not self.reserved):
            # not laid out yet, nested (lists, quotes), wrapped otherwise than a plain paragraph, no cheap bound,
            # or still short (a few layouts cost little, and a short reply then takes exactly its rows from the
            # start): Textual's own way
            self.settle()
            self.update(content)
        elif needed > self.reserved or width != self._reserved_width:
            self.reserved = (needed // ROWS_STEP + 1) * ROWS_STEP
            self._reserved_width = width
            self.styles.height = self.reserved
            self.refresh(layout=True)
        elif self._rows is not None and self._rows_of is not None and self._extends(self._rows_of, content):
            first = len(self._rows) - 1  # the rows above the last one drawn cannot change
            self.refresh(Region(0, first, width, max(self.reserved - first, 1)))
        else:
            self.refresh()

    def _extends(self, old: Content, new: Content) -> bool:
        """Whether `new` only appends to `old`: then the rows before old's last row stay as they are (the first
        word of that row can only grow, so it still does not fit on the row above)."""
        end = self._last_start
        return new.plain.startswith(old.plain) and _spans_before(new, end) == _spans_before(old, end)

    def _wrapped_rows(self) -> list[Strip]:
        width = self.size.width
        style = self.visual_style
        content = self._content
        rows, old = self._rows, self._rows_of
        if rows is not None and old is content and self._rows_key == (width, style):
            return rows
        if rows is not None and old is not None and self._rows_key == (width, style) and self._extends(old, content):
            start = self._last_start
            tail = content[start:]
            plain = content.plain
            line_start = plain.rfind("\n", 0, start) + 1
            tail_rows = Visual.to_strips(self, tail, width, None, style)
            rows = rows[:-1] + _shifted(tail_rows, start - line_start, plain.count("\n", 0, start))
            self._last_start = start + last_row_start(tail.plain, width)
        else:
            rows = Visual.to_strips(self, content, width, None, style)
            self._last_start = last_row_start(content.plain, width)
        self._rows, self._rows_of, self._rows_key = rows, content, (width, style)
        return rows

    def render_line(self, y: int) -> Strip:
        if not self.reserved or self.text_selection is not None:
            self._rows = None  # drawn Textual's way (a selection is drawn into the rows): the kept rows go stale
            return super().render_line(y)
        rows = self._wrapped_rows()
        return rows[y] if y < len(rows) else Strip.blank(self.size.width, self.visual_style.rich_style)

    def _plain_wrap(self) -> bool:
        """Whether the paragraph is wrapped as `last_row_start` assumes (Textual's defaults for a paragraph): only
        then does it hold rows, and keep them between flushes."""
        styles = self.styles
        return (
            styles.text_wrap == "wrap"
            and styles.text_overflow == "fold"
            and styles.line_pad == 0
            and styles.text_align in ("left", "start")
            and tuple(styles.content_align) == ("left", "top")
        )

    def on_resize(self) -> None:
        # only a new width matters (the reserved rows themselves change the height): the bound no longer holds
        if self.reserved and self.content_size.width != self._reserved_width:
            self.settle()

    def settle(self) -> None:
        """Take exactly the rows the text needs (it is no longer growing, or the width changed)."""
        if self.reserved:
            self.reserved = 0
            self._reserved_width = 0
            self._rows = self._rows_of = None
            self.styles.height = "auto"


class LiveMarkdown(Markdown):
    """Textual's Markdown with `LiveParagraph` for paragraphs; `settle_finished` trims the ones that stopped growing."""

    virtual_size = virtual_size_without_relayout()
    BLOCKS: dict[str, type[MarkdownBlock]] = {**Markdown.BLOCKS, "paragraph_open": LiveParagraph}

    def __init__(self, markdown: str = "", *, classes: str | None = None) -> None:
        super().__init__(markdown, classes=classes, parser_factory=live_parser)
        self._starts_empty = not markdown

    def compose(self) -> ComposeResult:
        # An empty paragraph, mounted with the reply while the server works on the first token: Textual's append
        # sets new text into a last block of the same kind, so the first words go into it instead of mounting a
        # block of their own on the first word's path (~3 ms against the stand-in).
        if self._starts_empty:
            yield LiveParagraph(self, Token("paragraph_open", "p", 1, map=[0, 1]))

    @on(Mount)
    def _no_initial_update(self, event: Mount) -> None:
        if self._starts_empty:
            # Textual's own would parse "" in a worker thread and then remove the paragraph just composed; the
            # first text would also wait for it (they share a lock). Textual calls each class's handler in turn
            # (this one first); preventing the default stops it there.
            event.prevent_default()

    def holds_rows(self) -> bool:
        """Whether the last block is a paragraph holding rows (then nothing around it need hold any)."""
        last = self.children[-1] if self.children else None
        return isinstance(last, LiveParagraph) and last.reserved > 0

    def settle_finished(self) -> None:
        """Every paragraph but the last block: more text can only come to the last one."""
        for block in list(self.children)[:-1]:
            if isinstance(block, LiveParagraph) and block.reserved:
                block.settle()
