"""The Markdown a reply streams into: Textual's, with a paragraph that grows in steps instead of at every flush.

Textual's `MarkdownParagraph` asks for a layout of the whole screen each time its text changes, so every flush of
a streaming reply (about 20 a second) rearranged every widget on screen: about a fifth of the CPU of a fast stream
(bench/RESULTS.md, third session). `LiveParagraph` reserves its rows `ROWS_STEP` at a time and, while its text
still fits them, is only repainted. Whether it fits is decided without wrapping: every source line takes at most
ceil(cells / (width - longest word)) rows under word wrap, so the reserved rows never cut text off; they may leave
a few blank rows under the last line while the reply streams. A paragraph shorter than one step is sized as
Textual sizes it. A paragraph that is no longer the last block
(`settle`) and the finished reply (a plain widget of its own) take exactly their rows.
"""

from __future__ import annotations

from rich.cells import cell_len
from textual.content import Content
from textual.widgets import Markdown
from textual.widgets._markdown import MarkdownBlock, MarkdownParagraph

ROWS_STEP = 4  # rows a growing paragraph reserves at a time (at most this many blank rows under its last line)


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


class LiveParagraph(MarkdownParagraph):
    """A top-level paragraph of the streaming reply: repainted, not laid out again, while its text fits its rows."""

    reserved = 0  # rows held for the text (0: sized by its content, as Textual's paragraph is)
    _reserved_width = 0  # the content width the rows were worked out for

    def set_content(self, content: Content) -> None:
        self._content = content
        width = self.content_size.width
        needed = rows_at_most(content.plain, width) if width > 0 and self.parent is self._markdown else None
        if needed is None or (needed < ROWS_STEP and not self.reserved):
            # not laid out yet, nested (lists, quotes), no cheap bound, or still short (a few layouts cost little,
            # and a short reply then takes exactly its rows from the start): Textual's own way
            self.settle()
            self.update(content)
        elif needed > self.reserved or width != self._reserved_width:
            self.reserved = (needed // ROWS_STEP + 1) * ROWS_STEP
            self._reserved_width = width
            self.styles.height = self.reserved
            self.update(content)
        else:
            self.update(content, layout=False)

    def on_resize(self) -> None:
        # only a new width matters (the reserved rows themselves change the height): the bound no longer holds
        if self.reserved and self.content_size.width != self._reserved_width:
            self.settle()

    def settle(self) -> None:
        """Take exactly the rows the text needs (it is no longer growing, or the width changed)."""
        if self.reserved:
            self.reserved = 0
            self._reserved_width = 0
            self.styles.height = "auto"


class LiveMarkdown(Markdown):
    """Textual's Markdown with `LiveParagraph` for paragraphs; `settle_finished` trims the ones that stopped growing."""

    BLOCKS: dict[str, type[MarkdownBlock]] = {**Markdown.BLOCKS, "paragraph_open": LiveParagraph}

    def holds_rows(self) -> bool:
        """Whether the last block is a paragraph holding rows (then nothing around it need hold any)."""
        last = self.children[-1] if self.children else None
        return isinstance(last, LiveParagraph) and last.reserved > 0

    def settle_finished(self) -> None:
        """Every paragraph but the last block: more text can only come to the last one."""
        for block in list(self.children)[:-1]:
            if isinstance(block, LiveParagraph) and block.reserved:
                block.settle()
