"""Who holds what in the history: writer ids that outlive neither their process nor a reboot, and claims.

A streaming reply names its writer, and a conversation open in a chat screen is claimed by one process (a row in
`claims`); both use a writer id, "pid:boot_id:start_time", so a process killed with `kill -9` frees what it held by
dying, and neither a reboot nor a recycled pid makes a dead writer look alive. `ClaimTable` is the claim half of
`Store` (which mixes it in); the sets below are what this process itself holds, since its own pid is always alive.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Self

from tuichat.errors import TuichatError


@dataclass(frozen=True, slots=True)
class HeldBy:
    """A conversation is open in another live tuichat process, which alone may add to it."""

    conversation_id: int
    pid: int
    since: float  # when that process claimed it

    def sentence(self) -> str:
        since = datetime.fromtimestamp(self.since).strftime("%H:%M")
        return f"Conversation {self.conversation_id} is open in another tuichat (pid {self.pid}, since {since})."


# Who is writing a streaming reply. A writer id is "pid:boot_id:start_time" so that neither a reboot nor a
# recycled pid makes a dead writer look alive (on Linux; elsewhere only the pid is checked).


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return fh.read().strip()
    except OSError:
        return None


def _proc_start_time(pid: int) -> str | None:
    """The start time of `pid` from /proc, or None if it is gone or a zombie; "" if /proc is unavailable."""
    if not os.path.isdir("/proc/self"):
        return ""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat.rpartition(")")[2].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return fields[19]


_BOOT_ID = _read("/proc/sys/kernel/random/boot_id") or ""
_own_writer: tuple[int, str] | None = None


def writer_id() -> str:
    global _own_writer
    pid = os.getpid()
    if _own_writer is None or _own_writer[0] != pid:  # recomputed after a fork
        _own_writer = (pid, f"{pid}:{_BOOT_ID}:{_proc_start_time(pid) or ''}")
    return _own_writer[1]


def writer_alive(writer: str | None) -> bool:
    if not writer:
        return False
    pid_text, _, rest = writer.partition(":")
    boot, _, start = rest.partition(":")
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    if boot and _BOOT_ID and boot != _BOOT_ID:
        return False
    current = _proc_start_time(pid)
    if current is None:
        return False
    if current:
        return not start or current == start
    from tuichat.server.procgroup import pid_alive  # no /proc here: the pid alone, as the launcher checks it

    return pid_alive(pid)


# Replies being streamed by Stores open in this process, as (database path, message id): a reply written
# by our own pid is alive only while the Store that began it is still open.
live_replies: set[tuple[str, int]] = set()
live_lock = threading.Lock()
# Tokens of the claims held by Stores open in this process: a claim by our own pid is alive only while listed.
_live_claims: set[str] = set()


def _claim_alive(holder: str, token: str) -> bool:
    if holder == writer_id():
        with live_lock:
            return token in _live_claims
    return writer_alive(holder)


class Claim:
    """This process holds a conversation: others may read it but not add to it until `release` (or until
    the Store closes, or the process dies). Usable as a context manager."""

    __slots__ = ("_store", "conversation_id", "token")

    def __init__(self, store: ClaimTable, conversation_id: int, token: str) -> None:
        self._store = store
        self.conversation_id = conversation_id
        self.token = token

    @property
    def held(self) -> bool:
        with live_lock:
            return self.token in _live_claims

    def release(self) -> None:
        """Let other tuichats continue the conversation; releasing twice does nothing."""
        self._store._release(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Claim(conversation_id={self.conversation_id}, held={self.held})"


class ClaimTable:
    """The claims half of `Store`: one tuichat at a time may add to a conversation. `Store` supplies the
    connection, its lock and the one write transaction."""

    _db: sqlite3.Connection
    _lock: threading.RLock
    _claims: dict[int, Claim]

    def _write(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError  # Store's: one transaction under the lock, failures as a sentence

    def claim(self, conv_id: int) -> Claim | HeldBy:
        """Take `conv_id` for this process, or say which live process has it. A claim left by a process that
        has died (even by kill -9) is taken over. Claiming one this Store already holds returns that Claim."""
        with self._lock:
            mine = self._claims.get(conv_id)
            if mine is not None:
                return mine
            token = secrets.token_hex(8)
            try:
                with self._write() as db:
                    held = self._other_holder(db, conv_id)
                    if held is not None:
                        return held
                    db.execute(
                        "INSERT OR REPLACE INTO claims (conversation_id, holder, pid, token, claimed) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (conv_id, writer_id(), os.getpid(), token, time.time()),
                    )
                    # Listed before the commit: once another Store of ours can see the row, it must see it alive.
                    with live_lock:
                        _live_claims.add(token)
            except BaseException:
                with live_lock:
                    _live_claims.discard(token)
                raise
            claim = Claim(self, conv_id, token)
            self._claims[conv_id] = claim
            return claim

    def holder(self, conv_id: int) -> HeldBy | None:
        """Who else holds `conv_id`: None when it is free, its holder died, or this Store holds it."""
        with self._lock:
            return self._other_holder(self._db, conv_id)

    def held_elsewhere(self) -> dict[int, HeldBy]:
        """Every conversation another live process (or another Store of this one) holds, by id."""
        with self._lock:
            rows = self._db.execute("SELECT conversation_id, holder, pid, token, claimed FROM claims").fetchall()
            mine = {claim.token for claim in self._claims.values()}
        return {
            conv_id: HeldBy(conv_id, pid, claimed)
            for conv_id, holder, pid, token, claimed in rows
            if token not in mine and _claim_alive(holder, token)
        }

    def _other_holder(self, db: sqlite3.Connection, conv_id: int) -> HeldBy | None:
        row = db.execute(
            "SELECT holder, pid, token, claimed FROM claims WHERE conversation_id = ?", (conv_id,)
        ).fetchone()
        if row is None:
            return None
        holder, pid, token, claimed = row
        mine = self._claims.get(conv_id)
        if (mine is not None and mine.token == token) or not _claim_alive(holder, token):
            return None
        return HeldBy(conv_id, pid, claimed)

    def _refuse_if_held(self, db: sqlite3.Connection, conv_id: int) -> None:
        held = self._other_holder(db, conv_id)
        if held is not None:
            raise TuichatError(f"{held.sentence()} Only that one can change it; read it here, or close it there first.")

    def _release(self, claim: Claim) -> None:
        with self._lock:
            if self._claims.get(claim.conversation_id) is not claim:
                return
            with self._write() as db:
                db.execute(
                    "DELETE FROM claims WHERE conversation_id = ? AND token = ?", (claim.conversation_id, claim.token)
                )
            del self._claims[claim.conversation_id]
            with live_lock:
                _live_claims.discard(claim.token)

    def _drop_claim(self, conv_id: int) -> None:
        """Forget our claim on a conversation whose rows are gone (deleted with it)."""
        with self._lock:
            claim = self._claims.pop(conv_id, None)
        if claim is not None:
            with live_lock:
                _live_claims.discard(claim.token)

    def _forget_claims(self) -> None:
        with live_lock:
            for claim in self._claims.values():
                _live_claims.discard(claim.token)
        self._claims.clear()
