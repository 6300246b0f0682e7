"""The status pane: GPU readings (ours vs others), LMDeploy /metrics, per-reply stats and the context meter."""

from __future__ import annotations

import os

from apphelpers import ScriptedServer, app_for, lmdeploy_metrics, screen_text, wait_for

from tuichat.gpu import FakeGpuReader, GpuInfo, GpuProcess
from tuichat.ui.status_pane import StatusPane

GB = 1000**3


def two_gpus() -> FakeGpuReader:
    me = os.getpid()
    return FakeGpuReader(
        [
            GpuInfo(
                0,
                "NVIDIA H200",
                "u0",
                55,
                40 * GB,
                143 * GB,
                61,
                350.0,
                700.0,
                (GpuProcess(me, 30 * GB), GpuProcess(999999, 8 * GB)),
            ),
            GpuInfo(1, "NVIDIA H200", "u1", 12, 31 * GB, 143 * GB, 44, 120.0, 700.0, (GpuProcess(me, 30 * GB),)),
        ]
    )


async def test_f3_shows_gpus_with_our_memory_apart_from_others() -> None:
    server = ScriptedServer()
    server.metrics = lmdeploy_metrics(kv=0.42)
    app = app_for(server, gpu_reader=two_gpus(), poll_interval=0.1)
    app.status_view.our_pids = {os.getpid()}
    async with app.run_test(size=(120, 40)) as pilot:
        assert not app.query_one(StatusPane).display
        await pilot.press("f3")
        assert app.query_one(StatusPane).display
        await wait_for(pilot, lambda: "GPU1" in (t := screen_text(app)) and "KV" in t and "prefix hit" in t)
        text = screen_text(app)
        assert "GPU0 H200" in text
        assert "ours 30.0 GB" in text and "others 10.0 GB" in text  # GPU0: 40 used, 30 ours
        assert "ours 30.0 GB · others 1.0 GB" in text  # GPU1, tensor parallel: ours on both
        assert "42%" in text
        assert "2 running · 1 waiting" in text
        assert "prefix hit" in text


async def test_no_gpu_and_no_metrics_say_so_and_chat_still_works() -> None:
    server = ScriptedServer("still here")
    server.metrics = None  # --disable-metrics: 404
    reader = FakeGpuReader(error="no NVIDIA GPU visible: NVML library not found (libnvidia-ml.so.1)")
    app = app_for(server, gpu_reader=reader, poll_interval=0.1)
    async with app.run_test(size=(180, 45)) as pilot:
        assert app.query_one(StatusPane).display  # very wide: shown by default
        await wait_for(pilot, lambda: "No NVIDIA GPU visible" in screen_text(app))
        # One condition: the pane redraws every poll, so two separate reads could straddle a redraw.
        await wait_for(pilot, lambda: "metrics unavailable" in (t := screen_text(app)) and "--disable-metrics" in t)
        prompt = app.query_one("#prompt")
        prompt.text = "hi"  # type: ignore[attr-defined]
        prompt.focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: not app.streaming and len(app.chat.turns) >= 2)
        assert app.chat.turns[-1].content == "still here"


async def test_generation_rate_comes_from_the_counter_and_kv_shows_in_the_status_line() -> None:
    server = ScriptedServer()
    server.metrics = lmdeploy_metrics(kv=0.5, generated=1000)
    app = app_for(server, gpu_reader=two_gpus(), poll_interval=0.05)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.status_view.metrics is not None)
        server.metrics = lmdeploy_metrics(kv=0.6, generated=1500)
        await wait_for(pilot, lambda: (app.status_view.gen_rate or 0) > 0)
        await wait_for(pilot, lambda: "KV 60%" in screen_text(app))
        assert app.status_view.kv_history[-1] == 60.0


async def test_a_failing_gpu_reading_shows_as_unavailable() -> None:
    reader = two_gpus()
    reader.fail_next(RuntimeError("NVML exploded"))
    app = app_for(ScriptedServer(), gpu_reader=reader, poll_interval=0.05)
    async with app.run_test(size=(180, 45)) as pilot:
        await wait_for(pilot, lambda: "GPU0" in screen_text(app), timeout=5)


async def test_reply_stats_and_context_meter_learn_from_usage_and_errors() -> None:
    server = ScriptedServer("a reply")
    app = app_for(server, gpu_reader=two_gpus(), poll_interval=5)
    async with app.run_test(size=(180, 45)) as pilot:
        prompt = app.query_one("#prompt")
        prompt.text = "hello"  # type: ignore[attr-defined]
        prompt.focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: not app.streaming and len(app.chat.turns) == 2)
        await wait_for(pilot, lambda: "prompt 12 · completion 4" in screen_text(app))
        meter = app.status_view.context
        assert meter is not None and meter.used == 16
        server.status = 400
        server.error_body = {
            "message": "Input length (45016) must be smaller than the model context length (40).",
            "object": "error",
            "code": 400,
        }
        prompt.text = "again"  # type: ignore[attr-defined]
        await pilot.press("enter")
        await wait_for(pilot, lambda: meter.session_len == 40)
        await wait_for(pilot, lambda: "context" in (t := screen_text(app)) and "16/40" in t)
