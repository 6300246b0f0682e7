"""The one view of a process's log (the server panel's and the quantize form's): plain lines, a bounded tail, search.

Log lines come from programs that print anything: `[red]` or `[/]` in a line is text, never markup, so the view is a
Textual `Log`, which renders strings as they are. It keeps the last `keep` lines (the whole log stays in its file),
follows the end while the reader is at the end and stays put once they scrolled up, and can show only the lines
that contain a search text (case-insensitive), with the number of matches in its border title.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from textual import events
from textual.content import Content
from textual.widgets import Log


class LogView(Log):
    """A log that keeps its last `keep` lines and can show just those containing a search text."""

    def __init__(self, *, keep: int, title: str = "log", id: str | None = None, classes: str | None = None) -> None:
        super().__init__(max_lines=keep, id=id, classes=classes)
        self.kept: deque[str] = deque(maxlen=keep)  # every line kept, shown or not (the search narrows the view)
        self.search_text = ""
        self._title = title
        self._following = True  # showing the end: new lines and a change of size keep it there
        self._draw_title()

    def watch_scroll_y(self, old_value: float, new_value: float) -> None:
        super().watch_scroll_y(old_value, new_value)
        self._following = new_value >= self.max_scroll_y  # the reader scrolled up, or back to the end

    def on_resize(self, event: events.Resize) -> None:
        # the view shrank (a message above it): one that followed the end still does
        if self._following:
            self.scroll_end(animate=False, immediate=True, x_axis=False)

    def watch_show_horizontal_scrollbar(self, shown: bool) -> None:
        # a long line brings a scrollbar, which takes the last row without resizing the widget
        if shown and self._following:
            self.call_after_refresh(self.scroll_end, animate=False, immediate=True, x_axis=False)

    @property
    def base_title(self) -> str:
        """The border title without the search's count (`log`, `log · ~/…/model.log`)."""
        return self._title

    @base_title.setter
    def base_title(self, value: str) -> None:
        self._title = value
        self._draw_title()

    def matches(self, line: str) -> bool:
        return not self.search_text or self.search_text in line.lower()

    def shown_lines(self) -> list[str]:
        """The lines on view now: all the kept ones, or those that match the search."""
        return [line for line in self.kept if self.matches(line)]

    def add(self, lines: Iterable[str]) -> None:
        """Append lines (each one line, already tidied); the view follows them if it showed the end."""
        new = [part for line in lines for part in (line.splitlines() or [""])]
        if not new:
            return
        self.kept.extend(new)
        shown = [line for line in new if self.matches(line)]
        if shown:
            follow = self._following or self.is_vertical_scroll_end
            self.write_lines(shown, scroll_end=follow)
            if follow:  # again once laid out: the same refresh may shrink the view (a message appearing above)
                self.call_after_refresh(self.scroll_end, animate=False, x_axis=False)
        if self.search_text:
            self._draw_title()

    def reset(self) -> None:
        """Forget every line (a new log, or a new run of the same one)."""
        self.kept.clear()
        self.clear()
        self._draw_title()

    def search(self, text: str) -> None:
        """Show only the lines containing `text` (ignoring case); an empty text shows them all again."""
        wanted = text.strip().lower()
        if wanted == self.search_text:
            return
        self.search_text = wanted
        self.clear()
        self.write_lines(self.shown_lines())
        self._draw_title()

    def keep_end(self) -> None:
        """Call before the view changes size: a view that showed the end keeps showing it."""
        if self._following or self.is_vertical_scroll_end:
            self.call_after_refresh(self.scroll_end, animate=False, x_axis=False)

    def _draw_title(self) -> None:
        # Content, not a str: a str title is markup, and a log's path may hold brackets
        if not self.search_text:
            self.border_title = Content(self._title)
            return
        count = sum(1 for line in self.kept if self.matches(line))
        self.border_title = Content(f"{self._title} · {count} lines match")
