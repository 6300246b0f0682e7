"""The chat screen: renders one `tuichat.chat.conversation.Conversation`'s events into the message list, the
prompt, the status line and the panes, and turns the chat keys into calls on it.

Every reply-state rule (what Retry hides, what a failed request gives back, how a reply ended, what is saved)
lives in the engine; this screen only shows what the events say. The chat keys are this screen's BINDINGS, so a
screen pushed on top (help, history, server panel) switches them off by being on top. Saved chats, copying and
images are parts of their own (`chat_saved`, `chat_copy`, `chat_images` on `chat_base`).

The footer is built once: no key's availability changes with a reply (a key that cannot act now says why when
pressed), so nothing asks Textual's Footer to rebuild its keys per reply; each rebuild left its old key widgets
behind.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace
from typing import TYPE_CHECKING, ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import ActiveBinding, Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.timer import Timer
from textual.widget import AwaitMount, MountError, Widget
from textual.widgets import Input, TextArea

from tuichat.chat.client import ChatClient
from tuichat.chat.conversation import (
    Conversation,
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
from tuichat.ui.keyids import screen_bindings
from tuichat.ui.screens.chat_copy import CopyAndSelect
from tuichat.ui.screens.chat_images import ImageAttachments
from tuichat.ui.screens.chat_saved import SavedChats
from tuichat.ui.widgets.attachment_bar import AttachmentBar
from tuichat.ui.widgets.key_footer import KeyFooter
from tuichat.ui.widgets.message_list import MessageList
from tuichat.ui.widgets.prompt_area import PromptArea
from tuichat.ui.widgets.reply_message import ReplyMessage, stats_text
from tuichat.ui.widgets.sampling_pane import SamplingPane
from tuichat.ui.widgets.status_line import StatusLine

if TYPE_CHECKING:
    from tuichat.ui.app import TuichatApp
    from tuichat.ui.widgets.status_pane import StatusPane

WIDE = 140  # from this width the sampling pane shows by default (each visible pane costs layout per frame)
WIDER = 170  # and from this one the status pane too
# Hidden panes are mounted this long after start-up, so that F2/F3 show them at once later: not sooner, where
# their ~100 ms would delay a restored history's first screen (a key that wants one mounts it at once anyway).
PANES_LATER_S = 1.0
FLUSH_EVERY = 0.033  # seconds between writes into the live Markdown stream (about 30 a second)


class ChatScreen(SavedChats, CopyAndSelect, ImageAttachments):
    """The chat: messages, prompt, attachments, sampling and status panes, status line."""

    # Keys, labels and help texts come from tuichat.keymap (every binding of its "chat" scope).
    BINDINGS: ClassVar[list[BindingType]] = screen_bindings("chat")

    def __init__(self, app: TuichatApp, client: ChatClient) -> None:
        super().__init__()
        self._owner = app
        self.conversation = Conversation(
            client,
            model=app.target.model,
            sampling=app.config.sampling,
            store=None,  # the app opens the store on mount and hands it over
            on_event=self._on_event,
            hold=True,
            count_tokens=True,
        )
        self._live: ReplyMessage | None = None
        self._live_mount: AwaitMount | None = None  # until the live reply is in, the first text waits for it
        self._live_mounted: tuple[Widget, ...] = ()  # what that mount puts in
        self._flushing = asyncio.Lock()
        self._pending: list[str] = []
        self._flusher: Timer | None = None
        self._replacing: list[Turn] = []
        self._shown_stats = ""  # the stats text the status line ends with, to swap when a token count arrives
        self._cut: frozenset[str] = frozenset()  # the keys the footer has no room for at this width
        self._panes_lock = asyncio.Lock()  # the after-first-frame mount and a pane key must not both mount one

    # -- layout -----------------------------------------------------------------------------------------------

    def _panes_shown(self) -> tuple[bool, bool]:
        """Whether the sampling and the status pane show at the start (config, else the terminal's width)."""
        app = self._owner
        show, show_status = app.config.ui.show_sampling, app.config.ui.show_status
        width = app.size.width
        return (width >= WIDE if show is None else show), (width >= WIDER if show_status is None else show_status)

    def compose(self) -> ComposeResult:
        # A hidden pane is mounted only a while after start-up (PANES_LATER_S): the two are about 30 of the first
        # frame's 45 widgets, and each costs styling and composing. A shown one is part of the first frame.
        show_sampling, show_status = self._panes_shown()
        with Horizontal(id="body"):
            with Vertical(id="chat-column"):
                yield MessageList(id="conversation")
                yield AttachmentBar(id="attachments")
                yield PromptArea(id="prompt")
            if show_sampling:
                yield SamplingPane(self.conversation.sampling, id="sampling")
            if show_status:
                from tuichat.ui.widgets.status_pane import StatusPane  # else loaded when it is mounted

                yield StatusPane(id="status")
        yield StatusLine(id="statusline")
        yield KeyFooter()

    def on_mount(self) -> None:
        self._no_blink(self)
        if self._sampling_pane() is None or self.status_pane() is None:
            self.set_timer(PANES_LATER_S, self._mount_panes_later)
        self._owner.chat_mounted()

    def _no_blink(self, root: Widget) -> None:
        if not self._owner.options.cursor_blink:
            for widget in root.query(Input).results():
                widget.cursor_blink = False
            for area in root.query(TextArea).results():
                area.cursor_blink = False

    def _sampling_pane(self) -> SamplingPane | None:
        # query_one, not a query: a DOMQuery's truth test and first() walk every widget twice (~0.6 ms per Enter)
        try:
            return self.query_one("#sampling", SamplingPane)
        except NoMatches:
            return None

    def status_pane(self) -> StatusPane | None:
        """The status pane, once mounted (its module loads with it, not before)."""
        try:
            found = self.query_one("#status")  # (not a query's truth test, which walks every widget)
        except NoMatches:
            return None
        from tuichat.ui.widgets.status_pane import StatusPane  # loaded by then: the pane is mounted

        return found if isinstance(found, StatusPane) else None

    async def _mount_panes_later(self) -> None:
        # Not while a reply streams, nor while a message is being typed: their ~100 ms of composing and styling
        # would be a stall in the reply, or between the Enter that comes and its request (seen in the bench).
        if self.streaming or self.prompt.text.strip():
            self.set_timer(PANES_LATER_S, self._mount_panes_later)
            return
        # A quick quit can come before the first frame is out: then there is nothing left to mount into.
        with contextlib.suppress(MountError, NoMatches):
            await self._mount_hidden_panes()

    async def _mount_hidden_panes(self) -> tuple[SamplingPane, StatusPane]:
        """The panes the first frame left out, mounted hidden (also on demand, for a key that wants one)."""
        async with self._panes_lock:
            return await self._mount_panes_now()

    async def _mount_panes_now(self) -> tuple[SamplingPane, StatusPane]:
        body = self.query_one("#body", Horizontal)
        sampling, status = self._sampling_pane(), self.status_pane()
        mounted: list[Widget] = []
        if sampling is None:
            sampling = SamplingPane(self.conversation.sampling, id="sampling")
            sampling.display = False
            await body.mount(sampling, after=self.query_one("#chat-column"))
            mounted.append(sampling)
        if status is None:
            from tuichat.ui.widgets.status_pane import StatusPane

            status = StatusPane(id="status")
            status.display = False
            await body.mount(status)
            mounted.append(status)
        for pane in mounted:
            self._no_blink(pane)
        if mounted:
            self._owner.status.redraw()  # a reading that came before the pane existed is drawn now
        return sampling, status

    @property
    def active_bindings(self) -> dict[str, ActiveBinding]:
        """Quit first, as the chat's footer always had it (it is the app's binding, so Textual would put it after
        the chat's keys), and only the keys that fit whole: a key cut off by the width would show no label, so it
        leaves the footer (the help and the keys panel still list it)."""
        bindings = self._ordered_bindings()
        self._cut = self._footer_cut(bindings)
        for key in self._cut:
            active = bindings[key]
            bindings[key] = active._replace(binding=replace(active.binding, show=False))
        return bindings

    def _ordered_bindings(self) -> dict[str, ActiveBinding]:
        bindings = super().active_bindings
        first = {key: active for key, active in bindings.items() if active.binding.id == "quit"}
        return first | {key: active for key, active in bindings.items() if key not in first}

    def _footer_cut(self, bindings: dict[str, ActiveBinding]) -> frozenset[str]:
        """The keys of shown bindings that do not fit the footer at this width (each takes key, label, 3 cells)."""
        app = self.app

        def width(binding: Binding) -> int:
            return len(app.get_key_display(binding)) + len(binding.description) + 3

        room = self.size.width
        palette = bindings.get(app.COMMAND_PALETTE_BINDING)
        if app.ENABLE_COMMAND_PALETTE and palette is not None:
            room -= width(palette.binding)
        cut: set[str] = set()
        seen: set[str] = set()  # the Footer shows one key per action
        for key, active in bindings.items():
            binding = active.binding
            if binding.show and binding.action not in seen:
                seen.add(binding.action)
                room -= width(binding)
                if room < 0:
                    cut.add(key)
        return frozenset(cut)

    def on_resize(self) -> None:
        # Only when the keys that fit change: each rebuild of Textual's Footer restyles (and keeps) its keys.
        if self._footer_cut(self._ordered_bindings()) != self._cut:
            self.refresh_bindings()

    # -- the engine's events ----------------------------------------------------------------------------------

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
            # The request is out: the sent message and the reply are mounted while the server prefills, so the
            # first chunk only has to be written (that is the TTFT).
            self._live = ReplyMessage(event.reply, live=True)
            self._owner.status.ledger.started(id(event.reply))
            # one mount for both: one compose and styling pass, not two
            self._live_mounted = (*self._take_sent(), self._live)
            self._live_mount = self.messages.mount(*self._live_mounted)
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
        # On a timer rather than per chunk: ~30 writes a second keep Markdown cheap. One flush at a time: a quick
        # server's first chunk can come while the reply (mounted once the request was out) is still being
        # composed, and the first flush waits for it; the timer's flushes wait their turn, so the words stay in
        # order.
        async with self._flushing:
            if self._live is None or not self._pending:
                return
            if self._live_mount is not None:
                mounting, self._live_mount = self._live_mount, None
                mounted, self._live_mounted = self._live_mounted, ()  # (not kept: they outlive their reply)
                # awaiting a finished mount still hands the loop over, and a frame drawn then (before the words)
                # held the words back by the frame cap: 15 ms when the first chunk came after the echo
                if not all(widget.is_mounted for widget in mounted):
                    await mounting
                if self._live is None:
                    return
            text = "".join(self._pending)
            self._pending.clear()
            await self._live.write(text)
            self._release_echo()  # the first words are in the reply's widgets: draw them with the sent message

    def _stream_ended(self) -> ReplyMessage | None:
        self._release_echo()
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
            self.call_later(widget.finish)

    def _reply_failed(self, event: ReplyFailed) -> None:
        if event.partial_kept:  # after ReplyFinished: the text stays, the failure is said
            self.add_note("error", event.error)
            state_word = "ready" if event.kind in ("stall", "in_band") else event.kind
            self.status_line.set(state=state_word, last=" · ".join(p for p in ("cut off", self._shown_stats) if p))
            return
        if event.returned is not None and event.returned is self._sent:
            self._sent = None  # it goes back to the prompt without ever being shown
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

    # -- sending ----------------------------------------------------------------------------------------------

    @on(PromptArea.Submitted)
    def _submitted(self, event: PromptArea.Submitted) -> None:
        self.send(event.text)

    def send(self, text: str) -> bool:
        """Send what the user typed; returns False (and says why) when it cannot go now."""
        stripped = text.strip()
        if stripped == "/image" or stripped.startswith("/image "):
            argument = stripped[len("/image") :].strip()
            if argument == "clear":
                self.action_clear_attachments()
                self.prompt.text = ""
            else:
                self.run_worker(self.attach_image(argument, typed=text), group="attach")
            return False
        if not stripped and not self.attachments.attachments:
            return False
        if self.refuse_while_streaming("send") or self._owner.refuse_before_ready():
            return False
        if not self.conversation.may_change():
            return False  # another tuichat holds this chat: only it may add to it
        pane = self._sampling_pane()
        error = pane.first_error() if pane is not None else None
        if error:
            self.notify(f"Fix the sampling pane first: {error}", severity="error")
            return False
        self._warn_if_too_long(text)
        return self._hand_over(text)

    # -- the chat keys ----------------------------------------------------------------------------------------

    async def action_stop(self) -> None:
        if self.streaming:
            # Wait for the reply to end (it saves and redraws at once), so that a key pressed right after Esc,
            # e.g. the retry key, finds the chat ready instead of being refused.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.conversation.stop(), timeout=2.0)
        elif self.messages.selected_turn() is not None:
            self.messages.clear_selection()

    def action_retry(self) -> None:
        if self.refuse_while_streaming("retry") or self._owner.refuse_before_ready():
            return
        # hidden (not deleted) until the new reply's first token; before the retry starts, which with eager
        # tasks (Python 3.12) can fail inside retry() and show them again
        hidden = self._replacing = self.conversation.chat.trailing_after_last_user()
        widgets = self.messages.showing(hidden)
        for widget in widgets:
            widget.display = False
        if not self.conversation.retry():
            self._replacing = []
            for widget in widgets:
                widget.display = True

    async def action_undo(self) -> None:
        if self.refuse_while_streaming("undo"):
            return
        chat = self.conversation.chat
        last_user = chat.last_index("user")
        gone = list(chat.turns if last_user is None else chat.turns[last_user:])
        user = self.conversation.undo()
        still = {id(t) for t in self.conversation.chat.turns}
        removed = [t for t in gone if id(t) not in still]
        if not removed:
            return  # the engine said why: nothing to undo, or another tuichat holds the chat
        for widget in self.messages.showing(removed):
            await widget.remove()
        if user is not None:
            self._give_back(user)  # like Gradio's Undo: the message comes back for editing
        if self.conversation.conversation_id is None:
            self._set_title("")
        self.notify("Removed the last exchange.")

    def action_clear(self) -> None:
        if self.refuse_while_streaming("clear the chat") or not self.conversation.may_change():
            return
        count = sum(1 for t in self.conversation.chat.turns if t.role in ("user", "assistant"))
        if not count:
            self.run_worker(self._clear_now())
            return
        from tuichat.ui.screens.dialogs import ConfirmScreen

        def answer(yes: bool | None) -> None:
            if yes:
                self.run_worker(self._clear_now())

        question = f"Clear the {count} messages of this chat? They are deleted from the history."
        self.app.push_screen(ConfirmScreen(question), answer)

    async def _clear_now(self) -> None:
        self.conversation.clear()
        await self.messages.remove_children()
        self.hidden_turns = 0

    async def action_new_chat(self) -> None:
        if self.refuse_while_streaming("start a new chat") or not self.conversation.new_chat():
            return
        self._set_title("")
        self.hidden_turns = 0
        await self.messages.remove_children()
        self.prompt.focus()
        self.notify("New chat: the previous one stays in the history.")

    # -- panes ------------------------------------------------------------------------------------------------

    async def action_toggle_sampling(self) -> None:
        pane, status = await self._mount_hidden_panes()
        pane.display = not pane.display
        if pane.display:
            if self.size.width < WIDER:
                status.display = False
            pane.query("Input").first().focus()
        else:
            self.prompt.focus()

    async def action_toggle_status(self) -> None:
        sampling, pane = await self._mount_hidden_panes()
        pane.display = not pane.display
        if pane.display:
            pane.show(self._owner.status.view)
            if self.size.width < WIDER:
                sampling.display = False  # one side pane at a time on narrower screens

    @on(SamplingPane.Changed)
    def _sampling_changed(self, event: SamplingPane.Changed) -> None:
        self.conversation.sampling = event.sampling
        self._owner.sampling_changed(event.sampling)

    # -- other screens (the app routes them) ------------------------------------------------------------------

    def action_help(self) -> None:
        self._owner.show_help()

    def action_history(self) -> None:
        self._owner.show_history()

    def action_server(self) -> None:
        self._owner.show_server()

    def action_models(self) -> None:
        self._owner.show_models()

    def action_fleet(self) -> None:
        self._owner.show_fleet()
