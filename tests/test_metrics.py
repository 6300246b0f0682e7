"""Server status maths: /metrics parsing, token rates, sparklines, reply stats and the context meter."""

from __future__ import annotations

import math

import pytest

from tuichat.errors import TuichatError
from tuichat.server.metrics import (
    ContextMeter,
    History,
    MetricsError,
    RateTracker,
    ServerMetrics,
    compute_reply_stats,
    estimate_tokens,
    format_reply_stats,
    kv_capacity_tokens,
    parse_context_length,
    parse_metrics,
    reply_stats_from_dict,
    summarize_for_status,
    with_token_count,
)

# Shaped like prometheus_client's exposition from LMDeploy 0.18 with two engines (DP ranks), plus the
# process metrics every prometheus_client server adds.
LMDEPLOY_METRICS = """\
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 8123.0
# HELP process_resident_memory_bytes Resident memory size in bytes.
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 1.234567168e+09
# HELP lmdeploy:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE lmdeploy:gpu_cache_usage_perc gauge
lmdeploy:gpu_cache_usage_perc{engine="0",model_name="qwen2"} 0.42
lmdeploy:gpu_cache_usage_perc{engine="1",model_name="qwen2"} 0.17
# HELP lmdeploy:num_requests_running Number of requests currently running.
# TYPE lmdeploy:num_requests_running gauge
lmdeploy:num_requests_running{engine="0",model_name="qwen2"} 2.0
lmdeploy:num_requests_running{engine="1",model_name="qwen2"} 1.0
# HELP lmdeploy:num_requests_waiting Number of requests waiting.
# TYPE lmdeploy:num_requests_waiting gauge
lmdeploy:num_requests_waiting{engine="0",model_name="qwen2"} 0.0
lmdeploy:num_requests_waiting{engine="1",model_name="qwen2"} 3.0
# HELP lmdeploy:prefix_cache_hit_rate Prefix cache hit rate.
# TYPE lmdeploy:prefix_cache_hit_rate gauge
lmdeploy:prefix_cache_hit_rate{engine="0",model_name="qwen2"} 0.25
lmdeploy:prefix_cache_hit_rate{engine="1",model_name="qwen2"} NaN
# HELP lmdeploy:num_api_requests_routed Number of requests routed.
# TYPE lmdeploy:num_api_requests_routed gauge
lmdeploy:num_api_requests_routed{model_name="qwen2"} 14.0
# HELP lmdeploy:num_api_requests_waiting Number of requests waiting for a free engine.
# TYPE lmdeploy:num_api_requests_waiting gauge
lmdeploy:num_api_requests_waiting{model_name="qwen2"} 1.0
# HELP lmdeploy:num_requests_succeeded Number of successful requests.
# TYPE lmdeploy:num_requests_succeeded gauge
lmdeploy:num_requests_succeeded{engine="0",model_name="qwen2"} 6.0
lmdeploy:num_requests_succeeded{engine="1",model_name="qwen2"} 4.0
# HELP lmdeploy:num_requests_failed Number of failed requests.
# TYPE lmdeploy:num_requests_failed gauge
lmdeploy:num_requests_failed{engine="0",model_name="qwen2"} 0.0
lmdeploy:num_requests_failed{engine="1",model_name="qwen2"} 1.0
# HELP lmdeploy:prompt_tokens_total Number of prefill tokens processed.
# TYPE lmdeploy:prompt_tokens_total counter
lmdeploy:prompt_tokens_total{engine="0",model_name="qwen2"} 1200.0
lmdeploy:prompt_tokens_total{engine="1",model_name="qwen2"} 800.0
# HELP lmdeploy:prompt_tokens_created Number of prefill tokens processed.
# TYPE lmdeploy:prompt_tokens_created gauge
lmdeploy:prompt_tokens_created{engine="0",model_name="qwen2"} 1.7531e+09
# HELP lmdeploy:generation_tokens_total Number of generation tokens processed.
# TYPE lmdeploy:generation_tokens_total counter
lmdeploy:generation_tokens_total{engine="0",model_name="qwen2"} 5000.0
lmdeploy:generation_tokens_total{engine="1",model_name="qwen2"} 2500.5
# HELP lmdeploy:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE lmdeploy:time_to_first_token_seconds histogram
lmdeploy:time_to_first_token_seconds_bucket{engine="0",le="0.05",model_name="qwen2"} 1.0
lmdeploy:time_to_first_token_seconds_bucket{engine="0",le="0.25",model_name="qwen2"} 5.0
lmdeploy:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="qwen2"} 6.0
lmdeploy:time_to_first_token_seconds_count{engine="0",model_name="qwen2"} 6.0
lmdeploy:time_to_first_token_seconds_sum{engine="0",model_name="qwen2"} 1.5
lmdeploy:time_to_first_token_seconds_bucket{engine="1",le="0.05",model_name="qwen2"} 0.0
lmdeploy:time_to_first_token_seconds_bucket{engine="1",le="0.25",model_name="qwen2"} 3.0
lmdeploy:time_to_first_token_seconds_bucket{engine="1",le="+Inf",model_name="qwen2"} 4.0
lmdeploy:time_to_first_token_seconds_count{engine="1",model_name="qwen2"} 4.0
lmdeploy:time_to_first_token_seconds_sum{engine="1",model_name="qwen2"} 0.6
# HELP lmdeploy:time_per_output_token_seconds Histogram of time per output token in seconds.
# TYPE lmdeploy:time_per_output_token_seconds histogram
lmdeploy:time_per_output_token_seconds_bucket{engine="0",le="0.01",model_name="qwen2"} 400.0
lmdeploy:time_per_output_token_seconds_bucket{engine="0",le="+Inf",model_name="qwen2"} 500.0
lmdeploy:time_per_output_token_seconds_count{engine="0",model_name="qwen2"} 500.0
lmdeploy:time_per_output_token_seconds_sum{engine="0",model_name="qwen2"} 5.0
"""


def test_parse_realistic_lmdeploy_metrics() -> None:
    m = parse_metrics(LMDEPLOY_METRICS)
    assert m.kv_cache_usage == 0.42  # the fuller engine, not a sum
    assert (m.running, m.waiting) == (3, 3)
    assert m.prefix_cache_hit_rate == 0.25  # the NaN of an engine with no data yet is left out
    assert (m.api_routed, m.api_waiting) == (14, 1)
    assert (m.succeeded, m.failed) == (10, 1)
    assert m.prompt_tokens_total == 2000.0
    assert m.generation_tokens_total == 7500.5
    assert (m.ttft_sum, m.ttft_count) == (pytest.approx(2.1), 10.0)
    assert m.mean_ttft == pytest.approx(0.21)
    assert (m.tpot_sum, m.tpot_count) == (5.0, 500.0)
    assert m.mean_tpot == pytest.approx(0.01)
    assert isinstance(m.running, int) and isinstance(m.succeeded, int)


def test_counters_are_found_without_type_lines() -> None:
    # Without TYPE lines the parser keeps `_total` in the family name too; the values must not change.
    untyped = "\n".join(line for line in LMDEPLOY_METRICS.splitlines() if not line.startswith("#"))
    assert parse_metrics(untyped) == parse_metrics(LMDEPLOY_METRICS)


def test_missing_metrics_are_none() -> None:
    text = """\
# TYPE lmdeploy:num_requests_running gauge
lmdeploy:num_requests_running{engine="0",model_name="m"} 1.0
# TYPE some_other_server_metric gauge
some_other_server_metric 5.0
"""
    m = parse_metrics(text)
    assert m == ServerMetrics(running=1)
    assert m.mean_ttft is None and m.kv_cache_usage is None and m.generation_tokens_total is None
    assert parse_metrics("") == ServerMetrics()


def test_a_histogram_with_no_requests_has_no_mean() -> None:
    text = """\
# TYPE lmdeploy:time_to_first_token_seconds histogram
lmdeploy:time_to_first_token_seconds_bucket{le="+Inf"} 0.0
lmdeploy:time_to_first_token_seconds_count 0.0
lmdeploy:time_to_first_token_seconds_sum 0.0
"""
    m = parse_metrics(text)
    assert m.ttft_count == 0.0 and m.mean_ttft is None


@pytest.mark.parametrize(
    "text",
    [
        "<html><body><h1>404 Not Found</h1></body></html>",
        '{"detail":"Not Found"}',
        "Unauthorized",
        'lmdeploy:num_requests_running{engine="0" 1.0',
    ],
)
def test_text_that_is_not_prometheus_raises_a_sentence(text: str) -> None:
    with pytest.raises(MetricsError) as info:
        parse_metrics(text)
    assert isinstance(info.value, TuichatError)
    message = str(info.value)
    assert message.startswith("The server's /metrics answer is not Prometheus text")
    assert "LMDeploy server" in message and "Traceback" not in message


def test_ttft_between_two_scrapes_and_across_a_restart() -> None:
    before = ServerMetrics(ttft_sum=2.0, ttft_count=10.0)
    after = ServerMetrics(ttft_sum=3.0, ttft_count=12.0)
    assert after.ttft_since(before) == pytest.approx(0.5)
    restarted = ServerMetrics(ttft_sum=0.3, ttft_count=1.0)
    assert restarted.ttft_since(after) == pytest.approx(0.3)
    assert after.ttft_since(after) is None  # nothing finished in between
    assert after.ttft_since(ServerMetrics()) is None


# --- rates and history ---------------------------------------------------------------------------------


def test_rate_over_a_window() -> None:
    tracker = RateTracker()
    assert tracker.rate() is None
    tracker.add(0.0, 0.0)
    assert tracker.rate() is None  # one point is not a rate
    # a fast burst long ago, then a steady 100 tokens/s
    tracker.add(1.0, 10_000.0)
    for i in range(11):
        tracker.add(20.0 + i, 10_000.0 + 100.0 * i)
    assert tracker.rate(10) == pytest.approx(100.0)
    assert tracker.rate(60) == pytest.approx(11_000 / 30)


def test_rate_after_a_server_restart_is_not_negative() -> None:
    tracker = RateTracker()
    tracker.add(0.0, 5_000.0)
    tracker.add(2.0, 5_400.0)
    tracker.add(4.0, 100.0)  # restarted: counted from zero again
    tracker.add(6.0, 500.0)
    rate = tracker.rate(10)
    assert rate == pytest.approx((400 + 100 + 400) / 6)
    tracker.reset()
    assert tracker.rate() is None


def test_rate_ignores_a_point_from_the_past() -> None:
    tracker = RateTracker()
    tracker.add(10.0, 100.0)
    tracker.add(12.0, 300.0)
    tracker.add(11.0, 0.0)  # a late, stale scrape
    assert tracker.rate() == pytest.approx(100.0)


def test_history_is_bounded_and_windowed() -> None:
    history = History(maxlen=5)
    assert history.values() == [] and history.latest is None
    for t in range(8):
        history.append(float(t), float(t * 10))
    assert len(history) == 5
    assert history.values() == [30.0, 40.0, 50.0, 60.0, 70.0]
    assert history.values(last_seconds=2) == [50.0, 60.0, 70.0]
    assert history.values(last_seconds=2, now=10.0) == []
    history.append(3.0, 999.0)  # late sample
    assert history.latest == 70.0


# --- one reply -----------------------------------------------------------------------------------------


def test_reply_stats_from_usage() -> None:
    stats = compute_reply_stats(
        request_start=100.0,
        first_token_at=100.25,
        end_at=105.25,
        completion_tokens=401,
        prompt_tokens=1200,
        cached_tokens=1024,
        chunk_count=130,
    )
    assert stats.ttft_s == pytest.approx(0.25)
    assert stats.decode_tokens_per_s == pytest.approx(80.0)  # 400 tokens after the first, in 5 s
    assert stats.total_s == pytest.approx(5.25)
    assert (stats.prompt_tokens, stats.completion_tokens, stats.cached_tokens) == (1200, 401, 1024)
    assert not stats.estimated
    assert format_reply_stats(stats) == "TTFT 0.25s · 80.0 tok/s · 401 tokens · 1,024 cached · 5.25s"


def test_reply_stats_without_usage_say_chunks_not_tokens() -> None:
    # 117 words in 39 chunks: calling them "~39 tokens" was wrong by a factor of three or more.
    stats = compute_reply_stats(0.0, 0.5, 2.5, None, None, None, chunk_count=21)
    assert stats.estimated and stats.completion_tokens is None and stats.chunks == 21
    assert stats.decode_tokens_per_s is None and stats.decode_chunks_per_s == pytest.approx(10.0)
    line = format_reply_stats(stats)
    assert line == "TTFT 0.50s · 10.0 chunks/s · 21 chunks · 2.50s"
    assert "token" not in line


def test_a_count_from_v1_encode_turns_chunk_figures_into_tokens() -> None:
    stats = with_token_count(compute_reply_stats(0.0, 0.5, 2.5, None, None, None, chunk_count=21), 61)
    assert stats.completion_tokens == 61 and stats.counted and not stats.estimated
    assert stats.decode_tokens_per_s == pytest.approx(30.0)  # 60 tokens after the first in 2 s
    assert format_reply_stats(stats) == "TTFT 0.50s · 30.0 tok/s · 61 tokens · 2.50s"


def test_saved_stats_read_back_including_rows_that_called_chunks_tokens() -> None:
    old_row = {
        "ttft_s": 0.5,
        "decode_tokens_per_s": 10.0,
        "total_s": 2.5,
        "completion_tokens": 21,
        "estimated": True,
        "chunks": 21,
    }
    stats = reply_stats_from_dict(old_row)
    assert stats is not None
    assert format_reply_stats(stats) == "TTFT 0.50s · 10.0 chunks/s · 21 chunks · 2.50s"
    new_row = {
        "ttft_s": 0.5,
        "decode_tokens_per_s": 30.0,
        "total_s": 2.5,
        "completion_tokens": 61,
        "estimated": False,
        "counted": True,
        "chunks": 21,
    }
    counted = reply_stats_from_dict(new_row)
    assert counted is not None and format_reply_stats(counted) == "TTFT 0.50s · 30.0 tok/s · 61 tokens · 2.50s"
    assert reply_stats_from_dict({"ttft_s": 0.5}) is None


@pytest.mark.parametrize(
    ("info", "expected"),
    [
        ({"block_size": 64, "num_gpu_blocks": 1024}, 65536),
        ({"block_size": 64}, None),
        ({"block_size": 64, "num_gpu_blocks": 0}, None),
        ({"block_size": True, "num_gpu_blocks": 8}, None),
        (None, None),
    ],
)
def test_kv_capacity_in_tokens(info: dict[str, object] | None, expected: int | None) -> None:
    assert kv_capacity_tokens(info) == expected


@pytest.mark.parametrize(("tokens", "first", "end"), [(1, 1.0, 1.0), (0, None, 3.0), (5, 2.0, 2.0)])
def test_reply_stats_without_a_decode_speed(tokens: int, first: float | None, end: float) -> None:
    stats = compute_reply_stats(0.0, first, end, tokens, 10, 0, chunk_count=tokens)
    assert stats.decode_tokens_per_s is None
    assert stats.ttft_s == first
    assert stats.total_s == end


# --- the context meter ---------------------------------------------------------------------------------


def test_parse_context_length_error() -> None:
    message = "Input length (45016) must be smaller than the model context length (8192)."
    assert parse_context_length(message) == (45016, 8192)
    assert parse_context_length(f'{{"message": "{message}", "code": 400}}') == (45016, 8192)
    assert parse_context_length("The model 'x' does not exist.") is None


def test_estimate_tokens_is_a_quarter_of_the_characters_rounded_up() -> None:
    assert [estimate_tokens(t) for t in ("", "abcd", "abcde", "x" * 4096)] == [0, 1, 2, 1024]


def test_context_meter_warns_near_the_limit() -> None:
    meter = ContextMeter(session_len=4096)
    meter.record_usage(prompt_tokens=3000, completion_tokens=500)
    assert meter.fraction == pytest.approx(3500 / 4096)
    assert meter.warning() is None
    meter.record_usage(prompt_tokens=3400, completion_tokens=500)
    assert meter.warning() == (
        "context 3,900 / 4,096 tokens: the next message may not fit; start a new chat or raise session_len"
    )
    meter.record_usage(prompt_tokens=4000, completion_tokens=96)
    assert meter.fraction == 1.0
    assert meter.warning() == "context full (4,096 / 4,096 tokens): start a new chat or raise session_len"
    meter.reset()
    assert meter.used == 0 and meter.warning() is None


def test_context_meter_overflow_check_counts_the_reply_reserve() -> None:
    meter = ContextMeter(session_len=8192)
    meter.record_usage(6000, 1000)
    assert not meter.would_overflow(1000)
    assert meter.would_overflow(1000, reserve=512)
    assert meter.would_overflow(1192)  # the input must be strictly smaller than the context length


def test_context_meter_with_an_estimate_and_an_unknown_session_len() -> None:
    meter = ContextMeter(session_len=None)
    meter.estimate_from(["x" * 4000, "y" * 3600])
    assert meter.used == 1900 and not meter.exact
    assert meter.fraction is None and meter.warning() is None
    assert not meter.would_overflow(10**9)

    assert not meter.learn_from_error("The model 'x' does not exist.")
    assert meter.learn_from_error("Input length (2100) must be smaller than the model context length (2048).")
    assert meter.session_len == 2048 and meter.used == 1900
    assert meter.warning() == (
        "context ~1,900 / 2,048 tokens: the next message may not fit; start a new chat or raise session_len"
    )


# --- the status line -----------------------------------------------------------------------------------


def test_status_line_example() -> None:
    m = ServerMetrics(kv_cache_usage=0.42, running=2, waiting=0, ttft_sum=2.1, ttft_count=10)
    assert summarize_for_status(m, 312.4) == "KV 42% · run 2 · wait 0 · 312 tok/s · TTFT 0.21s"
    assert summarize_for_status(m, 312.4, ttft=1.5).endswith("TTFT 1.50s")


def test_status_line_fits_80_columns_with_large_numbers() -> None:
    m = ServerMetrics(
        kv_cache_usage=1.0,
        running=1024,
        waiting=123_456,
        prefix_cache_hit_rate=0.875,
        ttft_sum=12_345.0,
        ttft_count=10,
        failed=99_999,
    )
    line = summarize_for_status(m, 123_456.7)
    assert len(line) <= 80
    assert line.startswith("KV 100% · run 1024 · wait 123456 · 123457 tok/s · TTFT 1234s")
    narrow = summarize_for_status(m, 5.25, width=30)
    assert narrow == "KV 100% · run 1024"


def test_status_line_with_nothing_to_show() -> None:
    assert summarize_for_status(None, None) == "server metrics unavailable"
    assert summarize_for_status(ServerMetrics(), None) == "no server metrics yet"
    assert summarize_for_status(ServerMetrics(running=0), 8.25) == "run 0 · 8.2 tok/s"


def _reference_reading(text: str) -> dict[str, float]:
    """Sums of the lmdeploy samples as prometheus_client's own parser reads them (the scanner must agree)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("lmdeploy:") and math.isfinite(sample.value):
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def test_the_scanner_reads_the_standin_s_lmdeploy_0_18_metrics_as_prometheus_client_does() -> None:
    import httpx
    from standin.harness import run_standin

    with run_standin("--fake-rate", "2000") as server:
        headers = server.headers
        body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "stream": False}
        httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=10)
        text = httpx.get(f"{server.url}/metrics", headers=headers, timeout=10).text
    reference = _reference_reading(text)
    assert reference.get("lmdeploy:generation_tokens_total", 0) > 0  # a reply was counted: the figures are real
    m = parse_metrics(text)
    assert m.generation_tokens_total == reference["lmdeploy:generation_tokens_total"]
    assert m.prompt_tokens_total == reference["lmdeploy:prompt_tokens_total"]
    assert m.succeeded == round(reference["lmdeploy:num_requests_succeeded"]) >= 1
    assert m.ttft_count == reference["lmdeploy:time_to_first_token_seconds_count"]
    assert m.ttft_sum == reference["lmdeploy:time_to_first_token_seconds_sum"]
    assert m.kv_cache_usage == reference["lmdeploy:gpu_cache_usage_perc"]


def test_label_values_with_braces_quotes_and_timestamps_are_read() -> None:
    text = (
        'lmdeploy:num_requests_running{engine="0",model_name="a}b,\\"c\\""} 2.0 1712345678000\n'
        'lmdeploy:num_requests_running{engine="1",model_name="x y"} 3\n'
        "lmdeploy:gpu_cache_usage_perc 5e-1\n"
    )
    m = parse_metrics(text)
    assert (m.running, m.kv_cache_usage) == (5, 0.5)
    with pytest.raises(MetricsError):
        parse_metrics('lmdeploy:num_requests_running{engine="0"} two\n')
