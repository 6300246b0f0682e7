"""Pilot tests for every key action of the chat screen, against an in-process scripted server."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from apphelpers import ScriptedServer, app_for, conversation_text, screen_text, wait_for
from textual.widgets import Input

from tuichat.chat.store import Store, default_path
from tuichat.config import load_config
from tuichat.ui.screens.dialogs import ChoiceScreen, ConfirmScreen, HelpScreen
from tuichat.ui.widgets.prompt_area import PromptArea
from tuichat.ui.widgets.sampling_pane import SamplingPane


async def type_and_send(pilot, text: str) -> None:  # type: ignore[no-untyped-def]
    prompt = pilot.app.query_one(PromptArea)
    prompt.focus()
    prompt.text = text
    await pilot.press("enter")


async def test_enter_sends_and_the_reply_streams_in() -> None:
    server = ScriptedServer("Hello **world**, this is a reply.")
    app = app_for(server)
    async with app.run_test(size=(100, 30)) as pilot:
        await type_and_send(pilot, "hi there")
        await wait_for(pilot, lambda: not app.streaming and len(app.chat) == 2)
        await wait_for(pilot, lambda: "Hello world, this is a reply." in screen_text(app))
        assert conversation_text(app) == "user:done:hi there\nassistant:done:Hello **world**, this is a reply."
        text = screen_text(app)
        assert "hi there" in text
        assert "4 tokens" in text  # usage from the usage chunk, shown on the status line and under the reply
        assert app.query_one(PromptArea).text == ""
    body = server.requests[0]
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [{"role": "user", "content": "hi there"}]
    assert body["model"] == "tiny-chat"


async def test_whole_history_is_sent_every_turn_with_the_system_prompt(hermetic_home: Path) -> None:
    (hermetic_home).mkdir(parents=True, exist_ok=True)
    (hermetic_home / "config.toml").write_text('[sampling]\nsystem_prompt = "Be brief."\ntemperature = 0.2\n')
    server = ScriptedServer("ok")
    app = app_for(server, config=load_config())
    async with app.run_test() as pilot:
        await type_and_send(pilot, "one")
        await wait_for(pilot, lambda: len(server.requests) == 1 and not app.streaming)
        await type_and_send(pilot, "two")
        await wait_for(pilot, lambda: len(server.requests) == 2 and not app.streaming)
    assert server.requests[1]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "two"},
    ]
    assert server.requests[1]["temperature"] == 0.2


async def test_ctrl_j_inserts_a_newline_and_paste_never_sends() -> None:
    server = ScriptedServer()
    app = app_for(server)
    async with app.run_test() as pilot:
        prompt = app.query_one(PromptArea)
        prompt.focus()
        await pilot.press("a", "ctrl+j", "b")
        assert prompt.text == "a\nb"
        # a bracketed paste arrives as one Paste event: its newlines must not send
        from textual import events

        prompt.post_message(events.Paste("line 1\nline 2\n"))
        await wait_for(pilot, lambda: "line 1\nline 2" in prompt.text)
        assert server.requests == [] and not app.streaming
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(server.requests) == 1)
        await wait_for(pilot, lambda: not app.streaming)
        # one request, sent by Enter, carrying the typed lines and the pasted ones together
        assert len(server.requests) == 1
        sent = server.requests[0]["messages"][-1]["content"]
        assert sent.startswith("a\nb") and "line 1\nline 2" in sent


async def test_second_send_while_streaming_is_refused_with_a_message() -> None:
    server = ScriptedServer("slow " * 20)
    server.pieces = 20
    server.delay = 0.1
    app = app_for(server)
    async with app.run_test() as pilot:
        await type_and_send(pilot, "first")
        await wait_for(pilot, lambda: app.streaming)
        await type_and_send(pilot, "second")
        await wait_for(pilot, lambda: any("still streaming" in n.message for n in app._notifications))
        assert app.query_one(PromptArea).text == "second"  # what was typed is kept
        assert len(server.requests) == 1
        await pilot.press("escape")
        await wait_for(pilot, lambda: not app.streaming)


async def test_escape_stops_the_reply_keeps_the_partial_text_and_closes_the_stream() -> None:
    server = ScriptedServer("word " * 50)
    server.pieces = 50
    server.delay = 0.05
    app = app_for(server)
    async with app.run_test() as pilot:
        await type_and_send(pilot, "go")
        await wait_for(pilot, lambda: len(app.chat) == 2 and len(app.chat.turns[1].content) >= 10)
        await pilot.press("escape")
        await wait_for(pilot, lambda: not app.streaming)
        reply = app.chat.turns[1]
        assert reply.state == "stopped"
        assert 10 <= len(reply.content) < len("word " * 50)
        await wait_for(pilot, lambda: "stopped by you" in screen_text(app))
        await wait_for(pilot, lambda: server.closed_early == 1)
    # saved as stopped, with its partial text
    store = Store.open(default_path())
    conv = store.last_conversation()
    assert conv is not None
    saved = store.messages(conv.id)
    assert [m.role for m in saved] == ["user", "assistant"]
    assert saved[1].state == "stopped"
    assert saved[1].content == reply.content
    store.close()


async def test_retry_regenerates_the_last_reply_with_current_sampling() -> None:
    server = ScriptedServer("first answer")
    app = app_for(server)
    async with app.run_test(size=(120, 40)) as pilot:
        await type_and_send(pilot, "question")
        await wait_for(pilot, lambda: not app.streaming and len(app.chat) == 2)
        server.reply = "second answer"
        await wait_for(pilot, lambda: bool(app.query(SamplingPane)))  # hidden at 120 columns: mounted after start-up
        app.query_one(SamplingPane).set_value("temperature", "1.5")
        await wait_for(pilot, lambda: app.chat_screen.conversation.sampling.temperature == 1.5)
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: len(server.requests) == 2 and not app.streaming)
        await wait_for(pilot, lambda: "second answer" in screen_text(app))
        assert conversation_text(app) == "user:done:question\nassistant:done:second answer"
        assert "first answer" not in screen_text(app)
    assert server.requests[1]["messages"] == [{"role": "user", "content": "question"}]
    assert server.requests[1]["temperature"] == 1.5


async def test_undo_removes_the_last_exchange_and_gives_the_message_back() -> None:
    server = ScriptedServer("reply")
    app = app_for(server)
    async with app.run_test() as pilot:
        await type_and_send(pilot, "keep me")
        await wait_for(pilot, lambda: not app.streaming and len(app.chat) == 2)
        await type_and_send(pilot, "undo me")
        await wait_for(pilot, lambda: not app.streaming and len(app.chat) == 4)
        await pilot.press("f6")  # the undo key that reaches tuichat through tmux, screen and a bare xterm
        await wait_for(pilot, lambda: len(app.chat) == 2)
        assert conversation_text(app) == "user:done:keep me\nassistant:done:reply"
        assert app.query_one(PromptArea).text == "undo me"
        assert "undo me" not in screen_text(app).split("╭")[0]
    store = Store.open(default_path())
    conv = store.last_conversation()
    assert conv is not None
    assert [m.content for m in store.messages(conv.id)] == ["keep me", "reply"]
    store.close()


async def test_clear_asks_then_empties_the_chat() -> None:
    server = ScriptedServer("reply")
    app = app_for(server)
    async with app.run_test() as pilot:
        await type_and_send(pilot, "hello")
        await wait_for(pilot, lambda: not app.streaming and len(app.chat) == 2)
        await pilot.press("ctrl+l")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("n")
        await wait_for(pilot, lambda: not isinstance(app.screen, ConfirmScreen))
        assert len(app.chat) == 2 and "hello" in screen_text(app)
        await pilot.press("ctrl+l")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_for(pilot, lambda: len(app.chat) == 0)
        assert "hello" not in screen_text(app)


async def test_new_chat_starts_fresh_and_keeps_the_old_one_in_history() -> None:
    server = ScriptedServer("reply")
    app = app_for(server)
    async with app.run_test() as pilot:
        await type_and_send(pilot, "old chat")
        await wait_for(pilot, lambda: not app.streaming and len(app.chat) == 2)
        first_id = app.conversation_id
        await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: len(app.chat) == 0 and app.conversation_id is None)
        assert "old chat" not in screen_text(app)
        await type_and_send(pilot, "new chat")
        await wait_for(pilot, lambda: not app.streaming and len(app.chat) == 2)
        assert app.conversation_id != first_id
    assert server.requests[1]["messages"] == [{"role": "user", "content": "new chat"}]
    store = Store.open(default_path())
    titles = [c.title for c in store.list_conversations()]
    assert titles == ["new chat", "old chat"]
    store.close()


async def test_copy_last_reply_writes_osc52_wrapped_for_tmux() -> None:
    server = ScriptedServer("copy this text")
    app = app_for(server, env={"TMUX": "/tmp/tmux-0/default,1,0"})
    written: list[str] = []
    async with app.run_test() as pilot:
        assert app._driver is not None
        app._driver.write = written.append  # type: ignore[method-assign]
        await type_and_send(pilot, "hi")
        await wait_for(pilot, lambda: not app.streaming and len(app.chat) == 2)
        payload = base64.b64encode(b"copy this text").decode()
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: any(payload in w for w in written))
    assert app.last_copied == "copy this text"
    (osc,) = [w for w in written if payload in w]  # one write, once
    assert f"\x1bPtmux;\x1b\x1b]52;c;{payload}\x07\x1b\\" in osc  # passed through tmux, its ESC doubled


async def test_copy_code_cycles_through_code_blocks() -> None:
    server = ScriptedServer("one\n\n```python\nprint(1)\n```\n\ntwo\n\n```sh\nls -l\n```\n")
    app = app_for(server)
    async with app.run_test() as pilot:
        await type_and_send(pilot, "code please")
        await wait_for(pilot, lambda: not app.streaming and len(app.chat) == 2)
        await pilot.press("ctrl+g")
        assert app.last_copied == "print(1)"
        await pilot.press("ctrl+g")
        assert app.last_copied == "ls -l"
        await pilot.press("ctrl+g")
        assert app.last_copied == "print(1)"


async def test_f1_shows_every_binding_with_its_id() -> None:
    app = app_for(ScriptedServer())
    async with app.run_test(size=(100, 40)) as pilot:
        await pilot.press("f1")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen))
        text = screen_text(app)
        for expected in ("Stop the reply", "Regenerate", "Ctrl+R", "retry", "copy_reply", "Ctrl+J", "F6, Alt+U"):
            assert expected in text
        await pilot.press("escape")
        await wait_for(pilot, lambda: not isinstance(app.screen, HelpScreen))


async def test_out_of_range_sampling_is_refused_in_the_pane_and_never_sent(hermetic_home: Path) -> None:
    server = ScriptedServer("ok")
    app = app_for(server)
    async with app.run_test(size=(150, 40)) as pilot:
        pane = app.query_one(SamplingPane)
        assert pane.display  # wide terminal: shown by default
        temperature = pane.query_one("#temperature", Input)
        temperature.focus()
        await pilot.press("3")
        await wait_for(pilot, lambda: "in [0, 2]" in screen_text(app))
        await type_and_send(pilot, "hello")
        await wait_for(pilot, lambda: any("temperature" in n.message for n in app._notifications))
        assert server.requests == [] and not app.streaming
        temperature.value = "0.5"
        # the config save waits for typing to pause, then writes the file
        await wait_for(pilot, lambda: load_config().sampling.temperature == 0.5)
        await type_and_send(pilot, "hello")
        await wait_for(pilot, lambda: len(server.requests) == 1)
    assert server.requests[0]["temperature"] == 0.5
    assert load_config().sampling.temperature == 0.5  # persisted


async def test_f2_toggles_the_sampling_pane_at_80_columns() -> None:
    app = app_for(ScriptedServer())
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: bool(app.query(SamplingPane)))  # mounted after the first frame
        pane = app.query_one(SamplingPane)
        assert not pane.display  # narrow terminal: hidden by default
        await pilot.press("f2")
        assert pane.display
        assert isinstance(app.focused, Input)
        await pilot.press("f2")
        assert not pane.display
        assert isinstance(app.focused, PromptArea)


async def test_control_sequences_in_model_output_never_reach_the_terminal() -> None:
    evil = "safe \x1b]52;c;ZXZpbA==\x07text \x1b[2J\x1b[31mred\x1b[0m \x9b1;1H end\x07"
    server = ScriptedServer(evil)
    server.pieces = 7  # split sequences across chunks too
    app = app_for(server)
    async with app.run_test() as pilot:
        await type_and_send(pilot, "be evil")
        await wait_for(pilot, lambda: not app.streaming and len(app.chat) == 2)
        await wait_for(pilot, lambda: "safe text red" in screen_text(app))
        reply = app.chat.turns[1].content
        assert reply == "safe text red  end"
        text = screen_text(app)
        assert "\x1b" not in text and "\x9b" not in text


async def test_several_models_open_a_picker() -> None:
    server = ScriptedServer(models=("model-a", "model-b"))
    app = app_for(server)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, ChoiceScreen))
        await pilot.press("down", "enter")
        await wait_for(pilot, lambda: app.model == "model-b")
        await type_and_send(pilot, "hi")
        await wait_for(pilot, lambda: len(server.requests) == 1)
    assert server.requests[0]["model"] == "model-b"


async def test_api_key_never_appears_on_screen_or_in_screenshots() -> None:
    key = "sk-secret-key-123456"
    app = app_for(ScriptedServer("ok"), api_key=key)
    async with app.run_test(size=(120, 40)) as pilot:
        await type_and_send(pilot, "hi")
        await wait_for(pilot, lambda: not app.streaming and len(app.chat) == 2)
        await pilot.press("f1")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen))
        assert key not in screen_text(app)
        assert key not in app.export_screenshot()
        assert key not in repr(app.client)


@pytest.mark.parametrize(
    ("status", "body", "fragment"),
    [
        (401, {"message": "Unauthorized", "type": "error", "code": 401, "object": "error"}, "API key"),
        (
            404,
            {
                "message": "The model 'x' does not exist.",
                "type": "not_found_error",
                "code": 404,
                "object": "error",
            },
            "does not exist",
        ),
        (
            400,
            {
                "message": "Input length (45016) must be smaller than the model context length (8192).",
                "type": "invalid_request_error",
                "code": 400,
                "object": "error",
            },
            "Input length (45016) must be smaller than the model context length (8192)",
        ),
        (400, {"error": {"message": "The temperature 3.0 must be in [0, 2]"}}, "The temperature 3.0"),
        (503, {"message": "engine is sleeping", "code": 503, "object": "error"}, "not ready"),
    ],
)
async def test_http_errors_become_a_readable_line_and_the_prompt_is_kept(
    status: int, body: dict[str, object], fragment: str
) -> None:
    server = ScriptedServer()
    server.status = status
    server.error_body = body
    app = app_for(server)
    async with app.run_test(size=(120, 40)) as pilot:
        await type_and_send(pilot, "my precious prompt")
        await wait_for(pilot, lambda: not app.streaming and any(t.role == "error" for t in app.chat.turns))
        errors = [t.content for t in app.chat.turns if t.role == "error"]
        assert fragment in errors[-1]
        assert app.query_one(PromptArea).text == "my precious prompt"
        assert not any(t.role == "user" for t in app.chat.turns)
        assert "Traceback" not in screen_text(app)
        assert not app.streaming


async def test_in_band_error_and_malformed_chunk_are_reported() -> None:
    server = ScriptedServer()
    good = json.dumps({"choices": [{"index": 0, "delta": {"content": "partial "}}], "usage": None})
    server.raw_events = [
        good,
        "{not json",
        good,
        json.dumps({"error": {"message": "engine exploded"}}),
        "[DONE]",
    ]
    app = app_for(server)
    async with app.run_test(size=(120, 40)) as pilot:
        await type_and_send(pilot, "hi")
        await wait_for(pilot, lambda: not app.streaming and any(t.role == "error" for t in app.chat.turns))
        assert any("malformed chunk" in n.message for n in app._notifications)
        reply = app.chat.turns[1]
        assert reply.content == "partial partial "
        assert reply.state == "interrupted"
        assert "engine exploded" in app.chat.turns[-1].content


async def test_unreachable_server_is_reported_and_sending_later_works(hermetic_home: Path) -> None:
    from standin.harness import free_port

    port = free_port()
    app = app_for(None, url=f"http://127.0.0.1:{port}")
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: any(t.role == "error" for t in app.chat.turns))
        assert "cannot reach the server" in app.chat.turns[0].content
        assert "ssh -L" in app.chat.turns[0].content
        await type_and_send(pilot, "are you there?")
        await wait_for(pilot, lambda: sum(t.role == "error" for t in app.chat.turns) == 2)
        assert app.query_one(PromptArea).text == "are you there?"


def make_png(path: Path, size: tuple[int, int]) -> Path:
    from PIL import Image

    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path


async def test_image_command_attaches_downscales_and_sends_an_image_part(tmp_path: Path) -> None:
    big = make_png(tmp_path / "photo.png", (3000, 1500))
    server = ScriptedServer("a red picture")
    app = app_for(server)
    async with app.run_test(size=(120, 40)) as pilot:
        await type_and_send(pilot, f"/image {big}")
        await wait_for(pilot, lambda: len(app.pending_attachments) == 1)
        assert "photo.png 1344x672" in screen_text(app)
        await type_and_send(pilot, "what is this?")
        await wait_for(pilot, lambda: len(server.requests) == 1 and not app.streaming)
        assert app.pending_attachments == []
    content = server.requests[0]["messages"][0]["content"]
    assert content[0] == {"type": "text", "text": "what is this?"}
    assert content[1]["type"] == "image_url"
    assert content[1]["image_url"]["url"].startswith("data:image/jpeg;base64,")


async def test_unsupported_or_missing_image_gives_a_clear_message(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    app = app_for(ScriptedServer())
    async with app.run_test() as pilot:
        await type_and_send(pilot, f"/image {tmp_path / 'notes.txt'}")
        await wait_for(pilot, lambda: any("not a supported image" in n.message for n in app._notifications))
        await type_and_send(pilot, f"/image {tmp_path / 'missing.png'}")
        await wait_for(pilot, lambda: any("no image at" in n.message for n in app._notifications))
        assert app.pending_attachments == []


async def test_f8_picks_an_image_from_the_file_picker(tmp_path: Path) -> None:
    from tuichat.ui.screens.image_picker import ImagePickerScreen

    pic = make_png(tmp_path / "cat.png", (64, 48))
    app = app_for(ScriptedServer())
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("f8")
        await wait_for(pilot, lambda: isinstance(app.screen, ImagePickerScreen))
        field = app.screen.query_one(Input)
        field.value = str(pic)
        field.focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(app.pending_attachments) == 1)
        assert app.pending_attachments[0].name == "cat.png"


async def test_text_only_model_refusing_an_image_suggests_a_vlm_profile(tmp_path: Path) -> None:
    pic = make_png(tmp_path / "cat.png", (64, 48))
    server = ScriptedServer()
    server.status = 400
    server.error_body = {"message": "Multimodal input is not supported by this model.", "object": "error", "code": 400}
    app = app_for(server)
    async with app.run_test(size=(120, 40)) as pilot:
        await type_and_send(pilot, f"/image {pic}")
        await wait_for(pilot, lambda: len(app.pending_attachments) == 1)
        await type_and_send(pilot, "describe")
        await wait_for(pilot, lambda: any(t.role == "error" for t in app.chat.turns))
        assert "vision-language profile" in app.chat.turns[-1].content
        assert len(app.pending_attachments) == 1  # the image comes back with the prompt


async def test_f4_opens_a_saved_chat_and_continue_reopens_the_last() -> None:
    server = ScriptedServer("saved reply")
    app = app_for(server)
    async with app.run_test(size=(100, 30)) as pilot:
        await type_and_send(pilot, "remember me")
        await wait_for(pilot, lambda: not app.streaming and len(app.chat) == 2)
        await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: len(app.chat) == 0)
        await pilot.press("f4")
        from tuichat.ui.screens.history import ConversationsScreen

        await wait_for(pilot, lambda: isinstance(app.screen, ConversationsScreen))
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(app.chat) == 2)
        assert conversation_text(app) == "user:done:remember me\nassistant:done:saved reply"
        await type_and_send(pilot, "and more")
        await wait_for(pilot, lambda: not app.streaming and len(app.chat) == 4)
    # the follow-up went into the same conversation, with the whole history
    assert len(server.requests[-1]["messages"]) == 3

    again = app_for(ScriptedServer(), continue_last=True)
    async with again.run_test() as pilot:
        await wait_for(pilot, lambda: len(again.chat) == 4)
        assert again.chat.turns[0].content == "remember me"
        await wait_for(pilot, lambda: "and more" in screen_text(again))


async def test_ctrl_up_selects_an_earlier_message_and_ctrl_o_copies_it() -> None:
    server = ScriptedServer("the reply")
    app = app_for(server)
    async with app.run_test(size=(100, 30)) as pilot:
        await type_and_send(pilot, "my own words")
        await wait_for(pilot, lambda: not app.streaming and len(app.chat) == 2)
        await pilot.press("ctrl+up")  # the reply
        await pilot.press("ctrl+up")  # the user message
        await pilot.press("ctrl+o")
        assert app.last_copied == "my own words"
        await pilot.press("ctrl+down")
        await pilot.press("ctrl+o")
        assert app.last_copied == "the reply"
        await pilot.press("escape")  # unselects; ctrl+o is back to the last reply
        assert app.chat_screen.messages.selected_turn() is None


async def test_attached_images_can_be_removed_before_sending(tmp_path: Path) -> None:
    pic = make_png(tmp_path / "cat.png", (64, 48))
    server = ScriptedServer("ok")
    app = app_for(server)
    async with app.run_test(size=(100, 30)) as pilot:
        await type_and_send(pilot, f"/image {pic}")
        await wait_for(pilot, lambda: len(app.pending_attachments) == 1)
        await pilot.press("shift+f8")
        assert app.pending_attachments == []
        await type_and_send(pilot, f"/image {pic}")
        await wait_for(pilot, lambda: len(app.pending_attachments) == 1)
        await type_and_send(pilot, "/image clear")
        assert app.pending_attachments == []
        await type_and_send(pilot, "text only")
        await wait_for(pilot, lambda: len(server.requests) == 1)
    assert server.requests[0]["messages"][0]["content"] == "text only"


async def test_user_keymap_rebinds_an_action(hermetic_home: Path) -> None:
    hermetic_home.mkdir(parents=True, exist_ok=True)
    (hermetic_home / "config.toml").write_text('[keys]\nretry = "f12"\n[ui]\ntheme = "textual-light"\n')
    server = ScriptedServer("again")
    app = app_for(server, config=load_config())
    async with app.run_test() as pilot:
        assert app.theme == "textual-light"
        await type_and_send(pilot, "q")
        await wait_for(pilot, lambda: not app.streaming and len(server.requests) == 1)
        await pilot.press("f12")
        await wait_for(pilot, lambda: len(server.requests) == 2 and not app.streaming)


async def test_command_palette_offers_every_chat_action() -> None:
    from textual.command import CommandPalette

    app = app_for(ScriptedServer("reply"))
    async with app.run_test(size=(100, 30)) as pilot:
        titles = [c.title for c in app.get_system_commands(app.screen)]
        for expected in (
            "Regenerate the last reply with the current sampling",
            "Clear this chat (asks first)",
            "Saved chats: open, rename, delete, search",
        ):
            assert expected in titles
        await type_and_send(pilot, "hello")
        await wait_for(pilot, lambda: not app.streaming and len(app.chat) == 2)
        await pilot.press("ctrl+p")
        await wait_for(pilot, lambda: isinstance(app.screen, CommandPalette))
        await pilot.press(*"new chat")
        # the list narrows to the one command typed, and Enter runs it
        await wait_for(pilot, lambda: "New chat" in screen_text(app) and "Clear this chat" not in screen_text(app))
        await pilot.press("enter")
        await wait_for(pilot, lambda: not isinstance(app.screen, CommandPalette) and len(app.chat) == 0)


async def test_restored_chat_gets_an_exact_count_from_the_server_tokenizer() -> None:
    from standin.harness import run_standin

    store = Store.open(default_path())
    conv = store.create_conversation()
    store.add_message(conv, "user", "one two three four")
    store.add_message(conv, "assistant", "five six")
    store.close()
    with run_standin() as server:
        app = app_for(None, url=server.url, api_key=server.api_key, conversation_id=conv)
        async with app.run_test() as pilot:
            meter = app.status_view.context
            assert meter is not None
            await wait_for(pilot, lambda: meter.used == 6)  # the stand-in's tokenizer: one token per word
            assert meter.exact


@pytest.mark.parametrize(
    ("fault", "fragment"),
    [("[[fault:die=3]]", "connection to the server broke"), ("[[fault:stall=3]]", "sent nothing for 0.5 s")],
    ids=["server-dies-mid-reply", "stall"],
)
async def test_a_stream_that_breaks_keeps_the_partial_reply(hermetic_home: Path, fault: str, fragment: str) -> None:
    from standin.harness import run_standin

    hermetic_home.mkdir(parents=True, exist_ok=True)
    (hermetic_home / "config.toml").write_text("[ui]\nstall_timeout = 0.5\n")
    with run_standin("--fake-words", "50", "--fake-rate", "50", "--fake-tokens-per-chunk", "1") as server:
        app = app_for(None, url=server.url, api_key=server.api_key, config=load_config())
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_for(pilot, lambda: app.query_one("#statusline").state == "ready")  # type: ignore[attr-defined]
            await type_and_send(pilot, f"count {fault}")
            await wait_for(pilot, lambda: not app.streaming and any(t.role == "error" for t in app.chat.turns))
            reply = app.chat.turns[1]
            assert reply.role == "assistant" and reply.state == "interrupted"
            assert reply.content.startswith("w1 w2")
            assert fragment in app.chat.turns[-1].content
            assert "Traceback" not in screen_text(app)
    store = Store.open(default_path())
    conv = store.last_conversation()
    assert conv is not None
    saved = store.messages(conv.id)
    store.close()
    assert saved[-1].state == "interrupted" and saved[-1].content == reply.content
