"""One tuichat at a time per conversation: `Store.claim`, what a second process is told, and a holder killed
with kill -9 freeing its claim by dying. The second process is real (tests/store_writer.py --hold)."""

from __future__ import annotations

import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tuichat.chat.holders import Claim, HeldBy
from tuichat.chat.store import Store
from tuichat.errors import TuichatError

HERE = Path(__file__).resolve().parent


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "history.sqlite3"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    with Store.open(db_path) as opened:
        yield opened


def new_chat(store: Store) -> int:
    conv = store.create_conversation(model="stand-in")
    store.add_message(conv, "user", "hello")
    return conv


class Holder:
    """A second tuichat process holding a conversation, driven line by line through its stdin."""

    def __init__(self, db_path: Path, conv_id: int) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE.parent / "src"), env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "store_writer.py"), str(db_path), "--hold", str(conv_id)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.strip())
        self._lines.put("EOF")

    def answer(self) -> str:
        try:
            return self._lines.get(timeout=30)
        except queue.Empty:
            raise AssertionError("store_writer.py --hold did not answer within 30 s") from None

    def send(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.answer()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def holder(db_path: Path, store: Store) -> Iterator[tuple[Holder, int]]:
    conv = new_chat(store)
    other = Holder(db_path, conv)
    try:
        ready = other.answer()
        assert ready == f"HELD {other.proc.pid}", f"{ready!r} {other.proc.stderr.read() if ready == 'EOF' else ''}"  # type: ignore[union-attr]
        yield other, conv
    finally:
        other.stop()


def test_a_claim_is_held_until_released(db_path: Path, store: Store) -> None:
    conv = new_chat(store)
    claim = store.claim(conv)
    assert isinstance(claim, Claim) and claim.held
    assert store.claim(conv) is claim  # claiming again what this Store holds is harmless
    assert store.holder(conv) is None and store.held_elsewhere() == {}
    with Store.open(db_path) as other:  # another tuichat in the same process
        held = other.claim(conv)
        assert isinstance(held, HeldBy) and held.pid == os.getpid()
        assert other.holder(conv) == held and other.held_elsewhere() == {conv: held}
        claim.release()
        assert not claim.held
        claim.release()  # twice is harmless
        mine = other.claim(conv)
        assert isinstance(mine, Claim)
    # closing the Store released it
    assert isinstance(store.claim(conv), Claim)


def test_other_conversations_stay_free(store: Store, db_path: Path) -> None:
    first, second = new_chat(store), new_chat(store)
    assert isinstance(store.claim(first), Claim)
    with Store.open(db_path) as other:
        assert isinstance(other.claim(second), Claim)
        other.add_message(second, "user", "mine")


def test_claiming_a_deleted_conversation_is_a_sentence(store: Store) -> None:
    conv = new_chat(store)
    store.delete(conv)
    with pytest.raises(TuichatError, match="no longer exists"):
        store.claim(conv)


def test_a_second_process_is_told_who_holds_the_chat(db_path: Path, store: Store, holder: tuple[Holder, int]) -> None:
    other, conv = holder
    held = store.claim(conv)
    assert isinstance(held, HeldBy)
    assert held.conversation_id == conv and held.pid == other.proc.pid
    assert f"pid {other.proc.pid}" in held.sentence() and f"Conversation {conv}" in held.sentence()
    assert store.held_elsewhere() == {conv: held}
    # The holder writes; we may read what it wrote but neither add to, undo in nor delete its chat.
    assert other.send("add from the holder") == "ADDED"
    assert [m.content for m in store.messages(conv)] == ["hello", "from the holder"]
    for attempt in (
        lambda: store.add_message(conv, "user", "interleaved"),
        lambda: store.begin_reply(conv),
        lambda: store.delete_last_exchange(conv),
        lambda: store.delete_message(store.messages(conv)[-1].id),
        lambda: store.delete(conv),
    ):
        with pytest.raises(TuichatError, match=f"pid {other.proc.pid}"):
            attempt()
    assert [m.content for m in store.messages(conv)] == ["hello", "from the holder"]


def test_a_released_claim_lets_the_next_process_continue(store: Store, holder: tuple[Holder, int]) -> None:
    other, conv = holder
    assert other.send("release") == "RELEASED"
    claim = store.claim(conv)
    assert isinstance(claim, Claim)
    store.add_message(conv, "user", "my turn now")
    refused = other.send("add sneaking in")
    assert refused.startswith("REFUSED ") and f"pid {os.getpid()}" in refused


def test_a_holder_killed_with_kill_9_frees_its_claim(store: Store, holder: tuple[Holder, int]) -> None:
    other, conv = holder
    assert isinstance(store.claim(conv), HeldBy)
    os.kill(other.proc.pid, signal.SIGKILL)
    other.proc.wait(timeout=30)
    assert store.holder(conv) is None and store.held_elsewhere() == {}
    claim = store.claim(conv)
    assert isinstance(claim, Claim)
    store.add_message(conv, "user", "continuing after the crash")


def test_a_holder_that_exits_frees_its_claim(store: Store, holder: tuple[Holder, int]) -> None:
    other, conv = holder
    assert other.proc.stdin is not None
    other.proc.stdin.close()  # end of input: the holder closes its store and exits
    assert other.proc.wait(timeout=30) == 0
    assert isinstance(store.claim(conv), Claim)


def test_a_recycled_pid_does_not_keep_a_claim(db_path: Path, store: Store) -> None:
    # The row names a live pid (ours) but another process start time: the holder it meant is gone.
    conv = new_chat(store)
    db = sqlite3.connect(db_path)
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        db.execute(
            "INSERT INTO claims (conversation_id, holder, pid, token, claimed) VALUES (?, ?, ?, 'gone', 0)",
            (conv, f"{os.getppid()}:{boot}:1", os.getppid()),
        )
        db.commit()
    finally:
        db.close()
    assert store.holder(conv) is None
    assert isinstance(store.claim(conv), Claim)
