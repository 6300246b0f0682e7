"""The chat screen's side of a reply: the engine's events drawn into the message list and the status line.

The live reply is mounted when the engine says the server took the request (ReplyOpened), and its text is written
in flushes about 30 times a second (FLUSH_EVERY); the first words go out at once, in the same frame as the message
just sent (`ChatBase._hold_echo`). A finished reply becomes one cheap widget (`ReplyMessage.finish`).
"""

from __future__ import annotations

import contextlib

from textual.css.query import NoMatches
from textual.timer import Timer
from textual.widget import AwaitMount

from tuichat.chat.conversation import (
    Event,
    ModelChosen,
    Notice,
    ReadOnly,
    ReplyCounted,
    ReplyDelta,
    ReplyFailed,
    ReplyFinished,
    ReplyOpened,
    ReplyStarted,
)
from tuichat.chat.turns import Turn
from tuichat.ui.screens.chat_base import ChatBase
from tuichat.ui.widgets.reply_message import ReplyMessage, stats_text

FLUSH_EVERY = 0.033  # seconds between writes into the live Markdown stream (about 30 a second)


class ReplyEvents(ChatBase):
    """Drawing the engine's events on the chat screen (see the module docstring)."""

    _live: ReplyMessage | None = None  # the reply streaming now
    _live_mounting: AwaitMount | None = None  # the live reply's mount, until a flush has waited for it
    _flusher: Timer | None = None
    _shown_stats = ""  # the stats text the status line ends with, to swap when a token count arrives

    def _init_reply_events(self) -> None:
        self._pending: list[str] = []  # text that came since the last flush
        self._replacing: list[Turn] = []  # the turns a Retry replaces, shown until new text is here

    def _on_event(self, event: Event) -> None:
        # A reply that ends while the app shuts down (quit, hang-up) is saved; nothing is left to draw it on.
        with contextlib.suppress(NoMatches):
            self._show_event(event)

    def _show_event(self, event: Event) -> None:
        if isinstance(event, ReplyStarted):
            self._hold_echo()
            self.status_line.set(state="streaming", last="waiting for first token")
        elif isinstance(event, ModelChosen):
            self.status_line.set(model=event.model)
        elif isinstance(event, ReplyOpened):
            # Mounted once the request is out, while the server works on the first token; mounting it before the
            # request kept the request waiting (its composing ran between the request's awaits). The first chunk
            # may come before the mount is done: _flush waits for it.
            self._live = ReplyMessage(event.reply, live=True)
            self._owner.status.ledger.started(id(event.reply))
            self._live_mounting = self.messages.mount(self._live)
            self._flusher = self.set_interval(FLUSH_EVERY, self._flush)
        elif isinstance(event, ReplyDelta):
            self._pending.append(event.text)
            if event.first:
                self.call_later(self._flush)  # the first words go out at once
                self.status_line.set(last="receiving")
                for widget in self.messages.showing(self._replacing):
                    widget.remove()  # new text is here: the reply it replaces can go for good
                self._replacing = []
        elif isinstance(event, ReplyFinished):
            self._reply_finished(event)
        elif isinstance(event, ReplyFailed):
            self._reply_failed(event)
        elif isinstance(event, ReplyCounted):
            self.run_worker(self._reply_counted(event.reply), group="count", exit_on_error=False)
        elif isinstance(event, ReadOnly):
            self._read_only_event(event)
        elif isinstance(event, Notice):
            self.notify(event.text, severity=event.severity)

    async def _flush(self) -> None:
        # On a timer rather than per chunk: ~30 writes a second keep Markdown cheap.
        mounting = self._live_mounting
        if mounting is not None and self._live is not None and self._pending:
            await mounting  # the reply's widgets exist before text goes into them
            self._live_mounting = None
        if self._live is not None and self._pending and self._live_mounting is None:
            text = "".join(self._pending)
            self._pending.clear()
            await self._live.write(text)
            self._release_echo()  # the first words are in the reply's widgets: draw them with the sent message

    def _stream_ended(self) -> ReplyMessage | None:
        self._release_echo()
        self._live_mounting = None
        if self._flusher is not None:
            self._flusher.stop()
            self._flusher = None
        self._pending.clear()
        widget, self._live = self._live, None
        if widget is not None:
            self._owner.status.ledger.ended(id(widget.turn))
            self._owner.status.read_fleet_soon()
        return widget

    def _reply_finished(self, event: ReplyFinished) -> None:
        mounting = self._live_mounting
        widget = self._stream_ended()
        app = self._owner
        app.status.view.last_reply = event.stats
        meter = app.status.view.context
        if meter is not None and event.usage is not None and event.usage.prompt_tokens is not None:
            meter.record_usage(event.usage.prompt_tokens, event.usage.completion_tokens or 0)
        app.status.redraw()
        self._shown_stats = stats_text(event.stats)
        if event.error is None:
            mark = "stopped" if event.state == "stopped" else ""
            self.status_line.set(state="ready", last=" · ".join(p for p in (mark, self._shown_stats) if p))
        if widget is not None:
            self.call_later(self._finish_when_mounted, widget, mounting)

    async def _finish_when_mounted(self, widget: ReplyMessage, mounting: AwaitMount | None) -> None:
        # a short reply can end before its widget (mounted when the request went out) is in place
        if mounting is not None:
            await mounting
        await widget.finish()

    def _reply_failed(self, event: ReplyFailed) -> None:
        if event.partial_kept:  # after ReplyFinished: the text stays, the failure is said
            self.add_note("error", event.error)
            state_word = "ready" if event.kind in ("stall", "in_band") else event.kind
            self.status_line.set(state=state_word, last=" · ".join(p for p in ("cut off", self._shown_stats) if p))
            return
        widget = self._stream_ended()
        if widget is not None:
            widget.remove()
        for hidden in self.messages.showing(self._replacing):
            hidden.display = True  # a failed retry loses nothing: the old reply is back
        self._replacing = []
        if event.kind == "stopped":
            self.status_line.set(state="ready", last="stopped before the first token")
            return
        if event.returned is not None:
            for shown in self.messages.showing([event.returned]):
                shown.remove()
            self._give_back(event.returned)
            if self.conversation.conversation_id is None:
                self._set_title("")
        meter = self._owner.status.view.context
        if event.kind == "too_long" and meter is not None and event.detail:
            meter.learn_from_error(event.detail)
            self._owner.status.redraw()
        self.add_note("error", event.error)
        self.status_line.set(state={"connect": "unreachable", "empty": "ready"}.get(event.kind, event.kind), last="")

    async def _reply_counted(self, reply: Turn) -> None:
        before, now = self._shown_stats, stats_text(reply.stats)
        if reply is self.conversation.chat.last_reply():
            self._owner.status.view.last_reply = reply.stats
            self._owner.status.redraw()
            line = self.status_line
            if not self.streaming and before and line.last.endswith(before):
                line.set(last=line.last[: -len(before)] + now)
                self._shown_stats = now
        for widget in self.messages.showing([reply]):
            if isinstance(widget, ReplyMessage):
                await widget.show_stats()

    def _read_only_event(self, event: ReadOnly) -> None:
        if event.released:
            self._mark_read_only(None)
            self.notify("The other tuichat has let go of this chat: it continues here.")
            return
        self.notify(
            f"{event.held_by.sentence()} It is read-only here: start a new chat "
            f"({self._owner.key_name('new_chat')}), or quit that tuichat first.",
            severity="warning",
            timeout=10,
        )
