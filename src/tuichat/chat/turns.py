"""The conversation as the app holds it: turns, the history sent each request, retry and undo.

LMDeploy's api_server keeps no state between requests, so every request carries the whole history. This module
decides what that history is (errors and notices are shown but never sent; a stopped or interrupted reply is
sent as the user saw it) and what Retry and Undo remove, without any UI, so the rules are unit-tested.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeGuard, get_args

# Who a turn is from: errors and notices are shown, never sent; 'system' is saved, never shown as a turn.
Role = Literal["user", "assistant", "error", "notice", "system"]
# A reply is 'streaming' while tokens arrive, then 'done', 'stopped' (the user pressed Esc), 'interrupted'
# (the stream or the process died) or 'error' (nothing usable came back).
TurnState = Literal["done", "streaming", "stopped", "interrupted", "error"]
SENT_ROLES: tuple[Role, ...] = ("user", "assistant")
_ROLES: frozenset[str] = frozenset(get_args(Role))
_STATES: frozenset[str] = frozenset(get_args(TurnState))


def as_role(text: str) -> Role:
    """A role read back from the history; anything unknown (a newer tuichat's) is shown as a notice."""
    return text if _is_role(text) else "notice"


def as_state(text: str) -> TurnState:
    """A state read back from the history; an unknown one is shown as cut off rather than as complete."""
    return text if _is_state(text) else "interrupted"


def _is_role(text: str) -> TypeGuard[Role]:
    return text in _ROLES


def _is_state(text: str) -> TypeGuard[TurnState]:
    return text in _STATES


@dataclass
class Attachment:
    """An image attached to a user message, already encoded for the request."""

    name: str
    data_url: str
    width: int
    height: int
    size_bytes: int

    def label(self) -> str:
        return f"{self.name} {self.width}x{self.height} {self.size_bytes / 1024:.0f} KB"


@dataclass
class Turn:
    role: Role
    content: str
    state: TurnState = "done"
    msg_id: int | None = None
    attachments: list[Attachment] = field(default_factory=list)
    stats: dict[str, Any] | None = None


class ChatSession:
    """The turns of the current conversation, in order."""

    def __init__(self, turns: Sequence[Turn] = ()) -> None:
        self.turns: list[Turn] = list(turns)

    def __len__(self) -> int:
        return len(self.turns)

    def add(self, turn: Turn) -> Turn:
        self.turns.append(turn)
        return turn

    def history(self, system_prompt: str = "") -> list[dict[str, Any]]:
        """The `messages` list for the next request."""
        messages: list[dict[str, Any]] = []
        if system_prompt.strip():
            messages.append({"role": "system", "content": system_prompt})
        for turn in self.turns:
            if turn.role not in SENT_ROLES:
                continue
            if turn.role == "assistant" and not turn.content:
                continue  # an empty failed reply would only confuse the model
            if turn.attachments:
                parts: list[dict[str, Any]] = [{"type": "text", "text": turn.content}]
                parts += [{"type": "image_url", "image_url": {"url": a.data_url}} for a in turn.attachments]
                messages.append({"role": turn.role, "content": parts})
            else:
                messages.append({"role": turn.role, "content": turn.content})
        return messages

    def last_index(self, role: Role) -> int | None:
        for i in range(len(self.turns) - 1, -1, -1):
            if self.turns[i].role == role:
                return i
        return None

    def last_reply(self) -> Turn | None:
        i = self.last_index("assistant")
        return self.turns[i] if i is not None else None

    def trailing_after_last_user(self) -> list[Turn]:
        """What Retry removes: everything after the last user message."""
        i = self.last_index("user")
        return [] if i is None else self.turns[i + 1 :]

    def drop_after_last_user(self) -> list[Turn]:
        i = self.last_index("user")
        if i is None:
            return []
        removed = self.turns[i + 1 :]
        del self.turns[i + 1 :]
        return removed

    def undo(self) -> list[Turn]:
        """Remove the last exchange (the last user message and everything after it); returns what went."""
        i = self.last_index("user")
        if i is None:
            removed = list(self.turns)
            self.turns.clear()
            return removed
        removed = self.turns[i:]
        del self.turns[i:]
        return removed

    def clear(self) -> list[Turn]:
        removed = list(self.turns)
        self.turns.clear()
        return removed

    def text_tokens_estimate(self) -> int:
        return sum(len(t.content) for t in self.turns if t.role in SENT_ROLES) // 4 + 4 * len(self.turns)
