"""A stand-in for the Hugging Face hub: the part of its HTTP protocol huggingface_hub uses to download a model.

Run as a real subprocess (stdlib only); it prints `PORT n` once it listens on 127.0.0.1, then serves:

- `GET /api/models/{owner}/{name}[/revision/{rev}]` (`?blobs=True`): the repo's info with `sha` and `siblings`
  (size, blobId, and lfs {size, sha256, pointerSize} for weight files), as `HfApi.model_info` reads it;
- `HEAD` / `GET /{owner}/{name}/resolve/{rev}/{file}`: the file, with `X-Repo-Commit`, `ETag` (git blob id),
  `X-Linked-Etag` / `X-Linked-Size` (sha256 and size for LFS files), `Content-Length`, `Accept-Ranges` and
  `Range` requests answered `206` with `Content-Range` (how huggingface_hub resumes a dropped download);
- the hub's errors: unknown repo `401` with `X-Error-Code: RepoNotFound`, unknown revision `404` with
  `RevisionNotFound`, the gated repo's files `401` with `GatedRepo` unless the request carries the token
  `hf_standin_ok`.

Repos: `tiny/tiny-chat` (a small Qwen2 model: config.json, tokenizer_config.json, model.safetensors) and
`tiny/gated-chat` (the same files, gated). Fault switches: `--drop-once FILE` sends half of FILE's first GET and
closes the connection; `--corrupt FILE` serves FILE with one byte changed (size and headers unchanged); `--rate N`
sends file bodies at about N bytes a second (in 8 kB pieces), so a test can stop a pull mid-file. `--log PATH`
gets one JSON line per request: method, path, Range header, whether a token came (never the token).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"
GOOD_TOKEN = "hf_standin_ok"
LFS_NAMES = ("model.safetensors",)
HIDDEN, VOCAB, LAYERS = 64, 1000, 2


def _safetensors() -> bytes:
    """A valid safetensors file: two bf16 tensors (embeddings and lm_head), deterministic bytes."""
    n = VOCAB * HIDDEN * 2
    header = {
        "model.embed_tokens.weight": {"dtype": "BF16", "shape": [VOCAB, HIDDEN], "data_offsets": [0, n]},
        "lm_head.weight": {"dtype": "BF16", "shape": [VOCAB, HIDDEN], "data_offsets": [n, 2 * n]},
    }
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    seed = hashlib.sha256(b"tiny-chat").digest()
    body = (seed * (2 * n // len(seed) + 1))[: 2 * n]
    return struct.pack("<Q", len(head)) + head + body


def model_files() -> dict[str, bytes]:
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": HIDDEN,
        "intermediate_size": 4 * HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": VOCAB,
        "max_position_embeddings": 2048,
        "torch_dtype": "bfloat16",
    }
    return {
        "config.json": json.dumps(config, indent=2).encode(),
        "tokenizer_config.json": json.dumps({"model_max_length": 2048, "chat_template": "{{ messages }}"}).encode(),
        "model.safetensors": _safetensors(),
    }


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


REPOS = {"tiny/tiny-chat": {"gated": False}, "tiny/gated-chat": {"gated": "manual"}}


class Hub:
    def __init__(self, drop_once: set[str], corrupt: set[str], log: str | None, rate: int = 0) -> None:
        self.files = model_files()
        self.rate = rate
        self.drop_once = set(drop_once)
        self.corrupt = corrupt
        self.log = log
        self.lock = threading.Lock()

    def record(self, entry: dict[str, Any]) -> None:
        if self.log is None:
            return
        with self.lock, open(self.log, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    def sibling(self, name: str) -> dict[str, Any]:
        data = self.files[name]
        entry: dict[str, Any] = {"rfilename": name, "size": len(data), "blobId": git_blob_id(data)}
        if name in LFS_NAMES:
            entry["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
        return entry

    def served(self, name: str) -> bytes:
        data = self.files[name]
        if name in self.corrupt:
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
        return data


class Handler(BaseHTTPRequestHandler):
    server_version = "hub-standin/1"
    protocol_version = "HTTP/1.1"
    hub: Hub

    def log_message(self, format: str, *args: object) -> None:
        return None

    def do_GET(self) -> None:
        self.route(body=True)

    def do_HEAD(self) -> None:
        self.route(body=False)

    def route(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        auth = self.headers.get("Authorization", "")
        self.hub.record({"method": self.command, "path": path, "range": self.headers.get("Range"), "token": bool(auth)})
        parts = path.strip("/").split("/")
        if len(parts) >= 4 and parts[0] == "api" and parts[1] == "models":
            self.api(parts[2] + "/" + parts[3], parts[4:])
        elif len(parts) >= 5 and parts[2] == "resolve":
            self.resolve(parts[0] + "/" + parts[1], parts[3], "/".join(parts[4:]), auth, body)
        else:
            self.error(404, "EntryNotFound", "no such endpoint")

    def error(self, status: int, code: str, message: str) -> None:
        payload = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def api(self, repo: str, rest: list[str]) -> None:
        if repo not in REPOS:
            self.error(401, "RepoNotFound", "Repository not found")
            return
        if rest and (rest[0] != "revision" or len(rest) < 2 or rest[1] not in ("main", COMMIT)):
            self.error(404, "RevisionNotFound", "Invalid rev id")
            return
        info = {
            "_id": "standin",
            "id": repo,
            "modelId": repo,
            "sha": COMMIT,
            "private": False,
            "gated": REPOS[repo]["gated"],
            "siblings": [self.hub.sibling(n) for n in self.hub.files],
        }
        payload = json.dumps(info).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def resolve(self, repo: str, revision: str, name: str, auth: str, body: bool) -> None:
        if repo not in REPOS:
            self.error(401, "RepoNotFound", "Repository not found")
            return
        if REPOS[repo]["gated"] and auth != f"Bearer {GOOD_TOKEN}":
            self.error(401, "GatedRepo", "Access to model is restricted; you must have access to it")
            return
        if revision not in ("main", COMMIT):
            self.error(404, "RevisionNotFound", "Invalid rev id")
            return
        if name not in self.hub.files:
            self.error(404, "EntryNotFound", "Entry not found")
            return
        data = self.hub.served(name)
        sibling = self.hub.sibling(name)
        start = 0
        wanted = self.headers.get("Range")
        if wanted and wanted.startswith("bytes=") and wanted.endswith("-"):
            start = int(wanted[len("bytes=") : -1])
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{sibling["blobId"]}"')
        if "lfs" in sibling:
            self.send_header("X-Linked-Etag", f'"{sibling["lfs"]["sha256"]}"')
            self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("Accept-Ranges", "bytes")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if not body:
            return
        if name in self.hub.drop_once and not start:
            self.hub.drop_once.discard(name)
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.send_body(data[start:])

    def send_body(self, data: bytes) -> None:
        if not self.hub.rate:
            self.wfile.write(data)
            return
        piece = 8192
        for at in range(0, len(data), piece):
            self.wfile.write(data[at : at + piece])
            self.wfile.flush()
            time.sleep(piece / self.hub.rate)


@dataclass
class HubProcess:
    """A running stand-in hub (for tests): its URL and its request log."""

    url: str
    log: Path
    proc: subprocess.Popen[str]

    def requests(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def downloads(self) -> list[dict[str, Any]]:
        return [r for r in self.requests() if r["method"] == "GET" and "/resolve/" in str(r["path"])]

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def start(log: Path, *args: str) -> HubProcess:
    """Run the stand-in as a subprocess with these switches; returns once it listens."""
    proc = subprocess.Popen([sys.executable, __file__, "--log", str(log), *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the stand-in prints its port as soon as it listens
    if not line.startswith("PORT "):
        proc.kill()
        raise RuntimeError(f"the stand-in hub did not start: {line!r}")
    return HubProcess(f"http://127.0.0.1:{int(line.split()[1])}", log, proc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--drop-once", action="append", default=[], metavar="FILE")
    parser.add_argument("--corrupt", action="append", default=[], metavar="FILE")
    parser.add_argument("--log", metavar="PATH")
    parser.add_argument("--rate", type=int, default=0, metavar="BYTES_PER_S")
    args = parser.parse_args(argv)
    Handler.hub = Hub(set(args.drop_once), set(args.corrupt), args.log, args.rate)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(f"PORT {server.server_address[1]}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
