"""The chat screen's copy and select keys: copy the selected message or the last reply, cycle through the last
reply's code blocks, move the selection. The app does the copying itself (OSC 52, see `TuichatApp.copy_text`)."""

from __future__ import annotations

from tuichat.ui.screens.chat_base import ChatBase


class CopyAndSelect(ChatBase):
    """Copying and selecting messages on the chat screen."""

    _code_cycle: int = 0  # which code block of the last reply the copy-code key copies next

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
