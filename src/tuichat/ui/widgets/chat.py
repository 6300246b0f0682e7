"""Widgets of the chat screen: messages, the prompt, the sampling pane and the status line.

Performance rules from measurements (docs in shared notes): the live reply streams into one `Markdown` widget
through `MarkdownStream`; a finished reply becomes a single `Static` holding a Rich Markdown renderable, because
a long chat slows down with the number of mounted widgets, not with parsing. Model text is never interpreted as
Textual markup (`markup=False` / `Text` objects), and it was cleaned of control sequences by the client.
"""

from __future__ import annotations

from typing import Any, ClassVar

from rich.console import Group, RenderableType
from rich.markdown import Markdown as RichMarkdown
from rich.text import Text
from textual import events, on
from textual.app import ComposeResult
from textual.binding import BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widget import Widget
from textual.widgets import Input, Label, Markdown, Static, TextArea
from textual.widgets.markdown import MarkdownStream

from tuichat.chat.sampling import FIELDS, Sampling, SamplingError, display_value, parse_value
from tuichat.chat.turns import Turn
from tuichat.keymap import keys_for
from tuichat.ui.keyids import binding

STATE_MARKS = {
    "stopped": "■ stopped by you: partial reply",
    "interrupted": "⚠ interrupted: partial reply",
    "error": "⚠ failed: partial reply",
    "streaming": "… receiving",
}


def reply_renderable(text: str, state: str) -> RenderableType:
    body: RenderableType = RichMarkdown(text or " ", code_theme="monokai", hyperlinks=False)
    mark = STATE_MARKS.get(state)
    if mark and state != "streaming":
        return Group(body, Text(mark, style="italic yellow"))
    return body


def stats_text(stats: dict[str, Any] | None) -> str:
    """The line under a reply, from the stats dict saved with it (older rows may lack some keys)."""
    from tuichat.server.metrics import format_reply_stats, reply_stats_from_dict

    parsed = reply_stats_from_dict(stats) if stats else None
    return format_reply_stats(parsed) if parsed is not None else ""


class UserMessage(Static):
    """What the user sent; plain text, never markup."""

    def __init__(self, turn: Turn) -> None:
        text = Text(turn.content)
        for att in turn.attachments:
            text.append(f"\n🖼 {att.label()}", style="dim")
        super().__init__(text, classes="message user", markup=False)
        self.turn = turn


class NoteMessage(Static):
    """An error or notice line in the conversation (never sent to the model)."""

    def __init__(self, turn: Turn) -> None:
        prefix = "⚠ " if turn.role == "error" else "ℹ "
        super().__init__(Text(prefix + turn.content), classes=f"message {turn.role}", markup=False)
        self.turn = turn


class ReplyMessage(Vertical):
    """An assistant reply: a live Markdown stream while it arrives, then one cheap Static."""

    def __init__(self, turn: Turn, live: bool = False) -> None:
        super().__init__(classes="message assistant")
        self.turn = turn
        self.live = live
        self._markdown: Markdown | None = None
        self._stream: MarkdownStream | None = None
        self._finishing = False

    def compose(self) -> ComposeResult:
        if self.live:
            self._markdown = Markdown("", classes="live")
            yield self._markdown
        else:
            yield Static(reply_renderable(self.turn.content, self.turn.state), classes="body")
            stats = stats_text(self.turn.stats)
            if stats:
                yield Static(Text(stats), classes="stats")

    async def write(self, text: str) -> None:
        if self._markdown is None:
            return
        if self._stream is None:
            self._stream = Markdown.get_stream(self._markdown)
        await self._stream.write(text)

    async def finish(self) -> None:
        """Swap the live Markdown for the cheap finished form (also fixes any fence left open mid-stream)."""
        self._finishing = True
        try:
            if self._stream is not None:
                await self._stream.stop()
                self._stream = None
            self.live = False
            await self.remove_children()
            self._markdown = None
            widgets: list[Widget] = [Static(reply_renderable(self.turn.content, self.turn.state), classes="body")]
            stats = stats_text(self.turn.stats)
            if stats:
                widgets.append(Static(Text(stats), classes="stats"))
            await self.mount_all(widgets)
        finally:
            self._finishing = False
        if stats_text(self.turn.stats) != stats:
            await self.show_stats()  # the stats changed while this ran (a token count came in)

    async def show_stats(self) -> None:
        """Redraw the stats line from `turn.stats` (a /v1/encode count arrived after the reply ended)."""
        if self.live or self._finishing:
            return  # finish() draws the line from the stats as they are by then
        text = stats_text(self.turn.stats)
        lines = self.query(".stats")
        if lines:
            line = lines.first()
            if isinstance(line, Static):
                line.update(Text(text))
        elif text:
            await self.mount(Static(Text(text), classes="stats"))


def _has_command_modifier(key: str) -> bool:
    *modifiers, _base = key.split("+")
    return bool(set(modifiers) & {"ctrl", "alt", "meta", "super", "hyper"})


def message_widget(turn: Turn) -> Widget:
    if turn.role == "user":
        return UserMessage(turn)
    if turn.role == "assistant":
        return ReplyMessage(turn)
    return NoteMessage(turn)


class Conversation(VerticalScroll):
    """The scrolling list of messages; follows the bottom only while the user is at the bottom."""

    can_focus = True

    def on_mount(self) -> None:
        self.anchor()


class PromptArea(TextArea):
    """Multi-line prompt: Enter sends; Ctrl+J or Shift+Enter inserts a newline; pastes never send.

    A key with Ctrl or Alt never types: Textual reports some of them with a printable character (Alt+U as "u"),
    and the TextArea would insert it instead of letting the app's binding act.
    """

    BINDINGS: ClassVar[list[BindingType]] = [binding("newline", show=False)]

    # TextArea's own F6 ("select line") would shadow the app's undo key; the prompt gives it up.
    GIVEN_UP: ClassVar[frozenset[str]] = frozenset({"select_line"})

    # The newline keys act here, at once: a binding runs only after the key bubbled up to the app, and
    # characters typed right after it would land before the new line. The app sets these from the keymap.
    newline_keys: frozenset[str] = frozenset(keys_for("newline"))

    class Submitted(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", **kwargs)

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            # A paste arrives as one Paste event, not as key presses, so pasted newlines never get here.
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self.text))
            return
        if event.key in self.newline_keys:
            event.stop()
            event.prevent_default()
            self.action_newline()
            return
        if _has_command_modifier(event.key):
            # Typed nowhere, and still on its way to the bindings (prevent_default would stop those too).
            event.character = None
        await super()._on_key(event)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in self.GIVEN_UP:
            return False  # the key goes on to the app's bindings
        return super().check_action(action, parameters)

    def action_newline(self) -> None:
        self.insert("\n")


class SamplingPane(VerticalScroll):
    """Sampling values for the next request, validated as typed; blank fields are left to the server."""

    class Changed(Message):
        def __init__(self, sampling: Sampling) -> None:
            super().__init__()
            self.sampling = sampling

    def __init__(self, sampling: Sampling, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sampling = sampling
        self.errors: dict[str, str] = {}

    def compose(self) -> ComposeResult:
        yield Label("Sampling · next request", classes="pane-title")
        yield Label("blank = server default", classes="hint")
        yield Label("System prompt", classes="field-label")
        yield TextArea(self.sampling.system_prompt, id="system_prompt", soft_wrap=True, tab_behavior="focus")
        for spec in FIELDS:
            with Horizontal(classes="field-row"):
                yield Label(spec.name, classes="field-name")
                yield Input(
                    display_value(self.sampling, spec.name),
                    placeholder=spec.rule.replace("in ", "") if spec.rule and spec.name != "seed" else "none",
                    id=spec.name,
                    tooltip=f"{spec.label}: {spec.help}" + (f"; {spec.rule}" if spec.rule else ""),
                    compact=True,
                )
            yield Label("", id=f"{spec.name}-error", classes="field-error")

    def set_value(self, name: str, text: str) -> None:
        """Programmatic edit (tests, command palette): same path as typing."""
        widget = self.query_one(f"#{name}")
        if isinstance(widget, Input):
            widget.value = text
        elif isinstance(widget, TextArea):
            widget.text = text

    def _apply(self, name: str, text: str) -> None:
        error_label = self.query_one(f"#{name}-error", Label) if name != "system_prompt" else None
        try:
            value = parse_value(name, text)
        except SamplingError as exc:
            self.errors[name] = exc.message
            if error_label is not None:
                error_label.update(Text(exc.message))
                error_label.display = True
            return
        self.errors.pop(name, None)
        if error_label is not None:
            error_label.update("")
            error_label.display = False
        if getattr(self.sampling, name) != value:
            self.sampling = self.sampling.with_value(name, value)
            self.post_message(self.Changed(self.sampling))

    @on(Input.Changed)
    def _input_changed(self, event: Input.Changed) -> None:
        event.stop()
        if event.input.id:
            self._apply(event.input.id, event.value)

    @on(TextArea.Changed, "#system_prompt")
    def _system_changed(self, event: TextArea.Changed) -> None:
        event.stop()
        self._apply("system_prompt", event.text_area.text)

    def first_error(self) -> str | None:
        for name, message in self.errors.items():
            return f"{name} {message}"
        return None


class StatusLine(Static):
    """One line: connection state, server, model, and the last reply's speed and token use."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("", markup=False, **kwargs)
        self.state = "connecting"
        self.url = ""
        self.model = ""
        self.last = ""
        self.extra = ""

    def set(self, **values: str) -> None:
        for key, value in values.items():
            setattr(self, key, value)
        self.refresh_line()

    def refresh_line(self) -> None:
        colours = {"ready": "green", "streaming": "cyan", "connecting": "yellow", "starting": "yellow"}
        colour = colours.get(self.state.split(":")[0], "red")
        line = Text.assemble(("● ", colour), (self.state, colour))
        for part in (self.url.removeprefix("http://"), self.model, self.last, self.extra):
            if part:
                line.append(" · ", style="dim")
                line.append(part)
        line.truncate(max(10, self.size.width or 200), overflow="ellipsis")
        self.update(line)

    def on_resize(self) -> None:
        self.refresh_line()
