"""A finished reply is rendered once per width, however often the layout asks for its height (issue 15).

Textual asks every mounted reply for its height at each arrange pass; Rich's Markdown re-renders and
re-highlights the whole reply each time it is asked. Opening a saved chat did that ~2.4 times per reply.
"""

from __future__ import annotations

from typing import Any

import pytest
from apphelpers import wait_for
from rich.markdown import Markdown
from textual.app import App, ComposeResult
from textual.containers import VerticalScroll

from tuichat.chat.turns import Turn
from tuichat.ui.widgets.reply_message import ReplyMessage

REPLY = "## Answer\n\nSome **text**, then code:\n\n```python\nprint('hello')\n```\n\nAnd a last line."


class Host(App[None]):
    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield ReplyMessage(Turn("assistant", REPLY, state="done"))


async def test_a_finished_reply_renders_once_per_width(monkeypatch: pytest.MonkeyPatch) -> None:
    renders: list[int] = []
    original = Markdown.__rich_console__

    def counting(self: Markdown, console: Any, options: Any) -> Any:
        renders.append(options.max_width)
        return original(self, console, options)

    monkeypatch.setattr(Markdown, "__rich_console__", counting)
    app = Host()
    async with app.run_test(size=(80, 24)) as pilot:
        reply = app.query_one(ReplyMessage)
        await wait_for(pilot, lambda: bool(renders) and reply.size.height > 0)
        first = len(renders)
        for _ in range(5):  # layout passes at the same width ask for the height again
            reply.refresh(layout=True)
            app.screen.refresh(layout=True)
            await pilot.pause()
        assert len(renders) == first
        await pilot.resize_terminal(60, 24)  # another width: drawn again, once
        await wait_for(pilot, lambda: any(w < 78 for w in renders))
        narrow = len(renders)
        for _ in range(3):
            reply.refresh(layout=True)
            await pilot.pause()
        assert len(renders) == narrow


async def test_a_reply_laid_out_before_its_mount_event_still_gets_its_whole_height() -> None:
    # Under load, the screen can lay a just-mounted reply out before the reply has handled its own Mount event
    # (where it sets its text): Textual then keeps the empty visual it measured, and the reply stayed one row high
    # for good, showing its first line only (a stopped reply's mark cut off, seen in the compare screen in CI).
    # Laying out synchronously right after mount() makes that order certain here.
    long = " ".join(f"w{i}" for i in range(200))
    app = Host()
    async with app.run_test(size=(80, 24)) as pilot:
        scroll = app.query_one(VerticalScroll)
        reply = ReplyMessage(Turn("assistant", long, state="stopped"))
        waiting = scroll.mount(reply)
        app.screen._refresh_layout()  # before the reply's message loop has run
        await waiting
        await wait_for(pilot, lambda: reply.size.height > 10)
        lines = [strip.text for strip in reply.render_lines(reply.size.region)]
        assert any("stopped by you" in line for line in lines)
