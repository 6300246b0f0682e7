"""The scrolling list of messages, and the one place that maps a turn of the chat to the widget showing it.

It follows the bottom only while the user is at the bottom (Textual's anchor). Selection (to copy one message)
lives here too: it is a property of what is shown, not of the chat.

Turns far off screen are parked: a run of finished message widgets more than `PARK_SCREENS` screens above or
below the view is unmounted and replaced by one blank `ParkedTurns` spacer of exactly their height, which keeps
only the turns and their measured heights. The scroll position and the scrollbar do not move, and a chat left open
for days costs about its text instead of a widget tree (styles, message queues, rendered-line caches) per turn.
A parked turn is mounted again when the view comes near it, when it is selected, or when `showing()` is asked for
it, so every caller keeps working with widgets.
"""

from __future__ import annotations

import itertools
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Self

from textual._styles_cache import StylesCache
from textual.await_remove import AwaitRemove
from textual.containers import VerticalScroll
from textual.geometry import Region
from textual.timer import Timer
from textual.widget import AwaitMount, Widget

from tuichat.chat.turns import Turn
from tuichat.ui.widgets.note_message import NoteMessage
from tuichat.ui.widgets.reply_message import ReplyMessage
from tuichat.ui.widgets.sizing import virtual_size_without_relayout
from tuichat.ui.widgets.user_message import UserMessage

MessageWidget = UserMessage | ReplyMessage | NoteMessage

PARK_SCREENS = 2.0  # widgets further than this many view heights from the view are parked
UNPARK_SCREENS = 1.0  # parked turns nearer than this are mounted again (the gap between the two avoids churn)
KEEP_LAST = 12  # the newest message widgets always stay mounted: retry, undo and stats updates work on them
TARGET_WAIT_S = 2.0  # how long scroll_to_turn waits for its turn to be mounted and laid out, at most
HOUSEKEEP_DELAY = 0.15  # seconds after a mount or a scroll before parking is looked at (one pass per burst)


def message_widget(turn: Turn) -> MessageWidget:
    if turn.role == "user":
        return UserMessage(turn)
    if turn.role == "assistant":
        return ReplyMessage(turn)
    return NoteMessage(turn)


class ParkedTurns(Widget):
    """A blank spacer standing for a run of unmounted turns, as tall as they were when they were shown."""

    DEFAULT_CSS = """
    ParkedTurns {
        height: auto;
        margin: 0;
        padding: 0;
    }
    """

    def __init__(self, turns: list[Turn], heights: list[int], width: int) -> None:
        super().__init__()
        self.turns = turns
        self.heights = heights  # rows from each turn's top to the next one's (its margin included)
        self.measured_width = width  # the list's width they were measured at: another width wraps them differently
        self.styles.height = sum(heights)


class MessageList(VerticalScroll):
    """The scrolling list of messages; follows the bottom only while the user is at the bottom."""

    can_focus = True
    virtual_size = virtual_size_without_relayout()
    _housekeep_timer: Timer | None = None
    _target: Turn | None = None  # a turn the view is on its way to (scroll_to_turn): no parking until it is there
    _target_until = 0.0
    _leaving: weakref.WeakSet[Widget] | None = None  # removed by parking, still among the children for a moment

    def _present(self) -> list[Widget]:
        """The children, less those that parking has removed (a removal completes after the current message)."""
        leaving = self._leaving
        return [c for c in self.children if not leaving or c not in leaving]

    def _drop(self, widget: Widget) -> None:
        if self._leaving is None:
            self._leaving = weakref.WeakSet()
        self._leaving.add(widget)
        widget.remove()

    def on_mount(self) -> None:
        self.anchor()
        self.watch(self, "scroll_y", self._scrolled, init=False)

    def refresh(self, *regions: Region, repaint: bool = True, layout: bool = False, recompose: bool = False) -> Self:
        # A child mounted, removed or resized asks its parent for a layout and a repaint of all of it. The list
        # draws nothing but its background, and after a layout the compositor repaints every region whose widget
        # appeared, moved, resized or went: in a short chat the frame after Enter drew and sent all 35 rows of
        # the list for the three that changed (8.4 kB to the terminal instead of 2.1 kB, bench/RESULTS.md).
        if layout and not regions and not recompose:
            repaint = False
        return super().refresh(*regions, repaint=repaint, layout=layout, recompose=recompose)

    def notify_style_update(self) -> None:
        # ...but a change of its own styles (focus, a theme) may change what the list itself draws
        super().notify_style_update()
        super().refresh()

    # -- the turn-to-widget lookups ---------------------------------------------------------------------------

    def messages(self) -> list[MessageWidget]:
        """The mounted message widgets, oldest first (parked turns have none)."""
        return [w for w in self._present() if isinstance(w, UserMessage | ReplyMessage | NoteMessage)]

    def showing(self, turns: Iterable[Turn]) -> list[MessageWidget]:
        """The widgets that show these turns (by identity: two turns may hold the same text); parked ones are
        mounted again first, so the caller can hide, remove or update them."""
        ids = {id(t) for t in turns}
        self._unpark(lambda turn: id(turn) in ids)
        return [w for w in self.messages() if id(w.turn) in ids]

    def showing_message(self, msg_id: int) -> MessageWidget | None:
        self._unpark(lambda turn: turn.msg_id == msg_id)
        return next((w for w in self.messages() if w.turn.msg_id == msg_id), None)

    def scroll_to_turn(self, turn: Turn) -> None:
        """Put `turn` at the top of the view once it is mounted and laid out (it may be about to be mounted: call
        this first). Nothing is parked until the view is there: a parking pass between the layout and the scroll
        parked turns just mounted far above a view still at the bottom, and the view went to a widget no longer
        there (a blank spacer, seen under load in CI)."""
        self.release_anchor()
        self._target = turn
        self._target_until = time.monotonic() + TARGET_WAIT_S
        self.call_after_refresh(self._go_to_target)

    def _go_to_target(self) -> None:
        turn = self._target
        if turn is None:
            return
        self._unpark(lambda t: t is turn)
        widget = next((w for w in self.messages() if w.turn is turn), None)
        ready = widget is not None and widget.is_mounted and widget.size.height > 0
        if not ready and time.monotonic() < self._target_until:
            if widget is None or not widget.is_mounted:
                self.set_timer(0.02, self._go_to_target)  # still mounting (a callback after refresh would spin)
            else:
                self.call_after_refresh(self._go_to_target)  # mounted, not laid out yet
            return
        self._target = None
        if widget is not None:
            self.scroll_to_widget(widget, animate=False, top=True)
        self._housekeep_soon()

    def parked_turns(self) -> list[Turn]:
        """The turns not mounted right now, oldest first."""
        return [t for w in self._present() if isinstance(w, ParkedTurns) for t in w.turns]

    # -- selection --------------------------------------------------------------------------------------------

    def selectable(self) -> list[UserMessage | ReplyMessage]:
        return [w for w in self._present() if isinstance(w, UserMessage | ReplyMessage)]

    def selected_turn(self) -> Turn | None:
        return next((w.turn for w in self.selectable() if w.has_class("selected")), None)

    def select(self, step: int) -> bool:
        """Move the selection by `step` (from the newest end when none is selected); False when empty."""
        entries = self._selectable_turns()
        if not entries:
            return False
        selected = self.selected_turn()
        current = next((i for i, t in enumerate(entries) if t is selected), None)
        index = (len(entries) - 1 if step < 0 else 0) if current is None else current + step
        target_turn = entries[max(0, min(index, len(entries) - 1))]
        self._unpark(lambda turn: turn is target_turn)
        for widget in self.selectable():
            widget.remove_class("selected")
        target = next(w for w in self.selectable() if w.turn is target_turn)
        target.add_class("selected")
        self.release_anchor()
        # a widget mounted again just now has no place on screen yet: scroll once the layout has it
        self.call_after_refresh(self.scroll_to_widget, target, animate=False)
        return True

    def _selectable_turns(self) -> list[Turn]:
        out: list[Turn] = []
        for child in self._present():
            if isinstance(child, ParkedTurns):
                out += [t for t in child.turns if t.role in ("user", "assistant")]
            elif isinstance(child, UserMessage | ReplyMessage):
                out.append(child.turn)
        return out

    def clear_selection(self) -> None:
        for widget in self.selectable():
            widget.remove_class("selected")
        self.anchor()

    # -- parking ----------------------------------------------------------------------------------------------

    def mount(self, *widgets: Widget, before: int | str | Widget | None = None, after: Any = None) -> AwaitMount:
        result = super().mount(*widgets, before=before, after=after)
        self._housekeep_soon()
        return result

    def remove_children(self, selector: Any = "*") -> AwaitRemove:
        if self._housekeep_timer is not None:
            self._housekeep_timer.stop()
            self._housekeep_timer = None
        return super().remove_children(selector)

    def _scrolled(self) -> None:
        self._housekeep_soon()

    def on_resize(self) -> None:
        self._housekeep_soon()

    def _housekeep_soon(self) -> None:
        if not self.is_mounted or self._housekeep_timer is not None:
            return
        self._housekeep_timer = self.set_timer(HOUSEKEEP_DELAY, self._housekeep_after_layout)

    def _housekeep_after_layout(self) -> None:
        self._housekeep_timer = None
        self.call_after_refresh(self.housekeep)

    def housekeep(self) -> None:
        """Mount parked turns near the view again and park message widgets far from it."""
        view_h = self.scrollable_content_region.height
        width = self.scrollable_content_region.width
        if view_h <= 0 or width <= 0 or self._target is not None:
            return  # (on its way to a turn: what is far from the view now may be the view in a moment)
        top, bottom = self.scroll_y, self.scroll_y + view_h
        near_top, near_bottom = top - UNPARK_SCREENS * view_h, bottom + UNPARK_SCREENS * view_h
        # Near the view (or measured at another width, whose heights no longer hold): mount again.
        for spacer in [c for c in self._present() if isinstance(c, ParkedTurns)]:
            y = spacer.virtual_region.y
            if spacer.measured_width != width:
                self._unpark_in(spacer, set(range(len(spacer.turns))))
                continue
            near: set[int] = set()
            for i, height in enumerate(spacer.heights):
                if y + height >= near_top and y <= near_bottom:
                    near.add(i)
                y += height
            if near:
                self._unpark_in(spacer, near)
        self._park(top - PARK_SCREENS * view_h, bottom + PARK_SCREENS * view_h, width)
        release_line_caches()
        # The list's own drawn rows (its background) are cached by their row in the whole scrolled content, so a
        # chat that grows adds rows there for good; a whole repaint used to empty them at every mount, which
        # `refresh` above no longer does. Only a cache: what is on screen is drawn again from it when needed.
        # Without this, growth over 100 exchanges was 0.073 MB each instead of 0.055 (bench/RESULTS.md).
        self._styles_cache.clear()

    def _park(self, far_above: float, far_below: float, width: int) -> None:
        children = self._present()
        messages = [c for c in children if isinstance(c, UserMessage | ReplyMessage | NoteMessage)]
        keep = {id(w) for w in messages[-KEEP_LAST:]}
        runs: list[list[tuple[Widget, int]]] = []
        run: list[tuple[Widget, int]] = []
        for child, following in zip(children, [*children[1:], None], strict=False):
            height = self._parkable_height(child, following, keep, far_above, far_below)
            if height is None:
                if run:
                    runs.append(run)
                run = []
                continue
            run.append((child, height))
        if run:
            runs.append(run)
        for run in runs:
            self._park_run(run, width)
        self._merge_spacers()

    def _parkable_height(
        self, child: Widget, following: Widget | None, keep: set[int], far_above: float, far_below: float
    ) -> int | None:
        """Rows `child` takes up to the next widget, if it may be parked now; else None."""
        if isinstance(child, ParkedTurns):
            return None  # already parked: merged with its neighbours afterwards
        if not isinstance(child, UserMessage | ReplyMessage | NoteMessage) or id(child) in keep:
            return None
        if not child.display or child.has_class("selected") or (isinstance(child, ReplyMessage) and child.live):
            return None
        if following is None or not following.display or not child.is_mounted or not following.is_mounted:
            return None
        y, next_y = child.virtual_region.y, following.virtual_region.y
        if not child.size.height or next_y < y:
            return None  # not laid out yet
        if next_y <= far_above or y >= far_below:
            return next_y - y
        return None

    def _park_run(self, run: list[tuple[Widget, int]], width: int) -> None:
        turns = [w.turn for w, _ in run if isinstance(w, UserMessage | ReplyMessage | NoteMessage)]
        heights = [h for _, h in run]
        super().mount(ParkedTurns(turns, heights, width), before=run[0][0])
        for widget, _ in run:
            self._drop(widget)

    def _merge_spacers(self) -> None:
        children = self._present()
        for first, second in itertools.pairwise(children):
            if not (isinstance(first, ParkedTurns) and isinstance(second, ParkedTurns)):
                continue
            if first.measured_width == second.measured_width:
                second.turns[:0] = first.turns
                second.heights[:0] = first.heights
                second.styles.height = sum(second.heights)
                self._drop(first)

    def _unpark(self, wanted: Callable[[Turn], bool]) -> None:
        for spacer in [c for c in self._present() if isinstance(c, ParkedTurns)]:
            indexes = {i for i, turn in enumerate(spacer.turns) if wanted(turn)}
            if indexes:
                self._unpark_in(spacer, indexes)

    def _unpark_in(self, spacer: ParkedTurns, indexes: set[int]) -> None:
        """Mount the turns at `indexes` (and any between them) again; what is left stays parked around them."""
        first, last = min(indexes), max(indexes)
        turns, heights = spacer.turns, spacer.heights
        pieces: list[Widget] = []
        if first:
            pieces.append(ParkedTurns(turns[:first], heights[:first], spacer.measured_width))
        pieces += [message_widget(t) for t in turns[first : last + 1]]
        if last + 1 < len(turns):
            pieces.append(ParkedTurns(turns[last + 1 :], heights[last + 1 :], spacer.measured_width))
        super().mount(*pieces, before=spacer)
        self._drop(spacer)


def release_line_caches() -> None:
    """Let go of the drawn lines of widgets that are gone (parked turns, a finished reply's live Markdown).

    Textual 8's `StylesCache.get_inner_outer` is an `lru_cache` on a method, so its 1,024 keys keep the styles
    caches of that many widgets alive after the widgets themselves are freed, with every line those drew (their
    Strips, seven small caches each). Over 100 exchanges that was ~2.7 of the 13.5 MB a chat grew by
    (bench/RESULTS.md). Emptying it after each housekeeping pass frees them; the widgets still mounted keep
    their own caches, and a colour pair costs one addition to compute again.
    """
    cache_clear = getattr(StylesCache.get_inner_outer, "cache_clear", None)
    if cache_clear is not None:  # a Textual that no longer caches it there: nothing to release
        cache_clear()
