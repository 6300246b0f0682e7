"""Following a growing log file: the one incremental reader behind the server log, the quantize log and their views.

A server's or a quantize job's output goes to a file that another process keeps appending to. `LogFollower` reads
only the bytes that arrived since its last read, hands back the complete lines and keeps the unfinished last one
(tqdm redraws a bar with carriage returns and ends its line only at the end). It decodes UTF-8 across read
boundaries, starts over when the file is truncated or replaced, never grows without bound on a bar that never ends
its line, and, when it starts in the middle of a file, drops the cut first line instead of showing half of it.
"""

from __future__ import annotations

import codecs
import contextlib
import os
from pathlib import Path

READ_LIMIT = 4 << 20  # bytes read per call: a huge backlog is read over several ticks, not in one stall
PARTIAL_MAX = 65536  # an unfinished line longer than this is cut to its end (a bar that never prints a newline)
PARTIAL_KEEP = 4096


def collapse_cr(line: str) -> str:
    """The last visible state of a line that tqdm rewrote with carriage returns."""
    parts = [p for p in line.split("\r") if p.strip()]
    return parts[-1] if parts else ""


class LogFollower:
    """Reads a growing log incrementally: complete lines, and the `\\r`-updated segment being written.

    `start_at_end=None` reads from the beginning (or from `offset` when given), `start_at_end=N` from the last N
    bytes (0: only what is written from now on).
    """

    def __init__(self, path: Path, start_at_end: int | None = None, *, offset: int | None = None) -> None:
        self.path = path
        self.offset = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial = ""
        if offset is not None:
            self.offset = max(offset, 0)
        elif start_at_end is not None:
            with contextlib.suppress(OSError):
                self.offset = max(path.stat().st_size - start_at_end, 0)
        self._cut = self.offset > 0 and not self._after_newline()

    def _after_newline(self) -> bool:
        # starting right after a newline cuts nothing; anywhere else the first line read is a fragment
        try:
            with self.path.open("rb") as fh:
                fh.seek(self.offset - 1)
                return fh.read(1) == b"\n"
        except OSError:
            return True

    def _restart(self) -> None:
        self.offset = 0
        self._partial = ""
        self._cut = False
        self._decoder.reset()

    def read(self, limit: int = READ_LIMIT) -> tuple[list[str], str]:
        """New complete lines (without their newline, `\\r` redraws left in) and the unfinished last line."""
        try:
            with self.path.open("rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size < self.offset:  # truncated or replaced: start over
                    self._restart()
                fh.seek(self.offset)
                data = fh.read(limit)
        except OSError:
            return [], self._partial
        self.offset += len(data)
        text = self._partial + self._decoder.decode(data)
        lines = text.split("\n")
        self._partial = lines.pop()
        if self._cut and lines:
            lines = lines[1:]
            self._cut = False
        if len(self._partial) > PARTIAL_MAX:
            self._partial = self._partial[-PARTIAL_KEEP:]
        return lines, "" if self._cut else self._partial

    def flush(self) -> str:
        """The unfinished last line, handed over as finished (the writer has exited, it will never end it)."""
        partial, self._partial = ("" if self._cut else self._partial), ""
        return partial
