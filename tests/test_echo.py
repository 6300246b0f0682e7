"""After Enter the chat holds its repaint for the reply's first words, but never longer than ECHO_WAIT_S (issue 15).

Holding it lets a quick server's first words come in the same frame as the message just sent; a slow server
must not leave the user looking at their unsent-looking prompt: the message shows on its own, at once.
"""

from __future__ import annotations

import time

from apphelpers import ScriptedServer, app_for, screen_text, wait_for

from tuichat.ui.screens.chat_base import ECHO_WAIT_S
from tuichat.ui.widgets.prompt_area import PromptArea


async def test_a_slow_first_word_does_not_hold_the_sent_message_back() -> None:
    server = ScriptedServer("late words")
    server.delay = 1.0  # the first chunk comes a second after the request
    app = app_for(server, cursor_blink=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: "ready" in screen_text(app))
        prompt = app.query_one(PromptArea)
        prompt.focus()
        prompt.text = "a question for a slow server"
        await pilot.press("enter")
        pressed = time.monotonic()
        await wait_for(pilot, lambda: "a question for a slow server" in screen_text(app) and not prompt.text)
        assert app.streaming and app.chat.turns[-1].content == ""  # shown before any word of the reply came
        assert time.monotonic() - pressed < ECHO_WAIT_S + 0.5
        await wait_for(pilot, lambda: "late words" in screen_text(app), timeout=10)
        assert app.chat_screen._echo_hold is None  # nothing is held once the reply streams


async def test_a_saved_chat_is_on_screen_before_the_server_is_asked_anything() -> None:
    """With --continue the first screen the user waits for is the saved chat: the health check, the first
    status reading and their imports come after it, not in the middle of it (issue 15)."""
    import httpx

    from tuichat.chat.store import Store, default_path

    with Store.open(default_path()) as store:
        conv = store.create_conversation(title="saved")
        for n in range(30):
            store.add_message(conv, "user", f"question {n}")
            store.add_message(conv, "assistant", f"answer number {n}")
    server = ScriptedServer()
    seen_at_first_request: list[bool] = []
    handle = server.handle

    async def watching(request: httpx.Request) -> httpx.Response:
        if not seen_at_first_request:
            seen_at_first_request.append("answer number 29" in screen_text(app))
        return await handle(request)

    server.handle = watching  # type: ignore[method-assign]
    app = app_for(server, continue_last=True, cursor_blink=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: "ready" in screen_text(app))
        assert seen_at_first_request == [True]
        await wait_for(pilot, lambda: len(app.chat_screen.messages.messages()) > 6)  # the rest came after it


async def test_a_server_quicker_than_the_mount_loses_no_word_and_keeps_their_order() -> None:
    # The sent message and the reply are mounted once the request is out; a server that answers at once (this
    # one has no sending to report, so the reply is opened with its first words) writes into a reply still being
    # composed: the first flush waits for it, and the timer's flushes meanwhile keep the words pending, in order.
    words = " ".join(f"n{i}" for i in range(300))
    server = ScriptedServer(words)
    server.pieces, server.delay = 300, 0.0
    app = app_for(server, cursor_blink=False)
    async with app.run_test(size=(100, 40)) as pilot:
        await wait_for(pilot, lambda: "ready" in screen_text(app))
        app.chat_screen.send("count")
        await wait_for(pilot, lambda: not app.streaming and "n299" in screen_text(app), timeout=10)
        assert app.chat.turns[-1].content == words
        shown = screen_text(app)
        assert shown.index("count") < shown.index("n299")
