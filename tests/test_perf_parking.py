"""Turns far off screen are unmounted (parked) and still scroll, select and copy like mounted ones (issue 15)."""

from __future__ import annotations

import gc
from typing import Any

from apphelpers import ScriptedServer, app_for, screen_text, wait_for
from textual._styles_cache import StylesCache
from textual.app import App, ComposeResult
from textual.pilot import Pilot
from textual.widget import Widget

from tuichat.chat.turns import Turn
from tuichat.ui.widgets.message_list import MessageList, ParkedTurns, message_widget
from tuichat.ui.widgets.reply_message import ReplyMessage


class Host(App[None]):
    CSS_PATH = "../src/tuichat/ui/widgets/messages.tcss"

    def compose(self) -> ComposeResult:
        yield MessageList()


def exchange(n: int) -> list[Turn]:
    reply = Turn("assistant", f"reply {n}: " + " ".join(f"w{i}" for i in range(12)), state="done")
    reply.stats = {"ttft_s": 0.1, "decode_tokens_per_s": 50.0, "completion_tokens": 12}
    return [Turn("user", f"question {n}"), reply]


async def filled(pilot: Pilot[Any], exchanges: int) -> tuple[MessageList, list[Turn]]:
    messages = pilot.app.query_one(MessageList)
    turns = [t for n in range(exchanges) for t in exchange(n)]
    await messages.mount_all([message_widget(t) for t in turns])
    messages.scroll_end(animate=False)
    await wait_for(pilot, lambda: bool(messages.parked_turns()))
    return messages, turns


async def test_turns_far_above_are_unmounted_without_moving_the_view() -> None:
    app = Host()
    async with app.run_test(size=(60, 20)) as pilot:
        messages, turns = await filled(pilot, 40)
        await wait_for(pilot, lambda: len(messages.messages()) < 40)
        mounted = messages.messages()
        assert len(mounted) < 40 < len(turns)  # most of the 80 turns cost no widget
        assert len(mounted) + len(messages.parked_turns()) == len(turns)
        assert [w.turn for w in mounted] == turns[-len(mounted) :]  # parked: the oldest, in order
        # the spacer stands in at their full height: the list is as tall, the view still at the bottom
        spacer = messages.query_one(ParkedTurns)
        # (laid out in the frame after it was mounted: on a loaded machine that frame can come after the check)
        await wait_for(pilot, lambda: spacer.size.height > 0)
        assert messages.scroll_y == messages.max_scroll_y
        assert "question 39" in screen_text(app)  # type: ignore[arg-type]


async def test_scrolling_back_up_shows_the_parked_turns_again() -> None:
    app = Host()
    async with app.run_test(size=(60, 20)) as pilot:
        messages, turns = await filled(pilot, 40)
        height = messages.virtual_size.height
        messages.scroll_home(animate=False)
        await wait_for(pilot, lambda: "question 0" in screen_text(app))  # type: ignore[arg-type]
        assert messages.virtual_size.height == height  # mounted again at the height the spacer kept
        assert "reply 0: w0" in screen_text(app)  # type: ignore[arg-type]
        # and the bottom, now far below, is parked in its turn (the newest few always stay mounted)
        await wait_for(pilot, lambda: any(t is turns[40] for t in messages.parked_turns()))
        assert messages.messages()[-1].turn is turns[-1]


async def test_a_parked_turn_can_be_selected_and_asked_for() -> None:
    app = Host()
    async with app.run_test(size=(60, 20)) as pilot:
        messages, turns = await filled(pilot, 40)
        assert turns[0] in messages.parked_turns()
        for _ in range(len(turns)):  # from the newest up to the oldest, through the parked ones
            assert messages.select(-1)
        assert messages.selected_turn() is turns[0]
        await wait_for(pilot, lambda: "question 0" in screen_text(app))  # type: ignore[arg-type]
        # a lookup for a parked turn gets a mounted widget (retry, undo and stats updates work on widgets)
        far = turns[51]  # a reply well below the view at the top
        await wait_for(pilot, lambda: far in messages.parked_turns())
        (widget,) = messages.showing([far])
        assert isinstance(widget, ReplyMessage) and widget.turn is far and far not in messages.parked_turns()


async def test_copying_a_selected_message_from_far_up_a_long_chat() -> None:
    server = ScriptedServer("an answer")
    app = app_for(server, cursor_blink=False)
    async with app.run_test(size=(80, 24)) as pilot:
        prompt = app.query_one("#prompt")
        for n in range(16):  # 32 turns: the first ones are parked at 80x24
            prompt.text = f"message number {n}"  # type: ignore[attr-defined]
            prompt.focus()
            await pilot.press("enter")
            await wait_for(pilot, lambda n=n: not app.streaming and len(app.chat.turns) == 2 * (n + 1))
        messages = app.query_one(MessageList)
        await wait_for(pilot, lambda: any(t.content == "message number 0" for t in messages.parked_turns()))
        for _ in range(32):
            await pilot.press("ctrl+up")
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: app.last_copied == "message number 0")
        await wait_for(pilot, lambda: "message number 0" in screen_text(app))


async def test_parked_turns_leave_none_of_their_drawn_lines_behind() -> None:
    """A parked widget is freed with the lines it drew. Textual keeps widgets' styles caches as keys of an
    lru_cache (up to 1,024 of them, each with every line its widget drew), so without release_line_caches
    every parked turn's lines stayed in memory: a chat left open for days grew by them."""
    app = Host()
    async with app.run_test(size=(60, 20)) as pilot:
        messages = app.query_one(MessageList)
        turns: list[Turn] = []
        for n in range(40):  # one exchange at a time, each drawn at the bottom before it scrolls away, as in a chat
            turns += exchange(n)
            await messages.mount_all([message_widget(t) for t in turns[-2:]])
            messages.scroll_end(animate=False, immediate=True)
            await wait_for(pilot, lambda n=n: f"reply {n}:" in screen_text(app))
        await wait_for(pilot, lambda: len(messages.messages()) < 40)
        await pilot.pause()
        gc.collect()
        alive = [o for o in gc.get_objects() if isinstance(o, Widget)]
        owned = {id(w._styles_cache) for w in alive}
        left = [o for o in gc.get_objects() if isinstance(o, StylesCache) and id(o) not in owned]
        parked = len(turns) - len(messages.messages())
        assert parked > 20
        assert len(left) < 3, f"{len(left)} styles caches of gone widgets for {parked} parked turns"
