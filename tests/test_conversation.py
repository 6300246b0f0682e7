"""The conversation engine (`tuichat.chat.conversation`) without any terminal: against the stand-in lmdeploy server as a
real subprocess and against `httpx.MockTransport` for answers the stand-in never gives, with a temporary store."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from standin.harness import Standin, free_port, run_standin

from tuichat.chat.client import ChatClient
from tuichat.chat.conversation import (
    Conversation,
    Event,
    Notice,
    ReplyDelta,
    ReplyFailed,
    ReplyFinished,
    ReplyStarted,
)
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


async def test_two_conversations_stream_at_the_same_time() -> None:
    with run_standin("--fake-rate", "40") as a, run_standin("--fake-rate", "40") as b:
        async with conversation(a.url) as (one, rec_one), conversation(b.url) as (two, rec_two):
            one.send("left [[reply:" + " ".join(f"a{i}" for i in range(20)) + "]]")
            two.send("right [[reply:" + " ".join(f"b{i}" for i in range(20)) + "]]")
            # both have text before either has finished: they really run at once
            await wait_until(lambda: rec_one.of(ReplyDelta) and rec_two.of(ReplyDelta))
            assert not rec_one.of(ReplyFinished) and not rec_two.of(ReplyFinished)
            await asyncio.gather(one.wait(), two.wait())
    assert rec_one.text().startswith("a0 a1") and rec_two.text().startswith("b0 b1")
    assert rec_one.of(ReplyFinished)[0].state == rec_two.of(ReplyFinished)[0].state == "done"


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
