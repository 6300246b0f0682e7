"""The LMDeploy stand-in behaves as lmdeploy 0.18's api_server does (shapes, texts, processes), and its fault
switches do what the tests of tuichat rely on."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from standin.fake_lmdeploy import DEFAULT_REPLY, tokenize
from standin.harness import STANDIN_COMMAND, free_port, pid_alive, run_standin, wait_for

pytestmark = pytest.mark.slow

FAST = ("--fake-load-seconds", "0.05")


def body(content: str = "hello there", **extra: Any) -> dict[str, Any]:
    return {"model": "tiny-chat", "messages": [{"role": "user", "content": content}], **extra}


def events(resp: httpx.Response) -> list[str]:
    """The payloads of a stream's `data:` lines, in order."""
    return [line[len("data: ") :] for line in resp.iter_lines() if line.startswith("data: ")]


def stream_chat(s: Any, payload: dict[str, Any]) -> tuple[httpx.Response, list[str]]:
    with httpx.stream("POST", f"{s.url}/v1/chat/completions", headers=s.headers, json=payload, timeout=10) as r:
        return r, events(r)


def content_of(evts: list[str]) -> str:
    out = []
    for e in evts:
        try:
            data = json.loads(e)
        except ValueError:
            continue  # [DONE], or a line broken on purpose
        out.extend(c["delta"].get("content") or "" for c in data.get("choices", []))
    return "".join(out)


def metric_samples(text: str) -> dict[str, float]:
    """Sample name (plus `le` for buckets) -> value, for one engine."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name + (f"[{sample.labels['le']}]" if "le" in sample.labels else "")
            if sample.name == "lmdeploy:request_success_total":
                key += f"[{sample.labels['finished_reason']}]"
            out[key] = sample.value
    return out


# ---------------------------------------------------------------------------------------------- command line


def test_version_flags_print_the_lmdeploy_version() -> None:
    for flag in ("--version", "-v"):
        done = subprocess.run([*STANDIN_COMMAND, flag], capture_output=True, text=True, timeout=10)
        assert (done.returncode, done.stdout) == (0, "0.18.0\n")


@pytest.mark.parametrize("flag", ["--fake-reject-flag", "--enable-metrics"])
def test_unknown_flag_exits_2_like_argparse(flag: str) -> None:
    argv = [*STANDIN_COMMAND, "serve", "api_server", "m", "--server-port", str(free_port()), flag]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    assert done.returncode == 2
    assert f"lmdeploy: error: unrecognized arguments: {flag}" in done.stderr
    assert "HINT" not in done.stdout


def test_other_unknown_flags_are_accepted() -> None:
    with run_standin(*FAST, "--cache-max-entry-count", "0.1", "--enable-prefix-caching", "--some-new-flag", "x") as s:
        assert httpx.get(f"{s.url}/health").status_code == 200


# ------------------------------------------------------------------------------------------------- start-up


def test_pytorch_startup_output_and_access_log() -> None:
    with run_standin(*FAST) as s:
        httpx.get(f"{s.url}/v1/models", headers=s.headers)
        log = s.log_text()
    assert "\rLoading weights from safetensors:  40%|████      | 2/5 [" in log
    assert "\rWarming up prefill: 100%|██████████| 6/6 [" in log
    assert "\rWarming up decoding: 100%|██████████| 10/10 [" in log
    hint = (
        f"HINT:    Please open \x1b[93m\x1b[1mhttp://127.0.0.1:{s.port}\x1b[0m in a browser for detailed api usage!!!"
    )
    assert log.count(hint) == 3
    ordered = [
        "Warming up decoding: 100%",
        hint,
        f"INFO:     Started server process [{s.proc.pid}]",
        "INFO:     Waiting for application startup.",
        "INFO:     Application startup complete.",
        f"INFO:     Uvicorn running on http://127.0.0.1:{s.port} (Press CTRL+C to quit)",
        '- "GET /health HTTP/1.1" 200 OK',
        '- "GET /v1/models HTTP/1.1" 200 OK',
    ]
    positions = [log.find(t) for t in ordered]
    assert -1 not in positions and positions == sorted(positions), positions
    assert "INFO:     127.0.0.1:" in log


def test_turbomind_startup_and_health() -> None:
    with run_standin(*FAST, "--backend", "turbomind") as s:
        health = httpx.get(f"{s.url}/health").json()
        info = httpx.get(f"{s.url}/distserve/engine_info", headers=s.headers)
        log = s.log_text()
    assert health == {"status": "healthy", "message": "TurboMind engine is healthy."}
    assert info.status_code == 404
    assert "\rLoading:  50%|█████     | 12/24 [" in log
    assert "Warming up" not in log


def test_health_answers_503_while_loading_with_health_early() -> None:
    with run_standin("--fake-health-early", "--fake-load-seconds", "0.8", wait_ready=False) as s:

        def first_answer() -> httpx.Response | None:
            try:
                return httpx.get(f"{s.url}/health", timeout=2)
            except httpx.TransportError:
                return None

        early = wait_for(first_answer, message="the socket to open")
        assert early.status_code == 503
        assert early.json()["status"] != "healthy"
        wait_for(lambda: httpx.get(f"{s.url}/health").status_code == 200, message="healthy")
        assert httpx.get(f"{s.url}/health").json() == {"status": "healthy", "message": "PyTorch engine is healthy."}


def test_busy_port_is_noticed_after_loading_and_exits_1() -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with run_standin(*FAST, port=port, wait_ready=False) as s:
            assert s.wait_exit() == 1
            log = s.log_text()
    error = (
        f"ERROR:    [Errno 98] error while attempting to bind on address ('127.0.0.1', {port}): address already in use"
    )
    assert error in log
    assert log.index("Warming up decoding: 100%") < log.index(error)
    assert "Uvicorn running" not in log


def test_crash_while_loading_prints_a_traceback_and_exits_1() -> None:
    with run_standin(*FAST, "--fake-crash-while-loading", wait_ready=False) as s:
        assert s.wait_exit() == 1
        log = s.log_text()
        wait_for(lambda: not s.group_pids(), message="the engine to go")
    assert "Loading weights from safetensors: 100%" in log
    assert "Traceback (most recent call last):" in log
    assert log.rstrip().splitlines()[-1].startswith("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate")
    assert "Uvicorn running" not in log


def test_crash_while_loading_with_a_message() -> None:
    with run_standin(*FAST, "--fake-crash-while-loading", "RuntimeError: boom", wait_ready=False) as s:
        assert s.wait_exit() == 1
        assert s.log_text().rstrip().splitlines()[-1] == "RuntimeError: boom"


# ---------------------------------------------------------------------------------------------------- auth


def test_api_keys_guard_v1_and_metrics_but_not_health() -> None:
    with run_standin(*FAST) as s:
        missing = httpx.get(f"{s.url}/v1/models")
        wrong = httpx.get(f"{s.url}/v1/models", headers={"Authorization": "Bearer nope"})
        metrics = httpx.get(f"{s.url}/metrics")
        good = httpx.get(f"{s.url}/v1/models", headers=s.headers)
        health = httpx.get(f"{s.url}/health")
    flat = {"message": "Unauthorized.", "type": "authentication_error", "code": 401, "param": None, "object": "error"}
    assert (missing.status_code, missing.json()) == (401, flat)
    assert (wrong.status_code, wrong.json()) == (401, flat)
    assert metrics.status_code == 401
    assert good.status_code == 200
    assert good.json()["object"] == "list"
    assert [m["id"] for m in good.json()["data"]] == ["tiny-chat"]
    assert health.status_code == 200


def test_without_keys_everything_is_open_and_model_name_is_used() -> None:
    with run_standin(*FAST, "--model-name", "my-model", api_key=None, model="/models/x") as s:
        ids = [m["id"] for m in httpx.get(f"{s.url}/v1/models").json()["data"]]
        r = httpx.post(f"{s.url}/v1/chat/completions", json={**body(), "model": "my-model"})
    assert ids == ["my-model"]
    assert r.status_code == 200


# ---------------------------------------------------------------------------------------------------- chat


def test_stream_chunk_shapes_usage_and_done() -> None:
    with run_standin(*FAST, "--fake-rate", "2000") as s:
        r, evts = stream_chat(s, body("one two three", stream=True, stream_options={"include_usage": True}))
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["transfer-encoding"] == "chunked"
    assert evts[-1] == "[DONE]"
    chunks = [json.loads(e) for e in evts[:-1]]
    content, final = chunks[:-1], chunks[-1]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "tiny-chat" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert content[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["usage"] is None for c in content)
    assert [c["choices"][0].get("finish_reason") for c in content] == [None] * (len(content) - 1) + ["stop"]
    assert content_of(evts) == DEFAULT_REPLY
    # like real tokens, chunk boundaries fall inside words
    texts = [c["choices"][0]["delta"]["content"] for c in content]
    assert any(a[-1:].isalpha() and b[:1].isalpha() for a, b in itertools.pairwise(texts))
    n_tokens = len(tokenize(DEFAULT_REPLY))
    assert final["choices"] == []
    assert final["usage"] == {
        "prompt_tokens": 3 + 4,
        "total_tokens": 7 + n_tokens,
        "completion_tokens": n_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def test_stream_without_include_usage_has_no_usage_key_nor_usage_chunk() -> None:
    with run_standin(*FAST, "--fake-rate", "2000", "--fake-reply", "Hello, world!") as s:
        _, evts = stream_chat(s, body(stream=True))
    chunks = [json.loads(e) for e in evts[:-1]]
    assert all("usage" not in c and c["choices"] for c in chunks)
    assert content_of(evts) == "Hello, world!"


def test_non_streaming_reply() -> None:
    with run_standin(*FAST, "--fake-rate", "2000", "--fake-reply", "Héllo wörld") as s:
        r = httpx.post(f"{s.url}/v1/chat/completions", headers=s.headers, json=body("a b"))
    data = r.json()
    assert r.status_code == 200
    assert data["object"] == "chat.completion"
    assert data["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Héllo wörld",
        "reasoning_content": None,
        "tool_calls": None,
    }
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["usage"]["prompt_tokens"] == 6
    assert data["usage"]["completion_tokens"] == len(tokenize("Héllo wörld"))


def test_max_tokens_cuts_with_length_and_stop_strings_end_early() -> None:
    with run_standin(*FAST, "--fake-rate", "2000", "--fake-words", "50", "--fake-tokens-per-chunk", "2") as s:
        url, h = f"{s.url}/v1/chat/completions", s.headers
        cut = httpx.post(url, headers=h, json=body(max_tokens=5)).json()
        stopped = httpx.post(url, headers=h, json=body(stop=["w4", "w9"])).json()
        _, evts = stream_chat(s, body(stream=True, max_completion_tokens=3))
    assert cut["choices"][0]["message"]["content"] == "w1 w2 w3 w4 w5"
    assert cut["choices"][0]["finish_reason"] == "length"
    assert cut["usage"]["completion_tokens"] == 5
    assert stopped["choices"][0]["message"]["content"] == "w1 w2 w3 "
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert content_of(evts) == "w1 w2 w3"
    assert json.loads(evts[-2])["choices"][0]["finish_reason"] == "length"


def test_validation_errors_are_flat_bodies() -> None:
    cases: list[tuple[dict[str, Any], int, str]] = [
        (body(temperature=3), 400, "The temperature 3.0 must be in [0, 2]"),
        (body(top_p=0), 400, "The top_p 0.0 must be in (0, 1]."),
        (body(top_k=-1), 400, "The top_k -1 cannot be a negative integer."),
        (body(min_p=1.5), 400, "The min_p 1.5 must be in [0, 1]."),
        (body(max_tokens=0), 400, "The max_tokens 0 must be a positive integer."),
        ({"model": "tiny-chat", "messages": "hi"}, 400, "messages: Input should be a valid list"),
        ({**body(), "model": "gpt-4"}, 404, "The model 'gpt-4' does not exist."),
    ]
    with run_standin(*FAST) as s:
        for payload, status, message in cases:
            r = httpx.post(f"{s.url}/v1/chat/completions", headers=s.headers, json=payload)
            error_type = "not_found_error" if status == 404 else "invalid_request_error"
            expected = {"message": message, "type": error_type, "code": status, "param": None, "object": "error"}
            assert (r.status_code, r.json()) == (status, expected)
        unknown = httpx.get(f"{s.url}/v1/nothing", headers=s.headers)
        stats = s.stats()
    assert (unknown.status_code, unknown.json()) == (404, {"detail": "Not Found"})
    assert stats["requests"] == len(cases)
    assert stats["last_request"] == cases[-1][0]


def test_session_len_limits_the_prompt_and_the_reply() -> None:
    with run_standin(*FAST, "--session-len", "16", "--fake-words", "20") as s:
        url = f"{s.url}/v1/chat/completions"
        too_long = httpx.post(url, headers=s.headers, json=body(" ".join(["x"] * 12)))
        fits = httpx.post(url, headers=s.headers, json=body(" ".join(["x"] * 10))).json()
    assert too_long.status_code == 400
    assert too_long.json()["message"] == "Input length (16) must be smaller than the model context length (16)."
    assert fits["choices"][0]["message"]["content"] == "w1 w2"  # 16 - 14 tokens left for the reply
    assert fits["choices"][0]["finish_reason"] == "length"


def test_images_need_a_vision_model() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    message = {"role": "user", "content": [{"type": "text", "text": "what is it"}, image]}
    payload = {"model": "tiny-chat", "messages": [message]}
    with run_standin(*FAST) as s:
        text_only = httpx.post(f"{s.url}/v1/chat/completions", headers=s.headers, json=payload)
    with run_standin(*FAST, "--fake-vlm", "--fake-rate", "2000") as s:
        vlm = httpx.post(f"{s.url}/v1/chat/completions", headers=s.headers, json=payload)
    assert text_only.status_code == 400
    assert text_only.json()["message"] == "Multimodal input is not supported by this model."
    assert vlm.status_code == 200
    assert vlm.json()["usage"]["prompt_tokens"] == 3 + 4 + 256


def image_part(width: int, height: int, fmt: str = "PNG") -> dict[str, Any]:
    import base64
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 90)).save(out, format=fmt)
    url = f"data:image/{fmt.lower()};base64,{base64.b64encode(out.getvalue()).decode()}"
    return {"type": "image_url", "image_url": {"url": url}}


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "WEBP"])
def test_image_sizes_are_read_from_every_format_tuichat_sends(fmt: str) -> None:
    import base64

    from standin.fake_lmdeploy import image_dimensions

    url = image_part(1344, 672, fmt)["image_url"]["url"]
    assert image_dimensions(base64.b64decode(url.split(",", 1)[1])) == (1344, 672)


def test_a_qwen2_vl_standin_counts_image_tokens_by_size_like_lmdeploy() -> None:
    def ask(s: Any, *images: dict[str, Any]) -> httpx.Response:
        content = [{"type": "text", "text": "what is it"}, *images]
        payload = {"model": "tiny-chat", "messages": [{"role": "user", "content": content}], "max_tokens": 2}
        return httpx.post(f"{s.url}/v1/chat/completions", headers=s.headers, json=payload)

    with run_standin(*FAST, "--fake-vlm-max-pixels", str(1344 * 1344), "--session-len", "1024") as s:
        text = ask(s).json()["usage"]["prompt_tokens"]
        small = ask(s, image_part(448, 448)).json()["usage"]["prompt_tokens"]
        two = ask(s, image_part(112, 112), image_part(448, 448)).json()["usage"]["prompt_tokens"]
        big = ask(s, image_part(896, 896))
        broken = ask(s, {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}})
    assert small - text == 16 * 16 + 2  # as lmdeploy 0.18 counted it on the H200 (277 with a 19-token text)
    assert two - text == (4 * 4 + 2) + (16 * 16 + 2)
    assert big.status_code == 400
    assert big.json()["message"] == (
        f"Input length ({text + 1026}) must be smaller than the model context length (1024)."
    )
    assert broken.status_code == 400 and "Failed to load an image" in broken.json()["message"]


def test_encode_counts_like_the_chat_prompt() -> None:
    with run_standin(*FAST, "--fake-rate", "2000") as s:
        one = httpx.post(f"{s.url}/v1/encode", headers=s.headers, json={"input": "how many tokens here"}).json()
        many = httpx.post(f"{s.url}/v1/encode", headers=s.headers, json={"input": ["a b", "c"]}).json()
        chat = httpx.post(f"{s.url}/v1/chat/completions", headers=s.headers, json=body("how many tokens here"))
    assert one["length"] == len(one["input_ids"]) == 4
    assert all(isinstance(i, int) for i in one["input_ids"])
    assert many["length"] == [2, 1]
    assert chat.json()["usage"]["prompt_tokens"] == one["length"] + 4


def test_engine_info_is_a_json_string_of_json() -> None:
    with run_standin(*FAST, "--cache-block-seq-len", "32") as s:
        raw = httpx.get(f"{s.url}/distserve/engine_info", headers=s.headers).json()
    assert isinstance(raw, str)
    info = json.loads(raw)
    assert info["block_size"] == 32
    assert info["num_gpu_blocks"] > 0


# ---------------------------------------------------------------------------------------------------- faults


def test_die_after_resets_the_stream_and_takes_the_engine_along() -> None:
    with run_standin(*FAST, "--fake-die-after", "2") as s:
        engine = s.engine_pid()
        got: list[str] = []
        with (
            pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)),
            httpx.stream("POST", f"{s.url}/v1/chat/completions", headers=s.headers, json=body(stream=True)) as r,
        ):
            got.extend(line for line in r.iter_lines() if line.startswith("data: "))
        assert s.wait_exit() == 1
        wait_for(lambda: not pid_alive(engine), message="the engine to die")
    assert len(got) == 2


def test_stall_after_keeps_the_connection_silent_until_the_client_leaves() -> None:
    with run_standin(*FAST, "--fake-stall-after", "2") as s:
        got: list[str] = []
        timeout = httpx.Timeout(5, read=0.5)
        with (
            pytest.raises(httpx.ReadTimeout),
            httpx.stream(
                "POST", f"{s.url}/v1/chat/completions", headers=s.headers, json=body(stream=True), timeout=timeout
            ) as r,
        ):
            got.extend(line for line in r.iter_lines() if line.startswith("data: "))
        assert len(got) == 2
        stats = wait_for(lambda: (st := s.stats())["aborted"] == 1 and st, message="the abort to count")
    assert stats["running"] == 0 and stats["completed"] == 0


def test_inband_error_after() -> None:
    with run_standin(*FAST, "--fake-inband-error-after", "2") as s:
        _, evts = stream_chat(s, body(stream=True))
        assert s.stats()["failed"] == 1
    assert len(evts) == 4
    assert evts[3] == "[DONE]"
    error = json.loads(evts[2])["error"]
    assert error["code"] == 500 and error["object"] == "error" and error["message"]


def test_malformed_after_sends_one_bad_line_then_continues() -> None:
    with run_standin(*FAST, "--fake-malformed-after", "2", "--fake-rate", "2000") as s:
        _, evts = stream_chat(s, body(stream=True))
    assert evts[2] == "{not json"
    assert evts[-1] == "[DONE]"
    assert content_of(evts) == DEFAULT_REPLY


def test_per_request_faults_and_reply() -> None:
    with run_standin(*FAST, "--fake-rate", "2000") as s:
        _, inband = stream_chat(s, body("x [[fault:inband=1]]", stream=True))
        _, malformed = stream_chat(s, body("x [[fault:malformed]]", stream=True))
        _, custom = stream_chat(s, body("x [[reply:Just this.]]", stream=True))
        _, normal = stream_chat(s, body("x", stream=True))
        bad = httpx.post(f"{s.url}/v1/chat/completions", headers=s.headers, json=body("[[fault:nope]]"))
        with (
            pytest.raises(httpx.ReadTimeout),
            httpx.stream(
                "POST",
                f"{s.url}/v1/chat/completions",
                headers=s.headers,
                json=body("[[fault:stall=0]]", stream=True),
                timeout=httpx.Timeout(5, read=0.3),
            ) as r,
        ):
            list(r.iter_lines())
        wait_for(lambda: s.stats()["aborted"] == 1, message="the stalled stream to count as aborted")
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            stream_chat(s, body("[[fault:die=1]]", stream=True))
        assert s.wait_exit() == 1
    assert "error" in json.loads(inband[1]) and len(inband) == 3
    assert malformed[2] == "{not json" and content_of(malformed) == DEFAULT_REPLY
    assert content_of(custom) == "Just this."
    assert content_of(normal) == DEFAULT_REPLY
    assert bad.status_code == 400


def test_client_disconnect_aborts_and_stops_generation() -> None:
    with run_standin(*FAST, "--fake-words", "3000", "--fake-rate", "20") as s:
        with httpx.stream("POST", f"{s.url}/v1/chat/completions", headers=s.headers, json=body(stream=True)) as r:
            lines = r.iter_lines()
            seen = 0
            while seen < 3:
                seen += next(lines).startswith("data: ")
        stats = wait_for(lambda: (st := s.stats())["aborted"] == 1 and st, message="the abort to count")
        assert stats["running"] == 0 and stats["completed"] == 0
        assert stats["generated_tokens"] < 60  # about 3 chunks of 3 tokens, not the 3000-word reply
        # the server is still fine for the next request
        s.configure(words=3)
        r2 = httpx.post(f"{s.url}/v1/chat/completions", headers=s.headers, json=body())
        assert r2.json()["choices"][0]["message"]["content"] == "w1 w2 w3"


def test_runtime_config_changes_later_replies() -> None:
    with run_standin(*FAST, "--fake-rate", "2000") as s:
        url = f"{s.url}/v1/chat/completions"

        def reply() -> str:
            return str(httpx.post(url, headers=s.headers, json=body()).json()["choices"][0]["message"]["content"])

        s.configure(words=4)
        assert reply() == "w1 w2 w3 w4"
        s.configure(reply="Configured.")
        assert reply() == "Configured."
        s.configure(reply=None)
        assert reply() == DEFAULT_REPLY
        s.configure(inband_error_after=0)
        assert httpx.post(url, headers=s.headers, json=body()).status_code == 500
        settings = s.configure(inband_error_after=None)
        assert settings["inband_error_after"] is None
        assert reply() == DEFAULT_REPLY
        assert s.stats()["completed"] == 4


# ------------------------------------------------------------------------------------------------- processes


def test_sigint_shuts_down_cleanly_and_stops_the_engine() -> None:
    with run_standin(*FAST) as s:
        engine = s.engine_pid()
        assert s.group_pids() == {s.proc.pid, engine}
        s.signal_group(signal.SIGINT)
        assert s.wait_exit() == 0
        wait_for(lambda: not s.group_pids(), message="the group to empty")
        log = s.log_text()
    lines = [
        "INFO:     Shutting down",
        "INFO:     Waiting for application shutdown.",
        "INFO:     Application shutdown complete.",
        f"INFO:     Finished server process [{s.proc.pid}]",
    ]
    positions = [log.find(line) for line in lines]
    assert -1 not in positions and positions == sorted(positions)


def test_sigint_waits_for_an_open_stream_to_finish() -> None:
    with run_standin(*FAST, "--fake-words", "300", "--fake-rate", "100") as s:
        with httpx.stream("POST", f"{s.url}/v1/chat/completions", headers=s.headers, json=body(stream=True)) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            os.kill(s.proc.pid, signal.SIGINT)
            s.wait_for_log("Waiting for connections to close. (CTRL+C to force quit)")
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert s.wait_exit() == 0


def test_sigkill_of_the_server_leaves_the_engine_alive() -> None:
    with run_standin(*FAST) as s:
        engine = s.engine_pid()
        os.kill(s.proc.pid, signal.SIGKILL)
        s.wait_exit()
        assert pid_alive(engine)
        assert s.group_pids() == {engine}
        os.kill(engine, signal.SIGKILL)
        wait_for(lambda: not pid_alive(engine), message="the engine to die")


def test_ignore_signals_leaves_only_sigkill() -> None:
    with run_standin(*FAST, "--fake-ignore-signals") as s:
        engine = s.engine_pid()
        s.signal_group(signal.SIGINT)
        s.signal_group(signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):
            s.wait_exit(timeout=0.5)
        assert httpx.get(f"{s.url}/health").status_code == 200
        assert pid_alive(engine)
        s.signal_group(signal.SIGKILL)
        assert s.wait_exit() == -signal.SIGKILL
        wait_for(lambda: not pid_alive(engine), message="the engine to die")


# ---------------------------------------------------------------------------------------------------- status


def test_metrics_names_counters_and_live_gauges() -> None:
    with run_standin(*FAST, "--fake-words", "100", "--fake-rate", "2000") as s:
        url = f"{s.url}/metrics"
        before = httpx.get(url, headers=s.headers)
        assert before.headers["content-type"].startswith("text/plain")
        names = {f.name for f in text_string_to_metric_families(before.text)}
        assert {
            "lmdeploy:gpu_cache_usage_perc",
            "lmdeploy:num_requests_running",
            "lmdeploy:num_requests_waiting",
            "lmdeploy:prefix_cache_hit_rate",
            "lmdeploy:prompt_tokens",
            "lmdeploy:generation_tokens",
            "lmdeploy:time_to_first_token_seconds",
            "lmdeploy:time_per_output_token_seconds",
            "lmdeploy:e2e_request_latency_seconds",
        } <= names
        assert 'lmdeploy:gpu_cache_usage_perc{engine="0",model_name="tiny-chat"}' in before.text
        assert metric_samples(before.text)["lmdeploy:gpu_cache_usage_perc"] == 0

        # a stream held open (stalled after one chunk) shows in the gauges until the client leaves
        held = body(" ".join(["word"] * 500) + " [[fault:stall=1]]", stream=True)
        with httpx.stream("POST", f"{s.url}/v1/chat/completions", headers=s.headers, json=held) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            during = metric_samples(httpx.get(url, headers=s.headers).text)
        wait_for(lambda: s.stats()["aborted"] == 1, message="the held stream to end")
        done = httpx.post(f"{s.url}/v1/chat/completions", headers=s.headers, json=body("a b c"))
        after = metric_samples(httpx.get(url, headers=s.headers).text)

    assert done.status_code == 200
    assert during["lmdeploy:num_requests_running"] == 1
    assert during["lmdeploy:gpu_cache_usage_perc"] > 0
    assert after["lmdeploy:num_requests_running"] == 0
    assert after["lmdeploy:gpu_cache_usage_perc"] == 0
    assert after["lmdeploy:prompt_tokens_total"] == (501 + 4) + (3 + 4)
    reply_tokens = len(tokenize(" ".join(f"w{i}" for i in range(1, 101))))
    assert after["lmdeploy:generation_tokens_total"] == 3 + reply_tokens  # one chunk of 3, then the full reply
    assert after["lmdeploy:time_to_first_token_seconds_count"] == 2
    assert after["lmdeploy:time_to_first_token_seconds_bucket[+Inf]"] == 2
    assert after["lmdeploy:time_to_first_token_seconds_sum"] > 0
    assert after["lmdeploy:request_success_total[stop]"] == 1
    assert after["lmdeploy:request_success_total[abort]"] == 1


def test_metrics_gauge_grows_with_prompt_length() -> None:
    with run_standin(*FAST, "--fake-words", "300", "--fake-rate", "50", "--fake-stats-interval", "0.05") as s:

        def usage_during(prompt_words: int) -> float:
            payload = body(" ".join(["word"] * prompt_words), stream=True)
            with httpx.stream("POST", f"{s.url}/v1/chat/completions", headers=s.headers, json=payload) as r:
                lines = r.iter_lines()  # kept: dropping a half-read iterator makes httpx close the stream
                next(line for line in lines if line.startswith("data: "))
                return metric_samples(httpx.get(f"{s.url}/metrics", headers=s.headers).text)[
                    "lmdeploy:gpu_cache_usage_perc"
                ]

        small, large = usage_during(10), usage_during(2000)
        log = s.wait_for_log("Avg thr (in/out):")
    assert 0 < small < large
    assert "DP0] Avg thr (in/out): " in log
    assert "Engine (running/waiting): " in log


def test_disable_metrics_gives_404() -> None:
    with run_standin(*FAST, "--disable-metrics") as s:
        r = httpx.get(f"{s.url}/metrics", headers=s.headers)
    assert (r.status_code, r.json()) == (404, {"detail": "Not Found"})
