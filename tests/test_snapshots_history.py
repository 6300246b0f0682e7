"""SVG snapshots of the conversation browser and the image picker at 80x24 and 120x40.

The content is fixed so the pictures never depend on today's date or the machine: conversations are imported
with set timestamps, times are shown in UTC, and the picker's folder sits under a HOME that is the test's
tmp_path (shown as ~/pictures). Update the baselines with `pytest --snapshot-update tests/test_snapshots_history.py`
and look at the report before committing them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from apphelpers import settled, wait_for
from textual.app import App
from textual.pilot import Pilot
from textual.screen import Screen
from textual.widgets import DataTable, Input

from tuichat.chat.store import Store
from tuichat.chat.transfer import import_conversation
from tuichat.ui.screens.history import ConversationsScreen
from tuichat.ui.screens.image_picker import ImagePickerScreen, ImageTree

BASE = 1_767_225_600.0  # 2026-01-01 00:00 UTC

CHATS: list[tuple[str, str | None, list[tuple[str, str]]]] = [
    (
        "Why does AWQ keep some weights in fp16?",
        "internlm/internlm2-chat-7b-4bit",
        [
            ("user", "Why does AWQ keep some weights in fp16?"),
            ("assistant", "AWQ protects the salient weights: scaling them keeps quantization error low."),
        ],
    ),
    (
        "Explain the KV cache in two sentences",
        "internlm2-chat-1_8b",
        [
            ("user", "Explain the KV cache in two sentences"),
            ("assistant", "The KV cache stores keys and values of past tokens so they are not recomputed."),
            ("user", "And cache_max_entry_count?"),
            ("assistant", "It is the share of free GPU memory given to the KV cache."),
        ],
    ),
    (
        "A very long title that goes on and on about tensor parallelism and pipelines",
        "Qwen/Qwen2.5-VL-7B-Instruct",
        [("user", "tp=2 or tp=4 on two H200s?"), ("assistant", "tp=2: one GPU pair, no cross-node traffic.")],
    ),
    ("Server start-up log questions", None, [("user", "What does 'Uvicorn running' mean?")]),
    (
        "Sampling: repetition_penalty 2 went wrong",
        "internlm2-chat-1_8b",
        [
            ("user", "I set repetition_penalty to 2 and got garbage"),
            ("assistant", "Values far above 1 punish every repeated token; try 1.05."),
        ],
    ),
]


class Host(App[None]):
    TITLE = "tuichat"

    def __init__(self, make: Callable[[], Screen[Any]]) -> None:
        super().__init__()
        self.make = make

    def on_mount(self) -> None:
        self.push_screen(self.make())


@pytest.fixture
def utc() -> Iterator[None]:
    """Times on screen in UTC, whatever the machine's zone."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    yield
    if before is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = before
    time.tzset()


@pytest.fixture
def history(tmp_path: Path, utc: None) -> Iterator[Store]:
    with Store.open(tmp_path / "history.sqlite3") as store:
        for index, (title, model, messages) in enumerate(CHATS):
            updated = BASE + index * 86_400 + index * 3_700  # a day and an hour apart
            document = {
                "tuichat_export": 1,
                "conversation": {"title": title, "created": updated - 600, "updated": updated, "model": model},
                "messages": [
                    {"role": role, "content": content, "created": updated - 600 + 60 * n}
                    for n, (role, content) in enumerate(messages)
                ],
            }
            import_conversation(store, json.dumps(document))
        yield store


@pytest.fixture
def pictures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    folder = tmp_path / "pictures"
    for sub in ("holiday", "screenshots", ".cache"):
        (folder / sub).mkdir(parents=True)
    for name in ("cat.png", "diagram.webp", "dog.jpg", "scan.bmp", "spinner.gif", "notes.txt", ".hidden.png"):
        (folder / name).write_bytes(b"x")
    return folder


async def history_ready(pilot: Pilot[Any]) -> None:
    app = pilot.app
    await wait_for(pilot, lambda: isinstance(app.screen, ConversationsScreen))
    await wait_for(pilot, lambda: app.screen.query_one("#history-table", DataTable).row_count == len(CHATS))
    await settled(pilot)


async def search_ready(pilot: Pilot[Any]) -> None:
    await history_ready(pilot)
    await pilot.press("slash")
    screen = pilot.app.screen
    assert isinstance(screen, ConversationsScreen)
    field = screen.query_one("#history-search", Input)
    field.cursor_blink = False
    await pilot.press(*"cache")
    await wait_for(pilot, lambda: screen.searched == "cache")


async def picker_ready(pilot: Pilot[Any]) -> None:
    app = pilot.app
    await wait_for(pilot, lambda: isinstance(app.screen, ImagePickerScreen))
    await wait_for(pilot, lambda: app.screen.query_one(ImageTree).cursor_line == 0)
    await settled(pilot)


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
def test_conversations_screen(snap_compare: Any, history: Store, size: tuple[int, int]) -> None:
    app = Host(lambda: ConversationsScreen(history))
    assert snap_compare(app, terminal_size=size, run_before=history_ready)


def test_conversations_search(snap_compare: Any, history: Store) -> None:
    app = Host(lambda: ConversationsScreen(history))
    assert snap_compare(app, terminal_size=(80, 24), run_before=search_ready)


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
def test_image_picker(snap_compare: Any, pictures: Path, size: tuple[int, int]) -> None:
    app = Host(lambda: ImagePickerScreen(pictures))
    assert snap_compare(app, terminal_size=size, run_before=picker_ready)
