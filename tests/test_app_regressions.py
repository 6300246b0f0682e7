"""Regression tests for bugs a review found: nothing typed or received may be lost, and no state may stick."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from apphelpers import ScriptedServer, app_for, conversation_text, screen_text, wait_for
from standin.harness import run_standin

from tuichat.chat.store import Store, default_path
from tuichat.chat.target import resolve_target
from tuichat.config import load_config
from tuichat.ui.screens.dialogs import ConfirmScreen
from tuichat.ui.screens.history import ConversationsScreen
from tuichat.ui.widgets.message_list import MessageList
from tuichat.ui.widgets.prompt_area import PromptArea
from tuichat.ui.widgets.reply_message import ReplyMessage
from tuichat.ui.widgets.user_message import UserMessage


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
    arrived, answer = asyncio.Event(), asyncio.Event()

    async def held(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/chat/completions":
            arrived.set()
            await answer.wait()  # the failure comes only once the test has typed (a sleep raced it under load)
        return await handle(request)

    server.handle = held  # type: ignore[method-assign]
    app = app_for(server)
    async with app.run_test() as pilot:
        await type_and_send(pilot, "my long important question")
        await wait_for(pilot, arrived.is_set)
        assert app.streaming
        app.query_one(PromptArea).text = "next thought"  # the user keeps typing during the wait
        answer.set()
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
        await wait_for(pilot, lambda: any(t.role == "error" for t in app.chat.turns))
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
        await wait_for(pilot, lambda: isinstance(app.screen, ConversationsScreen))
        history = app.screen
        assert isinstance(history, ConversationsScreen)
        await wait_for(pilot, lambda: len(history.conversations) == 1)
        await pilot.press("d")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_for(pilot, lambda: app.screen is history and history.conversations == [])
        assert saved() == []  # really gone from the history, not only from the list
        await pilot.press("escape")
        await wait_for(pilot, lambda: len(app.chat) == 0)
        await type_and_send(pilot, "second, important")
        await wait_for(pilot, lambda: not app.streaming and len(app.chat) == 2)
    assert ("user", "done", "second, important") in saved()


def saved_chat(exchanges: int) -> int:
    """A saved chat of `exchanges` questions and answers, longer than what opening it mounts; its id."""
    store = Store.open(default_path())
    conv = store.create_conversation()
    for i in range(exchanges):
        store.add_message(conv, "user", f"msg {i}")
        store.add_message(conv, "assistant", f"ans {i}")
    store.close()
    return conv


async def test_ctrl_t_shows_earlier_messages_while_the_prompt_has_focus() -> None:
    app = app_for(ScriptedServer(), conversation_id=saved_chat(70))
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.hidden_turns > 0)
        before = app.hidden_turns
        assert isinstance(app.focused, PromptArea)
        await pilot.press("ctrl+t")
        await wait_for(pilot, lambda: app.hidden_turns < before)


async def test_ctrl_t_while_earlier_turns_are_still_loading_loads_them_in_turn() -> None:
    # Ctrl+T soon after a saved chat opened came while the opening's second part was still mounting, and both
    # mounted an "earlier messages" line: Textual refused the duplicate id and the app stopped. Two loads at once
    # now go one after the other.
    app = app_for(ScriptedServer(), conversation_id=saved_chat(70))
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.hidden_turns > 0)
        screen = app.chat_screen
        before = app.hidden_turns
        await asyncio.gather(screen.action_load_earlier(), screen.action_load_earlier())
        await pilot.pause()
        assert app.hidden_turns == max(0, before - 40)
        assert len(screen.query("#earlier")) == (1 if app.hidden_turns else 0)
        assert app.is_running


async def test_control_sequences_in_a_model_id_never_reach_the_screen() -> None:
    app = app_for(ScriptedServer("ok", models=("evil\x1b]0;pwned\x07model",)))
    async with app.run_test(size=(120, 30)) as pilot:
        await wait_for(pilot, lambda: app.model is not None)
        # the whole OSC sequence goes (its title text too), not only its ESC: the name shown is the rest
        assert app.model == "evilmodel"
        await wait_for(pilot, lambda: "evilmodel" in screen_text(app))
        assert "\x1b" not in screen_text(app) and "pwned" not in screen_text(app)


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
            await wait_for(pilot, lambda: not app.streaming)
    # the app leaves at once; what had arrived is in the history, marked interrupted (not stopped by the user)
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


def test_an_unknown_key_id_in_the_keymap_is_refused_with_file_key_and_fix(
    hermetic_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # [keys] is validated like every other table: tuichat says what is wrong before any screen opens.
    from tuichat.cli import main as cli

    hermetic_home.mkdir(parents=True, exist_ok=True)
    (hermetic_home / "config.toml").write_text('[keys]\nretyr = "f12"\n')
    assert cli.main(["--url", "http://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err
    assert "config.toml: keys.retyr: no action has this id; did you mean 'retry'?" in err
    assert "Traceback" not in err


# --- keys (issue 16: undo in tmux, fast keys, the key map) ---------------------------------------------------


async def test_alt_u_as_tmux_delivers_it_undoes_and_types_nothing() -> None:
    from textual import events

    server = ScriptedServer("reply")
    app = app_for(server)
    async with app.run_test() as pilot:
        await type_and_send(pilot, "first")
        await wait_for(pilot, lambda: not app.streaming and len(app.chat) == 2)
        prompt = app.query_one(PromptArea)
        prompt.text = "draft"
        prompt.move_cursor(prompt.document.end)
        app.post_message(events.Key("alt+u", "u"))  # Textual reports ESC u with the character "u"
        await wait_for(pilot, lambda: len(app.chat) == 0)
        assert prompt.text == "first\n\ndraft"  # the message came back ahead of the draft, no "u" typed
        # no ctrl or alt key types its letter either (these two are bound to nothing, so nothing else acts)
        app.post_message(events.Key("ctrl+b", "b"))
        app.post_message(events.Key("alt+x", "x"))
        app.post_message(events.Key("y", "y"))  # handled after them: once it is typed, they were handled
        await wait_for(pilot, lambda: "y" in prompt.text)
        assert prompt.text.replace("y", "", 1) == "first\n\ndraft"  # the y where the cursor is, and no b or x


async def test_keys_during_a_reply_are_refused_out_loud_and_never_typed() -> None:
    server = ScriptedServer("one two three four five six")
    server.delay, server.pieces = 0.3, 6
    app = app_for(server)
    async with app.run_test() as pilot:
        await type_and_send(pilot, "question")
        await wait_for(pilot, lambda: app.streaming)
        await pilot.press("ctrl+r", "f6", "alt+u", "ctrl+l", "ctrl+n", "enter")
        await wait_for(pilot, lambda: any("still streaming" in n.message for n in app._notifications))
        assert app.streaming and len(server.requests) == 1
        assert app.query_one(PromptArea).text == ""
        refusals = [n.message for n in app._notifications if "still streaming" in n.message]
        assert refusals[0] == "A reply is still streaming: Esc stops it, then retry."
        assert len(refusals) == len(set(refusals))  # each sentence once, not once per key press
        prompt = app.query_one(PromptArea)
        prompt.text = "next"
        prompt.move_cursor(prompt.document.end)
        await pilot.press("enter")  # Enter with text: refused too, the text stays
        await pilot.press("z")  # handled after Enter: once it is typed, Enter was handled
        await wait_for(pilot, lambda: prompt.text.endswith("z"))
        assert prompt.text == "nextz" and len(server.requests) == 1 and app.streaming


async def test_escape_then_retry_at_once_stops_and_regenerates() -> None:
    server = ScriptedServer("one two three four five six")
    server.delay, server.pieces = 0.2, 6
    app = app_for(server)
    async with app.run_test() as pilot:
        await type_and_send(pilot, "question")
        await wait_for(pilot, lambda: app.streaming and any(t.content for t in app.chat.turns[1:]))
        from textual import events

        app.post_message(events.Key("escape", "\x1b"))  # queued back to back, as ESC ^R arrive from tmux:
        app.post_message(events.Key("ctrl+r", "\x12"))  # the retry must not be lost behind the stop
        await wait_for(pilot, lambda: len(server.requests) == 2)
        server.delay = 0
        await wait_for(pilot, lambda: not app.streaming)
        assert conversation_text(app) == "user:done:question\nassistant:done:one two three four five six"


async def test_keys_typed_right_after_enter_or_ctrl_j_stay_in_order() -> None:
    from textual import events

    server = ScriptedServer("ok")
    app = app_for(server)
    async with app.run_test() as pilot:
        prompt = app.query_one(PromptArea)
        prompt.focus()
        for key, char in (("a", "a"), ("ctrl+j", "\n"), ("b", "b")):
            app.post_message(events.Key(key, char))  # queued at once, as a fast typist's keys arrive
        await wait_for(pilot, lambda: prompt.text == "a\nb")
        for key, char in (("enter", "\r"), ("c", "c")):
            app.post_message(events.Key(key, char))
        await wait_for(pilot, lambda: len(server.requests) == 1)
        await wait_for(pilot, lambda: not app.streaming)
        assert server.requests[0]["messages"][-1]["content"] == "a\nb"
        assert prompt.text == "c"  # typed after Enter: kept, not wiped with the sent text


async def test_a_bad_keymap_is_reported_and_the_default_keys_stay(hermetic_home: Path) -> None:
    from dataclasses import replace

    config = replace(load_config(), keys={"retry": "ctrl+q"})  # as a Config built without load_config's check
    app = app_for(ScriptedServer(), config=config)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: any("keys.retry" in n.message for n in app._notifications))
        message = next(n.message for n in app._notifications if "keys.retry" in n.message)
        assert "quit" in message and "default keys" in message
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: app._exit)


# --- the status line and the token figure --------------------------------------------------------------------


async def test_the_status_line_drops_waiting_for_first_token_once_a_reply_failed() -> None:
    server = ScriptedServer()
    good = json.dumps({"choices": [{"index": 0, "delta": {"content": "partial "}}], "usage": None})
    server.raw_events = [good, json.dumps({"error": {"message": "engine exploded"}}), "[DONE]"]
    app = app_for(server)
    async with app.run_test(size=(160, 30)) as pilot:
        await type_and_send(pilot, "hi")
        await wait_for(pilot, lambda: not app.streaming and any(t.role == "error" for t in app.chat.turns))
        line = app.query_one("#statusline")
        assert "waiting for first token" not in line.last  # type: ignore[attr-defined]
        assert line.last.startswith("cut off")  # type: ignore[attr-defined]
        assert "waiting for first token" not in screen_text(app)


def chunks_only(server: ScriptedServer, words: int) -> None:
    """Stream `words` words three to a chunk, with no usage chunk (as a server without include_usage does)."""
    text = [f"w{i} " for i in range(words)]
    pieces = ["".join(text[i : i + 3]) for i in range(0, words, 3)]
    events = [json.dumps({"choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]}) for p in pieces]
    events.append(json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    server.raw_events = [*events, "[DONE]"]


async def test_without_a_usage_chunk_the_figure_says_chunks_not_tokens() -> None:
    server = ScriptedServer()
    chunks_only(server, 117)  # /v1/encode answers 404 here: no count to be had
    app = app_for(server)
    async with app.run_test(size=(160, 30)) as pilot:
        await type_and_send(pilot, "hi")
        await wait_for(pilot, lambda: not app.streaming and len(app.chat) == 2)
        await wait_for(pilot, lambda: "39 chunks" in screen_text(app))
        assert "~39 tokens" not in screen_text(app) and "39 tokens" not in screen_text(app)


async def test_without_a_usage_chunk_v1_encode_gives_the_token_count() -> None:
    server = ScriptedServer()
    chunks_only(server, 117)
    handle = server.handle
    encoded: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/encode":
            text = json.loads(request.content)["input"]
            encoded.append(text)
            return httpx.Response(200, json={"input_ids": list(range(len(text.split()) * 2)), "length": 234})
        return await handle(request)

    server.handle = handler  # type: ignore[method-assign]
    app = app_for(server)
    async with app.run_test(size=(160, 30)) as pilot:
        await type_and_send(pilot, "hi")
        await wait_for(pilot, lambda: "234 tokens" in screen_text(app))
        assert encoded[-1] == app.chat.turns[1].content
        assert "234 tokens" in app.query_one("#statusline").last  # type: ignore[attr-defined]
    assert any(s == "assistant" for s, _, _ in saved())
    store = Store.open(default_path())
    conv = store.last_conversation()
    assert conv is not None
    stats = store.messages(conv.id)[-1].stats
    store.close()
    assert stats is not None and stats["completion_tokens"] == 234 and stats["counted"]


async def test_ctrl_t_shows_the_loaded_turns_even_if_parking_runs_first(monkeypatch: pytest.MonkeyPatch) -> None:
    # Seen in a tmux test under load: the list's parking pass ran after the loaded turns were laid out but before
    # the view moved to them, parked them (they were far above a view still at the bottom), and the view then
    # went to a widget no longer there: a blank spacer and turns from the middle of the chat. Here a parking
    # pass runs in exactly that gap.
    original = MessageList.mount_all
    park_first = {"on": False}

    async def mount_then_park(self: MessageList, widgets: Any, **kwargs: Any) -> None:
        await original(self, widgets, **kwargs)
        if park_first["on"]:
            shown = [w for w in widgets if isinstance(w, UserMessage | ReplyMessage)]
            for _ in range(200):  # until they are laid out
                if all(w.size.height for w in shown):
                    break
                await asyncio.sleep(0.01)
            self.housekeep()

    monkeypatch.setattr(MessageList, "mount_all", mount_then_park)
    app = app_for(ScriptedServer(), conversation_id=saved_chat(30))
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.hidden_turns > 0 and "ans 29" in screen_text(app))
        await pilot.pause()
        first_hidden = app.chat.turns[max(0, app.hidden_turns - 20)].content
        park_first["on"] = True
        await pilot.press("ctrl+t")
        await wait_for(pilot, lambda: first_hidden in screen_text(app))
