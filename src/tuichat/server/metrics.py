"""Server status maths: LMDeploy `/metrics` parsing, token rates, sparkline history, per-reply stats and
the context meter (how much of `session_len` a conversation uses).

The Prometheus text is read by a small line scanner (`parse_metrics`): the status pane polls it every few seconds
for the whole life of the app, and prometheus_client's parser, which builds a family and a sample object for each
of the ~800 lines an lmdeploy server exposes, was most of tuichat's idle CPU (bench/PROFILE.md). Every sample line
is still checked for the exposition format's shape, so a page that is not Prometheus text is refused as before.
Values are looked up by *sample* name (`..._total`, `..._sum`, `..._count`), which is the same whether or not the
text has TYPE lines.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from tuichat.errors import TuichatError


class MetricsError(TuichatError):
    """The `/metrics` answer could not be read as Prometheus text."""


@dataclass(frozen=True)
class ServerMetrics:
    """One scrape of LMDeploy's `/metrics`; a metric the server did not report is None.

    Counts are summed across label sets (several engines, DP ranks); ratios (KV cache usage, prefix cache
    hit rate) take the busiest engine's value. Histogram sums and counts are cumulative since server start.
    """

    kv_cache_usage: float | None = None
    running: int | None = None
    waiting: int | None = None
    prefix_cache_hit_rate: float | None = None
    generation_tokens_total: float | None = None
    prompt_tokens_total: float | None = None
    ttft_sum: float | None = None
    ttft_count: float | None = None
    tpot_sum: float | None = None
    tpot_count: float | None = None
    succeeded: int | None = None
    failed: int | None = None
    api_routed: int | None = None
    api_waiting: int | None = None

    @property
    def mean_ttft(self) -> float | None:
        """Mean time to first token since the server started, in seconds."""
        return _mean(self.ttft_sum, self.ttft_count)

    @property
    def mean_tpot(self) -> float | None:
        """Mean time per output token since the server started, in seconds."""
        return _mean(self.tpot_sum, self.tpot_count)

    def ttft_since(self, earlier: ServerMetrics) -> float | None:
        """Mean time to first token of the requests that finished between `earlier` and this scrape."""
        return _mean_between(earlier.ttft_sum, earlier.ttft_count, self.ttft_sum, self.ttft_count)


def _mean(total: float | None, count: float | None) -> float | None:
    if total is None or count is None or count <= 0:
        return None
    return total / count


def _mean_between(sum0: float | None, count0: float | None, sum1: float | None, count1: float | None) -> float | None:
    if sum0 is None or count0 is None or sum1 is None or count1 is None:
        return None
    if count1 < count0:  # the server restarted in between: the new totals are all there is
        return _mean(sum1, count1)
    return _mean(sum1 - sum0, count1 - count0)


_PREFIX = "lmdeploy:"
_SUM_FIELDS = {
    "num_requests_running": "running",
    "num_requests_waiting": "waiting",
    "num_requests_succeeded": "succeeded",
    "num_requests_failed": "failed",
    "num_api_requests_routed": "api_routed",
    "num_api_requests_waiting": "api_waiting",
    "generation_tokens_total": "generation_tokens_total",
    "prompt_tokens_total": "prompt_tokens_total",
    "time_to_first_token_seconds_sum": "ttft_sum",
    "time_to_first_token_seconds_count": "ttft_count",
    "time_per_output_token_seconds_sum": "tpot_sum",
    "time_per_output_token_seconds_count": "tpot_count",
}
# A counter written without the `_total` suffix names the same value.
_SUM_FIELDS |= {"generation_tokens": "generation_tokens_total", "prompt_tokens": "prompt_tokens_total"}
_MAX_FIELDS = {"gpu_cache_usage_perc": "kv_cache_usage", "prefix_cache_hit_rate": "prefix_cache_hit_rate"}


# One sample line of the text exposition format: a metric name, an optional label block (quoted values may hold
# braces, commas and escaped quotes), the value, an optional timestamp.
_SAMPLE_LINE = re.compile(
    r"([a-zA-Z_:][a-zA-Z0-9_:]*)"
    r"(?:\{(?:[^\"{}]|\"(?:[^\"\\]|\\.)*\")*\})?"
    r"[ \t]+(\S+)"
    r"(?:[ \t]+-?[0-9]+)?[ \t]*"
)


def _not_prometheus(text: str, why: str) -> MetricsError:
    first = text.strip().splitlines()[0][:60] if text.strip() else ""
    return MetricsError(
        f"The server's /metrics answer is not Prometheus text ({why}; it starts with {first!r}). "
        "Check that the address points at an LMDeploy server and that the API key is right."
    )


def lmdeploy_samples(text: str) -> Iterator[tuple[str, float]]:
    """Every finite `lmdeploy:` sample of a Prometheus text as (name without the prefix, value), one per label set;
    raise `MetricsError` if the text is not Prometheus text at all. NaN means "no data yet" to Prometheus: left out."""
    match = _SAMPLE_LINE.fullmatch
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] == "#":
            continue
        found = match(line)
        if found is None:
            raise _not_prometheus(text, f"line {number} is not a sample")
        try:
            value = float(found[2])
        except ValueError:
            raise _not_prometheus(text, f"line {number} has no number for its value") from None
        name = found[1]
        if name.startswith(_PREFIX) and math.isfinite(value):
            yield name[len(_PREFIX) :], value


def parse_metrics(text: str) -> ServerMetrics:
    """Read LMDeploy's Prometheus text; raise `MetricsError` if it is not Prometheus text at all."""
    sums: dict[str, float] = {}
    maxima: dict[str, float] = {}
    for key, value in lmdeploy_samples(text):
        if key in _SUM_FIELDS:
            field = _SUM_FIELDS[key]
            sums[field] = sums.get(field, 0.0) + value
        elif key in _MAX_FIELDS:
            field = _MAX_FIELDS[key]
            maxima[field] = max(maxima.get(field, value), value)

    def count(field: str) -> int | None:
        return round(sums[field]) if field in sums else None

    return ServerMetrics(
        kv_cache_usage=maxima.get("kv_cache_usage"),
        running=count("running"),
        waiting=count("waiting"),
        prefix_cache_hit_rate=maxima.get("prefix_cache_hit_rate"),
        generation_tokens_total=sums.get("generation_tokens_total"),
        prompt_tokens_total=sums.get("prompt_tokens_total"),
        ttft_sum=sums.get("ttft_sum"),
        ttft_count=sums.get("ttft_count"),
        tpot_sum=sums.get("tpot_sum"),
        tpot_count=sums.get("tpot_count"),
        succeeded=count("succeeded"),
        failed=count("failed"),
        api_routed=count("api_routed"),
        api_waiting=count("api_waiting"),
    )


class RateTracker:
    """Turns a cumulative counter (e.g. generated tokens) into a per-second rate over a recent window.

    Feed it `(time, counter_value)` with `add`; times must not go backwards (older points are ignored). A
    counter that drops means the server restarted: the new value counts as the increase since the restart,
    so the rate is never negative.
    """

    def __init__(self, max_points: int = 512) -> None:
        self._points: deque[tuple[float, float]] = deque(maxlen=max_points)

    def add(self, t: float, value: float) -> None:
        if self._points and t < self._points[-1][0]:
            return
        self._points.append((t, value))

    def reset(self) -> None:
        self._points.clear()

    def rate(self, window_s: float = 10.0) -> float | None:
        """Increase per second between the oldest point within `window_s` of the newest and the newest."""
        if len(self._points) < 2:
            return None
        newest_t = self._points[-1][0]
        window = [p for p in self._points if p[0] >= newest_t - window_s]
        if len(window) < 2:
            return None
        elapsed = window[-1][0] - window[0][0]
        if elapsed <= 0:
            return None
        increase = 0.0
        for (_, before), (_, after) in itertools.pairwise(window):
            increase += after - before if after >= before else after
        return increase / elapsed


class History:
    """A bounded time series for sparklines; the oldest points fall off once `maxlen` is reached."""

    def __init__(self, maxlen: int = 600) -> None:
        self._points: deque[tuple[float, float]] = deque(maxlen=maxlen)

    def append(self, t: float, value: float) -> None:
        """Add a point; one older than the newest is ignored (a stale sample arriving late)."""
        if self._points and t < self._points[-1][0]:
            return
        self._points.append((t, value))

    def values(self, last_seconds: float | None = None, now: float | None = None) -> list[float]:
        """Values of the last `last_seconds` before `now` (default: the newest point), oldest first."""
        if last_seconds is None or not self._points:
            return [v for _, v in self._points]
        end = self._points[-1][0] if now is None else now
        return [v for t, v in self._points if t >= end - last_seconds]

    @property
    def latest(self) -> float | None:
        return self._points[-1][1] if self._points else None

    def __len__(self) -> int:
        return len(self._points)


@dataclass(frozen=True)
class ReplyStats:
    """Timing of one streamed reply.

    `completion_tokens` is the usage chunk's count, or the server's `/v1/encode` count of the reply text
    (`counted`); without either only `chunks` is known, and a chunk often carries several tokens, so the figures
    are then chunk figures and say so (`estimated`), never passed off as tokens.
    """

    ttft_s: float | None
    decode_tokens_per_s: float | None
    total_s: float
    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int | None
    estimated: bool = False
    chunks: int | None = None
    decode_chunks_per_s: float | None = None
    counted: bool = False


def _decode_rate(count: int, first_token_at: float | None, end_at: float) -> float | None:
    """Items after the first over the time after the first (prefill time does not drag it down)."""
    if first_token_at is None or count < 2:
        return None
    decode_s = end_at - first_token_at
    return (count - 1) / decode_s if decode_s > 0 else None


def compute_reply_stats(
    request_start: float,
    first_token_at: float | None,
    end_at: float,
    completion_tokens: int | None,
    prompt_tokens: int | None,
    cached_tokens: int | None,
    chunk_count: int,
) -> ReplyStats:
    """Stats from monotonic timestamps and the usage chunk (None where the server sent none).

    Decode speed counts the tokens after the first one over the time after the first one, so prefill time
    does not drag it down; with fewer than two tokens there is no speed to report. Without a usage chunk the
    speed is in chunks per second and the token count is left unknown.
    """
    ttft = None if first_token_at is None else max(first_token_at - request_start, 0.0)
    estimated = completion_tokens is None
    return ReplyStats(
        ttft_s=ttft,
        decode_tokens_per_s=None if estimated else _decode_rate(completion_tokens or 0, first_token_at, end_at),
        total_s=max(end_at - request_start, 0.0),
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        cached_tokens=cached_tokens,
        estimated=estimated,
        chunks=chunk_count,
        decode_chunks_per_s=_decode_rate(chunk_count, first_token_at, end_at) if estimated else None,
    )


def with_token_count(stats: ReplyStats, completion_tokens: int) -> ReplyStats:
    """The stats of a reply that came without usage, once `/v1/encode` counted its text's tokens."""
    speed = None
    if stats.ttft_s is not None and completion_tokens >= 2:
        decode_s = stats.total_s - stats.ttft_s
        speed = (completion_tokens - 1) / decode_s if decode_s > 0 else None
    return replace(
        stats,
        completion_tokens=completion_tokens,
        decode_tokens_per_s=speed,
        estimated=False,
        decode_chunks_per_s=None,
        counted=True,
    )


def format_reply_stats(stats: ReplyStats) -> str:
    """One line under a reply, e.g. `TTFT 0.21s · 85.3 tok/s · 412 tokens · 5.1s`; without a token count it
    says chunks (`TTFT 0.21s · 31.0 chunks/s · 39 chunks · 1.4s`)."""
    parts = []
    if stats.ttft_s is not None:
        parts.append(f"TTFT {_seconds(stats.ttft_s)}")
    if stats.completion_tokens is not None:
        if stats.decode_tokens_per_s is not None:
            parts.append(f"{_rate(stats.decode_tokens_per_s)} tok/s")
        parts.append(f"{stats.completion_tokens:,} tokens")
    elif stats.chunks is not None:
        if stats.decode_chunks_per_s is not None:
            parts.append(f"{_rate(stats.decode_chunks_per_s)} chunks/s")
        parts.append(f"{stats.chunks:,} chunk" + ("" if stats.chunks == 1 else "s"))
    if stats.cached_tokens:
        parts.append(f"{stats.cached_tokens:,} cached")
    parts.append(_seconds(stats.total_s))
    return " · ".join(parts)


def reply_stats_from_dict(stats: Mapping[str, Any]) -> ReplyStats | None:
    """The saved stats dict of a reply back as ReplyStats (older rows lack keys, and counted chunks as tokens)."""
    if stats.get("total_s") is None:
        return None
    estimated = bool(stats.get("estimated"))
    counted = bool(stats.get("counted"))
    tokens = stats.get("completion_tokens")
    chunks = stats.get("chunks")
    chunk_rate = stats.get("decode_chunks_per_s")
    token_rate = stats.get("decode_tokens_per_s")
    if estimated and not counted:
        # Rows written before chunks were told apart stored the chunk count and rate as tokens.
        chunks = chunks if chunks is not None else tokens
        chunk_rate = chunk_rate if chunk_rate is not None else token_rate
        tokens, token_rate = None, None
    return ReplyStats(
        ttft_s=stats.get("ttft_s"),
        decode_tokens_per_s=token_rate,
        total_s=stats["total_s"],
        prompt_tokens=stats.get("prompt_tokens"),
        completion_tokens=tokens,
        cached_tokens=stats.get("cached_tokens"),
        estimated=estimated and not counted,
        chunks=chunks,
        decode_chunks_per_s=chunk_rate,
        counted=counted,
    )


def kv_capacity_tokens(engine_info: Mapping[str, Any] | None) -> int | None:
    """How many tokens the server's KV cache holds: `num_gpu_blocks` x `block_size` from
    `/distserve/engine_info` (PyTorch backend); None where either is missing."""
    if not engine_info:
        return None
    blocks, size = engine_info.get("num_gpu_blocks"), engine_info.get("block_size")
    if isinstance(blocks, bool) or isinstance(size, bool) or not isinstance(blocks, int) or not isinstance(size, int):
        return None
    if blocks <= 0 or size <= 0:
        return None
    return blocks * size


_CONTEXT_RE = re.compile(
    r"input length\s*\(\s*([\d,]+)\s*\)\s*must be smaller than the model context length\s*\(\s*([\d,]+)\s*\)",
    re.IGNORECASE,
)


def parse_context_length(error_message: str) -> tuple[int, int] | None:
    """(input length, context length) from LMDeploy's "Input length (N) must be smaller than the model
    context length (S)." error, or None for any other message."""
    match = _CONTEXT_RE.search(error_message)
    if match is None:
        return None
    return int(match.group(1).replace(",", "")), int(match.group(2).replace(",", ""))


def estimate_tokens(text: str) -> int:
    """A cheap *estimate* of a text's token count: one token per 4 characters, rounded up.

    Good enough for a meter; English prose is close, code and non-Latin scripts use more tokens per character.
    Use the server's `/v1/encode` or the usage chunk when an exact count matters.
    """
    return -(-len(text) // 4)


class ContextMeter:
    """How much of the server's context window (`session_len`) the conversation uses.

    The server keeps no state, so every request carries the whole history: after a reply, the usage chunk's
    prompt + completion tokens is exactly what the next request starts from. Between replies (or when the
    server sends no usage) the meter holds an estimate.
    """

    def __init__(self, session_len: int | None, warn_at: float = 0.9) -> None:
        self.session_len = session_len
        self.warn_at = warn_at
        self.used = 0
        self.exact = True

    def record_usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        """The usage chunk of the last reply: an exact count."""
        self.used = max(prompt_tokens, 0) + max(completion_tokens, 0)
        self.exact = True

    def record_estimate(self, tokens: int) -> None:
        """An estimated count for the whole conversation (e.g. the sum of `estimate_tokens` of its texts)."""
        self.used = max(tokens, 0)
        self.exact = False

    def estimate_from(self, texts: Iterable[str]) -> None:
        self.record_estimate(sum(estimate_tokens(t) for t in texts))

    def learn_from_error(self, error_message: str) -> bool:
        """Take `session_len` from a "context length" error; True if the message was one.

        `used` is left alone: the rejected input included a message that is not part of the conversation.
        """
        parsed = parse_context_length(error_message)
        if parsed is None:
            return False
        self.session_len = parsed[1]
        return True

    def reset(self) -> None:
        """A new chat."""
        self.used = 0
        self.exact = True

    @property
    def fraction(self) -> float | None:
        """Share of the context in use, 0..1, or None while `session_len` is unknown."""
        if not self.session_len or self.session_len <= 0:
            return None
        return min(self.used / self.session_len, 1.0)

    def would_overflow(self, next_prompt_tokens: int, reserve: int = 0) -> bool:
        """True if history + the next message + `reserve` tokens for the reply do not fit.

        LMDeploy needs the input strictly smaller than the context length, hence `>=`.
        """
        if not self.session_len:
            return False
        return self.used + max(next_prompt_tokens, 0) + max(reserve, 0) >= self.session_len

    def warning(self) -> str | None:
        """A sentence once the conversation nears or fills the context window; None before that."""
        fraction = self.fraction
        if fraction is None or self.session_len is None or fraction < self.warn_at:
            return None
        approx = "" if self.exact else "~"
        numbers = f"{approx}{self.used:,} / {self.session_len:,} tokens"
        if self.used >= self.session_len:
            return f"context full ({numbers}): start a new chat or raise session_len"
        return f"context {numbers}: the next message may not fit; start a new chat or raise session_len"


def _seconds(s: float) -> str:
    if s < 10:
        return f"{s:.2f}s"
    if s < 100:
        return f"{s:.1f}s"
    return f"{s:.0f}s"


def _rate(r: float) -> str:
    return f"{r:.0f}" if r >= 100 else f"{r:.1f}"


def summarize_for_status(
    metrics: ServerMetrics | None, rate: float | None, ttft: float | None = None, width: int = 80
) -> str:
    """A compact status line, e.g. `KV 42% · run 2 · wait 0 · 312 tok/s · TTFT 0.21s`.

    `ttft` overrides the lifetime mean from the metrics (pass `ServerMetrics.ttft_since` for a recent one).
    Parts the server did not report are left out; parts that do not fit in `width` are dropped from the end.
    """
    if metrics is None:
        return "server metrics unavailable"
    parts: list[str] = []
    if metrics.kv_cache_usage is not None:
        parts.append(f"KV {metrics.kv_cache_usage * 100:.0f}%")
    if metrics.running is not None:
        parts.append(f"run {metrics.running}")
    if metrics.waiting is not None:
        parts.append(f"wait {metrics.waiting}")
    if rate is not None:
        parts.append(f"{_rate(rate)} tok/s")
    shown_ttft = metrics.mean_ttft if ttft is None else ttft
    if shown_ttft is not None:
        parts.append(f"TTFT {_seconds(shown_ttft)}")
    if metrics.prefix_cache_hit_rate is not None:
        parts.append(f"prefix hit {metrics.prefix_cache_hit_rate * 100:.0f}%")
    if metrics.failed:
        parts.append(f"failed {metrics.failed}")
    line = ""
    for part in parts:
        candidate = f"{line} · {part}" if line else part
        if len(candidate) > width:
            break
        line = candidate
    return line or "no server metrics yet"


METRICS_OFF_BACKOFF = 30.0  # seconds between /metrics tries once the server said it has none
AUTH_GRACE = 15.0  # seconds after attaching in which a 401 counts as the server not having the key yet
TRANSIENT_CAP = 8.0  # the longest wait after a failure a retry would fix
SHOW_AFTER = 2  # transient failures in a row before the pane shows the error instead of the last figures


class MetricsSchedule:
    """When to read `/metrics` next, and whether a failure is worth showing.

    Only what a retry cannot fix waits long: a server without `/metrics` (404) or whose answer is not
    Prometheus text. A 401 in the first seconds after attaching is the server still taking the key in (or a
    request that crossed the switch to it) and is retried at the poll interval without a word; a lasting 401
    is shown and retried. Anything else (refused connection, timeout, 5xx) is retried soon, with a short
    doubling wait, and shown only when it happens twice in a row, so one blip never hides real figures.
    """

    def __init__(self, poll_s: float) -> None:
        self.poll_s = poll_s
        self.failures = 0
        self.attached_at: float | None = None

    def attached(self, now: float) -> None:
        """A new target (address and key) is in use: start afresh."""
        self.attached_at = now
        self.failures = 0

    def succeeded(self) -> None:
        self.failures = 0

    def failed(self, kind: str, now: float) -> tuple[float, bool]:
        """(seconds until the next try, whether to show the error) after a failure of `kind`
        (a ChatError kind, or "not_metrics" for an answer that is not Prometheus text)."""
        if kind in ("not_found", "not_metrics"):
            return METRICS_OFF_BACKOFF, True
        if kind == "unauthorized":
            fresh = self.attached_at is not None and now - self.attached_at < AUTH_GRACE
            return self.poll_s, not fresh
        self.failures += 1
        delay = min(self.poll_s * 2 ** (self.failures - 1), max(TRANSIENT_CAP, self.poll_s))
        return delay, self.failures >= SHOW_AFTER
