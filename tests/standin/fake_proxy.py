"""Stand-in for `lmdeploy serve proxy` 0.18, for tests: same argv, start-up output, `/nodes/*` endpoints and
shapes, routing, forwarding of `/v1/chat/completions` (streamed line by line, with the client's Authorization
header), API-key check, 0.0.0.0 default and periodic node health check. Stdlib only, like fake_lmdeploy.py.

What it copies from lmdeploy/serve/proxy/proxy.py (0.18.0), on purpose, quirks included:
- `/nodes/status` is `{url: {"role": 1, "models": [...], "unfinished": n, "latency": [s, ...], "speed": null}}`.
- `/nodes/add` with a non-empty `status.models` registers at once; without, the proxy reads the node's
  `/v1/models` with no key (so a node with keys cannot be added that way) and, failing, answers 200 with
  `{"error_code": 10402, ...}` as a JSON string.
- Requests are forwarded with the client's headers (Host dropped, X-Forwarded-* added); each non-empty line of the
  node's answer is sent on followed by a blank line. A node that cannot be reached gives HTTP 200 with
  `{"error_code": 10402, "text": ...}`; a model no node serves gives 404 (unknown model) or 200 with error 10400.
- Every LMDEPLOY_CONTROLLER_HEART_BEAT_EXPIRATION seconds (90 by default) it GETs each node's `/health` and drops
  those that do not answer 200.
- `/health`, `/docs`, `/redoc` and `/nodes*` need no key; everything else does when `--api-keys` is given.
- Without `--disable-cache-status` the node list is kept in a file (the real one: proxy_config.json inside the
  lmdeploy package; here: $FAKE_PROXY_CACHE_FILE when set) and read back at start.

    python fake_proxy.py serve proxy [--server-name H] [--server-port P] [--routing-strategy S] [--api-keys K ...]
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import random
import signal
import socketserver
import sys
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

VERSION = "0.18.0"
LATENCY_DEQUE_LEN = 15
STRATEGIES = ("random", "min_expected_latency", "min_observed_latency")
BOOL_FLAGS = {"--disable-cache-status", "--dummy-prefill", "--disable-gdr", "--ssl"}
VALUE_FLAGS = {
    "--server-name",
    "--server-port",
    "--serving-strategy",
    "--routing-strategy",
    "--migration-protocol",
    "--link-type",
    "--log-level",
}
CHOICES = {
    "--serving-strategy": ("Hybrid", "DistServe"),
    "--routing-strategy": STRATEGIES,
    "--migration-protocol": ("RDMA", "NVLINK"),
    "--link-type": ("RoCE", "IB"),
    "--log-level": ("CRITICAL", "FATAL", "ERROR", "WARN", "WARNING", "INFO", "DEBUG", "NOTSET"),
}
AUTH_FREE_PREFIXES = ("/health", "/docs", "/redoc", "/nodes")
USAGE = "usage: lmdeploy [-h] [-v] {lite,serve,check_env,chat} ..."
SUB_USAGE = "usage: lmdeploy serve proxy [-h] [--server-name SERVER_NAME] [--server-port SERVER_PORT] ..."
API_TIMEOUT = {"error_code": 10402, "text": "Failed to get response after a period of time"}
MODEL_NOT_FOUND = {"error_code": 10400, "text": "The request model name does not exist in the model list."}


class UsageError(Exception):
    def __init__(self, message: str, top_level: bool = False) -> None:
        super().__init__(message)
        self.top_level = top_level


def parse_args(argv: list[str]) -> dict[str, Any]:
    if argv[:1] in (["-v"], ["--version"]):
        print(VERSION)
        sys.exit(0)
    if argv[:2] != ["serve", "proxy"]:
        raise UsageError("argument command: invalid choice (this stand-in only knows 'serve proxy')", True)
    opts: dict[str, Any] = {
        "--server-name": "0.0.0.0",
        "--server-port": "8000",
        "--routing-strategy": "min_expected_latency",
        "--api-keys": None,
    }
    rest, i, rejected = argv[2:], 0, []
    while i < len(rest):
        tok = rest[i]
        i += 1
        if tok in BOOL_FLAGS:
            opts[tok] = True
        elif tok == "--api-keys":
            keys = []
            while i < len(rest) and not rest[i].startswith("-"):
                keys.append(rest[i])
                i += 1
            opts[tok] = keys
        elif tok in VALUE_FLAGS:
            if i >= len(rest) or rest[i].startswith("--"):
                raise UsageError(f"argument {tok}: expected one argument")
            value = rest[i]
            i += 1
            if tok in CHOICES and value not in CHOICES[tok]:
                shown = ", ".join(repr(c) for c in CHOICES[tok])
                raise UsageError(f"argument {tok}: invalid choice: {value!r} (choose from {shown})")
            opts[tok] = value
        else:
            rejected.append(tok)
    if rejected:
        raise UsageError(f"unrecognized arguments: {' '.join(rejected)}", True)
    try:
        opts["--server-port"] = int(opts["--server-port"])
    except ValueError:
        raise UsageError(f"argument --server-port: invalid int value: {opts['--server-port']!r}") from None
    return opts


def log(line: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


class Nodes:
    """The node manager: the node table, routing, bookkeeping around each forwarded request."""

    def __init__(self, strategy: str, cache_file: str | None) -> None:
        self.strategy = strategy
        self.cache_file = cache_file
        self.lock = threading.Lock()
        self.nodes: dict[str, dict[str, Any]] = {}
        if cache_file and os.path.exists(cache_file) and os.path.getsize(cache_file) > 0:
            log(f"loading node configuration: {cache_file}")
            with open(cache_file) as fh:
                for url, text in json.load(fh).items():
                    status = json.loads(text)
                    status["latency"] = deque(status.get("latency") or [], maxlen=LATENCY_DEQUE_LEN)
                    self.nodes[url] = status

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {url: {**s, "latency": list(s["latency"])} for url, s in self.nodes.items()}

    def save(self) -> None:
        if not self.cache_file:
            return
        data = {url: json.dumps(s) for url, s in self.snapshot().items()}
        with open(self.cache_file, "w") as fh:
            json.dump(data, fh, indent=2)

    def add(self, url: str, status: dict[str, Any] | None) -> str | None:
        """None when added, else the error body the real proxy answers."""
        entry = {"role": 1, "models": [], "unfinished": 0, "latency": deque(maxlen=LATENCY_DEQUE_LEN), "speed": None}
        with self.lock:
            if url in self.nodes and status is None:
                entry = self.nodes[url]
        if status is not None:
            entry.update({k: v for k, v in status.items() if k in ("role", "models", "unfinished", "speed")})
            if "latency" in status:
                entry["latency"] = deque(status["latency"] or [], maxlen=LATENCY_DEQUE_LEN)
        if not entry["models"]:
            try:
                code, body = request("GET", url + "/v1/models", headers={"accept": "application/json"})
                if code != 200:
                    raise OSError(f"{code} Client Error")
                entry["models"] = [m["id"] for m in json.loads(body)["data"]]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log(f"ERROR - exception happened when adding node {url}, {exc}")
                return json.dumps(API_TIMEOUT) + "\n"
        with self.lock:
            self.nodes[url] = entry
        self.save()
        return None

    def remove(self, url: str) -> None:
        with self.lock:
            self.nodes.pop(url, None)
        self.save()

    def models(self) -> list[str]:
        with self.lock:
            return [m for s in self.nodes.values() for m in s["models"]]

    def pick(self, model: str) -> str | None:
        with self.lock:
            matched = [(u, s) for u, s in self.nodes.items() if model in s["models"] and s.get("role", 1) == 1]
            if not matched:
                return None
            if self.strategy == "min_observed_latency":

                def mean(s: dict[str, Any]) -> float:
                    lat = s["latency"]
                    return sum(lat) / len(lat) if lat else float("inf")

                return min(matched, key=lambda us: mean(us[1]))[0]
            speeds = [s["speed"] for _, s in matched if s.get("speed") is not None]
            average = sum(speeds) / len(speeds) if speeds else 1
            weights = [s["speed"] if s.get("speed") is not None else average for _, s in matched]
            if self.strategy == "random":
                return random.choices([u for u, _ in matched], weights=weights)[0]
            order = list(range(len(matched)))
            random.shuffle(order)  # as lmdeploy: ties go to a random node
            best = min(order, key=lambda i: matched[i][1]["unfinished"] / weights[i])
            return matched[best][0]

    def pre_call(self, url: str) -> float:
        with self.lock:
            if url in self.nodes:
                self.nodes[url]["unfinished"] += 1
        return time.time()

    def post_call(self, url: str, start: float) -> None:
        with self.lock:
            if url in self.nodes:
                self.nodes[url]["unfinished"] -= 1
                self.nodes[url]["latency"].append(time.time() - start)

    def heartbeat(self, interval: float) -> None:
        while True:
            time.sleep(interval)
            log("INFO - Start heart beat check")
            for url in list(self.snapshot()):
                try:
                    code, _ = request("GET", url + "/health", headers={"accept": "application/json"})
                    stale = code != 200
                except OSError:
                    stale = True
                if stale:
                    self.remove(url)
                    log(f"INFO - Removed node_url: {url} due to heart beat expiration")


def _connection(url: str, timeout: float | None) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)
    return conn, parts.path + (f"?{parts.query}" if parts.query else "")


def request(
    method: str, url: str, headers: dict[str, str] | None = None, body: bytes | None = None
) -> tuple[int, bytes]:
    conn, path = _connection(url, 10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], nodes: Nodes, keys: list[str]) -> None:
        self.nodes = nodes
        self.key_hashes = [hashlib.sha256(k.encode()).digest() for k in keys]
        super().__init__(address, Handler, bind_and_activate=False)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # no getfqdn: it can stall without a network
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format: str, *args: Any) -> None:
        log(f'INFO:     {self.client_address[0]}:{self.client_address[1]} - "{self.command} {self.path} '
            f'{self.request_version}" {args[1] if len(args) > 1 else ""}')  # fmt: skip

    def version_string(self) -> str:
        return "uvicorn"

    def send_json(self, status: int, obj: Any) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def flat_error(self, status: int, message: str, kind: str) -> None:
        self.send_json(status, {"message": message, "type": kind, "code": status, "param": None, "object": "error"})

    def body(self) -> bytes:
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def authorized(self, path: str) -> bool:
        if not self.server.key_hashes or self.command == "OPTIONS" or path.startswith(AUTH_FREE_PREFIXES):
            return True
        scheme, _, token = (self.headers.get("authorization") or "").partition(" ")
        digest = hashlib.sha256(token.encode()).digest()
        return scheme.lower() == "bearer" and any(digest == h for h in self.server.key_hashes)

    def do_GET(self) -> None:
        self.dispatch()

    do_POST = do_GET

    def dispatch(self) -> None:
        raw = self.body()
        path = urlsplit(self.path).path
        if not self.authorized(path):
            return self.flat_error(401, "Unauthorized.", "unauthorized")
        nodes = self.server.nodes
        if self.command == "GET" and path == "/nodes/status":
            return self.send_json(200, nodes.snapshot())
        if self.command == "GET" and path == "/v1/models":
            cards = [{"id": m, "object": "model", "root": m, "owned_by": "lmdeploy"} for m in nodes.models()]
            return self.send_json(200, {"object": "list", "data": cards})
        if self.command == "POST" and path in ("/nodes/add", "/nodes/remove", "/v1/chat/completions"):
            media = (self.headers.get("content-type") or "").split(";", 1)[0].strip().lower()
            if media != "application/json":
                return self.flat_error(
                    400, "Unsupported Media Type: Only 'application/json' is allowed", "invalid_request_error"
                )
            try:
                body = json.loads(raw or b"null")
            except ValueError:
                return self.flat_error(400, "JSON decode error", "invalid_request_error")
            if not isinstance(body, dict):
                return self.flat_error(400, "Input should be a valid dictionary", "invalid_request_error")
            if path == "/nodes/add":
                return self.add(body)
            if path == "/nodes/remove":
                if not isinstance(body.get("url"), str):
                    return self.flat_error(400, "url: Field required", "invalid_request_error")
                nodes.remove(body["url"])
                log(f"INFO - delete node {body['url']} successfully")
                return self.send_json(200, "Deleted successfully")
            return self.chat(body, raw)
        return self.send_json(404, {"detail": "Not Found"})

    def add(self, body: dict[str, Any]) -> None:
        url, status = body.get("url"), body.get("status")
        if not isinstance(url, str) or (status is not None and not isinstance(status, dict)):
            return self.flat_error(400, "url: Field required", "invalid_request_error")
        error = self.server.nodes.add(url, status)
        if error is not None:
            log(f"ERROR - add node {url} failed, {error.strip()}")
            return self.send_json(200, error)
        log(f"INFO - add node {url} successfully")
        return self.send_json(200, "Added successfully")

    def chat(self, body: dict[str, Any], raw: bytes) -> None:
        nodes = self.server.nodes
        model = body.get("model")
        if not isinstance(model, str) or not isinstance(body.get("messages"), list):
            return self.flat_error(400, "model: Field required", "invalid_request_error")
        if model not in nodes.models():
            return self.flat_error(404, f"The model {model!r} does not exist.", "not_found_error")
        url = nodes.pick(model)
        if url is None:
            return self.send_json(200, json.dumps(MODEL_NOT_FOUND) + "\n")
        log(f"INFO - A request is dispatched to {url}")
        headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
        headers.update({"X-Forwarded-For": self.client_address[0], "X-Forwarded-Host": self.headers.get("host", ""),
                        "X-Forwarded-Proto": "http"})  # fmt: skip
        start = nodes.pre_call(url)
        try:
            self.forward(url, headers, raw, bool(body.get("stream")))
        finally:
            nodes.post_call(url, start)

    def forward(self, url: str, headers: dict[str, str], raw: bytes, stream: bool) -> None:
        timeout_env = os.environ.get("AIOHTTP_TIMEOUT")
        conn, _ = _connection(url, float(timeout_env) if timeout_env else None)
        try:
            try:
                conn.request("POST", "/v1/chat/completions", body=raw, headers=headers)
                resp = conn.getresponse()
            except OSError as exc:
                log(f"ERROR - caught an exception: {exc}")
                log(f"WARNING - api timeout: {url}")
                # the real proxy's error chunk, as the whole body of a 200 answer
                return self.send_bytes(
                    200, json.dumps(API_TIMEOUT).encode() + b"\n", "text/event-stream" if stream else "application/json"
                )
            if not stream:
                data = resp.read()
                return self.send_bytes(200, data, "application/json")
            if resp.status != 200:
                return self.send_bytes(resp.status, resp.read(), "application/json")
            self.send_response(200)
            self.send_header("content-type", "text/event-stream; charset=utf-8")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            try:
                while True:
                    try:
                        line = resp.readline()
                    except OSError as exc:
                        log(f"ERROR - caught an exception: {exc}")
                        self.chunk(json.dumps(API_TIMEOUT).encode() + b"\n")
                        break
                    if not line:
                        break
                    if line.strip():
                        self.chunk(line + b"\n\n")
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except OSError:
                self.close_connection = True  # the client went away: closing ours cancels the node's work
        finally:
            conn.close()

    def chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def send_bytes(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main(argv: list[str]) -> int:
    try:
        opts = parse_args(argv)
    except UsageError as e:
        usage, prog = (USAGE, "lmdeploy") if e.top_level else (SUB_USAGE, "lmdeploy serve proxy")
        sys.stderr.write(f"{usage}\nlmdeploy: error: {e}\n" if e.top_level else f"{usage}\n{prog}: error: {e}\n")
        return 2
    cache = None if opts.get("--disable-cache-status") else os.environ.get("FAKE_PROXY_CACHE_FILE")
    nodes = Nodes(opts["--routing-strategy"], cache)
    interval = float(os.environ.get("LMDEPLOY_CONTROLLER_HEART_BEAT_EXPIRATION", "90"))
    threading.Thread(target=nodes.heartbeat, args=(interval,), daemon=True).start()
    keys = [k for k in (opts["--api-keys"] or []) if k]
    host, port = opts["--server-name"], opts["--server-port"]
    stop = threading.Event()

    def on_signal(_signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    log(f"INFO:     Started server process [{os.getpid()}]")
    log("INFO:     Waiting for application startup.")
    log("INFO:     Application startup complete.")
    httpd = Server((host, port), nodes, keys)
    try:
        httpd.server_bind()
        httpd.server_activate()
    except OSError as e:
        httpd.server_close()
        log(f"ERROR:    [Errno {e.errno}] error while attempting to bind on address {(host, port)!r}: "
            f"{(e.strerror or str(e)).lower()}")  # fmt: skip
        log("INFO:     Waiting for application shutdown.")
        log("INFO:     Application shutdown complete.")
        return 1
    log(f"INFO:     Uvicorn running on http://{host}:{port} (Press CTRL+C to quit)")
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    while not stop.wait(0.05):
        pass
    log("INFO:     Shutting down")
    httpd.shutdown()
    httpd.server_close()
    log("INFO:     Waiting for application shutdown.")
    log("INFO:     Application shutdown complete.")
    log(f"INFO:     Finished server process [{os.getpid()}]")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
