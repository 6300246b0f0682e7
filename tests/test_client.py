"""`ChatClient`: stream parsing, request shape, error mapping and the plain endpoints, first against
`httpx.MockTransport` (exact server answers, including ones the stand-in never gives), then against the stand-in
lmdeploy server as a real subprocess (faults, Stop, a dead port)."""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any, cast

import httpx
import pytest
from standin.fake_lmdeploy import DEFAULT_REPLY, tokenize
from standin.harness import Standin, free_port, run_standin

from tuichat.chat.client import ChatClient, ChatError, Delta, Finish, Health, Notice, StreamEvent, Usage
from tuichat.chat.sampling import Sampling
from tuichat.server.metrics import parse_metrics

KEY = "sk-very-secret-0123"
SSE_HEADERS = {"content-type": "text/event-stream; charset=utf-8"}
# Words with which a message tells the user what to do next (checked in tuichat's own words, not the server's).
ADVICE = re.compile(
    r"\b(check|try|retry|pick|pass|set|shorten|remove|start|raise|change|fix|lower|use|wait|restart|undo)\b",
    re.IGNORECASE,
)

Handler = Callable[[httpx.Request], httpx.Response]


# --------------------------------------------------------------------------------------------------- helpers


def flat(status: int, message: str, error_type: str = "invalid_request_error") -> dict[str, Any]:
    """LMDeploy's error body."""
    return {"message": message, "type": error_type, "code": status, "param": None, "object": "error"}


def nested(status: int, message: str, error_type: str = "BadRequestError") -> dict[str, Any]:
    """OpenAI's (and vLLM's, SGLang's) error body."""
    return {"error": {"message": message, "type": error_type, "param": None, "code": status}}


def chunk(content: str | None = None, *, role: str | None = None, finish: str | None = None) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None}
    if finish is not None:
        choice["finish_reason"] = finish
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [choice]}


def usage_chunk(prompt: int, completion: int, cached: int | None) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [],
        "usage": usage,
    }


def sse(*events: Any) -> bytes:
    """A Server-Sent Events body: dicts are sent as JSON, strings as they are."""
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events).encode()


def stream_response(*events: Any) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers=SSE_HEADERS, content=sse(*events))

    return handler


def json_response(status: int, body: Any) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json=body)

    return handler


def routes(table: dict[str, httpx.Response]) -> Handler:
    """Answer by path; anything else is FastAPI's 404."""

    def handler(request: httpx.Request) -> httpx.Response:
        return table.get(request.url.path) or httpx.Response(404, json={"detail": "Not Found"})

    return handler


@asynccontextmanager
async def mock_client(handler: Handler, api_key: str | None = KEY, **kwargs: Any) -> AsyncIterator[ChatClient]:
    client = ChatClient("http://127.0.0.1:23333", api_key, transport=httpx.MockTransport(handler), **kwargs)
    try:
        yield client
    finally:
        await client.aclose()


@asynccontextmanager
async def real_client(url: str, api_key: str | None = "test-key", **kwargs: Any) -> AsyncIterator[ChatClient]:
    client = ChatClient(url, api_key, **kwargs)
    try:
        yield client
    finally:
        await client.aclose()


async def chat(
    client: ChatClient, text: str = "hello", *, model: str = "m", sampling: Sampling | None = None
) -> tuple[list[StreamEvent], ChatError | None]:
    """Every event of one reply, and the error that ended it (None when it ended normally)."""
    events: list[StreamEvent] = []
    try:
        async for event in client.stream_chat(model, [{"role": "user", "content": text}], sampling or Sampling()):
            events.append(event)
    except ChatError as exc:
        return events, exc
    return events, None


def text_of(events: list[StreamEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, Delta))


def own_words(exc: ChatError) -> str:
    """The part of the message tuichat wrote, without the server's sentence."""
    return exc.message.replace(exc.detail, "") if exc.detail else exc.message


async def eventually(condition: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


# ------------------------------------------------------------------------------------------- stream parsing


async def test_stream_yields_text_finish_and_usage_with_cached_tokens() -> None:
    handler = stream_response(
        chunk("", role="assistant"),
        chunk(role="assistant"),
        chunk("Hel", role="assistant"),
        chunk("lo, wor"),
        chunk("ld!", finish="stop"),
        usage_chunk(12, 3, cached=8),
        "[DONE]",
    )
    async with mock_client(handler) as client:
        events, error = await chat(client)
    assert error is None
    # role-only and empty deltas produce nothing; text arrives in order, then the finish, then usage
    assert events == [
        Delta("Hel"),
        Delta("lo, wor"),
        Delta("ld!"),
        Finish("stop"),
        Usage(prompt_tokens=12, completion_tokens=3, total_tokens=15, cached_tokens=8),
    ]


async def test_usage_without_prompt_details_has_no_cached_count() -> None:
    handler = stream_response(chunk("ok", finish="length"), usage_chunk(5, 1, cached=None), "[DONE]")
    async with mock_client(handler) as client:
        events, error = await chat(client)
    assert error is None
    assert events == [Delta("ok"), Finish("length"), Usage(5, 1, 6, None)]


async def test_nothing_after_done_is_read() -> None:
    handler = stream_response(chunk("one"), "[DONE]", chunk("two"))
    async with mock_client(handler) as client:
        events, error = await chat(client)
    assert error is None
    assert text_of(events) == "one"


async def test_request_body_has_the_model_messages_usage_request_and_only_the_set_sampling_fields() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, headers=SSE_HEADERS, content=sse(chunk("hi", finish="stop"), "[DONE]"))

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    sampling = Sampling(temperature=0.7, max_tokens=64, stop=("END",))
    async with mock_client(handler) as client:
        async for _ in client.stream_chat("internlm2", messages, sampling):
            pass
    (request,) = seen
    assert request.method == "POST"
    assert request.url.path == "/v1/chat/completions"
    assert json.loads(request.content) == {
        "model": "internlm2",
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.7,
        "max_tokens": 64,
        "stop": ["END"],
    }


async def test_unset_sampling_leaves_every_sampling_field_to_the_server() -> None:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, headers=SSE_HEADERS, content=sse("[DONE]"))

    async with mock_client(handler) as client:
        await chat(client)
    assert set(seen[0]) == {"model", "messages", "stream", "stream_options"}


async def test_api_key_is_sent_as_bearer_and_never_shown_in_repr() -> None:
    auth: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        auth.append(request.headers.get("authorization"))
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "m"}]})
        return httpx.Response(200, headers=SSE_HEADERS, content=sse(chunk("hi", finish="stop"), "[DONE]"))

    async with mock_client(handler) as client:
        await client.list_models()
        await chat(client)
        assert KEY not in repr(client)
        assert KEY not in str(client)
    async with mock_client(handler, api_key=None) as keyless:
        await keyless.list_models()
    assert auth == [f"Bearer {KEY}", f"Bearer {KEY}", None]


# ------------------------------------------------------------------------------------------ error mapping

STATUS_CASES = [
    # status, server sentence, kind
    (400, "The temperature 3.0 must be in [0, 2]", "bad_request"),
    (401, "Unauthorized.", "unauthorized"),
    (404, "The model 'nope' does not exist.", "not_found"),
    (503, "The inference engine is unavailable.", "unavailable"),
    (500, "An internal server error occurred.", "server"),
]


@pytest.mark.parametrize("shape", [flat, nested], ids=["lmdeploy-flat", "openai-nested"])
@pytest.mark.parametrize(("status", "sentence", "kind"), STATUS_CASES, ids=[str(c[0]) for c in STATUS_CASES])
async def test_http_errors_map_to_a_kind_with_the_server_sentence_and_what_to_do(
    shape: Callable[[int, str], dict[str, Any]], status: int, sentence: str, kind: str
) -> None:
    async with mock_client(json_response(status, shape(status, sentence))) as client:
        events, error = await chat(client, model="nope")
    assert events == []
    assert error is not None
    assert (error.kind, error.status, error.detail) == (kind, status, sentence)
    assert "Traceback" not in error.message and "httpx" not in error.message
    assert ADVICE.search(own_words(error)), f"{kind}: the message does not say what to do: {error.message!r}"
    assert ".." not in error.message and ". ." not in error.message  # the server's full stop is not doubled


def models_body(*ids: str) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": i, "object": "model"} for i in ids]}


async def test_unknown_model_message_names_the_model_lists_the_servers_and_says_how_to_choose() -> None:
    handler = routes(
        {
            "/v1/chat/completions": httpx.Response(
                404, json=flat(404, "The model 'qwen-typo' does not exist.", "not_found_error")
            ),
            "/v1/models": httpx.Response(200, json=models_body("qwen2.5-7b", "internlm3")),
        }
    )
    async with mock_client(handler) as client:
        _, error = await chat(client, model="qwen-typo")
    assert error is not None and error.kind == "not_found"
    assert "'qwen-typo'" in own_words(error)
    assert "It has: qwen2.5-7b, internlm3." in error.message
    assert "--model ID (e.g. --model qwen2.5-7b)" in error.message
    assert ".." not in error.message


async def test_unknown_model_on_a_server_with_many_models_names_the_first_and_counts_the_rest() -> None:
    ids = [f"model-{i:02d}" for i in range(30)]
    handler = routes(
        {
            "/v1/chat/completions": httpx.Response(404, json=nested(404, "The model `x` does not exist.")),
            "/v1/models": httpx.Response(200, json=models_body(*ids)),
        }
    )
    async with mock_client(handler) as client:
        _, error = await chat(client, model="x")
    assert error is not None
    assert "model-00, model-01" in error.message and "model-11 and 18 more." in error.message
    assert "model-12" not in error.message


async def test_unknown_model_when_the_models_list_fails_too_still_says_how_to_choose() -> None:
    handler = routes(
        {
            "/v1/chat/completions": httpx.Response(404, json=flat(404, "The model 'x' does not exist.")),
            "/v1/models": httpx.Response(500, json=flat(500, "boom")),
        }
    )
    async with mock_client(handler) as client:
        _, error = await chat(client, model="x")
    assert error is not None and error.kind == "not_found"
    assert "/v1/models" in error.message and "--model ID" in error.message


async def test_404_without_a_model_sentence_asks_whether_the_url_is_an_openai_server() -> None:
    async with mock_client(json_response(404, {"detail": "Not Found"})) as client:
        _, error = await chat(client)
    assert error is not None and error.kind == "not_found"
    assert "--url" in error.message


@pytest.mark.parametrize("shape", [flat, nested], ids=["lmdeploy-flat", "openai-nested"])
async def test_context_length_400_is_too_long(shape: Callable[[int, str], dict[str, Any]]) -> None:
    sentence = "Input length (45016) must be smaller than the model context length (8192)."
    async with mock_client(json_response(400, shape(400, sentence))) as client:
        _, error = await chat(client)
    assert error is not None
    assert (error.kind, error.detail) == ("too_long", sentence)
    assert ADVICE.search(own_words(error))


async def test_multimodal_400_says_the_model_takes_text_only() -> None:
    sentence = "Multimodal input is not supported by this model."
    async with mock_client(json_response(400, flat(400, sentence))) as client:
        _, error = await chat(client)
    assert error is not None
    assert (error.kind, error.detail) == ("multimodal", sentence)
    assert "image" in own_words(error).lower()


async def test_fastapi_validation_error_names_the_field() -> None:
    body = {"detail": [{"type": "list_type", "loc": ["body", "messages"], "msg": "Input should be a valid list"}]}
    async with mock_client(json_response(422, body)) as client:
        _, error = await chat(client)
    assert error is not None and error.kind == "bad_request"
    assert error.detail == "messages: Input should be a valid list"


async def test_in_band_error_ends_the_reply_after_the_earlier_text() -> None:
    handler = stream_response(
        chunk("", role="assistant"),
        chunk("Once upon"),
        chunk(" a time"),
        {"error": flat(500, "An internal server error occurred.", "server_error")},
        "[DONE]",
    )
    async with mock_client(handler) as client:
        events, error = await chat(client)
    assert events == [Delta("Once upon"), Delta(" a time")]
    assert error is not None
    assert (error.kind, error.detail) == ("in_band", "An internal server error occurred.")
    assert "An internal server error occurred." in error.message


async def test_in_band_error_message_says_what_to_do() -> None:
    handler = stream_response(chunk("partial"), {"error": flat(500, "An internal server error occurred.")}, "[DONE]")
    async with mock_client(handler) as client:
        _, error = await chat(client)
    assert error is not None and error.kind == "in_band"
    assert ADVICE.search(own_words(error)), f"the message does not say what to do: {error.message!r}"


@pytest.mark.parametrize("bad", ["{not json", "[1, 2, 3]", '"text"'], ids=["broken", "list", "string"])
async def test_malformed_chunk_gives_a_notice_and_the_reply_goes_on(bad: str) -> None:
    handler = stream_response(chunk("first "), bad, chunk("second", finish="stop"), "[DONE]")
    async with mock_client(handler) as client:
        events, error = await chat(client)
    assert error is None
    assert [type(e) for e in events] == [Delta, Notice, Delta, Finish]
    assert text_of(events) == "first second"
    notice = events[1]
    assert isinstance(notice, Notice) and "malformed" in notice.text


async def test_control_sequences_are_removed_also_when_split_across_chunks() -> None:
    handler = stream_response(
        chunk("Hello \x1b]0;pwned ti"),  # OSC (window title) cut in the middle...
        chunk("tle\x07 world"),  # ...ended in the next chunk
        chunk(" \x1b["),  # CSI cut right after its introducer
        chunk("31mred\x1b[0m"),
        chunk("\x1b]52;c;ZWNobyBoaQ==\x07 bell\x07 done\x1b", finish="stop"),  # OSC 52 clipboard write, dangling ESC
        "[DONE]",
    )
    async with mock_client(handler) as client:
        events, error = await chat(client)
    assert error is None
    assert text_of(events) == "Hello  world red bell done"
    for event in events:
        if isinstance(event, Delta):
            assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", event.text), repr(event.text)


async def test_old_server_error_as_http_200_json_is_an_error() -> None:
    # lmdeploy 0.3 answered errors with status 200 and a flat body whose "object" is "error"
    body = {"message": "The model `x` does not exist.", "type": "invalid_request_error", "code": 404, "object": "error"}

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=body)

    async with mock_client(handler) as client:
        events, error = await chat(client, model="x")
    assert events == []
    assert error is not None
    assert (error.kind, error.detail) == ("not_found", "The model `x` does not exist.")


async def test_server_ignoring_stream_still_gives_the_reply() -> None:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Hi \x1b[2Jthere"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
    }
    async with mock_client(json_response(200, body)) as client:
        events, error = await chat(client)
    assert error is None
    assert events == [Delta("Hi there"), Finish("stop"), Usage(9, 2, 11, None)]


async def test_answer_that_is_neither_stream_nor_json_is_a_protocol_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/html"}, content=b"<html>proxy login</html>")

    async with mock_client(handler) as client:
        _, error = await chat(client)
    assert error is not None and error.kind == "protocol"


# -------------------------------------------------------------------------------------------- other endpoints


async def test_list_models_returns_the_ids() -> None:
    body = {"object": "list", "data": [{"id": "internlm2", "object": "model"}, {"id": "qwen", "object": "model"}]}
    async with mock_client(json_response(200, body)) as client:
        assert await client.list_models() == ["internlm2", "qwen"]


async def test_list_models_with_a_wrong_key_is_unauthorized() -> None:
    async with mock_client(json_response(401, flat(401, "Unauthorized.", "authentication_error"))) as client:
        with pytest.raises(ChatError) as info:
            await client.list_models()
    assert info.value.kind == "unauthorized"
    assert "--api-key" in info.value.message


async def test_list_models_that_is_not_a_list_is_a_protocol_error() -> None:
    async with mock_client(json_response(200, {"models": "nope"})) as client:
        with pytest.raises(ChatError) as info:
            await client.list_models()
    assert info.value.kind == "protocol"


async def test_health_200_reports_the_server_message() -> None:
    body = {"status": "healthy", "message": "PyTorch engine is healthy."}
    async with mock_client(routes({"/health": httpx.Response(200, json=body)})) as client:
        assert await client.health() == Health(True, 200, "PyTorch engine is healthy.")


async def test_health_empty_200_of_an_older_server_is_ok() -> None:
    async with mock_client(routes({"/health": httpx.Response(200)})) as client:
        health = await client.health()
    assert health.ok and health.status == 200 and health.message


async def test_health_503_is_not_ok_and_says_to_wait() -> None:
    body = {"status": "initializing", "message": "Engine health monitor is starting."}
    async with mock_client(routes({"/health": httpx.Response(503, json=body)})) as client:
        health = await client.health()
    assert (health.ok, health.status) == (False, 503)
    assert "Engine health monitor is starting." in health.message
    assert "try again" in health.message


async def test_health_404_falls_back_to_the_models_list() -> None:
    models = httpx.Response(200, json={"object": "list", "data": [{"id": "m"}]})
    async with mock_client(routes({"/v1/models": models})) as client:
        health = await client.health()
    assert (health.ok, health.status) == (True, 404)
    async with mock_client(routes({})) as client:
        down = await client.health()
    assert (down.ok, down.status) == (False, 404)
    assert "--url" in down.message


async def test_health_with_nothing_listening_is_not_ok_with_a_sentence() -> None:
    async with real_client(f"http://127.0.0.1:{free_port()}") as client:
        health = await client.health()
    assert (health.ok, health.status) == (False, None)
    assert "cannot reach" in health.message and "connection refused" in health.message
    assert "ssh -L" in health.message


async def test_metrics_text_returns_the_prometheus_text() -> None:
    text = "# TYPE lmdeploy:num_requests_running gauge\nlmdeploy:num_requests_running 2.0\n"
    metrics = httpx.Response(200, text=text, headers={"content-type": "text/plain; version=0.0.4"})
    async with mock_client(routes({"/metrics": metrics})) as client:
        got = await client.metrics_text()
    assert got == text
    assert parse_metrics(got).running == 2


async def test_metrics_404_says_metrics_may_be_disabled() -> None:
    async with mock_client(routes({})) as client:
        with pytest.raises(ChatError) as info:
            await client.metrics_text()
    assert (info.value.kind, info.value.status) == ("not_found", 404)
    assert "--disable-metrics" in info.value.message


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ({"input_ids": [7, 8, 9], "length": 3}, 3),
        ({"input_ids": [7, 8]}, 2),
        ({"input_ids": [[7, 8, 9, 10]], "length": [4]}, 4),
        ({"tokens": "?"}, None),
    ],
    ids=["length", "input_ids", "batch", "unknown-shape"],
)
async def test_count_tokens(answer: dict[str, Any], expected: int | None) -> None:
    seen: list[Any] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, json=answer)

    async with mock_client(handler) as client:
        assert await client.count_tokens("how many tokens") == expected
    assert seen[0]["input"] == "how many tokens"


async def test_count_tokens_without_the_endpoint_is_none() -> None:
    async with mock_client(routes({})) as client:
        assert await client.count_tokens("hello") is None


async def test_engine_info_decodes_the_json_string_holding_json() -> None:
    info = {"tp_size": 1, "block_size": 64, "num_gpu_blocks": 1024}
    answer = httpx.Response(200, json=json.dumps(info))
    async with mock_client(routes({"/distserve/engine_info": answer})) as client:
        assert await client.engine_info() == info
    async with mock_client(routes({})) as client:
        assert await client.engine_info() is None


# ---------------------------------------------------------------------------------------- against the stand-in


@pytest.fixture(scope="module")
def standin() -> Iterator[Standin]:
    with run_standin("--fake-rate", "1000") as s:
        yield s


async def test_standin_streams_a_reply_with_usage(standin: Standin) -> None:
    reply = "Hello there, friend. How are you today?"
    async with real_client(standin.url) as client:
        events, error = await chat(
            client, f"[[reply:{reply}]]", model="tiny-chat", sampling=Sampling(temperature=0.5, seed=7)
        )
    assert error is None
    assert text_of(events) == reply
    assert [e for e in events if isinstance(e, Finish)] == [Finish("stop")]
    n = len(tokenize(reply))
    prompt = 4 + len(f"[[reply:{reply}]]".split())
    assert events[-1] == Usage(prompt, n, prompt + n, 0)
    sent = standin.stats()["last_request"]
    assert sent["stream_options"] == {"include_usage": True}
    assert (sent["temperature"], sent["seed"]) == (0.5, 7)


async def test_standin_wrong_key_is_unauthorized(standin: Standin) -> None:
    async with real_client(standin.url, "not-the-key") as client:
        _, error = await chat(client, model="tiny-chat")
    assert error is not None
    assert (error.kind, error.status) == ("unauthorized", 401)


async def test_standin_unknown_model_is_not_found(standin: Standin) -> None:
    async with real_client(standin.url) as client:
        _, error = await chat(client, model="no-such-model")
    assert error is not None
    assert error.kind == "not_found"
    assert error.detail == "The model 'no-such-model' does not exist."
    assert "no-such-model" in own_words(error)


async def test_standin_session_too_long_is_too_long_with_the_exact_sentence(standin: Standin) -> None:
    words = 5000
    async with real_client(standin.url) as client:
        _, error = await chat(client, "word " * words, model="tiny-chat")
    assert error is not None
    assert error.kind == "too_long"
    assert error.detail == f"Input length ({words + 4}) must be smaller than the model context length (4096)."
    assert error.detail in error.message


async def test_standin_stall_is_reported_within_a_couple_of_seconds(standin: Standin) -> None:
    async with real_client(standin.url, stall_timeout=0.5) as client:
        started = time.monotonic()
        events, error = await chat(client, "[[fault:stall=2]] hi", model="tiny-chat")
        elapsed = time.monotonic() - started
    assert error is not None and error.kind == "stall"
    assert "0.5 s" in error.message
    assert text_of(events)  # the first chunks arrived before the silence
    assert elapsed < 2.5


async def test_standin_in_band_error(standin: Standin) -> None:
    async with real_client(standin.url) as client:
        events, error = await chat(client, "[[fault:inband=2]] hi", model="tiny-chat")
    assert error is not None
    assert (error.kind, error.detail) == ("in_band", "An internal server error occurred.")
    assert DEFAULT_REPLY.startswith(text_of(events)) and text_of(events)


async def test_standin_malformed_chunk_gives_a_notice_then_the_rest(standin: Standin) -> None:
    async with real_client(standin.url) as client:
        events, error = await chat(client, "[[fault:malformed=2]] hi", model="tiny-chat")
    assert error is None
    notices = [i for i, e in enumerate(events) if isinstance(e, Notice)]
    assert len(notices) == 1
    assert isinstance(events[notices[0] - 1], Delta) and isinstance(events[notices[0] + 1], Delta)
    assert text_of(events) == DEFAULT_REPLY
    assert isinstance(events[-1], Usage)


async def test_standin_count_tokens_matches_its_encode_endpoint(standin: Standin) -> None:
    text = "the quick brown fox jumps over the lazy dog"
    async with real_client(standin.url) as client:
        counted = await client.count_tokens(text)
    direct = httpx.post(f"{standin.url}/v1/encode", headers=standin.headers, json={"input": text}, trust_env=False)
    assert counted is not None and counted == direct.json()["length"] == 9


async def test_standin_metrics_and_engine_info(standin: Standin) -> None:
    async with real_client(standin.url) as client:
        _, error = await chat(client, "[[reply:one two three]]", model="tiny-chat")
        assert error is None
        metrics = parse_metrics(await client.metrics_text())
        info = await client.engine_info()
    assert metrics.succeeded is not None and metrics.succeeded >= 1
    assert metrics.generation_tokens_total is not None and metrics.generation_tokens_total > 0
    assert info is not None and info["block_size"] == 64


async def test_standin_dying_mid_reply_is_a_reset() -> None:
    with run_standin("--fake-die-after", "3", "--fake-rate", "1000") as s:
        async with real_client(s.url) as client:
            events, error = await chat(client, model="tiny-chat")
    assert error is not None
    assert error.kind == "reset"
    assert text_of(events) and DEFAULT_REPLY.startswith(text_of(events)) and text_of(events) != DEFAULT_REPLY


async def test_standin_unknown_model_lists_the_model_it_has(standin: Standin) -> None:
    async with real_client(standin.url) as client:
        _, error = await chat(client, model="no-such-model")
    assert error is not None
    assert "It has: tiny-chat." in error.message
    assert "--model tiny-chat" in error.message
    assert ".." not in error.message


async def test_https_to_a_plain_http_server_says_to_use_http(standin: Standin) -> None:
    plain = standin.url  # http://127.0.0.1:PORT
    tls_url = plain.replace("http://", "https://")
    async with real_client(tls_url) as client:
        _, error = await chat(client, model="tiny-chat")
        health = await client.health()
    assert error is not None and error.kind == "tls"
    assert error.message == (
        f"the server at {tls_url} speaks plain HTTP, not HTTPS: use {plain} instead (--url {plain})."
    )
    assert "SSL" not in error.message
    assert not health.ok and f"use {plain}" in health.message


def _raising(exc: Exception) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    return handler


def _connect_error_from(cause: ssl.SSLError) -> httpx.ConnectError:
    try:
        raise httpx.ConnectError(str(cause)) from cause
    except httpx.ConnectError as exc:
        return exc


async def test_https_to_plain_http_is_recognised_by_newer_openssl_reason_too() -> None:
    # OpenSSL 3.2+ reports the same mistake as RECORD_LAYER_FAILURE instead of WRONG_VERSION_NUMBER
    cause = ssl.SSLError(1, "[SSL: RECORD_LAYER_FAILURE] record layer failure (_ssl.c:1000)")
    cause.reason = "RECORD_LAYER_FAILURE"
    client = ChatClient("https://box:8443", transport=httpx.MockTransport(_raising(_connect_error_from(cause))))
    try:
        _, error = await chat(client)
    finally:
        await client.aclose()
    assert error is not None and error.kind == "tls"
    assert "speaks plain HTTP" in error.message and "use http://box:8443 instead" in error.message


async def test_an_untrusted_certificate_is_named_as_such_not_as_a_dead_server() -> None:
    cause = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    cause.reason = "CERTIFICATE_VERIFY_FAILED"
    cause.verify_message = "self-signed certificate"
    client = ChatClient("https://box:8443", transport=httpx.MockTransport(_raising(_connect_error_from(cause))))
    try:
        _, error = await chat(client)
    finally:
        await client.aclose()
    assert error is not None and error.kind == "tls"
    assert "self-signed certificate" in error.message and "does not trust" in error.message
    assert "Start one" not in error.message


async def test_nothing_listening_is_connect_with_the_ssh_hint() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    async with real_client(url) as client:
        started = time.monotonic()
        _, error = await chat(client)
    assert time.monotonic() - started < 2
    assert error is not None and error.kind == "connect"
    assert url in error.message
    assert "ssh -L 23333:127.0.0.1:23333" in error.message


async def test_closing_the_stream_early_aborts_generation_on_the_server() -> None:
    with run_standin("--fake-words", "3000") as s:
        async with real_client(s.url) as client:
            # stream_chat is an async generator (annotated as a plain AsyncIterator)
            stream = cast(
                AsyncGenerator[StreamEvent, None],
                client.stream_chat("tiny-chat", [{"role": "user", "content": "go"}], Sampling()),
            )
            deltas = 0
            async for event in stream:
                deltas += isinstance(event, Delta)
                if deltas == 3:
                    break
            await stream.aclose()  # what Stop does
            await eventually(lambda: s.stats()["aborted"] == 1, what="the server to count the request as aborted")
            stats = s.stats()
        assert stats["completed"] == 0
        assert stats["running"] == 0
        assert stats["generated_tokens"] < 3000


async def test_a_model_listed_by_several_nodes_of_a_proxy_is_offered_once() -> None:
    # lmdeploy 0.18's proxy concatenates its nodes' model lists
    def handler(request: httpx.Request) -> httpx.Response:
        ids = ["m", "other", "m"]
        return httpx.Response(200, json={"object": "list", "data": [{"id": i, "object": "model"} for i in ids]})

    client = ChatClient("http://proxy", transport=httpx.MockTransport(handler))
    assert await client.list_models() == ["m", "other"]
    await client.aclose()


async def test_a_proxy_whose_node_died_gets_a_sentence_not_a_protocol_error() -> None:
    # seen on the H200: lmdeploy 0.18's proxy answers 200 with this body when the node it routed to is gone
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"error_code": 10402, "text": "Failed to get response after a period of time"})

    client = ChatClient("http://proxy", transport=httpx.MockTransport(handler))
    with pytest.raises(ChatError) as info:
        async for _ in client.stream_chat("m", [{"role": "user", "content": "hi"}], Sampling()):
            pass
    assert info.value.kind == "proxy"
    assert "a node may have stopped" in info.value.message and "Retry (ctrl+r)" in info.value.message
    await client.aclose()
