"""The benchmark tap: a small HTTP proxy between every client under test and the server.

    python bench/tap.py --upstream http://127.0.0.1:23333 --port 40000

Every client (tuichat, oterm, the raw httpx loop, curl) talks to the tap, which forwards to the real server
(the stand-in, or real lmdeploy on the GPU machine) and, for a streamed chat completion:

- asks for a fixed reply length: `max_tokens` = the configured chunk count, `ignore_eos` so a real model cannot
  stop early (the stand-in ignores it);
- rewrites the text of the n-th chunk to the numbered word `wn` (` wn` after the first), so that what a client
  shows can be matched to what was sent whatever the model says (a random-weight test model says gibberish), and
  reports a cut by max_tokens as a normal `stop` so that no client shows a warning the others do not;
- records, on the machine's monotonic clock, when the request arrived and when each chunk was handed to the
  client's socket. That is the "sent" time of the display-lag figure, measured at the last point before the client.

Everything else (health, models, metrics, errors) passes through unchanged. The records are read and reset over
`/_tap/...` endpoints that only the harness uses. Stdlib asyncio plus httpx for the upstream side.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from typing import Any

import httpx

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "accept-encoding", "te"}
CHAT_PATH = "/v1/chat/completions"


class Tap:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.client = httpx.AsyncClient(
            base_url=self.upstream,
            trust_env=False,
            timeout=httpx.Timeout(None, connect=10.0),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
        )
        self.chunks: int | None = None
        self.renumber = True
        self.paragraph = 0  # >0: end a paragraph after every this many words (the default reply is one paragraph)
        # Words are numbered from offset+1: the exchanges of one chat get numbers of their own, so an earlier
        # reply repainted on screen can never be taken for the current one.
        self.offset = 0
        self.records: list[dict[str, Any]] = []
        self.requests: list[str] = []  # every proxied request's path since the last reset (status polling)

    # -- control ------------------------------------------------------------------------------------------

    def control(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        if path == "/_tap/config" and method == "POST":
            conf = json.loads(body or b"{}")
            if "chunks" in conf:
                self.chunks = None if conf["chunks"] is None else int(conf["chunks"])
            if "renumber" in conf:
                self.renumber = bool(conf["renumber"])
            if "paragraph" in conf:
                self.paragraph = int(conf["paragraph"] or 0)
            if "offset" in conf:
                self.offset = int(conf["offset"] or 0)
            return 200, {
                "chunks": self.chunks,
                "renumber": self.renumber,
                "paragraph": self.paragraph,
                "offset": self.offset,
            }
        if path == "/_tap/log" and method == "GET":
            return 200, self.records
        if path == "/_tap/last" and method == "GET":
            last = self.records[-1] if self.records else None
            return 200, None if last is None else {"sent": len(last["sent"]), "done": last["done"] is not None}
        if path == "/_tap/requests" and method == "GET":
            return 200, self.requests
        if path == "/_tap/reset" and method == "POST":
            self.records = []
            self.requests = []
            return 200, {"ok": True}
        return 404, {"detail": "unknown tap endpoint"}

    # -- proxying -----------------------------------------------------------------------------------------

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _version = lines[0].split(" ", 2)
                headers: list[tuple[str, str]] = []
                for line in lines[1:]:
                    if line:
                        name, _, value = line.partition(":")
                        headers.append((name.strip(), value.strip()))
                lower = {k.lower(): v for k, v in headers}
                body = b""
                if "content-length" in lower:
                    body = await reader.readexactly(int(lower["content-length"]))
                elif lower.get("transfer-encoding", "").lower() == "chunked":
                    body = await read_chunked(reader)
                received = time.monotonic()
                close = lower.get("connection", "").lower() == "close"
                if target.startswith("/_tap/"):
                    status, obj = self.control(method, target, body)
                    await send_simple(writer, status, "application/json", json.dumps(obj).encode(), close)
                else:
                    self.requests.append(target)
                    await self.forward(writer, method, target, headers, body, received, close)
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def forward(
        self,
        writer: asyncio.StreamWriter,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes,
        received: float,
        close: bool,
    ) -> None:
        record: dict[str, Any] | None = None
        if method == "POST" and target.split("?")[0] == CHAT_PATH:
            with contextlib.suppress(ValueError):
                payload = json.loads(body)
                if isinstance(payload, dict) and payload.get("stream"):
                    if self.chunks is not None:
                        payload.pop("max_completion_tokens", None)
                        payload["max_tokens"] = self.chunks
                        payload["ignore_eos"] = True
                        body = json.dumps(payload).encode()
                    record = {
                        "received": received,
                        "messages": len(payload.get("messages") or []),
                        "status": None,
                        "sent": [],
                        "done": None,
                    }
                    self.records.append(record)
        out_headers = [(k, v) for k, v in headers if k.lower() not in HOP_HEADERS]
        request = self.client.build_request(method, target, headers=out_headers, content=body)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            await send_simple(writer, 502, "text/plain", f"tap: upstream failed: {exc}".encode(), close)
            return
        try:
            if record is not None:
                record["status"] = response.status_code
            streaming = response.headers.get("content-type", "").startswith("text/event-stream")
            if not streaming:
                data = await response.aread()
                await send_simple(writer, response.status_code, response.headers.get("content-type", ""), data, close)
                return
            head = [f"HTTP/1.1 {response.status_code} {response.reason_phrase}"]
            head += [
                f"{k}: {v}"
                for k, v in response.headers.items()
                if k.lower() not in HOP_HEADERS and k.lower() != "content-encoding"
            ]
            head += ["transfer-encoding: chunked", "connection: close" if close else "connection: keep-alive"]
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
            buffer = b""
            count = 0
            async for data in response.aiter_bytes():
                buffer += data.replace(b"\r\n", b"\n")
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    event, count = self.rewrite(event, count, record)
                    piece = event + b"\n\n"
                    if record is not None and count > len(record["sent"]):
                        # taken just before the write: a client can never see a word before its "sent" time
                        record["sent"].append(time.monotonic())
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    await writer.drain()
            if buffer:
                writer.write(b"%x\r\n%s\r\n" % (len(buffer), buffer))
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            if record is not None:
                record["done"] = time.monotonic()
        finally:
            await response.aclose()

    def rewrite(self, event: bytes, count: int, record: dict[str, Any] | None) -> tuple[bytes, int]:
        """Number the text of a content chunk; returns the event and the count of content chunks so far."""
        if record is None or not event.startswith(b"data: ") or event == b"data: [DONE]":
            return event, count
        try:
            chunk = json.loads(event[6:])
        except ValueError:
            return event, count
        choices = chunk.get("choices") if isinstance(chunk, dict) else None
        if not choices or not isinstance(choices[0], dict):
            return event, count
        delta = choices[0].get("delta") or {}
        if delta.get("content") is None:
            return event, count
        count += 1
        if not self.renumber:
            return event, count
        word = count + self.offset
        delta["content"] = f"w{word}" if count == 1 else f" w{word}"
        if self.paragraph and count % self.paragraph == 0:
            delta["content"] += "\n\n"
        if self.chunks is not None and choices[0].get("finish_reason") == "length":
            choices[0]["finish_reason"] = "stop"
        return b"data: " + json.dumps(chunk).encode(), count


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return body
        body += await reader.readexactly(size)
        await reader.readexactly(2)


async def send_simple(writer: asyncio.StreamWriter, status: int, ctype: str, data: bytes, close: bool) -> None:
    head = (
        f"HTTP/1.1 {status} {'OK' if status < 400 else 'Error'}\r\n"
        f"content-type: {ctype}\r\ncontent-length: {len(data)}\r\n"
        f"connection: {'close' if close else 'keep-alive'}\r\n\r\n"
    )
    writer.write(head.encode("latin-1") + data)
    await writer.drain()


async def serve(upstream: str, host: str, port: int) -> None:
    tap = Tap(upstream)
    server = await asyncio.start_server(tap.handle, host, port, limit=1 << 22)
    print(f"tap listening on http://{host}:{port} -> {upstream}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.upstream, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
