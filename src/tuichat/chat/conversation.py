"""The conversation engine: send, stream, stop, retry, undo and clear for one chat, with no user interface.

A `Conversation` owns one `ChatClient`, one `ChatSession`, its sampling and (optionally) a `Store` it saves to as
things happen: the user's message when it is sent, the reply as it streams (every `SAVE_EVERY` seconds, so a crash
loses at most that much), and how the reply ended (done, stopped by the user, interrupted by the server). Front
ends render the typed events it emits (`ReplyStarted`, `ReplyDelta`, `ReplyFinished`, `ReplyFailed`, `Notice`),
given to a callback or read as an async iterator; nothing here is global, so several conversations run at once.

With `hold=True` (the chat screen) the conversation is claimed in the store while it is open, so no other tuichat
adds to it; one held elsewhere is shown read-only (`held_by`) and refuses changes (`ReadOnly`) until its holder lets
go (those rules are `tuichat.chat.claims`). With `count_tokens=True` a reply that came without a usage chunk is
counted with the server's tokenizer afterwards (`ReplyCounted`).

The rules are the chat screen's (`ui/screens/chat.py` renders them): a retry keeps the old reply until the
new one's first token, so a failed retry loses nothing; a fresh message whose request fails before any text is
given back (`ReplyFailed.returned`) for the prompt; a reply cut off after some text keeps it, marked interrupted;
undo hands back the user's message for editing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar

from tuichat.chat.claims import Holding
from tuichat.chat.claims import ReadOnly as ReadOnly  # an event like the others: front ends import it from here
from tuichat.chat.client import ChatClient, ChatError, Delta, Finish, Usage
from tuichat.chat.client import Notice as StreamNotice
from tuichat.chat.holders import Claim, HeldBy
from tuichat.chat.sampling import Sampling
from tuichat.chat.store import Store
from tuichat.chat.turns import Attachment, ChatSession, Turn, as_role, as_state

P = ParamSpec("P")
T = TypeVar("T")
SAVE_EVERY = 0.3  # seconds between saves of a streaming reply
ReplyState = Literal["done", "stopped", "interrupted"]


@dataclass(frozen=True)
class ReplyStarted:
    """A request went out; `replacing` is True for a retry (the old reply stays until the first token)."""

    replacing: bool = False


@dataclass(frozen=True)
class ReplyOpened:
    """The reply's turn exists (empty, streaming) and its request is out: a front end shows it now, while the
    server works on the first token, so that the first text only has to be written into it. A request that never
    went out (an unreachable server) ends with ReplyFailed and no ReplyOpened."""

    reply: Turn


@dataclass(frozen=True)
class ReplyDelta:
    """New reply text (already cleaned of terminal control sequences)."""

    text: str
    first: bool = False  # the first text of the reply: the old reply of a retry is gone now


@dataclass(frozen=True)
class ReplyFinished:
    """The reply ended with text: `state` says how, `stats` holds TTFT, decode tok/s and token counts."""

    reply: Turn
    state: ReplyState
    stats: dict[str, Any]
    finish_reason: str | None
    error: str | None = None  # set when the reply was cut off (state 'interrupted') by a failure
    usage: Usage | None = None  # the server's token counts, when it sent them


@dataclass(frozen=True)
class ReplyFailed:
    """The request failed before any reply text (`partial_kept` False), or after some (True: see ReplyFinished).
    `kind` is the ChatError kind, or 'stopped' when the user stopped the reply before its first token.

    `returned` is the user's message given back for the prompt when it was a fresh message (not a retry)."""

    error: str
    kind: str
    partial_kept: bool = False
    returned: Turn | None = None
    detail: str | None = None  # the server's own words (a too-long prompt names the session length)
    finish: str | None = None  # kind 'empty': the finish reason of a reply that ended with no text at all


@dataclass(frozen=True)
class Notice:
    """Something the user should know that does not end the reply (a skipped chunk, a failing disk)."""

    text: str
    severity: Literal["information", "warning", "error"] = "warning"


@dataclass(frozen=True)
class ReplyCounted:
    """A finished reply's tokens were counted by the server's tokenizer: `reply.stats` holds the new figures."""

    reply: Turn


@dataclass(frozen=True)
class ModelChosen:
    """No model was named: the first one the server lists is used from now on."""

    model: str


Event = (
    ReplyStarted
    | ReplyOpened
    | ReplyDelta
    | ReplyFinished
    | ReplyFailed
    | ReplyCounted
    | ModelChosen
    | ReadOnly
    | Notice
)


@dataclass
class Meta:
    """What the saved conversation records about where it happened."""

    server_url: str | None = None
    profile: str | None = None
    lmdeploy_version: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


class Conversation(Holding):
    """One chat with one server. Create it inside a running event loop; `aclose()` when done."""

    def __init__(
        self,
        client: ChatClient,
        *,
        model: str | None = None,
        sampling: Sampling | None = None,
        store: Store | None = None,
        session: ChatSession | None = None,
        conversation_id: int | None = None,
        meta: Meta | None = None,
        on_event: Callable[[Event], None] | None = None,
        hold: bool = False,
        count_tokens: bool = False,
    ) -> None:
        self.client = client
        self.model = model
        self.sampling = sampling or Sampling()
        self.store = store
        self.chat = session or ChatSession()
        self.conversation_id = conversation_id
        self.meta = meta or Meta(server_url=client.base_url)
        self.on_event = on_event
        self.last_stats: dict[str, Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._replacing: list[Turn] = []
        self._interrupted = False
        self._queue: asyncio.Queue[Event] | None = None
        self.hold = hold
        self.count_tokens = count_tokens
        self._counting: set[asyncio.Task[None]] = set()

    # -- events -----------------------------------------------------------------------------------------------

    def _emit(self, event: Event) -> None:
        if self.on_event is not None:
            self.on_event(event)
        if self._queue is not None:
            self._queue.put_nowait(event)

    async def events(self) -> AsyncIterator[Event]:
        """Every event from now on, in order (one reader at a time); ends when the iterator is closed."""
        self._queue = asyncio.Queue()
        try:
            while True:
                yield await self._queue.get()
        finally:
            self._queue = None

    # -- state ------------------------------------------------------------------------------------------------

    @property
    def streaming(self) -> bool:
        return self._task is not None and not self._task.done()

    async def wait(self) -> None:
        """Until the reply in progress (if any) has ended and been saved."""
        task = self._task
        if task is not None:
            # asyncio.wait neither raises the reply's own end nor swallows a cancel of the caller
            await asyncio.wait([task])

    # -- operations -------------------------------------------------------------------------------------------

    def send(
        self, text: str, attachments: Sequence[Attachment] = (), added: Callable[[Turn], None] | None = None
    ) -> Turn | None:
        """Send a message and start streaming the reply: the message's turn, or None (with a Notice saying why)
        when it cannot go. `added` is called with the turn before the reply starts: the reply's first events may
        come inside this call (Textual runs tasks eagerly on Python 3.12+)."""
        if not text.strip() and not attachments:
            return None
        if self._refuse_while_streaming("send") or not self.may_change():
            return None
        turn = self.chat.add(Turn("user", text, attachments=list(attachments)))
        conv = self._ensure_conversation()
        if conv is not None:
            turn.msg_id = self._save(
                Store.add_message,
                conv,
                "user",
                text,
                sampling=self.sampling.to_table() or None,
                images=[a.name for a in turn.attachments],
            )
        if added is not None:
            added(turn)
        self._start()
        return turn

    def retry(self) -> bool:
        """Ask again for a reply to the last user message; the old reply goes only once new text arrives."""
        if self._refuse_while_streaming("retry") or not self.may_change():
            return False
        if self.chat.last_index("user") is None:
            self._emit(Notice("Nothing to retry yet.", "information"))
            return False
        self._start(replacing=self.chat.drop_after_last_user())
        return True

    async def stop(self, *, interrupted: bool = False) -> None:
        """Stop the reply in progress; its text is kept, marked stopped (or interrupted, e.g. on a hang-up)."""
        task = self._task
        if task is None or task.done():
            return
        self._interrupted = interrupted
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def undo(self) -> Turn | None:
        """Remove the last exchange; returns the user's message, for the prompt (None when there was none)."""
        if self._refuse_while_streaming("undo") or not self.may_change():
            return None
        removed = self.chat.undo()
        if not removed:
            self._emit(Notice("Nothing to undo.", "information"))
            return None
        self._delete(removed)
        self._forget_empty_conversation()
        return next((t for t in removed if t.role == "user"), None)

    def clear(self) -> list[Turn]:
        """Remove every message (from the history too); returns what went."""
        if self._refuse_while_streaming("clear the chat") or not self.may_change():
            return []
        removed = self.chat.clear()
        self._delete(removed)
        return removed

    def cancel(self, *, interrupted: bool = False) -> None:
        """Stop the reply in progress without waiting (a signal handler, a switch of server): it still saves."""
        task = self._task
        if task is not None and not task.done():
            self._interrupted = interrupted
            task.cancel()

    async def aclose(self, *, interrupted: bool = True) -> None:
        """Stop any reply (saved as interrupted unless told otherwise), let go of the conversation, close the client."""
        await self.stop(interrupted=interrupted)
        for task in list(self._counting):
            task.cancel()
        self.let_go()
        await self.client.aclose()

    def new_chat(self) -> bool:
        """Start afresh (the old conversation stays in the history); False while a reply streams."""
        if self._refuse_while_streaming("start a new chat"):
            return False
        self.chat = ChatSession()
        self.conversation_id = None
        self.let_go()
        return True

    def use_client(self, client: ChatClient, model: str | None) -> ChatClient:
        """Talk to another server from now on (a reply in progress is stopped); returns the old client to close."""
        self.cancel()
        old, self.client, self.model = self.client, client, model
        self.meta.server_url = client.base_url
        return old

    def open(self, conv_id: int, *, read_only: bool = False) -> Claim | HeldBy | None:
        """Load a saved conversation to continue it. Held by another tuichat, it is loaded read-only when
        `read_only` allows, else left alone (the HeldBy says why). None: no such conversation, or no history."""
        if self.store is None or self._refuse_while_streaming("open another chat"):
            return None
        if self._save(Store.get_conversation, conv_id) is None:
            return None
        got = self.hold_conversation(conv_id) if self.hold else None
        if isinstance(got, HeldBy) and not read_only:
            return got
        messages = self._save(Store.messages, conv_id)
        if messages is None:
            return None
        self._took(got)
        from tuichat.chat.sanitize import clean

        turns: list[Turn] = []
        for msg in messages:
            if msg.role == "system":
                continue
            note = None
            if msg.role == "user" and msg.images:
                # only then: the image code (and the model discovery behind it) costs ~10 ms of a restore
                from tuichat.chat.images import reopened_images_note

                note = reopened_images_note(msg.images)
            if note:  # before its message, so that Retry does not remove it
                turns.append(Turn("notice", note))
            # Saved text may come from an imported file: clean it as if it had just streamed in.
            turns.append(Turn(as_role(msg.role), clean(msg.content), as_state(msg.state), msg.id, stats=msg.stats))
        self.chat = ChatSession(turns)
        self.conversation_id = conv_id
        return got

    def forget_if_deleted(self) -> bool:
        """The conversation was deleted from the history elsewhere (the history screen): start afresh instead of
        saving into nothing. True when that happened."""
        if self.store is None or self.conversation_id is None:
            return False
        if self._save(Store.get_conversation, self.conversation_id) is not None:
            return False
        self.conversation_id = None
        self.let_go()  # its claim went with it
        self.chat = ChatSession()
        return True

    # -- the reply --------------------------------------------------------------------------------------------

    def _refuse_while_streaming(self, what: str) -> bool:
        if self.streaming:
            self._emit(Notice(f"A reply is still streaming: stop it (Esc) before you {what}.", "warning"))
            return True
        return False

    def _start(self, replacing: list[Turn] | None = None) -> None:
        self._replacing = list(replacing or [])
        self._interrupted = False
        self._emit(ReplyStarted(replacing=bool(self._replacing)))
        self._task = asyncio.get_running_loop().create_task(self._reply())

    async def _reply(self) -> None:
        reply: Turn | None = None
        started = time.monotonic()
        first_at: float | None = None
        usage: Usage | None = None
        finish: str | None = None
        chunks = 0
        error: ChatError | None = None
        cancelled = False
        saver: asyncio.Task[None] | None = None
        try:
            if self.model is None:
                models = await self.client.list_models()
                if not models:
                    raise ChatError("not_found", "the server lists no model under /v1/models.")
                self.model = models[0]
                self._emit(ModelChosen(self.model))
                if self.conversation_id is not None:
                    conv_id, model = self.conversation_id, self.model
                    self._save(_set_model, conv_id, model)
            messages = self.chat.history(self.sampling.system_prompt)
            reply = self.chat.add(Turn("assistant", "", state="streaming"))
            opened = False

            def open_reply() -> None:
                # Said once the request is out, not before: showing the reply is UI work, and done before the
                # request it held the request back (~8 ms against the stand-in, bench/RESULTS.md); done while the
                # server prefills, it costs the first token nothing.
                nonlocal opened
                if not opened:
                    opened = True
                    self._emit(ReplyOpened(reply))

            async for event in self.client.stream_chat(self.model, messages, self.sampling, on_sent=open_reply):
                if not opened:
                    open_reply()  # at the latest with the server's first event (a transport that reports no sending)
                if isinstance(event, Delta):
                    chunks += 1
                    reply.content += event.text
                    first = first_at is None
                    if first:
                        first_at = time.monotonic()
                        self._drop_replaced()
                        conv = self._ensure_conversation()
                        if conv is not None:
                            reply.msg_id = self._save(
                                Store.begin_reply, conv, sampling=self.sampling.to_table() or None
                            )
                            saver = asyncio.get_running_loop().create_task(self._save_periodically(reply))
                    self._emit(ReplyDelta(event.text, first=first))
                elif isinstance(event, Finish):
                    finish = event.reason
                elif isinstance(event, Usage):
                    usage = event
                elif isinstance(event, StreamNotice):
                    self._emit(Notice(event.text))
        except ChatError as exc:
            error = exc
        except asyncio.CancelledError:
            cancelled = True
        except Exception as exc:  # never a traceback, and never a conversation stuck streaming
            error = ChatError("protocol", f"the request failed unexpectedly ({type(exc).__name__}: {exc}).")
        finally:
            if saver is not None:
                saver.cancel()
        state: ReplyState
        if cancelled:
            state = "interrupted" if self._interrupted else "stopped"
        elif error is not None or finish == "abort":
            state = "interrupted"
        else:
            state = "done"
        self._end(reply, state, started, first_at, usage, chunks, finish, error)
        if cancelled:
            raise asyncio.CancelledError

    async def _save_periodically(self, reply: Turn) -> None:
        # On a timer rather than per chunk: text that arrives just before a stall is saved too.
        saved = reply.content
        while True:
            await asyncio.sleep(SAVE_EVERY)
            if reply.msg_id is not None and reply.content != saved:
                saved = reply.content
                msg_id = reply.msg_id
                self._save(Store.update_reply, msg_id, saved)

    def _end(
        self,
        reply: Turn | None,
        state: ReplyState,
        started: float,
        first_at: float | None,
        usage: Usage | None,
        chunks: int,
        finish: str | None,
        error: ChatError | None,
    ) -> None:
        """Record how the reply ended; synchronous, so a cancelled task still saves."""
        if reply is None or not reply.content:
            if reply is not None and reply in self.chat.turns:
                self.chat.turns.remove(reply)
            replacing = bool(self._replacing)
            self._restore_replaced()
            if error is None and state == "done" and finish is not None:
                # The server finished the reply without a single character (a model may end at once): not a
                # failure of the request, and not the user's stop either; the message goes back to the prompt.
                returned = None if replacing else self._give_back()
                self._emit(
                    ReplyFailed(
                        f"The model sent an empty reply (finish reason: {finish}); your message is back in the prompt.",
                        "empty",
                        returned=returned,
                        finish=finish,
                    )
                )
                return
            if error is None:
                self._emit(ReplyFailed("the reply was stopped before its first token", "stopped"))
                return
            returned = None if replacing else self._give_back()
            self._emit(ReplyFailed(error.message, error.kind, returned=returned, detail=error.detail))
            return
        reply.state = state
        reply.stats = reply_stats(started, first_at, time.monotonic(), usage, chunks, finish)
        self.last_stats = reply.stats
        if reply.msg_id is not None:
            msg_id, content, stats = reply.msg_id, reply.content, reply.stats
            self._save(Store.finish_reply, msg_id, content, state, stats=stats)
        self._emit(ReplyFinished(reply, state, reply.stats, finish, error.message if error else None, usage))
        if error is not None:
            self._emit(ReplyFailed(error.message, error.kind, partial_kept=True, detail=error.detail))
        if finish == "length":
            self._emit(Notice("The reply hit max_tokens (or the session length) and was cut."))
        if self.count_tokens and usage is None and reply.stats.get("completion_tokens") is None:
            task = asyncio.get_running_loop().create_task(self._count_reply(reply))
            self._counting.add(task)
            task.add_done_callback(self._counting.discard)

    async def _count_reply(self, reply: Turn) -> None:
        """No usage chunk came: ask the server's tokenizer (/v1/encode) how many tokens the reply has, so the
        figures are tokens, not chunks. Where the server cannot count, the chunk figures stay."""
        from tuichat.server.metrics import reply_stats_from_dict, with_token_count

        count = await self.client.count_tokens(reply.content)
        stats = reply_stats_from_dict(reply.stats or {})
        if count is None or stats is None or reply not in self.chat.turns:
            return
        counted = asdict(with_token_count(stats, count))
        reply.stats = {**(reply.stats or {}), **{k: _rounded(v) for k, v in counted.items()}}
        if reply is self.chat.last_reply():
            self.last_stats = reply.stats
        if reply.msg_id is not None:
            msg_id, content, state, new = reply.msg_id, reply.content, reply.state, reply.stats
            self._save(Store.finish_reply, msg_id, content, state, stats=new)
        self._emit(ReplyCounted(reply))

    def _drop_replaced(self) -> None:
        turns, self._replacing = self._replacing, []
        self._delete(turns)

    def _restore_replaced(self) -> None:
        turns, self._replacing = self._replacing, []
        self.chat.turns.extend(turns)

    def _give_back(self) -> Turn | None:
        """A fresh message that got no reply leaves the chat (and the history) and goes back to the user."""
        last_user = self.chat.last_index("user")
        if last_user is None or last_user != len(self.chat.turns) - 1:
            return None
        turn = self.chat.turns.pop()
        self._delete([turn])
        self._forget_empty_conversation()
        return turn

    # -- saving -----------------------------------------------------------------------------------------------

    def _ensure_conversation(self) -> int | None:
        if self.store is None:
            return None
        if self.conversation_id is None:
            self.conversation_id = self._save(
                Store.create_conversation,
                model=self.model,
                server_url=self.meta.server_url,
                profile=self.meta.profile,
                lmdeploy_version=self.meta.lmdeploy_version,
                system_prompt=self.sampling.system_prompt or None,
            )
            if self.hold and self.conversation_id is not None:
                got = self.hold_conversation(self.conversation_id)
                self.claim = got if isinstance(got, Claim) else None
        return self.conversation_id

    def _save(self, method: Callable[Concatenate[Store, P], T], *args: P.args, **kwargs: P.kwargs) -> T | None:
        """Call a Store method; a failing disk is reported (a Notice) and never ends the chat."""
        if self.store is None:
            return None
        try:
            return method(self.store, *args, **kwargs)
        except Exception as exc:
            self._emit(Notice(f"could not save to the history: {exc}", "error"))
            return None

    def _delete(self, turns: Sequence[Turn]) -> None:
        for turn in turns:
            if turn.msg_id is not None:
                msg_id = turn.msg_id
                self._save(Store.delete_message, msg_id)
                turn.msg_id = None

    def _forget_empty_conversation(self) -> None:
        """A conversation whose only message went back to the prompt should not linger in the history."""
        if self.store is None or self.conversation_id is None:
            return
        if any(t.role in ("user", "assistant") for t in self.chat.turns):
            return
        conv = self.conversation_id
        if not self._save(Store.messages, conv):
            self._save(Store.delete, conv)
            self.conversation_id = None
            self.let_go()  # its claim went with it


def _rounded(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


def _set_model(store: Store, conv_id: int, model: str) -> None:
    store.update_conversation(conv_id, model=model)


def reply_stats(
    started: float, first_at: float | None, ended: float, usage: Usage | None, chunks: int, finish: str | None
) -> dict[str, Any]:
    """The stats saved with a reply (a plain dict: it goes into the store as JSON), as the chat screen saves them."""
    from tuichat.server.metrics import compute_reply_stats  # its module loads with the first reply, not at start

    stats = compute_reply_stats(
        started,
        first_at,
        ended,
        usage.completion_tokens if usage else None,
        usage.prompt_tokens if usage else None,
        usage.cached_tokens if usage else None,
        chunks,
    )
    out: dict[str, Any] = {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(stats).items()}
    out.update(finish_reason=finish, chunks=chunks)
    return out


def link_compared(store: Store, first: tuple[int, str], second: tuple[int, str]) -> None:
    """Mark two conversations of one compare run as a pair: each title names its partner (id and side label),
    so `tuichat history` shows them together. The store has no column for a link yet; titles carry it."""
    for (conv_id, _), (other_id, other_label) in ((first, second), (second, first)):
        conv = store.get_conversation(conv_id)
        if conv is not None and "⇄ #" not in conv.title:
            store.rename(conv_id, f"{conv.title} ⇄ #{other_id} {other_label}")


def faster_side(first: dict[str, Any] | None, second: dict[str, Any] | None) -> int | None:
    """0 or 1: which reply decoded faster (the higher tok/s, else the shorter total time); None for a tie or
    when either is missing."""
    if not first or not second:
        return None
    for key, higher_is_better in (("decode_tokens_per_s", True), ("total_s", False)):
        a, b = first.get(key), second.get(key)
        if isinstance(a, int | float) and isinstance(b, int | float) and a != b:
            return 0 if (a > b) == higher_is_better else 1
    return None
