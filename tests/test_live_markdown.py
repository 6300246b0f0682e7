"""The streaming reply's paragraphs grow in steps of rows (issue 15) without ever hiding text that has arrived.

`rows_at_most` decides, without wrapping, whether a paragraph's new text still fits the rows it holds: it must
never say fewer rows than word wrapping really takes, or the end of a streaming reply would be cut off. And a
paragraph that stopped growing must give its spare rows back, so a reply in several paragraphs has no gaps.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from apphelpers import ScriptedServer, app_for, screen_text, wait_for
from rich.console import Console
from rich.text import Text
from textual.app import App, ComposeResult
from textual.pilot import Pilot
from textual.strip import Strip
from textual.visual import Visual

from tuichat.ui.widgets import live_markdown
from tuichat.ui.widgets.live_markdown import ROWS_STEP, LiveMarkdown, LiveParagraph, last_row_start, rows_at_most
from tuichat.ui.widgets.prompt_area import PromptArea


def wrapped_rows(text: str, width: int) -> int:
    console = Console(width=width, file=None, legacy_windows=False)
    return sum(len(Text(line).wrap(console, width)) for line in text.split("\n"))


def test_the_bound_is_never_below_what_word_wrap_takes() -> None:
    rng = random.Random(15)
    alphabet = ["a", "bb", "ccc", "déjà", "x" * 9, "中文", "🙂", "`code`", "https://example.com/a/b"]
    checked = 0
    for _ in range(600):
        width = rng.randint(8, 120)
        words = [rng.choice(alphabet) * rng.randint(1, 3) for _ in range(rng.randint(1, 400))]
        lines = " ".join(words).replace("ccc ccc", "ccc\nccc")
        bound = rows_at_most(lines, width)
        if bound is None:  # a word as wide as a row: no cheap bound, the paragraph is laid out as Textual does
            assert any(len(w) >= width for w in lines.split()) or "中" in lines or "🙂" in lines
            continue
        checked += 1
        assert bound >= wrapped_rows(lines, width), (width, lines[:80])
    assert checked > 250  # most cases have a bound


def test_a_word_wider_than_the_row_has_no_cheap_bound() -> None:
    assert rows_at_most("short words then " + "x" * 50, 40) is None
    assert rows_at_most("fits", 40) == 1
    assert rows_at_most("one\ntwo\nthree", 40) == 3


def slow_server(reply: str, pieces: int, delay: float) -> ScriptedServer:
    server = ScriptedServer(reply)
    server.pieces, server.delay = pieces, delay
    return server


async def send(pilot: Pilot[Any], text: str) -> None:
    prompt = pilot.app.query_one(PromptArea)
    prompt.focus()
    prompt.text = text
    await pilot.press("enter")


async def test_a_streaming_reply_shows_every_word_and_finished_paragraphs_keep_no_spare_rows() -> None:
    paragraphs = [" ".join(f"p{p}w{i}" for i in range(150)) for p in range(3)]  # ~15 rows each at 80 columns
    # three words a chunk, 50 chunks a second: about 3 s
    app = app_for(slow_server("\n\n".join(paragraphs), 150, 0.02), cursor_blink=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "three paragraphs please")
        await wait_for(pilot, lambda: bool(app.query(LiveMarkdown)))
        markdown = app.query_one(LiveMarkdown)
        for p in range(3):
            await wait_for(pilot, lambda p=p: f"p{p}w120" in app.chat.turns[-1].content)
            # the newest word that arrived is drawn: the rows a paragraph holds never cut its end off
            newest = app.chat.turns[-1].content.split()[-1]
            await wait_for(pilot, lambda w=newest: w in screen_text(app))
            blocks = [b for b in markdown.children if isinstance(b, LiveParagraph)]
            assert len(blocks) == p + 1
            assert blocks[-1].reserved > 0  # the long growing one holds rows: a flush is a repaint, not a layout
            assert all(b.reserved == 0 for b in blocks[:-1])  # finished ones hold exactly their own rows
        await wait_for(pilot, lambda: not app.streaming and "p2w149" in screen_text(app))


async def test_a_short_paragraph_takes_exactly_its_rows_while_it_streams() -> None:
    server = slow_server(" ".join(f"s{i}" for i in range(30)), 10, 0.05)  # two rows
    # held before its eighth piece: the reply is still streaming when it is looked at, however slow the machine
    server.hold_at = (8, release := asyncio.Event())
    app = app_for(server, cursor_blink=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "a short one")
        await wait_for(pilot, lambda: "s20" in app.chat.turns[-1].content and "s20" in screen_text(app))
        assert app.streaming
        # the live Markdown has taken over from the plain first words by the time a second chunk is drawn
        await wait_for(pilot, lambda: bool(app.query(LiveParagraph)))
        blocks = list(app.query(LiveParagraph).results())
        assert all(b.reserved == 0 for b in blocks)  # no spare rows under a short reply
        release.set()
        await wait_for(pilot, lambda: not app.streaming and "s29" in screen_text(app))


def blank_rows_under_the_reply(text: str) -> int:
    """Rows between the last line of reply text and the prompt box, in the chat column."""
    lines = text.splitlines()
    top = next(i for i, line in enumerate(lines) if line.lstrip().startswith("╭"))
    last = max(i for i, line in enumerate(lines[:top]) if "w" in line and any(c.isdigit() for c in line))
    return sum(1 for line in lines[last + 1 : top] if not line.strip(" █▏▕│"))


async def test_the_newest_words_stay_near_the_bottom_while_a_long_paragraph_streams() -> None:
    app = app_for(slow_server(" ".join(f"w{i}" for i in range(600)), 200, 0.02), cursor_blink=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await send(pilot, "one long paragraph")
        for words in range(150, 600, 90):
            await wait_for(pilot, lambda n=words: f"w{n}" in app.chat.turns[-1].content)
            newest = app.chat.turns[-1].content.split()[-1]
            await wait_for(pilot, lambda w=newest: w in screen_text(app))
            # what the paragraph holds ahead (< one step, plus the bound's slack of a row), and nothing on top
            assert blank_rows_under_the_reply(screen_text(app)) <= ROWS_STEP + 2
        await wait_for(pilot, lambda: not app.streaming)


class OneReply(App[None]):
    def compose(self) -> ComposeResult:
        yield LiveMarkdown()


def row_cells(strip: Strip) -> list[tuple[str, object]]:
    return [(segment.text, segment.style) for segment in strip]


async def test_rows_kept_between_flushes_are_the_rows_a_whole_wrap_gives(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the last row of the growing paragraph is wrapped again at each flush: what it draws must still be,
    row for row and style for style, what wrapping the whole text gives, whatever the flushes cut through (words,
    bold and code markers, wide characters)."""
    rng = random.Random(19)
    words = ["a", "word", "longer", "**bold text**", "`code`", "déjà", "中文", "x" * 12, "*em*", "end."]
    text = " ".join(rng.choice(words) for _ in range(450))
    wrapped: list[int] = []  # the length of each text whose last row was looked for: the whole, or a tail

    def spy(text: str, width: int) -> int:
        wrapped.append(len(text))
        return last_row_start(text, width)

    monkeypatch.setattr(live_markdown, "last_row_start", spy)
    app = OneReply()
    async with app.run_test(size=(70, 40)) as pilot:
        markdown = app.query_one(LiveMarkdown)
        at, checked = 0, 0
        while at < len(text):
            step = rng.randint(1, 40)
            await markdown.append(text[at : at + step])
            at += step
            await pilot.pause()
            paragraph = markdown.query(LiveParagraph).last()
            if not paragraph.reserved:
                continue
            width = paragraph.size.width
            whole = Visual.to_strips(paragraph, paragraph._content, width, None, paragraph.visual_style)
            drawn = [paragraph.render_line(y) for y in range(len(whole))]
            assert [row_cells(s) for s in drawn] == [row_cells(s) for s in whole], at
            checked += 1
        assert checked > 60
        # most flushes wrapped only a tail of a row or two, not the paragraph (thousands of characters by then)
        assert sum(n < 3 * 70 for n in wrapped) > 0.6 * len(wrapped) and max(wrapped) > 2000


async def test_the_first_words_go_into_the_paragraph_mounted_with_the_reply() -> None:
    # Mounting a block for the first words was on the first token's path; the empty paragraph mounted with the
    # live Markdown (while the server prefills) takes them instead, and a first block of another kind replaces it.
    app = OneReply()
    async with app.run_test(size=(70, 20)) as pilot:
        markdown = app.query_one(LiveMarkdown)
        (empty,) = markdown.children
        assert isinstance(empty, LiveParagraph) and not empty._content.plain
        await markdown.append("The first words")
        await pilot.pause()
        assert list(markdown.children) == [empty] and empty._content.plain == "The first words"
        assert screen_text(app).splitlines()[0].strip() == "The first words"  # no blank row above them

    app = OneReply()
    async with app.run_test(size=(70, 20)) as pilot:
        markdown = app.query_one(LiveMarkdown)
        await markdown.append("```python\nprint(1)\n")
        await wait_for(pilot, lambda: "print(1)" in screen_text(app))
        assert not markdown.query(LiveParagraph)
