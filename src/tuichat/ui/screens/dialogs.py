"""Small modal screens: help (every binding), confirm, and the model picker."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import ClassVar

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList, Static
from textual.widgets.option_list import Option

from tuichat.keymap import BY_ID, display_key, keys_for


def help_rows(bindings: Iterable[BindingType], user_keys: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """The help table's rows: each binding's keys (under the user's keymap) and its help from `tuichat.keymap`,
    then the prompt's keys and Textual's own."""
    rows: list[tuple[str, str, str]] = []
    for item in bindings:
        if not isinstance(item, Binding) or item.id is None or item.id not in BY_ID:
            continue
        spec = BY_ID[item.id]
        keys = ", ".join(display_key(k) for k in keys_for(spec.id, user_keys))
        rows.append((keys, spec.help or spec.label, spec.id))
    newline = BY_ID["newline"]
    rows += [
        ("Enter", "Send the prompt", "(prompt)"),
        (", ".join(display_key(k) for k in keys_for("newline", user_keys)), newline.help, newline.id),
        ("Ctrl+P", "Command palette: every action", "(textual)"),
        ("Tab, Shift+Tab", "Move focus between prompt, chat and panes", "(textual)"),
    ]
    return rows


class HelpScreen(ModalScreen[None]):
    """Every key binding of the app and the chat screen, with its id for the [keys] keymap."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,f1,q", "dismiss_help", "Close", id="close_help"),
    ]

    def __init__(self, rows: list[tuple[str, str, str]]) -> None:
        super().__init__()
        self.rows = rows

    def compose(self) -> ComposeResult:
        table = Table(box=None, expand=True, pad_edge=False)
        table.add_column("key", style="bold cyan", no_wrap=True)
        table.add_column("action")
        table.add_column(Text("id (for [keys])"), style="dim", no_wrap=True)
        for key, description, binding_id in self.rows:
            table.add_row(key, description, binding_id)
        with Vertical(id="help-box"):
            yield Label("tuichat keys  ·  Esc closes", classes="pane-title")
            with VerticalScroll():
                yield Static(table)
                yield Static(
                    Text(
                        "Prompt: Enter sends, Ctrl+J adds a line, pasting never sends. "
                        "/image PATH attaches an image. Ctrl+P opens the command palette with every action. "
                        'Rebind keys in config.toml, e.g. [keys] retry = "f12".'
                    ),
                    classes="hint",
                )

    def action_dismiss_help(self) -> None:
        self.dismiss(None)


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question; y or Enter confirms, n or Esc declines."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y,enter", "answer(True)", "Yes", id="confirm_yes"),
        Binding("n,escape", "answer(False)", "No", id="confirm_no"),
    ]

    def __init__(self, question: str, yes: str = "y = yes", no: str = "n / Esc = no") -> None:
        super().__init__()
        self.question = question
        self.yes = yes
        self.no = no

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm-box"):
            yield Static(Text(self.question), id="question")
            yield Label(f"{self.yes}    {self.no}", classes="hint")

    def action_answer(self, value: bool) -> None:
        self.dismiss(value)


class ChoiceScreen(ModalScreen[str | None]):
    """Pick one of several strings (models, profiles); Esc cancels."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel", id="choice_cancel")]

    def __init__(self, title: str, choices: list[str], hints: dict[str, str] | None = None) -> None:
        super().__init__()
        self.title_text = title
        self.choices = choices
        self.hints = hints or {}

    def compose(self) -> ComposeResult:
        with Vertical(id="choice-box"):
            yield Label(self.title_text, classes="pane-title")
            options = []
            for choice in self.choices:
                prompt = Text(choice)
                if choice in self.hints:
                    prompt.append(f"  {self.hints[choice]}", style="dim")
                options.append(Option(prompt, id=choice))
            yield OptionList(*options, id="choices")

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    def action_cancel(self) -> None:
        self.dismiss(None)


class QuitScreen(ModalScreen[tuple[str, bool] | None]):
    """Quitting while a server tuichat launched runs: stop it, or keep it for the next tuichat to re-attach."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("s", "answer('stop', False)", "Stop it", id="quit_stop"),
        Binding("k", "answer('keep', False)", "Keep it", id="quit_keep"),
        Binding("S", "answer('stop', True)", "Always stop", id="quit_always_stop"),
        Binding("K", "answer('keep', True)", "Always keep", id="quit_always_keep"),
        Binding("escape", "cancel", "Cancel", id="quit_cancel"),
    ]

    def __init__(self, name: str, url: str) -> None:
        super().__init__()
        self.server_name = name
        self.url = url

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm-box"):
            yield Static(
                Text(
                    f"The server {self.server_name} ({self.url}) is still running.\n"
                    "Stop it (frees its GPU memory), or keep it so the next `tuichat` re-attaches?"
                ),
                id="question",
            )
            yield Label("s stop · k keep · S / K always (saved as ui.on_quit) · Esc stay", classes="hint")

    def action_answer(self, what: str, remember: bool) -> None:
        self.dismiss((what, remember))

    def action_cancel(self) -> None:
        self.dismiss(None)
