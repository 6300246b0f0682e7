"""Finished replies as they were drawn: their rows of styled text, kept on disk beside the history.

Opening a saved chat drew its newest replies with Rich's Markdown, which is ~40 ms of imports (markdown-it, Rich's
Markdown), ~30 ms of compiling a code block's highlighter, and the render itself, all between the first frame and
the chat (bench/RESULTS.md). A reply drawn once is drawn the same the next time at the same width, so its rows are
kept here, keyed by everything the drawing depends on (the text, its state and stats line, the width, the colours,
the versions of Rich and of this drawing), and a restored reply found here is drawn from them without Markdown.

It is a cache: a missing, unreadable or stale file only means drawing again. It holds chat text, so it is 0600 in
the history's private folder, and each entry names the message it was drawn from: entries whose message is no
longer in the history (a chat deleted, an exchange undone, here or by another tuichat) are deleted with every
write and whenever the history deletes something (`drop_deleted`). New rows are written in batches (`flush`,
which the app runs a second after the first new entry: a chat opened and closed at once is kept too), at most
`MAX_ROWS` entries are kept, and the least recently used go first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

from rich.segment import Segment
from rich.style import Style

from tuichat.chat.sanitize import clean

DRAWING_VERSION = 1  # bump when a reply is drawn differently: older entries then never match
FILE_VERSION = 1  # the file's layout: a file of another version is emptied and made again
MAX_ROWS = 4000  # entries kept (a few screens of each of many chats); the least recently used go first
FILE_NAME = "render-cache.sqlite3"

Lines = list[list[Segment]]


@cache
def _versions() -> str:
    """Which Rich and Textual draw: their installed files' times, a stat each (reading package metadata would
    cost the start-up more than the cache saves)."""
    import rich
    import textual

    return ":".join(str(Path(module.__file__ or "").stat().st_mtime_ns) for module in (rich, textual))


def reply_key(*parts: object) -> str:
    """A key for a drawing: the parts (text, state, width, colours...) plus the versions that draw it."""
    text = json.dumps([DRAWING_VERSION, _versions(), *map(str, parts)], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _encode(lines: Lines) -> str:
    return json.dumps([[[seg.text, str(seg.style) if seg.style else ""] for seg in line] for line in lines])


@cache
def _style(text: str) -> Style | None:
    return Style.parse(text) if text else None


def _decode(text: str) -> Lines:
    # cleaned again on the way out, as an imported file is: whatever is in the file, no control sequence of it
    # reaches the terminal (the rows were drawn from clean text, which cleaning leaves as it is)
    return [[Segment(clean(part), _style(style)) for part, style in line] for line in json.loads(text)]


class RenderCache:
    """The drawn rows of finished replies, by `reply_key`; reads at once, writes in batches."""

    def __init__(self, db: sqlite3.Connection | None, when_new: Callable[[], None] | None = None) -> None:
        self._db = db
        self.when_new = when_new  # called when rows wait to be written and none did before (the app's flush timer)
        self._pending: dict[str, tuple[int, float, str]] = {}
        self._used: dict[str, float] = {}  # entries read since the last flush: their use time moves up

    @classmethod
    def open(cls, history: Path) -> RenderCache:
        """The cache beside the history database `history`; one that cannot be opened is an empty cache that keeps
        nothing."""
        path = history.parent / FILE_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # created private, never wider
            os.close(fd)
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA secure_delete=ON")  # a deleted entry's text is overwritten, not left in a free page
            if db.execute("PRAGMA user_version").fetchone()[0] != FILE_VERSION:
                db.execute("DROP TABLE IF EXISTS drawn")
                db.execute(f"PRAGMA user_version = {FILE_VERSION}")
            db.execute(
                "CREATE TABLE IF NOT EXISTS drawn (key TEXT PRIMARY KEY, msg INTEGER NOT NULL, used REAL NOT NULL, "
                "lines TEXT NOT NULL)"
            )
            # read-only, and only to see which messages still exist
            db.execute("ATTACH DATABASE ? AS history", (f"{history.resolve().as_uri()}?mode=ro",))
            # small page caches (SQLite's default is 2 MB each): a chat left open for days must not grow by them
            db.execute("PRAGMA main.cache_size = -256")
            db.execute("PRAGMA history.cache_size = -64")
        except (OSError, sqlite3.Error):
            return cls(None)
        return cls(db)

    def get(self, key: str) -> Lines | None:
        pending = self._pending.get(key)
        if pending is not None:
            return _decode(pending[2])
        if self._db is None:
            return None
        try:
            row = self._db.execute("SELECT lines FROM drawn WHERE key = ?", (key,)).fetchone()
            lines = _decode(row[0]) if row else None
        except (sqlite3.Error, ValueError, TypeError):
            return None
        if lines is not None:
            self._used[key] = time.time()
        return lines

    def put(self, key: str, lines: Sequence[Sequence[Segment]], msg_id: int) -> None:
        """Keep the rows `key` names, drawn from message `msg_id` of the history."""
        if self._db is not None:
            if not self._pending and self.when_new is not None:
                self.when_new()
            self._pending[key] = (msg_id, time.time(), _encode([list(line) for line in lines]))

    def flush(self) -> None:
        """Write what was drawn since the last flush, drop the least recently used beyond `MAX_ROWS`, and the rows
        of messages the history no longer has."""
        pending, used = self._pending, self._used
        self._pending, self._used = {}, {}
        if self._db is None:
            return
        with contextlib.suppress(sqlite3.Error), self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR REPLACE INTO drawn (key, msg, used, lines) VALUES (?, ?, ?, ?)",
                [(key, msg, at, lines) for key, (msg, at, lines) in pending.items()],
            )
            self._db.executemany("UPDATE drawn SET used = ? WHERE key = ?", [(at, key) for key, at in used.items()])
            self._db.execute(
                "DELETE FROM drawn WHERE key NOT IN (SELECT key FROM drawn ORDER BY used DESC LIMIT ?)", (MAX_ROWS,)
            )
        self.drop_deleted()

    def drop_deleted(self) -> None:
        """Delete the rows of messages the history no longer has: what is deleted there goes from here too."""
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("DELETE FROM drawn WHERE msg NOT IN (SELECT id FROM history.messages)")

    def close(self) -> None:
        self.flush()
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
