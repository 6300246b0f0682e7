"""The chat screen's image attachments: `/image PATH`, the picker (F8) and dropping them (Shift+F8).

An image is checked and shrunk off the event loop (`tuichat.chat.images.prepare_attachment`) so that the
request still fits what is left of the session; the attachment bar shows what goes with the next message.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from tuichat.ui.screens.chat_base import ChatBase


class ImageAttachments(ChatBase):
    """Attaching images on the chat screen."""

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

    def action_attach_image(self) -> None:
        from tuichat.ui.screens.image_picker import ImagePickerScreen

        def chosen(path: Path | None) -> None:
            if path is not None:
                self.run_worker(self.attach_image(str(path)), group="attach")

        self.app.push_screen(ImagePickerScreen(), chosen)
