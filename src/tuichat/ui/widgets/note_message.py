"""An error or notice line in the conversation: shown to the user, never sent to the model."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from tuichat.chat.turns import Turn


class NoteMessage(Static):
    """An error or notice line in the conversation (never sent to the model)."""

    def __init__(self, turn: Turn) -> None:
        prefix = "⚠ " if turn.role == "error" else "ℹ "
        super().__init__(Text(prefix + turn.content), classes=f"message {turn.role}", markup=False)
        self.turn = turn
