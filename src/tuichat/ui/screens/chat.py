"""The chat screen: renders one `tuichat.chat.conversation.Conversation`'s events into the message list, the
prompt, the status line and the panes, and turns the chat keys into calls on it.

Every reply-state rule (what Retry hides, what a failed request gives back, how a reply ended, what is saved)
lives in the engine; this screen only shows what the events say. The chat keys are this screen's BINDINGS, so a
screen pushed on top (help, history, server panel) switches them off by being on top.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import BindingType
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Footer, Static

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
from tuichat.ui.widgets.attachment_bar import AttachmentBar
from tuichat.ui.widgets.message_list import MessageList, message_widget
from tuichat.ui.widgets.prompt_area import PromptArea
from tuichat.ui.widgets.reply_message import ReplyMessage, stats_text
from tuichat.ui.widgets.sampling_pane import SamplingPane
from tuichat.ui.widgets.status_line import StatusLine
from tuichat.ui.widgets.status_pane import StatusPane

if TYPE_CHECKING:
    from tuichat.chat.store import HeldBy
    from tuichat.ui.app import TuichatApp

RESTORE_LIMIT = 20  # turns mounted when a conversation opens (about a screenful); ctrl+t loads more
FLUSH_EVERY = 0.033  # seconds between writes into the live Markdown stream (about 30 a second)


class ChatScreen(Screen[None]):
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
        self.hidden_turns = 0  # turns of a restored conversation not mounted yet
        self._title = ""  # the open chat's title, which sub_title shows with the read-only mark
        self._code_cycle = 0
        self._live: ReplyMessage | None = None
        self._pending: list[str] = []
        self._flusher: Timer | None = None
        self._replacing: list[Turn] = []
        self._shown_stats = ""  # the stats text the status line ends with, to swap when a token count arrives
        self._refused: tuple[str, float] = ("", 0.0)

    # -- layout -----------------------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        with Horizontal(id="body"):
            with Vertical(id="chat-column"):
                yield MessageList(id="conversation")
                yield AttachmentBar(id="attachments")
                yield PromptArea(id="prompt")
            yield SamplingPane(self.conversation.sampling, id="sampling")
            yield StatusPane(id="status")
        yield StatusLine(id="statusline")
        yield Footer()

    def on_mount(self) -> None:
        self._owner.chat_mounted()

    @property
    def messages(self) -> MessageList:
        return self.query_one(MessageList)

    @property
    def prompt(self) -> PromptArea:
        return self.query_one(PromptArea)

    @property
    def status_line(self) -> StatusLine:
        return self.query_one(StatusLine)

    @property
    def attachments(self) -> AttachmentBar:
        return self.query_one(AttachmentBar)

    @property
    def streaming(self) -> bool:
        return self.conversation.streaming

    def add_note(self, role: str, text: str) -> None:
        turn = self.conversation.chat.add(Turn("error" if role == "error" else "notice", text))
        self.messages.mount(message_widget(turn))

    # -- the engine's events ----------------------------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        # A reply that ends while the app shuts down (quit, hang-up) is saved; nothing is left to draw it on.
        with contextlib.suppress(NoMatches):
            self._show_event(event)

    def _show_event(self, event: Event) -> None:
        if isinstance(event, ReplyStarted):
            self.refresh_bindings()
            self.status_line.set(state="streaming", last="waiting for first token")
        elif isinstance(event, ModelChosen):
            self.status_line.set(model=event.model)
        elif isinstance(event, ReplyOpened):
            # Mounted before the request goes out, so the first chunk only has to be written (that is the TTFT).
            self._live = ReplyMessage(event.reply, live=True)
            self._owner.status.ledger.started(id(event.reply))
            self.messages.mount(self._live)
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
        if self._live is not None and self._pending:
            text = "".join(self._pending)
            self._pending.clear()
            await self._live.write(text)

    def _stream_ended(self) -> ReplyMessage | None:
        if self._flusher is not None:
            self._flusher.stop()
            self._flusher = None
        self._pending.clear()
        widget, self._live = self._live, None
        if widget is not None:
            self._owner.status.ledger.ended(id(widget.turn))
            self._owner.status.read_fleet_soon()
        self.refresh_bindings()
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

    # -- what the user sees of a held chat --------------------------------------------------------------------

    def _set_title(self, title: str) -> None:
        self._title = title
        self._mark_read_only(self.conversation.held_by)

    def _mark_read_only(self, held: HeldBy | None) -> None:
        """Say where the user looks (title and the empty prompt) that the chat shown belongs to another tuichat."""
        self.app.sub_title = self._title + (f" · read-only, open in pid {held.pid}" if held is not None else "")
        self.prompt.placeholder = f"read-only: another tuichat (pid {held.pid}) has this chat open" if held else ""

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
        error = self.query_one(SamplingPane).first_error()
        if error:
            self.notify(f"Fix the sampling pane first: {error}", severity="error")
            return False
        self._warn_if_too_long(text)
        if not self.conversation.send(text, self.attachments.attachments):
            return False
        self.messages.mount(message_widget(self.conversation.chat.turns[-1]))
        self.messages.anchor()  # a message sent from up in the history: the view follows it and its reply again
        # Keys typed right after Enter may already be in the prompt: keep them, take out only what was sent.
        prompt = self.prompt
        prompt.text = prompt.text[len(text) :] if prompt.text.startswith(text) else ""
        self.attachments.take()
        return True

    def _warn_if_too_long(self, text: str) -> None:
        meter = self._owner.status.view.context
        if meter is None or not meter.session_len:
            return
        from tuichat.server.metrics import estimate_tokens

        reserve = self.conversation.sampling.max_tokens or 0
        if meter.would_overflow(estimate_tokens(text) + 8, reserve=reserve):
            key = self._owner.key_name
            self.notify(
                f"This message may not fit: the chat uses ~{meter.used:,} of {meter.session_len:,} tokens. "
                f"Undo earlier exchanges ({key('undo')}) or start a new chat ({key('new_chat')}) if the server "
                "refuses it.",
                severity="warning",
            )

    def _give_back(self, turn: Turn) -> None:
        """Put a message back into the prompt, ahead of whatever was typed since, with its images."""
        prompt = self.prompt
        typed = prompt.text
        prompt.text = turn.content + ("\n\n" + typed if typed.strip() else "")
        kept = [a for a in self.attachments.attachments if a not in turn.attachments]
        self.attachments.set_attachments(turn.attachments + kept)

    def refuse_while_streaming(self, what: str) -> bool:
        """True (after saying so) when a reply is streaming: the key is refused out loud, never typed or lost.
        The same sentence is not repeated while it is still on screen."""
        if not self.streaming:
            return False
        text = f"A reply is still streaming: {self._owner.key_name('stop')} stops it, then {what}."
        now = time.monotonic()
        if self._refused[0] != text or now - self._refused[1] > 3.0:
            self.notify(text, severity="warning", timeout=3)
            self._refused = (text, now)
        return True

    # -- the chat keys ----------------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop":
            return True if self.streaming or self.messages.selected_turn() is not None else None
        return True

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
        hidden = self.conversation.chat.trailing_after_last_user()
        if not self.conversation.retry():
            return
        self._replacing = hidden
        for widget in self.messages.showing(hidden):
            widget.display = False  # hidden, not deleted, until the new reply's first token

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

    # -- a saved chat -----------------------------------------------------------------------------------------

    async def open_conversation(self, conv_id: int, message_id: int | None = None, read_only: bool = False) -> None:
        """Show a saved chat to continue it. One that another tuichat holds is shown read-only when the user
        chose that in F4; otherwise (--continue, --conversation) the chat stays new and a notice says why."""
        from tuichat.chat.store import HeldBy

        store = self.conversation.store
        assert store is not None
        saved = store.get_conversation(conv_id)
        if saved is None:
            self.notify(f"No conversation {conv_id} in the history.", severity="error")
            return
        got = self.conversation.open(conv_id, read_only=read_only)
        if got is None and self.conversation.conversation_id != conv_id:
            return  # the engine has said what is wrong with the history
        if isinstance(got, HeldBy) and not read_only:
            self.notify(
                f"{got.sentence()} This is a new chat; F4 can show that one read-only.", severity="warning", timeout=15
            )
            return
        self._set_title(saved.title)
        held = self.conversation.held_by
        if held is not None:
            self.notify(
                f"{held.sentence()} It is shown read-only here: nothing you do here changes it.",
                severity="warning",
                timeout=10,
            )
        turns = self.conversation.chat.turns
        container = self.messages
        await container.remove_children()
        shown = turns[-RESTORE_LIMIT:]
        self.hidden_turns = len(turns) - len(shown)
        widgets: list[Static | ReplyMessage] = [message_widget(t) for t in shown]
        if self.hidden_turns:
            widgets.insert(0, self._earlier_marker())
        await container.mount_all(widgets)
        target = None
        if message_id is not None:
            while self.hidden_turns and not any(t.msg_id == message_id for t in turns[self.hidden_turns :]):
                await self.action_load_earlier()
            target = container.showing_message(message_id)
        if target is not None:
            container.release_anchor()
            self.call_after_refresh(container.scroll_to_widget, target, animate=False, top=True)
        else:
            container.scroll_end(animate=False)
        self._owner.status.chat_opened(turns)

    def _earlier_marker(self) -> Static:
        text = f"⋯ {self.hidden_turns} earlier messages: {self._owner.key_name('load_earlier')} shows them"
        return Static(Text(text, style="dim"), id="earlier")

    async def action_load_earlier(self) -> None:
        if not self.hidden_turns:
            self.notify("Every message of this chat is shown.")
            return
        container = self.messages
        start = max(0, self.hidden_turns - RESTORE_LIMIT)
        batch = self.conversation.chat.turns[start : self.hidden_turns]
        self.hidden_turns = start
        await self.query("#earlier").remove()
        widgets: list[Static | ReplyMessage] = [message_widget(t) for t in batch]
        if self.hidden_turns:
            widgets.insert(0, self._earlier_marker())
        await container.mount_all(widgets, before=0 if container.children else None)
        if batch:
            # Show what was asked for: the view goes to the first of the messages just loaded.
            container.release_anchor()
            first = widgets[1] if self.hidden_turns else widgets[0]
            self.call_after_refresh(container.scroll_to_widget, first, animate=False, top=True)

    def check_open_conversation_exists(self) -> None:
        """If the chat on screen was deleted from the history, start afresh instead of saving into nothing."""
        if self.conversation.forget_if_deleted():
            self._set_title("")
            self.hidden_turns = 0
            self.messages.remove_children()
            self.notify("The open chat was deleted; this is a new one.")

    # -- copying and selecting --------------------------------------------------------------------------------

    def action_copy_reply(self) -> None:
        selected = self.messages.selected_turn()
        if selected is not None:
            what = "reply" if selected.role == "assistant" else "message"
            self._owner.copy_text(selected.content, f"the selected {what}")
            return
        reply = self.conversation.chat.last_reply()
        if reply is None or not reply.content:
            self.notify("No reply to copy yet.")
            return
        self._owner.copy_text(reply.content, "the last reply")

    def action_copy_code(self) -> None:
        from tuichat.chat.clipboard import extract_code_blocks

        reply = self.conversation.chat.last_reply()
        blocks = extract_code_blocks(reply.content) if reply else []
        if not blocks:
            self.notify("The last reply has no code block.")
            return
        index = self._code_cycle % len(blocks)
        self._code_cycle += 1
        self._owner.copy_text(blocks[index].code, f"code block {index + 1} of {len(blocks)}")

    def action_select_previous(self) -> None:
        if not self.messages.select(-1):
            self.notify("No message to select yet.")

    def action_select_next(self) -> None:
        if not self.messages.select(+1):
            self.notify("No message to select yet.")

    # -- panes ------------------------------------------------------------------------------------------------

    def action_toggle_sampling(self) -> None:
        pane = self.query_one(SamplingPane)
        pane.display = not pane.display
        if pane.display:
            if self.size.width < self._owner.WIDER:
                self.query_one(StatusPane).display = False
            pane.query("Input").first().focus()
        else:
            self.prompt.focus()

    def action_toggle_status(self) -> None:
        pane = self.query_one(StatusPane)
        pane.display = not pane.display
        if pane.display:
            pane.show(self._owner.status.view)
            if self.size.width < self._owner.WIDER:
                self.query_one(SamplingPane).display = False  # one side pane at a time on narrower screens

    @on(SamplingPane.Changed)
    def _sampling_changed(self, event: SamplingPane.Changed) -> None:
        self.conversation.sampling = event.sampling
        self._owner.sampling_changed(event.sampling)

    # -- images -----------------------------------------------------------------------------------------------

    async def attach_image(self, path_text: str, typed: str | None = None) -> None:
        """Attach an image; `typed` is the /image command to clear from the prompt once it worked."""
        if not path_text:
            self.notify("Usage: /image PATH (or /image clear)", severity="warning")
            return
        app = self._owner
        try:
            from tuichat.chat.images import prepare_attachment

            # An image too big for what is left of the session is shrunk until the request fits (the tutorial's
            # llava step got empty replies instead); the note says what was sent.
            meter = app.status.view.context
            server = app.server_link.server
            prepared = await asyncio.to_thread(
                prepare_attachment,
                Path(path_text).expanduser(),
                app.config.ui.max_image_side,
                model=server.profile.model if server is not None else self.conversation.model,
                session_len=meter.session_len if meter is not None else None,
                used_tokens=meter.used if meter is not None else 0,
                pending=list(self.attachments.attachments),
            )
        except Exception as exc:
            self.notify(str(exc), severity="error")
            return
        if prepared.note:
            self.add_note("notice", prepared.note)
        self.attachments.add(prepared.attachment)
        if typed is not None and self.prompt.text == typed:
            self.prompt.text = ""

    def action_clear_attachments(self) -> None:
        if not self.attachments.attachments:
            self.notify("No image is attached.")
            return
        count = len(self.attachments.take())
        self.notify(f"Removed {count} image(s) from the next message.")

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

    def action_attach_image(self) -> None:
        from tuichat.ui.screens.image_picker import ImagePickerScreen

        def chosen(path: Path | None) -> None:
            if path is not None:
                self.run_worker(self.attach_image(str(path)), group="attach")

        self.app.push_screen(ImagePickerScreen(), chosen)
