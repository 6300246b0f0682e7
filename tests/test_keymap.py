"""The key map: `[keys]` checked like every other config value, and the key facts in tuichat.keymap matching
what the screens declare and what Textual calls its keys."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from textual.binding import Binding
from textual.keys import Keys, _character_to_key
from textual.widgets import Input, TextArea

from tuichat.config import load_config
from tuichat.errors import ConfigError
from tuichat.keymap import (
    BINDINGS,
    BY_ID,
    NAMED_KEYS,
    PROMPT_KEYS,
    PUNCTUATION_KEYS,
    SAME_BYTE,
    VALID_KEY_NAMES,
    check_keys,
    display_key,
    normalize_key,
)

FILE = Path("/home/u/.config/tuichat/config.toml")


def refused(table: dict[str, object]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        check_keys(table, FILE)
    return info.value


def test_a_name_that_is_no_key_is_refused_with_the_file_the_key_and_what_is_allowed() -> None:
    error = refused({"retry": "nonsense+key"})
    assert error.file == str(FILE) and error.key == "keys.retry"
    assert "'nonsense' is not a modifier" in error.message
    assert "ctrl+r, alt+u, f6" in error.message and "f1 to f24" in error.message  # what is allowed
    assert "not a key name (did you mean escape?)" in refused({"stop": "escap"}).message
    assert refused({"stop": "ctrl+"}).key == "keys.stop"
    assert refused({"stop": "f6,,f7"}).key == "keys.stop"
    assert "must be a string" in refused({"stop": 7}).message
    assert "is not a modifier" in refused({"stop": "super+a"}).message


def test_taking_quits_key_is_refused_instead_of_silently_removing_quit() -> None:
    error = refused({"retry": "ctrl+q"})
    assert error.key == "keys.retry" and "quit" in error.message
    # on another screen too: quit works everywhere, so the screen's key would never fire
    assert "quit's key" in refused({"server_stop": "ctrl+q"}).message


def test_a_keymap_that_leaves_no_way_to_quit_or_get_help_is_refused() -> None:
    assert refused({"quit": ""}).key == "keys.quit"
    assert refused({"help": " "}).key == "keys.help"
    assert "types a character" in refused({"quit": "q"}).message  # it would be typed into the prompt instead
    error = refused({"help": "ctrl+r"})
    assert error.key == "keys.help" and "retry" in error.message


def test_collisions_within_a_screen_are_refused_across_screens_allowed() -> None:
    error = refused({"server_stop": "s"})
    assert error.key == "keys.server_stop" and "server_start" in error.message
    assert check_keys({"server_stop": "k"}, FILE) == {"server_stop": "k"}  # k is the quit screen's, elsewhere
    assert check_keys({"retry": "ctrl+q", "quit": "ctrl+r"}, FILE) == {"retry": "ctrl+q", "quit": "ctrl+r"}  # a swap


def test_keys_the_prompt_types_or_edits_with_are_refused_on_the_chat_screen() -> None:
    assert "types a character" in refused({"retry": "r"}).message
    assert "types a character" in refused({"retry": "shift+r"}).message
    assert "editing key of the prompt" in refused({"retry": "ctrl+k"}).message
    assert "reaches tuichat as tab" in refused({"retry": "ctrl+i"}).message
    assert "command palette" in refused({"retry": "ctrl+p"}).message
    assert check_keys({"history_rename": "m"}, FILE) == {"history_rename": "m"}  # a screen with no prompt


def test_an_unknown_id_is_refused_with_a_suggestion() -> None:
    error = refused({"retyr": "f12"})
    assert error.key == "keys.retyr" and "did you mean 'retry'?" in error.message


def test_key_names_are_normalized_to_what_textual_reports() -> None:
    assert check_keys({"retry": "Ctrl+R, F12", "undo": "shift+ctrl+z"}, FILE) == {
        "retry": "ctrl+r,f12",
        "undo": "ctrl+shift+z",
    }
    assert normalize_key("?") == "question_mark"
    assert normalize_key("K") == "K" and normalize_key("shift+k") == "K"  # Textual reports a typed capital so
    assert normalize_key("alt+K") == "alt+k" and normalize_key("alt+shift+k") == "alt+shift+k"
    assert normalize_key("ctrl++") == "ctrl+plus"
    assert display_key("ctrl+r") == "Ctrl+R" and display_key("f6") == "F6" and display_key("slash") == "/"
    assert display_key("shift+f8") == "Shift+F8" and display_key("escape") == "Esc"


def test_the_default_keymap_passes_its_own_check() -> None:
    table = {b.id: b.keys for b in BINDINGS}
    assert check_keys(table, FILE) == table


def test_valid_key_names_are_textuals_names() -> None:
    textual_names = {k.value for k in Keys}
    for name in NAMED_KEYS:
        assert name in textual_names, name
    plain = {v for v in textual_names if "+" not in v and not v.startswith("<") and v not in ("return", "ctrl-at")}
    assert plain <= set(VALID_KEY_NAMES), plain - set(VALID_KEY_NAMES)
    punctuation = [chr(c) for c in range(0x21, 0x7F) if not chr(c).isalnum()]
    assert list(PUNCTUATION_KEYS) == [_character_to_key(c) for c in punctuation]
    assert len(VALID_KEY_NAMES) == len(set(VALID_KEY_NAMES))
    for same, other in (("ctrl+i", "tab"), ("ctrl+m", "enter")):
        assert SAME_BYTE[same] == other


def _declared() -> dict[str, Binding]:
    holders = (
        ("tuichat.ui.app", "TuichatApp"),
        ("tuichat.ui.screens.chat", "ChatScreen"),
        ("tuichat.ui.widgets.prompt_area", "PromptArea"),
        ("tuichat.ui.screens.dialogs", "HelpScreen"),
        ("tuichat.ui.screens.dialogs", "ConfirmScreen"),
        ("tuichat.ui.screens.dialogs", "ChoiceScreen"),
        ("tuichat.ui.screens.dialogs", "QuitScreen"),
        ("tuichat.ui.screens.history", "ConversationsScreen"),
        ("tuichat.ui.screens.history", "ConversationTable"),
        ("tuichat.ui.screens.image_picker", "ImagePickerScreen"),
        ("tuichat.ui.screens.server", "ServerScreen"),
        ("tuichat.ui.screens.profile_editor", "ProfileEditorScreen"),
        ("tuichat.ui.screens.models", "ModelsScreen"),
        ("tuichat.ui.screens.pull", "PullScreen"),
        ("tuichat.ui.screens.quantize", "QuantizeScreen"),
        ("tuichat.ui.screens.fleet", "FleetScreen"),
    )
    found: dict[str, Binding] = {}
    for module, name in holders:
        holder = getattr(importlib.import_module(module), name)
        for item in holder.__dict__.get("BINDINGS", ()):
            if isinstance(item, Binding) and item.id:
                assert item.id not in found, f"{item.id} is declared twice"
                found[item.id] = item
    return found


def test_every_screens_bindings_are_the_keymaps() -> None:
    declared = _declared()
    assert set(declared) == set(BY_ID)
    for binding_id, item in declared.items():
        spec = BY_ID[binding_id]
        assert (item.key, item.description, item.priority) == (spec.keys, spec.label, spec.priority), binding_id


def test_prompt_keys_are_the_editing_keys_of_textarea_and_input() -> None:
    keys: set[str] = {"enter"}
    for widget in (TextArea, Input):
        for item in widget.BINDINGS:
            assert isinstance(item, Binding)
            keys |= {k for k in item.key.split(",") if not k.startswith("super+")}
    keys.discard("f6")  # undo's key: the prompt gives its "select line" up
    assert keys == PROMPT_KEYS


def test_load_config_refuses_a_bad_keymap(hermetic_home: Path) -> None:
    hermetic_home.mkdir(parents=True, exist_ok=True)
    (hermetic_home / "config.toml").write_text('[keys]\nretry = "ctrl+q"\n')
    with pytest.raises(ConfigError) as info:
        load_config()
    assert info.value.key == "keys.retry" and "quit" in info.value.message
