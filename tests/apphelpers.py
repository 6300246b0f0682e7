"""Helpers for driving the app in tests: a scripted OpenAI-style transport and wait-for-condition."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from textual.pilot import Pilot

from tuichat.config import Config, load_config
from tuichat.ui.app import AppOptions, TuichatApp, make_app


def chunk(text: str | None = None, finish: str | None = None, role: bool = False) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
    if text is not None:
        delta["content"] = text
    return {
        "id": "1",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "tiny-chat",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        "usage": None,
    }


def usage_chunk(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    return {
        "id": "1",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "tiny-chat",
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        },
    }


class ScriptedServer:
    """An in-process OpenAI-compatible server for httpx.MockTransport.

    `reply` is the text each chat request streams back (split into `pieces`); `delay` slows chunks so a test can
    press Esc mid-stream; `models` is the /v1/models list. Every chat request body is kept in `requests`.
    `hold_at` = (piece, event) holds the stream before that piece until the event is set, so a test can look at
    a reply while it is surely still streaming.
    """

    def __init__(self, reply: str = "Hello **there**.", models: tuple[str, ...] = ("tiny-chat",)) -> None:
        self.reply = reply
        self.models = list(models)
        self.delay = 0.0
        self.pieces = 4
        self.requests: list[dict[str, Any]] = []
        self.closed_early = 0
        self.status: int | None = None  # answer chat requests with this error status
        self.error_body: dict[str, Any] = {}
        self.raw_events: list[str] | None = None  # send these `data:` payloads verbatim instead
        self.metrics: str | None = None  # /metrics text; None answers 404 like --disable-metrics
        self.hold_at: tuple[int, asyncio.Event] | None = None

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/health":
            return httpx.Response(200, json={"status": "healthy", "message": "PyTorch engine is healthy."})
        if path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": m} for m in self.models]})
        if path == "/metrics":
            if self.metrics is None:
                return httpx.Response(404, json={"detail": "Not Found"})
            return httpx.Response(200, text=self.metrics)
        if path == "/v1/chat/completions":
            body = json.loads(request.content)
            self.requests.append(body)
            if self.status is not None:
                return httpx.Response(self.status, json=self.error_body)
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=self._events(body))
        return httpx.Response(404, json={"detail": "Not Found"})

    async def _events(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        finished = False
        try:
            if self.raw_events is not None:
                for payload in self.raw_events:
                    yield f"data: {payload}\n\n".encode()
                finished = True
                return
            text = self.reply
            size = max(1, -(-len(text) // self.pieces))
            parts = [text[i : i + size] for i in range(0, len(text), size)]
            for i, part in enumerate(parts):
                if self.delay:
                    await asyncio.sleep(self.delay)
                if self.hold_at is not None and i == self.hold_at[0]:
                    await self.hold_at[1].wait()
                last = i == len(parts) - 1
                yield f"data: {json.dumps(chunk(part, 'stop' if last else None, role=i == 0))}\n\n".encode()
            yield f"data: {json.dumps(usage_chunk(12, len(parts)))}\n\n".encode()
            yield b"data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:
                self.closed_early += 1


def lmdeploy_metrics(kv: float = 0.42, running: int = 2, waiting: int = 1, generated: float = 1000.0) -> str:
    """A /metrics answer shaped like LMDeploy 0.18's."""
    labels = '{engine="0",model_name="tiny-chat"}'
    return "\n".join(
        [
            "# HELP lmdeploy:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.",
            "# TYPE lmdeploy:gpu_cache_usage_perc gauge",
            f"lmdeploy:gpu_cache_usage_perc{labels} {kv}",
            "# TYPE lmdeploy:num_requests_running gauge",
            f"lmdeploy:num_requests_running{labels} {running}",
            "# TYPE lmdeploy:num_requests_waiting gauge",
            f"lmdeploy:num_requests_waiting{labels} {waiting}",
            "# TYPE lmdeploy:prefix_cache_hit_rate gauge",
            f"lmdeploy:prefix_cache_hit_rate{labels} 0.25",
            "# TYPE lmdeploy:generation_tokens_total counter",
            f"lmdeploy:generation_tokens_total{labels} {generated}",
            "# TYPE lmdeploy:prompt_tokens_total counter",
            f"lmdeploy:prompt_tokens_total{labels} 500.0",
            "# TYPE lmdeploy:time_to_first_token_seconds histogram",
            'lmdeploy:time_to_first_token_seconds_bucket{engine="0",model_name="tiny-chat",le="0.1"} 3.0',
            'lmdeploy:time_to_first_token_seconds_bucket{engine="0",model_name="tiny-chat",le="+Inf"} 4.0',
            f"lmdeploy:time_to_first_token_seconds_sum{labels} 0.8",
            f"lmdeploy:time_to_first_token_seconds_count{labels} 4.0",
            "",
        ]
    )


def app_for(
    server: ScriptedServer | None = None,
    *,
    config: Config | None = None,
    url: str | None = "http://127.0.0.1:23333",
    api_key: str | None = None,
    use_store: bool = True,
    env: dict[str, str] | None = None,
    **kwargs: Any,
) -> TuichatApp:
    options = AppOptions(
        url=url,
        api_key=api_key,
        config=config or load_config(),
        transport=server.transport() if server else None,
        use_store=use_store,
        env=env if env is not None else {},
        **kwargs,
    )
    return make_app(options)


async def wait_for(pilot: Pilot[Any], condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Let the app run until `condition()` holds; fail with a clear message after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await pilot.pause(0.02)


async def settled(pilot: Pilot[Any], timeout: float = 6.0) -> None:
    """Let the app run until its screen is still: two screenshots 0.1 s apart are the same (for snapshots,
    instead of a fixed pause that is too short on a busy machine and too long on an idle one)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    before = None
    while (now := pilot.app.export_screenshot()) != before:
        if loop.time() > deadline:
            raise AssertionError(f"the screen kept changing for {timeout} s")
        before = now
        await pilot.pause(0.1)


def screen_text(app: TuichatApp) -> str:
    """Everything drawn on the current screen, as the plain text a user would read."""
    strips = app.screen._compositor.render_strips()
    return "\n".join(strip.text for strip in strips)


def conversation_text(app: TuichatApp) -> str:
    return "\n".join(f"{t.role}:{t.state}:{t.content}" for t in app.chat.turns)


def config_at(home: Path) -> Config:
    return load_config(home / "config.toml")


def record_styling(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every node the stylesheet is applied to from now on, in order (a node styled twice is listed twice)."""
    from textual.css.stylesheet import Stylesheet

    styled: list[object] = []
    apply = Stylesheet.apply

    def recording(self: Stylesheet, node: Any, *args: Any, **kwargs: Any) -> None:
        styled.append(node)
        apply(self, node, *args, **kwargs)

    monkeypatch.setattr(Stylesheet, "apply", recording)
    return styled
