"""`tuichat.chat.sanitize`: no terminal control sequence survives, bidi controls are shown instead of applied, and
the stream cleaner removes a sequence split across chunks as a whole."""

from __future__ import annotations

import re

import pytest

from tuichat.chat.sanitize import StreamCleaner, clean, clean_data, clean_line

BIDI = [chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))]
# What a terminal would act on: C0 controls other than newline and tab, DEL, C1, and the bidi controls.
ACTIVE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")

HOSTILE = [
    "\x1b]52;c;aGVsbG8=\x07",  # OSC 52 clipboard write, BEL-terminated
    "\x1b]52;c;aGVsbG8=\x1b\\",  # ... ST-terminated
    "\x1b]0;owned\x07",  # window title
    "\x1b[2J\x1b[H",  # clear screen, cursor home
    "\x1b[38;5;196m",  # colour
    "\x9b2J",  # 8-bit CSI
    "\x9d52;c;aGVsbG8=\x9c",  # 8-bit OSC
    "\x1bP+q544e\x1b\\",  # DCS (terminfo query)
    "\x1b_app\x1b\\",  # APC
    "\x1b(0",  # line-drawing charset
    "\x07\x08\x7f\x00",  # bell, backspace, delete, NUL
]


@pytest.mark.parametrize("sequence", HOSTILE)
def test_control_sequences_are_removed_whole(sequence: str) -> None:
    assert clean(f"before{sequence}after") == "beforeafter"


def test_plain_text_newlines_and_tabs_are_kept() -> None:
    text = "Ünïcode, emoji 🦘, Hebrew שלום\n\tindented line"
    assert clean(text) == text


def test_carriage_returns_cannot_overwrite_a_line() -> None:
    assert clean("safe\r\nline\rFAKE") == "safe\nlineFAKE"


@pytest.mark.parametrize("control", BIDI)
def test_bidi_controls_are_shown_not_applied(control: str) -> None:
    cleaned = clean(f"access{control}nimda")
    assert cleaned == f"access⟨U+{ord(control):04X}⟩nimda"
    assert not ACTIVE.search(cleaned)


def test_cleaning_is_idempotent() -> None:
    once = clean("".join(HOSTILE) + "x\u202ey\u2066z\n")
    assert clean(once) == once
    assert clean_line(clean_line(" a\u202e\n b ")) == clean_line(" a\u202e\n b ") == "a⟨U+202E⟩ b"


def test_clean_line_makes_one_line() -> None:
    assert clean_line("  model\n# Injected heading\t\x1b]0;x\x07end  ") == "model # Injected heading end"


def test_clean_data_cleans_every_string_keys_included() -> None:
    data = {"k\x1b[1m": ["v\x07", {"n": 1.5, "s": "\u202e"}], "flag": True, "none": None}
    assert clean_data(data) == {"k": ["v", {"n": 1.5, "s": "⟨U+202E⟩"}], "flag": True, "none": None}


@pytest.mark.parametrize("sequence", [s for s in HOSTILE if s.startswith("\x1b")])
def test_stream_cleaner_removes_a_sequence_split_at_every_point(sequence: str) -> None:
    text = f"Hello {sequence}world"
    for cut in range(len(text) + 1):
        cleaner = StreamCleaner()
        out = cleaner.feed(text[:cut]) + cleaner.feed(text[cut:]) + cleaner.flush()
        assert out == "Hello world", cut


def test_stream_cleaner_shows_bidi_controls() -> None:
    cleaner = StreamCleaner()
    out = cleaner.feed("abc\u202e") + cleaner.feed("\u2066def") + cleaner.flush()
    assert out == "abc⟨U+202E⟩⟨U+2066⟩def"


def test_stream_cleaner_gives_up_holding_an_endless_sequence() -> None:
    cleaner = StreamCleaner()
    first = cleaner.feed("text \x1b]0;" + "x" * 300)
    assert first.startswith("text ") and not ACTIVE.search(first)  # not held back forever
