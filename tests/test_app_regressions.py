"""Regression tests for bugs a review found: nothing typed or received may be lost, and no state may stick."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from apphelpers import ScriptedServer, app_for, conversation_text, screen_text, wait_for
from standin.harness import run_standin

from tuichat.config import load_config
from tuichat.store import Store, default_path
from tuichat.target import resolve_target
from tuichat.ui.screens import ConfirmScreen
from tuichat.ui.widgets import PromptArea


async def type_and_send(pilot, text: str) -> None:  # type: ignore[no-untyped-def]
    prompt = pilot.app.query_one(PromptArea)
    prompt.focus()
    prompt.text = text
    await pilot.press("enter")


def saved() -> list[tuple[str, str, str]]:
    store = Store.open(default_path())
    rows = [(m.role, m.state, m.content) for c in store.list_conversations() for m in store.messages(c.id)]
    store.close()
    return rows


async def test_a_failed_send_comes_back_ahead_of_what_was_typed_since() -> None:
    server = ScriptedServer()
    server.status, server.error_body = 500, {"message": "boom"}
    handle = server.handle

    async def slow(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/chat/completions":
            await asyncio.sleep(0.3)
        return await handle(request)

    server.handle = slow  # type: ignore[method-assign]
    app = app_for(server)
    async with app.run_test() as pilot:
        await type_and_send(pilot, "my long important question")
        await wait_for(pilot, lambda: app.streaming)
        app.query_one(PromptArea).text = "next thought"  # the user keeps typing during the wait
        await wait_for(pilot, lambda: not app.streaming and any(t.role == "error" for t in app.chat.turns))
        assert app.query_one(PromptArea).text == "my long important question\n\nnext thought"
        assert "check its log" in app.chat.turns[-1].content.lower()
    assert saved() == []  # and no empty conversation is left in the history


async def test_retry_that_fails_keeps_the_old_reply() -> None:
    server = ScriptedServer("precious answer")
    app = app_for(server)
    async with app.run_test() as pilot:
        await type_and_send(pilot, "question")
        await wait_for(pilot, lambda: not app.streaming and len(app.chat) == 2)
        server.status, server.error_body = 503, {"message": "down"}
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: len(server.requests) == 2 and not app.streaming)
        await pilot.pause(0.05)
        assert conversation_text(app).startswith("user:done:question\nassistant:done:precious answer")
        assert "precious answer" in screen_text(app)
        assert app.query_one(PromptArea).text == ""  # the question stays in the chat, not back in the prompt
    assert ("assistant", "done", "precious answer") in saved()


async def test_escape_while_the_model_list_is_fetched_does_not_stick() -> None:
    server = ScriptedServer("ok")
    handle = server.handle
    slow = {"on": False}

    async def h(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(503, json={"message": "loading"})
        if request.url.path == "/v1/models" and slow["on"]:
            await asyncio.sleep(2)
        return await handle(request)

    server.handle = h  # type: ignore[method-assign]
    app = app_for(server)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.query_one("#statusline").state != "connecting")  # type: ignore[attr-defined]
        assert app.model is None
        slow["on"] = True
        await type_and_send(pilot, "hi")
        await wait_for(pilot, lambda: app.streaming)
        await pilot.press("escape")
        await wait_for(pilot, lambda: not app.streaming, timeout=3)
        slow["on"] = False
        await type_and_send(pilot, "again")
        await wait_for(pilot, lambda: len(server.requests) == 1)


async def test_deleting_the_open_chat_in_f4_starts_a_new_one_that_is_saved() -> None:
    app = app_for(ScriptedServer("ok"))
    async with app.run_test(size=(120, 40)) as pilot:
        await type_and_send(pilot, "first")
        await wait_for(pilot, lambda: not app.streaming and len(app.chat) == 2)
        await pilot.press("f4")
        await pilot.pause(0.3)
        await pilot.press("d")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await pilot.pause(0.2)
        await pilot.press("escape")
        await wait_for(pilot, lambda: len(app.chat) == 0)
        await type_and_send(pilot, "second, important")
        await wait_for(pilot, lambda: not app.streaming and len(app.chat) == 2)
    assert ("user", "done", "second, important") in saved()


async def test_ctrl_t_shows_earlier_messages_while_the_prompt_has_focus() -> None:
    store = Store.open(default_path())
    conv = store.create_conversation()
    for i in range(70):
        store.add_message(conv, "user", f"msg {i}")
        store.add_message(conv, "assistant", f"ans {i}")
    store.close()
    app = app_for(ScriptedServer(), conversation_id=conv)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.hidden_turns > 0)
        before = app.hidden_turns
        assert isinstance(app.focused, PromptArea)
        await pilot.press("ctrl+t")
        await wait_for(pilot, lambda: app.hidden_turns < before)


async def test_control_sequences_in_a_model_id_never_reach_the_screen() -> None:
    app = app_for(ScriptedServer("ok", models=("evil\x1b]0;pwned\x07model",)))
    async with app.run_test(size=(120, 30)) as pilot:
        await wait_for(pilot, lambda: app.model is not None)
        await pilot.pause(0.1)
        assert app.model == "evil]0;pwnedmodel" or "\x1b" not in (app.model or "")
        assert "\x1b" not in screen_text(app)


async def test_a_message_that_merely_starts_with_slash_image_is_sent() -> None:
    server = ScriptedServer("ok")
    app = app_for(server)
    async with app.run_test() as pilot:
        await type_and_send(pilot, "/images in markdown: how do I embed them?")
        await wait_for(pilot, lambda: len(server.requests) == 1)


async def test_a_failed_image_command_keeps_what_was_typed(tmp_path: Path) -> None:
    app = app_for(ScriptedServer())
    async with app.run_test() as pilot:
        await type_and_send(pilot, f"/image {tmp_path / 'nope.png'}")
        await wait_for(pilot, lambda: any("no image at" in n.message for n in app._notifications))
        assert app.query_one(PromptArea).text == f"/image {tmp_path / 'nope.png'}"


async def test_ssh_hangup_mid_reply_saves_it_as_interrupted() -> None:
    with run_standin("--fake-words", "2000", "--fake-rate", "50") as server:
        app = app_for(None, url=server.url, api_key=server.api_key)
        async with app.run_test() as pilot:
            await wait_for(pilot, lambda: app.model is not None)
            await type_and_send(pilot, "go")
            await wait_for(pilot, lambda: len(app.chat) == 2 and len(app.chat.turns[1].content) > 20)
            app._hangup()
            await pilot.pause(0.3)
    rows = saved()
    assert rows[-1][0] == "assistant" and rows[-1][1] == "interrupted" and rows[-1][2].startswith("w1 w2")


async def test_moving_the_chat_to_another_server_mid_reply_stops_it_cleanly() -> None:
    with run_standin("--fake-words", "2000", "--fake-rate", "50") as server:
        app = app_for(None, url=server.url, api_key=server.api_key)
        async with app.run_test() as pilot:
            await wait_for(pilot, lambda: app.model is not None)
            await type_and_send(pilot, "go")
            await wait_for(pilot, lambda: len(app.chat) == 2 and len(app.chat.turns[1].content) > 20)
            app.retarget(server.url, server.api_key, "tiny-chat")
            await wait_for(pilot, lambda: not app.streaming)
            assert app.chat.turns[1].state == "stopped"
            assert any("now talks to" in n.message for n in app._notifications)


def test_a_configured_key_is_not_sent_to_another_url(hermetic_home: Path) -> None:
    hermetic_home.mkdir(parents=True, exist_ok=True)
    (hermetic_home / "config.toml").write_text('[server]\nurl = "http://a:1"\napi_key = "key-for-a"\n')
    cfg = load_config()
    assert resolve_target(cfg, {}).api_key == "key-for-a"
    assert resolve_target(cfg, {}, url="http://b:2").api_key is None
    assert resolve_target(cfg, {"OPENAI_API_KEY": "sk-openai"}, url="http://b:2").api_key is None
    env = {"OPENAI_BASE_URL": "http://c:3/v1", "OPENAI_API_KEY": "sk-c"}
    assert resolve_target(cfg, env).api_key == "sk-c"
    assert resolve_target(cfg, {}, url="http://b:2", api_key="explicit").api_key == "explicit"


def test_a_port_out_of_range_is_a_clear_error() -> None:
    import pytest

    from tuichat.errors import TuichatError

    with pytest.raises(TuichatError, match="port 99999"):
        resolve_target(load_config(), {}, url="http://127.0.0.1:99999")


async def test_an_unknown_key_id_in_the_keymap_is_reported(hermetic_home: Path) -> None:
    hermetic_home.mkdir(parents=True, exist_ok=True)
    (hermetic_home / "config.toml").write_text('[keys]\nretyr = "f12"\n')
    app = app_for(ScriptedServer(), config=load_config())
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: any("keys.retyr" in n.message for n in app._notifications))
