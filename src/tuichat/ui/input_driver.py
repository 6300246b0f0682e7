"""Textual's Linux terminal driver with an input thread that sleeps until a byte comes.

Textual's own input thread wakes ten times a second (`select` with a 0.1 s timeout) to look for a key parse
that timed out (a lone Esc) and for the exit flag. Each wake-up costs about 0.14 ms of a core here, which was
half of an idle chat's CPU (0.16 of 0.32 %, per-thread run times from /proc). This driver's thread waits
without a timeout while the parser holds nothing, waits exactly until the parser's deadline while it does (the
Esc delay), and is woken for exit through a pipe that the exit flag writes to when it is set.

Its output goes out from the thread that drew it (`terminal_writer.PromptWriter`), not always through Textual's
writer thread. Everything else (raw mode, resize, mouse, suspend and resume) is the Linux driver's own.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import threading
import time
import weakref
from codecs import getincrementaldecoder
from typing import Any

from textual.drivers import linux_driver
from textual.drivers.linux_driver import LinuxDriver

from tuichat.ui.terminal_writer import PromptWriter

UNKNOWN_DEADLINE_S = 0.1  # how often to look when the parser's deadline cannot be read (another Textual)
_NOT_KEPT = object()


class WakingEvent(threading.Event):
    """An Event that also makes a pipe readable when set, so a thread in `select` sees it at once."""

    def __init__(self) -> None:
        super().__init__()
        self.read_fd, self._write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self._write_fd, False)
        # closed with the event, not with the driver: Textual's suspend (Ctrl+Z, SIGTSTP) calls the driver's close()
        # and then starts a new input thread on resume, which waits on this pipe again
        weakref.finalize(self, _close_fds, self.read_fd, self._write_fd)

    def set(self) -> None:
        super().set()
        # OSError: already readable (the pipe is full), or closed at exit; either way nobody waits for it
        with contextlib.suppress(OSError):
            os.write(self._write_fd, b"x")

    def clear(self) -> None:
        super().clear()
        with contextlib.suppress(OSError):  # BlockingIOError: drained
            while os.read(self.read_fd, 512):
                pass


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def wait_for(parser: Any) -> float | None:
    """How long the input thread may sleep: until the parser's pending timeout, or (nothing pending) for good."""
    # Textual's parser keeps the deadline of a timed parse (a lone Esc) on Textual's clock, time.monotonic
    deadline = getattr(parser, "_timeout_time", _NOT_KEPT)
    if deadline is None:
        return None
    if not isinstance(deadline, float):  # a Textual that keeps it elsewhere: look as often as Textual did
        return UNKNOWN_DEADLINE_S
    return max(0.0, deadline - time.monotonic())


class QuietLinuxDriver(LinuxDriver):
    """`LinuxDriver` whose input thread does not poll and whose frames go out at once (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.exit_event = WakingEvent()

    def start_application_mode(self) -> None:
        super().start_application_mode()  # type: ignore[no-untyped-call]  # (Textual leaves it unannotated)
        # Textual's writer thread, started there and already handed the terminal's set-up, finishes that first
        queued, file = self._writer_thread, self._file
        if queued is not None and file is not None and not isinstance(queued, PromptWriter):
            queued.stop()
            self._writer_thread = PromptWriter(file)
            self._writer_thread.start()

    def run_input_thread(self) -> None:
        event = self.exit_event
        assert isinstance(event, WakingEvent)
        fileno = self.fileno
        selector = selectors.SelectSelector()  # as Textual: select() also works where stdin is not a tty
        selector.register(fileno, selectors.EVENT_READ)
        selector.register(event.read_fd, selectors.EVENT_READ)
        # the module's name, not a class imported here: tuichat's key parser replaces it (ui.keyids)
        parser = getattr(linux_driver, "XTermParser")(self._debug)  # noqa: B009 (not re-exported there)
        decode = getincrementaldecoder("utf-8")().decode

        def handle(ready: list[tuple[selectors.SelectorKey, int]]) -> None:
            for key, mask in ready:
                if key.fd != fileno or not mask & selectors.EVENT_READ:
                    continue
                data = os.read(fileno, 4096)
                if not data:  # stdin piped and at its end
                    selector.unregister(fileno)
                    continue
                for message in parser.feed(decode(data)):
                    self.process_message(message)
            for message in parser.tick():
                self.process_message(message)

        try:
            while not event.is_set():
                handle(selector.select(wait_for(parser)))
        finally:
            selector.close()
