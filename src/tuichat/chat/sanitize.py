"""Make model output safe to draw: no terminal control sequence in it may reach the terminal.

A model (or a hostile prompt injection) can emit ESC sequences that move the cursor, retitle the window, or
write the clipboard (OSC 52). We remove whole sequences where we can recognise them and then every remaining
C0/C1 control character except newline and tab, so even a sequence split across two stream chunks loses its
ESC and becomes harmless text.

Bidirectional embedding, override and isolate controls (U+202A-202E, U+2066-2069) are not removed but shown as
a visible placeholder such as `⟨U+202E⟩`: applied, they reorder what is drawn after them ("Trojan Source"), so a
reply or an imported chat could make text read differently from what it is; dropped, the reader would not know
the text carried them.
"""

from __future__ import annotations

import re
from typing import Any

# CSI, OSC (ended by BEL or ST), DCS/SOS/PM/APC strings, and two-character escapes.
_SEQUENCE = re.compile(
    r"""
    \x1b\[[0-?]*[ -/]*[@-~]            # CSI ... final byte
    | \x1b\][^\x07\x1b]*(?:\x07|\x1b\\)? # OSC ... BEL or ST
    | \x1b[PX^_][^\x1b]*(?:\x1b\\)?      # DCS, SOS, PM, APC ... ST
    | \x9b[0-?]*[ -/]*[@-~]            # 8-bit CSI
    | \x9d[^\x07\x9c]*[\x07\x9c]?        # 8-bit OSC
    | \x1b[ -/]*[0-~]                   # other ESC sequences (charset, keypad, ...)
    """,
    re.VERBOSE,
)
# Every C0 control except \t and \n, DEL, and the C1 range; \r is handled before this.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_BIDI = re.compile("[\u202a-\u202e\u2066-\u2069]")


def _show_bidi(match: re.Match[str]) -> str:
    return f"⟨U+{ord(match.group()):04X}⟩"


def clean(text: str) -> str:
    """Return `text` with terminal control sequences and control characters removed.

    CRLF becomes LF and a lone CR is dropped: a carriage return could otherwise overwrite a line on screen.
    Bidi controls become visible placeholders (`⟨U+202E⟩`). Cleaning clean text changes nothing.
    """
    if text.isprintable():  # the common case: plain text, nothing to do
        return text
    text = text.replace("\r\n", "\n")
    text = _SEQUENCE.sub("", text)
    text = _CONTROL.sub("", text)
    return _BIDI.sub(_show_bidi, text)


def clean_line(text: str) -> str:
    """`clean` for a one-line label (a title, a model name, a URL, a file name): runs of spaces, newlines and
    tabs become single spaces (none at the ends), so a stored name can neither break a list's layout nor forge
    a heading in an export."""
    return " ".join(clean(text).split())


def clean_data(value: Any) -> Any:
    """`clean` applied to every string inside JSON-like data (dict keys included); other values unchanged."""
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, dict):
        return {clean(str(key)): clean_data(item) for key, item in value.items()}
    if isinstance(value, list):
        return [clean_data(item) for item in value]
    return value


_CSI_DONE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
_INTERMEDIATES = re.compile(r"\x1b[ -/]+")
_HOLD_LIMIT = 256  # a "sequence" longer than this is not held back any more: it is cleaned as it stands


def _incomplete(tail: str) -> bool:
    """True if `tail` (starting with ESC) looks like the start of a sequence whose end has not arrived."""
    if tail == "\x1b":
        return True
    kind = tail[1]
    if kind == "[":
        return _CSI_DONE.match(tail) is None
    if kind in "]PX^_":
        return "\x07" not in tail and "\x1b\\" not in tail[1:]
    # ESC, intermediate bytes (e.g. "(" of a charset choice), and the final byte still to come
    return _INTERMEDIATES.fullmatch(tail) is not None


class StreamCleaner:
    """`clean` for a stream: a sequence split across two chunks is held back until it is whole, so it is
    removed entirely instead of leaving its printable half (e.g. ';title') in the reply."""

    def __init__(self) -> None:
        self._held = ""

    def feed(self, text: str) -> str:
        text = self._held + text
        self._held = ""
        i = text.rfind("\x1b")
        if i != -1 and len(text) - i < _HOLD_LIMIT and _incomplete(text[i:]):
            self._held = text[i:]
            text = text[:i]
        return clean(text)

    def flush(self) -> str:
        held, self._held = self._held, ""
        return clean(held)
