"""The sampling pane: the values for the next request, validated as they are typed; blank is the server's default."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.widgets import Input, Label, TextArea

from tuichat.chat.sampling import FIELDS, Sampling, SamplingError, display_value, parse_value


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
