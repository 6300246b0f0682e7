"""The app driving a server it launches: `tuichat PROFILE` starts the stand-in through the real launcher,
chats with its random API key, re-attaches from a fresh app, and stops it (or keeps it) on quit."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from apphelpers import screen_text, wait_for
from fakegpu import FakeGpuReader
from standin.harness import STANDIN_COMMAND, free_port

from tuichat.config import add_profile, load_config
from tuichat.server.gpu import GpuInfo
from tuichat.server.launcher import ServerManager
from tuichat.server.procgroup import group_pids
from tuichat.ui.app import AppOptions, TuichatApp, make_app
from tuichat.ui.screens.dialogs import QuitScreen
from tuichat.ui.widgets.prompt_area import PromptArea
from tuichat.ui.widgets.status_line import StatusLine

GB = 1000**3


@pytest.fixture
def manager(hermetic_home: Path) -> Iterator[ServerManager]:
    add_profile(
        "fake",
        {
            "model": "org/tiny-chat",
            "command": STANDIN_COMMAND,
            "extra_args": ["--fake-load-seconds", "0.6", "--fake-reply", "Hi from the **stand-in**."],
            "session_len": 2048,
            "stop_timeout": 3,
            # A fixed free port: with "auto", tests running in parallel (each with its own state dir) could
            # both pick 23333 and one would reach the other's server.
            "port": free_port(),
        },
    )
    mgr = ServerManager(gpu_reader=FakeGpuReader([GpuInfo(0, "Fake H200", "u", mem_used=GB, mem_total=140 * GB)]))
    yield mgr
    for server in mgr.running():
        mgr.stop(server, timeout=1.0)
    mgr.close()


def managed_app(manager: ServerManager, profile: str | None = "fake") -> TuichatApp:
    return make_app(
        AppOptions(
            profile=profile,
            config=load_config(),
            manager=manager,
            env={},
            gpu_reader=FakeGpuReader([GpuInfo(0, "Fake H200", "u", mem_used=GB, mem_total=140 * GB)]),
            poll_interval=0.2,
        )
    )


async def chat_once(pilot, app: TuichatApp, text: str) -> None:  # type: ignore[no-untyped-def]
    before = len(app.chat)
    prompt = app.query_one(PromptArea)
    prompt.focus()
    prompt.text = text
    await pilot.press("enter")
    await wait_for(pilot, lambda: not app.streaming and len(app.chat) >= before + 2, timeout=15)


async def test_profile_is_launched_with_progress_then_chat_uses_its_key(
    manager: ServerManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    shown: list[tuple[str, str]] = []  # every (state, figures) the status line showed, in order
    set_line = StatusLine.set

    def recording(line: StatusLine, **parts: str | None) -> None:
        set_line(line, **parts)
        if line.id == "statusline" and (not shown or shown[-1] != (line.state, line.last)):
            shown.append((line.state, line.last))

    monkeypatch.setattr(StatusLine, "set", recording)
    app = managed_app(manager)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: app.query_one("#statusline").state == "ready", timeout=15)  # type: ignore[attr-defined]
        # the loading figures go once the server is ready (a stale "Warming up decoding 30%" stayed until a reply)
        assert "Warming up" not in app.query_one("#statusline").last  # type: ignore[attr-defined]
        # the launch showed its progress (the stand-in loads for 0.6 s) before the chat was ready
        ready = [state for state, _ in shown].index("ready")
        progress = [last for state, last in shown[:ready] if state == "starting" and last]
        assert progress, shown  # e.g. "loading the model", then "Loading weights from safetensors 80%"
        assert any(t.content.startswith("Starting fake (org/tiny-chat)") for t in app.chat.turns)
        server = app.server
        assert server is not None
        assert app.client.base_url == server.url
        assert app.client.api_key == server.api_key and server.api_key  # a fresh random key
        assert server.url.startswith("http://127.0.0.1:")
        await chat_once(pilot, app, "hello")
        assert app.chat.turns[-1].content == "Hi from the **stand-in**."
        assert server.api_key not in screen_text(app)
        assert app.status_view.launch["session_len"] == 2048
        assert app.status_view.context is not None and app.status_view.context.session_len == 2048
        # quit asks; k keeps the server running for the next tuichat
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: isinstance(app.screen, QuitScreen))
        await pilot.press("k")
    assert server.is_alive()

    # a new tuichat with no arguments re-attaches to it (the SSH-drop case)
    again = managed_app(ServerManager(gpu_reader=FakeGpuReader()), profile=None)
    assert again.options.managed and again.options.profile == "fake"
    async with again.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: again.query_one("#statusline").state == "ready", timeout=15)  # type: ignore[attr-defined]
        assert again.server is not None and again.server.pid == server.pid
        await chat_once(pilot, again, "still there?")
        assert again.chat.turns[-1].content == "Hi from the **stand-in**."
        pgid = again.server.pgid
        # quit and stop: nothing of the group is left
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: isinstance(again.screen, QuitScreen))
        await pilot.press("s")
        await wait_for(pilot, lambda: not group_pids(pgid), timeout=15)
    assert not group_pids(pgid)


async def test_a_crash_while_loading_shows_the_reason_in_the_chat(manager: ServerManager) -> None:
    add_profile(
        "crashy",
        {
            "model": "org/tiny-chat",
            "command": STANDIN_COMMAND,
            "extra_args": ["--fake-crash-while-loading"],
            "port": free_port(),
        },
    )
    app = make_app(
        AppOptions(profile="crashy", config=load_config(), manager=manager, env={}, gpu_reader=FakeGpuReader())
    )
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: any(t.role == "error" for t in app.chat.turns), timeout=15)
        text = "\n".join(t.content for t in app.chat.turns if t.role == "error")
        assert "exited with code 1" in text
        assert "out of memory" in text.lower()
        assert app.query_one("#statusline").state == "failed"  # type: ignore[attr-defined]
        assert "Traceback" not in screen_text(app)


async def test_the_app_launches_through_the_one_flow_with_one_preflight(
    manager: ServerManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    ports: list[int | None] = []
    preflight = manager.preflight

    def counted(profile, port=None):  # type: ignore[no-untyped-def]
        ports.append(port)
        return preflight(profile, port)

    monkeypatch.setattr(manager, "preflight", counted)
    app = managed_app(manager)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: app.query_one("#statusline").state == "ready", timeout=15)  # type: ignore[attr-defined]
        assert app.server is not None
        assert ports == [app.server.record.port]  # once, on the port the launch really took


async def test_a_launch_the_preflight_stops_says_each_finding_and_its_fix_in_the_chat(
    manager: ServerManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as hub:  # a hub that answers: only the silent download blocks the launch
        hub.bind(("127.0.0.1", 0))
        hub.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{hub.getsockname()[1]}")
        add_profile("unpulled", {"model": "owner/not-pulled", "command": STANDIN_COMMAND, "port": free_port()})
        app = make_app(
            AppOptions(profile="unpulled", config=load_config(), manager=manager, env={}, gpu_reader=FakeGpuReader())
        )
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_for(pilot, lambda: any(t.role == "error" for t in app.chat.turns), timeout=15)
            note = next(t.content for t in app.chat.turns if t.role == "error")
            assert note.startswith("unpulled was not started:")
            assert "owner/not-pulled is not in the Hugging Face cache" in note
            assert "Run `tuichat pull owner/not-pulled` in a shell first." in note
            assert "server panel (F5)" in note
            assert app.query_one("#statusline").state == "failed"  # type: ignore[attr-defined]
            assert "Traceback" not in screen_text(app)
    assert manager.running() == []


async def test_unknown_profile_is_a_clear_error(hermetic_home: Path) -> None:
    from tuichat.errors import TuichatError

    with pytest.raises(TuichatError, match="no profile called 'nope'"):
        make_app(AppOptions(profile="nope", config=load_config(), env={}))


async def test_on_quit_stop_is_remembered(manager: ServerManager) -> None:
    app = managed_app(manager)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: app.query_one("#statusline").state == "ready", timeout=15)  # type: ignore[attr-defined]
        assert app.server is not None
        pgid = app.server.pgid
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: isinstance(app.screen, QuitScreen))
        await pilot.press("S")
        await wait_for(pilot, lambda: not group_pids(pgid), timeout=15)
    assert load_config().ui.on_quit == "stop"


async def test_the_status_pane_counts_the_whole_server_group_as_ours(manager: ServerManager) -> None:
    app = managed_app(manager)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: app.query_one("#statusline").state == "ready", timeout=15)  # type: ignore[attr-defined]
        server = app.server
        assert server is not None
        await wait_for(pilot, lambda: len(app.status_view.our_pids) >= 2, timeout=5)  # server + engine child
        assert server.pid in app.status_view.our_pids
        assert app.status_view.launch["profile"] == "fake"


async def test_f5_opens_the_server_panel_and_attach_points_the_chat_at_it(manager: ServerManager) -> None:
    from tuichat.ui.screens.server import ServerScreen

    app = managed_app(manager)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: app.query_one("#statusline").state == "ready", timeout=15)  # type: ignore[attr-defined]
        await pilot.press("f5")
        await wait_for(pilot, lambda: isinstance(app.screen, ServerScreen))
        panel = app.screen
        assert isinstance(panel, ServerScreen)
        await wait_for(pilot, lambda: panel.status is not None and panel.status.state == "ready", timeout=10)
        assert "org/tiny-chat" in screen_text(app)
        await pilot.press("ctrl+r")  # the chat's retry key does nothing on the panel
        assert isinstance(app.screen, ServerScreen)
        await pilot.press("a")
        await wait_for(pilot, lambda: not isinstance(app.screen, ServerScreen))
        await wait_for(pilot, lambda: app.query_one("#statusline").state == "ready", timeout=10)  # type: ignore[attr-defined]
        await chat_once(pilot, app, "via the panel")
        assert app.chat.turns[-1].content == "Hi from the **stand-in**."


async def test_f9_lists_local_models_and_a_chosen_one_becomes_a_profile(
    hermetic_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from tuichat.ui.screens.models import ModelsScreen

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    model = tmp_path / "models" / "my-awq"
    model.mkdir(parents=True)
    (model / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["Qwen2ForCausalLM"],
                "hidden_size": 256,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "vocab_size": 1024,
                "torch_dtype": "float16",
                "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128},
            }
        )
    )
    hermetic_home.mkdir(parents=True, exist_ok=True)
    (hermetic_home / "config.toml").write_text(f'[models]\nroots = ["{model.parent}"]\n')
    from apphelpers import ScriptedServer, app_for

    app = app_for(ScriptedServer(), config=load_config(), gpu_reader=FakeGpuReader())
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("f9")
        await wait_for(pilot, lambda: isinstance(app.screen, ModelsScreen))
        await wait_for(pilot, lambda: "my-awq" in screen_text(app), timeout=10)
        screen = app.screen
        await pilot.press("p")
        await wait_for(pilot, lambda: screen.query_one("#mdl-name").has_focus)
        await pilot.press("enter")  # accept the suggested profile name
        await wait_for(pilot, lambda: not isinstance(app.screen, ModelsScreen), timeout=10)
        assert app.profile_name is not None
        name = app.profile_name
    profile = load_config().profiles[name]
    assert profile.model_format == "awq" and profile.model == str(model)


async def test_no_request_goes_out_without_the_profiles_key_and_the_pane_shows_kv_at_once(
    hermetic_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import httpx

    add_profile(
        "keyed",
        {
            "model": "org/tiny-chat",
            "command": STANDIN_COMMAND,
            "backend": "pytorch",  # the stand-in then serves /distserve/engine_info, as lmdeploy's PyTorch engine
            "api_key": "profile-key-0123456789",
            "extra_args": ["--fake-load-seconds", "0.3"],
            "stop_timeout": 3,
            "port": free_port(),
        },
    )
    sent: list[tuple[str, str | None]] = []
    original = httpx.AsyncClient.send

    async def recording(self: httpx.AsyncClient, request: httpx.Request, **kwargs: object) -> httpx.Response:
        sent.append((str(request.url), request.headers.get("authorization")))
        return await original(self, request, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(httpx.AsyncClient, "send", recording)
    reader = FakeGpuReader([GpuInfo(0, "Fake H200", "u", mem_used=GB, mem_total=140 * GB)])
    manager = ServerManager(gpu_reader=reader)
    app = make_app(
        AppOptions(profile="keyed", config=load_config(), manager=manager, env={}, gpu_reader=reader, poll_interval=0.2)
    )
    try:
        async with app.run_test(size=(200, 50)) as pilot:
            await wait_for(pilot, lambda: app.query_one("#statusline").state == "ready", timeout=15)  # type: ignore[attr-defined]
            server = app.server
            assert server is not None
            # the KV bar and its capacity well within one poll or two, not after a 30 s back-off
            await wait_for(pilot, lambda: "KV tokens" in (t := screen_text(app)) and "%" in t, timeout=5)
            assert "metrics unavailable" not in screen_text(app)
            await pilot.press("ctrl+q")
            await wait_for(pilot, lambda: isinstance(app.screen, QuitScreen))
            await pilot.press("s")
    finally:
        for running in manager.running():
            manager.stop(running, timeout=1.0)
        manager.close()
    assert sent
    for url, auth in sent:
        assert url.startswith(server.url), url  # nothing to an address guessed before the server was up
        assert auth == "Bearer profile-key-0123456789", (url, auth)
