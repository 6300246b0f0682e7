"""How tuichat writes a length of time, in one place: words for a sentence, a clock for a ticking counter.

`format_duration` is what a sentence says ("done in 2 min 05 s", "up 1 h 03 min"); `format_clock` is the
counter in front of a progress line that changes every second (`[01:23]`), which must keep its width;
`format_compact` is a table cell (`tuichat ps`'s UPTIME: `2m17s`, `3d04h`), as short as it can be.
"""

from __future__ import annotations


def _whole(seconds: float) -> int:
    # rounded, not cut: 59.6 s reads as "1 min 00 s", as a stopwatch would show it
    return max(0, int(seconds + 0.5))


def format_duration(seconds: float) -> str:
    """`42 s`, `2 min 05 s`, `1 h 03 min`: the units a reader needs, never more than two of them."""
    s = _whole(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def format_clock(seconds: float) -> str:
    """`01:23`, or `1:02:03` from an hour on: a counter whose width does not jump each second."""
    s = max(0, int(seconds))  # a counter shows the seconds that have fully passed
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


def format_compact(seconds: float) -> str:
    """`42s`, `2m17s`, `1h03m`, `3d04h`: two units at most, no spaces, for a column of a table."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
