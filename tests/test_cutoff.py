"""A reply cut off by a dying server (issue 16, defect 3): the stream ends with neither `[DONE]` nor a finish reason.

The server here is deliberately NOT the stand-in: a few lines of stdlib `http.server` on a free 127.0.0.1 port, so
the cut-off is exactly the one on the wire that a dying server produces, in both shapes httpx reads as a normal
end of body: `Connection: close` with no length then a closed socket, and a chunked body that ends with its
terminating chunk. The client must raise `StreamCutOff` after the text that arrived; the app must keep that text,
mark the reply interrupted on screen and in the store, and say what happened.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from apphelpers import app_for, screen_text, wait_for

from tuichat.chat.client import ChatClient, ChatError, Delta, Finish, StreamCutOff, StreamEvent
from tuichat.chat.sampling import Sampling
from tuichat.chat.store import Store, default_path
from tuichat.ui.widgets.prompt_area import PromptArea

PIECES = ["The first ", "half of a ", "reply that"]
PARTIAL = "".join(PIECES)


@dataclass
class DyingServer:
    """Streams `PIECES` as SSE chunks, then ends the body the way `framing` says, never sending `[DONE]`.

    framing: "close" (Connection: close, no length, socket closed) or "chunked" (terminating chunk, connection
    kept). `finish` puts a finish_reason on the last chunk: the control case that must count as complete.
    """

    framing: str
    finish: str | None = None
    chats: int = 0
    url: str = ""
    _server: ThreadingHTTPServer | None = field(default=None, repr=False)

    def __enter__(self) -> DyingServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # keep the test output clean
                pass

            def _json(self, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/health":
                    self._json({"status": "healthy"})
                elif self.path == "/v1/models":
                    self._json({"object": "list", "data": [{"id": "tiny-chat", "object": "model"}]})
                else:
                    self.send_error(404)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path != "/v1/chat/completions":
                    self.send_error(404)
                    return
                owner.chats += 1
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                if owner.framing == "chunked":
                    self.send_header("Transfer-Encoding", "chunked")
                else:
                    self.send_header("Connection", "close")
                self.end_headers()
                for i, piece in enumerate(PIECES):
                    last = i == len(PIECES) - 1
                    choice = {"index": 0, "delta": {"content": piece}, "finish_reason": owner.finish if last else None}
                    event = f"data: {json.dumps({'object': 'chat.completion.chunk', 'choices': [choice]})}\n\n"
                    self._send(event.encode())
                if owner.framing == "chunked":
                    self.wfile.write(b"0\r\n\r\n")  # a well-formed end of body, but the reply never finished
                else:
                    self.close_connection = True
                self.wfile.flush()

            def _send(self, data: bytes) -> None:
                if owner.framing == "chunked":
                    data = f"{len(data):x}\r\n".encode() + data + b"\r\n"
                self.wfile.write(data)
                self.wfile.flush()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(params=["close", "chunked"])
def dying(request: pytest.FixtureRequest) -> Iterator[DyingServer]:
    with DyingServer(request.param) as server:
        yield server


async def _reply(url: str) -> tuple[list[StreamEvent], ChatError | None]:
    client = ChatClient(url)
    events: list[StreamEvent] = []
    try:
        async for event in client.stream_chat("tiny-chat", [{"role": "user", "content": "hi"}], Sampling()):
            events.append(event)
    except ChatError as exc:
        return events, exc
    finally:
        await client.aclose()
    return events, None


# ------------------------------------------------------------------------------------------------ the client


async def test_a_stream_ending_without_done_or_finish_is_cut_off_after_all_its_text(dying: DyingServer) -> None:
    events, error = await _reply(dying.url)
    assert "".join(e.text for e in events if isinstance(e, Delta)) == PARTIAL
    assert isinstance(error, StreamCutOff)
    assert error.kind == "cutoff"
    assert "closed the connection before finishing the reply" in error.message
    assert "retry" in error.message and "log" in error.message


@pytest.mark.parametrize("framing", ["close", "chunked"])
async def test_a_finish_reason_without_done_is_a_complete_reply(framing: str) -> None:
    with DyingServer(framing, finish="stop") as server:
        events, error = await _reply(server.url)
    assert error is None
    assert "".join(e.text for e in events if isinstance(e, Delta)) == PARTIAL
    assert events[-1] == Finish("stop")


# ------------------------------------------------------------------------------------------------ the app


async def test_the_app_marks_a_cut_off_reply_interrupted_and_keeps_its_text(dying: DyingServer) -> None:
    app = app_for(url=dying.url)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: app.model == "tiny-chat")
        prompt = app.query_one(PromptArea)
        prompt.focus()
        prompt.text = "tell me a story"
        await pilot.press("enter")
        await wait_for(pilot, lambda: not app.streaming and any(t.role == "assistant" for t in app.chat.turns))
        reply = next(t for t in app.chat.turns if t.role == "assistant")
        assert (reply.state, reply.content) == ("interrupted", PARTIAL)
        await wait_for(pilot, lambda: "interrupted: partial reply" in screen_text(app))
        shown = screen_text(app)
        assert PARTIAL in shown
        assert "closed the connection before finishing" in " ".join(shown.split())
        assert dying.chats == 1
    store = Store.open(default_path())
    try:
        conv = store.last_conversation()
        assert conv is not None
        saved = [m for m in store.messages(conv.id) if m.role == "assistant"]
        assert [(m.state, m.content) for m in saved] == [("interrupted", PARTIAL)]
    finally:
        store.close()
