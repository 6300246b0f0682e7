"""SVG snapshots of the server panel and the profile editor at 80x24 and 120x40.

Only states that cannot depend on pids, ports or timing are pictured: a stopped profile with a fixed log, and
a failed start of a program that prints a fixed log and exits like an out-of-memory crash. The editor's inputs
have cursor blink off. Update the baselines with `pytest --snapshot-update tests/test_snapshots_server.py`
and look at the report before committing them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from apphelpers import settled, wait_for
from fakegpu import FakeGpuReader
from textual.app import App
from textual.pilot import Pilot
from textual.screen import Screen
from textual.widgets import Input

from tuichat.config import add_profile, load_config
from tuichat.server.gpu import GpuInfo
from tuichat.server.launcher import ServerManager
from tuichat.ui.screens.profile_editor import ProfileEditorScreen
from tuichat.ui.screens.server import ServerScreen

SIZES = [(80, 24), (120, 40)]
GIB = 1 << 30
LOG = """\
2026-01-01 10:00:00,000 - lmdeploy - INFO - builder.py:66 - matching vision model: None
2026-01-01 10:00:01,000 - lmdeploy - INFO - async_engine.py:270 - input backend=pytorch
Loading weights from safetensors: 100%|██████████| 5/5 [00:04<00:00,  1.21it/s]
HINT:    Please open http://127.0.0.1:23999 in a browser for detailed api usage!!!
INFO:     Started server process [4242]
INFO:     Uvicorn running on http://127.0.0.1:23999 (Press CTRL+C to quit)
INFO:     Shutting down
INFO:     Finished server process [4242]
"""
# A "server" that loads a little and dies like lmdeploy out of GPU memory: fixed output, exit code 1.
CRASH = (
    "import sys\n"
    "print('2026-01-01 10:00:00,000 - lmdeploy - INFO - input backend=pytorch', flush=True)\n"
    "print('Loading weights from safetensors: 100%|##########| 5/5 [00:04<00:00]', flush=True)\n"
    "sys.stderr.write('Traceback (most recent call last):\\n')\n"
    "sys.stderr.write('  File \"lmdeploy/pytorch/engine/cache_engine.py\", line 121\\n')\n"
    "sys.stderr.write('torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.\\n')\n"
    "sys.exit(1)\n"
)


class Host(App[None]):
    def __init__(self, make: Callable[[], Screen[Any]]) -> None:
        super().__init__()
        self.make = make

    def on_mount(self) -> None:
        self.push_screen(self.make())


@pytest.fixture
def manager(hermetic_home: Path) -> Iterator[ServerManager]:
    mgr = ServerManager(gpu_reader=FakeGpuReader([GpuInfo(0, "Fake H200", "GPU-0", 2 * GIB, 140 * GIB)]))
    yield mgr
    for server in mgr.running():
        mgr.stop(server, timeout=1.0)
    mgr.close()


def no_blink(pilot: Pilot[Any]) -> None:
    for field in pilot.app.screen.query(Input).results():
        field.cursor_blink = False


def server_app(manager: ServerManager, name: str) -> Host:
    return Host(lambda: ServerScreen(manager, load_config(), name, None))


async def stopped_ready(pilot: Pilot[Any]) -> None:
    screen = pilot.app.screen
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, ServerScreen))
    screen = pilot.app.screen
    assert isinstance(screen, ServerScreen)
    await wait_for(pilot, lambda: screen.state == "stopped" and len(screen.lines) == 8)
    await settled(pilot)


async def failed_ready(pilot: Pilot[Any]) -> None:
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, ServerScreen))
    screen = pilot.app.screen
    assert isinstance(screen, ServerScreen)
    await wait_for(pilot, lambda: screen.state == "stopped")
    await pilot.press("s")
    await wait_for(pilot, lambda: screen.state == "failed", timeout=20)
    await wait_for(pilot, lambda: any("OutOfMemoryError" in line for line in screen.lines))
    await settled(pilot)


async def editor_ready(pilot: Pilot[Any]) -> None:
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, ProfileEditorScreen))
    no_blink(pilot)
    await settled(pilot)


async def editor_error_ready(pilot: Pilot[Any]) -> None:
    await editor_ready(pilot)
    screen = pilot.app.screen
    assert isinstance(screen, ProfileEditorScreen)
    screen.query_one("#pe-tp", Input).value = "0"
    await pilot.press("ctrl+s")
    await wait_for(pilot, lambda: "tp" in screen.errors)
    await settled(pilot)


@pytest.mark.parametrize("size", SIZES)
def test_server_panel_stopped(snap_compare: Any, manager: ServerManager, size: tuple[int, int]) -> None:
    add_profile(
        "tutorial",
        {"model": "internlm/internlm2-chat-1_8b", "backend": "pytorch", "port": 23999, "session_len": 8192},
    )
    log = manager.log_path("tutorial")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(LOG, encoding="utf-8")
    assert snap_compare(server_app(manager, "tutorial"), terminal_size=size, run_before=stopped_ready)


@pytest.mark.parametrize("size", SIZES)
def test_server_panel_failed(snap_compare: Any, manager: ServerManager, size: tuple[int, int]) -> None:
    add_profile(
        "crashy",
        {
            "model": "internlm/internlm2-chat-1_8b",
            "backend": "pytorch",
            "cache_max_entry_count": 0.9,
            "command": [sys.executable, "-c", CRASH],
        },
    )
    assert snap_compare(server_app(manager, "crashy"), terminal_size=size, run_before=failed_ready)


@pytest.mark.parametrize("size", SIZES)
def test_profile_editor_new(snap_compare: Any, size: tuple[int, int]) -> None:
    app = Host(lambda: ProfileEditorScreen(load_config(), None))
    assert snap_compare(app, terminal_size=size, run_before=editor_ready)


def test_profile_editor_builtin_with_an_error(snap_compare: Any) -> None:
    app = Host(lambda: ProfileEditorScreen(load_config(), "internlm2-w4"))
    assert snap_compare(app, terminal_size=(80, 24), run_before=editor_error_ready)
