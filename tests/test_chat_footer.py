"""The chat footer: Quit keeps its label at 80 columns, many exchanges do not pile up footer widgets, and a saved
chat opened at start-up is drawn before the key bar is built."""

from __future__ import annotations

import gc

import pytest
from apphelpers import ScriptedServer, app_for, record_styling, screen_text, wait_for
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets._footer import FooterKey

from tuichat.chat.store import Store, default_path
from tuichat.ui.app import TuichatApp
from tuichat.ui.widgets.key_footer import KeyFooter
from tuichat.ui.widgets.prompt_area import PromptArea


def footer_keys_alive() -> int:
    """FooterKey widgets that still exist anywhere (in the DOM or only referenced), after a collection."""
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, FooterKey))


def footer_line(app: TuichatApp) -> str:
    return screen_text(app).splitlines()[-1]


async def test_quit_comes_first_and_every_key_shown_has_its_label() -> None:
    app = app_for(ScriptedServer())
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: "ready" in screen_text(app) and "palette" in footer_line(app))
        footer = footer_line(app)
        assert footer.lstrip().startswith("^q Quit  f1 Help"), footer
        assert "^o" not in footer  # no room for Copy's label: the key is left out rather than cut
        await pilot.resize_terminal(120, 40)
        await wait_for(pilot, lambda: "^o Copy" in footer_line(app))
        assert footer_line(app).lstrip().startswith("^q Quit"), footer_line(app)


async def test_a_chat_opened_at_start_is_drawn_before_the_key_bar_is_built() -> None:
    """The key bar's first build costs 30-50 ms; it waits for the saved chat's turns, then comes at once."""
    store = Store.open(default_path())
    conv = store.create_conversation(model="m", server_url="http://127.0.0.1:23333")
    store.add_message(conv, "user", "an old question")
    store.add_message(conv, "assistant", "the old answer")
    store.close()
    app = app_for(ScriptedServer(), conversation_id=conv, watch_server=False, cursor_blink=False)
    seen_at_first_build: list[str] = []
    recompose = KeyFooter.recompose

    async def recording(footer: KeyFooter) -> None:
        if footer.screen is app.chat_screen and not seen_at_first_build:
            seen_at_first_build.append(screen_text(app))
        await recompose(footer)

    KeyFooter.recompose = recording  # type: ignore[method-assign]
    try:
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_for(pilot, lambda: "Quit" in footer_line(app))
            assert seen_at_first_build, "the key bar was never built"
            assert "the old answer" in seen_at_first_build[0]
    finally:
        KeyFooter.recompose = recompose  # type: ignore[method-assign]


async def test_exchanges_do_not_pile_up_footer_keys() -> None:
    server = ScriptedServer("A short reply.")
    app = app_for(server)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: "ready" in screen_text(app))
        prompt = app.query_one(PromptArea)

        async def exchange(n: int) -> None:
            prompt.text = f"question {n}"
            await pilot.press("enter")
            await wait_for(pilot, lambda: not app.streaming and len(server.requests) == n)
            await pilot.pause()

        await exchange(1)  # the first exchange may build what every later one reuses
        before_dom = len(app.screen.query(FooterKey))
        before = footer_keys_alive()
        for n in range(2, 8):
            await exchange(n)
        await pilot.pause()
        assert len(app.screen.query(FooterKey)) == before_dom
        assert footer_keys_alive() <= before


async def test_the_footer_is_rebuilt_only_when_its_keys_change() -> None:
    app = app_for(ScriptedServer())
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: "ready" in screen_text(app) and "palette" in footer_line(app))
        keys = list(app.screen.query(FooterKey))
        for _ in range(4):  # Textual refreshes bindings on every focus change; nothing shown changes here
            app.screen.refresh_bindings()
            await pilot.pause()
        assert list(app.screen.query(FooterKey)) == keys  # the same widgets: no rebuild
        await pilot.resize_terminal(80, 24)  # Copy no longer fits: that is a change, and it is drawn
        await wait_for(pilot, lambda: "^o" not in footer_line(app))
        assert list(app.screen.query(FooterKey)) != keys


class Toggle(Screen[None]):
    BINDINGS = [Binding("r", "retry", "Retry"), Binding("u", "undo", "Undo")]
    ready = False

    def compose(self) -> ComposeResult:
        yield KeyFooter()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        return True if action == "undo" or self.ready else None  # None: shown, greyed

    def action_retry(self) -> None:
        self.app.exit("retried")


class ToggleApp(App[str]):
    def on_mount(self) -> None:
        self.push_screen(Toggle())


async def test_a_key_that_turns_on_or_off_is_redrawn_in_place() -> None:
    """Only a key's state changed (Retry once a chat has a reply): the same key widgets are greyed or lit, and
    a click or key on one does what its state says; nothing is rebuilt."""
    app = ToggleApp()
    async with app.run_test(size=(80, 10)) as pilot:
        screen = app.screen
        assert isinstance(screen, Toggle)
        await wait_for(pilot, lambda: {"retry", "undo"} <= {key.action for key in screen.query(FooterKey)})
        keys = {key.action: key for key in screen.query(FooterKey)}
        assert keys["retry"].has_class("-disabled") and not keys["undo"].has_class("-disabled")
        screen.ready = True
        screen.refresh_bindings()
        await wait_for(pilot, lambda: not keys["retry"].has_class("-disabled"))
        assert {key.action: key for key in screen.query(FooterKey)} == keys  # the same widgets
        await pilot.click(keys["retry"])  # a lit key acts
        assert app.return_value == "retried"


async def test_each_key_in_the_bar_is_styled_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # Textual's keys start compact and take the footer's setting when they mount: two more passes of the whole
    # stylesheet over each key and its two parts (~5 ms for the chat's keys, just after the first frame)
    styled = record_styling(monkeypatch)
    app = app_for(ScriptedServer("hi"))
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: "Quit" in footer_line(app) and "palette" in footer_line(app))
        keys = list(app.screen.query(FooterKey))
        styled_keys = [node for node in styled if isinstance(node, FooterKey)]
        assert len(styled_keys) == len(keys) == len(set(map(id, styled_keys)))
        # ...and they look as Textual's own: the palette's key compact, the others not
        assert [k.has_class("-compact") for k in keys] == [k.has_class("-command-palette") for k in keys]
