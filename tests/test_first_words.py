"""A reply's first words are drawn by the reply itself, then the live Markdown takes over (issue 15).

The first word's frame then lays out and paints one widget instead of a Markdown tree composed for it. The user
must not see the switch: the plain words sit on the same cells, in the same colours, with the same row under
them as the Markdown paragraph that replaces them; text that Markdown would draw otherwise (emphasis, code, a
list, a leading space) skips the plain step, so no raw `**` ever flashes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from apphelpers import wait_for
from textual.app import App, ComposeResult
from textual.containers import VerticalScroll

import tuichat.ui.widgets.reply_message as reply_module
from tuichat.chat.turns import Turn
from tuichat.ui.widgets.reply_message import ReplyMessage, looks_plain

MESSAGES_TCSS = Path(reply_module.__file__).parent / "messages.tcss"


@pytest.mark.parametrize(
    "text",
    ["Hello", "Sure! Here is a plan", "2024 was a year", "Déjà vu, 中文 🙂", "a-b and c+d: (x)", "Yes."],
)
def test_text_markdown_draws_as_it_is_looks_plain(text: str) -> None:
    assert looks_plain(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        " leading space",
        "**bold**",
        "`code`",
        "# Title",
        "- item",
        "+ item",
        "1. first",
        "3) third",
        "a\nb",
        "snake_case",
        "see [a](b)",
        "x < y",
        "&amp;",
        "a | b",
        "~~gone~~",
        "back\\slash",
        "=",
        "\ttab",
    ],
)
def test_text_markdown_would_change_does_not(text: str) -> None:
    assert not looks_plain(text)


class Host(App[None]):
    CSS_PATH = [MESSAGES_TCSS]

    def __init__(self) -> None:
        super().__init__()
        self.reply = ReplyMessage(Turn("assistant", "", state="streaming"), live=True)

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield self.reply


def holding_host() -> Host:
    """A host whose reply keeps its plain words until a second write (the take-over after the frame held back)."""
    app = Host()
    app.reply._take_over_soon = lambda: None  # type: ignore[method-assign]
    return app


def screen_lines(app: App[None]) -> list[str]:
    return [line.text for line in app.screen._compositor.render_strips()]


def screen_cells(app: App[None]) -> list[list[tuple[str, object]]]:
    """Every cell on screen with the style it is drawn in (however the rows are cut into segments)."""
    return [
        [(char, segment.style) for segment in strip for char in segment.text]
        for strip in app.screen._compositor.render_strips()
    ]


async def test_the_markdown_takes_over_the_first_words_without_a_visible_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the rows a live reply reserves under its text (GROW_STEP) come either way, a frame after the first words;
    # left out here so that the two frames compared differ only by who draws the words
    monkeypatch.setattr(ReplyMessage, "_reserve_rows", lambda self: None)
    app = Host()
    async with app.run_test(size=(60, 12)) as pilot:
        reply = app.reply
        words = "Sure, here is what happened next in the story of the long road home"
        # the take-over waits for the frame after the write: hold it back to see the plain words' own frame
        takeovers: list[bool] = []
        original = reply._take_over_soon
        reply._take_over_soon = lambda: takeovers.append(True)  # type: ignore[method-assign]
        await reply.write(words)
        await pilot.pause()
        assert reply._markdown is None and not reply.children  # drawn by the reply itself
        await wait_for(pilot, lambda: bool(takeovers))
        plain = screen_cells(app)
        plain_lines = screen_lines(app)
        assert any("road home" in line for line in plain_lines)
        original()
        await wait_for(pilot, lambda: reply._markdown is not None and not reply._plain)
        await pilot.pause()
        assert screen_lines(app) == plain_lines  # the same text on the same cells
        assert screen_cells(app) == plain  # and the same colours and styles
        await reply.write(" and **more** words")  # the stream goes on through the Markdown
        await wait_for(pilot, lambda: any("more words" in line for line in screen_lines(app)))
        assert not any("**" in line for line in screen_lines(app))


async def test_markdown_first_words_go_straight_to_the_markdown() -> None:
    app = Host()
    async with app.run_test(size=(60, 12)) as pilot:
        await app.reply.write("**Bold** start")
        assert app.reply._markdown is not None  # no plain step: the asterisks are never drawn
        await wait_for(pilot, lambda: any("Bold start" in line for line in screen_lines(app)))
        assert not any("**" in line for line in screen_lines(app))


async def test_a_reply_that_ends_during_its_plain_words_is_drawn_finished() -> None:
    app = holding_host()
    async with app.run_test(size=(60, 12)) as pilot:
        reply = app.reply
        await reply.write("Short answer")
        reply.turn.content, reply.turn.state = "Short answer", "done"
        await reply.finish()
        await pilot.pause()
        assert not reply.live and not reply._plain and not reply.children
        lines = screen_lines(app)
        assert any("Short answer" in line for line in lines)
        # the finished form takes exactly its own rows: no spare row held for a paragraph margin
        assert reply.size.height == 1


async def test_words_written_before_the_markdown_takes_over_are_shown_once() -> None:
    app = holding_host()
    async with app.run_test(size=(60, 12)) as pilot:
        reply = app.reply
        await reply.write("First")
        await reply.write(" then *more*")  # the second write hands everything to the Markdown
        assert reply._markdown is not None and not reply._plain
        await wait_for(pilot, lambda: any("First then more" in line for line in screen_lines(app)))
        assert sum(line.count("First") for line in screen_lines(app)) == 1
