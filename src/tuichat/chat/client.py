"""The HTTP side of a chat: an OpenAI-compatible client tuned for a local LMDeploy api_server.

One `ChatClient` lives as long as the app (one connection pool). Replies stream as Server-Sent Events parsed by
httpx-sse, which splits only on SSE line endings (httpx's own `aiter_lines` also splits on U+2028 and can cut a
JSON payload in two). Timeouts: a short connect timeout so a dead server is reported at once, and a long read
timeout (the stall timeout) because a long prefill sends nothing for a while. `trust_env=False` keeps an
`HTTP_PROXY` in the environment from capturing traffic to 127.0.0.1.

Every failure becomes a `ChatError` with a `kind` and a sentence saying what to do; the caller never sees an
httpx exception. A stream that ends with neither `[DONE]` nor a finish reason was cut off (a server dying with
`Connection: close`, or a chunked body that just ends, looks to httpx like a normal end): after the text that
arrived, it raises `StreamCutOff`, so the reply is marked interrupted instead of saved as complete.

Error bodies come in LMDeploy's flat shape (`{"message", "type", "code", "object": "error"}`) or OpenAI's nested
one (`{"error": {"message"}}`); both are understood.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tuichat.chat.sampling import Sampling
from tuichat.chat.sanitize import StreamCleaner, clean
from tuichat.errors import TuichatError

if TYPE_CHECKING:
    import ssl

    import httpx

# httpx (~70 ms to import, with its command-line tool's click and rich when they are installed) and ssl are
# imported by the first request, not with this module: the chat's first frame needs neither.

DEFAULT_URL = "http://127.0.0.1:23333"
SSH_HINT = "for a server on another machine, forward its port: ssh -L 23333:127.0.0.1:23333 HOST"


class ChatError(TuichatError):
    """A request failed. `kind` says how; `message` is what the user reads (already with the fix).

    kinds: connect, tls, unauthorized, not_found, too_long, bad_request, multimodal, unavailable, server, in_band,
    stall, reset, cutoff, protocol.
    """

    def __init__(self, kind: str, message: str, *, status: int | None = None, detail: str | None = None):
        self.kind = kind
        self.message = message
        self.status = status
        self.detail = detail  # the server's own sentence, when it gave one
        super().__init__(message)


class StreamCutOff(ChatError):
    """The stream ended without `[DONE]` or a finish reason: the server closed the reply before finishing it.

    Raised only after every piece of text that did arrive was yielded, so the caller keeps the partial reply."""

    def __init__(self) -> None:
        super().__init__(
            "cutoff",
            "the server closed the connection before finishing the reply (no finish reason, no [DONE]): it may "
            "have crashed or restarted. The partial reply is kept and marked interrupted; check the server's log "
            "(F5, or `tuichat logs PROFILE`) and retry (ctrl+r) once it is back.",
        )


# OpenSSL's reasons when an https:// client gets a plain-HTTP answer (an "HTTP/1.1 400" where a TLS record should
# be); RECORD_LAYER_FAILURE is OpenSSL 3.2+'s name for it, UNKNOWN_PROTOCOL older ones'.
_PLAIN_HTTP_REASONS = frozenset(
    {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "UNKNOWN_PROTOCOL"}
)
MODELS_SHOWN = 12  # an Ollama-style server may list dozens; the message names the first few


@dataclass(frozen=True)
class Delta:
    """A piece of reply text (already cleaned of control sequences)."""

    text: str


@dataclass(frozen=True)
class Finish:
    """The reply's last content chunk arrived; `reason` is stop, length, abort, ..."""

    reason: str | None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    cached_tokens: int | None


@dataclass(frozen=True)
class Notice:
    """Something odd the user should know about, that did not end the reply (e.g. a malformed chunk)."""

    text: str


StreamEvent = Delta | Finish | Usage | Notice


@dataclass(frozen=True)
class Health:
    ok: bool
    status: int | None
    message: str


def warm_up() -> None:
    """Import what the first streamed reply needs (httpx-sse, over httpx) ahead of it: a front end calls this
    once its first screen is out, so the first Enter does not wait for the imports (~1 ms, more on a cold disk)."""
    import httpx_sse  # noqa: F401


def _error_text(body: bytes) -> str | None:
    """The human sentence from an error body, in either the flat or the nested shape."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        text = body.decode("utf-8", "replace").strip()
        return clean(text[:500]) or None
    if isinstance(data, dict):
        inner = data.get("error")
        if isinstance(inner, dict):
            data = inner
        elif isinstance(inner, str):
            return clean(inner)
        for key in ("message", "detail", "msg"):
            value = data.get(key)
            if isinstance(value, str) and value:
                return clean(value)
            if isinstance(value, list) and value:  # FastAPI validation errors
                first = value[0]
                if isinstance(first, dict) and isinstance(first.get("msg"), str):
                    loc = ".".join(str(p) for p in first.get("loc", [])[1:])
                    return clean(f"{loc}: {first['msg']}" if loc else first["msg"])
    return None


class ChatClient:
    """Talks to one server. Create it once; call `aclose()` when the app ends."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        stall_timeout: float = 120.0,
        connect_timeout: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.stall_timeout = stall_timeout
        self._connect_timeout = connect_timeout
        self._transport = transport
        self._client: httpx.AsyncClient | None = None  # made by the first request (see `_http`)

    @property
    def _http(self) -> httpx.AsyncClient:
        """The connection pool, made on first use."""
        if self._client is None:
            import httpx

            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            connect = self._connect_timeout
            self._client = httpx.AsyncClient(
                base_url=self.base_url,
                headers=headers,
                timeout=httpx.Timeout(connect=connect, read=self.stall_timeout, write=30.0, pool=connect),
                trust_env=False,
                transport=self._transport,
                # Loading the CA bundle costs ~30 ms (measured); plain http:// never needs it.
                verify=self.base_url.startswith("https://"),
            )
        return self._client

    def __repr__(self) -> str:  # never show the key
        return f"ChatClient({self.base_url!r}, api_key={'set' if self.api_key else 'none'})"

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    # -- plain requests ---------------------------------------------------------------------------------------

    def _transport_error(self, exc: Exception) -> ChatError:
        import ssl

        import httpx

        tls = _ssl_cause(exc)
        if tls is not None:
            reason = tls.reason or ""
            if reason in _PLAIN_HTTP_REASONS or "wrong version number" in str(tls):
                plain = "http://" + self.base_url.removeprefix("https://")
                return ChatError(
                    "tls",
                    f"the server at {self.base_url} speaks plain HTTP, not HTTPS: use {plain} instead (--url {plain}).",
                )
            if isinstance(tls, ssl.SSLCertVerificationError) or "CERTIFICATE" in reason:
                return ChatError(
                    "tls",
                    f"the server at {self.base_url} has a TLS certificate this machine does not trust "
                    f"({tls.verify_message if isinstance(tls, ssl.SSLCertVerificationError) else reason}). "
                    "Use the host name the certificate was issued for, or add its CA to the system's trust store.",
                )
            return ChatError("tls", f"the TLS handshake with {self.base_url} failed ({_short(exc)}). Check --url.")
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
            return ChatError(
                "connect",
                f"cannot reach the server at {self.base_url} ({_short(exc)}). Start one (F5, or "
                f"`tuichat serve`) or check --url; {SSH_HINT}. Your prompt is kept: send again when it is up.",
            )
        if isinstance(exc, httpx.ReadTimeout):
            return ChatError(
                "stall",
                f"the server sent nothing for {self.stall_timeout:g} s, so the reply was stopped. "
                "Raise ui.stall_timeout in the config if long prompts need more time.",
            )
        if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError):
            return ChatError(
                "reset",
                "the connection to the server broke (it may have crashed or restarted). "
                "Check the server's log (F5); retry (ctrl+r) once it is back.",
            )
        return ChatError("protocol", f"the request to {self.base_url} failed: {_short(exc)}")

    def _status_error(
        self, status: int, body: bytes, model: str | None = None, models: Sequence[str] | None = None
    ) -> ChatError:
        """The error for an HTTP status. `models` (what /v1/models lists) is named in an unknown-model message."""
        detail = _error_text(body)
        # ": <the server's sentence>" ending in exactly one full stop, or just the full stop
        said = f": {_sentence(detail)}" if detail else "."
        if status == 401:
            return ChatError(
                "unauthorized",
                "the server refused the API key (401 Unauthorized). Pass --api-key, set OPENAI_API_KEY, "
                "or put api_key under [server] in the config.",
                status=status,
                detail=detail,
            )
        if status == 404:
            if _is_unknown_model(detail):
                return ChatError("not_found", _unknown_model_text(model, detail, models), status=status, detail=detail)
            return ChatError(
                "not_found",
                f"{self.base_url} answered 404 Not Found: is it an OpenAI-compatible server (such as "
                "`lmdeploy serve api_server`)? Check --url.",
                status=status,
                detail=detail,
            )
        if status == 400 and detail and "context length" in detail:
            return ChatError(
                "too_long",
                f"the conversation is too long for the model{said} Shorten the message, undo earlier "
                "exchanges (F6), start a new chat (ctrl+n), or launch with a larger session_len.",
                status=status,
                detail=detail,
            )
        if status == 400 and detail and "multimodal" in detail.lower():
            return ChatError(
                "multimodal",
                f"this model takes text only{said} Remove the image, or start a vision-language profile.",
                status=status,
                detail=detail,
            )
        if 400 <= status < 500:
            return ChatError(
                "bad_request",
                f"the server refused the request ({status}){said} Change the value it names (F2 opens the "
                "sampling pane) and send again.",
                status=status,
                detail=detail,
            )
        if status == 503:
            return ChatError(
                "unavailable",
                f"the server is not ready (503){said} It may still be loading; try again shortly.",
                status=status,
                detail=detail,
            )
        return ChatError(
            "server",
            f"the server failed ({status}){said} Check its log (F5, or `tuichat logs PROFILE`) and retry (ctrl+r).",
            status=status,
            detail=detail,
        )

    async def _request_error(self, status: int, body: bytes, model: str | None) -> ChatError:
        """`_status_error`, after asking the server which models it has when the model was unknown."""
        if status != 404 or not _is_unknown_model(_error_text(body)):
            return self._status_error(status, body, model)
        try:
            models: list[str] | None = await self.list_models()
        except ChatError:
            models = None  # the message then says where to look instead
        return self._status_error(status, body, model, models)

    async def _get(self, path: str) -> httpx.Response:
        import httpx

        try:
            return await self._http.get(path)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from None

    async def health(self) -> Health:
        """`/health` without raising: ok, or why not (down, loading, old server with no /health)."""
        import httpx

        try:
            resp = await self._http.get("/health", timeout=min(5.0, self.stall_timeout))
        except httpx.HTTPError as exc:
            return Health(False, None, self._transport_error(exc).message)
        if resp.status_code == 200:
            return Health(True, 200, _error_text(resp.content) or "healthy")
        if resp.status_code == 404:
            # Servers older than lmdeploy 0.14, and other OpenAI servers, have no /health: try the models list.
            try:
                await self.list_models()
            except ChatError as exc:
                return Health(False, 404, exc.message)
            return Health(True, 404, "no /health endpoint; the models list answers")
        return Health(False, resp.status_code, self._status_error(resp.status_code, resp.content).message)

    async def list_models(self) -> list[str]:
        resp = await self._get("/v1/models")
        if resp.status_code != 200:
            raise self._status_error(resp.status_code, resp.content)
        try:
            data = resp.json()
            # lmdeploy's proxy lists a model once per node that serves it: one entry per id is what a picker wants
            return list(dict.fromkeys(clean(str(item["id"])) for item in data["data"]))
        except (ValueError, KeyError, TypeError):
            raise ChatError("protocol", f"{self.base_url}/v1/models did not answer with a model list") from None

    async def metrics_text(self) -> str:
        """The Prometheus text of `/metrics`; raises ChatError (404 = metrics off or not LMDeploy)."""
        resp = await self._get("/metrics")
        if resp.status_code == 404:
            raise ChatError(
                "not_found",
                "the server exposes no /metrics (started with --disable-metrics, older than 0.14, or not LMDeploy)",
                status=404,
            )
        if resp.status_code != 200:
            raise self._status_error(resp.status_code, resp.content)
        return resp.text

    async def count_tokens(self, text: str) -> int | None:
        """Exact token count from the server's tokenizer (`/v1/encode`), or None if it has no such endpoint."""
        import httpx

        try:
            resp = await self._http.post("/v1/encode", json={"input": text, "add_bos": False})
        except httpx.HTTPError:
            return None
        if resp.status_code != 200:
            return None
        try:
            data = resp.json()
            length = data.get("length")
            if isinstance(length, list):  # a batch answer
                length = length[0] if length else None
            if isinstance(length, int):
                return length
            ids = data.get("input_ids")
            return len(ids) if isinstance(ids, list) else None
        except (ValueError, AttributeError, TypeError):
            return None

    async def engine_info(self) -> dict[str, Any] | None:
        """PyTorch-backend engine facts (block_size, num_gpu_blocks); None where the server has none."""
        import httpx

        try:
            resp = await self._http.get("/distserve/engine_info")
        except httpx.HTTPError:
            return None
        if resp.status_code != 200:
            return None
        try:
            data: Any = resp.json()
            if isinstance(data, str):  # LMDeploy returns a JSON string holding JSON
                data = json.loads(data)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    # -- chat -------------------------------------------------------------------------------------------------

    def chat_body(
        self, model: str, messages: Sequence[Mapping[str, Any]], sampling: Sampling, stream: bool = True
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "messages": list(messages), "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        body.update(sampling.request_fields())
        return body

    async def stream_chat(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        sampling: Sampling,
        on_sent: Callable[[], None] | None = None,
    ) -> AsyncGenerator[StreamEvent, None]:
        """Stream one reply. Closing the generator (or cancelling its task) closes the connection, which makes
        LMDeploy stop generating: that is how Stop works.

        `on_sent` is called once the whole request is on the wire, while the server works on its answer: what a
        front end does then costs the reply nothing. It is not called for a request that never went out, and a
        transport that reports no sending (a test's MockTransport) does not call it at all."""
        import httpx
        from httpx_sse import SSEError, aconnect_sse

        body = self.chat_body(model, messages, sampling)
        extensions: dict[str, Any] = {}
        if on_sent is not None:

            async def trace(event: str, info: Mapping[str, Any]) -> None:
                # httpcore's trace hook names each step of a request; this one ends the sending of the body
                if event.endswith("send_request_body.complete"):
                    on_sent()

            extensions["trace"] = trace
        try:
            async with aconnect_sse(
                self._http, "POST", "/v1/chat/completions", json=body, extensions=extensions
            ) as source:
                response = source.response
                if response.status_code != 200:
                    raise await self._request_error(response.status_code, await response.aread(), model)
                ctype = response.headers.get("content-type", "")
                if "text/event-stream" not in ctype:
                    # Old LMDeploy (0.3) reports errors as HTTP 200 JSON; others may ignore `stream`.
                    async for event in self._non_stream_answer(await response.aread(), model):
                        yield event
                    return
                cleaner = StreamCleaner()
                finished = False
                async for sse in source.aiter_sse():
                    data = sse.data
                    if data.strip() == "[DONE]":
                        finished = True
                        break
                    if not data.strip():
                        continue
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        yield Notice("the server sent a malformed chunk; it was skipped")
                        continue
                    if not isinstance(chunk, dict):
                        yield Notice("the server sent a malformed chunk; it was skipped")
                        continue
                    if "error" in chunk:
                        detail = _error_text(json.dumps(chunk).encode()) or "unknown error"
                        raise ChatError(
                            "in_band",
                            f"the server reported an error mid-reply: {detail}. The partial reply is kept; "
                            "retry (ctrl+r), and check the server's log (F5) if it happens again.",
                            detail=detail,
                        )
                    for event in _chunk_events(chunk, cleaner):
                        finished = finished or isinstance(event, Finish)
                        yield event
                rest = cleaner.flush()
                if rest:
                    yield Delta(rest)
                if not finished:
                    raise StreamCutOff()
        except ChatError:
            raise
        except SSEError as exc:
            raise ChatError("protocol", f"the server's stream was not Server-Sent Events: {exc}") from None
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from None

    async def _non_stream_answer(self, body: bytes, model: str) -> AsyncIterator[StreamEvent]:
        try:
            data = json.loads(body)
        except ValueError:
            raise ChatError("protocol", "the server answered with neither a stream nor JSON") from None
        if isinstance(data, dict) and isinstance(data.get("error_code"), int):
            # lmdeploy's proxy answers 200 with {"error_code": 10402, "text": ...} when the node it picked failed
            text = clean(str(data.get("text") or "no answer from the node"))
            raise ChatError(
                "proxy",
                f"the proxy could not get an answer from a node ({text}, error_code {data['error_code']}): a node may "
                "have stopped. Retry (ctrl+r): the proxy drops a dead node at its next health check.",
                detail=text,
            )
        if isinstance(data, dict) and (data.get("object") == "error" or "error" in data):
            code = data.get("code")
            raise await self._request_error(code if isinstance(code, int) and 400 <= code < 600 else 400, body, model)
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise ChatError(
                "protocol", "the server's answer had no choices: is --url an OpenAI-compatible chat server?"
            ) from None
        yield Delta(clean(text))
        yield Finish(choice.get("finish_reason"))
        usage = data.get("usage")
        if isinstance(usage, dict):
            yield _usage(usage)


def _chunk_events(chunk: Mapping[str, Any], cleaner: StreamCleaner) -> list[StreamEvent]:
    events: list[StreamEvent] = []
    choices = chunk.get("choices") or []
    if isinstance(choices, list):
        for choice in choices[:1]:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta") or {}
            text = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(text, str) and text:
                cleaned = cleaner.feed(text)
                if cleaned:
                    events.append(Delta(cleaned))
            reason = choice.get("finish_reason")
            if reason:
                events.append(Finish(str(reason)))
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        events.append(_usage(usage))
    return events


def _sentence(text: str) -> str:
    """`text` ending in exactly one full stop (or its own ! or ?), so a message never reads "exist.. Pick"."""
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def _is_unknown_model(detail: str | None) -> bool:
    return detail is not None and "model" in detail.lower()


def _unknown_model_text(model: str | None, detail: str | None, models: Sequence[str] | None) -> str:
    asked = f"'{model}'" if model else "the model asked for"
    said = f": {_sentence(detail)}" if detail else "."
    if models is None:
        has = "See the ids it lists under /v1/models."
    elif not models:
        has = "It lists no model at all: check how it was started (F5, or `tuichat logs PROFILE`)."
    else:
        shown = ", ".join(models[:MODELS_SHOWN])
        more = f" and {len(models) - MODELS_SHOWN} more" if len(models) > MODELS_SHOWN else ""
        has = f"It has: {shown}{more}."
    example = f" (e.g. --model {models[0]})" if models else ""
    return (
        f"the server has no model {asked}{said} {has} Choose one with --model ID{example}, "
        "or set model under [server] in the config."
    )


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    """The `ssl.SSLError` behind an httpx error (httpx wraps httpcore's error, which wraps the ssl one)."""
    import ssl

    seen: BaseException | None = exc
    for _ in range(6):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _usage(usage: Mapping[str, Any]) -> Usage:
    details = usage.get("prompt_tokens_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else None
    return Usage(
        _int(usage.get("prompt_tokens")),
        _int(usage.get("completion_tokens")),
        _int(usage.get("total_tokens")),
        cached,
    )


def _short(exc: Exception) -> str:
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    if "Connection refused" in text or "[Errno 111]" in text or "All connection attempts failed" in text:
        return "connection refused: nothing listens there"
    if "Name or service not known" in text or "nodename nor servname" in text:
        return "unknown host name"
    return text[:200]
