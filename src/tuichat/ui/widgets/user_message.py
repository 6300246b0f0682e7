"""A message the user sent, shown as plain text (never markup), with its attached images named under it."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from tuichat.chat.turns import Turn


class UserMessage(Static):
    """What the user sent; plain text, never markup."""

    def __init__(self, turn: Turn) -> None:
        text = Text(turn.content)
        for att in turn.attachments:
            text.append(f"\n🖼 {att.label()}", style="dim")
        super().__init__(text, classes="message user", markup=False)
        self.turn = turn
