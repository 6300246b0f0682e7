"""One writer per chat across tuichats: the claim a conversation holds in the store, and the read-only rules.

A `Conversation` with `hold=True` (the chat screen) claims the conversation it shows (`Store.claim`), so no other
tuichat adds to it; one that another live tuichat holds is shown read-only (`held_by`) and every change is refused
with a `ReadOnly` event until the holder lets go, when the next change takes the claim over (`released`). The
rules live here, on `Holding`, the base `Conversation` builds on; the store keeps the claims themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Concatenate, ParamSpec, TypeVar

from tuichat.chat.holders import Claim, HeldBy
from tuichat.chat.store import Store

P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True)
class ReadOnly:
    """A change was refused: another tuichat holds this conversation (`held_by`). `released` is True instead when
    the holder had let go, so the change goes ahead and the conversation continues here."""

    held_by: HeldBy
    released: bool = False


class Holding:
    """The claim rules of one conversation; `Conversation` supplies the store calls and the events."""

    store: Store | None
    conversation_id: int | None
    hold: bool = False  # claim the conversation shown (the chat screen); batch runs and compare sides do not
    claim: Claim | None = None  # we hold conversation_id: no other tuichat may add to it
    held_by: HeldBy | None = None  # the conversation shown is held by another tuichat: read-only here

    def _save(self, method: Callable[Concatenate[Store, P], T], *args: P.args, **kwargs: P.kwargs) -> T | None:
        raise NotImplementedError  # Conversation's: a store call whose failure is a notice, never an end

    def _emit(self, event: ReadOnly) -> None:
        raise NotImplementedError  # Conversation's: every event it emits, ReadOnly among them

    def hold_conversation(self, conv_id: int) -> Claim | HeldBy | None:
        """Claim `conv_id` for this process, or who holds it; None when the history could not be asked."""
        if self.claim is not None and self.claim.conversation_id == conv_id:
            return self.claim
        return self._save(Store.claim, conv_id)

    def let_go(self) -> None:
        """Leave the conversation we hold, so another tuichat may continue it."""
        claim, self.claim, self.held_by = self.claim, None, None
        if claim is not None:
            self._save(_release, claim)

    def may_change(self) -> bool:
        """True unless another tuichat holds the conversation shown; one that has let go meanwhile is taken
        over (a `ReadOnly` event with `released` says so), else a `ReadOnly` event says who holds it."""
        held = self.held_by
        if held is None or self.conversation_id is None:
            return True
        got = self.hold_conversation(self.conversation_id)
        if isinstance(got, Claim):
            self.claim, self.held_by = got, None
            self._emit(ReadOnly(held, released=True))
            return True
        self._emit(ReadOnly(got or held))
        return False

    def _took(self, got: Claim | HeldBy | None) -> None:
        """Keep what asking for a claim gave: ours (a Claim), or another tuichat's (read-only here)."""
        if self.claim is not None and self.claim is not got:
            self.let_go()
        self.claim = got if isinstance(got, Claim) else None
        self.held_by = got if isinstance(got, HeldBy) else None


def _release(_store: Store, claim: Claim) -> None:
    claim.release()
