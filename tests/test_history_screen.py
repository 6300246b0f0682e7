"""Pilot tests for the conversation browser: list, open, rename, delete, search, errors, and the 80x24 fit."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from apphelpers import screen_text, wait_for
from textual.app import App
from textual.widgets import DataTable, Input, OptionList

from tuichat.chat.holders import HeldBy
from tuichat.chat.store import Store
from tuichat.chat.transfer import import_conversation
from tuichat.errors import TuichatError
from tuichat.ui.screens import history as history_screen
from tuichat.ui.screens.dialogs import ConfirmScreen
from tuichat.ui.screens.history import ConversationsScreen, HistoryChoice


class Host(App[None]):
    """Pushes the screen at start and records what it dismissed with."""

    def __init__(self, store: Store) -> None:
        super().__init__()
        self.store = store
        self.results: list[Any] = []

    def on_mount(self) -> None:
        self.push_screen(ConversationsScreen(self.store), self.results.append)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "history.sqlite3") as opened:
        yield opened


def chat(store: Store, question: str, answer: str, model: str | None = "internlm2-chat-1_8b") -> int:
    conv = store.create_conversation(model=model)
    store.add_message(conv, "user", question)
    store.add_message(conv, "assistant", answer)
    return conv


async def opened(pilot: Any) -> ConversationsScreen:
    app = pilot.app
    await wait_for(pilot, lambda: isinstance(app.screen, ConversationsScreen))
    screen = app.screen
    assert isinstance(screen, ConversationsScreen)
    await wait_for(pilot, lambda: "Saved conversations" in screen_text(app))
    return screen


def footer(app: App[Any]) -> str:
    return screen_text(app).splitlines()[-1].strip()


def header_line(app: App[Any]) -> str:
    return next(line for line in screen_text(app).splitlines() if "Updated" in line)


def rows(app: App[Any]) -> list[str]:
    """Conversation titles in the order the table shows them."""
    table = app.screen.query_one("#history-table", DataTable)
    return [str(table.get_row_at(i)[0]) for i in range(table.row_count)]


async def test_newest_first_with_time_message_count_and_model(store: Store) -> None:
    old = chat(store, "How do pandas eat bamboo", "Slowly.", model="internlm/internlm2-chat-7b")
    chat(store, "Why is the sky blue", "Rayleigh scattering.")
    chat(store, "Explain KV cache", "It keeps keys and values.")
    store.add_message(old, "user", "and what about red pandas?")  # activity moves it to the top
    app = Host(store)
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot)
        assert rows(app) == ["How do pandas eat bamboo", "Explain KV cache", "Why is the sky blue"]
        text = screen_text(app)
        assert "Saved conversations · 3" in text
        line = next(line for line in text.splitlines() if "pandas" in line)
        assert time.strftime("%Y-%m-%d") in line
        assert " 3 " in line  # its message count
        assert "internlm2-chat-7b" in line and "internlm/" not in line  # the model, without the org prefix


async def test_enter_opens_the_highlighted_conversation(store: Store) -> None:
    first = chat(store, "first question", "a")
    chat(store, "second question", "b")
    app = Host(store)
    async with app.run_test(size=(80, 24)) as pilot:
        await opened(pilot)
        await pilot.press("down", "enter")
        await wait_for(pilot, lambda: bool(app.results))
    assert app.results == [HistoryChoice(first, None)]


async def test_rename_is_saved_and_escape_cancels_it(store: Store) -> None:
    conv = chat(store, "old title here", "a")
    app = Host(store)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await opened(pilot)
        await pilot.press("r")
        field = screen.query_one("#history-rename", Input)
        assert field.has_focus and field.value == "old title here"
        await wait_for(pilot, lambda: field.selected_text == "old title here")  # typing replaces it
        await pilot.press(*"GPU notes", "enter")
        await wait_for(pilot, lambda: rows(app) == ["GPU notes"])
        assert "New title:" not in screen_text(app)
        stored = store.get_conversation(conv)
        assert stored is not None and stored.title == "GPU notes"

        await pilot.press("r", "x", "y", "escape")
        assert "New title:" not in screen_text(app)
        assert rows(app) == ["GPU notes"]
        stored = store.get_conversation(conv)
        assert stored is not None and stored.title == "GPU notes"
        assert app.results == []  # Esc closed the field, not the screen


async def test_delete_asks_first_n_keeps_and_y_removes(store: Store) -> None:
    keep = chat(store, "keep me", "a")
    gone = chat(store, "delete me", "b")
    app = Host(store)
    async with app.run_test(size=(80, 24)) as pilot:
        await opened(pilot)
        await pilot.press("d")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        assert "delete me" in screen_text(app) and "2 messages" in screen_text(app)
        await pilot.press("n")
        await wait_for(pilot, lambda: isinstance(app.screen, ConversationsScreen))
        assert store.get_conversation(gone) is not None
        assert rows(app) == ["delete me", "keep me"]

        await pilot.press("d")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_for(pilot, lambda: rows(app) == ["keep me"])
        assert store.get_conversation(gone) is None
        assert store.messages(gone) == []
        assert "Saved conversations · 1" in screen_text(app)
        await pilot.press("enter")
        await wait_for(pilot, lambda: bool(app.results))
    assert app.results == [HistoryChoice(keep, None)]


async def test_search_shows_marked_hits_and_enter_returns_conversation_and_message(store: Store) -> None:
    chat(store, "Tell me about pandas", "Pandas eat bamboo most of the day.")
    target = chat(store, "Quantization question", "AWQ keeps salient weights in higher precision.")
    message = store.messages(target)[1].id
    app = Host(store)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await opened(pilot)
        await pilot.press("slash")
        assert screen.query_one("#history-search", Input).has_focus
        await pilot.press(*"salient")
        await wait_for(pilot, lambda: "salient weights" in screen_text(app))
        text = screen_text(app)
        assert "Quantization question" in text
        assert "pandas" not in text.lower()
        hits = screen.query_one("#history-hits", OptionList)
        prompt = hits.get_option_at_index(0).prompt
        marked = [prompt.plain[s.start : s.end] for s in prompt.spans if "reverse" in str(s.style)]
        assert marked == ["salient"]
        await pilot.press("enter")
        await wait_for(pilot, lambda: bool(app.results))
    assert app.results == [HistoryChoice(target, message)]


async def test_search_is_live_and_down_picks_the_next_hit(store: Store) -> None:
    a = chat(store, "bamboo one", "first answer about bamboo")
    b = chat(store, "bamboo two", "second answer about bamboo")
    app = Host(store)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await opened(pilot)
        await pilot.press("slash", *"bamb")  # a prefix: results appear while still typing
        await wait_for(pilot, lambda: len(screen.hits) == 4)
        assert "4 matching messages" in screen_text(app)
        second = screen.hits[1]
        await pilot.press("down", "enter")
        await wait_for(pilot, lambda: bool(app.results))
    assert app.results == [HistoryChoice(second.conversation_id, second.message_id)]
    assert second.conversation_id in (a, b)


async def test_search_waits_for_a_pause_in_typing(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    chat(store, "pandas", "bamboo shoots")
    queries: list[str] = []
    real_search = store.search

    def counting_search(query: str, *args: Any, **kwargs: Any) -> Any:
        queries.append(query)
        return real_search(query, *args, **kwargs)

    monkeypatch.setattr(store, "search", counting_search)
    app = Host(store)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await opened(pilot)
        await pilot.press("slash", *"bamboo sh")
        await wait_for(pilot, lambda: len(screen.hits) == 1)
        await pilot.pause(0.3)
    assert queries[-1] == "bamboo sh"
    assert len(queries) < len("bamboo sh")  # not one query per keystroke


async def test_escape_closes_the_search_first_then_the_screen(store: Store) -> None:
    chat(store, "pandas", "bamboo")
    app = Host(store)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await opened(pilot)
        await pilot.press("slash", *"bamboo")
        await wait_for(pilot, lambda: len(screen.hits) == 1)
        await pilot.press("escape")
        await wait_for(pilot, lambda: "Saved conversations · 1" in screen_text(app))
        assert not screen.query_one("#history-search", Input).display
        assert screen.query_one("#history-table", DataTable).has_focus
        assert app.results == []
        await pilot.press("escape")
        await wait_for(pilot, lambda: bool(app.results))
    assert app.results == [None]


async def test_nasty_search_text_never_crashes_and_is_shown_literally(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(history_screen, "SEARCH_DELAY", 0.01)
    target = chat(store, "markup test", "Use [bold]brackets[/bold] and 'quotes' with NEAR(a b) * carefully")
    app = Host(store)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await opened(pilot)
        await pilot.press("slash")
        field = screen.query_one("#history-search", Input)
        for nasty in ['"', "NEAR(", "*", "a OR", ")", "-x", "'", "\\", "[bold]", "^", "col:x", '""""', "\x00"]:
            field.value = nasty
            await wait_for(pilot, lambda nasty=nasty: screen.searched == nasty.strip())
        field.value = "[bold]brackets"
        await wait_for(pilot, lambda: len(screen.hits) == 1)
        assert "[bold]" in screen_text(app)  # markup-looking text is shown as typed, never interpreted
        field.value = "zzzznothing"
        await wait_for(pilot, lambda: "No message matches “zzzznothing”" in screen_text(app))
        assert isinstance(app.screen, ConversationsScreen)
        field.value = "NEAR(a"
        await wait_for(pilot, lambda: len(screen.hits) == 1)
        await pilot.press("enter")
        await wait_for(pilot, lambda: bool(app.results))
    assert app.results[0].conversation_id == target


async def test_empty_history_says_so_and_how_to_start(store: Store) -> None:
    app = Host(store)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: "No saved conversations yet" in screen_text(app))
        text = screen_text(app)
        assert "type a message and press Enter" in text
        await pilot.press("enter", "r", "d")  # nothing to open, rename or delete: nothing happens
        await pilot.pause(0.05)  # waiting for nothing to happen: no condition to wait for
        assert isinstance(app.screen, ConversationsScreen) and app.results == []
        await pilot.press("escape")
        await wait_for(pilot, lambda: bool(app.results))
    assert app.results == [None]


async def test_fits_80x24_with_long_titles(store: Store) -> None:
    for i in range(30):
        chat(store, f"conversation {i:02d} " + "with a very long title " * 4, "x", model="org/some-model-name")
    app = Host(store)
    async with app.run_test(size=(80, 24)) as pilot:
        await opened(pilot)
        lines = screen_text(app).splitlines()
        assert len(lines) == 24 and all(len(line) <= 80 for line in lines)
        text = "\n".join(lines)
        for header in ("Title", "Updated", "Msgs", "Model"):
            assert header in text
        newest = next(line for line in lines if "conversation 29" in line)
        assert "…" in newest  # the long title is cut, not the columns after it
        assert time.strftime("%Y-%m-%d") in newest and "some-model-name" in newest
        await pilot.resize_terminal(120, 40)  # the title column takes the extra width
        await wait_for(pilot, lambda: header_line(app).index("Updated") > 70)
        await pilot.resize_terminal(80, 24)
        await wait_for(pilot, lambda: header_line(app).index("Model") + len("Model") < 80)
        await wait_for(pilot, lambda: footer(app) == "⏎ Open  r Rename  d Delete  / Search  esc Back")
        await pilot.press("slash", *"conversation")
        await wait_for(pilot, lambda: "30 matching messages" in screen_text(app))
        # several hits visible at once (the title changes a frame before the hit list is drawn)
        await wait_for(pilot, lambda: sum("with a very long" in line for line in screen_text(app).splitlines()) >= 3)
        assert all(len(line) <= 80 for line in screen_text(app).splitlines())
        await wait_for(pilot, lambda: footer(app) == "⏎ Open  esc Back")  # r, d and / type into the search


async def test_store_errors_become_notifications(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    conv = chat(store, "a title", "x")

    def broken_rename(conv_id: int, title: str) -> None:
        raise TuichatError("Could not save to the conversation history (disk I/O error). Free some space.")

    monkeypatch.setattr(store, "rename", broken_rename)
    app = Host(store)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await opened(pilot)
        await pilot.press("r", "z", "enter")
        await wait_for(pilot, lambda: any("disk I/O error" in n.message for n in app._notifications))
        assert screen.query_one("#history-rename", Input).value == "z"  # what was typed is kept
        await pilot.press("escape")
        assert rows(app) == ["a title"]
        assert isinstance(app.screen, ConversationsScreen)
    stored = store.get_conversation(conv)
    assert stored is not None and stored.title == "a title"


async def test_unreadable_history_is_a_notification_not_a_traceback(store: Store) -> None:
    store.close()  # every query now fails inside sqlite3
    app = Host(store)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: any("Could not read the history" in n.message for n in app._notifications))
        assert isinstance(app.screen, ConversationsScreen)
        await pilot.press("escape")
        await wait_for(pilot, lambda: bool(app.results))
    assert app.results == [None]


def fill(path: Path, conversations: int, per_conversation: int) -> None:
    """Bulk-insert a large history in one transaction (the FTS triggers index it as it goes)."""
    now = time.time()
    db = sqlite3.connect(path)
    with db:
        for i in range(conversations):
            cur = db.execute(
                "INSERT INTO conversations (title, created, updated, model) VALUES (?, ?, ?, ?)",
                (f"chat number {i}", now - 10_000 + i, now - 10_000 + i, "internlm2-chat-1_8b"),
            )
            db.executemany(
                "INSERT INTO messages (conversation_id, role, content, created) VALUES (?, ?, ?, ?)",
                [
                    (cur.lastrowid, "user" if j % 2 == 0 else "assistant", f"message {j} of chat {i} about gpus", now)
                    for j in range(per_conversation)
                ],
            )
    db.close()


async def test_a_thousand_conversations_open_and_search_quickly(tmp_path: Path) -> None:
    path = tmp_path / "big.sqlite3"
    Store.open(path).close()
    fill(path, 1000, 10)
    with Store.open(path) as store:
        app = Host(store)
        async with app.run_test(size=(80, 24)) as pilot:
            started = time.perf_counter()
            screen = await opened(pilot)
            await wait_for(pilot, lambda: screen.query_one("#history-table", DataTable).row_count == 1000)
            shown = time.perf_counter() - started
            assert rows(app)[0] == "chat number 999"
            await pilot.press("end")
            await wait_for(pilot, lambda: "chat number 0 " in screen_text(app))
            started = time.perf_counter()
            await pilot.press("home", "slash", "g")  # a one-letter prefix matches all 10,000 messages
            await wait_for(pilot, lambda: len(screen.hits) == 50)
            searched = time.perf_counter() - started
    # Generous bounds (a loaded 2-core CI box): they catch quadratic work, not milliseconds.
    assert shown < 3.0
    assert searched < 3.0


# -- hostile text: nothing saved may drive the terminal -------------------------------------------------------

OSC52 = "\x1b]52;c;cm0gLXJmIH4=\x07"
# What a terminal acts on: C0 controls but newline, DEL, C1, and the bidi controls.
ACTIVE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
# The only sequences Textual itself writes for this screen: CSI (cursor moves, colours).
CSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


def terminal_output(app: App[Any]) -> str:
    """The bytes a full repaint of the screen would send to the terminal (the headless driver drops them)."""
    return app.screen._compositor.render_update(full=True).render_segments(app.console)


def assert_draws_no_control(app: App[Any]) -> None:
    strips = app.screen._compositor.render_strips()
    drawn = "".join(segment.text for strip in strips for segment in strip)
    assert not ACTIVE.search(drawn), repr(drawn)
    # What the terminal would receive: Textual's own CSI sequences and nothing else (no OSC clipboard or title
    # write, no DCS, no C1, no bidi control).
    leftover = CSI.sub("", terminal_output(app))
    assert not ACTIVE.search(leftover), repr(ACTIVE.findall(leftover))


HOSTILE = {
    "tuichat_export": 1,
    "conversation": {
        "title": "pay\u202eslip" + OSC52 + " title\x1b[2J",
        "model": "org/evil-model" + OSC52 + "\x9b2J",
    },
    "messages": [
        {"role": "user", "content": "quokka " + OSC52 + " \u2067hidden"},
        {"role": "assistant", "content": "ok"},
    ],
}


async def test_a_hostile_import_draws_no_control_sequence(store: Store) -> None:
    conv = import_conversation(store, json.dumps(HOSTILE))
    app = Host(store)
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot)
        assert_draws_no_control(app)
        text = screen_text(app)
        assert "pay⟨U+202E⟩slip title" in text  # shown, not applied
        assert "evil-model" in text
        await pilot.press("slash", *"quokka")
        await wait_for(pilot, lambda: "1 matching message" in screen_text(app) and "hidden" in screen_text(app))
        assert_draws_no_control(app)
        assert "⟨U+2067⟩hidden" in screen_text(app)
        await pilot.press("escape", "d")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        assert_draws_no_control(app)
        await pilot.press("n")
        await wait_for(pilot, lambda: isinstance(app.screen, ConversationsScreen))
        await pilot.press("r")
        field = app.screen.query_one("#history-rename", Input)
        assert field.value == "pay⟨U+202E⟩slip title"
    assert store.get_conversation(conv) is not None


async def test_raw_sequences_already_in_the_history_are_cleaned_when_drawn(store: Store) -> None:
    # A history written before imports were cleaned may hold raw sequences: the screen cleans them again.
    conv = chat(store, "placeholder", "x")
    db = sqlite3.connect(store.path)
    try:
        db.execute("UPDATE conversations SET title = ?, model = ? WHERE id = ?", ("t" + OSC52, "m" + OSC52, conv))
        db.execute("UPDATE messages SET content = ? WHERE conversation_id = ?", ("kiwi " + OSC52, conv))
        db.commit()
    finally:
        db.close()
    app = Host(store)
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot)
        assert_draws_no_control(app)
        await pilot.press("slash", *"kiwi")
        await wait_for(pilot, lambda: "2 matching messages" in screen_text(app) and "kiwi" in screen_text(app))
        assert_draws_no_control(app)


# -- a conversation another tuichat holds ---------------------------------------------------------------------


async def test_a_chat_held_elsewhere_is_marked_and_opens_only_read_only(store: Store) -> None:
    free = chat(store, "free chat", "a")
    busy = chat(store, "busy chat", "b")
    with Store.open(store.path) as other:  # another tuichat (same pid here, a real one in test_claims)
        assert not isinstance(other.claim(busy), HeldBy)
        app = Host(store)
        async with app.run_test(size=(100, 30)) as pilot:
            await opened(pilot)
            assert rows(app) == [f"open in pid {os.getpid()} · busy chat", "free chat"]
            await pilot.press("enter")
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
            question = screen_text(app)
            assert f"pid {os.getpid()}" in question and "read it here" in question
            await pilot.press("n")
            await wait_for(pilot, lambda: isinstance(app.screen, ConversationsScreen))
            assert app.results == []
            await pilot.press("enter")
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
            await pilot.press("y")
            await wait_for(pilot, lambda: bool(app.results))
        (choice,) = app.results
        assert choice.conversation_id == busy and choice.read_only
        assert choice.held_by is not None and choice.held_by.pid == os.getpid()

        app = Host(store)
        async with app.run_test(size=(100, 30)) as pilot:
            await opened(pilot)
            await pilot.press("down", "enter")  # a free one opens at once
            await wait_for(pilot, lambda: bool(app.results))
        assert app.results == [HistoryChoice(free, None)]


async def test_a_chat_held_elsewhere_cannot_be_deleted(store: Store) -> None:
    busy = chat(store, "busy chat", "b")
    with Store.open(store.path) as other:
        assert not isinstance(other.claim(busy), HeldBy)
        app = Host(store)
        async with app.run_test(size=(100, 30)) as pilot:
            await opened(pilot)
            await pilot.press("d")
            said = f"open in another tuichat (pid {os.getpid()}"
            await wait_for(pilot, lambda: any(said in n.message for n in app._notifications))
            assert isinstance(app.screen, ConversationsScreen)  # no "delete?" question
            assert rows(app) == [f"open in pid {os.getpid()} · busy chat"]
    assert store.get_conversation(busy) is not None


async def test_a_holder_that_quit_meanwhile_no_longer_blocks_the_pick(store: Store) -> None:
    busy = chat(store, "busy chat", "b")
    other = Store.open(store.path)
    assert not isinstance(other.claim(busy), HeldBy)
    app = Host(store)
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot)
        assert rows(app)[0].startswith("open in pid")
        other.close()  # the other tuichat quits while the list is shown
        await pilot.press("enter")
        await wait_for(pilot, lambda: bool(app.results))
    assert app.results == [HistoryChoice(busy, None)]


async def test_the_two_sides_of_a_compare_run_are_marked_and_listed_together(store: Store) -> None:
    a = chat(store, "Which format is faster", "BF16.")
    b = chat(store, "Which format is faster", "W4A16.")
    chat(store, "Unrelated newer chat", "Sure.")
    store.add_message(a, "user", "and now?")  # a is the newest: b must still follow it
    store.link_pair(a, b, ("bf16", "w4a16"))
    app = Host(store)
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot)
        assert rows(app) == [
            "⇄ A bf16 · Which format is faster",
            "⇄ B w4a16 · Which format is faster",
            "Unrelated newer chat",
        ]
