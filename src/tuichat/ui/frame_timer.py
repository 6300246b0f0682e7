"""The screen's frame timer: at most one frame each 1/60 s, and each one drawn as soon as it is due.

Textual draws a screen from a repeating timer that is paused while nothing changed. Its ticks keep to a fixed grid,
and once a tick came late (resumed after a pause, or after a busy moment) it skips to the grid point after the
next: a change made just after a frame waited 17 to 33 ms for its own. That was most of what was left of the first
word's delay when the echo of the message sent had been drawn a moment before it (chunk in -> word written 21 ms,
of which 15 ms waiting for the grid; bench/RESULTS.md, ninth session), and a streaming reply's frames came late the
same way. `FrameTimer` keeps the cap and drops the grid: the next tick comes one period after the last one began,
or at once when that moment has passed.

A reply's first words call `hurry`: their frame comes at once even when another was drawn a moment before (a new
widget's first frame is often followed by a second one, for the sizes it was given, just when the first chunk
comes).

`PacedFrames` gives a screen this timer in place of Textual's own (the screens that stream replies use it).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from textual import _time
from textual.screen import UPDATE_PERIOD
from textual.timer import Timer

if TYPE_CHECKING:
    from textual.screen import Screen


class FrameTimer(Timer):
    """A repeating timer whose ticks are at least `interval` apart and never wait for a grid point; `hurry` lets
    the next tick come at once all the same."""

    _hurried = False
    _wake: asyncio.Future[None] | None = None

    def hurry(self) -> None:
        """The next tick comes as soon as the timer is resumed, even within a period of the last one."""
        self._hurried = True
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def _run(self) -> None:
        last: float | None = None
        count = 0
        while True:
            await self._active.wait()  # paused: until something needs a frame
            if last is not None and not self._hurried:
                wait = last + self._interval - _time.get_time()
                if wait > 0:
                    await self._sleep(wait)
                    await self._active.wait()  # (paused again meanwhile: a layout drew the frame itself)
            self._hurried = False
            last = _time.get_time()
            count += 1
            await self._tick(next_timer=last, count=count)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, or less if `hurry` is called meanwhile."""
        self._wake = asyncio.get_running_loop().create_future()
        sleeping = asyncio.ensure_future(_time.sleep(seconds))
        try:
            await asyncio.wait((sleeping, self._wake), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeping.cancel()
            self._wake = None


class PacedFrames:
    """For a Screen subclass (listed before Screen): its updates come from a `FrameTimer`."""

    _frame_timer: FrameTimer | None = None

    def draw_soon(self) -> None:
        """The next frame comes as soon as there is something to draw, not a period after the last one."""
        timer = self._update_timer
        assert isinstance(timer, FrameTimer)
        timer.hurry()

    @property
    def _update_timer(self) -> Timer:
        # Textual's Screen creates its timer in this same property, on first use; this one is made the same way
        # (paused, with the screen's own update callback) and kept in the screen's timers, which stop with it
        if self._frame_timer is None:
            screen: Screen[Any] = self  # type: ignore[assignment]
            timer = FrameTimer(
                screen, UPDATE_PERIOD, name="screen_update", callback=screen._on_timer_update, pause=True
            )
            timer._start()
            screen._timers.add(timer)
            self._frame_timer = timer
        return self._frame_timer
