"""The Textual side of the key map: bindings built from `tuichat.keymap`, and keys read right from a terminal.

`binding(id, action)` makes the Textual `Binding` for an id of `tuichat.keymap.BINDINGS`, so the keys, the label
and the priority live in one place; `screen_bindings(scope)` makes every binding of one scope (no id list here).

`KeyParser` fixes how Textual's terminal parser reads Esc followed quickly by another key. A terminal sends Alt+X
as ESC X, so ESC X is ambiguous, and Textual (8.x) resolves it badly in two cases a user meets in tmux, where
`escape-time` glues an Esc to the next key:

- ESC + a control byte (Esc, then Ctrl+R within the escape delay: `\\x1b\\x12`) came out as Ctrl+R alone: the
  Esc was lost. It is now Esc, then Ctrl+R (Alt+Ctrl+R is not a key anyone binds).
- ESC + a printable character waited for more input; if another Esc came first, the ESC was re-read as a
  printable "^" and the character was typed: `^u` in the prompt from Alt+U, Alt+U. ESC + a character is now
  Alt+character at once, without a character to type, so no widget inserts it.

The parser is installed by `install_key_parser()` (the app calls it before its driver starts).

GNU screen holds a lone Esc back while the program has mouse reporting on (it waits for a mouse report), so
under screen the app runs without the mouse (`mouse_holds_escape`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from textual import events
from textual._ansi_sequences import ANSI_SEQUENCES_KEYS
from textual._xterm_parser import XTermParser
from textual.binding import Binding, BindingType

from tuichat.keymap import BINDINGS, BY_ID

ESC = "\x1b"
# ESC followed by one of these starts a real escape sequence (CSI, SS3, DCS, OSC): leave it to Textual.
_INTRODUCERS = frozenset("[OP]")


def binding(binding_id: str, action: str | None = None, *, show: bool = True, **kwargs: Any) -> Binding:
    """The Textual binding of a `tuichat.keymap` id (its default keys, label and priority)."""
    spec = BY_ID[binding_id]
    return Binding(
        spec.keys, action or binding_id, spec.label, show=show, priority=spec.priority, id=binding_id, **kwargs
    )


# The chat keys the footer shows (the others are in the help and the command palette): a short footer fits 80
# columns. The prompt's own keys (newline) are the prompt's bindings, not the screen's.
IN_FOOTER = frozenset({"help", "stop", "retry", "undo", "clear", "new_chat", "copy_reply", "quit"})
WIDGET_KEYS = frozenset({"newline"})


def screen_bindings(scope: str) -> list[BindingType]:
    """The Textual bindings of every `tuichat.keymap` binding of `scope`, in the keymap's order."""
    return [
        binding(spec.id, show=spec.id in IN_FOOTER)
        for spec in BINDINGS
        if spec.scope == scope and spec.id not in WIDGET_KEYS
    ]


class KeyParser(XTermParser):
    """Textual's parser with ESC + key read as a person pressed it (see the module docstring)."""

    def _sequence_to_key_events(self, sequence: str, alt: bool = False) -> Iterable[events.Key]:
        if len(sequence) == 2 and sequence[0] == ESC and sequence not in ANSI_SEQUENCES_KEYS:
            second = sequence[1]
            if second not in _INTRODUCERS and second != ESC:
                yield from self._escape_then(second)
                return
        if alt and len(sequence) == 1 and _is_control(sequence):
            # The same pair reached after the escape delay ran out: still Esc, then the key.
            yield events.Key("escape", ESC)
            yield from super()._sequence_to_key_events(sequence)
            return
        yield from super()._sequence_to_key_events(sequence, alt)

    def _escape_then(self, second: str) -> Iterable[events.Key]:
        if _is_control(second):
            yield events.Key("escape", ESC)
            yield from super()._sequence_to_key_events(second)
            return
        for event in super()._sequence_to_key_events(second, alt=True):
            name = event.key if event.key.startswith("alt+") else f"alt+{event.key}"
            yield events.Key(name, None)  # no character: Alt+U must not type "u" anywhere


def _is_control(character: str) -> bool:
    return len(character) == 1 and (ord(character) < 0x20 or ord(character) == 0x7F)


def install_key_parser() -> None:
    """Make Textual's terminal drivers read keys with `KeyParser` (once; harmless when called again)."""
    from textual.drivers import linux_driver

    modules: list[Any] = [linux_driver]
    try:
        from textual.drivers import linux_inline_driver

        modules.append(linux_inline_driver)
    except ImportError:  # pragma: no cover - an older Textual without the inline driver
        pass
    for module in modules:
        if getattr(module, "XTermParser", None) is XTermParser:
            module.XTermParser = KeyParser


def mouse_holds_escape(env: Mapping[str, str], proc: Path = Path("/proc")) -> bool:
    """True when tuichat's own terminal is GNU screen: screen 4.x keeps a lone Esc until the next byte while
    the program has mouse reporting on (it waits for a mouse report), so Esc works there only without it.

    STY says screen is somewhere above; with TMUX set too, the nearer of the two among the parent processes
    decides (tmux inside screen handles the keys itself)."""
    if not env.get("STY"):
        return False
    if not env.get("TMUX"):
        return True
    return _nearest_multiplexer(proc) == "screen"


def _nearest_multiplexer(proc: Path) -> str | None:
    pid = os.getpid()
    for _ in range(32):
        try:
            stat = (proc / str(pid) / "stat").read_text()
        except OSError:
            return None
        name = stat[stat.find("(") + 1 : stat.rfind(")")].lower()
        if name.startswith("tmux"):
            return "tmux"
        if name == "screen":
            return "screen"
        fields = stat[stat.rfind(")") + 2 :].split()
        pid = int(fields[1])  # the parent
        if pid <= 1:
            return None
    return None
