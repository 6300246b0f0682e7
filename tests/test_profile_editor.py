"""The profile editor driven with Pilot: what it saves to config.toml, what it refuses, and what it never shows."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

from apphelpers import screen_text, wait_for
from textual.app import App
from textual.pilot import Pilot
from textual.widgets import Checkbox, Input, Select, Static

from tuichat.config import Config, add_profile, load_config
from tuichat.server.profiles import BUILTIN_PROFILES, Profile
from tuichat.ui.screens.dialogs import ConfirmScreen
from tuichat.ui.screens.profile_editor import ProfileEditorScreen

KEY = "sekrit-Key-0123456789abcdef"


class Host(App[None]):
    def __init__(self, config: Config, name: str | None) -> None:
        super().__init__()
        self.editor = ProfileEditorScreen(config, name)
        self.results: list[str | None] = []

    def on_mount(self) -> None:
        self.push_screen(self.editor, self.results.append)


async def opened(pilot: Pilot[Any]) -> ProfileEditorScreen:
    app = pilot.app
    assert isinstance(app, Host)
    await wait_for(pilot, lambda: app.screen is app.editor and app.editor.focused is not None)
    return app.editor


def fill(editor: ProfileEditorScreen, **values: str) -> None:
    for key, value in values.items():
        editor.query_one(f"#pe-{key}", Input).value = value


def error_of(editor: ProfileEditorScreen, key: str) -> str:
    label = editor.query_one(f"#pe-{key}-error", Static)
    return str(label.render()) if label.display else ""


async def test_new_profile_is_saved_and_loads_back(hermetic_home: Path) -> None:
    app = Host(load_config(), None)
    async with app.run_test(size=(100, 40)) as pilot:
        editor = await opened(pilot)
        assert editor.query_one("#pe-name", Input).has_focus
        await pilot.press(*"mine")
        fill(
            editor,
            model="owner/some-model",
            tp="2",
            session_len="8192",
            cache_max_entry_count="0.5",
            port="auto",
            extra_args="--eager-mode --chat-template 'my template.json'",
        )
        editor.query_one("#pe-backend", Select).value = "turbomind"
        editor.query_one("#pe-quant_policy", Select).value = "8"
        editor.query_one("#pe-enable_prefix_caching", Checkbox).value = True
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: app.results == ["mine"])
    config = load_config()
    assert config.profiles["mine"] == Profile(
        model="owner/some-model",
        backend="turbomind",
        tp=2,
        session_len=8192,
        cache_max_entry_count=0.5,
        quant_policy=8,
        extra_args=("--eager-mode", "--chat-template", "my template.json"),
        enable_prefix_caching=True,
    )
    # blank fields stay out of the file, and "auto" (the default port) too
    assert config.profile_table("mine") == {
        "model": "owner/some-model",
        "backend": "turbomind",
        "tp": 2,
        "session_len": 8192,
        "cache_max_entry_count": 0.5,
        "quant_policy": 8,
        "extra_args": ["--eager-mode", "--chat-template", "my template.json"],
        "enable_prefix_caching": True,
    }


async def test_invalid_tp_is_shown_next_to_the_field_and_nothing_is_saved(hermetic_home: Path) -> None:
    app = Host(load_config(), None)
    async with app.run_test(size=(100, 40)) as pilot:
        editor = await opened(pilot)
        fill(editor, name="bad", model="owner/model", tp="0")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: error_of(editor, "tp") != "")
        assert "tp must be between 1 and 64 (got 0)" in error_of(editor, "tp")
        assert editor.query_one("#pe-tp", Input).has_focus
        assert "Not saved" in screen_text(app)
        fill(editor, tp="two")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: "whole number" in error_of(editor, "tp"))
        assert app.results == [] and app.screen is editor
    assert not (hermetic_home / "config.toml").exists()


async def test_missing_model_unclosed_quote_and_bad_name_are_refused(hermetic_home: Path) -> None:
    app = Host(load_config(), None)
    async with app.run_test(size=(100, 40)) as pilot:
        editor = await opened(pilot)
        fill(editor, name="ok")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: "required" in error_of(editor, "model"))
        fill(editor, model="owner/model", extra_args="--flag 'open")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: "quote" in error_of(editor, "extra_args"))
        assert error_of(editor, "model") == ""  # an error goes once its field is fixed
        fill(editor, extra_args="", name="no spaces please")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: "profile name" in error_of(editor, "name"))
        assert app.results == []
    assert not (hermetic_home / "config.toml").exists()


async def test_api_key_is_saved_0600_and_never_shown(hermetic_home: Path) -> None:
    app = Host(load_config(), None)
    async with app.run_test(size=(100, 40)) as pilot:
        editor = await opened(pilot)
        fill(editor, name="keyed", model="owner/model")
        field = editor.query_one("#pe-api_key", Input)
        field.focus()
        await pilot.press(*KEY[:6])
        field.insert_text_at_cursor(KEY[6:])  # as a paste would
        await wait_for(pilot, lambda: field.value == KEY and "•" * 8 in screen_text(app))
        assert KEY not in screen_text(app) and "•" * 8 in screen_text(app)
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: app.results == ["keyed"])
    path = hermetic_home / "config.toml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_config().profiles["keyed"].api_key == KEY
    # editing it again keeps the key without showing it
    again = Host(load_config(), "keyed")
    async with again.run_test(size=(100, 40)) as pilot:
        editor = await opened(pilot)
        assert editor.query_one("#pe-api_key", Input).value == KEY
        assert KEY not in screen_text(again)
        fill(editor, session_len="4096")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: again.results == ["keyed"])
    assert load_config().profiles["keyed"].api_key == KEY
    assert load_config().profiles["keyed"].session_len == 4096


async def test_escape_with_changes_asks_before_discarding(hermetic_home: Path) -> None:
    app = Host(load_config(), None)
    async with app.run_test(size=(100, 40)) as pilot:
        editor = await opened(pilot)
        await pilot.press(*"draft")
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        assert "Discard your changes" in screen_text(app)
        await pilot.press("n")
        await wait_for(pilot, lambda: app.screen is editor)
        assert editor.query_one("#pe-name", Input).value == "draft"
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_for(pilot, lambda: app.results == [None])
    assert not (hermetic_home / "config.toml").exists()


async def test_escape_without_changes_leaves_at_once(hermetic_home: Path) -> None:
    app = Host(load_config(), "internlm2-w4")
    async with app.run_test(size=(100, 40)) as pilot:
        await opened(pilot)
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.results == [None])


async def test_editing_a_builtin_saves_a_user_profile_that_takes_its_place(hermetic_home: Path) -> None:
    app = Host(load_config(), "internlm2-w4")
    async with app.run_test(size=(100, 40)) as pilot:
        editor = await opened(pilot)
        assert "built in" in screen_text(app)
        # prefilled from the built-in
        assert editor.query_one("#pe-model", Input).value == BUILTIN_PROFILES["internlm2-w4"].model
        assert editor.query_one("#pe-model_format", Select).value == "awq"
        assert editor.query_one("#pe-cache_max_entry_count", Input).value == "0.4"
        fill(editor, cache_max_entry_count="0.3")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: app.results == ["internlm2-w4"])
        assert any("takes the place of the built-in" in n.message for n in app._notifications)
    config = load_config()
    assert "internlm2-w4" in config.user_profiles
    assert config.profiles["internlm2-w4"].cache_max_entry_count == 0.3
    assert config.profiles["internlm2-w4"].model_format == "awq"
    assert BUILTIN_PROFILES["internlm2-w4"].cache_max_entry_count == 0.4


async def test_new_profile_named_like_an_existing_one_asks_first(hermetic_home: Path) -> None:
    add_profile("taken", {"model": "owner/old"})
    app = Host(load_config(), None)
    async with app.run_test(size=(100, 40)) as pilot:
        editor = await opened(pilot)
        fill(editor, name="taken", model="owner/new")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        assert "already in config.toml" in screen_text(app)
        await pilot.press("n")
        await wait_for(pilot, lambda: app.screen is editor)
        assert load_config().profiles["taken"].model == "owner/old"
        fill(editor, name="internlm2-pytorch")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        assert "built-in profile" in screen_text(app)
        await pilot.press("y")
        await wait_for(pilot, lambda: app.results == ["internlm2-pytorch"])
    assert load_config().profiles["internlm2-pytorch"].model == "owner/new"


async def test_public_server_name_shows_a_warning(hermetic_home: Path) -> None:
    app = Host(load_config(), None)
    async with app.run_test(size=(100, 40)) as pilot:
        editor = await opened(pilot)
        warning = editor.query_one("#pe-server_name-warning", Static)
        assert not warning.display
        fill(editor, server_name="0.0.0.0")
        await wait_for(pilot, lambda: warning.display)
        assert "0.0.0.0" in str(warning.render()) and "SSH tunnel" in str(warning.render())
        fill(editor, server_name="localhost")
        await wait_for(pilot, lambda: not warning.display)
