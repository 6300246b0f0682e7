"""Conversation history in SQLite: saved as it happens, searchable.

Every finished turn is committed at once and a streaming reply is rewritten every few hundred
milliseconds, so a crash, `kill -9`, a lost SSH session or a dying server leaves at most the last fraction of
a second of a reply unsaved. A reply whose writer died stays in state 'streaming' on disk; the next `open`
marks it 'interrupted', keeping its text.

Two tuichats on one chat would interleave its turns, so a process that opens a conversation claims it first
(`Store.claim`): a row in `claims` naming the holder the same way a streaming reply names its writer, so a holder
killed with `kill -9` frees its claims by dying. While a live process holds a conversation, every other one may
only read it: adding, undoing or deleting its messages is refused with a sentence naming the holder's pid. The
writer ids and the claims are `tuichat.chat.holders` (mixed in as `ClaimTable`); exports and imports are
`tuichat.chat.transfer`.

Text from outside (an imported file) is cleaned of terminal control sequences on the way in, and everything
read back for display or export is cleaned again on the way out (see `tuichat.chat.sanitize`).

Two conversations of one `tuichat compare` run are a pair: each has a row in `comparisons` naming its partner, its
side (A or B) and the label the compare screen gave it, so the history can show them together.

Layout: `conversations` and `messages` tables, an FTS5 index over message text kept in step by triggers,
`claims`, `comparisons`, and `PRAGMA user_version` naming the schema version; `MIGRATIONS[i]` takes a database
from version i to i+1.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from tuichat import paths
from tuichat.chat.holders import Claim, ClaimTable, live_lock, live_replies, writer_alive, writer_id
from tuichat.chat.sanitize import clean_line
from tuichat.errors import TuichatError

DEFAULT_TITLE = "New chat"
TITLE_MAX_CHARS = 48
ROLES = ("system", "user", "assistant", "error")
STATES = ("done", "streaming", "stopped", "interrupted", "error")
# Snippet highlight marks: plain characters that are neither Markdown nor Textual markup syntax.
SNIPPET_MARKS = ("«", "»")

_CONVERSATION_FIELDS = ("title", "model", "server_url", "profile", "lmdeploy_version")


def default_path() -> Path:
    return paths.data_dir() / "history.sqlite3"


@dataclass(frozen=True, slots=True)
class Conversation:
    id: int
    title: str
    created: float
    updated: float
    model: str | None
    server_url: str | None
    profile: str | None
    lmdeploy_version: str | None
    message_count: int
    # Set when this conversation is one side of a compare run: the other side's id, and this side's letter
    # (A or B) and label (its profile or URL).
    partner_id: int | None = None
    compare_side: str | None = None
    compare_label: str | None = None


@dataclass(frozen=True, slots=True)
class Message:
    id: int
    conversation_id: int
    role: str
    content: str
    state: str
    created: float
    sampling: dict[str, Any] | None = None
    stats: dict[str, Any] | None = None
    images: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class SearchHit:
    conversation_id: int
    message_id: int
    title: str
    snippet: str
    role: str = ""
    created: float = 0.0


# ---------------------------------------------------------------------------------------------------------
# Schema. Each migration runs inside the transaction that also bumps user_version, so a crash mid-migration
# leaves the old version intact. Never edit a shipped migration: add a new one.


def _run_script(db: sqlite3.Connection, script: str) -> None:
    """Run statements one by one: executescript() would commit the migration's transaction half-way."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            db.execute(pending)
            pending = ""
    if pending.strip():
        raise ValueError(f"incomplete SQL statement in migration: {pending!r}")


def _migrate_v1(db: sqlite3.Connection) -> None:
    _run_script(
        db,
        """
        CREATE TABLE conversations (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            title TEXT NOT NULL,
            created REAL NOT NULL,
            updated REAL NOT NULL,
            model TEXT,
            server_url TEXT
        );
        CREATE TABLE messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            role TEXT NOT NULL,
            content TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'done',
            created REAL NOT NULL,
            sampling TEXT,
            stats TEXT,
            images TEXT NOT NULL DEFAULT '[]'
        );
        CREATE INDEX messages_by_conversation ON messages(conversation_id, id);
        CREATE INDEX conversations_by_updated ON conversations(updated);
        """,
    )


def _migrate_v2(db: sqlite3.Connection) -> None:
    # v2: reproducibility metadata, the id of the process writing a streaming reply (so a second tuichat
    # does not mistake a live reply for a dead one), and full-text search.
    _run_script(
        db,
        """
        ALTER TABLE conversations ADD COLUMN profile TEXT;
        ALTER TABLE conversations ADD COLUMN lmdeploy_version TEXT;
        ALTER TABLE messages ADD COLUMN writer TEXT;
        CREATE INDEX messages_streaming ON messages(id) WHERE state = 'streaming';
        CREATE VIRTUAL TABLE messages_fts USING fts5(
            content, content='messages', content_rowid='id', tokenize='unicode61 remove_diacritics 2'
        );
        CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
            INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content);
        END;
        CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
            INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
        END;
        CREATE TRIGGER messages_fts_update AFTER UPDATE OF content ON messages BEGIN
            INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
            INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content);
        END;
        INSERT INTO messages_fts(messages_fts) VALUES ('rebuild');
        """,
    )


def _migrate_v3(db: sqlite3.Connection) -> None:
    # v3: which process holds each open conversation (see Store.claim). `holder` is a writer id; `token` tells
    # the claims of two Stores in one process apart.
    _run_script(
        db,
        """
        CREATE TABLE claims (
            conversation_id INTEGER PRIMARY KEY REFERENCES conversations(id) ON DELETE CASCADE,
            holder TEXT NOT NULL,
            pid INTEGER NOT NULL,
            token TEXT NOT NULL,
            claimed REAL NOT NULL
        );
        """,
    )


# How a v3 compare run marked its pair: `link_compared` appended " ⇄ #<partner id> <partner side> <partner label>"
# to each title.
_V3_PAIR_TITLE = re.compile(r"^(?P<title>.*?) ⇄ #(?P<partner>\d+) (?P<side>[AB]) ?(?P<label>.*)$")
COMPARE_SIDES = ("A", "B")


def _migrate_v4(db: sqlite3.Connection) -> None:
    # v4: the two conversations of a compare run are linked by rows, not by their titles. One row per side;
    # deleting either conversation removes both rows, so no link ever points at a conversation that is gone.
    _run_script(
        db,
        """
        CREATE TABLE comparisons (
            conversation_id INTEGER PRIMARY KEY REFERENCES conversations(id) ON DELETE CASCADE,
            partner_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            side TEXT NOT NULL,
            label TEXT NOT NULL
        );
        CREATE INDEX comparisons_by_partner ON comparisons(partner_id);
        """,
    )
    rows = db.execute("SELECT id, title, profile, server_url FROM conversations WHERE title LIKE '% ⇄ #%'").fetchall()
    found: dict[int, tuple[int, str, str]] = {}  # partner id -> (the conversation naming it, partner side, label)
    titles: dict[int, str] = {}
    for conv_id, title, _profile, _url in rows:
        match = _V3_PAIR_TITLE.match(title)
        if match is None:
            continue
        partner = int(match["partner"])
        if partner == conv_id or db.execute("SELECT 1 FROM conversations WHERE id = ?", (partner,)).fetchone() is None:
            continue  # its partner was deleted: the title is all that is left of the pair, so it stays
        found[partner] = (conv_id, match["side"], match["label"].strip())
        titles[conv_id] = match["title"].strip() or DEFAULT_TITLE
    for partner, (conv_id, side, label) in found.items():
        db.execute(
            "INSERT OR REPLACE INTO comparisons (conversation_id, partner_id, side, label) VALUES (?, ?, ?, ?)",
            (partner, conv_id, side, label),
        )
        if conv_id not in found:  # the other title lost its mark (renamed): its side is the other letter
            own = db.execute("SELECT profile, server_url FROM conversations WHERE id = ?", (conv_id,)).fetchone()
            other_side = COMPARE_SIDES[1 - COMPARE_SIDES.index(side)]
            db.execute(
                "INSERT OR REPLACE INTO comparisons (conversation_id, partner_id, side, label) VALUES (?, ?, ?, ?)",
                (conv_id, partner, other_side, own[0] or own[1] or ""),
            )
    for conv_id, title in titles.items():
        db.execute("UPDATE conversations SET title = ? WHERE id = ?", (title, conv_id))


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_migrate_v1, _migrate_v2, _migrate_v3, _migrate_v4]
SCHEMA_VERSION = len(MIGRATIONS)


# ---------------------------------------------------------------------------------------------------------


def _json_or_none(value: Mapping[str, Any] | None) -> str | None:
    return None if value is None else json.dumps(dict(value), ensure_ascii=False, separators=(",", ":"))


def _title_from(text: str) -> str:
    words = clean_line(text)
    if len(words) <= TITLE_MAX_CHARS:
        return words
    cut = words[: TITLE_MAX_CHARS - 1]
    space = cut.rfind(" ")
    if space > TITLE_MAX_CHARS // 2:
        cut = cut[:space]
    return cut.rstrip(" ,.;:-") + "…"


def _fts_query(query: str) -> str:
    """User text as an FTS5 query: every word quoted (so FTS syntax is taken literally), all required,
    the last one matched as a prefix so results appear while the user is still typing."""
    terms = ['"' + term.replace('"', '""') + '"' for term in query.split() if any(c.isalnum() for c in term)]
    if not terms:
        return ""
    return " ".join(terms) + "*"


class Store(ClaimTable):
    """One open history database. Safe to share between the UI thread and a worker thread."""

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self._db = db
        self._lock = threading.RLock()
        self.path = path
        self._key = os.path.realpath(path)
        self._my_replies: set[int] = set()
        self._claims: dict[int, Claim] = {}
        self.recovered_on_open = 0
        # called after messages were deleted (a chat, an exchange undone, a reply replaced), so what keeps copies
        # of them (the UI's render cache) can forget them too
        self.deleted: Callable[[], None] | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path | None = None) -> Store:
        path = default_path() if path is None else Path(path)
        try:
            paths.ensure_private_dir(path.parent)
            # Create the file ourselves so it never exists with wider permissions; SQLite gives the -wal and
            # -shm files the permissions of the database file.
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
            os.chmod(path, 0o600)
        except OSError as exc:
            raise TuichatError(
                f"Cannot create the history file {path}: {exc.strerror}. "
                "Check that its folder is writable, or set TUICHAT_HOME to another folder."
            ) from exc
        try:
            db = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise TuichatError(f"Cannot open the history file {path} ({exc}).") from exc
        try:
            # WAL with synchronous=NORMAL: each commit is written to the -wal file before the call returns,
            # and the OS keeps written data when the *process* dies (kill -9, SIGHUP, crash). Only a power
            # cut or kernel crash can lose the last commits, and even then the database stays consistent.
            # FULL would add an fsync to every streamed update for no gain against process death.
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            _migrate(db, path)
        except sqlite3.DatabaseError as exc:
            db.close()
            raise TuichatError(
                f"The history file {path} cannot be read ({exc}). Move it aside and tuichat will start a new one."
            ) from exc
        except BaseException:
            db.close()
            raise
        store = cls(db, path)
        try:
            store.recovered_on_open = store.recover_interrupted()
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        with self._lock:
            for claim in list(self._claims.values()):
                with contextlib.suppress(TuichatError, sqlite3.Error):
                    self._release(claim)  # if the row stays, it is dead anyway once forgotten or we exit
            self._forget_claims()
            with live_lock:
                for msg_id in self._my_replies:
                    live_replies.discard((self._key, msg_id))
            self._my_replies.clear()
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction under the lock; SQLite failures become a sentence for the user."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                raise _save_error(self.path, exc) from exc
            except sqlite3.IntegrityError as exc:
                if "FOREIGN KEY" not in str(exc):
                    raise
                raise TuichatError(
                    "That conversation no longer exists (it was deleted, perhaps in another tuichat window); "
                    "start a new chat."
                ) from exc

    # -- conversations ---------------------------------------------------------------------------------------

    def create_conversation(
        self,
        *,
        title: str = DEFAULT_TITLE,
        model: str | None = None,
        server_url: str | None = None,
        profile: str | None = None,
        lmdeploy_version: str | None = None,
        system_prompt: str | None = None,
    ) -> int:
        now = time.time()
        with self._write() as db:
            cur = db.execute(
                "INSERT INTO conversations (title, created, updated, model, server_url, profile, "
                "lmdeploy_version) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    clean_line(title) or DEFAULT_TITLE,
                    now,
                    now,
                    *(clean_label(value) for value in (model, server_url, profile, lmdeploy_version)),
                ),
            )
            conv_id = _rowid(cur)
            if system_prompt:
                db.execute(
                    "INSERT INTO messages (conversation_id, role, content, state, created) "
                    "VALUES (?, 'system', ?, 'done', ?)",
                    (conv_id, system_prompt, now),
                )
        return conv_id

    def update_conversation(self, conv_id: int, **fields: str | None) -> None:
        """Change metadata (title, model, server_url, profile, lmdeploy_version); does not touch `updated`,
        which tracks conversation activity and orders the history list."""
        unknown = set(fields) - set(_CONVERSATION_FIELDS)
        if unknown:
            raise ValueError(f"unknown conversation fields: {sorted(unknown)}")
        if not fields:
            return
        assignments = ", ".join(f"{name} = ?" for name in fields)
        values = [clean_label(value) for value in fields.values()]
        with self._write() as db:
            db.execute(f"UPDATE conversations SET {assignments} WHERE id = ?", (*values, conv_id))

    def rename(self, conv_id: int, title: str) -> None:
        self.update_conversation(conv_id, title=clean_line(title) or DEFAULT_TITLE)

    def delete(self, conv_id: int) -> None:
        """Delete a conversation; refused while another live tuichat holds it."""
        with self._write() as db:
            self._refuse_if_held(db, conv_id)
            db.execute("DELETE FROM conversations WHERE id = ?", (conv_id,))
        self._drop_claim(conv_id)  # its row went with the conversation
        self._tell_deleted()

    def list_conversations(self, limit: int | None = None) -> list[Conversation]:
        sql = _CONVERSATION_SELECT + " ORDER BY c.updated DESC, c.id DESC"
        params: tuple[int, ...] = ()
        if limit is not None:
            sql += " LIMIT ?"
            params = (limit,)
        with self._lock:
            return [_conversation(row) for row in self._db.execute(sql, params)]

    def link_pair(self, first: int, second: int, labels: tuple[str, str] = ("", "")) -> None:
        """Record `first` (side A) and `second` (side B) as the two sides of one compare run; `labels` name each
        side (profile or URL). Linking again replaces the old link of either."""
        if first == second:
            raise ValueError("a conversation cannot be compared with itself")
        with self._write() as db:
            for conv_id, partner, side, label in (
                (first, second, "A", labels[0]),
                (second, first, "B", labels[1]),
            ):
                db.execute(
                    "INSERT OR REPLACE INTO comparisons (conversation_id, partner_id, side, label) VALUES (?, ?, ?, ?)",
                    (conv_id, partner, side, clean_line(label)),
                )

    def unlink_pair(self, conv_id: int) -> None:
        """Forget that `conv_id` was compared (both rows of its pair); the conversations stay."""
        with self._write() as db:
            db.execute("DELETE FROM comparisons WHERE conversation_id = ? OR partner_id = ?", (conv_id, conv_id))

    def last_conversation(self) -> Conversation | None:
        found = self.list_conversations(limit=1)
        return found[0] if found else None

    def get_conversation(self, conv_id: int) -> Conversation | None:
        with self._lock:
            row = self._db.execute(_CONVERSATION_SELECT + " WHERE c.id = ?", (conv_id,)).fetchone()
        return _conversation(row) if row else None

    # -- messages --------------------------------------------------------------------------------------------

    def messages(self, conv_id: int) -> list[Message]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, conversation_id, role, content, state, created, sampling, stats, images "
                "FROM messages WHERE conversation_id = ? ORDER BY id",
                (conv_id,),
            ).fetchall()
        return [_message(row) for row in rows]

    def get_message(self, msg_id: int) -> Message | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, conversation_id, role, content, state, created, sampling, stats, images "
                "FROM messages WHERE id = ?",
                (msg_id,),
            ).fetchone()
        return _message(row) if row else None

    def add_message(
        self,
        conv_id: int,
        role: str,
        content: str,
        *,
        state: str = "done",
        sampling: Mapping[str, Any] | None = None,
        stats: Mapping[str, Any] | None = None,
        images: Sequence[str] = (),
    ) -> int:
        _check(role=role, state=state)
        now = time.time()
        with self._write() as db:
            self._refuse_if_held(db, conv_id)
            if role == "user":
                self._title_from_first_user_message(db, conv_id, content)
            cur = db.execute(
                "INSERT INTO messages (conversation_id, role, content, state, created, sampling, stats, "
                "images, writer) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    conv_id,
                    role,
                    content,
                    state,
                    now,
                    _json_or_none(sampling),
                    _json_or_none(stats),
                    json.dumps(list(images), ensure_ascii=False),
                    writer_id() if state == "streaming" else None,
                ),
            )
            db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (now, conv_id))
        msg_id = _rowid(cur)
        if state == "streaming":
            self._track(msg_id)
        return msg_id

    def _title_from_first_user_message(self, db: sqlite3.Connection, conv_id: int, content: str) -> None:
        row = db.execute("SELECT title FROM conversations WHERE id = ?", (conv_id,)).fetchone()
        if row is None or row[0] != DEFAULT_TITLE:
            return
        if db.execute(
            "SELECT 1 FROM messages WHERE conversation_id = ? AND role = 'user' LIMIT 1", (conv_id,)
        ).fetchone():
            return
        title = _title_from(content)
        if title:
            db.execute("UPDATE conversations SET title = ? WHERE id = ?", (title, conv_id))

    def begin_reply(self, conv_id: int, *, sampling: Mapping[str, Any] | None = None) -> int:
        """An empty assistant message in state 'streaming', to be filled by update_reply / finish_reply."""
        return self.add_message(conv_id, "assistant", "", state="streaming", sampling=sampling)

    def update_reply(self, msg_id: int, content: str) -> bool:
        """Save the text streamed so far (one UPDATE, one commit). False when the reply is no longer
        streaming (finished, or deleted meanwhile), in which case nothing is written."""
        with self._lock:
            try:
                cur = self._db.execute(
                    "UPDATE messages SET content = ? WHERE id = ? AND state = 'streaming'", (content, msg_id)
                )
            except sqlite3.OperationalError as exc:
                raise _save_error(self.path, exc) from exc
        return cur.rowcount > 0

    def finish_reply(
        self, msg_id: int, content: str, state: str = "done", stats: Mapping[str, Any] | None = None
    ) -> None:
        _check(state=state)
        now = time.time()
        with self._write() as db:
            db.execute(
                "UPDATE messages SET content = ?, state = ?, stats = COALESCE(?, stats), writer = NULL WHERE id = ?",
                (content, state, _json_or_none(stats), msg_id),
            )
            db.execute(
                "UPDATE conversations SET updated = ? WHERE id = (SELECT conversation_id FROM messages WHERE id = ?)",
                (now, msg_id),
            )
        self._untrack(msg_id)

    def delete_message(self, msg_id: int) -> None:
        with self._write() as db:
            row = db.execute("SELECT conversation_id FROM messages WHERE id = ?", (msg_id,)).fetchone()
            if row is not None:
                self._refuse_if_held(db, row[0])
            db.execute("DELETE FROM messages WHERE id = ?", (msg_id,))
        self._untrack(msg_id)
        self._tell_deleted()

    def _tell_deleted(self) -> None:
        if self.deleted is not None:
            self.deleted()

    def delete_last_exchange(self, conv_id: int) -> int:
        """Remove the last user message and everything after it (undo); returns how many messages went."""
        with self._write() as db:
            self._refuse_if_held(db, conv_id)
            row = db.execute(
                "SELECT MAX(id) FROM messages WHERE conversation_id = ? AND role = 'user'", (conv_id,)
            ).fetchone()
            if row is None or row[0] is None:
                return 0
            cur = db.execute("DELETE FROM messages WHERE conversation_id = ? AND id >= ?", (conv_id, row[0]))
            db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (time.time(), conv_id))
        self._tell_deleted()
        return cur.rowcount

    def recover_interrupted(self) -> int:
        """Mark replies left 'streaming' by a process that has died as 'interrupted', keeping their text.
        Replies still being written by a live tuichat (this one or another) are left alone."""
        with self._lock:
            rows = self._db.execute("SELECT id, writer FROM messages WHERE state = 'streaming'").fetchall()
            with live_lock:
                live = {msg_id for key, msg_id in live_replies if key == self._key}
            own = writer_id()
            dead = [
                msg_id for msg_id, writer in rows if (msg_id not in live if writer == own else not writer_alive(writer))
            ]
            if not dead:
                return 0
            with self._write() as db:
                db.executemany(
                    "UPDATE messages SET state = 'interrupted', writer = NULL WHERE id = ? AND state = 'streaming'",
                    [(msg_id,) for msg_id in dead],
                )
            return len(dead)

    def _track(self, msg_id: int) -> None:
        self._my_replies.add(msg_id)
        with live_lock:
            live_replies.add((self._key, msg_id))

    def _untrack(self, msg_id: int) -> None:
        self._my_replies.discard(msg_id)
        with live_lock:
            live_replies.discard((self._key, msg_id))

    # -- search ----------------------------------------------------------------------------------------------

    def search(self, query: str, limit: int = 50, *, marks: tuple[str, str] = SNIPPET_MARKS) -> list[SearchHit]:
        """Full-text search over all messages, best matches first. Any text is accepted: FTS5 operators
        and punctuation in `query` are matched literally, never parsed."""
        match = _fts_query(query)
        if not match:
            return []
        sql = (
            "SELECT m.conversation_id, m.id, c.title, "
            "snippet(messages_fts, 0, ?, ?, '…', 12), m.role, m.created "
            "FROM messages_fts JOIN messages m ON m.id = messages_fts.rowid "
            "JOIN conversations c ON c.id = m.conversation_id "
            "WHERE messages_fts MATCH ? ORDER BY rank LIMIT ?"
        )
        with self._lock:
            try:
                rows = self._db.execute(sql, (marks[0], marks[1], match, limit)).fetchall()
            except sqlite3.OperationalError:
                return []
        return [
            SearchHit(conv, msg, clean_line(title), clean_line(snip), role, created)
            for conv, msg, title, snip, role, created in rows
        ]

    def insert_conversation(self, conv: Mapping[str, Any], msgs: Sequence[Mapping[str, Any]]) -> int:
        """Add a whole conversation at once (an import); every text must be cleaned already."""
        with self._write() as db:
            cur = db.execute(
                "INSERT INTO conversations (title, created, updated, model, server_url, profile, "
                "lmdeploy_version) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    conv["title"],  # _parse_export has cleaned every text of the untrusted file
                    conv["created"],
                    conv["updated"],
                    conv["model"],
                    conv["server_url"],
                    conv["profile"],
                    conv["lmdeploy_version"],
                ),
            )
            conv_id = _rowid(cur)
            db.executemany(
                "INSERT INTO messages (conversation_id, role, content, state, created, sampling, stats, "
                "images) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        conv_id,
                        m["role"],
                        m["content"],
                        m["state"],
                        m["created"],
                        _json_or_none(m["sampling"]),
                        _json_or_none(m["stats"]),
                        json.dumps(m["images"], ensure_ascii=False),
                    )
                    for m in msgs
                ],
            )
        return conv_id


_CONVERSATION_SELECT = (
    "SELECT c.id, c.title, c.created, c.updated, c.model, c.server_url, c.profile, c.lmdeploy_version, "
    "(SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id), p.partner_id, p.side, p.label "
    "FROM conversations c LEFT JOIN comparisons p ON p.conversation_id = c.id"
)


def _migrate(db: sqlite3.Connection, path: Path) -> None:
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version == SCHEMA_VERSION:
        return
    # IMMEDIATE takes the write lock first, so two tuichats opening an old file migrate it only once.
    db.execute("BEGIN IMMEDIATE")
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise TuichatError(
                f"The history file {path} was written by a newer tuichat (schema {version}, this one knows "
                f"{SCHEMA_VERSION}). Upgrade tuichat, or set TUICHAT_HOME to use a separate history."
            )
        if version == 0 and db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]:
            raise TuichatError(
                f"{path} is an SQLite database but not a tuichat history. "
                "Move it aside and tuichat will start a new one."
            )
        for number in range(version, SCHEMA_VERSION):
            MIGRATIONS[number](db)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def clean_label(value: str | None) -> str | None:
    """A label from the history cleaned for display: no terminal sequences in lists, headers or exports."""
    return None if value is None else clean_line(value)


def _conversation(row: tuple[Any, ...]) -> Conversation:
    """A conversation row, its labels cleaned: they are drawn in lists, headers and exports."""
    conv_id, title, created, updated, model, server_url, profile, version, count, partner, side, label = row
    return Conversation(
        conv_id,
        clean_line(title) or DEFAULT_TITLE,
        created,
        updated,
        clean_label(model),
        clean_label(server_url),
        clean_label(profile),
        clean_label(version),
        count,
        partner,
        side,
        clean_label(label),
    )


def _rowid(cur: sqlite3.Cursor) -> int:
    assert cur.lastrowid is not None
    return cur.lastrowid


def _check(*, role: str | None = None, state: str | None = None) -> None:
    if role is not None and role not in ROLES:
        raise ValueError(f"unknown message role {role!r}")
    if state is not None and state not in STATES:
        raise ValueError(f"unknown message state {state!r}")


def _save_error(path: Path, exc: sqlite3.OperationalError) -> TuichatError:
    text = str(exc)
    if "full" in text:
        hint = "Free some disk space; the conversation will keep saving once there is room."
    elif "locked" in text or "busy" in text:
        hint = "Another program is holding the history file; close it and try again."
    elif "readonly" in text or "read-only" in text:
        hint = f"Make {path} writable."
    else:
        hint = f"Check that {path} is on a working, writable disk."
    return TuichatError(f"Could not save to the conversation history ({text}). {hint}")


def _message(row: tuple[Any, ...]) -> Message:
    msg_id, conv_id, role, content, state, created, sampling, stats, images = row
    return Message(
        msg_id,
        conv_id,
        role,
        content,
        state,
        created,
        json.loads(sampling) if sampling else None,
        json.loads(stats) if stats else None,
        json.loads(images) if images and images != "[]" else [],
    )
