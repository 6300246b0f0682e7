"""Textual's own floor: the emptiest app that still draws a frame, to time start-up against.

As issue 15 defines it: one `Static` and a `Footer` (showing one key), so the floor pays for what every
keyboard-driven Textual app draws, and the ratio measures what tuichat adds on top.
"""

from textual.app import App, ComposeResult
from textual.widgets import Footer, Static


class Floor(App[None]):
    BINDINGS = [("ctrl+q", "quit", "Quit")]

    def compose(self) -> ComposeResult:
        yield Static("floor ready")
        yield Footer()


if __name__ == "__main__":
    Floor().run()
