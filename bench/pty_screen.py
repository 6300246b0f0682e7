"""Run one client in a real pseudo-terminal and watch what it shows, black-box.

`PtyClient` starts a command on a 120x40 pty, reads everything it writes and keeps two views of it:

- a pyte screen (a terminal emulator), used for everything that is about *what the screen shows*: the first
  frame, the prompt echo, the end of a restored history;
- a cheap scan of the byte stream for numbered words (`w123`), used to timestamp when each streamed word is
  written to the terminal. pyte parses about 0.5 MB/s on the 2-core machine while a Textual app repainting a
  scrolling reply writes more than that, so feeding pyte during a fast stream would make the harness itself the
  bottleneck. While a stream is watched the pyte screen is therefore paused (`pause_screen`), and it is never
  consulted again for that run.

The resource figures come from /proc: CPU is utime+stime of the client's whole process tree, peak memory is
VmHWM of its processes (summed across the tree), and
the resident set now (VmRSS) for memory growth.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import select
import signal
import struct
import termios
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import pyte

ROWS = 40
COLS = 120
WORD_RE = re.compile(rb"w(\d{1,6})")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        # the command name may hold spaces or parentheses: the fields after the last ')' are fixed
        rest = raw[raw.rfind(b")") + 2 :].split()
        kids.setdefault(int(rest[1]), []).append(int(name))
    return kids


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants alive now."""
    kids = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime+stime (and that of waited-for children) of the given processes, in seconds."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        rest = raw[raw.rfind(b")") + 2 :].split()
        # fields 14-17 of stat(5): utime stime cutime cstime; rest[0] is field 3
        total += sum(int(x) for x in rest[11:15])
    return total / CLK_TCK


def peak_rss_mb(pids: Sequence[int]) -> float:
    """Sum of VmHWM (peak resident set) over the given processes, in MiB."""
    total_kb = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total_kb += int(line.split()[1])
                        break
        except OSError:
            continue
    return total_kb / 1024


def rss_mb(pids: Sequence[int]) -> float:
    """Sum of VmRSS (resident set now, not the peak) over the given processes, in MiB: what growth is read from."""
    total_kb = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total_kb += int(line.split()[1])
                        break
        except OSError:
            continue
    return total_kb / 1024


class AnsweringScreen(pyte.Screen):
    """A pyte screen that answers the terminal queries a real terminal answers (device attributes, cursor
    position), so that a client probing its terminal at start-up is not left waiting for a timeout."""

    def __init__(self, columns: int, lines: int, reply: Callable[[bytes], object]) -> None:
        super().__init__(columns, lines)
        self._reply = reply

    def write_process_input(self, data: str) -> None:
        self._reply(data.encode())


@dataclass
class WordTimes:
    """When each numbered word was first written to the terminal (monotonic seconds), by word number."""

    seen: dict[int, float] = field(default_factory=dict)
    highest: int = 0

    def note(self, number: int, when: float) -> None:
        # Words arrive in order: once word n is on screen, every earlier one has been shown (or scrolled past).
        if number <= self.highest:
            return
        for n in range(self.highest + 1, number + 1):
            self.seen[n] = when
        self.highest = number


class PtyClient:
    """One client process on its own pty, with a pyte screen and a word-timestamp tracker."""

    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: str | None = None,
        rows: int = ROWS,
        cols: int = COLS,
        max_word: int = 10**6,
        words_from_screen: bool = False,
    ) -> None:
        self.argv = list(argv)
        self.env = dict(env)
        self.cwd = cwd
        self.rows, self.cols = rows, cols
        self.screen = AnsweringScreen(cols, rows, self._answer)
        self.stream = pyte.ByteStream(self.screen)
        self.screen_paused = False
        self.words = WordTimes()
        self.max_word = max_word
        # Validation mode: keep pyte running through the stream and read the words off the emulated screen.
        self.words_from_screen = words_from_screen
        self.bytes_out = 0
        self.last_read_at = 0.0  # when the last bytes were read from the pty (before pyte took them in)
        self._tail = b""
        self.pid = -1
        self.fd = -1
        self.started = 0.0
        self.exit_status: int | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> float:
        """Fork the client on a new pty; returns the monotonic time just before the fork."""
        self.started = time.monotonic()
        pid, fd = os.forkpty()
        if pid == 0:  # child: size the terminal before the program can ask for it, then become the client
            try:
                # pixel size too (10x20 cells), as a graphical terminal reports it
                size = struct.pack("HHHH", self.rows, self.cols, self.cols * 10, self.rows * 20)
                fcntl.ioctl(0, termios.TIOCSWINSZ, size)
                if self.cwd:
                    os.chdir(self.cwd)
                os.execvpe(self.argv[0], self.argv, self.env)
            except BaseException:
                os._exit(127)
        self.pid, self.fd = pid, fd
        os.set_blocking(fd, False)
        return self.started

    def alive(self) -> bool:
        if self.exit_status is not None:
            return False
        done, status = os.waitpid(self.pid, os.WNOHANG)
        if done:
            self.exit_status = status
            return False
        return True

    def stop(self, grace: float = 3.0) -> None:
        """End the client: SIGTERM to its tree, then SIGKILL whatever is left after `grace` seconds."""
        if self.pid <= 0:
            return
        tree = process_tree(self.pid) if self.alive() else []
        for p in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.alive() and time.monotonic() < deadline:
            self.pump(0.05)
        for p in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        if self.exit_status is None:
            with contextlib.suppress(ChildProcessError):
                _, self.exit_status = os.waitpid(self.pid, 0)
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = -1

    # -- reading --------------------------------------------------------------------------------------------

    def pump(self, timeout: float, once: bool = False) -> bool:
        """Read what the client wrote within `timeout` seconds; True if anything came. With `once`, one read only
        (what one read returns: up to 64 kB), so a caller can look at the screen after each."""
        if self.fd < 0:
            return False
        try:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        except InterruptedError:
            return False
        if not ready:
            return False
        got = False
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            except OSError as exc:  # EIO: the client closed its end of the pty (it exited)
                if exc.errno == errno.EIO:
                    break
                raise
            if not data:
                break
            got = True
            now = self.last_read_at = time.monotonic()
            self.bytes_out += len(data)
            if not self.words_from_screen:
                self._scan_words(data, now)
            if not self.screen_paused or self.words_from_screen:
                self.stream.feed(data)
            if once:
                break
        if got and self.words_from_screen:
            # rows joined without a separator too, so that a word wrapped by the terminal reads whole
            text = "\n".join(self.screen.display) + "\n" + "".join(self.screen.display)
            numbers = [int(n) for n in WORD_RE.findall(text.encode()) if int(n) <= self.max_word]
            if numbers:
                self.words.note(max(numbers), time.monotonic())
        return got

    def _scan_words(self, data: bytes, now: float) -> None:
        # Keep a short tail so that a word cut across two reads is still seen whole. A word cut short at the
        # end of a read ("w5" of "w57") reads as a smaller number than the words already seen: it is ignored.
        buf = self._tail + data
        best = 0
        for m in WORD_RE.finditer(buf):
            n = int(m.group(1))
            if best < n <= self.max_word:
                best = n
        if best:
            self.words.note(best, now)
        self._tail = buf[-12:]

    def pause_screen(self) -> None:
        self.screen_paused = True

    def text(self) -> str:
        """The screen as rows of text joined by newlines."""
        return "\n".join(self.screen.display)

    def wait_for(self, predicate: Callable[[], bool], timeout: float, poll: float = 0.02) -> float | None:
        """Pump until predicate() holds; the monotonic time of the read that made it true, or None."""
        deadline = time.monotonic() + timeout
        if predicate():
            return time.monotonic()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            # One read at a time, stamped when it was read: not after pyte has taken in that read and every one
            # after it. pyte parses a full 120x40 frame in 6-8 ms (a terminal, in far less), and tuichat's start
            # writes two frames 10 ms apart: the first frame's stamp came 20 ms late, the floor's (one small
            # frame) 3 ms late.
            if self.pump(min(poll, left), once=True):
                if predicate():
                    return self.last_read_at
            elif not self.alive():
                self.pump(0)
                return time.monotonic() if predicate() else None

    def wait_for_text(self, needle: str, timeout: float) -> float | None:
        return self.wait_for(lambda: needle in self.text(), timeout)

    def _answer(self, data: bytes) -> None:
        if self.fd >= 0:
            self.write(data)

    def write(self, data: bytes) -> float:
        """Type into the client's terminal; returns the monotonic time just before the bytes were written (the
        key press: read after the write, a busy machine could let the client react before the clock is read)."""
        pressed = time.monotonic()
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except BlockingIOError:
                select.select([], [self.fd], [], 0.1)
                continue
            view = view[n:]
        return pressed

    # -- resources ------------------------------------------------------------------------------------------

    def tree(self) -> list[int]:
        return process_tree(self.pid) if self.alive() else []

    def cpu(self) -> float:
        return cpu_seconds(self.tree())

    def peak_rss_mb(self) -> float:
        return peak_rss_mb(self.tree())

    def rss_mb(self) -> float:
        return rss_mb(self.tree())
