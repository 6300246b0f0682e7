"""The terminal's output: written at once by the thread that drew the frame, through Textual's writer thread only
when that would wait.

Textual hands every frame to a writer thread. That thread needs the interpreter lock to take the frame off its
queue, to encode it and again after each write, and the main thread holds the lock while it goes on working (the
next chunks, the live Markdown taking over a reply's first words): each hand-over waited up to the interpreter's
5 ms switch interval. Measured in-process against the stand-in, the frame with a reply's first word reached the
terminal 7-17 ms after it was drawn. Written by the main thread itself it is out when `write` returns.

The writer thread stays for what it is good at: a terminal that reads slowly (a congested SSH link). A direct
write waits until the terminal has taken the frame; once one has taken longer than `SLOW_WRITE_S`, every later
frame goes through the queue, as Textual writes them. Frames never overtake each other: a direct write happens
only while nothing is queued or being written by the thread.
"""

from __future__ import annotations

import threading
import time
from typing import IO

from textual.drivers._writer_thread import WriterThread

SLOW_WRITE_S = 0.05  # a direct write that took longer: the terminal is slow, queue from then on


class PromptWriter(WriterThread):
    """Textual's `WriterThread`, writing from the caller's thread while nothing is queued (module docstring)."""

    def __init__(self, file: IO[str]) -> None:
        super().__init__(file)
        self._order = threading.Lock()  # held while text goes to the file, by either thread
        self._queued = 0  # handed to the thread and not written yet (changed under _order)
        self.direct = True  # False once the terminal proved slow

    def write(self, text: str) -> None:
        if self.direct:
            with self._order:
                if not self._queued:
                    started = time.monotonic()
                    self._file.write(text)
                    self._file.flush()
                    if time.monotonic() - started > SLOW_WRITE_S:
                        self.direct = False
                    return
                self._queued += 1
        else:
            with self._order:
                self._queued += 1
        super().write(text)

    def run(self) -> None:
        # Textual's loop, with each write under the order lock and counted off once it is out
        get, qsize = self._queue.get, self._queue.qsize
        while True:
            text = get()
            if text is None:
                break
            with self._order:
                self._file.write(text)
                if qsize() == 0:
                    self._file.flush()
                self._queued -= 1
        with self._order:
            self._file.flush()
