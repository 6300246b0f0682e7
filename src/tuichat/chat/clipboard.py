"""Copy to the user's clipboard from a terminal program, over SSH too, with OSC 52 escape sequences.

The sequence travels through the terminal stream, so it reaches the laptop's clipboard wherever the program
runs, provided the terminal emulator supports OSC 52. Multiplexers in between need it wrapped: tmux in its
passthrough DCS, GNU screen in (several short) DCS strings. Also: which fenced code blocks a reply holds,
for "copy code block".
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from tuichat.errors import TuichatError

ESC = "\x1b"
BEL = "\x07"
ST = ESC + "\\"
# Many terminals drop longer OSC 52 strings (xterm, tmux and kitty all cap them near here), and a
# half-applied copy is worse than none, so larger copies are refused, not truncated: a truncated code
# block pasted somewhere looks complete and is not. The limit is on the base64 payload the terminal sees
# (about 75 KB of text).
MAX_OSC52_BYTES = 100_000
# GNU screen keeps at most MAXSTR (768) bytes of one string sequence, terminator included; stay under it.
SCREEN_CHUNK_BYTES = 760

# Terminals that ignore OSC 52, by the variables they set: what to tell the user.
_NO_OSC52_TERM_PROGRAMS = {
    "Apple_Terminal": "macOS Terminal does not support OSC 52 clipboard copies",
}


@dataclass(frozen=True, slots=True)
class CodeBlock:
    lang: str
    code: str


def osc52_payload(text: str) -> str:
    """The base64 text of an OSC 52 copy; raises TuichatError when it is too big for terminals."""
    payload = base64.b64encode(text.encode("utf-8")).decode("ascii")
    if len(payload) > MAX_OSC52_BYTES:
        raise TuichatError(
            f"This text is too long to copy through the terminal ({len(text.encode('utf-8')) // 1000} KB; "
            f"terminals accept about {MAX_OSC52_BYTES * 3 // 4 // 1000} KB). Copy a smaller part, such as "
            "one code block, or export the conversation to a file."
        )
    return payload


def osc52_sequence(text: str, *, env: Mapping[str, str] | None = None) -> str:
    """The escape sequence that puts `text` on the clipboard, wrapped for tmux or GNU screen when the
    program runs inside one (`TMUX` / `STY` in `env`, which defaults to os.environ). Write it to the
    terminal as is. Raises TuichatError when `text` is longer than terminals accept."""
    env = os.environ if env is None else env
    sequence = f"{ESC}]52;c;{osc52_payload(text)}{BEL}"
    if env.get("TMUX"):
        # Two copies: tmux with `set-clipboard on` takes the plain one (and forwards it to the outer
        # terminal); tmux with `allow-passthrough on` forwards the wrapped one untouched. Either setting is
        # then enough; with both, the clipboard is set twice to the same text.
        return sequence + f"{ESC}Ptmux;{sequence.replace(ESC, ESC + ESC)}{ST}"
    if env.get("STY"):
        # screen forwards the body of a DCS string to the outer terminal verbatim; the outer terminal
        # sees the pieces back to back, i.e. the whole sequence.
        return "".join(
            f"{ESC}P{sequence[start : start + SCREEN_CHUNK_BYTES]}{ST}"
            for start in range(0, len(sequence), SCREEN_CHUNK_BYTES)
        )
    return sequence


def copy_hint(env: Mapping[str, str] | None = None) -> str | None:
    """A sentence for the user when a copy may not reach their clipboard, or None when it should."""
    env = os.environ if env is None else env
    hints: list[str] = []
    if env.get("TMUX"):
        hints.append(
            "Inside tmux, copies reach your clipboard only if ~/.tmux.conf has `set -g set-clipboard on` "
            "(or `set -g allow-passthrough on`, tmux 3.3+) and the terminal outside tmux supports OSC 52; "
            "run `tmux source ~/.tmux.conf` after changing it."
        )
    elif env.get("STY"):
        hints.append(
            "Inside GNU screen, copies reach your clipboard only if the terminal outside screen supports "
            "OSC 52; if nothing arrives, try tmux with `set -g set-clipboard on`."
        )
    term_program = env.get("TERM_PROGRAM", "")
    if term_program in _NO_OSC52_TERM_PROGRAMS:
        hints.append(
            f"{_NO_OSC52_TERM_PROGRAMS[term_program]}; use iTerm2, kitty, WezTerm or Ghostty, "
            "or select the text with the mouse."
        )
    elif env.get("VTE_VERSION"):
        hints.append(
            "GNOME Terminal and other VTE-based terminals ignore OSC 52 clipboard copies; use a terminal "
            "that supports them (kitty, WezTerm, foot, Alacritty, Ghostty) or select the text with the mouse."
        )
    elif env.get("TERM") == "linux":
        hints.append("The Linux console has no clipboard; select the text with the mouse (gpm) instead.")
    return " ".join(hints) or None


# -- code blocks -------------------------------------------------------------------------------------------

# An opening fence: any indentation (models indent fences inside list items), 3+ backticks or tildes, and
# an info string whose first word is the language. A backtick fence's info string may not hold backticks
# (CommonMark), which keeps inline ```code``` on one line from opening a block.
_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


def extract_code_blocks(markdown: str) -> list[CodeBlock]:
    """The fenced code blocks of a Markdown text in order; an unterminated last fence runs to the end
    (a reply that was stopped mid-block still gives its code)."""
    blocks: list[CodeBlock] = []
    lines = markdown.splitlines()
    index = 0
    while index < len(lines):
        opened = _OPEN.match(lines[index])
        index += 1
        if opened is None:
            continue
        fence, info = opened["fence"], opened["info"].strip()
        if fence[0] == "`" and "`" in info:
            continue
        indent = len(opened["indent"].expandtabs(4))
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        body: list[str] = []
        while index < len(lines) and not closing.match(lines[index]):
            body.append(_dedent(lines[index], indent))
            index += 1
        index += 1  # the closing fence, or past the end
        blocks.append(CodeBlock(info.split()[0] if info else "", "\n".join(body)))
    return blocks


def _dedent(line: str, indent: int) -> str:
    """Remove up to `indent` columns of leading whitespace, as the opening fence was indented; tabs
    further in (a Makefile's, say) are kept as they are."""
    column = 0
    for position, char in enumerate(line):
        if column >= indent or char not in " \t":
            return line[position:]
        column = column + 1 if char == " " else (column // 4 + 1) * 4
    return ""
