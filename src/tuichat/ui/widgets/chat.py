"""The old import path of the chat widgets, kept while tests owned by others still import from it.

Each widget now has its own module under `tuichat.ui.widgets`; import from there.
"""

from __future__ import annotations

from tuichat.ui.widgets.message_list import MessageList, message_widget
from tuichat.ui.widgets.note_message import NoteMessage
from tuichat.ui.widgets.prompt_area import PromptArea
from tuichat.ui.widgets.reply_message import ReplyMessage, reply_renderable, stats_text
from tuichat.ui.widgets.sampling_pane import SamplingPane
from tuichat.ui.widgets.status_line import StatusLine
from tuichat.ui.widgets.user_message import UserMessage

__all__ = [
    "MessageList",
    "NoteMessage",
    "PromptArea",
    "ReplyMessage",
    "SamplingPane",
    "StatusLine",
    "UserMessage",
    "message_widget",
    "reply_renderable",
    "stats_text",
]
