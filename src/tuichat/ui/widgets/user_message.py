"""A message the user sent, shown as plain text (never markup), with its attached images named under it."""

from __future__ import annotations

from textual.content import Content
from textual.widgets import Static

from tuichat.chat.turns import Turn


class UserMessage(Static):
    """What the user sent; plain text, never markup."""

    def __init__(self, turn: Turn) -> None:
        # Textual's Content rather than a Rich Text: drawn without Rich's console, in the first word's frame
        text = Content(turn.content)
        for att in turn.attachments:
            text += Content.styled(f"\n🖼 {att.label()}", "dim")
        super().__init__(text, classes="message user", markup=False)
        self.turn = turn
