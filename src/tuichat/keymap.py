"""Key bindings as data: every binding id, its default keys, what it does, and the checks on a `[keys]` table.

The UI builds its Textual bindings from `BINDINGS` here, so the footer, the help screen, the README table and
the config check all read one list. Key names follow Textual's (`ctrl+r`, `alt+u`, `f6`, `shift+f8`, `slash`).

The defaults are chosen to reach the program through tmux and GNU screen with their default settings and
through a bare xterm: no Ctrl+B (tmux's prefix) or Ctrl+A (screen's), and nothing that needs Alt alone (xterm
sends Alt+letter as an accented character unless `metaSendsEscape` is set), so Alt+U is only a second key.

`check_keys(table, file)` validates a user keymap like every other config value: an unknown id, a name that is
not a key, a key that the prompt would type or already uses, two actions on one key, or a keymap that leaves no
way to quit or to reach the help is a `ConfigError` naming the file and the key.
"""

from __future__ import annotations

import difflib
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tuichat.errors import ConfigError


@dataclass(frozen=True)
class KeyBinding:
    """One rebindable action. `scope` is the screen whose keys it shares ("app" = active on every screen);
    `priority` bindings run before the focused widget sees the key."""

    id: str
    keys: str
    label: str
    scope: str
    help: str = ""
    priority: bool = False

    @property
    def key_list(self) -> tuple[str, ...]:
        return tuple(k for k in self.keys.split(",") if k)


CHAT = "chat"
APP = "app"  # quit: a priority binding, so it works on every screen

BINDINGS: tuple[KeyBinding, ...] = (
    # the chat screen (the app's own bindings; disabled while another screen is on top)
    KeyBinding("help", "f1", "Help", CHAT, "This help"),
    KeyBinding("stop", "escape", "Stop", CHAT, "Stop the reply; its partial text is kept, marked"),
    KeyBinding("retry", "ctrl+r", "Retry", CHAT, "Regenerate the last reply with the current sampling"),
    KeyBinding("undo", "f6,alt+u", "Undo", CHAT, "Remove the last exchange; your message returns to the prompt"),
    KeyBinding("clear", "ctrl+l", "Clear", CHAT, "Clear this chat (asks first)"),
    KeyBinding("new_chat", "ctrl+n", "New", CHAT, "New chat; the current one stays in the history"),
    KeyBinding("copy_reply", "ctrl+o", "Copy", CHAT, "Copy the last reply (OSC 52, works over SSH)"),
    KeyBinding("copy_code", "ctrl+g", "Copy code", CHAT, "Copy a code block of the last reply; again for the next"),
    KeyBinding("toggle_sampling", "f2", "Sampling", CHAT, "Show or hide the sampling pane"),
    KeyBinding("toggle_status", "f3", "Status", CHAT, "Show or hide the GPU / KV-cache / speed pane"),
    KeyBinding("load_earlier", "ctrl+t", "Earlier messages", CHAT, "Show earlier messages of a long chat"),
    KeyBinding("history", "f4", "Chats", CHAT, "Saved chats: open, rename, delete, search"),
    KeyBinding("server", "f5", "Server", CHAT, "Server panel: start, stop, restart, profiles, log"),
    KeyBinding("models", "f9", "Models", CHAT, "Local models: fit estimate, make a profile, W4A16 quantize"),
    # F7 is the prompt's (TextArea: select all); F10 and Shift+F5 (next to the server panel's F5) pass tmux and screen
    KeyBinding(
        "fleet", "f10,shift+f5", "Fleet", CHAT, "Fleet screen: every node behind the proxy, and which served each reply"
    ),
    KeyBinding("attach_image", "f8", "Image", CHAT, "Attach an image (or type /image PATH)"),
    KeyBinding("clear_attachments", "shift+f8", "Drop images", CHAT, "Remove the attached images (or /image clear)"),
    KeyBinding(
        "select_previous",
        "ctrl+up,alt+up",
        "Select earlier",
        CHAT,
        "Select an earlier message (then the copy key copies it; Esc unselects)",
    ),
    KeyBinding("select_next", "ctrl+down,alt+down", "Select later", CHAT, "Select a later message"),
    KeyBinding(
        "newline",
        "ctrl+j,shift+enter",
        "Newline",
        CHAT,
        "New line in the prompt (Shift+Enter only where the terminal tells it from Enter)",
    ),
    KeyBinding("quit", "ctrl+q", "Quit", APP, "Quit (asks about a server tuichat started)", priority=True),
    # the other screens
    KeyBinding("close_help", "escape,f1,q", "Close", "help"),
    KeyBinding("confirm_yes", "y,enter", "Yes", "confirm"),
    KeyBinding("confirm_no", "n,escape", "No", "confirm"),
    KeyBinding("choice_cancel", "escape", "Cancel", "choice"),
    KeyBinding("quit_stop", "s", "Stop it", "quit_screen"),
    KeyBinding("quit_keep", "k", "Keep it", "quit_screen"),
    KeyBinding("quit_always_stop", "S", "Always stop", "quit_screen"),
    KeyBinding("quit_always_keep", "K", "Always keep", "quit_screen"),
    KeyBinding("quit_cancel", "escape", "Cancel", "quit_screen"),
    KeyBinding("history_open", "enter", "Open", "history", priority=True),
    KeyBinding("history_rename", "r", "Rename", "history"),
    KeyBinding("history_delete", "d", "Delete", "history"),
    KeyBinding("history_search", "slash", "Search", "history"),
    KeyBinding("history_back", "escape", "Back", "history"),
    KeyBinding("history_next_hit", "down", "Next hit", "history"),
    KeyBinding("history_previous_hit", "up", "Previous hit", "history"),
    KeyBinding("picker_cancel", "escape", "Cancel", "image_picker"),
    KeyBinding("picker_parent", "backspace", "Parent folder", "image_picker"),
    KeyBinding("server_start", "s", "Start", "server"),
    KeyBinding("server_stop", "x", "Stop", "server"),
    KeyBinding("server_restart", "r", "Restart", "server"),
    KeyBinding("server_switch_profile", "p", "Profile", "server"),
    KeyBinding("server_edit_profile", "e", "Edit", "server"),
    KeyBinding("server_new_profile", "n", "New", "server"),
    KeyBinding("server_search_log", "slash", "Search", "server"),
    KeyBinding("server_attach", "a", "Attach", "server"),
    KeyBinding("server_back", "escape", "Back", "server"),
    KeyBinding("save_profile", "ctrl+s", "Save", "profile_editor", priority=True),
    KeyBinding("cancel_profile_edit", "escape", "Cancel", "profile_editor"),
    KeyBinding("models_profile", "p", "Profile", "models"),
    KeyBinding("models_quantize", "q", "Quantize", "models"),
    KeyBinding("models_hub_id", "slash", "Hub id", "models"),
    KeyBinding("models_rescan", "r", "Rescan", "models"),
    KeyBinding("models_get", "g", "Get model", "models"),
    KeyBinding("models_back", "escape", "Back", "models"),
    KeyBinding("pull_start", "enter", "Get", "pull"),
    KeyBinding("pull_profile", "p", "Profile", "pull"),
    KeyBinding("pull_stop_or_back", "escape", "Stop/Back", "pull"),
    KeyBinding("quantize_start", "ctrl+s", "Start", "quantize", priority=True),
    KeyBinding("quantize_cancel", "c", "Cancel job", "quantize"),
    KeyBinding("quantize_done", "enter", "Done", "quantize", priority=True),
    KeyBinding("quantize_back", "escape", "Back", "quantize"),
    KeyBinding("fleet_back", "escape", "Back", "fleet"),
)

BY_ID: dict[str, KeyBinding] = {b.id: b for b in BINDINGS}

# Keys taken on every screen by Textual itself: focus moves, the command palette, copy.
RESERVED_EVERYWHERE: dict[str, str] = {
    "tab": "moves the focus",
    "shift+tab": "moves the focus back",
    "ctrl+p": "opens the command palette",
    "ctrl+c": "copies the selected text",
}

# Keys a terminal sends as the same byte as another key, so a binding on them would also fire on that key.
SAME_BYTE: dict[str, str] = {
    "ctrl+i": "tab",
    "ctrl+m": "enter",
    "ctrl+h": "backspace (on many terminals)",
    "ctrl+left_square_bracket": "escape",
}

# The editing keys of the prompt and of the sampling fields (Textual's TextArea and Input, without super+):
# a chat binding on one of them would never fire while someone types. F6 (TextArea's "select line") is not
# here: undo takes it, the prompt gives it up.
PROMPT_KEYS: frozenset[str] = frozenset(
    {
        "enter",
        "up",
        "down",
        "left",
        "right",
        "ctrl+left",
        "ctrl+right",
        "home",
        "end",
        "ctrl+a",
        "ctrl+e",
        "pageup",
        "pagedown",
        "ctrl+shift+left",
        "ctrl+shift+right",
        "shift+home",
        "shift+end",
        "shift+up",
        "shift+down",
        "shift+left",
        "shift+right",
        "f7",
        "backspace",
        "ctrl+w",
        "ctrl+backspace",
        "alt+backspace",
        "delete",
        "ctrl+d",
        "alt+delete",
        "ctrl+x",
        "ctrl+c",
        "ctrl+v",
        "ctrl+u",
        "ctrl+k",
        "ctrl+shift+k",
        "ctrl+z",
        "ctrl+y",
        "ctrl+shift+a",
    }
)

MODIFIERS = ("alt", "ctrl", "shift")  # in the order Textual writes them
NAMED_KEYS: tuple[str, ...] = (
    "escape",
    "enter",
    "tab",
    "backspace",
    "delete",
    "insert",
    "home",
    "end",
    "pageup",
    "pagedown",
    "up",
    "down",
    "left",
    "right",
    "space",
    *(f"f{n}" for n in range(1, 25)),
)

# Textual names a punctuation key after its Unicode name, with a few shortened.
_NAME_REPLACEMENTS = {
    "solidus": "slash",
    "reverse_solidus": "backslash",
    "commercial_at": "at",
    "hyphen_minus": "minus",
    "plus_sign": "plus",
    "low_line": "underscore",
}


def character_key(character: str) -> str:
    """The key name of a printable ASCII character, as Textual names it: `a`, `7`, `slash`, `question_mark`."""
    if character.isalnum():
        return character
    name = unicodedata.name(character).lower().replace("-", "_").replace(" ", "_")
    return _NAME_REPLACEMENTS.get(name, name)


_PUNCTUATION = "".join(chr(c) for c in range(0x21, 0x7F) if not chr(c).isalnum())
PUNCTUATION_KEYS: tuple[str, ...] = tuple(character_key(c) for c in _PUNCTUATION)
LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")
DIGITS = tuple("0123456789")

VALID_KEY_NAMES: tuple[str, ...] = (*NAMED_KEYS, *LETTERS, *DIGITS, *PUNCTUATION_KEYS)
"""Every key name a binding may end with, after its modifiers (a capital letter alone is a typed capital)."""

_BY_CHARACTER = {c: character_key(c) for c in _PUNCTUATION}
_VALID = frozenset(VALID_KEY_NAMES)

ALLOWED = (
    "a key is a name such as ctrl+r, alt+u, f6, escape, shift+f8 or ctrl+slash: modifiers ctrl+, alt+, shift+ "
    "before a letter, a digit, a punctuation name (slash, question_mark, ...), f1 to f24, escape, enter, tab, "
    "backspace, delete, insert, home, end, pageup, pagedown, up, down, left, right or space; "
    'several keys go comma-separated, e.g. "f6,alt+u"'
)


class KeyNameError(ValueError):
    """A key name that is not one; the message says why."""


def normalize_key(text: str) -> str:
    """The canonical Textual name of one key (`Ctrl+R` -> `ctrl+r`, `?` -> `question_mark`, `shift+k` -> `K`);
    raise `KeyNameError` for anything that is not a key."""
    raw = text.strip()
    if not raw:
        raise KeyNameError("an empty key name")
    if len(raw) == 1:
        return _single(raw, ())
    # "ctrl++" names the plus key
    parts = [*raw[:-2].split("+"), "+"] if raw.endswith("++") else raw.split("+")
    *mods, base = parts
    modifiers: list[str] = []
    for mod in mods:
        name = mod.strip().lower()
        if name not in MODIFIERS:
            raise KeyNameError(f"'{mod}' is not a modifier (use ctrl+, alt+ or shift+)")
        if name in modifiers:
            raise KeyNameError(f"{name}+ is given twice")
        modifiers.append(name)
    base = base.strip()
    if not base:
        raise KeyNameError("a modifier with no key after it")
    return _single(base, tuple(modifiers))


def _single(base: str, modifiers: tuple[str, ...]) -> str:
    mods = set(modifiers)
    if len(base) == 1:
        if base.isascii() and base.isalpha() and base.isupper():
            if not mods:
                mods.add("shift")  # a capital alone is a typed capital; "Ctrl+R" is written the README's way
            base = base.lower()
        elif base in _BY_CHARACTER:
            base = _BY_CHARACTER[base]
        elif not (base.isascii() and base.isalnum()):
            raise KeyNameError(f"'{base}' is not a key on its own (name it, e.g. slash or question_mark)")
    else:
        lowered = base.lower()
        if lowered not in _VALID:
            close = difflib.get_close_matches(lowered, VALID_KEY_NAMES, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise KeyNameError(f"'{base}' is not a key name{hint}")
        base = lowered
    if base in LETTERS and mods == {"shift"}:
        return base.upper()  # what Textual reports for a typed capital
    return "+".join([*(m for m in MODIFIERS if m in mods), base])


def types_text(key: str) -> bool:
    """True for a key that types a character (a letter, digit, punctuation or space, maybe with shift)."""
    *mods, base = key.split("+")
    if set(mods) - {"shift"}:
        return False
    return base == "space" or base not in NAMED_KEYS


def default_keys(binding_id: str) -> str:
    return BY_ID[binding_id].keys


def check_keys(table: Mapping[str, object], file: Path) -> dict[str, str]:
    """Validate a `[keys]` table (binding id -> "key[,key...]"); return it with every key name normalized.

    Raises ConfigError (file, `keys.ID`, what is wrong and what is allowed) for an unknown id, a value that is
    not a string of key names, a key the prompt types or uses for editing, a key two actions of one screen
    share, a key on another screen that quit (which works everywhere) already takes, or a keymap that leaves
    quit or help without a key.
    """
    out: dict[str, str] = {}
    for binding_id, value in table.items():
        dotted = f"keys.{binding_id}"
        spec = BY_ID.get(binding_id)
        if spec is None:
            close = difflib.get_close_matches(binding_id, list(BY_ID), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(file, dotted, f"no action has this id; {hint}F1 in tuichat lists the ids")
        if not isinstance(value, str):
            raise ConfigError(file, dotted, f'must be a string of keys, e.g. {binding_id} = "{spec.keys}"')
        names: list[str] = []
        for part in value.split(","):
            if not part.strip():
                raise ConfigError(file, dotted, f"'{value}' leaves a key out; {ALLOWED}")
            try:
                name = normalize_key(part)
            except KeyNameError as exc:
                raise ConfigError(file, dotted, f"{exc}; {ALLOWED}") from None
            if name in names:
                raise ConfigError(file, dotted, f"{name} is given twice")
            names.append(name)
        for name in names:
            _check_one(file, dotted, spec, name)
        out[binding_id] = ",".join(names)
    _check_together(file, out)
    return out


def _check_one(file: Path, dotted: str, spec: KeyBinding, key: str) -> None:
    if key in SAME_BYTE:
        raise ConfigError(file, dotted, f"{key} reaches tuichat as {SAME_BYTE[key]}: pick another key")
    if key in RESERVED_EVERYWHERE:
        raise ConfigError(file, dotted, f"{key} {RESERVED_EVERYWHERE[key]}: pick another key")
    typing = spec.scope in (CHAT, APP) or spec.priority
    if typing and types_text(key):
        where = "the prompt" if spec.scope in (CHAT, APP) else "a text field"
        raise ConfigError(
            file, dotted, f"{key} types a character into {where}: use a ctrl+, alt+ or function key (e.g. f12)"
        )
    if spec.scope in (CHAT, APP) and spec.id != "newline" and key in PROMPT_KEYS:
        raise ConfigError(file, dotted, f"{key} is an editing key of the prompt: pick another key (e.g. f12)")


def _check_together(file: Path, user: Mapping[str, str]) -> None:
    """The keymap as a whole: no key shared within a screen, quit and help still reachable."""
    effective = {b.id: user.get(b.id, b.keys).split(",") for b in BINDINGS}
    for essential in ("quit", "help"):
        if not [k for k in effective[essential] if k]:
            raise ConfigError(file, f"keys.{essential}", "must keep at least one key")
    owner: dict[tuple[str, str], str] = {}
    global_keys = {k: "quit" for k in effective["quit"]}
    for spec in BINDINGS:
        for key in effective[spec.id]:
            if spec.scope != APP and key in global_keys:
                culprit = spec.id if spec.id in user else "quit"
                raise ConfigError(
                    file, f"keys.{culprit}", f"{key} is quit's key, which works on every screen: pick another key"
                )
            scope = CHAT if spec.scope == APP else spec.scope
            other = owner.get((scope, key))
            if other is not None:
                culprit = spec.id if spec.id in user else other
                partner = other if culprit == spec.id else spec.id
                raise ConfigError(
                    file,
                    f"keys.{culprit}",
                    f"{key} is already {partner}'s key on the same screen: pick another key, or move {partner} too",
                )
            owner[(scope, key)] = spec.id


def keys_for(binding_id: str, user: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The keys of an action under a (checked) user keymap."""
    keys = (user or {}).get(binding_id, BY_ID[binding_id].keys)
    return tuple(k for k in keys.split(",") if k)


def display_key(key: str) -> str:
    """How a key is written for people: `ctrl+r` -> `Ctrl+R`, `f6` -> `F6`, `slash` -> `/`, `K` -> `Shift+K`."""
    *mods, base = key.split("+")
    if len(base) == 1 and base.isupper():
        mods, base = [*mods, "shift"], base.lower()
    if base in _CHARACTER_BY_NAME:
        shown = _CHARACTER_BY_NAME[base]
    elif base in _SHOWN:
        shown = _SHOWN[base]
    else:
        shown = base.upper() if len(base) == 1 or base[1:].isdigit() else base.capitalize()
    return "+".join([*(m.capitalize() for m in MODIFIERS if m in mods), shown])


_SHOWN = {"escape": "Esc", "pageup": "PgUp", "pagedown": "PgDn"}
_CHARACTER_BY_NAME = {name: c for c, name in _BY_CHARACTER.items()}


__all__ = [
    "ALLOWED",
    "BINDINGS",
    "BY_ID",
    "PROMPT_KEYS",
    "VALID_KEY_NAMES",
    "KeyBinding",
    "KeyNameError",
    "check_keys",
    "default_keys",
    "display_key",
    "keys_for",
    "normalize_key",
    "types_text",
]
