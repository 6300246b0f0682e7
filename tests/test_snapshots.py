"""SVG snapshots of the chat screen at 80x24 and 120x40: empty, mid-conversation, panes and modals.

Replies come from a saved conversation (fixed stats) rather than a live stream, so timings never change the
picture. Update with `pytest --snapshot-update tests/test_snapshots.py` after an intended change, and look at
the report before committing.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from apphelpers import ScriptedServer, app_for, lmdeploy_metrics, screen_text, settled, wait_for
from fakegpu import FakeGpuReader
from textual.pilot import Pilot

from tuichat.chat.store import Store, default_path
from tuichat.server.gpu import GpuInfo, GpuProcess
from tuichat.ui.app import TuichatApp
from tuichat.ui.screens.dialogs import HelpScreen

SIZES = [(80, 24), (120, 40)]
GB = 1000**3
REPLY = """Here is a **short** answer with a list:

- first point
- second point

```python
def greet(name: str) -> str:
    return f"hello {name}"
```
"""


def saved_conversation() -> int:
    store = Store.open(default_path())
    conv = store.create_conversation(model="tiny-chat", server_url="http://127.0.0.1:23333")
    store.add_message(conv, "user", "Write a greeting function in Python.")
    stats = {
        "ttft_s": 0.21,
        "decode_tokens_per_s": 95.3,
        "total_s": 1.4,
        "prompt_tokens": 24,
        "completion_tokens": 120,
        "cached_tokens": 0,
    }
    store.add_message(conv, "assistant", REPLY, stats=stats)
    store.add_message(conv, "user", "And a longer story, please.")
    msg = store.begin_reply(conv)
    store.finish_reply(msg, "Once upon a time there was a small model that", "stopped", stats=stats)
    store.close()
    return conv


def make(conversation: bool, **kwargs: Any) -> TuichatApp:
    conv = saved_conversation() if conversation else None
    kwargs.setdefault("watch_server", False)
    kwargs.setdefault("cursor_blink", False)
    return app_for(ScriptedServer(), conversation_id=conv, **kwargs)


async def settle(pilot: Pilot[Any]) -> None:
    app = pilot.app
    assert isinstance(app, TuichatApp)
    await wait_for(pilot, lambda: app.query_one("#statusline").state == "ready")  # type: ignore[attr-defined]
    await settled(pilot)


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "120x40"])
def test_empty_chat(snap_compare: Any, size: tuple[int, int]) -> None:
    assert snap_compare(make(False), terminal_size=size, run_before=settle)


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "120x40"])
def test_mid_conversation(snap_compare: Any, size: tuple[int, int]) -> None:
    async def before(pilot: Pilot[Any]) -> None:
        await settle(pilot)
        app = pilot.app
        assert isinstance(app, TuichatApp)
        await wait_for(pilot, lambda: len(app.chat) == 4)
        app.query_one("#prompt").text = "What about Rust?"  # type: ignore[attr-defined]
        await wait_for(pilot, lambda: "What about Rust?" in screen_text(app))
        await settled(pilot)

    assert snap_compare(make(True), terminal_size=size, run_before=before)


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "120x40"])
def test_help_screen(snap_compare: Any, size: tuple[int, int]) -> None:
    async def before(pilot: Pilot[Any]) -> None:
        await settle(pilot)
        await pilot.press("f1")
        await wait_for(pilot, lambda: isinstance(pilot.app.screen, HelpScreen))
        await settled(pilot)

    assert snap_compare(make(False), terminal_size=size, run_before=before)


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "120x40"])
def test_sampling_pane_with_a_refused_value(snap_compare: Any, size: tuple[int, int]) -> None:
    async def before(pilot: Pilot[Any]) -> None:
        await settle(pilot)
        app = pilot.app
        if not app.query("#sampling") or not app.query_one("#sampling").display:
            await pilot.press("f2")  # hidden below 140 columns (and mounted only a while after start-up)
            await wait_for(pilot, lambda: bool(app.query("#temperature")))
        app.query_one("#temperature").value = "3"  # type: ignore[attr-defined]
        app.query_one("#top_k").value = "40"  # type: ignore[attr-defined]
        await wait_for(pilot, lambda: "in [0, 2]" in screen_text(app))  # the refusal is shown
        await settled(pilot)

    assert snap_compare(make(False), terminal_size=size, run_before=before)


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "120x40"])
def test_status_pane(snap_compare: Any, size: tuple[int, int]) -> None:
    reader = FakeGpuReader(
        [
            GpuInfo(
                0, "NVIDIA H200", "u0", 55, 40 * GB, 143 * GB, 61, 350.0, 700.0, (GpuProcess(os.getpid(), 30 * GB),)
            ),
        ]
    )
    server = ScriptedServer()
    server.metrics = lmdeploy_metrics(kv=0.42)
    conv = saved_conversation()
    app = app_for(server, conversation_id=conv, gpu_reader=reader, poll_interval=3600, cursor_blink=False)
    app.status_view.our_pids = {os.getpid()}

    async def before(pilot: Pilot[Any]) -> None:
        await settle(pilot)
        await wait_for(pilot, lambda: app.status_view.metrics is not None and app.status_view.gpu is not None)
        await pilot.press("f3")
        await wait_for(pilot, lambda: app.query_one("#status").display)
        await settled(pilot)

    assert snap_compare(app, terminal_size=size, run_before=before)


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "120x40"])
def test_status_pane_without_gpu_or_metrics(snap_compare: Any, size: tuple[int, int]) -> None:
    reader = FakeGpuReader(error="no NVIDIA GPU visible: NVML library not found (libnvidia-ml.so.1)")
    server = ScriptedServer()  # metrics None: /metrics answers 404, as with --disable-metrics
    app = app_for(server, gpu_reader=reader, poll_interval=3600, cursor_blink=False)

    async def before(pilot: Pilot[Any]) -> None:
        await settle(pilot)
        await wait_for(pilot, lambda: app.status_view.metrics_error is not None and app.status_view.gpu is not None)
        await pilot.press("f3")
        await wait_for(pilot, lambda: app.query_one("#status").display)
        await settled(pilot)

    assert snap_compare(app, terminal_size=size, run_before=before)
