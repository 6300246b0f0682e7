"""The conversation engine (`tuichat.chat.conversation`) without any terminal: against the stand-in lmdeploy server as a
real subprocess and against `httpx.MockTransport` for answers the stand-in never gives, with a temporary store."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from itertools import pairwise
from typing import Any

import httpx
import pytest
from standin.harness import Standin, free_port, run_standin

from tuichat.chat.client import ChatClient
from tuichat.chat.conversation import (
    Conversation,
    Event,
    Notice,
    ReadOnly,
    ReplyCounted,
    ReplyDelta,
    ReplyFailed,
    ReplyFinished,
    ReplyOpened,
    ReplyStarted,
)
from tuichat.chat.holders import Claim, HeldBy
from tuichat.chat.store import Store


@pytest.fixture(scope="module")
def standin() -> Iterator[Standin]:
    with run_standin("--fake-rate", "400") as s:
        yield s


@pytest.fixture
def store() -> Iterator[Store]:
    with Store.open() as st:
        yield st


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    def text(self) -> str:
        return "".join(e.text for e in self.of(ReplyDelta))


@asynccontextmanager
async def conversation(
    url: str, api_key: str | None = "test-key", store: Store | None = None, **client_kwargs: Any
) -> AsyncIterator[tuple[Conversation, Recorder]]:
    rec = Recorder()
    conv = Conversation(ChatClient(url, api_key, **client_kwargs), store=store, on_event=rec)
    try:
        yield conv, rec
    finally:
        await conv.aclose()


async def wait_until(condition: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.01)
    return value


# -- against the stand-in ------------------------------------------------------------------------------------


async def test_a_reply_streams_is_saved_and_carries_ttft_speed_and_tokens(standin: Standin, store: Store) -> None:
    async with conversation(standin.url, store=store) as (conv, rec):
        assert conv.send("hello [[reply:one two three four five six]]")
        await conv.wait()
    assert isinstance(rec.events[0], ReplyStarted)
    assert rec.of(ReplyDelta)[0].first and rec.text() == "one two three four five six"
    (done,) = rec.of(ReplyFinished)
    assert done.state == "done" and done.finish_reason == "stop"
    assert done.stats["ttft_s"] is not None and done.stats["ttft_s"] > 0
    assert done.stats["completion_tokens"] and done.stats["completion_tokens"] > 1
    assert done.stats["decode_tokens_per_s"] and done.stats["decode_tokens_per_s"] > 0
    assert done.stats["prompt_tokens"]
    assert conv.model == "tiny-chat"
    (saved,) = store.list_conversations()
    assert saved.model == "tiny-chat" and saved.server_url == standin.url
    msgs = store.messages(saved.id)
    assert [(m.role, m.state) for m in msgs] == [("user", "done"), ("assistant", "done")]
    assert msgs[1].content == "one two three four five six" and msgs[1].stats == done.stats


async def test_the_next_request_carries_the_whole_history(standin: Standin) -> None:
    async with conversation(standin.url) as (conv, _):
        conv.send("first [[reply:A]]")
        await conv.wait()
        conv.send("second [[reply:B]]")
        await conv.wait()
    sent = standin.stats()["last_request"]["messages"]
    assert [m["content"] for m in sent] == ["first [[reply:A]]", "A", "second [[reply:B]]"]


async def test_two_conversations_stream_at_the_same_time_and_both_are_saved(store: Store) -> None:
    with run_standin("--fake-rate", "40") as a, run_standin("--fake-rate", "40") as b:
        merged: list[tuple[str, Event]] = []
        one = Conversation(ChatClient(a.url, "test-key"), store=store, on_event=lambda e: merged.append(("a", e)))
        two = Conversation(ChatClient(b.url, "test-key"), store=store, on_event=lambda e: merged.append(("b", e)))
        left = " ".join(f"a{i}" for i in range(20))
        right = " ".join(f"b{i}" for i in range(20))
        try:
            assert one.send(f"left [[reply:{left}]]")
            assert two.send(f"right [[reply:{right}]]")
            await asyncio.wait_for(asyncio.gather(one.wait(), two.wait()), 20)
        finally:
            await one.aclose()
            await two.aclose()
    sides = [side for side, e in merged if isinstance(e, ReplyDelta)]
    # interleaved, not one after the other: the text of each side arrives between pieces of the other's
    switches = sum(1 for x, y in pairwise(sides) if x != y)
    assert switches >= 3, sides
    finished = {side: e for side, e in merged if isinstance(e, ReplyFinished)}
    assert finished["a"].state == finished["b"].state == "done"
    assert finished["a"].reply.content == left and finished["b"].reply.content == right
    by_server = {c.server_url: c for c in store.list_conversations()}
    assert set(by_server) == {a.url, b.url}
    for url, prompt, reply in ((a.url, "left", left), (b.url, "right", right)):
        rows = store.messages(by_server[url].id)
        assert [(m.role, m.state) for m in rows] == [("user", "done"), ("assistant", "done")]
        assert rows[0].content.startswith(prompt) and rows[1].content == reply


async def test_stop_keeps_the_partial_reply_saved_as_stopped(store: Store) -> None:
    with run_standin("--fake-rate", "30", "--fake-words", "300") as s:
        async with conversation(s.url, store=store) as (conv, rec):
            conv.send("talk")
            await wait_until(lambda: len(rec.of(ReplyDelta)) > 3)
            conv_id = conv.conversation_id
            assert conv_id is not None
            # saved while it streams, not only at the end
            await wait_until(lambda: (m := store.messages(conv_id)) and len(m) == 2 and m[1].content)
            assert store.messages(conv_id)[1].state == "streaming"
            await conv.stop()
            assert not conv.streaming
    (done,) = rec.of(ReplyFinished)
    assert done.state == "stopped" and done.reply.content == rec.text()
    saved = store.messages(conv_id)[1]
    assert saved.state == "stopped" and saved.content == rec.text()
    assert conv.chat.history()[-1] == {"role": "assistant", "content": rec.text()}


async def test_stop_on_a_hang_up_marks_the_reply_interrupted(store: Store) -> None:
    with run_standin("--fake-rate", "30", "--fake-words", "300") as s:
        async with conversation(s.url, store=store) as (conv, rec):
            conv.send("talk")
            await wait_until(lambda: rec.of(ReplyDelta))
            await conv.stop(interrupted=True)
    assert rec.of(ReplyFinished)[0].state == "interrupted"
    assert store.messages(conv.conversation_id or 0)[1].state == "interrupted"


async def test_sending_while_a_reply_streams_is_refused_with_a_sentence() -> None:
    with run_standin("--fake-rate", "30", "--fake-words", "300") as s:
        async with conversation(s.url) as (conv, rec):
            conv.send("talk")
            assert not conv.send("again")
            assert not conv.retry() and conv.undo() is None and conv.clear() == []
            notices = rec.of(Notice)
            assert len(notices) == 4 and all("stop it (Esc)" in n.text for n in notices)
            assert [t.content for t in conv.chat.turns if t.role == "user"] == ["talk"]


async def test_undo_gives_back_the_message_and_removes_the_exchange(standin: Standin, store: Store) -> None:
    async with conversation(standin.url, store=store) as (conv, _):
        conv.send("keep [[reply:K]]")
        await conv.wait()
        conv.send("drop me [[reply:D]]")
        await conv.wait()
        returned = conv.undo()
    assert returned is not None and returned.content == "drop me [[reply:D]]"
    assert [t.content for t in conv.chat.turns] == ["keep [[reply:K]]", "K"]
    assert [m.content for m in store.messages(conv.conversation_id or 0)] == ["keep [[reply:K]]", "K"]


async def test_clear_removes_every_message_from_the_history(standin: Standin, store: Store) -> None:
    async with conversation(standin.url, store=store) as (conv, _):
        conv.send("one [[reply:1]]")
        await conv.wait()
        removed = conv.clear()
    assert len(removed) == 2 and not conv.chat.turns
    assert store.messages(conv.conversation_id or 0) == []


async def test_retry_replaces_the_reply(standin: Standin, store: Store) -> None:
    async with conversation(standin.url, store=store) as (conv, rec):
        conv.send("q [[reply:old answer]]")
        await conv.wait()
        assert conv.retry()
        assert rec.of(ReplyStarted)[-1].replacing
        await conv.wait()
    assert [t.content for t in conv.chat.turns] == ["q [[reply:old answer]]", "old answer"]
    assert len(rec.of(ReplyFinished)) == 2
    assert [m.role for m in store.messages(conv.conversation_id or 0)] == ["user", "assistant"]


async def test_the_events_iterator_yields_what_the_callback_sees(standin: Standin) -> None:
    conv = Conversation(ChatClient(standin.url, "test-key"))
    seen: list[Event] = []

    async def read() -> None:
        async for event in conv.events():
            seen.append(event)
            if isinstance(event, ReplyFinished):
                return

    reader = asyncio.create_task(read())
    await asyncio.sleep(0)  # the reader subscribes before the first event
    conv.send("hi [[reply:x y]]")
    await asyncio.wait_for(reader, 10)
    await conv.aclose()
    assert isinstance(seen[0], ReplyStarted) and isinstance(seen[-1], ReplyFinished)
    assert "".join(e.text for e in seen if isinstance(e, ReplyDelta)) == "x y"


# -- failure modes -------------------------------------------------------------------------------------------


async def test_server_down_gives_the_message_back_and_saves_nothing(store: Store) -> None:
    async with conversation(f"http://127.0.0.1:{free_port()}", store=store) as (conv, rec):
        conv.send("are you there?")
        await conv.wait()
    (failed,) = rec.of(ReplyFailed)
    assert failed.kind == "connect" and "cannot reach the server" in failed.error
    assert failed.returned is not None and failed.returned.content == "are you there?"
    assert not failed.partial_kept and not conv.chat.turns
    assert store.list_conversations() == []


class HeldAnswer:
    """A one-shot HTTP server on a thread: it reads a whole request, says so, and answers only when released."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.got_body = threading.Event()
        self.release = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, body = data.split(b"\r\n\r\n", 1)
            length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
            while len(body) < length:
                body += conn.recv(65536)
            self.got_body.set()
            self.release.wait(10)
            chunks = [{"choices": [{"index": 0, "delta": {"content": "hello"}}]}]
            chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            events = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
            conn.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n"
                + f"content-length: {len(events)}\r\n\r\n".encode()
                + events
            )
        self.sock.close()


async def test_the_reply_is_opened_once_its_request_is_out_before_the_server_answers() -> None:
    # A front end mounts the reply on ReplyOpened. Said before the request went out, that work held the request
    # back; said after the answer began, it fell on the first token's path. It must come in between.
    server = HeldAnswer()
    async with conversation(server.url) as (conv, rec):
        conv.model = "m"
        body_in_when_opened: list[bool] = []

        def record(event: Event) -> None:
            if isinstance(event, ReplyOpened):
                # this blocks the loop: a request not yet written by then could not reach the server at all
                body_in_when_opened.append(server.got_body.wait(2.0))
            rec(event)

        conv.on_event = record
        conv.send("hi")
        await wait_until(lambda: rec.of(ReplyOpened))
        assert body_in_when_opened == [True]  # the whole request was on its way to the server already
        assert not rec.of(ReplyDelta)  # and the server had not answered yet
        server.release.set()
        await conv.wait()
    assert rec.text() == "hello" and len(rec.of(ReplyFinished)) == 1


async def test_a_request_that_never_went_out_opens_no_reply() -> None:
    async with conversation(f"http://127.0.0.1:{free_port()}") as (conv, rec):
        conv.model = "m"
        conv.send("are you there?")
        await conv.wait()
    assert rec.of(ReplyStarted) and rec.of(ReplyFailed) and not rec.of(ReplyOpened)


async def test_a_wrong_key_is_reported_as_401(standin: Standin) -> None:
    async with conversation(standin.url, api_key="wrong") as (conv, rec):
        conv.model = "tiny-chat"
        conv.send("hi")
        await conv.wait()
    (failed,) = rec.of(ReplyFailed)
    assert failed.kind == "unauthorized" and "--api-key" in failed.error


async def test_an_unknown_model_is_reported_as_404_naming_the_real_one(standin: Standin) -> None:
    async with conversation(standin.url) as (conv, rec):
        conv.model = "no-such-model"
        conv.send("hi")
        await conv.wait()
    (failed,) = rec.of(ReplyFailed)
    assert failed.kind == "not_found" and "tiny-chat" in failed.error


async def test_a_message_too_long_is_refused_and_given_back() -> None:
    with run_standin("--session-len", "64") as s:
        async with conversation(s.url) as (conv, rec):
            conv.send("word " * 400)
            await conv.wait()
    (failed,) = rec.of(ReplyFailed)
    assert failed.kind == "too_long" and failed.returned is not None


async def test_a_server_that_dies_mid_reply_leaves_the_partial_reply_interrupted(store: Store) -> None:
    with run_standin("--fake-words", "50", "--fake-rate", "50", "--fake-tokens-per-chunk", "1") as s:
        async with conversation(s.url, store=store) as (conv, rec):
            conv.send("go [[fault:die=5]]")
            await conv.wait()
    (done,) = rec.of(ReplyFinished)
    assert done.state == "interrupted" and done.reply.content and done.error
    (failed,) = rec.of(ReplyFailed)
    assert failed.partial_kept and failed.returned is None
    saved = store.messages(conv.conversation_id or 0)
    assert saved[1].state == "interrupted" and saved[1].content == done.reply.content


async def test_a_stalled_server_ends_the_reply_after_the_stall_timeout_keeping_its_text() -> None:
    with run_standin("--fake-words", "50", "--fake-rate", "50", "--fake-tokens-per-chunk", "1") as s:
        async with conversation(s.url, stall_timeout=0.5) as (conv, rec):
            conv.send("go [[fault:stall=4]]")
            await asyncio.wait_for(conv.wait(), 10)
    assert rec.of(ReplyFinished)[0].state == "interrupted"
    assert rec.of(ReplyFailed)[0].kind == "stall"


def _sse(*chunks: dict[str, Any], done: bool = True) -> bytes:
    body = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)
    return body + (b"data: [DONE]\n\n" if done else b"")


def _chunk(text: str, finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}


def _mock(answers: list[httpx.Response]) -> ChatClient:
    def handler(request: httpx.Request) -> httpx.Response:
        return answers.pop(0)

    return ChatClient("http://127.0.0.1:23333", transport=httpx.MockTransport(handler))


def _stream(body: bytes) -> httpx.Response:
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)


async def test_a_stream_cut_off_without_done_is_interrupted_not_saved_as_complete(store: Store) -> None:
    rec = Recorder()
    conv = Conversation(_mock([_stream(_sse(_chunk("half a"), done=False))]), model="m", store=store, on_event=rec)
    conv.send("q")
    await conv.wait()
    await conv.aclose()
    assert rec.of(ReplyFinished)[0].state == "interrupted"
    assert rec.of(ReplyFailed)[0].kind == "cutoff"
    assert store.messages(conv.conversation_id or 0)[1].state == "interrupted"


async def test_a_failed_retry_keeps_the_old_reply(store: Store) -> None:
    answers = [
        _stream(_sse(_chunk("the old reply", "stop"))),
        httpx.Response(500, json={"message": "boom", "object": "error", "code": 500}),
    ]
    rec = Recorder()
    conv = Conversation(_mock(answers), model="m", store=store, on_event=rec)
    conv.send("q")
    await conv.wait()
    assert conv.retry()
    await conv.wait()
    await conv.aclose()
    (failed,) = rec.of(ReplyFailed)
    assert failed.returned is None  # a retry gives nothing back to the prompt: the message stays in the chat
    assert [t.content for t in conv.chat.turns] == ["q", "the old reply"]
    assert [m.content for m in store.messages(conv.conversation_id or 0)] == ["q", "the old reply"]


async def test_usage_tokens_are_the_reply_figures_and_length_is_noticed() -> None:
    usage = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}
    rec = Recorder()
    conv = Conversation(_mock([_stream(_sse(_chunk("a"), _chunk("b"), _chunk("c", "length"), usage))]), model="m")
    conv.on_event = rec
    conv.send("q")
    await conv.wait()
    await conv.aclose()
    stats = rec.of(ReplyFinished)[0].stats
    assert stats["prompt_tokens"] == 7 and stats["completion_tokens"] == 3 and stats["finish_reason"] == "length"
    assert any("max_tokens" in n.text for n in rec.of(Notice))


async def test_a_failing_disk_is_a_notice_and_the_reply_still_arrives(store: Store) -> None:
    rec = Recorder()
    conv = Conversation(_mock([_stream(_sse(_chunk("fine", "stop")))]), model="m", store=store, on_event=rec)
    store.close()  # every write now fails
    conv.send("q")
    await conv.wait()
    await conv.aclose()
    assert rec.of(ReplyFinished)[0].reply.content == "fine"
    assert any("could not save to the history" in n.text for n in rec.of(Notice))


async def test_stop_before_the_first_token_keeps_the_message_and_says_so(standin: Standin, store: Store) -> None:
    async with conversation(standin.url, store=store) as (conv, rec):
        conv.send("wait [[fault:stall=0]]")
        await wait_until(lambda: standin.stats()["running"] >= 1)
        await conv.stop()
    (failed,) = rec.of(ReplyFailed)
    assert failed.kind == "stopped" and failed.returned is None and not rec.of(ReplyFinished)
    assert [t.role for t in conv.chat.turns] == ["user"]
    assert [m.role for m in store.messages(conv.conversation_id or 0)] == ["user"]


def test_a_compared_pair_names_each_other_in_the_history(store: Store) -> None:
    from tuichat.chat.conversation import faster_side, link_compared

    a = store.create_conversation(title="Which is faster")
    b = store.create_conversation(title="Which is faster")
    link_compared(store, (a, "A bf16"), (b, "B w4a16"))
    link_compared(store, (a, "A bf16"), (b, "B w4a16"))  # a second call changes nothing
    titles = {c.id: c.title for c in store.list_conversations()}
    assert titles[a] == f"Which is faster ⇄ #{b} B w4a16"
    assert titles[b] == f"Which is faster ⇄ #{a} A bf16"
    assert faster_side({"decode_tokens_per_s": 90.0}, {"decode_tokens_per_s": 120.0}) == 1
    assert (
        faster_side({"decode_tokens_per_s": 90.0, "total_s": 1.0}, {"decode_tokens_per_s": 90.0, "total_s": 2.0}) == 0
    )
    assert faster_side({"decode_tokens_per_s": 90.0}, None) is None


# -- holding a conversation, counting tokens, starting afresh, closing mid-reply -------------------------------


class Scripted:
    """An OpenAI-style server for httpx.MockTransport: every chat request streams `reply` a word per chunk
    (`gap` seconds apart), with a usage chunk unless `usage` is False; with `hang` the stream stays open after
    the text (a reply still coming). /v1/encode answers `encode` tokens, or 404 when it is None."""

    def __init__(
        self, reply: str = "one two three", *, usage: bool = True, encode: int | None = None, gap: float = 0.0
    ) -> None:
        self.words = reply.split(" ")
        self.usage = usage
        self.encode = encode
        self.gap = gap
        self.hang = False
        self.requests: list[dict[str, Any]] = []
        self.encoded: list[str] = []

    def client(self) -> ChatClient:
        return ChatClient("http://127.0.0.1:23333", transport=httpx.MockTransport(self.handle))

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/encode":
            self.encoded.append(json.loads(request.content)["input"])
            if self.encode is None:
                return httpx.Response(404, json={"detail": "Not Found"})
            return httpx.Response(200, json={"input_ids": list(range(self.encode)), "length": self.encode})
        if request.url.path == "/v1/chat/completions":
            self.requests.append(json.loads(request.content))
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=self._events())
        return httpx.Response(404, json={"detail": "Not Found"})

    async def _events(self) -> AsyncIterator[bytes]:
        for i, word in enumerate(self.words):
            if self.gap:
                await asyncio.sleep(self.gap)
            yield _sse(_chunk(word if i == 0 else f" {word}"), done=False)
        if self.hang:
            await asyncio.Event().wait()  # until the client gives up on the stream
        yield _sse({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}, done=False)
        if self.usage:
            n = len(self.words)
            yield _sse({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": n + 5}})
        else:
            yield b"data: [DONE]\n\n"


@pytest.fixture
def other() -> Iterator[Store]:
    """The same history opened by another tuichat: its claims hold against ours as another process's would."""
    with Store.open() as st:
        yield st


def saved_rows(store: Store, conv_id: int | None) -> list[tuple[str, str, str]]:
    assert conv_id is not None
    return [(m.role, m.state, m.content) for m in store.messages(conv_id)]


async def test_a_conversation_held_elsewhere_opens_read_only_and_refuses_every_change(
    store: Store, other: Store
) -> None:
    conv_id = other.create_conversation(model="m")
    other.add_message(conv_id, "user", "their question")
    other.add_message(conv_id, "assistant", "their answer")
    theirs = other.claim(conv_id)
    assert isinstance(theirs, Claim)
    server, rec = Scripted("mine"), Recorder()
    conv = Conversation(server.client(), model="m", store=store, hold=True, on_event=rec)
    try:
        # without read_only nothing is loaded: the HeldBy says who has it
        got = conv.open(conv_id)
        assert isinstance(got, HeldBy) and got.pid == os.getpid() and got.conversation_id == conv_id
        assert conv.chat.turns == [] and conv.conversation_id is None and conv.held_by is None

        got = conv.open(conv_id, read_only=True)
        assert isinstance(got, HeldBy)
        assert [t.content for t in conv.chat.turns] == ["their question", "their answer"]
        assert conv.conversation_id == conv_id and conv.held_by == got and conv.claim is None
        assert not conv.may_change()
        assert not conv.send("mine too")
        assert not conv.retry() and conv.undo() is None and conv.clear() == []
        refusals = rec.of(ReadOnly)
        assert len(refusals) == 5 and all(r.held_by == got and not r.released for r in refusals)
        assert server.requests == [] and not conv.streaming
        assert [t.content for t in conv.chat.turns] == ["their question", "their answer"]
        assert saved_rows(store, conv_id) == [("user", "done", "their question"), ("assistant", "done", "their answer")]

        # the other tuichat lets go: the next change takes the conversation over and goes ahead here
        theirs.release()
        assert conv.send("mine now")
        assert rec.of(ReadOnly)[-1].released
        await conv.wait()
        assert isinstance(conv.claim, Claim) and conv.held_by is None
        assert isinstance(other.claim(conv_id), HeldBy)  # now the other one is refused
        assert server.requests[0]["messages"] == [
            {"role": "user", "content": "their question"},
            {"role": "assistant", "content": "their answer"},
            {"role": "user", "content": "mine now"},
        ]
        assert [c for _, _, c in saved_rows(store, conv_id)] == ["their question", "their answer", "mine now", "mine"]
    finally:
        await conv.aclose()
    assert isinstance(other.claim(conv_id), Claim)  # closing let go of it


async def test_hold_conversation_claims_once_and_let_go_frees_it_for_another_tuichat(
    store: Store, other: Store
) -> None:
    conv = Conversation(Scripted("ok").client(), model="m", store=store, hold=True)
    try:
        assert conv.send("hello")
        await conv.wait()
        conv_id = conv.conversation_id
        assert conv_id is not None
        mine = conv.claim
        assert isinstance(mine, Claim) and mine.held  # a new conversation is held from its first message
        assert conv.hold_conversation(conv_id) is mine  # holding again changes nothing
        held = other.claim(conv_id)
        assert isinstance(held, HeldBy) and held.pid == os.getpid()

        conv.let_go()
        assert conv.claim is None and not mine.held
        theirs = other.claim(conv_id)
        assert isinstance(theirs, Claim)
        # now ours is the refused one; opening it without read_only leaves what is shown alone
        assert isinstance(conv.hold_conversation(conv_id), HeldBy)
        assert isinstance(conv.open(conv_id), HeldBy)
        assert conv.claim is None
        theirs.release()
        assert isinstance(conv.open(conv_id), Claim)
        assert conv.may_change() and isinstance(other.claim(conv_id), HeldBy)
    finally:
        await conv.aclose()


async def test_a_reply_without_usage_is_counted_in_tokens_by_the_server(store: Store) -> None:
    server, rec = Scripted("alpha beta gamma delta", usage=False, encode=9, gap=0.02), Recorder()
    conv = Conversation(server.client(), model="m", store=store, count_tokens=True, on_event=rec)
    try:
        assert conv.send("q")
        await conv.wait()
        counted = await wait_until(lambda: rec.of(ReplyCounted))
    finally:
        await conv.aclose()
    (finished,) = rec.of(ReplyFinished)
    assert finished.usage is None
    assert finished.stats["completion_tokens"] is None and finished.stats["chunks"] == 4  # chunks until counted
    assert [type(e) for e in rec.events[-2:]] == [ReplyFinished, ReplyCounted]
    assert server.encoded == ["alpha beta gamma delta"]
    stats = counted[0].reply.stats
    assert stats["completion_tokens"] == 9 and stats["counted"] and not stats["estimated"]
    assert stats["decode_tokens_per_s"] and stats["decode_tokens_per_s"] > 0
    assert conv.last_stats == stats
    (_, reply) = store.messages(conv.conversation_id or 0)
    assert reply.stats is not None and reply.stats["completion_tokens"] == 9 and reply.stats["counted"]


@pytest.mark.parametrize(("count_tokens", "encode"), [(False, 9), (True, None)], ids=["not-asked", "no-encode"])
async def test_without_a_count_the_figures_stay_chunks(store: Store, count_tokens: bool, encode: int | None) -> None:
    server, rec = Scripted("alpha beta gamma delta", usage=False, encode=encode), Recorder()
    conv = Conversation(server.client(), model="m", store=store, count_tokens=count_tokens, on_event=rec)
    try:
        assert conv.send("q")
        await conv.wait()
        if count_tokens:  # it asked, the server could not answer
            await wait_until(lambda: server.encoded and not conv._counting)
        else:
            assert server.encoded == []
    finally:
        await conv.aclose()
    assert rec.of(ReplyCounted) == []
    (_, reply) = store.messages(conv.conversation_id or 0)
    assert reply.stats is not None and reply.stats["completion_tokens"] is None and reply.stats["chunks"] == 4


async def test_new_chat_starts_afresh_and_keeps_the_old_one_saved(store: Store, other: Store) -> None:
    server = Scripted("ok")
    conv = Conversation(server.client(), model="m", store=store, hold=True)
    try:
        conv.send("old chat")
        await conv.wait()
        old_id = conv.conversation_id
        assert conv.new_chat()
        assert conv.chat.turns == [] and conv.conversation_id is None and conv.claim is None
        theirs = other.claim(old_id or 0)  # the old one is free for another tuichat now
        assert isinstance(theirs, Claim)
        theirs.release()
        conv.send("new chat")
        await conv.wait()
        assert conv.conversation_id not in (None, old_id)
    finally:
        await conv.aclose()
    assert server.requests[-1]["messages"] == [{"role": "user", "content": "new chat"}]
    assert [c.title for c in store.list_conversations()] == ["new chat", "old chat"]
    assert saved_rows(store, old_id) == [("user", "done", "old chat"), ("assistant", "done", "ok")]


async def test_new_chat_is_refused_while_a_reply_streams() -> None:
    server, rec = Scripted("still coming"), Recorder()
    server.hang = True
    conv = Conversation(server.client(), model="m", on_event=rec)
    try:
        conv.send("q")
        await wait_until(lambda: len(rec.of(ReplyDelta)) == 2)
        assert not conv.new_chat()
        assert [n.text for n in rec.of(Notice)] == [
            "A reply is still streaming: stop it (Esc) before you start a new chat."
        ]
        assert [t.content for t in conv.chat.turns] == ["q", "still coming"] and conv.streaming
    finally:
        await conv.aclose()


async def test_a_chat_deleted_from_the_history_is_forgotten_and_the_next_message_saved_anew(store: Store) -> None:
    rec = Recorder()
    conv = Conversation(Scripted("ok").client(), model="m", store=store, hold=True, on_event=rec)
    try:
        conv.send("first")
        await conv.wait()
        conv_id = conv.conversation_id
        assert conv_id is not None
        assert not conv.forget_if_deleted()  # still there: nothing changes
        assert len(conv.chat.turns) == 2 and conv.conversation_id == conv_id

        store.delete(conv_id)  # as the history screen does
        assert conv.forget_if_deleted()
        assert conv.chat.turns == [] and conv.conversation_id is None and conv.claim is None
        conv.send("second")
        await conv.wait()
    finally:
        await conv.aclose()
    assert not [n for n in rec.of(Notice) if "could not save" in n.text]
    (saved,) = store.list_conversations()
    assert saved.id != conv_id
    assert saved_rows(store, saved.id) == [("user", "done", "second"), ("assistant", "done", "ok")]


@pytest.mark.parametrize(("interrupted", "state"), [(True, "interrupted"), (False, "stopped")])
async def test_cancel_without_waiting_still_saves_the_partial_reply(
    store: Store, interrupted: bool, state: str
) -> None:
    server, rec = Scripted("half a reply"), Recorder()
    server.hang = True
    conv = Conversation(server.client(), model="m", store=store, on_event=rec)
    try:
        conv.send("q")
        await wait_until(lambda: len(rec.of(ReplyDelta)) == 3)
        conv.cancel(interrupted=interrupted)  # a signal handler cannot await
        await asyncio.wait_for(conv.wait(), 5)
        assert not conv.streaming
    finally:
        await conv.aclose()
    (finished,) = rec.of(ReplyFinished)
    assert finished.state == state and finished.reply.content == "half a reply"
    assert rec.of(ReplyFailed) == []
    assert saved_rows(store, conv.conversation_id) == [("user", "done", "q"), ("assistant", state, "half a reply")]


async def test_closing_mid_reply_saves_it_interrupted_and_lets_go(store: Store, other: Store) -> None:
    server, rec = Scripted("half a reply"), Recorder()
    server.hang = True
    conv = Conversation(server.client(), model="m", store=store, hold=True, on_event=rec)
    conv.send("q")
    await wait_until(lambda: len(rec.of(ReplyDelta)) == 3)
    conv_id = conv.conversation_id
    assert isinstance(other.claim(conv_id or 0), HeldBy)
    await asyncio.wait_for(conv.aclose(), 5)
    assert not conv.streaming
    assert rec.of(ReplyFinished)[0].state == "interrupted"
    assert saved_rows(store, conv_id) == [("user", "done", "q"), ("assistant", "interrupted", "half a reply")]
    assert isinstance(other.claim(conv_id or 0), Claim)
    assert conv.client._http.is_closed
