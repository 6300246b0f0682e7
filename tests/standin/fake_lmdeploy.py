"""Stand-in for `lmdeploy serve api_server` 0.18, for tests: same argv, start-up output, endpoints, stream
chunks, error bodies, metrics and process layout (a server plus an "engine" child in the same process group),
plus `--fake-*` switches that inject the faults a real server shows only now and then.

Stdlib only, so it starts in a few tens of milliseconds. Shapes and texts follow the lmdeploy 0.18.0 source
and the project's notes on lmdeploy 0.18 (the lmdeploy-api note the team keeps beside the repository); where the
two differ, the source won.

    python fake_lmdeploy.py serve api_server MODEL [--server-port P] [--api-keys K ...] [--fake-... ...]
    python fake_lmdeploy.py --version
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import gc
import http.client
import json
import math
import os
import platform
import re
import resource
import select
import signal
import socket
import socketserver
import string
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NoReturn
from urllib.parse import urlsplit

VERSION = "0.18.0"

DEFAULT_REPLY = """## A short answer

Here is what the stand-in says about it:

- the first point, with **bold** text
- the second point, with `inline code`

```python
def greet(name: str) -> str:
    return f"Hello, {name}!"
```

That is all for now."""

# lmdeploy's store_true flags: they never take a value, so the token after them stays a positional or a flag.
REAL_BOOL_FLAGS = {
    "--use-logn-attn", "--ssl", "--stream-output", "--search-scale", "--allow-terminate-by-client",
    "--enable-abort-handling", "--enable-prefix-caching", "--disable-fastapi-docs", "--eager-mode",
    "--empty-init", "--enable-microbatch", "--enable-eplb", "--disable-metrics", "--language-model-only",
    "--enable-return-routed-experts", "--trust-remote-code", "--allow-credentials", "--dummy-prefill",
    "--disable-cache-status", "--disable-gdr",
}  # fmt: skip
FAKE_BOOL_FLAGS = {
    "--fake-health-early", "--fake-reject-flag", "--fake-ignore-signals", "--fake-vlm", "--fake-mp-hang",
}  # fmt: skip
MULTI_FLAGS = {
    "--api-keys", "--allow-origins", "--allow-methods", "--allow-headers", "--adapters",
    "--cudagraph-capture-batch-sizes", "--allowed-media-domains",
}  # fmt: skip
# Flags the real 0.18 CLI does not know, which a launcher might plausibly send (seen: exit 2).
REJECTED_FLAGS = {"--fake-reject-flag", "--enable-metrics"}
INT_FLAGS = {
    "--server-port", "--session-len", "--fake-session-len", "--fake-words", "--fake-tokens-per-chunk",
    "--fake-die-after", "--fake-stall-after", "--fake-inband-error-after", "--fake-malformed-after",
    "--max-batch-size", "--cache-block-seq-len", "--tp", "--fake-vlm-max-pixels",
}  # fmt: skip
FLOAT_FLAGS = {"--fake-load-seconds", "--fake-rate", "--fake-stats-interval", "--cache-max-entry-count"}

USAGE = "usage: lmdeploy [-h] [-v] {lite,serve,check_env,chat} ..."
SUB_USAGE = (
    "usage: lmdeploy serve api_server [-h] [--server-name SERVER_NAME] [--server-port SERVER_PORT] ... model_path"
)
OOM_MESSAGE = (
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
    "139.81 GiB of which 1.19 GiB is free. Including non-PyTorch memory, this process has 138.60 GiB memory "
    "in use. Of the allocated memory 136.95 GiB is allocated by PyTorch, and 1.02 GiB is reserved by PyTorch "
    "but unallocated. If reserved but unallocated memory is large try setting "
    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for Memory "
    "Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
)
FAULT_NAMES = ("die", "stall", "inband", "malformed")
FAULT_RE = re.compile(r"\[\[fault:([a-z_]+)(?:=(\d+))?\]\]")
REPLY_RE = re.compile(r"\[\[reply:(.*?)\]\]", re.DOTALL)
# BPE-like pieces: runs of newlines, up to 4 visible characters with their leading blanks, leftover blanks.
# The pieces concatenate back to the text, and long words split mid-way as real tokens do.
TOKEN_RE = re.compile(r"\n+|[^\S\n]*\S{1,4}|[^\S\n]+")
TOKENS_PER_MESSAGE = 4  # role markers of a chat template, per message
TOKENS_PER_IMAGE = 256  # --fake-vlm alone: a flat count per image, whatever its size
# Qwen2-VL's image rule (transformers' Qwen2VLImageProcessor defaults); see qwen_vl_tokens.
QWEN_VL_ARCHS = {"Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"}
QWEN_VL_TYPES = {"qwen2_vl", "qwen2_5_vl"}
QWEN_PATCH, QWEN_MERGE, QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 14, 2, 56 * 56, 28 * 28 * 1280
KEEP_ALIVE_S = 5.0  # uvicorn's timeout_keep_alive as lmdeploy sets it
AUTH_FREE_PREFIXES = ("/health", "/docs", "/redoc", "/nodes", "/standin")
BAR_CHARS = " ▏▎▍▌▋▊▉█"

ENGINE_CODE = """
import os, signal, sys, time
if sys.argv[1] == "1":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGINT, lambda *_: os._exit(0))
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
line = sys.stdin.readline()
if line.strip() == "exit":
    os._exit(0)
# The server vanished without saying goodbye (SIGKILL): stay, like lmdeploy's orphaned engine.
while True:
    time.sleep(3600)
"""


EXECUTOR_BACKENDS = ("uni", "mp", "ray")
_LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "WARN": 30, "ERROR": 40, "CRITICAL": 50, "FATAL": 50}


class UsageError(Exception):
    """A command-line error, reported the way argparse does (exit 2)."""

    def __init__(self, message: str, top_level: bool = False) -> None:
        super().__init__(message)
        self.top_level = top_level


@dataclass
class Options:
    model: str = ""
    model_name: str = ""
    server_name: str = "0.0.0.0"
    server_port: int = 23333
    api_keys: list[str] = field(default_factory=list)
    backend: str = "pytorch"
    session_len: int = 4096
    disable_metrics: bool = False
    enable_prefix_caching: bool = False
    max_batch_size: int = 128
    block_size: int = 64
    cache_max_entry_count: float = 0.8
    tp: int = 1
    load_seconds: float = 0.2
    health_early: bool = False
    crash_message: str | None = None
    reply: str | None = None
    words: int | None = None
    rate: float = 200.0
    tokens_per_chunk: int = 3
    die_after: int | None = None
    stall_after: int | None = None
    inband_error_after: int | None = None
    malformed_after: int | None = None
    ignore_signals: bool = False
    vlm: bool = False
    # (factor, min_pixels, max_pixels) when images are counted as Qwen2-VL does; None: TOKENS_PER_IMAGE each
    image_rule: tuple[int, int, int] | None = None
    stats_interval: float = 10.0
    executor: str | None = None  # --distributed-executor-backend, or LMDEPLOY_EXECUTOR_BACKEND
    log_level: str = "WARNING"
    mp_hang: bool = False  # the last mp rank never reports back: the start-up hangs, workers deaf to signals


def parse_args(argv: list[str]) -> Options:
    """Parse the api_server command line; print and exit like lmdeploy's argparse on errors."""
    if any(a in ("-v", "--version") for a in argv[:1]):
        print(VERSION)
        sys.exit(0)
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        sys.exit(0)
    if argv[:2] != ["serve", "api_server"]:
        raise UsageError("argument command: invalid choice (this stand-in only knows 'serve api_server')", True)
    positionals: list[str] = []
    values: dict[str, Any] = {}
    rejected: list[str] = []
    rest = argv[2:]
    i = 0
    while i < len(rest):
        tok = rest[i]
        i += 1
        if not tok.startswith("--"):
            positionals.append(tok)
            continue
        name, eq, inline = tok.partition("=")
        if name in ("--help",):
            print(USAGE)
            sys.exit(0)
        if name in REJECTED_FLAGS:
            rejected.append(tok)
            continue
        if name in REAL_BOOL_FLAGS or name in FAKE_BOOL_FLAGS:
            values[name] = True
            continue
        if name in MULTI_FLAGS:
            items = [inline] if eq else []
            while i < len(rest) and not rest[i].startswith("-"):
                items.append(rest[i])
                i += 1
            values[name] = items
            continue
        if eq:
            values[name] = inline
        elif name == "--fake-crash-while-loading":
            if i < len(rest) and not rest[i].startswith("--"):
                values[name] = rest[i]
                i += 1
            else:
                values[name] = ""
        elif i < len(rest) and not rest[i].startswith("--"):
            values[name] = rest[i]
            i += 1
        elif name.startswith("--fake-") or name in INT_FLAGS or name in FLOAT_FLAGS:
            raise UsageError(f"argument {name}: expected one argument")
        else:
            values[name] = True  # an unknown switch without a value: accepted and ignored
    if rejected:
        raise UsageError(f"unrecognized arguments: {' '.join(rejected)}", True)
    if not positionals:
        raise UsageError("the following arguments are required: model_path")
    if len(positionals) > 1:
        raise UsageError(f"unrecognized arguments: {' '.join(positionals[1:])}", True)
    for name in list(values):
        kind = int if name in INT_FLAGS else float if name in FLOAT_FLAGS else None
        if kind is not None:
            try:
                values[name] = kind(values[name])
            except (TypeError, ValueError):
                raise UsageError(f"argument {name}: invalid {kind.__name__} value: {values[name]!r}") from None

    o = Options(model=positionals[0])
    o.model_name = str(values.get("--model-name") or o.model)
    o.server_name = str(values.get("--server-name", o.server_name))
    o.server_port = values.get("--server-port", o.server_port)
    o.api_keys = list(values.get("--api-keys") or [])
    o.backend = str(values.get("--backend", o.backend))
    if o.backend not in ("pytorch", "turbomind"):
        raise UsageError(f"argument --backend: invalid choice: {o.backend!r} (choose from 'pytorch', 'turbomind')")
    o.session_len = values.get("--session-len", values.get("--fake-session-len", o.session_len))
    o.disable_metrics = bool(values.get("--disable-metrics"))
    o.enable_prefix_caching = bool(values.get("--enable-prefix-caching"))
    o.max_batch_size = max(1, values.get("--max-batch-size", o.max_batch_size))
    o.block_size = max(1, values.get("--cache-block-seq-len", o.block_size))
    o.cache_max_entry_count = values.get("--cache-max-entry-count", o.cache_max_entry_count)
    o.tp = values.get("--tp", o.tp)
    o.load_seconds = max(0.0, values.get("--fake-load-seconds", o.load_seconds))
    o.health_early = bool(values.get("--fake-health-early"))
    if "--fake-crash-while-loading" in values:
        o.crash_message = str(values["--fake-crash-while-loading"]) or OOM_MESSAGE
    o.reply = values.get("--fake-reply")
    o.words = values.get("--fake-words")
    o.rate = values.get("--fake-rate", o.rate)
    if o.rate <= 0:
        raise UsageError("argument --fake-rate: must be positive")
    o.tokens_per_chunk = max(1, values.get("--fake-tokens-per-chunk", o.tokens_per_chunk))
    o.die_after = values.get("--fake-die-after")
    o.stall_after = values.get("--fake-stall-after")
    o.inband_error_after = values.get("--fake-inband-error-after")
    o.malformed_after = values.get("--fake-malformed-after")
    o.ignore_signals = bool(values.get("--fake-ignore-signals"))
    o.vlm = bool(values.get("--fake-vlm"))
    o.image_rule = qwen_vl_rule(o.model)
    if "--fake-vlm-max-pixels" in values:
        rule = o.image_rule or (QWEN_PATCH * QWEN_MERGE, QWEN_MIN_PIXELS, QWEN_MAX_PIXELS)
        o.image_rule = (rule[0], rule[1], max(1, values["--fake-vlm-max-pixels"]))
    if o.image_rule is not None:
        o.vlm = True
    o.stats_interval = max(0.01, values.get("--fake-stats-interval", o.stats_interval))
    if "--distributed-executor-backend" in values:
        o.executor = str(values["--distributed-executor-backend"])
        if o.executor not in EXECUTOR_BACKENDS:
            raise UsageError(
                f"argument --distributed-executor-backend: invalid choice: {o.executor!r} (choose from "
                + ", ".join(repr(b) for b in EXECUTOR_BACKENDS)
                + ")"
            )
    o.log_level = str(values.get("--log-level", o.log_level)).upper()
    o.mp_hang = bool(values.get("--fake-mp-hang"))
    return o


# ---------------------------------------------------------------------------------------------- output


_err_lock = threading.RLock()  # re-entrant: a KeyboardInterrupt may land mid-write


def err_write(text: str) -> None:
    with _err_lock:
        try:
            sys.stderr.write(text)
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


def log(line: str) -> None:
    """One uvicorn-style log line on stderr."""
    err_write(line + "\n")


def lm_log(opts: Options, level: str, where: str, message: str) -> None:
    """A line of lmdeploy's own logger (utils.py's format), shown only at or above the --log-level."""
    if _LEVELS.get(level, 30) < _LEVELS.get(opts.log_level, 30):
        return
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]
    err_write(f"{stamp} - lmdeploy - {level} - {where} - {message}\n")


def _fmt_clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def tqdm_line(desc: str, n: int, total: int, elapsed: float) -> str:
    """A tqdm progress line as tqdm draws it when stderr is not a terminal (10-cell bar)."""
    frac = n / total if total else 1.0
    full, part = divmod(int(frac * 10 * 8), 8)
    bar = "█" * full + (BAR_CHARS[part] + " " * (10 - full - 1) if full < 10 else "")
    rate = n / elapsed if n and elapsed > 0 else 0.0
    if not rate:
        rate_s, remaining = "?it/s", "?"
    else:
        rate_s = f"{rate:5.2f}it/s" if rate >= 1 else f"{1 / rate:5.2f}s/it"
        remaining = _fmt_clock((total - n) / rate)
    return f"{desc}: {frac * 100:3.0f}%|{bar}| {n}/{total} [{_fmt_clock(elapsed)}<{remaining}, {rate_s}]"


class Bar:
    """A tqdm bar on stderr, redrawn in place with carriage returns."""

    def __init__(self, desc: str, total: int, leave: bool = True) -> None:
        self.desc, self.total, self.leave = desc, total, leave
        self.start = time.monotonic()
        self.last_len = 0
        self.n = 0
        self._draw()

    def _draw(self) -> None:
        line = tqdm_line(self.desc, self.n, self.total, time.monotonic() - self.start)
        err_write("\r" + line + " " * max(self.last_len - len(line), 0))
        self.last_len = len(line)

    def update(self) -> None:
        self.n += 1
        self._draw()

    def close(self) -> None:
        err_write("\n" if self.leave else "\r" + " " * self.last_len + "\r")


def fmt_float(value: float) -> str:
    """A number as prometheus_client writes it (Go's formatting)."""
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    s = repr(float(value))
    dot = s.find(".")
    if value > 0 and dot > 6:
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+0{dot - 1}"
    return s


def fmt_labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


def tokenize(text: str) -> list[str]:
    return TOKEN_RE.findall(text)


def token_id(word: str) -> int:
    return 100 + zlib.crc32(word.encode("utf-8")) % 151_000


def flat_error(status: int, message: str, error_type: str | None = None) -> dict[str, Any]:
    """lmdeploy's error body: flat, not OpenAI's nested shape."""
    if error_type is None:
        error_type = {401: "authentication_error", 404: "not_found_error"}.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        )
    return {"message": message, "type": error_type, "code": status, "param": None, "object": "error"}


# --------------------------------------------------------------------------------------------- metrics


class Histogram:
    def __init__(self, name: str, doc: str, buckets: list[float]) -> None:
        self.name, self.doc = name, doc
        self.bounds = [float(b) for b in buckets] + [math.inf]
        self.counts = [0] * len(self.bounds)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.n += 1

    def render(self, labels: dict[str, str]) -> list[str]:
        out = [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} histogram"]
        for bound, count in zip(self.bounds, self.counts, strict=True):
            lab = fmt_labels({**labels, "le": fmt_float(bound)})
            out.append(f"{self.name}_bucket{lab} {fmt_float(count)}")
        out.append(f"{self.name}_count{fmt_labels(labels)} {fmt_float(self.n)}")
        out.append(f"{self.name}_sum{fmt_labels(labels)} {fmt_float(self.total)}")
        return out


def buckets_1_2_5(max_value: int) -> list[float]:
    out: list[float] = []
    exponent = 0
    while True:
        for m in (1, 2, 5):
            value = m * 10**exponent
            if value > max_value:
                return out
            out.append(value)
        exponent += 1


LATENCY_BUCKETS = [
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
    960.0, 1920.0, 7680.0,
]  # fmt: skip
TPOT_BUCKETS = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0,
]  # fmt: skip
TTFT_BUCKETS = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0, 2560.0,
]  # fmt: skip


# ----------------------------------------------------------------------------------------------- state


@dataclass
class Plan:
    """What one chat request will produce."""

    prompt_tokens: int
    cached_tokens: int
    chunks: list[str]
    chunk_sizes: list[int]
    finish_reason: str
    fault: str | None
    fault_after: int
    rate: float
    started: float = field(default_factory=time.monotonic)


class ClientGone(Exception):
    """The client closed the connection mid-request."""


class State:
    """Everything shared between request threads, under one lock."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.lock = threading.Lock()
        self.settings: dict[str, Any] = {
            "reply": opts.reply,
            "words": opts.words,
            "rate": opts.rate,
            "tokens_per_chunk": opts.tokens_per_chunk,
            "die_after": opts.die_after,
            "stall_after": opts.stall_after,
            "inband_error_after": opts.inband_error_after,
            "malformed_after": opts.malformed_after,
        }
        self.launch_settings = dict(self.settings)
        self.requests = 0
        self.completed = 0
        self.aborted = 0
        self.failed = 0
        self.running = 0
        self.waiting = 0
        self.generated_tokens = 0
        self.last_request: Any = None
        self.busy_blocks: dict[int, int] = {}  # request serial -> KV blocks it holds
        self.serial = 0
        self.recent_prompts: list[list[int]] = []
        self.cache_queried = 0
        self.cache_hit = 0
        # counters and histograms for /metrics
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.success_by_reason: dict[str, int] = {}
        self.api_routed = 0
        s = opts.session_len
        self.h_prompt = Histogram(
            "lmdeploy:request_prompt_tokens", "Number of prefill tokens processed.", buckets_1_2_5(s)
        )
        self.h_gen = Histogram(
            "lmdeploy:request_generation_tokens", "Number of generation tokens processed.", buckets_1_2_5(s)
        )
        self.h_iter = Histogram(
            "lmdeploy:iteration_tokens_total",
            "Histogram of number of tokens per engine_step.",
            [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384],
        )
        self.h_ttft = Histogram(
            "lmdeploy:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS
        )
        self.h_tpot = Histogram(
            "lmdeploy:time_per_output_token_seconds", "Histogram of time per output token in seconds.", TPOT_BUCKETS
        )
        self.h_itl = Histogram("lmdeploy:iter_token_latency", "Histogram of inter-token latency", TPOT_BUCKETS)
        self.h_e2e = Histogram(
            "lmdeploy:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", LATENCY_BUCKETS
        )
        self.h_queue = Histogram(
            "lmdeploy:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            LATENCY_BUCKETS,
        )
        self.h_infer = Histogram(
            "lmdeploy:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            LATENCY_BUCKETS,
        )
        self.h_prefill = Histogram(
            "lmdeploy:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            LATENCY_BUCKETS,
        )
        self.h_decode = Histogram(
            "lmdeploy:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            LATENCY_BUCKETS,
        )
        # throughput window for the periodic stats line
        self.window_prompt = 0
        self.window_gen = 0
        self.window_start = time.monotonic()
        self.batch = threading.Semaphore(opts.max_batch_size)

    @property
    def num_gpu_blocks(self) -> int:
        return max(16, int(1280 * self.opts.cache_max_entry_count))

    def cache_usage(self) -> float:
        return min(1.0, sum(self.busy_blocks.values()) / self.num_gpu_blocks)

    def cached_prefix(self, ids: list[int]) -> int:
        """Tokens of `ids` a prefix cache would already hold (whole blocks shared with an earlier prompt)."""
        if not self.opts.enable_prefix_caching:
            return 0
        with self.lock:
            best = 0
            for prev in self.recent_prompts:
                n = 0
                for a, b in zip(prev, ids, strict=False):
                    if a != b:
                        break
                    n += 1
                best = max(best, n)
            # the last token is always recomputed
            cached = min(best, len(ids) - 1) // self.opts.block_size * self.opts.block_size
            self.recent_prompts = [*self.recent_prompts[-63:], ids]
            self.cache_queried += len(ids)
            self.cache_hit += cached
            return max(0, cached)


# ---------------------------------------------------------------------------------------------- server


class FakeHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, app: App, address: tuple[str, int]) -> None:
        self.app = app
        super().__init__(address, Handler, bind_and_activate=False)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would resolve the host name (getfqdn), which can stall without a network.
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])


def register_to_proxy(opts: Options) -> None:
    """`--proxy-url URL`: POST /nodes/add once, during start-up (before the socket opens), with no key, as lmdeploy
    0.18's api_server does (serve/openai/api_server.py register_to_proxy); a failure is logged, never retried."""
    argv = sys.argv[1:]
    if "--proxy-url" not in argv or argv.index("--proxy-url") + 1 >= len(argv):
        return
    proxy = urlsplit(argv[argv.index("--proxy-url") + 1])
    body = {"url": f"http://{opts.server_name}:{opts.server_port}", "status": {"models": [opts.model_name], "role": 1}}
    conn = http.client.HTTPConnection(proxy.hostname or "127.0.0.1", proxy.port or 80, timeout=10)
    try:
        conn.request("POST", "/nodes/add", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        text = resp.read().decode("utf-8", "replace")
        if resp.status != 200:
            raise OSError(f"{resp.status}: {text}")
    except OSError as exc:
        log(f"lmdeploy - ERROR - Service registration failed: {exc}")
    finally:
        conn.close()


class App:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.state = State(opts)
        self.pid = os.getpid()
        self.ready = False
        self.closing = False
        self.force_exit = False
        self.engine: subprocess.Popen[bytes] | None = None
        # with --tp N and the mp executor: ranks 1..N-1 (the engine child plays rank 0), same session and group
        self.workers: list[subprocess.Popen[bytes]] = []
        self.httpd: FakeHTTPServer | None = None
        self.conns: set[socket.socket] = set()
        self.busy = 0
        self.conn_lock = threading.Lock()

    # --- process life -----------------------------------------------------------------------------

    def start_engine(self) -> None:
        flag = "1" if self.opts.ignore_signals else "0"
        self.engine = subprocess.Popen([sys.executable, "-c", ENGINE_CODE, flag], stdin=subprocess.PIPE)

    def start_workers(self) -> None:
        # a hung mp start-up sits in NCCL set-up, deaf to SIGINT and SIGTERM: only SIGKILL ends it
        flag = "1" if self.opts.ignore_signals or self.opts.mp_hang else "0"
        for _ in range(self.opts.tp - 1):
            self.workers.append(subprocess.Popen([sys.executable, "-c", ENGINE_CODE, flag], stdin=subprocess.PIPE))

    def stop_engine(self) -> None:
        workers, self.workers = self.workers, []
        for proc in workers:
            self._end_child(proc)
        eng, self.engine = self.engine, None
        if eng is not None:
            self._end_child(eng)

    @staticmethod
    def _end_child(eng: subprocess.Popen[bytes]) -> None:
        try:
            assert eng.stdin is not None
            eng.stdin.write(b"exit\n")
            eng.stdin.close()
        except OSError:
            pass
        try:
            eng.wait(timeout=3)
        except subprocess.TimeoutExpired:
            eng.kill()
            eng.wait()

    def die(self) -> NoReturn:
        """Vanish like a crashed server: clients see a reset connection, the engine goes too."""
        with self.conn_lock:
            for sock in self.conns:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        for child in [*([self.engine] if self.engine is not None else []), *self.workers]:
            with contextlib.suppress(OSError):
                child.kill()
        os._exit(1)

    def on_signal(self, signum: int, _frame: Any) -> None:
        # uvicorn: the first SIGINT/SIGTERM asks for a graceful exit; a further SIGINT forces it.
        # Only plain flags here: taking a lock in a signal handler can deadlock the main thread.
        if self.closing and signum == signal.SIGINT:
            self.force_exit = True
        self.closing = True

    def run(self) -> int:
        opts = self.opts
        if opts.ignore_signals:
            # set before spawning so the engine inherits the ignored dispositions
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self.start_engine()
        try:
            if opts.health_early:
                if not opts.ignore_signals:
                    signal.signal(signal.SIGINT, self.on_signal)
                    signal.signal(signal.SIGTERM, self.on_signal)
                if not self.open_socket():
                    return 1
                self.load()
                if self.closing:
                    return self.shutdown()
            else:
                self.load()
                if not opts.ignore_signals:
                    signal.signal(signal.SIGINT, self.on_signal)
                    signal.signal(signal.SIGTERM, self.on_signal)
                if not self.open_socket():
                    return 1
            self.ready = True
            threading.Thread(target=self.stats_loop, daemon=True).start()
            while not self.closing:
                time.sleep(0.05)
            return self.shutdown()
        except KeyboardInterrupt:
            err_write(
                '\nTraceback (most recent call last):\n  File "lmdeploy/cli/entrypoint.py", line 39, in run\n'
                "    args.run(args)\nKeyboardInterrupt\n"
            )
            self.stop_engine()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
            return 130

    def tp_start(self) -> list[str]:
        """What lmdeploy 0.18 does with --tp N > 1 on the PyTorch backend before loading weights: fail without
        ray (the default executor), or start the mp executor's rank processes. Returns the steps each rank
        reports (at DEBUG) as loading goes on."""
        opts = self.opts
        executor = opts.executor or os.environ.get("LMDEPLOY_EXECUTOR_BACKEND") or "ray"
        if executor == "ray":
            # check_env/dist.py: no ray in this environment (as on the GPU machine)
            lm_log(opts, "ERROR", "base.py:55", "<Dist> check failed!")
            err_write("Multi-nodes support requires `ray`.\n")
            err_write(
                "lmdeploy.pytorch.engine.mp_engine.zmq_rpc.RPCServerDeadError: PyTorch ZMQ engine process is not "
                "alive.\n"
            )
            self.stop_engine()
            os._exit(1)
        if executor == "uni":
            err_write("AssertionError: uni executor only support world_size==1.\n")
            self.stop_engine()
            os._exit(1)
        lm_log(opts, "INFO", "__init__.py:132", "Build <mp> executor.")
        lm_log(
            opts,
            "WARNING",
            "__init__.py:147",
            "MPExecutor will be deprecated in future releases, please use RayExecutor instead.",
        )
        lm_log(opts, "INFO", "mp_executor.py:251", "Creating processes.")
        self.start_workers()
        return ["build_model", "build_graph_runner", "build_cache_engine", "warmup"]

    def report_ranks(self, step: str) -> None:
        last = self.opts.tp - 1 if self.opts.mp_hang else self.opts.tp
        for rank in range(last):
            lm_log(self.opts, "DEBUG", "mp_executor.py:621", f"proc[{rank}] call method: <{step}>.")

    def load(self) -> None:
        opts = self.opts
        steps: list[str] = []
        if opts.backend == "pytorch" and opts.tp > 1:
            steps = self.tp_start()
            self.report_ranks(steps.pop(0))
            if opts.mp_hang:
                # rank N-1 never answers: the collective call waits for ever (the "fix mp hanging" case), inside
                # a C call that Python's signal handlers never get to run in
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                while True:
                    time.sleep(3600)
        if opts.backend == "pytorch":
            phases = [
                ("Loading weights from safetensors", 5, 0.5, True),
                ("Warming up ops", 4, 0.1, True),
                ("Warming up prefill", 6, 0.15, True),
                ("Warming up decoding", 10, 0.25, True),
            ]
        else:
            phases = [("Loading", 24, 1.0, False)]
        done = 0.0
        for desc, total, share, leave in phases:
            bar = Bar(desc, total, leave=leave)
            for _ in range(total):
                self.pause(opts.load_seconds * share / total)
                if self.closing:
                    bar.close()
                    return
                bar.update()
            bar.close()
            if steps:
                self.report_ranks(steps.pop(0))
            done += share
            if opts.crash_message is not None and done >= 0.5:
                self.crash(opts.crash_message)

    def pause(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.closing and (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 0.05))

    def crash(self, message: str) -> NoReturn:
        site = "/usr/local/lib/python3.12/site-packages/lmdeploy"
        err_write(
            "Traceback (most recent call last):\n"
            '  File "/usr/local/bin/lmdeploy", line 8, in <module>\n'
            "    sys.exit(run())\n"
            "             ^^^^^\n"
            f'  File "{site}/cli/entrypoint.py", line 39, in run\n'
            "    args.run(args)\n"
            f'  File "{site}/cli/serve.py", line 312, in api_server\n'
            "    run_api_server(args.model_path,\n"
            f'  File "{site}/pytorch/engine/executor/base.py", line 187, in init_cache_engine\n'
            "    self.build_cache_engine()\n"
            f'  File "{site}/pytorch/engine/cache_engine.py", line 121, in allocate_gpu_cache\n'
            "    return torch.empty(shape, dtype=dtype, device='cuda')\n"
            "           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
            f"{message}\n"
        )
        self.stop_engine()
        sys.stdout.flush()
        os._exit(1)

    def open_socket(self) -> bool:
        """Print what lmdeploy and uvicorn print, then bind; on failure behave like uvicorn (exit 1)."""
        opts = self.opts
        host, port = opts.server_name, opts.server_port
        for _ in range(3):
            print(
                f"HINT:    Please open \033[93m\033[1mhttp://{host}:{port}\033[0m in a browser for detailed api",
                "usage!!!",
            )
        log(f"INFO:     Started server process [{self.pid}]")
        log("INFO:     Waiting for application startup.")
        register_to_proxy(opts)
        log("INFO:     Application startup complete.")
        httpd = FakeHTTPServer(self, (host, port))
        try:
            httpd.server_bind()
            httpd.server_activate()
        except OSError as e:
            httpd.server_close()
            reason = (e.strerror or str(e)).lower()
            log(f"ERROR:    [Errno {e.errno}] error while attempting to bind on address {(host, port)!r}: {reason}")
            log("INFO:     Waiting for application shutdown.")
            log("INFO:     Application shutdown complete.")
            self.stop_engine()
            sys.stdout.flush()
            return False
        self.httpd = httpd
        # logged before serving, so no access line can come first
        log(f"INFO:     Uvicorn running on http://{host}:{port} (Press CTRL+C to quit)")
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return True

    def shutdown(self) -> NoReturn:
        log("INFO:     Shutting down")
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
        if self.busy and not self.force_exit:
            log("INFO:     Waiting for connections to close. (CTRL+C to force quit)")
            while self.busy and not self.force_exit:
                time.sleep(0.02)
        if not self.force_exit:
            log("INFO:     Waiting for application shutdown.")
            self.stop_engine()
            log("INFO:     Application shutdown complete.")
        log(f"INFO:     Finished server process [{self.pid}]")
        self.stop_engine()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    # --- periodic stats line ----------------------------------------------------------------------

    def stats_loop(self) -> None:
        st = self.state
        while True:
            time.sleep(self.opts.stats_interval)
            with st.lock:
                now = time.monotonic()
                span = max(now - st.window_start, 1e-6)
                p, g = st.window_prompt, st.window_gen
                st.window_prompt = st.window_gen = 0
                st.window_start = now
                if not p and not g:
                    continue
                stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
                line = (
                    f"[{stamp} DP0] Avg thr (in/out): {p / span:.1f} / {g / span:.1f} tokens/s, "
                    f"Server (succeeded/failed/routed/waiting): {st.completed} / {st.failed} / "
                    f"{st.running + st.waiting} / 0, "
                    f"Engine (running/waiting): {st.running} / {st.waiting}, "
                    f"KV cache: {st.cache_usage() * 100:.1f}%, "
                )
            print(line, flush=True)

    # --- metrics text -----------------------------------------------------------------------------

    def metrics_text(self) -> str:
        st = self.state
        labels = {"engine": "0", "model_name": self.opts.model_name}
        lab = fmt_labels(labels)
        out: list[str] = []

        def sample(name: str, doc: str, kind: str, value: float) -> None:
            out.extend([f"# HELP {name} {doc}", f"# TYPE {name} {kind}", f"{name}{lab} {fmt_float(value)}"])

        out.append("# HELP python_gc_objects_collected_total Objects collected during gc")
        out.append("# TYPE python_gc_objects_collected_total counter")
        for gen, stat in enumerate(gc.get_stats()):
            out.append(f'python_gc_objects_collected_total{{generation="{gen}"}} {fmt_float(stat["collected"])}')
        out.append("# HELP python_info Python platform information")
        out.append("# TYPE python_info gauge")
        major, minor, patch = platform.python_version_tuple()
        out.append(
            f'python_info{{implementation="{platform.python_implementation()}",major="{major}",minor="{minor}",'
            f'patchlevel="{patch}",version="{platform.python_version()}"}} 1.0'
        )
        usage = resource.getrusage(resource.RUSAGE_SELF)
        out.append("# HELP process_resident_memory_bytes Resident memory size in bytes.")
        out.append("# TYPE process_resident_memory_bytes gauge")
        out.append(f"process_resident_memory_bytes {fmt_float(usage.ru_maxrss * 1024)}")
        out.append("# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.")
        out.append("# TYPE process_cpu_seconds_total counter")
        out.append(f"process_cpu_seconds_total {fmt_float(round(usage.ru_utime + usage.ru_stime, 2))}")
        out.append("# HELP lmdeploy:backend_config_info information of backend_config")
        out.append("# TYPE lmdeploy:backend_config_info gauge")
        with st.lock:
            hit_rate = st.cache_hit / st.cache_queried if st.cache_queried else 0.0
            sample("lmdeploy:num_requests_succeeded", "Number of current succeeded requests.", "gauge", st.completed)
            sample("lmdeploy:num_requests_failed", "Number of current failed requests.", "gauge", st.failed)
            sample(
                "lmdeploy:num_api_requests_routed",
                "Number of requests routed to request handles.",
                "gauge",
                st.running + st.waiting,
            )
            sample(
                "lmdeploy:num_api_requests_waiting", "Number of requests waiting for free request handles.", "gauge", 0
            )
            sample(
                "lmdeploy:num_requests_running", "Number of requests in model execution batches.", "gauge", st.running
            )
            sample("lmdeploy:num_requests_waiting", "Number of requests waiting to be processed.", "gauge", st.waiting)
            sample(
                "lmdeploy:gpu_cache_usage_perc",
                "GPU KV-cache usage. 1 means 100 percent usage.",
                "gauge",
                st.cache_usage(),
            )
            sample(
                "lmdeploy:prefix_cache_hit_rate",
                "Prefix-cache hit rate. 1 means 100 percent of queried prefix tokens hit.",
                "gauge",
                hit_rate,
            )
            sample(
                "lmdeploy:prompt_tokens_total", "Number of prefill tokens processed.", "counter", st.prompt_tokens_total
            )
            sample(
                "lmdeploy:generation_tokens_total",
                "Number of generation tokens processed.",
                "counter",
                st.generation_tokens_total,
            )
            out.append("# HELP lmdeploy:request_success_total Count of successfully processed requests.")
            out.append("# TYPE lmdeploy:request_success_total counter")
            for reason, count in st.success_by_reason.items():
                rl = fmt_labels({**labels, "finished_reason": reason})
                out.append(f"lmdeploy:request_success_total{rl} {fmt_float(count)}")
            for h in (
                st.h_prompt,
                st.h_gen,
                st.h_iter,
                st.h_ttft,
                st.h_tpot,
                st.h_itl,
                st.h_e2e,
                st.h_queue,
                st.h_infer,
                st.h_prefill,
                st.h_decode,
            ):
                out.extend(h.render(labels))
        return "\n".join(out) + "\n"

    def track(self, sock: socket.socket, add: bool) -> None:
        with self.conn_lock:
            if add:
                self.conns.add(sock)
            else:
                self.conns.discard(sock)


# --------------------------------------------------------------------------------------------- handler


def message_text(content: Any) -> tuple[str, int]:
    """The text of a message's content and how many images it carries."""
    if content is None:
        return "", 0
    if isinstance(content, str):
        return content, 0
    texts: list[str] = []
    images = 0
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, dict):
                continue
            if part.get("type") == "text":
                texts.append(str(part.get("text", "")))
            elif part.get("type") in ("image_url", "image"):
                images += 1
    return "\n".join(texts), images


def message_image_urls(content: Any) -> list[str]:
    """The URLs of a message's image parts, in order (an unusable part gives an empty string)."""
    urls: list[str] = []
    if isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and part.get("type") in ("image_url", "image"):
                ref = part.get("image_url")
                url = ref.get("url") if isinstance(ref, dict) else ref
                urls.append(url if isinstance(url, str) else "")
    return urls


# ------------------------------------------------------------------------------------------- images


def qwen_vl_rule(model: str) -> tuple[int, int, int] | None:
    """A model folder whose config.json names Qwen2-VL (or 2.5): its processor's (factor, min, max pixels)."""
    try:
        with open(os.path.join(model, "config.json"), encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    archs = config.get("architectures") or []
    if config.get("model_type") not in QWEN_VL_TYPES and not (set(archs) & QWEN_VL_ARCHS):
        return None
    pre: Any = {}
    # transformers 5 writes the image processor only inside processor_config.json
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        try:
            with open(os.path.join(model, name), encoding="utf-8") as fh:
                pre = json.load(fh)
        except (OSError, ValueError):
            continue
        if key is not None:
            pre = pre.get(key) if isinstance(pre, dict) else {}
        break
    pre = pre if isinstance(pre, dict) else {}
    size = pre.get("size") if isinstance(pre.get("size"), dict) else {}
    vision = config.get("vision_config") if isinstance(config.get("vision_config"), dict) else {}
    patch = pre.get("patch_size") or vision.get("patch_size") or QWEN_PATCH
    merge = pre.get("merge_size") or vision.get("spatial_merge_size") or QWEN_MERGE
    low = pre.get("min_pixels") or size.get("shortest_edge") or QWEN_MIN_PIXELS
    high = pre.get("max_pixels") or size.get("longest_edge") or QWEN_MAX_PIXELS
    return int(patch) * int(merge), int(low), max(int(high), int(low))


def qwen_vl_tokens(width: int, height: int, rule: tuple[int, int, int]) -> int:
    """Prompt tokens of one image as lmdeploy counts them for Qwen2-VL: the processor's smart resize (round to
    the factor, then into [min, max] pixels), one token per factor x factor cell, plus vision start and end."""
    factor, low, high = rule
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > high:
        beta = math.sqrt(height * width / high)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < low:
        beta = math.sqrt(low / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return (h_bar // factor) * (w_bar // factor) + 2


def image_bytes(url: str) -> bytes | None:
    """The bytes of a data URL or of a file on this host; None for anything else (the stand-in has no network)."""
    if url.startswith("data:"):
        _, sep, payload = url.partition(",")
        if not sep:
            return None
        try:
            return base64.b64decode(payload, validate=False)
        except (binascii.Error, ValueError):
            return None
    path = url[len("file://") :] if url.startswith("file://") else url
    if path.startswith("/"):
        try:
            with open(path, "rb") as fh:
                return fh.read()
        except OSError:
            return None
    return None


def image_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, JPEG, GIF, BMP or WebP header; None if the bytes are none of those."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24 and data[12:16] == b"IHDR":
        w, h = struct.unpack(">II", data[16:24])
        return (w, h) if w and h else None
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        w, h = struct.unpack("<HH", data[6:10])
        return (w, h) if w and h else None
    if data[:2] == b"BM" and len(data) >= 26:
        w, h = struct.unpack("<ii", data[18:26])
        return (abs(w), abs(h)) if w and h else None
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        kind = data[12:16]
        if kind == b"VP8X":
            return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
        if kind == b"VP8L":
            bits = int.from_bytes(data[21:25], "little")
            return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
        if kind == b"VP8 ":
            w, h = struct.unpack("<HH", data[26:30])
            return w & 0x3FFF, h & 0x3FFF
        return None
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(data):
            if data[i] != 0xFF:
                i += 1
                continue
            marker = data[i + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
                i += 1 if marker == 0xFF else 2
                continue
            (length,) = struct.unpack(">H", data[i + 2 : i + 4])
            # SOF0..SOF15, but C4 (Huffman tables), C8 (reserved) and CC (arithmetic coding) are not frames
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                h, w = struct.unpack(">HH", data[i + 5 : i + 9])
                return (w, h) if w and h else None
            i += 2 + length
    return None


def validate_fields(body: Any) -> str | None:
    """Pydantic's complaints about the request body, as lmdeploy's validation handler words them."""
    if not isinstance(body, dict):
        return "Input should be a valid dictionary or object to extract fields from"
    for key in ("model", "messages"):
        if key not in body:
            return f"{key}: Field required"
    if not isinstance(body["model"], str):
        return "model: Input should be a valid string"
    if not isinstance(body["messages"], list):
        return "messages: Input should be a valid list"
    for i, m in enumerate(body["messages"]):
        if not isinstance(m, dict):
            return f"messages.{i}: Input should be a valid dictionary"
    for key in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        v = body.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
            return f"{key}: Input should be a valid number"
    for key in ("top_k", "max_tokens", "max_completion_tokens", "seed", "min_new_tokens", "n"):
        v = body.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int | float):
            return f"{key}: Input should be a valid integer"
        if isinstance(v, float) and not v.is_integer():
            return f"{key}: Input should be a valid integer, got a number with a fractional part"
    stop = body.get("stop")
    if (
        stop is not None
        and not isinstance(stop, str)
        and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        return "stop: Input should be a valid string"
    if body.get("stream") is not None and not isinstance(body.get("stream"), bool):
        return "stream: Input should be a valid boolean"
    return None


def check_sampling(body: dict[str, Any]) -> str | None:
    """lmdeploy 0.18's check_request, in its order and words."""
    top_p, top_k, temp, min_p = (body.get(k) for k in ("top_p", "top_k", "temperature", "min_p"))
    if top_p is not None and not 0 < top_p <= 1:
        return f"The top_p {float(top_p)!r} must be in (0, 1]."
    if top_k is not None and top_k < 0:
        return f"The top_k {int(top_k)!r} cannot be a negative integer."
    if temp is not None and not 0 <= temp <= 2:
        return f"The temperature {float(temp)!r} must be in [0, 2]"
    if min_p is not None and not 0 <= min_p <= 1:
        return f"The min_p {float(min_p)!r} must be in [0, 1]."
    mct = body.get("max_completion_tokens")
    if mct is not None and mct <= 0:
        return f"The max_completion_tokens {int(mct)!r} must be a positive integer."
    mt = body.get("max_tokens")
    if mt is not None and mt <= 0:
        return f"The max_tokens {int(mt)!r} must be a positive integer."
    mnt = body.get("min_new_tokens")
    if mnt is not None and mnt < 0:
        return f"The min_new_tokens {int(mnt)!r} cannot be a negative integer."
    if not body["messages"]:
        return "messages must not be empty unless input_ids is set."
    return None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeHTTPServer

    # --- plumbing ---------------------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        self.app: App = self.server.app
        self.app.track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.app.track(self.connection, add=False)

    def handle_one_request(self) -> None:
        # Idle keep-alive connections close after uvicorn's timeout, or at once when the server shuts down.
        deadline = time.monotonic() + KEEP_ALIVE_S
        while True:
            if self.app.closing:
                self.close_connection = True
                return
            try:
                readable, _, _ = select.select([self.connection], [], [], 0.05)
            except (OSError, ValueError):
                self.close_connection = True
                return
            if readable:
                break
            if time.monotonic() > deadline:
                self.close_connection = True
                return
        with self.app.conn_lock:
            self.app.busy += 1
        try:
            super().handle_one_request()
        finally:
            with self.app.conn_lock:
                self.app.busy -= 1

    def version_string(self) -> str:
        return "uvicorn"

    def send_response(self, code: int, message: str | None = None) -> None:
        phrase = message or (self.responses[code][0] if code in self.responses else "")
        log(f'INFO:     {self.client_address[0]}:{self.client_address[1]} - "{self.requestline}" {code} {phrase}')
        self.send_response_only(code, message)
        self.send_header("date", self.date_time_string())
        self.send_header("server", "uvicorn")

    def log_message(self, format: str, *args: Any) -> None:
        pass  # uvicorn logs its own way (send_response)

    def _send_body(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.send_header("content-type", content_type)
        if self.app.closing:
            self.send_header("connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, status: int, obj: Any) -> None:
        # FastAPI's JSONResponse: compact, non-ASCII kept
        body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        self._send_body(status, body, "application/json")

    def send_error_json(self, status: int, message: str, error_type: str | None = None) -> None:
        self.send_json(status, flat_error(status, message, error_type))

    def read_body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def client_gone(self, timeout: float = 0.0) -> bool:
        """True once the client has closed its end (EOF or reset on the socket)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], max(0.0, timeout))
            if not readable:
                return False
            data = self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except (OSError, ValueError):
            return True
        if data:
            time.sleep(max(0.0, timeout))  # a pipelined request waits its turn; keep the pacing
            return False
        return True

    def wait_until(self, deadline: float) -> None:
        """Pace the stream, noticing a client that leaves while we wait."""
        while True:
            remaining = deadline - time.monotonic()
            if self.client_gone(min(max(remaining, 0.0), 0.25)):
                raise ClientGone
            if remaining <= 0.25:
                return

    def write_chunk(self, data: bytes) -> None:
        try:
            self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))
        except (OSError, ValueError) as e:
            raise ClientGone from e

    # --- dispatch ---------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self.dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def dispatch(self) -> None:
        app = self.app
        raw = self.read_body()
        path = urlsplit(self.path).path
        if app.closing:
            self.close_connection = True
        if path.startswith("/standin/"):
            return self.standin(path, raw)
        if app.opts.api_keys and self.command != "OPTIONS" and not path.startswith(AUTH_FREE_PREFIXES):
            header = self.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or token not in app.opts.api_keys:
                return self.send_error_json(401, "Unauthorized.")
        if not app.ready and path != "/health":
            return self.send_error_json(503, "The inference engine is unavailable.")
        routes: dict[str, dict[str, Callable[[], None]]] = {
            "/health": {"GET": self.health},
            "/v1/models": {"GET": self.models},
            "/v1/chat/completions": {"POST": lambda: self.chat(raw)},
            "/v1/encode": {"POST": lambda: self.encode(raw)},
        }
        if not app.opts.disable_metrics:
            routes["/metrics"] = {"GET": self.metrics}
        if app.opts.backend == "pytorch":
            routes["/distserve/engine_info"] = {"GET": self.engine_info}
        key = "/metrics" if path.startswith("/metrics") and "/metrics" in routes else path
        methods = routes.get(key)
        if methods is None:
            return self.send_json(404, {"detail": "Not Found"})
        handler = methods.get(self.command)
        if handler is None:
            return self.send_json(405, {"detail": "Method Not Allowed"})
        return handler()

    # --- endpoints --------------------------------------------------------------------------------

    def health(self) -> None:
        if not self.app.ready:
            return self.send_json(503, {"status": "initializing", "message": "Engine health monitor is starting."})
        engine = "PyTorch" if self.app.opts.backend == "pytorch" else "TurboMind"
        return self.send_json(200, {"status": "healthy", "message": f"{engine} engine is healthy."})

    def models(self) -> None:
        name = self.app.opts.model_name
        now = int(time.time())
        perm = {
            "id": "modelperm-" + "".join(string.ascii_letters[b % 52] for b in os.urandom(22)),
            "object": "model_permission",
            "created": now,
            "allow_create_engine": False,
            "allow_sampling": True,
            "allow_logprobs": True,
            "allow_search_indices": True,
            "allow_view": True,
            "allow_fine_tuning": False,
            "organization": "*",
            "group": None,
            "is_blocking": False,
        }
        card = {
            "id": name,
            "object": "model",
            "created": now,
            "owned_by": "lmdeploy",
            "root": name,
            "parent": None,
            "permission": [perm],
        }
        self.send_json(200, {"object": "list", "data": [card]})

    def metrics(self) -> None:
        body = self.app.metrics_text().encode("utf-8")
        self._send_body(200, body, "text/plain; version=0.0.4; charset=utf-8")

    def engine_info(self) -> None:
        o = self.app.opts
        info = {
            "tp_size": o.tp,
            "dp_size": 1,
            "pp_size": None,
            "ep_size": 1,
            "dp_rank": 0,
            "block_size": o.block_size,
            "num_cpu_blocks": 0,
            "num_gpu_blocks": self.app.state.num_gpu_blocks,
        }
        # FastAPI serialises the str that model_dump_json() returned: a JSON string holding JSON
        self.send_json(200, json.dumps(info, separators=(",", ":")))

    def parse_json(self, raw: bytes) -> tuple[Any, str | None]:
        ctype = self.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            return None, "Unsupported Media Type: Only 'application/json' is allowed"
        if not raw:
            return None, "Field required"
        try:
            return json.loads(raw), None
        except json.JSONDecodeError as e:
            return raw.decode("utf-8", "replace"), f"{e.pos}: JSON decode error"
        except ValueError:
            return raw.decode("utf-8", "replace"), "0: JSON decode error"

    def encode(self, raw: bytes) -> None:
        body, problem = self.parse_json(raw)
        if problem:
            return self.send_error_json(400, problem)
        if not isinstance(body, dict) or "input" not in body:
            return self.send_error_json(400, "input: Field required")
        text = body["input"]
        if isinstance(text, str):
            ids = [token_id(w) for w in text.split()]
            return self.send_json(200, {"input_ids": ids, "length": len(ids)})
        if isinstance(text, list) and all(isinstance(t, str) for t in text):
            batches = [[token_id(w) for w in t.split()] for t in text]
            return self.send_json(200, {"input_ids": batches, "length": [len(b) for b in batches]})
        return self.send_error_json(400, "input: Input should be a valid string")

    def standin(self, path: str, raw: bytes) -> None:
        st = self.app.state
        if path == "/standin/stats" and self.command == "GET":
            with st.lock:
                data = {
                    "requests": st.requests,
                    "completed": st.completed,
                    "aborted": st.aborted,
                    "failed": st.failed,
                    "running": st.running,
                    "waiting": st.waiting,
                    "last_request": st.last_request,
                    "generated_tokens": st.generated_tokens,
                    "engine_pid": self.app.engine.pid if self.app.engine else None,
                    "worker_pids": [w.pid for w in self.app.workers],
                    "settings": dict(st.settings),
                }
            return self.send_json(200, data)
        if path == "/standin/config" and self.command == "POST":
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                return self.send_json(400, {"detail": "the body must be a JSON object"})
            if not isinstance(body, dict):
                return self.send_json(400, {"detail": "the body must be a JSON object"})
            unknown = sorted(set(body) - set(st.settings))
            if unknown:
                return self.send_json(400, {"detail": f"unknown settings: {', '.join(unknown)}"})
            with st.lock:
                for key, value in body.items():
                    if value is None and key in ("rate", "tokens_per_chunk"):
                        value = st.launch_settings[key]
                    st.settings[key] = value
                # the newest of reply / words wins
                if body.get("reply") is not None:
                    st.settings["words"] = None
                elif body.get("words") is not None:
                    st.settings["reply"] = None
                settings = dict(st.settings)
            return self.send_json(200, settings)
        return self.send_json(404, {"detail": "Not Found"})

    # --- chat -------------------------------------------------------------------------------------

    def chat(self, raw: bytes) -> None:
        st, opts = self.app.state, self.app.opts
        body, problem = self.parse_json(raw)
        with st.lock:
            st.requests += 1
            st.last_request = body
        if problem:
            return self.send_error_json(400, problem)
        problem = validate_fields(body)
        if problem:
            return self.send_error_json(400, problem)
        if body["model"] != opts.model_name:
            return self.send_error_json(404, f"The model {body['model']!r} does not exist.")
        problem = check_sampling(body)
        if problem:
            return self.send_error_json(400, problem)

        ids: list[int] = []
        images = 0
        last_user = ""
        image_tokens: list[int] = []
        for m in body["messages"]:
            text, n_img = message_text(m.get("content"))
            images += n_img
            ids.extend(token_id(f"<|{m.get('role', '')}|>{k}") for k in range(TOKENS_PER_MESSAGE))
            ids.extend(token_id(w) for w in text.split())
            if opts.image_rule is None:
                counts = [TOKENS_PER_IMAGE] * n_img
            else:
                counts = []
                for url in message_image_urls(m.get("content")):
                    data = image_bytes(url)
                    dims = image_dimensions(data) if data is not None else None
                    if dims is None:
                        counts.append(-1)
                    else:
                        counts.append(qwen_vl_tokens(dims[0], dims[1], opts.image_rule))
            image_tokens.extend(counts)
            for n in counts:
                ids.extend(token_id(f"<image>{k}") for k in range(max(n, 0)))
            if m.get("role") == "user":
                last_user = text
        if images and not opts.vlm:
            return self.send_error_json(400, "Multimodal input is not supported by this model.")
        if -1 in image_tokens:
            # Not recorded from the real server (which fails in its image loader): a plain 400 sentence.
            return self.send_error_json(400, "Failed to load an image: the data is not a PNG, JPEG, GIF, BMP or WebP.")
        prompt_tokens = len(ids)
        if prompt_tokens >= opts.session_len:
            return self.send_error_json(
                400,
                f"Input length ({prompt_tokens}) must be smaller than the model context length ({opts.session_len}).",
            )

        with st.lock:
            settings = dict(st.settings)
        fault, fault_after = None, 0
        for name, key in (
            ("die", "die_after"),
            ("stall", "stall_after"),
            ("inband", "inband_error_after"),
            ("malformed", "malformed_after"),
        ):
            if settings[key] is not None:
                fault, fault_after = name, int(settings[key])
                break
        m = FAULT_RE.search(last_user)
        if m:
            if m.group(1) not in FAULT_NAMES:
                return self.send_error_json(
                    400, f"Unknown stand-in fault {m.group(1)!r}: use one of {', '.join(FAULT_NAMES)}."
                )
            fault, fault_after = m.group(1), int(m.group(2) or 2)
        r = REPLY_RE.search(last_user)
        if r:
            reply = r.group(1)
        elif settings["words"] is not None:
            reply = " ".join(f"w{i}" for i in range(1, int(settings["words"]) + 1))
        elif settings["reply"] is not None:
            reply = str(settings["reply"])
        else:
            reply = DEFAULT_REPLY

        finish = "stop"
        stops = body.get("stop")
        if isinstance(stops, str):
            stops = [stops]
        cut = min((reply.find(s) for s in stops or [] if s and s in reply), default=-1)
        if cut >= 0:
            reply = reply[:cut]
        tokens = tokenize(reply)
        limit = opts.session_len - prompt_tokens
        requested = body.get("max_completion_tokens") or body.get("max_tokens")
        if requested is not None:
            limit = min(limit, int(requested))
        if len(tokens) > limit:
            tokens = tokens[:limit]
            finish = "length"
        k = max(1, int(settings["tokens_per_chunk"]))
        groups = [tokens[i : i + k] for i in range(0, len(tokens), k)] or [[]]
        plan = Plan(
            prompt_tokens=prompt_tokens,
            cached_tokens=st.cached_prefix(ids),
            chunks=["".join(g) for g in groups],
            chunk_sizes=[len(g) for g in groups],
            finish_reason=finish,
            fault=fault,
            fault_after=min(max(fault_after, 0), len(groups)),
            rate=float(settings["rate"]),
        )
        stream = bool(body.get("stream"))
        include_usage = bool(
            stream and isinstance(body.get("stream_options"), dict) and body["stream_options"].get("include_usage")
        )
        self.generate(plan, body["model"], stream, include_usage)

    def generate(self, plan: Plan, model: str, stream: bool, include_usage: bool) -> None:
        app, st = self.app, self.app.state
        request_id = "chatcmpl-" + "".join(string.ascii_letters[b % 52] for b in os.urandom(22))
        created = int(time.time())
        with st.lock:
            st.waiting += 1
        st.batch.acquire()
        queued = time.monotonic() - plan.started
        with st.lock:
            st.waiting -= 1
            st.running += 1
            st.serial += 1
            serial = st.serial
            st.busy_blocks[serial] = -(-plan.prompt_tokens // app.opts.block_size)
            st.prompt_tokens_total += plan.prompt_tokens
            st.window_prompt += plan.prompt_tokens
        outcome = "aborted"
        sent = 0
        text: list[str] = []
        first_at: float | None = None
        last_at = time.monotonic()
        try:
            if stream:
                self.send_response(200)
                self.send_header("content-type", "text/event-stream; charset=utf-8")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
            start = time.monotonic()
            for i in range(len(plan.chunks) + 1):
                if plan.fault is not None and i == plan.fault_after:
                    if plan.fault == "die":
                        app.die()
                    if plan.fault == "stall":
                        while not self.client_gone(0.25):
                            if app.force_exit:
                                break
                        raise ClientGone
                    if plan.fault == "inband":
                        error = flat_error(500, "An internal server error occurred.")
                        if stream:
                            self.write_chunk(f"data: {json.dumps({'error': error})}\n\n".encode())
                            self.write_chunk(b"data: [DONE]\n\n")
                            self.write_chunk(b"")
                        else:
                            self.send_json(500, error)
                        outcome = "failed"
                        return
                    if plan.fault == "malformed" and stream:
                        self.write_chunk(b"data: {not json\n\n")
                if i == len(plan.chunks):
                    break
                self.wait_until(start + (i + 1) / plan.rate)
                piece = plan.chunks[i]
                last = i == len(plan.chunks) - 1
                if stream:
                    choice: dict[str, Any] = {"index": 0, "delta": {"role": "assistant", "content": piece}}
                    if last:
                        choice["finish_reason"] = plan.finish_reason
                    chunk: dict[str, Any] = {
                        "id": request_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [choice],
                    }
                    if include_usage:
                        chunk["usage"] = None
                    # lmdeploy writes chunks with json.dumps defaults (ASCII escapes, ", " separators)
                    self.write_chunk(f"data: {json.dumps(chunk)}\n\n".encode())
                text.append(piece)
                now = time.monotonic()
                n = plan.chunk_sizes[i]
                sent += n
                with st.lock:
                    st.generated_tokens += n
                    st.generation_tokens_total += n
                    st.window_gen += n
                    st.busy_blocks[serial] = -(-(plan.prompt_tokens + sent) // app.opts.block_size)
                    st.h_iter.observe(n)
                    if first_at is None:
                        first_at = now
                        st.h_ttft.observe(now - plan.started)
                        st.h_prefill.observe(now - plan.started - queued)
                    else:
                        st.h_itl.observe(now - last_at)
                last_at = now
            usage = {
                "prompt_tokens": plan.prompt_tokens,
                "total_tokens": plan.prompt_tokens + sent,
                "completion_tokens": sent,
                "prompt_tokens_details": {"cached_tokens": plan.cached_tokens},
            }
            if stream:
                if include_usage:
                    final = {
                        "id": request_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": usage,
                    }
                    self.write_chunk(f"data: {json.dumps(final, separators=(',', ':'))}\n\n".encode())
                self.write_chunk(b"data: [DONE]\n\n")
                self.write_chunk(b"")
            else:
                message = {"role": "assistant", "content": "".join(text), "reasoning_content": None, "tool_calls": None}
                choice = {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "output_token_logprobs": None,
                    "finish_reason": plan.finish_reason,
                    "output_ids": None,
                    "routed_experts": None,
                }
                full = {
                    "id": request_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [choice],
                    "usage": {**usage, "completion_tokens_details": None},
                    "service_tier": None,
                }
                self.send_json(200, full)
            outcome = "completed"
        except ClientGone:
            self.close_connection = True
            outcome = "aborted"
        finally:
            end = time.monotonic()
            with st.lock:
                st.running -= 1
                st.busy_blocks.pop(serial, None)
                if outcome == "completed":
                    st.completed += 1
                    reason = plan.finish_reason
                elif outcome == "aborted":
                    st.aborted += 1
                    reason = "abort"
                else:
                    st.failed += 1
                    reason = "error"
                st.success_by_reason[reason] = st.success_by_reason.get(reason, 0) + 1
                st.h_prompt.observe(plan.prompt_tokens)
                st.h_gen.observe(sent)
                st.h_e2e.observe(end - plan.started)
                st.h_queue.observe(queued)
                st.h_infer.observe(end - plan.started - queued)
                if first_at is not None:
                    st.h_decode.observe(end - first_at)
                    if sent > 1:
                        st.h_tpot.observe((end - first_at) / (sent - 1))
            st.batch.release()
            if outcome != "completed":
                self.close_connection = True


def main(argv: list[str]) -> int:
    try:
        opts = parse_args(argv)
    except UsageError as e:
        # argparse: unknown arguments are the top parser's complaint, the rest the subcommand's
        usage, prog = (USAGE, "lmdeploy") if e.top_level else (SUB_USAGE, "lmdeploy serve api_server")
        sys.stderr.write(f"{usage}\n{prog}: error: {e}\n")
        return 2
    return App(opts).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
