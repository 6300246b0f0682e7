"""The screen's frame timer (issue 15): a frame at most each 1/60 s, and a due frame drawn at once, not on a grid.

The timer runs on a clock the test moves, so each tick's time is exact: Textual's own timer, given the same
resumes, ticks later (its grid), and these tests fail on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import textual._time
import textual.timer
from textual._context import active_app
from textual.timer import Timer

from tuichat.ui.frame_timer import FrameTimer, PacedFrames
from tuichat.ui.screens.chat_base import ChatBase
from tuichat.ui.screens.compare import CompareScreen

PERIOD = 1 / 60


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def get_time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


class Target:
    """What the timer ticks for (it keeps a weak reference); with the callback, it posts nothing to it."""


async def ticks_for(
    resumes: list[float], monkeypatch: pytest.MonkeyPatch, timer_class: type[Timer], hurry_at: int | None = None
) -> list[float]:
    """Resume a paused timer at each of `resumes` (seconds from the start), hurried before resume `hurry_at`; each
    tick pauses it again, as the screen's update does. The times of the ticks, from the start. No app runs, so
    only this timer uses the clock."""
    clock = Clock()
    start = clock.now
    monkeypatch.setattr(textual._time, "get_time", clock.get_time)
    monkeypatch.setattr(textual._time, "sleep", clock.sleep)  # (the frame timer reads both from there)
    monkeypatch.setattr(textual.timer, "sleep", clock.sleep)
    # what a tick asks of the app: whether it exits, its features; an error in the callback fails the test
    errors: list[BaseException] = []
    app = SimpleNamespace(_exit=False, features=frozenset(), _handle_exception=errors.append)
    active_app.set(app)  # type: ignore[arg-type]
    ticks: list[float] = []
    target = Target()
    timer: Timer

    def tick() -> None:
        ticks.append(round(clock.now - start, 6))
        timer.pause()

    timer = timer_class(target, PERIOD, callback=tick, pause=True)  # type: ignore[arg-type]
    timer._start()
    try:
        for at in resumes:
            for _ in range(20):  # let the timer run up to where it waits
                await asyncio.sleep(0)
            clock.now = max(clock.now, start + at)
            if resumes.index(at) == hurry_at:
                assert isinstance(timer, FrameTimer)
                timer.hurry()
            timer.resume()
        for _ in range(20):
            await asyncio.sleep(0)
    finally:
        timer.stop()
    assert not errors
    return ticks


async def test_a_frame_due_is_drawn_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # a change 20 ms after a frame: its frame is due (more than a period has passed) and comes at once
    assert await ticks_for([0.0, 0.020, 0.100], monkeypatch, FrameTimer) == [0.0, 0.020, 0.100]


async def test_frames_stay_a_period_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    # a change 5 ms after a frame waits for the rest of the period, no longer
    assert await ticks_for([0.0, 0.005], monkeypatch, FrameTimer) == [0.0, round(PERIOD, 6)]


async def test_textuals_own_timer_is_what_this_replaces(monkeypatch: pytest.MonkeyPatch) -> None:
    # the same resumes on Textual's timer: the late tick waits for a grid point (what the first word waited for)
    ticks = await ticks_for([0.0, 0.020, 0.100], monkeypatch, Timer)
    assert ticks[1] > 0.020 or ticks[2] > 0.100


def test_the_streaming_screens_use_it() -> None:
    for screen in (ChatBase, CompareScreen):
        assert issubclass(screen, PacedFrames)
        assert screen._update_timer is PacedFrames._update_timer  # not shadowed by Screen's property


async def test_a_hurried_frame_does_not_wait_for_the_period(monkeypatch: pytest.MonkeyPatch) -> None:
    # a reply's first words, 5 ms after a frame: their own frame comes at once
    assert await ticks_for([0.0, 0.005], monkeypatch, FrameTimer, hurry_at=1) == [0.0, 0.005]
    # and the one after keeps the cap again
    assert await ticks_for([0.0, 0.005, 0.006], monkeypatch, FrameTimer, hurry_at=1) == [
        0.0,
        0.005,
        round(0.005 + PERIOD, 6),
    ]


async def test_hurry_wakes_a_frame_already_waiting() -> None:
    # on the real clock, with a period far longer than the test: a frame waiting out the period comes at once
    # when hurried
    ticks: list[float] = []
    app = SimpleNamespace(_exit=False, features=frozenset(), _handle_exception=print)
    active_app.set(app)  # type: ignore[arg-type]
    target = Target()
    timer: FrameTimer

    def tick() -> None:
        ticks.append(1)
        timer.pause()

    timer = FrameTimer(target, 600.0, callback=tick, pause=True)  # type: ignore[arg-type]
    timer._start()
    try:
        timer.resume()
        await asyncio.wait_for(until(lambda: len(ticks) == 1), 5)
        timer.resume()  # now it waits 600 s
        for _ in range(20):
            await asyncio.sleep(0)
        assert len(ticks) == 1
        timer.hurry()
        await asyncio.wait_for(until(lambda: len(ticks) == 2), 5)
    finally:
        timer.stop()


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.001)
