"""The chat screen's saved chats: open the history at start-up, open a chat from it (F4, --continue), load
earlier messages, notice one deleted elsewhere. The engine decides what may be opened and held; this shows it."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from rich.text import Text
from textual.widgets import Static

from tuichat.ui.screens.chat_base import ChatBase
from tuichat.ui.widgets.message_list import message_widget
from tuichat.ui.widgets.reply_message import ReplyMessage

if TYPE_CHECKING:
    from tuichat.chat.store import Store

RESTORE_LIMIT = 20  # turns mounted when a conversation opens (a few screens); ctrl+t loads more
FIRST_SCREEN_TURNS = 6  # of them, mounted before the others: three exchanges fill a screen of ordinary replies


class SavedChats(ChatBase):
    """Opening saved chats on the chat screen (see the module docstring)."""

    _earlier_lock: asyncio.Lock | None = None  # made with the first load of earlier turns

    def open_history(self) -> Store | None:
        """Open the history for this chat (None without one), and the chat that --continue or --conversation
        names. A broken history does not stop the chat: it says so and goes on unsaved."""
        options = self._owner.options
        if not options.use_store:
            return None
        try:
            from tuichat.chat.store import Store, default_path

            store = Store.open(options.store_path or default_path())
            recovered = store.recovered_on_open
        except Exception as exc:
            self.add_note("error", f"history is not being saved: {exc}. Check the data folder's permissions.")
            return None
        self.conversation.store = store
        conv_id = options.conversation_id
        if conv_id is None and options.continue_last:
            last = store.last_conversation()
            conv_id = last.id if last else None
            if last is None:
                self.notify("No saved conversation yet: starting a new one.")
        if conv_id is not None:
            self.restoring = True
            self.call_after_refresh(self._open_at_start, conv_id)
        if recovered:
            self.notify(f"{recovered} reply(ies) cut off by an earlier exit were kept and marked interrupted.")
        return store

    async def _open_at_start(self, conv_id: int) -> None:
        """--continue / --conversation: show the chat, then tell the app its first screen is out (two refreshes on:
        one lays it out, the next paints it scrolled to the end) so the app's background work starts after it."""
        try:
            await self.open_conversation(conv_id)
        finally:
            self.restoring = False
            self.refresh_bindings()  # the key bar waited for the chat (KeyFooter): it is built after this frame
            self.call_after_refresh(self.call_after_refresh, self._owner.first_screen_shown)

    async def open_conversation(self, conv_id: int, message_id: int | None = None, read_only: bool = False) -> None:
        """Show a saved chat to continue it. One that another tuichat holds is shown read-only when the user
        chose that in F4; otherwise (--continue, --conversation) the chat stays new and a notice says why."""
        from tuichat.chat.holders import HeldBy

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
        # The newest turns come first, alone: the screen they fill is what the user waits for (each restored
        # reply is a Markdown render with its code highlighted). The rest of the RESTORE_LIMIT turns are mounted
        # above them once that frame is out, as ctrl+t would; a message to show (F4 search) gets them at once.
        shown = turns[-RESTORE_LIMIT:] if message_id is not None else turns[-FIRST_SCREEN_TURNS:]
        self.hidden_turns = len(turns) - len(shown)
        widgets: list[Static | ReplyMessage] = [message_widget(t) for t in shown]
        if self.hidden_turns:
            widgets.insert(0, self._earlier_marker())
        await container.mount_all(widgets)
        rest = min(self.hidden_turns, RESTORE_LIMIT - len(shown))
        if rest > 0:
            # two refreshes on: the first lays the first screen out, the second paints it scrolled to the end
            self.call_after_refresh(self.call_after_refresh, self._restore_rest, conv_id, self.hidden_turns, rest)
        target = None
        if message_id is not None:
            while self.hidden_turns and not any(t.msg_id == message_id for t in turns[self.hidden_turns :]):
                await self.action_load_earlier()
            target = container.showing_message(message_id)
        if target is not None:
            container.scroll_to_turn(target.turn)
        else:
            container.scroll_end(animate=False)
        self._owner.status.chat_opened(turns)

    def _earlier_marker(self) -> Static:
        text = f"⋯ {self.hidden_turns} earlier messages: {self._owner.key_name('load_earlier')} shows them"
        return Static(Text(text, style="dim"), id="earlier")

    async def _restore_rest(self, conv_id: int, hidden: int, count: int) -> None:
        """The second part of opening a chat: `count` more turns above the first screen, the view left alone.
        Skipped when the chat changed meanwhile (another one opened, a new chat, or ctrl+t already loaded them)."""
        if self.conversation.conversation_id == conv_id and self.hidden_turns == hidden:
            await self._load_earlier(count, scroll=False, unless_moved_from=(conv_id, hidden))

    async def action_load_earlier(self) -> None:
        if not self.hidden_turns:
            self.notify("Every message of this chat is shown.")
            return
        await self._load_earlier(RESTORE_LIMIT, scroll=True)

    async def _load_earlier(
        self, count: int, *, scroll: bool, unless_moved_from: tuple[int | None, int] | None = None
    ) -> None:
        """Mount `count` more of the hidden turns above the others; `unless_moved_from` (chat id, hidden turns):
        only if the chat and the number hidden are still those once it is this load's turn."""
        # One load at a time: Ctrl+T soon after a chat opened met the opening's own second part, and both mounted
        # an "earlier messages" line (Textual refused the duplicate id; the app stopped).
        if self._earlier_lock is None:
            self._earlier_lock = asyncio.Lock()
        async with self._earlier_lock:
            now = (self.conversation.conversation_id, self.hidden_turns)
            if self.hidden_turns and (unless_moved_from is None or unless_moved_from == now):
                await self._load_earlier_now(count, scroll=scroll)

    async def _load_earlier_now(self, count: int, *, scroll: bool) -> None:
        container = self.messages
        start = max(0, self.hidden_turns - count)
        batch = self.conversation.chat.turns[start : self.hidden_turns]
        self.hidden_turns = start
        await self.query("#earlier").remove()
        widgets: list[Static | ReplyMessage] = [message_widget(t) for t in batch]
        if self.hidden_turns:
            widgets.insert(0, self._earlier_marker())
        if batch and scroll:
            # show what was asked for, the first of the turns loaded; said before they are mounted, so that no
            # parking pass takes them away before the view is there
            container.scroll_to_turn(batch[0])
        await container.mount_all(widgets, before=0 if container.children else None)

    def check_open_conversation_exists(self) -> None:
        """If the chat on screen was deleted from the history, start afresh instead of saving into nothing."""
        if self.conversation.forget_if_deleted():
            self._set_title("")
            self.hidden_turns = 0
            self.messages.remove_children()
            self.notify("The open chat was deleted; this is a new one.")
