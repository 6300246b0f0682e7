"""A saved chat's replies come back drawn from the render cache: exactly as drawn before, without Markdown.

The cache is only a cache: what it gives back must be, character and style, what drawing the reply again gives;
a reply drawn at another width, with another text or stats line, is drawn again; a damaged file is no cache at
all, never an error; and the file, which holds chat text, is private.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from apphelpers import ScriptedServer, app_for, screen_text, wait_for
from rich.segment import Segment
from rich.style import Style

from tuichat.chat.store import Store, default_path
from tuichat.ui import render_cache
from tuichat.ui.render_cache import FILE_NAME, RenderCache, reply_key
from tuichat.ui.widgets import reply_message
from tuichat.ui.widgets.reply_message import ReplyMessage

REPLY = """Here is **the plan**, with `code` and a [link](https://example.com):

```python
def answer() -> int:
    return 42
```

1. first
2. second, *emphasised*
"""


def history_with(tmp_path: Path, replies: int) -> tuple[Path, list[int]]:
    """A history database holding `replies` assistant messages; their ids."""
    path = tmp_path / "history.sqlite3"
    with Store.open(path) as store:
        conv = store.create_conversation(title="t")
        ids = [store.add_message(conv, "assistant", f"reply {n}") for n in range(replies)]
    return path, ids


def test_rows_come_back_with_their_styles_after_a_reopen(tmp_path: Path) -> None:
    history, (msg,) = history_with(tmp_path, 1)
    rows = [
        [Segment("bold red", Style(bold=True, color="red")), Segment(" plain ")],
        [Segment("on blue", Style(bgcolor="#0000ff", italic=True, underline=True)), Segment("中文 ✓", None)],
        [],
    ]
    cache = RenderCache.open(history)
    cache.put("k", rows, msg)
    assert cache.get("k") == rows  # before it is written, too
    cache.close()
    again = RenderCache.open(history)
    assert again.get("k") == rows
    assert again.get("other") is None
    assert stat.S_IMODE((tmp_path / FILE_NAME).stat().st_mode) == 0o600


def test_a_damaged_file_is_an_empty_cache(tmp_path: Path) -> None:
    history, (msg,) = history_with(tmp_path, 1)
    (tmp_path / FILE_NAME).write_bytes(b"this is not sqlite" * 100)
    cache = RenderCache.open(history)  # raises nothing
    cache.put("k", [[Segment("x")]], msg)
    cache.flush()
    assert cache.get("k") is None  # and keeps nothing: every reply is simply drawn
    cache.close()


def test_control_sequences_in_the_file_never_come_back_out(tmp_path: Path) -> None:
    """The file is the user's own, but what it gives back is cleaned like an imported file."""
    history, (msg,) = history_with(tmp_path, 1)
    cache = RenderCache.open(history)
    cache.put("k", [[Segment("title \x1b]0;pwned\x07 and \x1b[2J cleared")]], msg)
    cache.close()
    (line,) = RenderCache.open(history).get("k") or [[]]
    assert "".join(seg.text for seg in line) == "title  and  cleared"


def test_the_least_recently_used_go_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(render_cache, "MAX_ROWS", 3)
    history, ids = history_with(tmp_path, 4)
    cache = RenderCache.open(history)
    for n in range(3):
        cache.put(f"k{n}", [[Segment(str(n))]], ids[n])
        cache.flush()
    assert cache.get("k0") is not None  # read: now the most recently used
    cache.flush()
    cache.put("k3", [[Segment("3")]], ids[3])
    cache.flush()
    kept = {key for key in ("k0", "k1", "k2", "k3") if cache.get(key) is not None}
    assert kept == {"k0", "k2", "k3"}
    cache.close()


def test_what_the_history_deletes_the_cache_forgets(tmp_path: Path) -> None:
    """The drawn rows are chat text: a chat deleted, or an exchange undone, must not live on in the cache."""
    path = tmp_path / "history.sqlite3"
    with Store.open(path) as store:
        kept_conv, gone_conv = store.create_conversation(title="kept"), store.create_conversation(title="gone")
        kept = store.add_message(kept_conv, "assistant", "kept")
        store.add_message(gone_conv, "user", "question")
        gone = store.add_message(gone_conv, "assistant", "gone")
        cache = RenderCache.open(path)
        store.deleted = cache.drop_deleted
        cache.put("kept", [[Segment("kept")]], kept)
        cache.put("gone", [[Segment("secret")]], gone)
        cache.flush()
        assert cache.get("gone") is not None
        store.delete(gone_conv)
        assert cache.get("gone") is None and cache.get("kept") is not None
        cache.close()
    assert b"secret" not in (tmp_path / FILE_NAME).read_bytes() + _wal(tmp_path)


def _wal(folder: Path) -> bytes:
    wal = folder / (FILE_NAME + "-wal")
    return wal.read_bytes() if wal.exists() else b""


def test_the_key_changes_with_everything_the_drawing_depends_on() -> None:
    base = reply_key("done\0stats\0color\0text", 80, None, None, False)
    assert base == reply_key("done\0stats\0color\0text", 80, None, None, False)
    assert base != reply_key("done\0stats\0color\0text", 81, None, None, False)
    assert base != reply_key("done\0stats\0color\0text!", 80, None, None, False)
    assert base != reply_key("stopped\0stats\0color\0text", 80, None, None, False)


def saved_chat() -> int:
    with Store.open(default_path()) as store:
        conv = store.create_conversation(title="saved")
        for n in range(3):
            store.add_message(conv, "user", f"question {n}")
            store.add_message(conv, "assistant", f"{n}: {REPLY}")
        return conv


def drawn_rows(app: object) -> list[list[tuple[str, str]]]:
    """Every reply's rows as drawn on screen: text and style of each segment."""
    rows = []
    for reply in app.screen.query(ReplyMessage):  # type: ignore[attr-defined]
        for y in range(reply.size.height):
            rows.append([(seg.text, str(seg.style)) for seg in reply.render_line(y)])
    return rows


async def test_a_reopened_chat_is_drawn_from_the_cache_exactly_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    saved_chat()
    drawn_fresh: list[str] = []
    real = reply_message.reply_renderable

    def counting(text: str, state: str) -> object:
        drawn_fresh.append(text)
        return real(text, state)  # type: ignore[arg-type]

    monkeypatch.setattr(reply_message, "reply_renderable", counting)

    async def open_chat(width: int) -> tuple[str, list[list[tuple[str, str]]]]:
        app = app_for(ScriptedServer(), continue_last=True, cursor_blink=False)
        async with app.run_test(size=(width, 40)) as pilot:
            await wait_for(pilot, lambda: "2: Here is" in screen_text(app) and not app.chat_screen.restoring)
            await wait_for(pilot, lambda: "second, emphasised" in screen_text(app) and "ready" in screen_text(app))
            return screen_text(app), drawn_rows(app)

    first_text, first_rows = await open_chat(100)
    assert len(drawn_fresh) == 3  # nothing kept yet: every reply is drawn with Markdown
    drawn_fresh.clear()
    again_text, again_rows = await open_chat(100)
    assert drawn_fresh == []  # all three came from the cache
    assert again_text == first_text and again_rows == first_rows  # and exactly as drawn the first time
    await open_chat(90)  # another width wraps differently: drawn again
    assert len(drawn_fresh) == 3
