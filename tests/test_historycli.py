"""`tuichat history`, `history --search`, `export` and `import` through `tuichat.cli.main.main`, plus the top-level
`python -m tuichat --version/--help` and an unknown profile. TUICHAT_HOME is a fresh folder per test (conftest)."""

from __future__ import annotations

import io
import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tuichat import __version__
from tuichat.chat.store import Message, Store
from tuichat.cli.main import main


def seed_conversations() -> tuple[int, int]:
    """Two saved chats in the default history file: an older one about bananas, a newer one about SQL."""
    with Store.open() as store:
        fruit = store.create_conversation(model="internlm2", server_url="http://127.0.0.1:23333", profile="fast")
        store.add_message(fruit, "user", "Why are bananas curved?")
        store.add_message(
            fruit,
            "assistant",
            "Bananas grow towards the sun, which bends them.",
            sampling={"temperature": 0.7},
            stats={"ttft": 0.12, "tokens_per_s": 80.5, "completion_tokens": 11},
        )
        sql = store.create_conversation(model="qwen", system_prompt="Answer in one line.")
        store.add_message(sql, "user", "How do I count rows in SQLite?")
        store.add_message(sql, "assistant", "SELECT COUNT(*) FROM t;")
    return fruit, sql


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------------------------------- history


def test_history_with_nothing_saved(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "history")
    assert code == 0
    assert "no saved conversations yet" in out
    assert err == ""


def test_history_lists_ids_titles_and_counts_newest_first(capsys: pytest.CaptureFixture[str]) -> None:
    fruit, sql = seed_conversations()
    code, out, err = run(capsys, "history")
    assert code == 0 and err == ""
    header, *rows = out.splitlines()
    assert header.split() == ["id", "title", "updated", "messages"]
    assert len(rows) == 2
    assert rows[0].split()[0] == str(sql) and "How do I count rows in SQLite?" in rows[0]
    assert rows[1].split()[0] == str(fruit) and "Why are bananas curved?" in rows[1]
    assert rows[0].split()[-1] == "3"  # system prompt, question, answer
    assert rows[1].split()[-1] == "2"


def test_history_limit(capsys: pytest.CaptureFixture[str]) -> None:
    _, sql = seed_conversations()
    code, out, _ = run(capsys, "history", "-n", "1")
    assert code == 0
    rows = out.splitlines()[1:]
    assert [r.split()[0] for r in rows] == [str(sql)]


def test_history_search_finds_the_message_and_its_conversation(capsys: pytest.CaptureFixture[str]) -> None:
    fruit, _ = seed_conversations()
    code, out, err = run(capsys, "history", "--search", "sun")
    assert code == 0 and err == ""
    rows = out.splitlines()[1:]
    assert len(rows) == 1
    assert rows[0].split()[0] == str(fruit)
    assert "«sun»" in rows[0]


def test_history_search_takes_any_text_literally(capsys: pytest.CaptureFixture[str]) -> None:
    _, sql = seed_conversations()
    code, out, _ = run(capsys, "history", "--search", 'COUNT(*) "rows')
    assert code == 0
    assert [r.split()[0] for r in out.splitlines()[1:]] == [str(sql)]


def test_history_search_without_a_match_exits_1_with_a_sentence(capsys: pytest.CaptureFixture[str]) -> None:
    seed_conversations()
    code, out, err = run(capsys, "history", "--search", "kumquat")
    assert code == 1
    assert out == ""
    assert "nothing matches 'kumquat'" in err


def test_history_never_prints_control_sequences_from_an_imported_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # An export file is untrusted input: a title that retitles the terminal or writes the clipboard (OSC 52)
    # must not reach the terminal when the history is listed or searched.
    doc = {
        "tuichat_export": 1,
        "conversation": {"title": "evil\x1b]52;c;cm0gLXJmIH4=\x07 title\x1b[2J"},
        "messages": [{"role": "user", "content": "payload \x1b]0;owned\x07 here"}],
    }
    path = tmp_path / "evil.json"
    path.write_text(json.dumps(doc))
    assert run(capsys, "import", str(path))[0] == 0
    for argv in (["history"], ["history", "--search", "payload"]):
        code, out, _ = run(capsys, *argv)
        assert code == 0
        assert "\x1b" not in out and "\x07" not in out, f"{argv}: {out!r}"


# An export file built to drive the terminal from every text field it has.
OSC52 = "\x1b]52;c;cm0gLXJmIH4=\x07"
HOSTILE_EXPORT = {
    "tuichat_export": 1,
    "conversation": {
        "title": "evil\u202e title" + OSC52,
        "model": "internlm2" + OSC52,
        "server_url": "http://127.0.0.1:23333\x9b2J",
        "profile": "fast\x1b[2J\n# Forged heading",
        "lmdeploy_version": "0.18\x9d0;owned\x9c",
    },
    "messages": [
        {
            "role": "user",
            "content": "look: \u2066gnp.exe\u2069 " + OSC52 + "\x1bP+q544e\x1b\\",
            "images": ["cat\x1b]0;owned\x07.png"],
            "sampling": {"temperature\x1b[1m": 0.5, "stop": ["\x07end\u202d"]},
        },
        {
            "role": "assistant",
            "content": "sure\x1b]8;;http://evil\x1b\\link\x1b]8;;\x1b\\ \u202ereversed",
            "stats": {"note\x9b": "\x1b[31mred", "ttft": 0.2},
        },
    ],
}
# What a terminal acts on: C0 controls but newline and tab, DEL, C1, and the bidi controls.
ACTIVE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def strings(value: object) -> list[str]:
    """Every string in decoded JSON, keys included."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [*value.keys(), *(s for item in value.values() for s in strings(item))]
    if isinstance(value, list):
        return [s for item in value for s in strings(item)]
    return []


def tuichat_bytes(*argv: str) -> bytes:
    """What `tuichat ARGV` writes to a pipe, as bytes (TUICHAT_HOME comes from the hermetic environment)."""
    done = subprocess.run([sys.executable, "-m", "tuichat", *argv], capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


def assert_inert(raw: bytes, where: str) -> str:
    assert b"\x1b" not in raw and b"\x07" not in raw, f"{where}: {raw!r}"
    text = raw.decode("utf-8")
    assert not ACTIVE.search(text), f"{where}: {text!r}"
    return text


def test_a_hostile_import_prints_no_control_sequence_anywhere(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "hostile.json"
    path.write_text(json.dumps(HOSTILE_EXPORT))
    code, out, _ = run(capsys, "import", str(path))
    assert code == 0
    conv_id = out.strip().rsplit(" ", 1)[-1]

    markdown = assert_inert(tuichat_bytes("export", conv_id, "--format", "md"), "export md")
    assert markdown.startswith("# evil⟨U+202E⟩ title\n")  # the bidi control is shown, not applied
    assert "- Model: internlm2\n" in markdown
    assert "- Profile: fast # Forged heading\n" in markdown  # a one-line field stays one line
    assert "Images: cat.png" in markdown
    assert "look: ⟨U+2066⟩gnp.exe⟨U+2069⟩ " in markdown and "surelink ⟨U+202E⟩reversed" in markdown

    raw_json = assert_inert(tuichat_bytes("export", conv_id, "--format", "json"), "export json")
    doc = json.loads(raw_json)
    for text in strings(doc):  # no escaped controls either: `jq -r` would print them
        assert not ACTIVE.search(text), text
    assert doc["conversation"]["model"] == "internlm2"
    assert doc["messages"][0]["sampling"] == {"temperature": 0.5, "stop": ["end⟨U+202D⟩"]}
    assert doc["messages"][1]["stats"] == {"note": "red", "ttft": 0.2}

    listing = assert_inert(tuichat_bytes("history"), "history")
    assert "evil⟨U+202E⟩ title" in listing
    assert_inert(tuichat_bytes("history", "--search", "reversed"), "history --search")


def test_the_import_stores_only_clean_text(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "hostile.json"
    path.write_text(json.dumps(HOSTILE_EXPORT))
    assert run(capsys, "import", str(path))[0] == 0
    with Store.open() as store:
        db = sqlite3.connect(store.path)
    try:
        rows = db.execute("SELECT title, model, server_url, profile, lmdeploy_version FROM conversations").fetchall()
        rows += db.execute("SELECT content, sampling, stats, images FROM messages").fetchall()
    finally:
        db.close()
    stored = [value for row in rows for value in row if value is not None]
    assert len(stored) == 5 + 3 + 3  # every field of the file that carried text
    for value in stored:
        assert not ACTIVE.search(value) and "\\u001b" not in value and "\\u0007" not in value, value


def test_text_saved_before_the_fix_is_still_cleaned_on_output() -> None:
    # A history written by an older tuichat may already hold raw sequences: output cleans again.
    with Store.open() as store:
        conv = store.create_conversation(model="m")
        store.add_message(conv, "user", "hi")
        db = sqlite3.connect(store.path)
    try:
        db.execute("UPDATE conversations SET title = ?, model = ?", ("old" + OSC52, "m\u202e" + OSC52))
        db.execute("UPDATE messages SET content = ?, images = ?", ("hi" + OSC52, json.dumps(["x\x1b[2J.png"])))
        db.commit()
    finally:
        db.close()
    for fmt in ("md", "json"):
        assert_inert(tuichat_bytes("export", str(conv), "--format", fmt), fmt)
    assert "old" in assert_inert(tuichat_bytes("history"), "history")


# ---------------------------------------------------------------------------------------------------- export


def test_export_markdown(capsys: pytest.CaptureFixture[str]) -> None:
    fruit, _ = seed_conversations()
    code, out, err = run(capsys, "export", str(fruit))
    assert code == 0 and err == ""
    assert out.startswith("# Why are bananas curved?\n")
    assert "- Model: internlm2" in out
    assert "## User\n\nWhy are bananas curved?" in out
    assert "## Assistant\n\nBananas grow towards the sun, which bends them." in out
    assert "80.5 tokens/s" in out
    code, again, _ = run(capsys, "export", str(fruit), "--format", "md")
    assert (code, again) == (0, out)


def test_export_json(capsys: pytest.CaptureFixture[str]) -> None:
    fruit, _ = seed_conversations()
    code, out, err = run(capsys, "export", str(fruit), "--format", "json")
    assert code == 0 and err == ""
    doc = json.loads(out)
    assert doc["conversation"]["title"] == "Why are bananas curved?"
    assert doc["conversation"]["model"] == "internlm2"
    assert [(m["role"], m["content"]) for m in doc["messages"]] == [
        ("user", "Why are bananas curved?"),
        ("assistant", "Bananas grow towards the sun, which bends them."),
    ]
    assert doc["messages"][1]["sampling"] == {"temperature": 0.7}


def test_export_unknown_id_exits_1_with_a_sentence(capsys: pytest.CaptureFixture[str]) -> None:
    seed_conversations()
    code, out, err = run(capsys, "export", "999")
    assert code == 1
    assert out == ""
    assert err.startswith("tuichat: ") and "999" in err and "tuichat history" in err
    assert "Traceback" not in err


def test_export_bad_format_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    fruit, _ = seed_conversations()
    with pytest.raises(SystemExit) as info:
        main(["export", str(fruit), "--format", "pdf"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- import


def test_export_then_import_round_trip(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fruit, _ = seed_conversations()
    _, exported, _ = run(capsys, "export", str(fruit), "--format", "json")
    path = tmp_path / "bananas.json"
    path.write_text(exported, encoding="utf-8")
    code, out, err = run(capsys, "import", str(path))
    assert code == 0 and err == ""
    new_id = int(out.strip().rsplit(" ", 1)[-1])
    assert new_id != fruit
    with Store.open() as store:
        before, after = store.messages(fruit), store.messages(new_id)
        conv = store.get_conversation(new_id)
    assert conv is not None and (conv.title, conv.model, conv.profile) == (
        "Why are bananas curved?",
        "internlm2",
        "fast",
    )

    def shape(msgs: list[Message]) -> list[tuple[object, ...]]:
        return [(m.role, m.content, m.state, m.sampling, m.stats, m.images) for m in msgs]

    assert shape(after) == shape(before)
    # and the imported copy is listed and exports the same way
    assert run(capsys, "export", str(new_id), "--format", "json")[1] == exported
    _, listing, _ = run(capsys, "history")
    assert str(new_id) in [r.split()[0] for r in listing.splitlines()[1:]]


def test_import_from_stdin(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    doc = {
        "tuichat_export": 1,
        "conversation": {"title": "From a pipe", "model": "m"},
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    }
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(doc)))
    code, out, err = run(capsys, "import", "-")
    assert code == 0 and err == ""
    new_id = int(out.strip().rsplit(" ", 1)[-1])
    with Store.open() as store:
        assert [(m.role, m.content) for m in store.messages(new_id)] == [("user", "hi"), ("assistant", "hello")]
        conv = store.get_conversation(new_id)
    assert conv is not None and conv.title == "From a pipe"


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("this is { not json", "not valid JSON"),
        (json.dumps({"messages": []}), "tuichat_export"),
        (json.dumps({"tuichat_export": 99, "conversation": {}, "messages": []}), "upgrade tuichat"),
        (
            json.dumps({"tuichat_export": 1, "conversation": {}, "messages": [{"role": "robot", "content": "x"}]}),
            "role",
        ),
    ],
    ids=["not-json", "not-an-export", "newer-format", "bad-role"],
)
def test_import_of_a_bad_file_exits_1_and_imports_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, said: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    code, out, err = run(capsys, "import", str(path))
    assert code == 1
    assert out == ""
    assert err.startswith("tuichat: ") and said in err
    assert "Traceback" not in err
    with Store.open() as store:
        assert store.list_conversations() == []


def test_import_of_a_missing_file_exits_1(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.json"
    code, out, err = run(capsys, "import", str(missing))
    assert code == 1
    assert out == ""
    assert err.startswith("tuichat: ") and str(missing) in err


def test_import_of_a_folder_exits_1(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "import", str(tmp_path))
    assert code == 1
    assert err.startswith("tuichat: ") and "cannot read" in err


# ----------------------------------------------------------------------------------------------- top level


def test_module_version_and_help() -> None:
    version = subprocess.run(
        [sys.executable, "-m", "tuichat", "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    assert version.returncode == 0
    assert version.stdout.strip() == f"tuichat {__version__}"
    helped = subprocess.run(
        [sys.executable, "-m", "tuichat", "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    assert helped.returncode == 0
    assert helped.stdout.startswith("usage: tuichat")
    for command in ("history", "export ID", "import FILE"):
        assert command in helped.stdout


def test_unknown_profile_exits_1_with_a_sentence(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "no-such-profile")
    assert code == 1
    assert "no profile called 'no-such-profile'" in err
    assert "tuichat profiles" in err
    assert "Traceback" not in err


def test_history_shows_the_two_sides_of_a_compare_run_together(capsys: pytest.CaptureFixture[str]) -> None:
    with Store.open() as store:
        a = store.create_conversation(profile="bf16")
        store.add_message(a, "user", "Which format is faster?")
        b = store.create_conversation(profile="w4a16")
        store.add_message(b, "user", "Which format is faster?")
        plain = store.create_conversation()
        store.add_message(plain, "user", "A plain question")  # newest: between the pair if ordered by time alone
        store.add_message(a, "assistant", "BF16 is exact.")
        store.link_pair(a, b, ("bf16", "w4a16"))
    code, out, err = run(capsys, "history")
    assert code == 0 and err == ""
    _, *rows = out.splitlines()
    assert [r.split()[0] for r in rows[:3]] == [str(a), str(b), str(plain)]
    assert "⇄ A bf16 · Which format is faster?" in rows[0]
    assert "⇄ B w4a16 · Which format is faster?" in rows[1]
    assert "⇄" not in rows[2]
    assert "one `tuichat compare` run" in rows[3]
