"""OSC 52 clipboard sequences (plain, tmux, GNU screen), the hints shown when a copy may get lost, and code
block extraction for "copy code block"."""

from __future__ import annotations

import base64
import re

import pytest

from tuichat.chat.clipboard import (
    MAX_OSC52_BYTES,
    SCREEN_CHUNK_BYTES,
    CodeBlock,
    copy_hint,
    extract_code_blocks,
    osc52_sequence,
)
from tuichat.errors import TuichatError

ESC = "\x1b"
TEXT = "print('héllo')\n# ✓ done\n"
B64 = base64.b64encode(TEXT.encode()).decode()


def decode(sequence: str) -> str:
    match = re.fullmatch(r"\x1b\]52;c;([A-Za-z0-9+/=]*)\x07", sequence)
    assert match, f"not a single OSC 52 sequence: {sequence!r}"
    return base64.b64decode(match[1], validate=True).decode("utf-8")


def test_plain_sequence() -> None:
    sequence = osc52_sequence(TEXT, env={"TERM": "xterm-256color"})
    assert sequence == f"{ESC}]52;c;{B64}\x07"
    assert decode(sequence) == TEXT


def test_tmux_sequence_works_with_either_tmux_setting() -> None:
    sequence = osc52_sequence(TEXT, env={"TMUX": "/tmp/tmux-1000/default,123,0"})
    plain = f"{ESC}]52;c;{B64}\x07"
    # First the plain copy (for `set-clipboard on`), then the passthrough one (for `allow-passthrough on`).
    assert sequence == plain + f"{ESC}Ptmux;{ESC}{ESC}]52;c;{B64}\x07{ESC}\\"
    wrapped = sequence[len(plain) :]
    inner = wrapped[len(f"{ESC}Ptmux;") : -2].replace(ESC + ESC, ESC)
    assert decode(inner) == TEXT


def test_screen_sequence_is_split_into_short_dcs_strings() -> None:
    text = "x = 1\n" * 400  # 2400 bytes: the sequence needs several chunks
    sequence = osc52_sequence(text, env={"STY": "1234.pts-0.host"})
    chunks = re.findall(r"\x1bP(.*?)\x1b\\", sequence, flags=re.S)
    assert "".join(f"{ESC}P{chunk}{ESC}\\" for chunk in chunks) == sequence
    assert len(chunks) > 1
    assert all(len(chunk.encode()) <= SCREEN_CHUNK_BYTES <= 768 for chunk in chunks)
    assert decode("".join(chunks)) == text


def test_short_screen_copy_is_one_dcs() -> None:
    assert osc52_sequence("hi", env={"STY": "1.x"}) == f"{ESC}P{ESC}]52;c;aGk=\x07{ESC}\\"


def test_env_defaults_to_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STY", raising=False)
    monkeypatch.setenv("TMUX", "/tmp/tmux,1,0")
    assert f"{ESC}Ptmux;" in osc52_sequence("a")
    monkeypatch.delenv("TMUX")
    assert osc52_sequence("a") == f"{ESC}]52;c;YQ==\x07"


def test_too_big_a_copy_is_refused_not_cut() -> None:
    fits = "a" * (MAX_OSC52_BYTES * 3 // 4)
    assert decode(osc52_sequence(fits, env={})) == fits
    with pytest.raises(TuichatError, match="too long to copy"):
        osc52_sequence(fits + "aaa", env={})


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"TERM": "xterm-256color", "TERM_PROGRAM": "WezTerm"}, None),
        ({}, None),
        ({"TMUX": "/tmp/tmux,1,0"}, "set -g set-clipboard on"),
        ({"TMUX": "/tmp/tmux,1,0"}, "allow-passthrough on"),
        ({"STY": "1.pts"}, "GNU screen"),
        ({"TERM_PROGRAM": "Apple_Terminal"}, "macOS Terminal does not support OSC 52"),
        ({"VTE_VERSION": "7600"}, "VTE-based"),
        ({"TERM": "linux"}, "Linux console"),
    ],
)
def test_copy_hints(env: dict[str, str], expected: str | None) -> None:
    hint = copy_hint(env)
    if expected is None:
        assert hint is None
    else:
        assert hint is not None and expected in hint


def test_hints_add_up() -> None:
    hint = copy_hint({"TMUX": "/tmp/t,1,0", "TERM_PROGRAM": "Apple_Terminal"})
    assert hint is not None and "tmux" in hint and "macOS Terminal" in hint


def test_code_blocks_in_order_with_languages() -> None:
    markdown = (
        "Here you go:\n\n"
        "```python\nprint('a')\n\nprint('b')\n```\n\n"
        "Then run:\n\n"
        "~~~ bash title=run.sh\nls -l\n~~~\n"
        "```\nplain\n```"
    )
    assert extract_code_blocks(markdown) == [
        CodeBlock("python", "print('a')\n\nprint('b')"),
        CodeBlock("bash", "ls -l"),
        CodeBlock("", "plain"),
    ]


def test_unterminated_last_block_runs_to_the_end() -> None:
    markdown = 'Start:\n```rust\nfn main() {\n    println!("hi");\n'
    assert extract_code_blocks(markdown) == [CodeBlock("rust", 'fn main() {\n    println!("hi");')]


def test_longer_fence_holds_shorter_fences() -> None:
    markdown = "````markdown\n```python\nx = 1\n```\n````\nafter"
    assert extract_code_blocks(markdown) == [CodeBlock("markdown", "```python\nx = 1\n```")]


def test_tilde_block_is_not_closed_by_backticks() -> None:
    markdown = "~~~\na\n```\nb\n~~~"
    assert extract_code_blocks(markdown) == [CodeBlock("", "a\n```\nb")]


def test_indented_fence_in_a_list_item_is_dedented() -> None:
    markdown = "1. Install:\n   ```sh\n   pip install lmdeploy\n     --upgrade\n   ```\n2. Done"
    assert extract_code_blocks(markdown) == [CodeBlock("sh", "pip install lmdeploy\n  --upgrade")]


def test_tabs_inside_code_are_kept() -> None:
    markdown = "```make\nall:\n\tgcc main.c\n```"
    assert extract_code_blocks(markdown) == [CodeBlock("make", "all:\n\tgcc main.c")]


def test_inline_triple_backticks_are_not_a_block() -> None:
    assert extract_code_blocks("```code``` at a line start is inline.\nNo blocks here.") == []
    assert extract_code_blocks("") == []
