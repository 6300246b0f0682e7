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
