"""A reply the server finishes without a single character (a model that ends at once; seen on the H200 with a
random-weight model under load): it is neither the user's stop nor a failed request. The chat says so and gives the
message back; a batch row records the empty result with its finish reason, not an error."""

from __future__ import annotations

from typing import Any

import httpx

from tuichat.chat.batch import BatchItem, Progress, run_item
from tuichat.chat.client import ChatClient
from tuichat.chat.conversation import Conversation, Event, ReplyFailed, ReplyFinished

EMPTY = b'data: {"choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "stop"}]}\n\ndata: [DONE]\n\n'


def _server(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/v1/models":
        return httpx.Response(200, json={"object": "list", "data": [{"id": "m", "object": "model"}]})
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=EMPTY)


async def test_an_empty_finished_reply_is_said_plainly_and_the_message_comes_back() -> None:
    events: list[Event] = []
    conv = Conversation(
        ChatClient("http://127.0.0.1:9", transport=httpx.MockTransport(_server)), model="m", on_event=events.append
    )
    conv.send("hello")
    await conv.wait()
    await conv.aclose()
    failed = [e for e in events if isinstance(e, ReplyFailed)]
    assert [f.kind for f in failed] == ["empty"]
    assert "empty reply (finish reason: stop)" in failed[0].error
    assert "stopped" not in failed[0].error
    assert failed[0].returned is not None and failed[0].returned.content == "hello"
    assert not [e for e in events if isinstance(e, ReplyFinished)]


async def test_a_batch_row_of_an_empty_reply_has_its_finish_reason_and_no_error() -> None:
    client = ChatClient("http://127.0.0.1:9", transport=httpx.MockTransport(_server))
    progress = Progress(total=1)
    row: dict[str, Any] = await run_item(
        client, "m", BatchItem(line=1, source={"prompt": "hi"}, message="hi"), progress
    )
    await client.aclose()
    assert row["text"] == "" and row["finish_reason"] == "stop"
    assert "error" not in row
