"""The compare screen: one prompt, two servers. Each message goes to two `Conversation`s at once; two columns stream
side by side, each headed by its side's profile, model and server and closed by its figures: TTFT, decode tok/s and
tokens of the last reply, the GPU memory its server holds and its KV cache usage. After each round the faster side
(higher decode tok/s) and the lighter one (less GPU memory) are marked. Stop, retry, undo and clear act on both.

Sampling is shared: the sampling pane (F2) edits both sides at once, until F3 points it at one side only (A, then
B, then both again; not F7, the prompt's own "select all"); a field changed for both is set on both, the others
keep their per-side values.

Below `NARROW_WIDTH` columns the two sides do not fit next to each other: one is shown at a time (F4 switches) and a
two-line scoreboard on top keeps both sides' figures in view.

Why it cannot hang: the reply rules (and the streaming tasks) live in `tuichat.chat.conversation`; this screen
only renders their events. Reply text is drawn into a plain `Static` by a timer (synchronous, so nothing can
block on it, and no Markdown stream outlives its widget); only the start and the end of a reply are rendered by
one awaiting reader per side, which survives any failure of one event's rendering and can always be waited on
with a deadline (`settled`). Leaving the screen stops both replies (`shutdown`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Label, Static

from tuichat.chat.conversation import (
    Conversation,
    Event,
    Notice,
    ReplyDelta,
    ReplyFailed,
    ReplyFinished,
    ReplyStarted,
    faster_side,
)
from tuichat.chat.sampling import FIELDS, Sampling
from tuichat.chat.store import Store
from tuichat.cli.batch import Endpoint
from tuichat.server.gpu import GpuReader, format_bytes, memory_split
from tuichat.server.metrics import parse_metrics
from tuichat.ui.frame_timer import PacedFrames
from tuichat.ui.keyids import binding
from tuichat.ui.screens.dialogs import ConfirmScreen
from tuichat.ui.widgets.key_footer import KeyFooter
from tuichat.ui.widgets.message_list import MessageList, message_widget
from tuichat.ui.widgets.prompt_area import PromptArea
from tuichat.ui.widgets.reply_message import stats_text
from tuichat.ui.widgets.sampling_pane import SamplingPane

NARROW_WIDTH = 100
LIVE_EVERY = 0.05  # seconds between redraws of a streaming reply
POLL_EVERY = 2.0  # seconds between readings of GPU memory and KV usage
POLL_TIMEOUT = 3.0  # a reading that takes longer is skipped, never waited on
SIDE_NAMES = ("A", "B")
SamplingTarget = Literal["both", "A", "B"]
TARGETS: tuple[SamplingTarget, ...] = ("both", "A", "B")


@dataclass
class Side:
    """One column: where it sends, the conversation that does it, and how to find its server's processes.

    `pids` lists the server's processes when tuichat launched it or it runs on this machine (else GPU memory is
    unknown); `server` is the launcher's handle when tuichat launched it, `started_here` when this compare run
    started it (so it is stopped on quit unless asked otherwise)."""

    endpoint: Endpoint
    conversation: Conversation
    pids: Callable[[], Collection[int]] | None = None
    server: Any = None
    started_here: bool = False
    gpu_bytes: int | None = field(default=None, init=False)
    kv_usage: float | None = field(default=None, init=False)


def side_title(name: str, side: Side, marks: str = "") -> str:
    """The column's header; the marks come before the URL, so a narrow column cuts the URL, not them."""
    model = side.conversation.model or side.endpoint.model or "first model"
    where = side.endpoint.profile or "url"
    return f"{name}{marks} · {where} · {model} · {side.endpoint.url}"


def reply_figures(stats: dict[str, Any] | None) -> str:
    return "last reply: " + (stats_text(stats) or "no figures") if stats else "no reply yet"


def short_figures(stats: dict[str, Any] | None) -> str:
    """Decode speed and TTFT in a few columns, for the narrow scoreboard."""
    if not stats:
        return "no reply yet"
    speed, ttft = stats.get("decode_tokens_per_s"), stats.get("ttft_s")
    parts = [f"{speed:.0f} tok/s" if isinstance(speed, int | float) else "– tok/s"]
    parts.append(f"TTFT {ttft:.2f}s" if isinstance(ttft, int | float) else "TTFT –")
    return " · ".join(parts)


def server_figures(side: Side) -> str:
    gpu = format_bytes(side.gpu_bytes) if side.gpu_bytes is not None else "–"
    kv = f"{side.kv_usage * 100:.0f}%" if side.kv_usage is not None else "–"
    return f"GPU {gpu} · KV {kv}"


def lighter_side(first: Side, second: Side) -> int | None:
    """0 or 1: the side whose server holds less GPU memory; None when either is unknown or they are equal."""
    a, b = first.gpu_bytes, second.gpu_bytes
    if a is None or b is None or a == b:
        return None
    return 0 if a < b else 1


class _Inbox:
    """The events of one side waiting to be rendered, in order; `busy` while one is being rendered."""

    def __init__(self) -> None:
        self.items: deque[Event] = deque()
        self.ready = asyncio.Event()
        self.busy = False

    def put(self, event: Event) -> None:
        self.items.append(event)
        self.ready.set()

    @property
    def idle(self) -> bool:
        return not self.items and not self.busy


class ComparePane(Vertical):
    """One side: header, the messages, the live reply, the figures and the last error."""

    def __init__(self, index: int, side: Side) -> None:
        super().__init__(classes="side", id=f"side-{SIDE_NAMES[index].lower()}")
        self.index = index
        self.side = side
        self.live: Static | None = None
        self.dirty = False
        self.faster = False
        self.lighter = False
        self.own_sampling = False
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

    def marks(self) -> str:
        return (" ◆ faster" if self.faster else "") + (" ◇ lighter" if self.lighter else "")

    def refresh_header(self) -> None:
        title = side_title(SIDE_NAMES[self.index], self.side, self.marks())
        title += " · own sampling" if self.own_sampling else ""
        self.query_one(".side-title", Static).update(Text(title, no_wrap=True, overflow="ellipsis"))
        self.set_class(self.faster, "faster")
        figures = reply_figures(self.side.conversation.last_stats) + "\n" + server_figures(self.side)
        self.query_one(".side-figures", Static).update(Text(figures))
        error = self.query_one(".side-error", Static)
        error.update(Text(f"⚠ {self.error}" if self.error else ""))
        error.display = bool(self.error)

    async def rebuild(self) -> None:
        """Show the conversation's turns as they stand (after a reply, undo, clear, retry or a failure)."""
        self.live = None
        self.dirty = False
        await self.messages.remove_children()
        # a reply still streaming is the live one's to show: under load its start is drawn after its first words
        # came, and it was shown twice, once frozen at those words
        turns = [t for t in self.side.conversation.chat.turns if t.state != "streaming"]
        await self.messages.mount_all([message_widget(t) for t in turns])

    async def start_live(self) -> None:
        self.live = Static(Text("…"), classes="message assistant live")
        await self.messages.mount(self.live)
        self.messages.anchor()

    def draw_live(self) -> None:
        """Redraw the streaming reply from the conversation's own text (synchronous: it cannot block)."""
        if self.live is None or not self.dirty:
            return
        self.dirty = False
        turns = self.side.conversation.chat.turns
        text = turns[-1].content if turns and turns[-1].role == "assistant" else ""
        self.live.update(Text(text + " …", no_wrap=False))


class CompareScreen(PacedFrames, Screen[None]):
    """Two conversations, one prompt."""

    CSS_PATH = str(Path(__file__).with_name("compare.tcss"))

    BINDINGS: ClassVar[list[BindingType]] = [
        binding("stop", "stop_both"),
        binding("retry", "retry_both"),
        binding("undo", "undo_both"),
        binding("clear", "clear_both"),
        binding("toggle_sampling", "toggle_sampling"),
        Binding("f3", "sampling_side", "Sampling side", id="compare_sampling_side"),
        Binding("f4", "switch_side", "Switch side", id="compare_switch_side"),
        # opened from the chat's "Compare with…": back to the chat (both replies stop first)
        Binding("f12", "close", "Back to chat", id="compare_back"),
    ]

    def __init__(
        self,
        first: Side,
        second: Side,
        *,
        store: Store | None = None,
        gpu_reader: GpuReader | None = None,
        poll_every: float = POLL_EVERY,
    ) -> None:
        super().__init__()
        self.sides = (first, second)
        self.store = store
        self.gpu_reader = gpu_reader
        self.poll_every = poll_every
        self.shown = 0  # the side shown when only one fits
        self.closable = False  # True when pushed over the chat: F12 goes back to it
        self.linked = False
        self.sampling_target: SamplingTarget = "both"
        self.rounds = 0  # rounds that ended on both sides
        self._round_stats: list[dict[str, Any] | None] = [None, None]
        self._round_open = [False, False]
        self._inboxes = [_Inbox(), _Inbox()]
        self._readers: list[asyncio.Task[None]] = []
        self._poller: asyncio.Task[None] | None = None
        self._sampling_lock = asyncio.Lock()
        for index, side in enumerate(self.sides):
            side.conversation.on_event = self._listener(index)

    def compose(self) -> ComposeResult:
        yield Static(id="scoreboard")
        with Horizontal(id="body"):
            with Horizontal(id="sides"):
                for index, side in enumerate(self.sides):
                    yield ComparePane(index, side)
            with Vertical(id="sampling"):
                yield Label("", id="sampling-target")
                yield SamplingPane(self.sides[0].conversation.sampling, id="sampling-pane")
        yield PromptArea(id="prompt")
        yield KeyFooter()

    async def on_mount(self) -> None:
        for pane in self.panes:
            await pane.rebuild()
        self.query_one("#sampling").display = False
        self._show_sampling_target()
        loop = asyncio.get_running_loop()
        self._readers = [loop.create_task(self._read_events(i)) for i in range(len(self.sides))]
        self._poller = loop.create_task(self._poll_figures())
        self.set_interval(LIVE_EVERY, self._draw_live)
        self._layout(self.size.width)
        self.query_one(PromptArea).focus()

    async def on_unmount(self) -> None:
        await self.shutdown()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        return self.closable if action == "close" else True

    async def action_close(self) -> None:
        await self.shutdown()
        self.dismiss()

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Stop both replies (kept, marked interrupted) and this screen's own tasks, each within `timeout`."""
        for side in self.sides:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(side.conversation.stop(interrupted=True), timeout)
        tasks = [t for t in (*self._readers, self._poller) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        self._readers, self._poller = [], None

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
        self._refresh_all()

    def action_switch_side(self) -> None:
        self.shown = 1 - self.shown
        self._layout(self.size.width)

    def _refresh_all(self) -> None:
        self._refresh_marks()
        board = self.query_one("#scoreboard", Static)
        lines = []
        for pane in self.panes:
            shown = "▶" if pane.index == self.shown else " "
            label = pane.side.endpoint.profile or pane.side.endpoint.url
            figures = f"{short_figures(pane.side.conversation.last_stats)} · {server_figures(pane.side)}"
            lines.append(f"{shown} {SIDE_NAMES[pane.index]}{pane.marks()} {label}: {figures}")
        board.update(Text("\n".join(lines), no_wrap=True, overflow="ellipsis"))
        board.display = self.has_class("narrow")
        for pane in self.panes:
            pane.refresh_header()

    def _refresh_marks(self) -> None:
        lighter = lighter_side(*self.sides) if self.rounds else None
        a, b = (side.conversation.sampling for side in self.sides)
        for pane in self.panes:
            pane.lighter = lighter == pane.index
            pane.own_sampling = a != b

    # -- events from the two conversations --------------------------------------------------------------------

    def _listener(self, index: int) -> Callable[[Event], None]:
        def listen(event: Event) -> None:
            if isinstance(event, ReplyDelta):
                # text is drawn by the timer from the conversation itself: no event to queue per chunk
                for pane in self.panes:
                    if pane.index == index:
                        pane.dirty = True
                return
            self._inboxes[index].put(event)

        return listen

    async def _read_events(self, index: int) -> None:
        inbox = self._inboxes[index]
        while True:
            await inbox.ready.wait()
            inbox.ready.clear()
            while inbox.items:
                event = inbox.items.popleft()
                inbox.busy = True
                try:
                    await self._on_event(index, event)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # one event drawn wrong must not stop the side's later ones
                    self.log.error(f"compare: rendering {event!r} failed: {exc!r}")
                finally:
                    inbox.busy = False

    async def settled(self, timeout: float = 10.0) -> None:
        """Until every event received so far has been rendered; TimeoutError after `timeout` seconds."""
        async with asyncio.timeout(timeout):
            while not all(inbox.idle for inbox in self._inboxes):
                await asyncio.sleep(0.01)
        self._draw_live()

    async def _on_event(self, index: int, event: Event) -> None:
        pane = self.panes[index]
        if isinstance(event, ReplyStarted):
            pane.error = ""
            await pane.rebuild()
            await pane.start_live()
        elif isinstance(event, ReplyFinished):
            await pane.rebuild()
            if event.error:
                pane.error = event.error
            self._round_stats[index] = event.stats
            self._end_round(index)
        elif isinstance(event, ReplyFailed):
            pane.error = "" if event.kind == "stopped" else event.error
            if not event.partial_kept:
                await pane.rebuild()
                self._end_round(index)
                if event.returned is not None:
                    self._give_back(event.returned.content)
        elif isinstance(event, Notice):
            self.notify(f"{SIDE_NAMES[index]}: {event.text}", severity=event.severity)
        self._refresh_all()

    def _end_round(self, index: int) -> None:
        if not self._round_open[index]:
            return
        self._round_open[index] = False
        if any(self._round_open):
            return
        self.rounds += 1
        winner = faster_side(*self._round_stats)
        for pane in self.panes:
            pane.faster = winner == pane.index
        if self._poller is not None and not self._poller.done():
            self.run_worker(self._poll_once(), group="compare-poll-now", exclusive=True, exit_on_error=False)

    def _draw_live(self) -> None:
        for pane in self.panes:
            pane.draw_live()

    def _give_back(self, text: str) -> None:
        prompt = self.query_one(PromptArea)
        if text and text not in prompt.text:
            prompt.text = text + ("\n\n" + prompt.text if prompt.text.strip() else "")

    # -- GPU memory and KV usage ------------------------------------------------------------------------------

    async def _poll_figures(self) -> None:
        while True:
            await self._poll_once()
            await asyncio.sleep(self.poll_every)

    async def _poll_once(self) -> None:
        first, second, memory = await asyncio.gather(
            self._kv_usage(self.sides[0]), self._kv_usage(self.sides[1]), self._gpu_memory()
        )
        self.sides[0].kv_usage, self.sides[1].kv_usage = first, second
        for side, used in zip(self.sides, memory, strict=True):
            side.gpu_bytes = used
        self._refresh_all()

    async def _kv_usage(self, side: Side) -> float | None:
        try:
            text = await asyncio.wait_for(side.conversation.client.metrics_text(), POLL_TIMEOUT)
            return parse_metrics(text).kv_cache_usage
        except Exception:  # no /metrics (or not now): the figure shows "–", the chat goes on
            return None

    async def _gpu_memory(self) -> list[int | None]:
        reader = self.gpu_reader
        if reader is None or all(side.pids is None for side in self.sides):
            return [None, None]

        def read() -> list[int | None]:
            snapshot = reader.read()
            if snapshot.error is not None:
                return [None, None]
            used: list[int | None] = []
            for side in self.sides:
                pids = set(side.pids()) if side.pids is not None else set()
                used.append(sum(s.ours_bytes for s in memory_split(snapshot, pids)) if pids else None)
            return used

        try:
            return await asyncio.wait_for(asyncio.to_thread(read), POLL_TIMEOUT)
        except Exception:
            return [None, None]

    # -- sampling ---------------------------------------------------------------------------------------------

    def action_toggle_sampling(self) -> None:
        pane = self.query_one("#sampling")
        pane.display = not pane.display
        if pane.display:
            self.query_one("#sampling-pane Input").focus()
        else:
            self.query_one(PromptArea).focus()

    async def action_sampling_side(self) -> None:
        async with self._sampling_lock:  # two quick presses: the second waits for the first pane swap
            self.sampling_target = TARGETS[(TARGETS.index(self.sampling_target) + 1) % len(TARGETS)]
            container = self.query_one("#sampling")
            container.display = True
            await self.query_one(SamplingPane).remove()
            shown = self.sides[1 if self.sampling_target == "B" else 0].conversation.sampling
            await container.mount(SamplingPane(shown, id="sampling-pane"))
            self._show_sampling_target()

    def _show_sampling_target(self) -> None:
        following = TARGETS[(TARGETS.index(self.sampling_target) + 1) % len(TARGETS)]
        what = "both sides" if self.sampling_target == "both" else f"side {self.sampling_target} only"
        nxt = "both" if following == "both" else f"{following} only"
        self.query_one("#sampling-target", Label).update(Text(f"Sampling for {what} (F3: {nxt})"))

    @on(SamplingPane.Changed)
    def _sampling_changed(self, event: SamplingPane.Changed) -> None:
        event.stop()
        new = event.sampling
        if self.sampling_target == "both":
            base = self.sides[0].conversation.sampling
            changed = [spec.name for spec in FIELDS if getattr(new, spec.name) != getattr(base, spec.name)]
            if new.system_prompt != base.system_prompt:
                changed.append("system_prompt")
            for side in self.sides:
                side.conversation.sampling = _with_values(side.conversation.sampling, new, changed)
        else:
            self.sides[SIDE_NAMES.index(self.sampling_target)].conversation.sampling = new
        self._refresh_all()

    # -- the user's actions -----------------------------------------------------------------------------------

    @on(PromptArea.Submitted)
    def _submitted(self, event: PromptArea.Submitted) -> None:
        self.send(event.text)

    def _refuse_while_streaming(self, what: str) -> bool:
        if self.streaming:
            self.notify(f"A reply is still streaming: stop it (Esc) before you {what}.", severity="warning")
            return True
        return False

    def send(self, text: str) -> bool:
        if not text.strip() or self._refuse_while_streaming("send"):
            return False
        error = self.query_one(SamplingPane).first_error()
        if error:
            self.notify(f"Fix the sampling field first: {error}.", severity="error")
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
        labels = (self.sides[0].endpoint.label, self.sides[1].endpoint.label)
        try:
            self.store.link_pair(ids[0], ids[1], labels)
            self.linked = True
        except Exception as exc:
            self.notify(f"Could not save the pair to the history: {exc}", severity="error")

    async def action_stop_both(self) -> None:
        await asyncio.gather(*(side.conversation.stop() for side in self.sides))

    def action_retry_both(self) -> None:
        if self._refuse_while_streaming("retry"):
            return
        if all(side.conversation.chat.last_index("user") is None for side in self.sides):
            self.notify("Nothing to retry yet.")
            return
        self._open_round()
        for index, side in enumerate(self.sides):
            if not side.conversation.retry():
                self._round_open[index] = False

    async def action_undo_both(self) -> None:
        if self._refuse_while_streaming("undo"):
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
        self._refresh_all()

    def action_clear_both(self) -> None:
        if self._refuse_while_streaming("clear the chat"):
            return

        async def clear() -> None:
            for side in self.sides:
                side.conversation.clear()
            for pane in self.panes:
                pane.error = ""
                pane.faster = False
                await pane.rebuild()
            self._refresh_all()

        def answer(yes: bool | None) -> None:
            if yes:
                self.run_worker(clear(), group="compare-clear", exit_on_error=False)

        self.app.push_screen(ConfirmScreen("Clear both sides? They are removed from the history too."), answer)


def _with_values(target: Sampling, source: Sampling, names: list[str]) -> Sampling:
    for name in names:
        target = target.with_value(name, getattr(source, name))
    return target
