"""The fleet screen: every node behind lmdeploy's proxy in a row, and which node served each reply of this chat.

It only shows what others gather: the app's fleet poller (`tuichat.server.fleet.FleetPoller`) hands over a
`FleetView` every poll, and a `ReplyLedger` (`tuichat.server.attribution`) knows where each reply went. The
screen reads both through the callables it is given, once at mount and then every `refresh_s`, so it never
blocks on the network and shows the latest poll even when it was opened in between.

Per node: its short name and URL, the models it serves, up/down and since when (as this tuichat saw it), what the
proxy counts (unfinished requests, mean recent latency, speed), and what only the node itself says when read with
its own key (KV-cache use, running/waiting requests). "?" marks a figure nobody reported.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import BindingType
from textual.screen import Screen
from textual.widgets import DataTable, Label, Static

from tuichat.durations import format_compact
from tuichat.server.attribution import ReplyServed
from tuichat.server.fleet import FleetView, NodeView, node_label
from tuichat.ui.keyids import binding
from tuichat.ui.widgets.key_footer import KeyFooter

_HEALTH_STYLE = {"up": "green", "down": "bold red", "starting": "yellow", "unknown": "dim"}
# what a person scans for first comes first: on a narrow terminal the table scrolls sideways to the rest
NODE_COLUMNS = ("Node", "Health", "Unfin", "Latency", "KV", "Run/Wait", "Speed", "Models", "URL")
REPLY_COLUMNS = ("#", "Reply", "Served by")
PREVIEW_CHARS = 40


@dataclass(frozen=True)
class ReplyRow:
    """One reply of this chat as the screen lists it: its first words and where it was served."""

    preview: str
    served: ReplyServed | None  # None: the reply was not attributed (sent before the fleet was known)


def health_cell(node: NodeView, now: float) -> Text:
    state = node.health if node.registered else f"{node.health}, unregistered"
    text = Text(state, style=_HEALTH_STYLE.get(node.health, ""))
    if node.health_since is not None:
        text.append(f" {format_compact(now - node.health_since)}", style="dim")
    if node.health == "down" and node.note:
        text.append(f" ({node.note})", style="dim")
    return text


def node_row(node: NodeView, now: float) -> tuple[str | Text, ...]:
    """The cells of one node's row, in NODE_COLUMNS order."""
    url = node.url.removeprefix("http://").removeprefix("https://")
    models = ", ".join(node.models) if node.models else "?"
    latency = "?" if node.latency is None else f"{node.latency:.2f}s ({node.latency_samples})"
    speed = "?" if node.speed is None else f"{node.speed:g}"
    kv = "?" if node.kv_cache_usage is None else f"{node.kv_cache_usage * 100:.0f}%"
    if node.running is None and node.waiting is None:
        run_wait = "?"
    else:
        run_wait = f"{'?' if node.running is None else node.running}/{'?' if node.waiting is None else node.waiting}"
    unfinished = "?" if node.unfinished is None else str(node.unfinished)
    return (
        Text(node_label(node), style="bold"),
        health_cell(node, now),
        unfinished,
        latency,
        kv,
        run_wait,
        speed,
        models,
        url,
    )


def served_cell(served: ReplyServed | None) -> Text:
    if served is None:
        return Text("not tracked", style="dim")
    style = {"one": "", "several": "yellow", "unknown": "dim", "pending": "dim"}[served.certainty]
    return Text(served.describe(), style=style)


def summary(view: FleetView | None) -> Text:
    if view is None:
        return Text("Waiting for the first reading of the proxy…", style="dim")
    head = Text()
    name = f"Fleet {view.name}" if view.name else "lmdeploy proxy"
    head.append(name, style="bold")
    head.append(f" · {view.url.removeprefix('http://')} · ")
    all_up = view.nodes and view.up == len(view.nodes)
    head.append(f"{view.up} of {len(view.nodes)} nodes up", style="green" if all_up else "bold yellow")
    if view.error:
        head.append(f" · {view.error}", style="yellow")
    return head


class FleetScreen(Screen[None]):
    """Nodes of the proxy the chat goes through, and where each reply of this chat was served."""

    CSS_PATH = "fleet.tcss"
    BINDINGS: ClassVar[list[BindingType]] = [binding("fleet_back", "back")]

    def __init__(
        self,
        view_source: Callable[[], FleetView | None],
        replies_source: Callable[[], Sequence[ReplyRow]] = tuple,
        *,
        refresh_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._view_source = view_source
        self._replies_source = replies_source
        self._refresh_s = refresh_s
        self._clock = clock
        self._shown: tuple[object, ...] | None = None

    def compose(self) -> ComposeResult:
        yield Static(summary(None), id="fleet-summary")
        yield DataTable(id="fleet-nodes", cursor_type="row", zebra_stripes=True)
        yield Label("Which node served each reply of this chat", classes="fleet-title")
        yield DataTable(id="fleet-replies", cursor_type="row")
        yield Static(
            Text(
                "lmdeploy's proxy does not say where it sent a request: a reply is put down to the node whose own "
                'counters (requests, tokens) moved while it ran; when several moved, it says "one of".',
                style="dim",
            ),
            id="fleet-hint",
        )
        yield KeyFooter()

    def on_mount(self) -> None:
        nodes = self.query_one("#fleet-nodes", DataTable)
        nodes.add_columns(*NODE_COLUMNS)
        replies = self.query_one("#fleet-replies", DataTable)
        replies.add_columns(*REPLY_COLUMNS)
        self.refresh_view()
        self.set_interval(self._refresh_s, self.refresh_view)

    def refresh_view(self) -> None:
        """Redraw from the latest poll and attributions (only when they changed: a redraw resets the tables)."""
        view = self._view_source()
        rows = tuple(self._replies_source())
        now = self._clock()
        # ages move every second; the rest only when a poll brings news
        key = (view, rows, int(now))
        if key == self._shown:
            return
        self._shown = key
        self.query_one("#fleet-summary", Static).update(summary(view))
        nodes = self.query_one("#fleet-nodes", DataTable)
        nodes.clear()
        for node in view.nodes if view is not None else ():
            nodes.add_row(*node_row(node, now), key=node.url)
        replies = self.query_one("#fleet-replies", DataTable)
        replies.clear()
        if not rows:
            replies.add_row("", Text("no reply yet", style="dim"), "")
        for number, row in enumerate(rows, 1):
            preview = " ".join(row.preview.split())
            if len(preview) > PREVIEW_CHARS:
                preview = preview[: PREVIEW_CHARS - 1] + "…"
            replies.add_row(str(number), preview, served_cell(row.served))

    def action_back(self) -> None:
        self.dismiss(None)
