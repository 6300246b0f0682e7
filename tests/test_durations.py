"""The one way tuichat writes a length of time: in words for sentences, as a clock for ticking counters."""

from __future__ import annotations

import pytest

from tuichat.durations import format_clock, format_compact, format_duration


@pytest.mark.parametrize(
    ("seconds", "words"),
    [(0, "0 s"), (42.4, "42 s"), (59.6, "1 min 00 s"), (125, "2 min 05 s"), (3780, "1 h 03 min"), (-3, "0 s")],
)
def test_words_use_at_most_two_units(seconds: float, words: str) -> None:
    assert format_duration(seconds) == words


@pytest.mark.parametrize(("seconds", "clock"), [(0, "00:00"), (83.9, "01:23"), (3723, "1:02:03"), (-1, "00:00")])
def test_clock_keeps_its_width_and_counts_whole_seconds(seconds: float, clock: str) -> None:
    assert format_clock(seconds) == clock


@pytest.mark.parametrize(
    ("seconds", "cell"),
    [(0, "0s"), (59.9, "59s"), (137, "2m17s"), (3780, "1h03m"), (3 * 86400 + 4 * 3600 + 5, "3d04h")],
)
def test_a_table_cell_is_two_units_without_spaces(seconds: float, cell: str) -> None:
    assert format_compact(seconds) == cell
