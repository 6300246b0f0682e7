"""Textual's own floor: the emptiest app that still draws a frame (one Static), to time start-up against."""

from textual.app import App, ComposeResult
from textual.widgets import Static


class Floor(App[None]):
    def compose(self) -> ComposeResult:
        yield Static("floor ready")


if __name__ == "__main__":
    Floor().run()
