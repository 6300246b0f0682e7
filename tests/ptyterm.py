"""Run a program in a real pseudo-terminal and read its screen through pyte, as a person would see it."""

from __future__ import annotations

import contextlib
import os
import pty
import select
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence

import pyte


class PtyApp:
    """A program on a pty of `cols` x `rows`; `screen_text()` is what the terminal shows now."""

    def __init__(
        self, argv: Sequence[str], env: Mapping[str, str], cols: int = 100, rows: int = 30, cwd: str | None = None
    ) -> None:
        self.screen = pyte.Screen(cols, rows)
        self.stream = pyte.ByteStream(self.screen)
        self.raw = bytearray()
        master, slave = pty.openpty()
        import fcntl
        import struct
        import termios

        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        full_env = {**env, "COLUMNS": str(cols), "LINES": str(rows)}
        self.proc = subprocess.Popen(
            list(argv),
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
        )
        os.close(slave)
        self.master = master

    def pump(self, timeout: float = 0.05) -> None:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return
        try:
            data = os.read(self.master, 65536)
        except OSError:
            return
        self.raw += data
        self.stream.feed(data)

    def screen_text(self) -> str:
        return "\n".join(self.screen.display)

    def wait_for(self, text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.screen_text():
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} did not appear on screen within {timeout} s:\n{self.screen_text()}")
            if self.proc.poll() is not None:
                self.pump(0.2)
                if text in self.screen_text():
                    return
                raise AssertionError(
                    f"the program exited ({self.proc.returncode}) before {text!r}:\n{self.screen_text()}"
                )
            self.pump()

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())
        self.pump(0.05)

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def wait_exit(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError("the program did not exit")
            self.pump(0.05)
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        with contextlib.suppress(OSError):
            os.close(self.master)
