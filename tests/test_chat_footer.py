"""The chat footer: Quit keeps its label at 80 columns, and many exchanges do not pile up footer widgets."""

from __future__ import annotations

import gc

from apphelpers import ScriptedServer, app_for, screen_text, wait_for
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets._footer import FooterKey

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
