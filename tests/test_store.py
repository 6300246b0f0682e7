"""Conversation history: saving as it happens, surviving a killed process, search, export/import and
migration."""

from __future__ import annotations

import json
import os
import queue
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tuichat.chat import store as store_module
from tuichat.chat.store import DEFAULT_TITLE, SNIPPET_MARKS, Store
from tuichat.chat.transfer import export_conversation, import_conversation
from tuichat.errors import TuichatError

HERE = Path(__file__).resolve().parent


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "history.sqlite3"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    with Store.open(db_path) as opened:
        yield opened


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_default_path_is_under_tuichat_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TUICHAT_HOME", str(tmp_path))
    assert store_module.default_path() == tmp_path / "data" / "history.sqlite3"
    with Store.open() as opened:
        opened.create_conversation()
    assert (tmp_path / "data" / "history.sqlite3").is_file()


def test_history_is_private_to_the_user(db_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        with Store.open(db_path) as opened:
            conv = opened.create_conversation()
            opened.add_message(conv, "user", "my secret question")
            wal = Path(f"{db_path}-wal")
            assert wal.exists()
            assert stat.S_IMODE(wal.stat().st_mode) == 0o600
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(db_path.parent.stat().st_mode) == 0o700


def test_round_trip_keeps_every_field(db_path: Path) -> None:
    with Store.open(db_path) as opened:
        conv = opened.create_conversation(
            model="internlm2-chat-1_8b",
            server_url="http://127.0.0.1:23333",
            profile="awq-4bit",
            lmdeploy_version="0.18.0",
            system_prompt="You are terse.",
        )
        opened.add_message(conv, "user", "Describe this picture", images=["cat.png", "dog.jpg"])
        reply = opened.add_message(
            conv,
            "assistant",
            "A cat and a dog.",
            sampling={"temperature": 0.7, "top_p": 0.9},
            stats={"ttft": 0.25, "tokens_per_s": 48.5, "completion_tokens": 6},
        )
    with Store.open(db_path) as reopened:
        found = reopened.get_conversation(conv)
        assert found is not None
        assert (found.model, found.server_url, found.profile, found.lmdeploy_version) == (
            "internlm2-chat-1_8b",
            "http://127.0.0.1:23333",
            "awq-4bit",
            "0.18.0",
        )
        assert found.message_count == 3
        msgs = reopened.messages(conv)
    assert [(m.role, m.content, m.state) for m in msgs] == [
        ("system", "You are terse.", "done"),
        ("user", "Describe this picture", "done"),
        ("assistant", "A cat and a dog.", "done"),
    ]
    assert msgs[1].images == ["cat.png", "dog.jpg"]
    assert msgs[2].id == reply
    assert msgs[2].sampling == {"temperature": 0.7, "top_p": 0.9}
    assert msgs[2].stats == {"ttft": 0.25, "tokens_per_s": 48.5, "completion_tokens": 6}
    assert msgs[0].sampling is None and msgs[0].stats is None and msgs[0].images == []


def test_recent_activity_comes_first(store: Store) -> None:
    first = store.create_conversation(title="first")
    second = store.create_conversation(title="second")
    assert [c.id for c in store.list_conversations()] == [second, first]
    store.add_message(first, "user", "back to the first one")
    assert [c.id for c in store.list_conversations()] == [first, second]
    assert [c.id for c in store.list_conversations(limit=1)] == [first]
    last = store.last_conversation()
    assert last is not None and last.id == first


def test_empty_history_has_no_last_conversation(store: Store) -> None:
    assert store.last_conversation() is None
    assert store.list_conversations() == []
    assert store.get_conversation(42) is None


def test_title_comes_from_the_first_user_message(store: Store) -> None:
    conv = store.create_conversation(system_prompt="Be kind.")
    assert store.get_conversation(conv).title == DEFAULT_TITLE  # type: ignore[union-attr]
    store.add_message(conv, "user", "  How do I\nquantize   a model?  ")
    store.add_message(conv, "user", "And then?")
    assert store.get_conversation(conv).title == "How do I quantize a model?"  # type: ignore[union-attr]

    long_conv = store.create_conversation()
    store.add_message(long_conv, "user", "Explain the difference between turbomind and pytorch backends in detail")
    title = store.get_conversation(long_conv).title  # type: ignore[union-attr]
    assert len(title) <= 48
    assert title.endswith("…")
    assert title.startswith("Explain the difference between")


def test_a_chosen_title_is_kept(store: Store) -> None:
    conv = store.create_conversation(title="Benchmarks")
    store.add_message(conv, "user", "first question")
    assert store.get_conversation(conv).title == "Benchmarks"  # type: ignore[union-attr]
    store.rename(conv, "  GPU   notes ")
    assert store.get_conversation(conv).title == "GPU notes"  # type: ignore[union-attr]


def test_update_conversation_metadata(store: Store) -> None:
    conv = store.create_conversation()
    store.update_conversation(conv, model="llava", profile="vision", lmdeploy_version="0.18.1")
    found = store.get_conversation(conv)
    assert found is not None
    assert (found.model, found.profile, found.lmdeploy_version) == ("llava", "vision", "0.18.1")
    with pytest.raises(ValueError, match="unknown conversation fields"):
        store.update_conversation(conv, colour="red")


def test_delete_removes_the_conversation_and_its_messages(store: Store) -> None:
    keep = store.create_conversation()
    store.add_message(keep, "user", "zebra crossing")
    gone = store.create_conversation()
    store.add_message(gone, "user", "zebra stripes")
    store.delete(gone)
    assert [c.id for c in store.list_conversations()] == [keep]
    assert store.messages(gone) == []
    assert [hit.conversation_id for hit in store.search("zebra")] == [keep]


def test_delete_last_exchange_is_undo(store: Store) -> None:
    conv = store.create_conversation(system_prompt="sys")
    store.add_message(conv, "user", "q1")
    store.add_message(conv, "assistant", "a1")
    store.add_message(conv, "user", "q2")
    store.add_message(conv, "assistant", "a2 partial", state="stopped")
    store.add_message(conv, "error", "server went away")
    assert store.delete_last_exchange(conv) == 3
    assert [m.content for m in store.messages(conv)] == ["sys", "q1", "a1"]
    assert store.delete_last_exchange(conv) == 2
    assert store.delete_last_exchange(conv) == 0
    assert [m.content for m in store.messages(conv)] == ["sys"]


def test_writing_to_a_deleted_conversation_is_a_user_error(store: Store) -> None:
    conv = store.create_conversation()
    reply = store.begin_reply(conv)
    store.delete(conv)  # e.g. from another window
    assert not store.update_reply(reply, "more text")
    with pytest.raises(TuichatError, match="no longer exists"):
        store.add_message(conv, "user", "hello?")


def test_delete_message(store: Store) -> None:
    conv = store.create_conversation()
    store.add_message(conv, "user", "q")
    error = store.add_message(conv, "error", "boom")
    store.delete_message(error)
    assert [m.role for m in store.messages(conv)] == ["user"]


def test_streaming_reply_lifecycle(store: Store) -> None:
    conv = store.create_conversation()
    store.add_message(conv, "user", "count")
    reply = store.begin_reply(conv, sampling={"temperature": 0.2})
    assert store.update_reply(reply, "one")
    assert store.update_reply(reply, "one two")
    (_, streaming) = store.messages(conv)
    assert (streaming.state, streaming.content, streaming.sampling) == (
        "streaming",
        "one two",
        {"temperature": 0.2},
    )
    store.finish_reply(reply, "one two three", "done", stats={"completion_tokens": 3})
    # A late update from a worker thread must not overwrite the finished reply.
    assert not store.update_reply(reply, "one")
    done = store.get_message(reply)
    assert done is not None
    assert (done.state, done.content, done.stats) == ("done", "one two three", {"completion_tokens": 3})


def test_stopped_reply_keeps_its_text(store: Store) -> None:
    conv = store.create_conversation()
    reply = store.begin_reply(conv)
    store.update_reply(reply, "half a sent")
    store.finish_reply(reply, "half a sent", "stopped")
    assert store.get_message(reply).state == "stopped"  # type: ignore[union-attr]


def test_unknown_role_or_state_is_refused(store: Store) -> None:
    conv = store.create_conversation()
    with pytest.raises(ValueError):
        store.add_message(conv, "robot", "hi")
    with pytest.raises(ValueError):
        store.add_message(conv, "user", "hi", state="pending")


def test_reply_left_streaming_by_a_closed_store_is_recovered(db_path: Path) -> None:
    writer = Store.open(db_path)
    conv = writer.create_conversation()
    writer.add_message(conv, "user", "question")
    reply = writer.begin_reply(conv)
    writer.update_reply(reply, "partial answer")
    # A second window on the same history must not take a live reply for a dead one.
    with Store.open(db_path) as other:
        assert other.recovered_on_open == 0
        assert other.get_message(reply).state == "streaming"  # type: ignore[union-attr]
        writer.close()  # the writer goes away without finishing its reply
        assert other.recover_interrupted() == 1
        recovered = other.get_message(reply)
        assert recovered is not None
        assert (recovered.state, recovered.content) == ("interrupted", "partial answer")
        assert other.recover_interrupted() == 0


def test_kill_9_keeps_the_turn_and_the_partial_reply(db_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE.parent / "src"), env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "store_writer.py"), str(db_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()  # type: ignore[union-attr]
    try:
        try:
            ready = lines.get(timeout=30)
        except queue.Empty:
            raise AssertionError("store_writer.py did not report READY within 30 s") from None
        assert ready.startswith("READY"), f"writer failed: {ready!r} {proc.stderr.read()}"  # type: ignore[union-attr]
        _, conv_text, reply_text = ready.split()
        conv, reply = int(conv_text), int(reply_text)

        with Store.open(db_path) as watcher:
            # The writer is alive: opening the history elsewhere leaves its reply streaming.
            assert watcher.recovered_on_open == 0
            wait_for(
                lambda: len(watcher.get_message(reply).content) > len("word0 word1 word2"),  # type: ignore[union-attr]
                what="the streamed reply to grow on disk",
            )
            seen = watcher.get_message(reply)
            assert seen is not None and seen.state == "streaming"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
    assert proc.returncode == -signal.SIGKILL

    with Store.open(db_path) as reopened:
        assert reopened.recovered_on_open == 1
        user, partial = reopened.messages(conv)
    assert (user.role, user.content) == ("user", "Tell me a long story about a lighthouse")
    assert (partial.role, partial.state) == ("assistant", "interrupted")
    assert partial.content.startswith(seen.content)
    assert partial.content.split() == [f"word{n}" for n in range(len(partial.content.split()))]
    assert partial.sampling == {"temperature": 0.7}


def test_worker_thread_and_ui_thread_can_write_together(store: Store) -> None:
    conv = store.create_conversation()
    reply = store.begin_reply(conv)
    errors: list[BaseException] = []

    def stream() -> None:
        try:
            text = ""
            for n in range(200):
                text += f" t{n}"
                store.update_reply(reply, text)
            store.finish_reply(reply, text, "done")
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=stream)
    worker.start()
    for n in range(100):
        store.add_message(conv, "user", f"note {n}")
        store.list_conversations()
    worker.join(timeout=30)
    assert errors == []
    final = store.get_message(reply)
    assert final is not None and final.state == "done" and final.content.endswith(" t199")


# -- search -------------------------------------------------------------------------------------------------


def test_search_finds_the_message(store: Store) -> None:
    first = store.create_conversation()
    store.add_message(first, "user", "What is the capital of France?")
    answer = store.add_message(first, "assistant", "Paris is the capital of France. It has a lighthouse museum.")
    other = store.create_conversation(title="Boats")
    store.add_message(other, "user", "tell me about sailing")

    hits = store.search("lighthouse")
    assert len(hits) == 1
    hit = hits[0]
    assert (hit.conversation_id, hit.message_id, hit.role) == (first, answer, "assistant")
    assert hit.title == "What is the capital of France?"
    assert f"{SNIPPET_MARKS[0]}lighthouse{SNIPPET_MARKS[1]}" in hit.snippet

    # Every word must match; the last word is matched as a prefix (results while typing).
    assert {h.message_id for h in store.search("capital france")} == {answer, answer - 1}
    assert [h.message_id for h in store.search("paris light")] == [answer]
    assert store.search("paris sailing") == []
    assert [h.conversation_id for h in store.search("SAIL")] == [other]


def test_search_sees_streamed_and_edited_text(store: Store) -> None:
    conv = store.create_conversation()
    reply = store.begin_reply(conv)
    store.update_reply(reply, "the first draft mentions walrus")
    assert [h.message_id for h in store.search("walrus")] == [reply]
    store.finish_reply(reply, "the final text mentions narwhal", "done")
    assert store.search("walrus") == []
    assert [h.message_id for h in store.search("narwhal")] == [reply]


def test_search_ignores_accents(store: Store) -> None:
    conv = store.create_conversation()
    msg = store.add_message(conv, "user", "un café crème")
    assert [h.message_id for h in store.search("cafe creme")] == [msg]


@pytest.mark.parametrize(
    "query",
    [
        '"',
        '"unbalanced',
        'say "hi',
        "-",
        "-foo",
        "a - b",
        "title:foo",
        "content:",
        "*",
        "foo*",
        "(",
        ")",
        "(foo OR",
        "NOT",
        "AND OR NOT",
        "NEAR(a b, 2)",
        "^start",
        "it's",
        "c++ -> ::",
        "{content}: x",
        "",
        "   ",
        "\x00",
        "🙂",
    ],
)
def test_search_accepts_any_text(store: Store, query: str) -> None:
    conv = store.create_conversation()
    store.add_message(conv, "user", "foo bar NOT start it's title:foo (foo OR bar)")
    hits = store.search(query)
    assert isinstance(hits, list)


def test_search_matches_fts_syntax_literally(store: Store) -> None:
    conv = store.create_conversation()
    msg = store.add_message(conv, "user", "set the option key:value and (NOT this) -- done")
    store.add_message(conv, "user", "something else entirely")
    assert [h.message_id for h in store.search("key:value")] == [msg]
    assert [h.message_id for h in store.search("(NOT this)")] == [msg]
    assert [h.message_id for h in store.search('"option')] == [msg]
    assert store.search("-") == []


# -- export / import ----------------------------------------------------------------------------------------


def _sample_conversation(store: Store) -> int:
    conv = store.create_conversation(
        model="internlm2",
        server_url="http://127.0.0.1:23333",
        lmdeploy_version="0.18.0",
        system_prompt="Be brief.",
    )
    store.add_message(conv, "user", "Write a haiku", images=["sky.png"])
    store.add_message(
        conv,
        "assistant",
        "Autumn moonlight—\na worm digs silently",
        stats={"ttft": 0.12, "tokens_per_s": 55.0},
    )
    store.add_message(conv, "user", "Another")
    reply = store.begin_reply(conv, sampling={"temperature": 1.2})
    store.finish_reply(reply, "Over the wintry", "stopped")
    return conv


def test_json_export_import_round_trip(store: Store) -> None:
    conv = _sample_conversation(store)
    exported = export_conversation(store, conv, "json")
    document = json.loads(exported)
    assert document["tuichat_export"] == 1
    assert document["conversation"]["title"] == "Write a haiku"

    copy = import_conversation(store, exported)
    assert copy != conv
    original, imported = store.get_conversation(conv), store.get_conversation(copy)
    assert original is not None and imported is not None
    for name in (
        "title",
        "created",
        "updated",
        "model",
        "server_url",
        "profile",
        "lmdeploy_version",
        "message_count",
    ):
        assert getattr(imported, name) == getattr(original, name)
    strip = [(m.role, m.content, m.state, m.created, m.sampling, m.stats, m.images) for m in store.messages(conv)]
    assert [
        (m.role, m.content, m.state, m.created, m.sampling, m.stats, m.images) for m in store.messages(copy)
    ] == strip
    assert {h.conversation_id for h in store.search("wintry")} == {conv, copy}


def test_import_of_a_streaming_reply_marks_it_interrupted(store: Store) -> None:
    text = json.dumps(
        {
            "tuichat_export": 1,
            "conversation": {"title": "x"},
            "messages": [{"role": "assistant", "content": "half", "state": "streaming"}],
        }
    )
    conv = import_conversation(store, text)
    assert [m.state for m in store.messages(conv)] == ["interrupted"]
    assert store.recover_interrupted() == 0


def test_markdown_export(store: Store) -> None:
    conv = _sample_conversation(store)
    text = export_conversation(store, conv, "md")
    assert text.startswith("# Write a haiku\n")
    assert "- Model: internlm2" in text
    assert "- Server: http://127.0.0.1:23333" in text
    assert "- LMDeploy: 0.18.0" in text
    assert "- Date: " in text
    sections = [line for line in text.splitlines() if line.startswith("## ")]
    assert sections == ["## System", "## User", "## Assistant", "## User", "## Assistant"]
    assert "Autumn moonlight—\na worm digs silently" in text
    assert "sky.png" in text
    assert text.rstrip().endswith("Over the wintry\n\n*(reply stopped)*")
    assert "55.0 tokens/s" in text


def test_export_of_a_missing_conversation_is_a_user_error(store: Store) -> None:
    with pytest.raises(TuichatError, match="no longer exists"):
        export_conversation(store, 999, "md")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("not json at all", "not valid JSON"),
        ("[1, 2]", "tuichat_export"),
        ('{"hello": 1}', "tuichat_export"),
        ('{"tuichat_export": 7, "conversation": {}, "messages": []}', "upgrade tuichat"),
        ('{"tuichat_export": 1, "messages": []}', '"conversation" must be an object'),
        ('{"tuichat_export": 1, "conversation": {}}', '"messages" must be a list'),
        ('{"tuichat_export": 1, "conversation": {}, "messages": [5]}', "message 1 must be an object"),
        (
            '{"tuichat_export": 1, "conversation": {}, "messages": [{"role": "robot", "content": ""}]}',
            "message 1 has role 'robot'",
        ),
        ('{"tuichat_export": 1, "conversation": {}, "messages": [{"role": "user"}]}', 'no text "content"'),
        (
            '{"tuichat_export": 1, "conversation": {}, "messages": [{"role": "user", "content": "", "state": "x"}]}',
            "has state 'x'",
        ),
        (
            '{"tuichat_export": 1, "conversation": {}, "messages": [{"role": "user", "content": "", "images": "a"}]}',
            "list of file names",
        ),
        ('{"tuichat_export": 1, "conversation": {"title": 5}, "messages": []}', "title must be text"),
        ('{"tuichat_export": 1, "conversation": {"created": "today"}, "messages": []}', "time in seconds"),
    ],
)
def test_bad_import_says_what_is_wrong(store: Store, text: str, fragment: str) -> None:
    with pytest.raises(TuichatError) as caught:
        import_conversation(store, text)
    assert fragment in str(caught.value)
    assert store.list_conversations() == []


# -- schema -------------------------------------------------------------------------------------------------

# The schema as version 1 shipped it, written out here so the test does not depend on the current code.
V1_SCHEMA = """
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
PRAGMA user_version = 1;
"""


def test_a_version_1_history_is_migrated_keeping_its_data(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    old = sqlite3.connect(db_path)
    old.executescript(V1_SCHEMA)
    old.execute("INSERT INTO conversations VALUES (1, 'Old chat', 100.0, 200.0, 'internlm2', 'http://127.0.0.1:23333')")
    old.executemany(
        "INSERT INTO messages VALUES (?, 1, ?, ?, ?, ?, ?, ?, ?)",
        [
            (1, "user", "what is a quokka", "done", 101.0, None, None, "[]"),
            (
                2,
                "assistant",
                "A small marsupial",
                "done",
                102.0,
                '{"temperature": 0.5}',
                '{"ttft": 0.3}',
                "[]",
            ),
            (3, "user", "and a wombat", "done", 103.0, None, None, '["w.png"]'),
            (4, "assistant", "A burrowing", "streaming", 104.0, None, None, "[]"),
        ],
    )
    old.commit()
    old.close()

    with Store.open(db_path) as migrated:
        assert migrated.recovered_on_open == 1  # v1 had no writer ids: a leftover stream is from a dead process
        (conv,) = migrated.list_conversations()
        assert (conv.id, conv.title, conv.created, conv.updated, conv.model) == (
            1,
            "Old chat",
            100.0,
            200.0,
            "internlm2",
        )
        assert (conv.profile, conv.lmdeploy_version, conv.message_count) == (None, None, 4)
        msgs = migrated.messages(1)
        assert [(m.content, m.state) for m in msgs] == [
            ("what is a quokka", "done"),
            ("A small marsupial", "done"),
            ("and a wombat", "done"),
            ("A burrowing", "interrupted"),
        ]
        assert msgs[1].sampling == {"temperature": 0.5} and msgs[2].images == ["w.png"]
        # Old messages are searchable and new ones go on after the old ids.
        assert [h.message_id for h in migrated.search("quokka")] == [1]
        assert migrated.add_message(1, "user", "thanks") == 5
        migrated.update_conversation(1, profile="default")
    check = sqlite3.connect(db_path)
    assert check.execute("PRAGMA user_version").fetchone()[0] == store_module.SCHEMA_VERSION == 4
    check.close()


def test_a_history_from_a_newer_tuichat_is_refused(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    newer = sqlite3.connect(db_path)
    newer.execute("CREATE TABLE future (x)")
    newer.execute("PRAGMA user_version = 99")
    newer.commit()
    newer.close()
    with pytest.raises(TuichatError, match="newer tuichat"):
        Store.open(db_path)


def test_a_file_that_is_not_a_history_is_refused(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(TuichatError, match="Move it aside"):
        Store.open(db_path)

    other = db_path.with_name("other.sqlite3")
    foreign = sqlite3.connect(other)
    foreign.execute("CREATE TABLE recipes (name)")
    foreign.commit()
    foreign.close()
    with pytest.raises(TuichatError, match="not a tuichat history"):
        Store.open(other)


# -- compare pairs (schema v4) -------------------------------------------------------------------------------


def test_two_compared_conversations_are_a_pair_until_either_is_deleted(store: Store) -> None:
    a = store.create_conversation(profile="bf16")
    b = store.create_conversation(profile="w4a16")
    lone = store.create_conversation()
    store.link_pair(a, b, ("bf16", "w4a16"))
    first, second, other = (store.get_conversation(i) for i in (a, b, lone))
    assert first is not None and second is not None and other is not None
    assert (first.partner_id, first.compare_side, first.compare_label) == (b, "A", "bf16")
    assert (second.partner_id, second.compare_side, second.compare_label) == (a, "B", "w4a16")
    assert other.partner_id is None
    assert {c.id: c.partner_id for c in store.list_conversations()} == {a: b, b: a, lone: None}
    assert f"side A of a pair with conversation {b}" in export_conversation(store, a)
    store.delete(b)
    kept = store.get_conversation(a)
    assert kept is not None and kept.partner_id is None and kept.compare_side is None


def v3_history(path: Path, titles: list[tuple[int, str, str | None]]) -> None:
    """A schema-v3 history holding conversations with the given (id, title, profile), one message each."""
    with Store.open(path) as fresh:
        assert fresh is not None
    db = sqlite3.connect(path)
    db.execute("DROP TABLE comparisons")
    db.execute("PRAGMA user_version = 3")
    for conv_id, title, profile in titles:
        db.execute(
            "INSERT INTO conversations (id, title, created, updated, profile) VALUES (?, ?, 1.0, 2.0, ?)",
            (conv_id, title, profile),
        )
        db.execute(
            "INSERT INTO messages (conversation_id, role, content, state, created) VALUES (?, 'user', ?, 'done', 1.0)",
            (conv_id, f"question {conv_id}"),
        )
    db.commit()
    db.close()


def test_a_v3_pair_marked_in_its_titles_becomes_a_link_and_nothing_is_lost(db_path: Path) -> None:
    v3_history(
        db_path,
        [
            (1, "Which is faster ⇄ #2 B w4a16", "bf16"),
            (2, "Which is faster ⇄ #1 A bf16", "w4a16"),
            (3, "Renamed by hand", "w4"),
            (4, "Older run ⇄ #3 A w4", "bf16"),  # its partner's title lost the mark
            (5, "Orphan ⇄ #99 B gone", None),  # its partner was deleted
            (6, "A plain chat", None),
        ],
    )
    with Store.open(db_path) as migrated:
        convs = {c.id: c for c in migrated.list_conversations()}
        assert {i: (c.title, c.partner_id, c.compare_side, c.compare_label) for i, c in convs.items()} == {
            1: ("Which is faster", 2, "A", "bf16"),
            2: ("Which is faster", 1, "B", "w4a16"),
            3: ("Renamed by hand", 4, "A", "w4"),
            4: ("Older run", 3, "B", "bf16"),
            5: ("Orphan ⇄ #99 B gone", None, None, None),
            6: ("A plain chat", None, None, None),
        }
        assert all([m.content for m in migrated.messages(i)] == [f"question {i}"] for i in convs)
    check = sqlite3.connect(db_path)
    assert check.execute("PRAGMA user_version").fetchone()[0] == 4
    check.close()


def test_a_json_export_of_one_compare_side_brings_the_pair_back_on_import(store: Store, tmp_path: Path) -> None:
    a, b = store.create_conversation(model="bf16-model"), store.create_conversation(model="w4-model")
    store.add_message(a, "user", "same question")
    store.add_message(a, "assistant", "answer from A")
    store.add_message(b, "user", "same question")
    store.add_message(b, "assistant", "answer from B")
    store.link_pair(a, b, ("bf16", "w4a16"))
    exported = export_conversation(store, b, "json")

    other = Store.open(tmp_path / "elsewhere.sqlite3")
    try:
        new_b = import_conversation(other, exported)
        side_b = other.get_conversation(new_b)
        assert side_b is not None and side_b.compare_side == "B" and side_b.compare_label == "w4a16"
        assert side_b.partner_id is not None
        side_a = other.get_conversation(side_b.partner_id)
        assert side_a is not None and side_a.compare_side == "A" and side_a.compare_label == "bf16"
        assert side_a.model == "bf16-model"
        assert [m.content for m in other.messages(side_a.id)] == ["same question", "answer from A"]
        assert [m.content for m in other.messages(new_b)] == ["same question", "answer from B"]
    finally:
        other.close()


def test_a_json_export_of_a_plain_conversation_imports_as_one(store: Store) -> None:
    conv = store.create_conversation()
    store.add_message(conv, "user", "alone")
    before = len(store.list_conversations())
    new = import_conversation(store, export_conversation(store, conv, "json"))
    assert len(store.list_conversations()) == before + 1
    imported = store.get_conversation(new)
    assert imported is not None and imported.partner_id is None
