"""The compare screen: one prompt, two servers. Each message goes to two `Conversation`s at once; two columns stream
side by side, each headed by its side's profile, model and server and closed by its own TTFT, decode tok/s and
tokens; after each round the faster side is marked. Stop, retry and undo act on both.

Below `NARROW_WIDTH` columns the two sides do not fit next to each other: one is shown at a time (the switch key
flips them) and a two-line scoreboard on top keeps both sides' figures in view.

All the reply rules live in `tuichat.conversation`; this screen only renders its events.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Static

from tuichat.batchcli import Endpoint
from tuichat.chat import Turn
from tuichat.conversation import (
    Conversation,
    Event,
    Notice,
    ReplyDelta,
    ReplyFailed,
    ReplyFinished,
    ReplyStarted,
    faster_side,
    link_compared,
)
from tuichat.ui.keyids import binding
from tuichat.ui.widgets import Conversation as MessageList
from tuichat.ui.widgets import PromptArea, ReplyMessage, message_widget, stats_text

NARROW_WIDTH = 100
FLUSH_EVERY = 0.05  # seconds between writes into the live Markdown streams
SIDE_NAMES = ("A", "B")


@dataclass
class Side:
    """One column: where it sends and the conversation that does it."""

    endpoint: Endpoint
    conversation: Conversation


def side_title(name: str, side: Side) -> str:
    model = side.conversation.model or side.endpoint.model or "first model"
    where = side.endpoint.profile or "url"
    return f"{name} · {where} · {model} · {side.endpoint.url}"


def figures(stats: dict[str, Any] | None) -> str:
    return "last reply: " + stats_text(stats) if stats else "no reply yet"


class ComparePane(Vertical):
    """One side: header, the messages, the figures of the last reply and its last error."""

    def __init__(self, index: int, side: Side) -> None:
        super().__init__(classes="side", id=f"side-{SIDE_NAMES[index].lower()}")
        self.index = index
        self.side = side
        self.live: ReplyMessage | None = None
        self.pending: list[str] = []
        self.faster = False
        self.error = ""

    def compose(self) -> ComposeResult:
        yield Static(classes="side-title")
        yield MessageList(classes="messages")
        yield Static(classes="side-figures")
        yield Static(classes="side-error")

    def on_mount(self) -> None:
        self.refresh_header()

    @property
    def messages(self) -> MessageList:
        return self.query_one(".messages", MessageList)

    def refresh_header(self) -> None:
        mark = "  ◆ faster" if self.faster else ""
        self.query_one(".side-title", Static).update(Text(side_title(SIDE_NAMES[self.index], self.side) + mark))
        self.set_class(self.faster, "faster")
        self.query_one(".side-figures", Static).update(Text(figures(self.side.conversation.last_stats)))
        error = self.query_one(".side-error", Static)
        error.update(Text(f"⚠ {self.error}" if self.error else ""))
        error.display = bool(self.error)

    async def rebuild(self) -> None:
        """Show the conversation's turns as they stand (after undo, clear, retry or a failure)."""
        live, self.live = self.live, None
        self.pending.clear()
        if live is not None:
            await live.finish()  # stops its Markdown stream, which would otherwise outlive the widget
        await self.messages.remove_children()
        await self.messages.mount_all([message_widget(t) for t in self.side.conversation.chat.turns])

    async def start_live(self) -> None:
        self.live = ReplyMessage(Turn("assistant", "", state="streaming"), live=True)
        await self.messages.mount(self.live)
        self.messages.anchor()

    async def flush(self) -> None:
        if self.live is not None and self.pending:
            text = "".join(self.pending)
            self.pending.clear()
            await self.live.write(text)


class CompareScreen(Screen[None]):
    """Two conversations, one prompt."""

    CSS_PATH = str(Path(__file__).with_name("compare_screen.tcss"))

    BINDINGS: ClassVar[list[BindingType]] = [
        binding("stop", "stop_both"),
        binding("retry", "retry_both"),
        binding("undo", "undo_both"),
        binding("clear", "clear_both"),
        Binding("f4", "switch_side", "Switch side", id="switch_side"),
    ]

    def __init__(self, first: Side, second: Side, *, store: Any = None) -> None:
        super().__init__()
        self.sides = (first, second)
        self.store = store
        self.shown = 0  # the side shown when only one fits
        self.linked = False
        self._round_stats: list[dict[str, Any] | None] = [None, None]
        self._round_open = [False, False]
        self._queues: list[asyncio.Queue[Event]] = []
        for index, side in enumerate(self.sides):
            side.conversation.on_event = self._listener(index)

    def compose(self) -> ComposeResult:
        yield Static(id="scoreboard")
        with Horizontal(id="sides"):
            for index, side in enumerate(self.sides):
                yield ComparePane(index, side)
        yield PromptArea(id="prompt")
        yield Footer()

    async def on_mount(self) -> None:
        for pane in self.panes:
            await pane.rebuild()
        for index in range(len(self.sides)):
            self.run_worker(self._render_side(index), group=f"render-{index}")
        self.set_interval(FLUSH_EVERY, self._flush)
        self._layout(self.size.width)
        self.query_one(PromptArea).focus()

    @property
    def panes(self) -> list[ComparePane]:
        return list(self.query(ComparePane))

    @property
    def streaming(self) -> bool:
        return any(side.conversation.streaming for side in self.sides)

    # -- layout -----------------------------------------------------------------------------------------------

    def on_resize(self) -> None:
        self._layout(self.size.width)

    def _layout(self, width: int) -> None:
        narrow = width < NARROW_WIDTH
        self.set_class(narrow, "narrow")
        for pane in self.panes:
            pane.display = not narrow or pane.index == self.shown
        self._refresh_scoreboard()

    def action_switch_side(self) -> None:
        self.shown = 1 - self.shown
        self._layout(self.size.width)

    def _refresh_scoreboard(self) -> None:
        board = self.query_one("#scoreboard", Static)
        lines = []
        for pane in self.panes:
            shown = "▶" if pane.index == self.shown else " "
            mark = " ◆ faster" if pane.faster else ""
            stats = pane.side.conversation.last_stats
            label = pane.side.endpoint.profile or pane.side.endpoint.url
            lines.append(f"{shown} {SIDE_NAMES[pane.index]} {label}: {figures(stats)}{mark}")
        board.update(Text("\n".join(lines)))
        board.display = self.has_class("narrow")
        for pane in self.panes:
            pane.refresh_header()

    # -- events from the two conversations --------------------------------------------------------------------

    def _listener(self, index: int) -> Any:
        # One queue and one reader per side: events are rendered in order, each after the one before it.
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._queues.append(queue)

        def listen(event: Event) -> None:
            queue.put_nowait(event)

        return listen

    async def _render_side(self, index: int) -> None:
        queue = self._queues[index]
        while True:
            event = await queue.get()
            await self._on_event(index, event)
            queue.task_done()

    async def settled(self) -> None:
        """Until every event received so far has been rendered (for tests and for a clean quit)."""
        for queue in self._queues:
            await queue.join()

    async def _on_event(self, index: int, event: Event) -> None:
        pane = self.panes[index]
        if isinstance(event, ReplyStarted):
            pane.error = ""
            await pane.rebuild()
            await pane.start_live()
        elif isinstance(event, ReplyDelta):
            pane.pending.append(event.text)
        elif isinstance(event, ReplyFinished):
            await pane.flush()
            await pane.rebuild()
            if event.error:
                pane.error = event.error
            self._round_stats[index] = event.stats
            self._end_round(index)
        elif isinstance(event, ReplyFailed):
            pane.error = event.error
            if not event.partial_kept:
                await pane.rebuild()
                self._end_round(index)
                if event.returned is not None:
                    self._give_back(event.returned.content)
        elif isinstance(event, Notice):
            self.notify(f"{SIDE_NAMES[index]}: {event.text}", severity=event.severity)
        pane.refresh_header()
        self._refresh_scoreboard()

    def _end_round(self, index: int) -> None:
        self._round_open[index] = False
        if any(self._round_open):
            return
        winner = faster_side(*self._round_stats)
        for pane in self.panes:
            pane.faster = winner == pane.index

    async def _flush(self) -> None:
        for pane in self.panes:
            await pane.flush()

    def _give_back(self, text: str) -> None:
        prompt = self.query_one(PromptArea)
        if text and text not in prompt.text:
            prompt.text = text + ("\n\n" + prompt.text if prompt.text.strip() else "")

    # -- the user's actions -----------------------------------------------------------------------------------

    @on(PromptArea.Submitted)
    def _submitted(self, event: PromptArea.Submitted) -> None:
        self.send(event.text)

    def send(self, text: str) -> bool:
        if not text.strip():
            return False
        if self.streaming:
            self.notify("A reply is still streaming: stop it (Esc) before you send.", severity="warning")
            return False
        self._open_round()
        for side in self.sides:
            side.conversation.send(text)
        prompt = self.query_one(PromptArea)
        prompt.text = prompt.text[len(text) :] if prompt.text.startswith(text) else ""
        self._link()
        return True

    def _open_round(self) -> None:
        self._round_stats = [None, None]
        self._round_open = [True, True]
        for pane in self.panes:
            pane.faster = False

    def _link(self) -> None:
        ids = [side.conversation.conversation_id for side in self.sides]
        if self.linked or self.store is None or ids[0] is None or ids[1] is None:
            return
        labels = [f"{SIDE_NAMES[i]} {side.endpoint.profile or side.endpoint.url}" for i, side in enumerate(self.sides)]
        try:
            link_compared(self.store, (ids[0], labels[0]), (ids[1], labels[1]))
            self.linked = True
        except Exception as exc:
            self.notify(f"could not save to the history: {exc}", severity="error")

    async def action_stop_both(self) -> None:
        for side in self.sides:
            await side.conversation.stop()

    def action_retry_both(self) -> None:
        if self.streaming:
            self.notify("A reply is still streaming: stop it (Esc) before you retry.", severity="warning")
            return
        if all(side.conversation.chat.last_index("user") is None for side in self.sides):
            self.notify("Nothing to retry yet.")
            return
        self._open_round()
        for index, side in enumerate(self.sides):
            if not side.conversation.retry():
                self._round_open[index] = False

    async def action_undo_both(self) -> None:
        if self.streaming:
            self.notify("A reply is still streaming: stop it (Esc) before you undo.", severity="warning")
            return
        returned = [side.conversation.undo() for side in self.sides]
        for pane in self.panes:
            pane.error = ""
            pane.faster = False
            await pane.rebuild()
        user = next((t for t in returned if t is not None), None)
        if user is not None:
            self._give_back(user.content)
            self.notify("Removed the last exchange on both sides.")
        self._refresh_scoreboard()

    async def action_clear_both(self) -> None:
        if self.streaming:
            self.notify("A reply is still streaming: stop it (Esc) before you clear the chat.", severity="warning")
            return
        for side in self.sides:
            side.conversation.clear()
        for pane in self.panes:
            pane.error = ""
            pane.faster = False
            await pane.rebuild()
        self._refresh_scoreboard()
