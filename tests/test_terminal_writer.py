"""Frames go to the terminal from the thread that drew them, in order, and through the queue once it is slow.

Textual's writer thread made the frame with a reply's first word wait 7-17 ms for the interpreter lock before it
reached the terminal (issue 15). `PromptWriter` writes at once while nothing is queued; a terminal that takes
long to read (a congested SSH link) sends every later frame through Textual's queue, and no frame overtakes one
written before it.
"""

from __future__ import annotations

import io
import threading
import time

import pytest

from tuichat.ui import terminal_writer
from tuichat.ui.terminal_writer import PromptWriter


class Terminal(io.StringIO):
    """A terminal that can be made to stop reading for a while (`gate`), and says who wrote each piece."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.writers: list[tuple[str, str]] = []

    def write(self, text: str) -> int:
        self.gate.wait(10)
        self.writers.append((text, threading.current_thread().name))
        return super().write(text)


@pytest.fixture
def terminal() -> Terminal:
    return Terminal()


def test_a_frame_is_out_when_write_returns(terminal: Terminal) -> None:
    writer = PromptWriter(terminal)
    writer.start()
    try:
        writer.write("frame 1")
        assert terminal.getvalue() == "frame 1"  # no waiting for another thread
        assert terminal.writers[0][1] == threading.current_thread().name
    finally:
        writer.stop()


def test_a_slow_terminal_sends_later_frames_through_the_queue_in_order(
    terminal: Terminal, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(terminal_writer, "SLOW_WRITE_S", 0.01)
    writer = PromptWriter(terminal)
    writer.start()
    try:
        terminal.gate.clear()
        blocked = threading.Thread(target=writer.write, args=("slow frame|",))
        blocked.start()  # a direct write the terminal takes its time over
        time.sleep(0.05)  # (the terminal's own slowness, not a wait for a condition)
        terminal.gate.set()
        blocked.join(5)
        assert not writer.direct  # from now on the queue
        for i in range(20):
            writer.write(f"f{i}|")
        writer.stop()  # the queue is written out
        assert terminal.getvalue() == "slow frame|" + "".join(f"f{i}|" for i in range(20))
        assert {name for _text, name in terminal.writers[1:]} == {"textual-output"}
    finally:
        terminal.gate.set()


def test_a_frame_written_while_the_thread_is_writing_waits_its_turn(terminal: Terminal) -> None:
    writer = PromptWriter(terminal)
    writer.start()
    try:
        writer.direct = False
        terminal.gate.clear()
        writer.write("queued|")  # the thread takes it and waits for the terminal
        deadline = time.monotonic() + 5
        while writer._queue.qsize() and time.monotonic() < deadline:
            time.sleep(0.001)
        writer.direct = True  # a direct write must still not overtake the one being written
        later = threading.Thread(target=writer.write, args=("direct|",))
        later.start()
        terminal.gate.set()
        later.join(5)
        writer.stop()
        assert terminal.getvalue() == "queued|direct|"
    finally:
        terminal.gate.set()
