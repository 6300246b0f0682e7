"""What every part of the chat screen shares: its engine, its widgets by role, notes, the title, the refusals and
the held echo (a sent message drawn with the first words of its reply).

The chat screen is one `ChatScreen` built from small parts (`chat_saved`, `chat_copy`, `chat_images`), each a
class on this base, so a part reads the same `conversation`, `messages` and `prompt` as the screen itself and
mypy checks every use. Only `ChatScreen` holds bindings and composes widgets.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, TypeVar

from textual import events
from textual.containers import Container
from textual.screen import Screen
from textual.widget import Widget

from tuichat.chat.conversation import Conversation, ReadOnly
from tuichat.chat.turns import Turn
from tuichat.ui.frame_timer import PacedFrames
from tuichat.ui.widgets.attachment_bar import AttachmentBar
from tuichat.ui.widgets.message_list import MessageList, message_widget
from tuichat.ui.widgets.prompt_area import PromptArea
from tuichat.ui.widgets.reply_message import ReplyMessage
from tuichat.ui.widgets.status_line import StatusLine
from tuichat.ui.widgets.user_message import UserMessage

if TYPE_CHECKING:
    from tuichat.chat.holders import HeldBy
    from tuichat.ui.app import TuichatApp


# After Enter the screen is not repainted until the reply's first words are in, or this long: the message just
# sent and the first words then come in one frame. Drawn apart, the first frame (the sent message, the new reply's
# widgets, about 15 ms of layout) was still being drawn when a quick server's first chunk came, and the chunk
# waited for it: 50 -> 34 ms from Enter to the first word against the stand-in. 40 ms is far below what reads as
# a delay of the echo.
ECHO_WAIT_S = 0.04

W = TypeVar("W", bound=Widget)


class ChatBase(PacedFrames, Screen[None]):
    """The chat screen's shared state and widget accessors (see the module docstring)."""

    _owner: TuichatApp
    conversation: Conversation
    hidden_turns: int = 0  # turns of a restored conversation not mounted yet
    restoring: bool = False  # the saved chat named at start-up is being shown (the app waits for it)
    _title: str = ""  # the open chat's title, which sub_title shows with the read-only mark
    _refused: tuple[str, float] = ("", 0.0)  # the last refusal said, and when (not repeated while on screen)
    _echo_hold: contextlib.ExitStack | None = None  # repaints held until a reply's first words (ECHO_WAIT_S)
    warmed_up: bool = False  # warm_up_widgets has run
    _sent: Turn | None = None  # the message just sent, until its widget is mounted (_show_sent)

    def __init__(self) -> None:
        super().__init__()
        self._parts: dict[type[Widget], Widget] = {}  # _part's finds
        self._resumed = False

    def _on_screen_resume(self, event: events.ScreenResume) -> None:
        # Runs before Screen's own handler for the event. A screen resumed restyles all of its widgets, in case the
        # theme or the stylesheet changed while it was away; the first resume comes right after compose styled
        # them all, and styled the whole first frame a second time (20 of its 41 style passes; ~1.5 ms, as the
        # stylesheet's cache makes the second pass cheaper).
        if not self._resumed:
            self._resumed = True
            event.refresh_styles = False

    def _part(self, kind: type[W]) -> W:
        """The screen's one widget of a kind, looked up once: a query walks the tree and matches selectors (about
        0.2 ms each, and Enter asked five times). Looked up again once it is no longer attached, so a screen
        being taken down raises NoMatches as a query would."""
        part = self._parts.get(kind)
        if not isinstance(part, kind) or not part.is_attached:  # (isinstance: the dict's values are any Widget)
            part = self._parts[kind] = self.query_one(kind)
        return part

    @property
    def messages(self) -> MessageList:
        return self._part(MessageList)

    @property
    def prompt(self) -> PromptArea:
        return self._part(PromptArea)

    @property
    def status_line(self) -> StatusLine:
        return self._part(StatusLine)

    @property
    def attachments(self) -> AttachmentBar:
        return self._part(AttachmentBar)

    @property
    def streaming(self) -> bool:
        return self.conversation.streaming

    def add_note(self, role: str, text: str) -> None:
        turn = self.conversation.chat.add(Turn("error" if role == "error" else "notice", text))
        self.messages.mount(message_widget(turn))

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

    def _give_back(self, turn: Turn) -> None:
        """Put a message back into the prompt, ahead of whatever was typed since, with its images."""
        prompt = self.prompt
        typed = prompt.text
        prompt.text = turn.content + ("\n\n" + typed if typed.strip() else "")
        kept = [a for a in self.attachments.attachments if a not in turn.attachments]
        self.attachments.set_attachments(turn.attachments + kept)

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

    # -- what the user sees of a held chat --------------------------------------------------------------------

    def _set_title(self, title: str) -> None:
        self._title = title
        self._mark_read_only(self.conversation.held_by)

    def _mark_read_only(self, held: HeldBy | None) -> None:
        """Say where the user looks (title and the empty prompt) that the chat shown belongs to another tuichat."""
        self.app.sub_title = self._title + (f" · read-only, open in pid {held.pid}" if held is not None else "")
        self.prompt.placeholder = f"read-only: another tuichat (pid {held.pid}) has this chat open" if held else ""

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

    async def warm_up_widgets(self) -> None:
        """Mount a sent message and a live reply once, unseen, with a first word, then remove them. The first
        widget of each class registers its CSS, and Textual then parses the whole stylesheet again and rebuilds
        its rules: that was ~3 ms of the first Enter's path, paid here while the user reads the first screen."""
        box = Container(UserMessage(Turn("user", "warm")), reply := ReplyMessage(Turn("assistant", ""), live=True))
        box.display = False
        await self.mount(box)
        await reply.write("warm")  # the plain first words, then the live Markdown taking over
        await reply.write(" *up*")
        await box.remove()
        self.warmed_up = True

    def _hand_over(self, text: str) -> bool:
        """Give the engine the message typed (with the images attached); False when it refuses. The prompt and
        the images are emptied first: Textual runs tasks eagerly on Python 3.12+ (App.run), so the reply's first
        step, even its failure, can come inside `conversation.send`, and a failure gives the message back."""
        self._owner.open_history()  # (at once if the first screen is not out yet: the message is saved)
        prompt, bar = self.prompt, self.attachments
        typed, images = prompt.text, bar.take()
        # keys typed right after Enter may already be in the prompt: keep them, take out only what was sent
        prompt.text = typed[len(text) :] if typed.startswith(text) else ""
        self.messages.anchor()  # a message sent from up in the history: the view follows it and its reply again

        def added(turn: Turn) -> None:
            self._sent = turn  # shown once its request is out (_show_sent), with the reply after it

        if self.conversation.send(text, images, added) is None:
            prompt.text = typed
            bar.set_attachments(images)
            return False
        return True

    def _hold_echo(self) -> None:
        """Hold repaints from Enter until the reply's first words are in, or ECHO_WAIT_S at most."""
        if self._echo_hold is None:
            hold = contextlib.ExitStack()
            hold.enter_context(self.app.batch_update())
            self._echo_hold = hold
            self.app.set_timer(ECHO_WAIT_S, self._release_echo)  # the app's: it runs even if a screen covers this

    def _release_echo(self) -> None:
        self._show_sent()
        hold, self._echo_hold = self._echo_hold, None
        if hold is not None:
            hold.close()
            # Closing the batch wakes the app, not this screen: the layout it held waited for the next thing to
            # wake the screen (a cursor blink, the first chunk), ~120 ms after the echo's wait ran out against a
            # slow stand-in, and the first word's frame then did all of it (bench/RESULTS.md, eighth session).
            self.check_idle()

    def _show_sent(self) -> None:
        """Mount the message just sent. It waits for its request to be out (ReplyOpened), or ECHO_WAIT_S: mounted
        at Enter, its composing and styling ran between the request's own steps and held the request back."""
        sent = self._take_sent()
        if sent:
            self.messages.mount(*sent)

    def _take_sent(self) -> list[Widget]:
        """The widget of the message just sent, not mounted yet (none once it is): a caller mounts it."""
        turn, self._sent = self._sent, None
        return [message_widget(turn)] if turn is not None else []
