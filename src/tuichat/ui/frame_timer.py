"""The screen's frame timer: at most one frame each 1/60 s, and each one drawn as soon as it is due.

Textual draws a screen from a repeating timer that is paused while nothing changed. Its ticks keep to a fixed grid,
and once a tick came late (resumed after a pause, or after a busy moment) it skips to the grid point after the
next: a change made just after a frame waited 17 to 33 ms for its own. That was most of what was left of the first
word's delay when the echo of the message sent had been drawn a moment before it (chunk in -> word written 21 ms,
of which 15 ms waiting for the grid; bench/RESULTS.md, ninth session), and a streaming reply's frames came late the
same way. `FrameTimer` keeps the cap and drops the grid: the next tick comes one period after the last one began,
or at once when that moment has passed.

`PacedFrames` gives a screen this timer in place of Textual's own (the screens that stream replies use it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from textual import _time
from textual.screen import UPDATE_PERIOD
from textual.timer import Timer

if TYPE_CHECKING:
    from textual.screen import Screen


class FrameTimer(Timer):
    """A repeating timer whose ticks are at least `interval` apart and never wait for a grid point."""

    async def _run(self) -> None:
        last: float | None = None
        count = 0
        while True:
            await self._active.wait()  # paused: until something needs a frame
            if last is not None:
                wait = last + self._interval - _time.get_time()
                if wait > 0:
                    await _time.sleep(wait)
                    await self._active.wait()  # (paused again meanwhile: a layout drew the frame itself)
            last = _time.get_time()
            count += 1
            await self._tick(next_timer=last, count=count)


class PacedFrames:
    """For a Screen subclass (listed before Screen): its updates come from a `FrameTimer`."""

    _frame_timer: FrameTimer | None = None

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
