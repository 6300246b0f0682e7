"""Make model output safe to draw: no terminal control sequence in it may reach the terminal.

A model (or a hostile prompt injection) can emit ESC sequences that move the cursor, retitle the window, or
write the clipboard (OSC 52). We remove whole sequences where we can recognise them and then every remaining
C0/C1 control character except newline and tab, so even a sequence split across two stream chunks loses its
ESC and becomes harmless text.
"""

from __future__ import annotations

import re

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


def clean(text: str) -> str:
    """Return `text` with terminal control sequences and control characters removed.

    CRLF becomes LF and a lone CR is dropped: a carriage return could otherwise overwrite a line on screen.
    """
    if text.isprintable():  # the common case: plain text, nothing to do
        return text
    text = text.replace("\r\n", "\n")
    text = _SEQUENCE.sub("", text)
    return _CONTROL.sub("", text)


_CSI_DONE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
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
    return False


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
