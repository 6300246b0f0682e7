"""The fleet screen: a row per node with what the proxy and the node itself report, health and since when, and
which node served each reply of this chat; pictured at 80x24 and 120x40 (`pytest --snapshot-update
tests/test_fleet_screen.py` to renew the baselines, after looking at the report)."""

from __future__ import annotations

from typing import Any

import pytest
from apphelpers import screen_text, settled, wait_for
from textual.app import App
from textual.pilot import Pilot

from tuichat.durations import format_compact
from tuichat.server.attribution import ReplyServed
from tuichat.server.fleet import FleetView, NodeView
from tuichat.ui.screens.fleet import FleetScreen, ReplyRow

SIZES = [(80, 24), (120, 40)]
NOW = 1000.0

NODES = (
    NodeView(
        "http://127.0.0.1:23333", "pair.n1", health="up", models=("tiny-chat",), unfinished=1, latency=0.42,
        latency_samples=6, speed=None, kv_cache_usage=0.37, running=1, waiting=0, health_since=NOW - 192,
    ),
    NodeView(
        "http://127.0.0.1:23334", "pair.n2", health="down", models=("tiny-chat",), unfinished=0, note="process exited",
        health_since=NOW - 4,
    ),
)  # fmt: skip
VIEW = FleetView("http://127.0.0.1:8000", "pair", NODES)
REPLIES = (
    ReplyRow("Here is a short answer about fleets", ReplyServed(1, 0.0, 1.0, "one", ("n1",))),
    ReplyRow("Counting: w1 w2 w3", ReplyServed(2, 2.0, 3.0, "one", ("n2",), died=("n2",))),
    ReplyRow("Another reply while a batch ran on the same fleet", ReplyServed(3, 4.0, 5.0, "several", ("n1", "n2"))),
    ReplyRow("Still streaming", ReplyServed(4, 6.0)),
)


class Host(App[None]):
    def __init__(self, source: list[FleetView | None], replies: list[ReplyRow]) -> None:
        super().__init__()
        self.source = source
        self.replies = replies
        self.clock = [NOW]

    def on_mount(self) -> None:
        self.push_screen(
            FleetScreen(lambda: self.source[-1], lambda: self.replies, refresh_s=0.05, clock=lambda: self.clock[0])
        )


def test_ages_read_like_a_person_says_them() -> None:
    # the table cell form every tuichat table uses (`tuichat ps` too): two units at most, no spaces
    assert [format_compact(s) for s in (0, 45, 192, 3600 + 300, 86400 * 3 + 3600 * 4)] == [
        "0s", "45s", "3m12s", "1h05m", "3d04h",
    ]  # fmt: skip


async def test_each_node_shows_its_figures_health_and_since_when_and_each_reply_its_node() -> None:
    app = Host([VIEW], list(REPLIES))
    async with app.run_test(size=(160, 40)) as pilot:
        await wait_for(pilot, lambda: "n1" in screen_text(app))
        text = screen_text(app)
        assert "Fleet pair" in text and "1 of 2 nodes up" in text
        n1 = next(line for line in text.splitlines() if "127.0.0.1:23333" in line)
        for cell in ("tiny-chat", "up 3m12s", "0.42s (6)", "37%", "1/0"):
            assert cell in n1, (cell, n1)
        n2 = next(line for line in text.splitlines() if "127.0.0.1:23334" in line)
        assert "down 4s" in n2 and "process exited" in n2
        assert "n2 (went down)" in text  # the reply cut short by the node dying
        assert "one of n1, n2" in text  # overlapping replies: said, not guessed
        assert "replying…" in text


async def test_the_screen_follows_polls_nodes_coming_and_going_and_esc_goes_back() -> None:
    source: list[FleetView | None] = [None]
    app = Host(source, [])
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: "Waiting for the first reading" in screen_text(app))
        assert "no reply yet" in screen_text(app)
        source.append(VIEW)
        await wait_for(pilot, lambda: "127.0.0.1:23334" in screen_text(app))
        source.append(FleetView(VIEW.url, "pair", NODES[:1]))  # n2 removed from the proxy
        await wait_for(
            pilot, lambda: "127.0.0.1:23334" not in screen_text(app) and "1 of 1 nodes up" in screen_text(app)
        )
        app.clock[0] = NOW + 60  # time passes: the age of the health moves on without a new poll
        await wait_for(pilot, lambda: "up 4m12s" in screen_text(app))
        app.replies.append(ReplyRow("hello", ReplyServed(9, 0.0, 1.0, "one", ("n1",))))
        await wait_for(pilot, lambda: "no reply yet" not in screen_text(app) and "hello" in screen_text(app))
        assert isinstance(app.screen, FleetScreen)
        await pilot.press("escape")
        await wait_for(pilot, lambda: not isinstance(app.screen, FleetScreen))


async def _settled(pilot: Pilot[Any]) -> None:
    await wait_for(
        pilot, lambda: isinstance(pilot.app.screen, FleetScreen) and "n2 (went down)" in screen_text(pilot.app)
    )
    await settled(pilot)


@pytest.mark.parametrize("size", SIZES)
def test_fleet_screen_snapshot(snap_compare: Any, size: tuple[int, int]) -> None:
    assert snap_compare(Host([VIEW], list(REPLIES)), terminal_size=size, run_before=_settled)
