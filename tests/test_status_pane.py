"""The status pane: GPU readings (ours vs others), LMDeploy /metrics, per-reply stats and the context meter."""

from __future__ import annotations

import json
import os

import httpx
from apphelpers import ScriptedServer, app_for, lmdeploy_metrics, screen_text, wait_for
from fakegpu import FakeGpuReader

from tuichat.server.gpu import GpuInfo, GpuProcess
from tuichat.ui.widgets.status_pane import StatusPane

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
        await wait_for(pilot, lambda: bool(app.query(StatusPane)))  # a hidden pane is mounted after the first frame
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


class BrokenReader(FakeGpuReader):
    """A reader that raises (as a broken NVML does) until `broken` is cleared."""

    broken = True

    def read(self):  # type: ignore[no-untyped-def]
        if self.broken:
            self.reads += 1
            raise RuntimeError("NVML exploded")
        return super().read()


async def test_a_failing_gpu_reading_shows_as_unavailable() -> None:
    good = two_gpus()
    reader = BrokenReader(good._gpus)
    app = app_for(ScriptedServer(), gpu_reader=reader, poll_interval=0.05)
    async with app.run_test(size=(180, 45)) as pilot:
        # the reader's exception becomes a sentence in the GPU section, with what it means for the user
        await wait_for(
            pilot, lambda: "GPU reading failed: NVML exploded" in (t := screen_text(app)) and "Chat still works" in t
        )
        assert "GPU0" not in screen_text(app)
        reader.broken = False  # the next reading works again: the GPUs come back without a restart
        await wait_for(pilot, lambda: "GPU0 H200" in (t := screen_text(app)) and "NVML exploded" not in t, timeout=5)


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


def flaky_metrics(server: ScriptedServer, answers: list[int]) -> list[tuple[str, str | None]]:
    """Make /metrics answer the statuses in `answers` first (401, 503, ...; the list may be filled later), then
    the real text. Call before the app is made. Returns (address, Authorization header) of each /metrics request."""
    handle = server.handle
    seen: list[tuple[str, str | None]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":
            seen.append((f"{request.url.host}:{request.url.port}", request.headers.get("authorization")))
            if answers:
                status = answers.pop(0)
                return httpx.Response(status, json={"error": "Unauthorized" if status == 401 else "down"})
        return await handle(request)

    server.handle = handler  # type: ignore[method-assign]
    return seen


async def test_one_failed_metrics_read_does_not_hide_the_figures_for_30_s() -> None:
    server = ScriptedServer()
    server.metrics = lmdeploy_metrics(kv=0.42)
    flaky_metrics(server, [503])
    app = app_for(server, gpu_reader=two_gpus(), poll_interval=0.1)
    async with app.run_test(size=(180, 45)) as pilot:
        await wait_for(pilot, lambda: "42%" in screen_text(app), timeout=3)  # the next poll, not 30 s later
        assert app.status_view.metrics_error is None


async def test_a_401_right_after_attaching_is_retried_quietly() -> None:
    server = ScriptedServer()
    server.metrics = lmdeploy_metrics(kv=0.37)
    answers: list[int] = []
    requests = flaky_metrics(server, answers)
    app = app_for(server, gpu_reader=two_gpus(), poll_interval=0.1)
    async with app.run_test(size=(180, 45)) as pilot:
        await wait_for(pilot, lambda: "37%" in screen_text(app))
        answers += [401, 401]
        app.retarget("http://127.0.0.1:23334", "new-key", "tiny-chat")  # what attaching to a launched server does
        seen: list[str] = []

        def figures_again() -> bool:
            seen.append(screen_text(app))
            return not answers and app.status_view.metrics is not None and "37%" in seen[-1]

        await wait_for(pilot, figures_again, timeout=3)
        assert not any("Unauthorized" in text or "API key" in text for text in seen)
        to_new = [auth for where, auth in requests if where == "127.0.0.1:23334"]
        assert len(to_new) >= 3 and all(auth == "Bearer new-key" for auth in to_new)  # always with its key


async def test_a_lasting_401_is_shown_with_what_to_do() -> None:
    server = ScriptedServer()
    flaky_metrics(server, [401] * 1000)
    app = app_for(server, gpu_reader=two_gpus(), poll_interval=0.1)
    async with app.run_test(size=(180, 45)) as pilot:
        await wait_for(pilot, lambda: "metrics unavailable" in (t := screen_text(app)) and "API key" in t)


async def test_kv_capacity_in_tokens_from_engine_info() -> None:
    server = ScriptedServer()
    server.metrics = lmdeploy_metrics(kv=0.25)
    handle = server.handle

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/distserve/engine_info":
            return httpx.Response(200, json=json.dumps({"block_size": 64, "num_gpu_blocks": 1024}))
        return await handle(request)

    server.handle = handler  # type: ignore[method-assign]
    app = app_for(server, gpu_reader=two_gpus(), poll_interval=0.1)
    async with app.run_test(size=(180, 45)) as pilot:
        await app._learn_engine()
        await wait_for(pilot, lambda: "~16,384 of 65,536" in screen_text(app))


async def test_the_fleet_section_lists_each_node_and_shows_a_dead_one_down() -> None:
    from textual.app import App, ComposeResult

    from tuichat.server.fleet import FleetView, NodeView
    from tuichat.ui.status_view import StatusView

    class Host(App[None]):
        def compose(self) -> ComposeResult:
            yield StatusPane()

    app = Host()
    async with app.run_test(size=(70, 60)) as pilot:
        pane = app.query_one(StatusPane)
        pane.show(StatusView())
        await pilot.pause()
        assert "Fleet" not in screen_text(app)  # a plain server: no fleet section
        nodes = (
            NodeView("http://127.0.0.1:23333", "pair.n1", health="up", unfinished=2, latency=0.5, kv_cache_usage=0.4,
                     running=2, waiting=1),
            NodeView("http://127.0.0.1:23334", "pair.n2", health="down", note="process exited"),
        )  # fmt: skip
        pane.show(StatusView(fleet=FleetView("http://127.0.0.1:8000", "pair", nodes)))
        await pilot.pause()
        text = screen_text(app)
        assert "Fleet pair" in text and "1 of 2 nodes up" in text
        n1 = next(line for line in text.splitlines() if "n1" in line)
        n2 = next(line for line in text.splitlines() if "n2" in line)
        assert "up" in n1 and "2 unfin" in n1 and "40%" in n1 and "2r/1w" in n1
        assert "down" in n2 and "process exited" in n2
        # a node removed from the proxy disappears from the pane
        pane.show(StatusView(fleet=FleetView("http://127.0.0.1:8000", "pair", nodes[:1])))
        await pilot.pause()
        assert "n2" not in screen_text(app) and "1 of 1 nodes up" in screen_text(app)
