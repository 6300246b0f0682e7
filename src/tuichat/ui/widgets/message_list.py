"""The scrolling list of messages, and the one place that maps a turn of the chat to the widget showing it.

It follows the bottom only while the user is at the bottom (Textual's anchor). Selection (to copy one message)
lives here too: it is a property of what is shown, not of the chat.
"""

from __future__ import annotations

from collections.abc import Iterable

from textual.containers import VerticalScroll

from tuichat.chat.turns import Turn
from tuichat.ui.widgets.note_message import NoteMessage
from tuichat.ui.widgets.reply_message import ReplyMessage
from tuichat.ui.widgets.user_message import UserMessage

MessageWidget = UserMessage | ReplyMessage | NoteMessage


def message_widget(turn: Turn) -> MessageWidget:
    if turn.role == "user":
        return UserMessage(turn)
    if turn.role == "assistant":
        return ReplyMessage(turn)
    return NoteMessage(turn)


class MessageList(VerticalScroll):
    """The scrolling list of messages; follows the bottom only while the user is at the bottom."""

    can_focus = True

    def on_mount(self) -> None:
        self.anchor()

    def messages(self) -> list[MessageWidget]:
        return [w for w in self.children if isinstance(w, UserMessage | ReplyMessage | NoteMessage)]

    def showing(self, turns: Iterable[Turn]) -> list[MessageWidget]:
        """The widgets that show these turns (by identity: two turns may hold the same text)."""
        ids = {id(t) for t in turns}
        return [w for w in self.messages() if id(w.turn) in ids]

    def showing_message(self, msg_id: int) -> MessageWidget | None:
        return next((w for w in self.messages() if w.turn.msg_id == msg_id), None)

    def selectable(self) -> list[UserMessage | ReplyMessage]:
        return [w for w in self.children if isinstance(w, UserMessage | ReplyMessage)]

    def selected_turn(self) -> Turn | None:
        return next((w.turn for w in self.selectable() if w.has_class("selected")), None)

    def select(self, step: int) -> bool:
        """Move the selection by `step` (from the newest end when none is selected); False when empty."""
        widgets = self.selectable()
        if not widgets:
            return False
        current = next((i for i, w in enumerate(widgets) if w.has_class("selected")), None)
        index = (len(widgets) - 1 if step < 0 else 0) if current is None else current + step
        index = max(0, min(index, len(widgets) - 1))
        for widget in widgets:
            widget.remove_class("selected")
        target = widgets[index]
        target.add_class("selected")
        self.release_anchor()
        self.scroll_to_widget(target, animate=False)
        return True

    def clear_selection(self) -> None:
        for widget in self.selectable():
            widget.remove_class("selected")
        self.anchor()
