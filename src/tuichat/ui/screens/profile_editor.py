"""The profile editor: a form over one `[profiles.NAME]` table of config.toml, validated and saved atomically.

The form only turns what was typed into TOML values (numbers where they parse, lists through shlex); every rule
about what is allowed lives in `tuichat.server.profiles.parse_profile`, so the editor, the config loader and
`tuichat profiles` can never disagree. A ConfigError is shown next to the field its key names. Saving goes
through `config.save_profile` (atomic, 0600: the table may hold an API key, which the form never echoes).
Built-in profiles are never changed in place: saving one writes a user profile of the same name that takes
its place, and the form says so before and after.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widget import Widget
from textual.widgets import Checkbox, Input, Label, Select, Static

from tuichat.config import Config, overwrite_question, save_profile
from tuichat.errors import ConfigError
from tuichat.server.profiles import (
    BUILTIN_PROFILES,
    DTYPES,
    LOG_LEVELS,
    MODEL_FORMATS,
    Profile,
    parse_profile,
    profile_to_table,
)
from tuichat.ui.screens.dialogs import ConfirmScreen
from tuichat.ui.widgets.key_footer import KeyFooter

FieldKind = Literal["text", "int", "float", "port", "argv", "select", "bool", "secret"]
LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEFAULT = ""  # the Select value meaning "not set: lmdeploy's own default"


@dataclass(frozen=True)
class FormField:
    """One row of the form: the profile key, how its text becomes a TOML value, and a placeholder."""

    key: str
    kind: FieldKind
    placeholder: str = ""
    options: tuple[str, ...] = ()


FORM: tuple[FormField, ...] = (
    FormField("name", "text", "letters, digits, '.', '_' or '-'"),
    FormField("model", "text", "local model folder, or a hub id like owner/name"),
    FormField("backend", "select", options=("turbomind", "pytorch")),
    FormField("model_format", "select", options=MODEL_FORMATS),
    FormField("tp", "int", "GPUs for tensor parallelism, e.g. 1"),
    FormField("session_len", "int", "context length in tokens"),
    FormField("max_batch_size", "int", "requests batched together"),
    FormField("cache_max_entry_count", "float", "share of free GPU memory for the KV cache, e.g. 0.4"),
    FormField("quant_policy", "select", options=("0", "4", "8")),
    FormField("port", "port", '"auto" (23333 up) or 1-65535'),
    FormField("command", "argv", "blank = lmdeploy of tuichat's own Python"),
    FormField("extra_args", "argv", "more lmdeploy flags, e.g. --eager-mode"),
    FormField("stop_timeout", "float", "seconds before SIGKILL, default 30"),
    FormField("max_prefill_token_num", "int", "tokens per prefill step"),
    FormField("enable_prefix_caching", "bool"),
    FormField("chat_template", "text", "template name or JSON file"),
    FormField("model_name", "text", "name served under /v1/models"),
    FormField("log_level", "select", options=LOG_LEVELS),
    FormField("dtype", "select", options=DTYPES),
    FormField("server_name", "text", "127.0.0.1"),
    FormField("api_key", "secret", "blank = a new random key at each start"),
)
FIELD_KEYS = tuple(f.key for f in FORM)
# What the KV-cache choice buys, in the words of the H200 check: int8 held 2.1x the tokens of the same share.
_OPTION_LABELS = {
    "quant_policy": {
        "0": "0 (KV cache in the model's dtype)",
        "4": "4 (KV int4: ~4x the tokens, some quality lost)",
        "8": "8 (KV int8: ~2x the tokens, near-lossless)",
    }
}


def ask_before_overwriting(
    screen: Screen[Any],
    config: Config,
    name: str,
    go_on: Callable[[], None],
    *,
    editing: str | None = None,
    declined: Callable[[], None] | None = None,
) -> None:
    """The one "replace that profile?" step of every screen that saves a profile: `go_on()` runs at once when
    `name` is free (or is the profile being edited), else only after the user said yes; `declined()` after no."""
    question = None if name == editing else overwrite_question(config, name)
    if question is None:
        go_on()
        return

    def answer(yes: bool | None) -> None:
        if yes:
            go_on()
        elif declined is not None:
            declined()

    screen.app.push_screen(ConfirmScreen(question), answer)


class FieldError(Exception):
    """A value the form itself cannot turn into TOML (an unclosed quote); `key` names the field."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def display_value(value: object) -> str:
    """A table value as the text its field shows."""
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return shlex.join(str(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _number(text: str) -> object:
    # A text that is no number goes to parse_profile as is, which then says what is wrong with it.
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def field_value(spec: FormField, raw: str | bool) -> object | None:
    """The TOML value for what a field holds, or None when it is blank (unset)."""
    if spec.kind == "bool":
        return True if raw else None  # false is the default: leaving it out keeps the table short
    text = str(raw).strip() if spec.kind != "secret" else str(raw)
    if not text.strip():
        return None
    match spec.kind:
        case "int" | "float":
            return _number(text)
        case "port":
            return "auto" if text.lower() == "auto" else _number(text)
        case "argv":
            try:
                return shlex.split(text)
            except ValueError as exc:
                raise FieldError(spec.key, f"cannot be split into words ({exc}): close the quote") from None
        case "select":
            return int(text) if spec.key == "quant_policy" else text
    return text


class ProfileEditorScreen(ModalScreen[str | None]):
    """Create or edit a server profile. Dismisses with the saved profile's name, or None when cancelled."""

    CSS_PATH = str(Path(__file__).with_name("profile_editor.tcss"))  # absolute: a subclass elsewhere finds it too

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+s", "save_profile", "Save", id="save_profile", priority=True),
        Binding("escape", "cancel_edit", "Cancel", id="cancel_profile_edit"),
    ]

    def __init__(self, config: Config, name: str | None) -> None:
        super().__init__()
        self.config = config
        self.original_name = name
        self.is_builtin = name is not None and name in BUILTIN_PROFILES
        self.shadows_builtin = self.is_builtin and name in config.user_profiles
        table: dict[str, object] = {}
        if name is not None and name in config.profiles:
            table = profile_to_table(config.profiles[name])
        self.initial_table = table
        self._initial: dict[str, str | bool] = {}
        self.errors: dict[str, str] = {}

    # -- layout -----------------------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        with Vertical(id="pe-box"):
            yield Label(self._title(), id="pe-title")
            note = Static(Text(self._note()), id="pe-note")
            note.tooltip = str(self.config.path)  # the full path only on hover: it is long, and differs per machine
            yield note
            with VerticalScroll(id="pe-form"):
                for spec in FORM:
                    with Horizontal(classes="pe-row"):
                        yield Label(spec.key, classes="pe-key")
                        yield self._widget(spec)
                    yield Static("", id=f"pe-{spec.key}-error", classes="pe-error")
                    if spec.key == "server_name":
                        yield Static("", id="pe-server_name-warning", classes="pe-warning")
            yield Static("", id="pe-message")
        yield KeyFooter()

    def _title(self) -> str:
        if self.original_name is None:
            return "New server profile"
        return f"Edit profile {self.original_name}"

    def _note(self) -> str:
        where = "Saved to config.toml; blank = not set (lmdeploy's default)."
        if self.shadows_builtin:
            return f"Your {self.original_name} takes the place of the built-in profile of that name. {where}"
        if self.is_builtin:
            return (
                f"{self.original_name} is built in: saving keeps your version in config.toml as a user profile "
                f"of the same name, which takes the built-in's place. {where}"
            )
        return where

    def _widget(self, spec: FormField) -> Widget:
        wid = f"pe-{spec.key}"
        value = (self.original_name or "") if spec.key == "name" else self.initial_table.get(spec.key)
        if spec.kind == "bool":
            return Checkbox("on" if value else "off", bool(value), id=wid, compact=True)
        if spec.kind == "select":
            labels = _OPTION_LABELS.get(spec.key, {})
            options = [("default", DEFAULT), *((labels.get(o, o), o) for o in spec.options)]
            current = display_value(value)
            if current not in spec.options:
                current = DEFAULT
            return Select(options, allow_blank=False, value=current, id=wid, compact=True)
        return Input(
            display_value(value),
            placeholder=spec.placeholder,
            password=spec.kind == "secret",
            id=wid,
            compact=True,
        )

    def on_mount(self) -> None:
        self._initial = self.form_values()
        self._update_server_warning()
        self.query_one("#pe-name" if self.original_name is None else "#pe-model").focus()

    # -- reading the form -------------------------------------------------------------------------------------

    def form_values(self) -> dict[str, str | bool]:
        """What every field holds now, as typed (for the unsaved-changes check)."""
        values: dict[str, str | bool] = {}
        for spec in FORM:
            widget = self.query_one(f"#pe-{spec.key}")
            if isinstance(widget, Checkbox):
                values[spec.key] = widget.value
            elif isinstance(widget, Select):
                values[spec.key] = str(widget.value) if widget.value is not Select.NULL else DEFAULT
            elif isinstance(widget, Input):
                values[spec.key] = widget.value
        return values

    @property
    def changed(self) -> bool:
        return self.form_values() != self._initial

    def table(self) -> tuple[str, dict[str, object]]:
        """The profile name and its table from the form; raises FieldError for text no TOML value fits."""
        values = self.form_values()
        name = str(values["name"]).strip()
        table: dict[str, object] = {}
        for spec in FORM:
            if spec.key == "name":
                continue
            value = field_value(spec, values[spec.key])
            if value is not None:
                table[spec.key] = value
        return name, table

    # -- feedback ---------------------------------------------------------------------------------------------

    def _clear_errors(self) -> None:
        for key in list(self.errors):
            label = self.query_one(f"#pe-{key}-error", Static)
            label.update("")
            label.display = False
        self.errors.clear()
        self._say("")

    def show_error(self, key: str, message: str) -> None:
        """Put `message` under field `key` (or only on the message line when no field has that key)."""
        if key in FIELD_KEYS:
            self.errors[key] = message
            label = self.query_one(f"#pe-{key}-error", Static)
            label.update(Text(f"{key} {message}"))
            label.display = True
            widget = self.query_one(f"#pe-{key}")
            widget.focus()
            self.query_one("#pe-form", VerticalScroll).scroll_to_widget(label, animate=False)
            self._say(f"Not saved: {key} {message}.", "error")
        else:
            self._say(f"Not saved: {message}.", "error")

    def _say(self, text: str, level: str = "info") -> None:
        style = {"error": "bold red", "warning": "yellow"}.get(level, "")
        self.query_one("#pe-message", Static).update(Text(text, style=style))

    @on(Checkbox.Changed)
    def _switched(self, event: Checkbox.Changed) -> None:
        # the compact box differs only in colour: the word says it in every terminal
        event.checkbox.label = "on" if event.value else "off"

    @on(Input.Changed, "#pe-server_name")
    def _server_name_changed(self) -> None:
        self._update_server_warning()

    def _update_server_warning(self) -> None:
        host = self.query_one("#pe-server_name", Input).value.strip()
        label = self.query_one("#pe-server_name-warning", Static)
        public = bool(host) and host not in LOOPBACK
        label.display = public
        label.update(
            Text(
                f"⚠ listening on {host} lets anyone who can reach it use the server with the API key; "
                "prefer 127.0.0.1 and an SSH tunnel."
                if public
                else ""
            )
        )

    # -- saving -----------------------------------------------------------------------------------------------

    def action_save_profile(self) -> None:
        self._clear_errors()
        try:
            name, table = self.table()
        except FieldError as exc:
            self.show_error(exc.key, exc.message)
            return
        try:
            profile = parse_profile(name, table, self.config.path)
        except ConfigError as exc:
            self.show_error(self._field_of(exc.key, name), exc.message)
            return
        ask_before_overwriting(self, self.config, name, lambda: self._write(name, profile), editing=self.original_name)

    @staticmethod
    def _field_of(key: str, name: str) -> str:
        """The form field a ConfigError's dotted key (`profiles.NAME.tp`) points at."""
        prefix = f"profiles.{name}"
        if key.startswith(prefix + "."):
            return key[len(prefix) + 1 :]
        if key == prefix or key.startswith("profiles."):
            return "name"
        return key

    def _write(self, name: str, profile: Profile) -> None:
        try:
            save_profile(name, profile, path=self.config.path)
        except ConfigError as exc:
            self._say(f"Not saved: {exc}. Fix config.toml, then save again.", "error")
            return
        except OSError as exc:
            self._say(
                f"Not saved: cannot write {self.config.path} ({exc.strerror}). Check the folder's permissions.",
                "error",
            )
            return
        if name in BUILTIN_PROFILES:
            self.app.notify(f"Saved {name} as your own profile: it takes the place of the built-in one.")
        else:
            self.app.notify(f"Saved profile {name}.")
        self.dismiss(name)

    # -- leaving ----------------------------------------------------------------------------------------------

    def action_cancel_edit(self) -> None:
        if not self.changed:
            self.dismiss(None)
            return

        def answer(yes: bool | None) -> None:
            if yes:
                self.dismiss(None)

        what = f"to {self.original_name}" if self.original_name else "to this new profile"
        self.app.push_screen(ConfirmScreen(f"Discard your changes {what}?"), answer)
