"""Start-up and idle cost (issue 15): the prompt's cursor rests after a while without a key, and what the first
frame does not need waits until after it."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from apphelpers import ScriptedServer, app_for, record_styling, wait_for

from tuichat.ui.widgets.prompt_area import PromptArea


def blink_toggles(prompt: PromptArea) -> list[bool]:
    """Record each visibility flip of the cursor (each one is a redraw and a write to the terminal)."""
    seen: list[bool] = []
    prompt.watch(prompt, "_cursor_visible", lambda visible: seen.append(visible), init=False)
    return seen


async def test_the_cursor_stops_blinking_without_keys_and_a_key_wakes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PromptArea, "BLINK_REST_S", 2.0)
    app = app_for(ScriptedServer("hi"))
    async with app.run_test(size=(100, 30)) as pilot:
        prompt = app.query_one(PromptArea)
        await wait_for(pilot, lambda: prompt.has_focus)
        flips = blink_toggles(prompt)
        await pilot.press("a")
        assert prompt.blinking
        await wait_for(pilot, lambda: len(flips) >= 2)  # blinking while typing
        await wait_for(pilot, lambda: not prompt.blinking, timeout=6)
        assert prompt._cursor_visible  # it rests lit, not hidden
        rested = len(flips)
        await pilot.pause(1.2)  # more than two blink periods: nothing is redrawn
        assert len(flips) == rested
        await pilot.press("b")
        assert prompt.text == "ab"
        assert prompt.blinking
        await wait_for(pilot, lambda: len(flips) >= rested + 2)  # blinking again after the key


def run_fresh(code: str) -> str:
    """Run `code` in a new interpreter (nothing imported yet) with a home of its own; its standard output."""
    env = dict(os.environ, TUICHAT_HOME=tempfile.mkdtemp())
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_the_first_frame_needs_no_http_stack() -> None:
    """httpx (~70 ms to import) loads with the first request, not with the app, and never with its own CLI."""
    code = (
        "import sys\n"
        "from tuichat.ui.app import AppOptions, make_app\n"
        "make_app(AppOptions(url='http://127.0.0.1:9', use_store=False, watch_server=False))\n"
        "print('httpx' in sys.modules)\n"
        "import httpx\n"
        "print('click' in sys.modules, 'pygments' in sys.modules)\n"
    )
    assert run_fresh(code).split() == ["False", "False", "False"]


def test_the_first_frame_loads_no_profile_or_status_code() -> None:
    """The built-in profiles (with the GPU and fit code under them, ~10 ms) load when something asks for a profile,
    and the status readings (metrics parsing, the fleet ledger, ~8 ms) once the first frame is out: making the app
    that attaches to a URL loads neither, yet both are there when asked for."""
    later = (
        "tuichat.server.profiles",
        "tuichat.server.metrics",
        "tuichat.server.attribution",
        "tuichat.ui.status_watch",
    )
    code = (
        "import sys\n"
        "from tuichat.ui.app import AppOptions, make_app\n"
        "app = make_app(AppOptions(url='http://127.0.0.1:9', use_store=False, watch_server=False))\n"
        f"print(*[m in sys.modules for m in {later!r}])\n"
        "print(len(app.config.profiles) > 0, app.status.view.context is not None)\n"
        f"print(*[m in sys.modules for m in {later!r}])\n"
    )
    assert run_fresh(code).splitlines() == ["False False False False", "True True", "True True True True"]


def test_start_up_collects_no_garbage_until_the_first_screen_then_the_collector_is_back() -> None:
    """The CLI pauses the collector for start-up (~100 young-generation collections, ~30 ms, freed almost
    nothing), and the first screen turns it back on with what start-up built frozen out of its sight."""
    code = (
        "import gc\n"
        "runs = [0]\n"
        "gc.callbacks.append(lambda phase, info: phase == 'start' and runs.__setitem__(0, runs[0] + 1))\n"
        "from textual.app import App\n"
        "from tuichat.cli.main import main\n"
        "from tuichat.ui.app import TuichatApp\n"
        "seen = {}\n"
        "shown = TuichatApp.first_screen_shown\n"
        "def first_screen_shown(self):\n"
        "    seen['collections'], seen['on_before'] = runs[0], gc.isenabled()\n"
        "    shown(self)\n"
        "    seen['on_after'], seen['frozen'] = gc.isenabled(), gc.get_freeze_count()\n"
        "    self.exit()\n"
        "TuichatApp.first_screen_shown = first_screen_shown\n"
        "TuichatApp.run = lambda self, **kw: App.run(self, headless=True)  # no terminal here\n"
        "runs[0] = 0\n"
        "main(['--url', 'http://127.0.0.1:9', '--api-key', 'k', '--model', 'm'])\n"
        "print(seen['collections'], seen['on_before'], seen['on_after'], seen['frozen'] > 10000, gc.isenabled())\n"
    )
    assert run_fresh(code).split() == ["0", "False", "True", "True", "True"]


async def test_hidden_panes_wait_while_a_message_is_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    # Mounting the two hidden panes takes ~100 ms: started between a typed message's Enter and its request, it
    # held the request back that long (the bench saw it). They come once the prompt is empty again.
    import tuichat.ui.screens.chat as chat

    monkeypatch.setattr(chat, "PANES_LATER_S", 0.5)  # the first look; the test types well before it
    looked = 0
    original = chat.ChatScreen._mount_panes_later

    async def counted(self: chat.ChatScreen) -> None:
        nonlocal looked
        looked += 1
        monkeypatch.setattr(chat, "PANES_LATER_S", 0.05)  # and the looks after it come quickly
        await original(self)

    monkeypatch.setattr(chat.ChatScreen, "_mount_panes_later", counted)
    app = app_for(ScriptedServer("hi"), cursor_blink=False)
    async with app.run_test(size=(80, 24)) as pilot:  # too narrow for either pane: both are hidden
        screen = app.chat_screen
        screen.prompt.text = "hey"
        await wait_for(pilot, lambda: looked >= 2)  # it looked twice while "hey" was in the prompt
        assert screen._sampling_pane() is None and screen.status_pane() is None
        screen.prompt.text = ""
        await wait_for(pilot, lambda: screen._sampling_pane() is not None and screen.status_pane() is not None)


async def test_the_first_reply_waits_for_no_import() -> None:
    """What the first Enter and its reply use is imported while the user reads the first screen (the warm-up):
    an import on that path (httpx-sse's took ~1 ms, Markdown's ~40 ms) adds to the time to the first word. The reply
    has a dash and an ellipsis: the first character outside Rich's quick single-width set imports its Unicode width
    tables, which came in the middle of the first reply that had one."""
    from apphelpers import ScriptedServer, app_for, screen_text, wait_for

    app = app_for(ScriptedServer("the *first* reply \u2014 so far\u2026"), watch_server=False, cursor_blink=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.chat_screen.warmed_up and "ready" in screen_text(app))
        before = set(sys.modules)
        app.chat_screen.prompt.text = "hello"
        await pilot.press("enter")
        await wait_for(pilot, lambda: not app.streaming and "first reply" in screen_text(app))
        assert sorted(set(sys.modules) - before) == []


async def test_the_history_opens_after_the_first_screen_yet_a_message_sent_before_it_is_saved(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no saved chat to show, the history (the database and the render cache, ~5 ms) opens once the first
    screen is out. Here that moment never comes: a message typed and sent before it is saved all the same."""
    from tuichat.chat.store import Store, default_path
    from tuichat.ui.app import TuichatApp

    monkeypatch.setattr(TuichatApp, "first_screen_shown", lambda self: None)
    app = app_for(ScriptedServer("kept"))
    async with app.run_test(size=(100, 30)) as pilot:
        prompt = app.query_one(PromptArea)
        await wait_for(pilot, lambda: prompt.has_focus)
        assert app.store is None and app.chat_screen.conversation.store is None  # not opened for the first frame
        await pilot.press(*"hello", "enter")
        await wait_for(pilot, lambda: not app.streaming and len(app.chat) == 2)
        assert app.store is not None and app.render_cache is not None
    store = Store.open(default_path())
    conv = store.last_conversation()
    assert conv is not None
    assert [(m.role, m.content) for m in store.messages(conv.id)] == [("user", "hello"), ("assistant", "kept")]
    store.close()


async def test_the_history_is_open_once_the_first_screen_is_out() -> None:
    app = app_for(ScriptedServer("hi"))
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.first_screen_out)
        assert app.store is not None and app.chat_screen.conversation.store is app.store


async def test_the_first_frame_styles_each_widget_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A screen restyles all its widgets when it is resumed (the theme may have changed meanwhile); the chat's first
    resume comes right after compose styled them, and is skipped."""
    styled = record_styling(monkeypatch)
    app = app_for(ScriptedServer("hi"))
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.first_screen_out)
        assert styled.count(app.chat_screen) == styled.count(app.chat_screen.status_line) == 1


async def test_a_key_typed_during_start_up_with_a_history_that_cannot_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key typed while tuichat starts reaches the app before the chat screen is up. The history is not opened
    for it then: one that cannot open says so on the chat screen, which did not exist yet, and the app stopped
    with a traceback. It opens when the chat is up, says so, and the chat goes on."""
    from textual import events

    from tuichat.ui.app import TuichatApp

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    make_screen = TuichatApp.get_default_screen

    def typed_early(self: TuichatApp) -> object:
        self.post_message(events.Key("a", "a"))
        return make_screen(self)

    monkeypatch.setattr(TuichatApp, "get_default_screen", typed_early)
    app = app_for(ScriptedServer("fine"), store_path=blocker / "data" / "history.sqlite3")
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.first_screen_out)
        await wait_for(pilot, lambda: any("history is not being saved" in t.content for t in app.chat.turns))
        app.chat_screen.prompt.text = "still here?"
        await pilot.press("enter")
        await wait_for(pilot, lambda: not app.streaming and app.chat.turns[-1].content == "fine")
