"""The server panel driven with Pilot, against a real ServerManager that launches the stand-in lmdeploy.

Each test hosts the screen in a tiny app, starts servers through the keys a user presses, and waits for what a
user would see (state, progress, messages, log lines). The fixture stops every server a test left running, so
no stand-in process outlives its test.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from apphelpers import screen_text, wait_for
from fakegpu import FakeGpuReader
from standin.harness import STANDIN_COMMAND, free_port
from textual.app import App
from textual.pilot import Pilot
from textual.widgets import Input, Log, ProgressBar

from tuichat.config import Config, add_profile, load_config
from tuichat.server.gpu import GpuInfo
from tuichat.server.launcher import ServerManager, ServerStatus
from tuichat.server.procgroup import group_pids
from tuichat.ui.screens.dialogs import ChoiceScreen
from tuichat.ui.screens.profile_editor import ProfileEditorScreen
from tuichat.ui.screens.server import ServerAction, ServerScreen

GIB = 1 << 30
KEY = "sekrit-Key-0123456789abcdef"


class Host(App[None]):
    """Pushes the server panel and keeps what it dismissed with."""

    def __init__(self, screen: ServerScreen) -> None:
        super().__init__()
        self.panel = screen
        self.results: list[ServerAction | None] = []

    def on_mount(self) -> None:
        self.push_screen(self.panel, self.results.append)


@pytest.fixture
def manager(hermetic_home: Path) -> Iterator[ServerManager]:
    gpu = FakeGpuReader([GpuInfo(0, "Fake H200", "GPU-0", mem_used=2 * GIB, mem_total=140 * GIB)])
    mgr = ServerManager(gpu_reader=gpu)
    yield mgr
    for server in mgr.running():  # never leave a stand-in group behind, whatever the test did
        mgr.stop(server, timeout=1.0)
    mgr.close()


def standin_profile(name: str = "standin", *fake: str, **settings: Any) -> Config:
    """Save a profile that launches the stand-in (0.3 s load unless `fake` says otherwise); return the config."""
    table: dict[str, Any] = {
        "model": "internlm/internlm2-chat-1_8b",
        "backend": "pytorch",  # the stand-in then prints PyTorch's progress bars
        "command": list(STANDIN_COMMAND),
        "port": free_port(),
        "extra_args": list(fake) or ["--fake-load-seconds", "0.3"],
        "stop_timeout": 5,
        **settings,
    }
    add_profile(name, table)
    return load_config()


def panel(manager: ServerManager, config: Config, name: str = "standin") -> tuple[Host, ServerScreen]:
    screen = ServerScreen(manager, config, name, None)
    return Host(screen), screen


async def opened(pilot: Pilot[Any], screen: ServerScreen) -> None:
    await wait_for(pilot, lambda: pilot.app.screen is screen and screen.state == "stopped")


async def started(pilot: Pilot[Any], screen: ServerScreen) -> None:
    await opened(pilot, screen)
    await pilot.press("s")
    await wait_for(pilot, lambda: screen.state == "ready", timeout=20)


async def test_start_shows_progress_then_ready_with_url_and_pid(manager: ServerManager) -> None:
    config = standin_profile("standin", "--fake-load-seconds", "2")
    app, screen = panel(manager, config)
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot, screen)
        assert "stopped" in screen_text(app)
        await pilot.press("s")
        bar = screen.query_one(ProgressBar)
        await wait_for(pilot, lambda: "Loading weights" in screen_text(app) or "Warming up" in screen_text(app))
        assert screen.state == "starting" and bar.display
        assert "starting" in screen_text(app)
        await wait_for(pilot, lambda: screen.state == "ready", timeout=20)
        await wait_for(pilot, lambda: "a attaches the chat" in screen_text(app))
        server = screen.server
        assert server is not None
        text = screen_text(app)
        assert "ready" in text and server.url in text and f"pid {server.pid}" in text
        assert not bar.display
        # the log follows the file: uvicorn's start-up lines arrived, progress bars kept as one line each
        await wait_for(pilot, lambda: any("Uvicorn running" in line for line in screen.lines))
        weights = [line for line in screen.lines if "Loading weights" in line]
        assert len(weights) == 1 and "5/5" in weights[0]


async def test_stop_shows_stopping_and_leaves_no_process(manager: ServerManager) -> None:
    # a server that ignores SIGINT and SIGTERM: the stop takes a second and ends with SIGKILL
    config = standin_profile("standin", "--fake-load-seconds", "0.3", "--fake-ignore-signals", stop_timeout=1)
    app, screen = panel(manager, config)
    async with app.run_test(size=(100, 30)) as pilot:
        await started(pilot, screen)
        server = screen.server
        assert server is not None
        members = server.pids()
        assert len(members) >= 2  # the server and its engine
        await pilot.press("x")
        await wait_for(pilot, lambda: "stopping" in screen_text(app))
        await wait_for(pilot, lambda: screen.state == "stopped", timeout=15)
        assert group_pids(server.pgid) == set()
        assert manager.running() == []
        await wait_for(pilot, lambda: "stopped after SIGKILL" in screen_text(app))
        await pilot.press("x")  # nothing left to stop: says so
        await wait_for(pilot, lambda: "not running" in screen_text(app))


async def test_crash_while_loading_shows_failed_exit_code_and_the_oom_hint(manager: ServerManager) -> None:
    config = standin_profile("standin", "--fake-load-seconds", "0.3", "--fake-crash-while-loading")
    app, screen = panel(manager, config)
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot, screen)
        await pilot.press("s")
        await wait_for(pilot, lambda: screen.state == "failed", timeout=20)
        await wait_for(pilot, lambda: "failed · exit code 1" in screen_text(app))
        text = screen_text(app)
        assert "cache_max_entry_count" in text  # the hint for an out-of-memory crash
        assert "Traceback" not in text.split("log")[0]  # the server's traceback stays in its log view
        await wait_for(pilot, lambda: any("OutOfMemoryError" in line for line in screen.lines))
        assert manager.running() == []


async def test_a_failure_seen_before_the_log_shows_its_tail_once(manager: ServerManager) -> None:
    # a server that dies at once is often polled before the log's first read: the launcher's own tail stands
    # in for the log, and leaves the messages once the log view has the same lines
    config = standin_profile("standin")
    app, screen = panel(manager, config)
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot, screen)
        tail = ("Traceback (most recent call last):", "torch.OutOfMemoryError: CUDA out of memory.")
        screen._show_failure(ServerStatus("failed", None, "The server for standin exited with code 1.", 1, None, tail))
        await wait_for(pilot, lambda: "torch.OutOfMemoryError" in screen_text(app))
        assert ("info", tail[1]) in screen.messages
        log = manager.log_path("standin")
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("\n".join(tail) + "\n", encoding="utf-8")
        await wait_for(pilot, lambda: any("OutOfMemoryError" in line for line in screen.lines))
        await wait_for(pilot, lambda: screen_text(app).count("torch.OutOfMemoryError") == 1)
        assert screen.messages == [("error", "The server for standin exited with code 1.")]


async def test_busy_port_is_refused_before_anything_starts(manager: ServerManager) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        app, screen = panel(manager, standin_profile(port=port))
        async with app.run_test(size=(100, 30)) as pilot:
            await opened(pilot, screen)
            await pilot.press("s")
            await wait_for(pilot, lambda: f"Port {port}" in screen_text(app))
            assert "already in use" in screen_text(app)
            assert screen.state == "stopped" and screen.server is None
            assert manager.running() == []


async def test_restart_gives_a_new_server_process(manager: ServerManager) -> None:
    app, screen = panel(manager, standin_profile())
    async with app.run_test(size=(100, 30)) as pilot:
        await started(pilot, screen)
        first = screen.server
        assert first is not None
        await pilot.press("r")
        await wait_for(pilot, lambda: screen.server is not None and screen.server.pid != first.pid, timeout=20)
        await wait_for(pilot, lambda: screen.state == "ready", timeout=20)
        assert group_pids(first.pgid) == set()
        assert [s.pid for s in manager.running()] == [screen.server.pid]


async def test_switch_profile_shows_the_other_profile_and_its_server(manager: ServerManager) -> None:
    standin_profile("alpha")
    config = standin_profile("beta", model="owner/beta-model")
    app, screen = panel(manager, config, "alpha")
    async with app.run_test(size=(100, 30)) as pilot:
        await started(pilot, screen)
        alpha = screen.server
        assert alpha is not None
        await pilot.press("p")
        await wait_for(pilot, lambda: isinstance(app.screen, ChoiceScreen))
        choice = app.screen
        assert isinstance(choice, ChoiceScreen)
        choice.dismiss("beta")
        await wait_for(pilot, lambda: screen.profile_name == "beta" and screen.state == "stopped")
        text = screen_text(app)
        assert "owner/beta-model" in text and "alpha keeps running" in text
        assert alpha.is_alive()
        await pilot.press("p")
        await wait_for(pilot, lambda: isinstance(app.screen, ChoiceScreen))
        app.screen.dismiss("alpha")
        # the running server of alpha is found again
        await wait_for(pilot, lambda: screen.state == "ready" and screen.server is not None)
        assert screen.server is not None and screen.server.pid == alpha.pid


async def test_log_search_filters_lines_and_escape_clears_it(manager: ServerManager) -> None:
    config = standin_profile()
    log = manager.log_path("standin")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("INFO: first line\nWARNING: disk nearly full\nINFO: second line\n")
    app, screen = panel(manager, config)
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot, screen)
        view = screen.query_one(Log)
        await wait_for(pilot, lambda: view.line_count == 3)
        await pilot.press("slash")
        field = screen.query_one("#srv-search", Input)
        assert field.has_focus
        await pilot.press(*"info")
        await wait_for(pilot, lambda: view.line_count == 2)
        assert screen.shown_lines() == ["INFO: first line", "INFO: second line"]
        # the view follows the file: a new matching line shows up, a new other line does not
        with log.open("a") as fh:
            fh.write("INFO: third line\nERROR: not this one\n")
        await wait_for(pilot, lambda: view.line_count == 3)
        assert "not this one" not in screen_text(app)
        await pilot.press("escape")
        await wait_for(pilot, lambda: view.line_count == 5)
        assert not field.display
        assert app.results == []  # Esc cleared the search; it did not leave the panel


async def test_api_key_never_appears_on_screen(manager: ServerManager) -> None:
    app, screen = panel(manager, standin_profile(api_key=KEY))
    async with app.run_test(size=(120, 40)) as pilot:
        await started(pilot, screen)
        server = screen.server
        assert server is not None and server.api_key == KEY
        assert KEY not in screen_text(app)
        # a server that logs its command line (lmdeploy does, at debug level) must not leak the key
        with server.log_path.open("a") as fh:
            fh.write(f"args: serve api_server m --api-keys {KEY}\nkey again: {KEY}\n")
        await wait_for(pilot, lambda: any("key again" in line for line in screen.lines))
        await wait_for(pilot, lambda: "key again" in screen_text(app))
        assert all(KEY not in line for line in screen.lines)
        assert "--api-keys ********" in screen_text(app)
        assert KEY not in screen_text(app)
        await pilot.press("e")  # the profile editor shows the key as bullets only
        await wait_for(pilot, lambda: isinstance(app.screen, ProfileEditorScreen))
        await wait_for(pilot, lambda: "•" * 8 in screen_text(app))
        assert KEY not in screen_text(app)


async def test_attach_returns_the_ready_server(manager: ServerManager) -> None:
    app, screen = panel(manager, standin_profile())
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot, screen)
        await pilot.press("a")  # not running yet: says so and stays
        await wait_for(pilot, lambda: "not running" in screen_text(app))
        assert app.results == []
        await pilot.press("s")
        await wait_for(pilot, lambda: screen.state == "ready", timeout=20)
        server = screen.server
        await pilot.press("a")
        await wait_for(pilot, lambda: bool(app.results))
    assert app.results == [ServerAction("attach", "standin", server)]


async def test_escape_goes_back_with_the_current_profile_and_server(manager: ServerManager) -> None:
    app, screen = panel(manager, standin_profile())
    async with app.run_test(size=(100, 30)) as pilot:
        await started(pilot, screen)
        server = screen.server
        await pilot.press("escape")
        await wait_for(pilot, lambda: bool(app.results))
    assert app.results == [ServerAction("back", "standin", server)]


async def test_new_profile_from_the_panel_is_saved_and_shown(manager: ServerManager) -> None:
    app, screen = panel(manager, standin_profile())
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot, screen)
        await pilot.press("n")
        await wait_for(pilot, lambda: isinstance(app.screen, ProfileEditorScreen))
        editor = app.screen
        editor.query_one("#pe-name", Input).value = "fresh"
        editor.query_one("#pe-model", Input).value = "owner/fresh-model"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: app.screen is screen and screen.profile_name == "fresh")
        await wait_for(pilot, lambda: "owner/fresh-model" in screen_text(app))
        await pilot.press("escape")
        await wait_for(pilot, lambda: bool(app.results))
    result = app.results[0]
    assert result is not None and result.profile_name == "fresh" and result.config is not None
    assert "fresh" in load_config().profiles
