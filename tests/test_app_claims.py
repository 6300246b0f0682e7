"""Two tuichats on one chat, seen from the app: the one that holds it writes, the other says so and starts a new
chat or shows it read-only. The other tuichat is a real second process (tests/store_writer.py --hold)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from apphelpers import ScriptedServer, app_for, screen_text, wait_for
from test_app import type_and_send
from test_claims import Holder
from textual.widgets._toast import Toast

from tuichat.chat.store import Store, default_path
from tuichat.ui.app import TuichatApp
from tuichat.ui.screens.dialogs import ConfirmScreen
from tuichat.ui.screens.history import ConversationsScreen
from tuichat.ui.widgets.prompt_area import PromptArea

SEEDED = ["first words", "first reply"]


def contents(conv_id: int) -> list[str]:
    with Store.open() as store:
        return [m.content for m in store.messages(conv_id)]


def said(app: TuichatApp, text: str) -> int:
    """How many notifications so far contain `text`."""
    return sum(text in n.message for n in app._notifications)


def toasts(app: TuichatApp) -> str:
    """The text of the notices on screen as a user reads them (each toast's part of the screen, lines joined)."""
    strips = app.screen._compositor.render_strips()
    lines = []
    for toast in app.screen.query(Toast):
        region = toast.region
        for y in range(region.y, min(region.bottom, len(strips))):
            lines.append(strips[y].crop(region.x, region.right).text.strip(" ▌▐"))
    return " ".join(" ".join(lines).split())


@pytest.fixture
def held() -> Iterator[tuple[Holder, int]]:
    """A saved chat that another live tuichat process holds."""
    with Store.open() as store:
        conv = store.create_conversation(model="tiny-chat")
        for role, text in zip(("user", "assistant"), SEEDED, strict=True):
            store.add_message(conv, role, text)
    other = Holder(default_path(), conv)
    try:
        assert other.answer() == f"HELD {other.proc.pid}"
        yield other, conv
    finally:
        other.stop()


def tries_to_take(conv_id: int) -> tuple[str, int]:
    """A third tuichat process tries to take `conv_id`: its answer (`BUSY <holder pid>` or `HELD <its pid>`), and
    its own pid."""
    third = Holder(default_path(), conv_id)
    try:
        return third.answer(), third.proc.pid
    finally:
        third.stop()


async def open_from_f4(pilot: Any, app: TuichatApp) -> None:
    """F4, Enter on the (only) chat, and yes to reading it without writing."""
    await pilot.press("f4")
    await wait_for(pilot, lambda: isinstance(app.screen, ConversationsScreen))
    await pilot.press("enter")
    await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
    await pilot.press("y")
    await wait_for(pilot, lambda: "first reply" in screen_text(app))


@pytest.mark.parametrize("how", ["conversation", "continue"])
async def test_a_held_chat_asked_for_on_the_command_line_leaves_a_new_chat(held: tuple[Holder, int], how: str) -> None:
    other, conv = held
    server = ScriptedServer("a fresh reply")
    options: dict[str, Any] = {"conversation_id": conv} if how == "conversation" else {"continue_last": True}
    app = app_for(server, **options)
    async with app.run_test(size=(120, 40), notifications=True) as pilot:
        await wait_for(pilot, lambda: said(app, "This is a new chat; F4 can show that one read-only.") == 1)
        await wait_for(
            pilot, lambda: f"Conversation {conv} is open in another tuichat (pid {other.proc.pid}" in toasts(app)
        )
        assert "first reply" not in screen_text(app)  # not shown, so nothing suggests it continues here
        await type_and_send(pilot, "a new question")
        await wait_for(pilot, lambda: not app.streaming and "a fresh reply" in screen_text(app))
        new = app.conversation_id
        assert new is not None and new != conv
        assert contents(new) == ["a new question", "a fresh reply"]
        # The app holds its new chat from the start: a third tuichat is told so.
        assert tries_to_take(new)[0] == f"BUSY {os.getpid()}"
    assert contents(conv) == SEEDED
    assert other.send("add still the holder's") == "ADDED"
    assert contents(conv) == [*SEEDED, "still the holder's"]


async def test_f4_shows_a_held_chat_read_only_and_refuses_every_change(held: tuple[Holder, int]) -> None:
    other, conv = held
    server = ScriptedServer("must not be asked")
    app = app_for(server)
    async with app.run_test(size=(120, 40), notifications=True) as pilot:
        await open_from_f4(pilot, app)
        assert f"read-only: another tuichat (pid {other.proc.pid}) has this chat open" in screen_text(app)
        assert app.sub_title.endswith(f" · read-only, open in pid {other.proc.pid}")
        refusal = "It is read-only here"
        await type_and_send(pilot, "interleaved?")
        await wait_for(pilot, lambda: said(app, refusal) == 1)
        sentence = f"Conversation {conv} is open in another tuichat (pid {other.proc.pid}"
        await wait_for(
            pilot, lambda: sentence in toasts(app) and f"start a new chat ({app.key_name('new_chat')})" in toasts(app)
        )
        assert app.query_one(PromptArea).text == "interleaved?"  # what was typed is kept, not lost
        for count, key in enumerate(("ctrl+r", "f6", "ctrl+l"), start=2):  # Retry, Undo, Clear
            await pilot.press(key)
            await wait_for(pilot, lambda n=count: said(app, refusal) == n)  # type: ignore[misc]
            assert not isinstance(app.screen, ConfirmScreen)
        await pilot.pause()
        assert "first words" in screen_text(app) and "first reply" in screen_text(app)
        assert server.requests == [] and not app.streaming
        # The holder goes on writing; nothing of ours is interleaved with its turns.
        assert other.send("add the holder's next words") == "ADDED"
    assert contents(conv) == [*SEEDED, "the holder's next words"]


@pytest.mark.parametrize("how", ["released", "killed"])
async def test_a_read_only_chat_continues_once_its_holder_lets_go(held: tuple[Holder, int], how: str) -> None:
    other, conv = held
    server = ScriptedServer("my reply")
    app = app_for(server)
    async with app.run_test(size=(120, 40), notifications=True) as pilot:
        await open_from_f4(pilot, app)
        if how == "released":
            assert other.send("release") == "RELEASED"  # the other tuichat moved to a new chat
        else:
            other.stop()  # kill -9: the other tuichat is gone
        await type_and_send(pilot, "my turn now")
        await wait_for(pilot, lambda: not app.streaming and "my reply" in screen_text(app))
        assert said(app, "let go of this chat: it continues here") == 1
        assert "has this chat open" not in screen_text(app) and "read-only" not in app.sub_title
        assert contents(conv) == [*SEEDED, "my turn now", "my reply"]
        answer, _ = tries_to_take(conv)
        assert answer == f"BUSY {os.getpid()}"  # now this tuichat holds it
        await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: said(app, "New chat") == 1)
        answer, pid = tries_to_take(conv)
        assert answer == f"HELD {pid}"  # a new chat lets the old one go at once, not at quit


async def test_quitting_lets_the_chat_go(held: tuple[Holder, int]) -> None:
    other, conv = held
    assert other.send("release") == "RELEASED"
    app = app_for(ScriptedServer("x"), conversation_id=conv)
    async with app.run_test(size=(120, 40), notifications=True) as pilot:
        await wait_for(pilot, lambda: "first reply" in screen_text(app))
        assert "read-only" not in screen_text(app) and said(app, "open in another tuichat") == 0
        assert other.send("add sneaking in").startswith(f"REFUSED Conversation {conv} is open in another tuichat")
        assert tries_to_take(conv)[0] == f"BUSY {os.getpid()}"
    answer, pid = tries_to_take(conv)
    assert answer == f"HELD {pid}"
    assert contents(conv) == SEEDED
