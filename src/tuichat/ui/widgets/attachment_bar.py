"""The bar above the prompt naming the images that go with the next message (hidden while there are none)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text
from textual.widgets import Static

from tuichat.chat.turns import Attachment


class AttachmentBar(Static):
    """The images attached to the next message; the bar holds them, so what is shown is what is sent."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__("", markup=False, id=id)
        self.attachments: list[Attachment] = []

    def on_mount(self) -> None:
        self.display = False

    def set_attachments(self, attachments: Sequence[Attachment]) -> None:
        self.attachments = list(attachments)
        if not self.attachments:
            self.display = False
            return
        text = Text("Attached: ", style="bold")
        for att in self.attachments:
            text.append(f"[🖼 {att.label()}] ", style="cyan")
        text.append("· shift+f8 or /image clear removes", style="dim")
        self.update(text)
        self.display = True

    def add(self, attachment: Attachment) -> None:
        self.set_attachments([*self.attachments, attachment])

    def take(self) -> list[Attachment]:
        """The attachments, for a message being sent; the bar is empty afterwards."""
        taken = self.attachments
        self.set_attachments([])
        return taken
