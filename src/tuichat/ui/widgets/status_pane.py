"""The status pane: GPUs (ours vs others), the server's KV cache and scheduler, a fleet's nodes, and this chat.

It only draws: the app samples NVML in a thread worker and `/metrics` over HTTP, and hands the pane a
`StatusView` a second or two apart. Drawing is a handful of `Static` updates with Rich renderables, cheap enough
to leave the token stream alone (see bench/ for the measured cost with the pane visible).

Behind `lmdeploy serve proxy` the app also hands it a `FleetView` (tuichat.server.fleet.FleetPoller): the Fleet section
shows a row per node (up or down, unfinished requests, recent latency, and KV cache and running/waiting where the
node's own /metrics could be read) and stays hidden for a plain server.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Label, Sparkline, Static

from tuichat.server.gpu import GpuSnapshot, describe_no_gpu, format_bytes, memory_split
from tuichat.server.metrics import reply_stats_from_dict

if TYPE_CHECKING:  # the fleet module (and the server manager behind it) loads only when a fleet is shown
    from tuichat.server.fleet import FleetView
    from tuichat.ui.status_view import StatusView

BAR_WIDTH = 20
SPARK_POINTS = 60  # the most recent readings a sparkline draws


def bar(fraction: float | None, width: int = BAR_WIDTH, style: str = "green") -> Text:
    """A text bar that reads in 16 colours and in monochrome (the filled part uses a different glyph)."""
    if fraction is None:
        return Text("?" * 1, style="dim")
    fraction = min(max(fraction, 0.0), 1.0)
    filled = round(fraction * width)
    if fraction >= 0.9:
        style = "red"
    elif fraction >= 0.75:
        style = "yellow"
    return Text.assemble(("█" * filled, style), ("░" * (width - filled), "dim"))


def split_bar(ours: int, others: int, total: int | None, width: int = BAR_WIDTH) -> Text:
    """GPU memory as one bar: ours (█), others (▓), free (░)."""
    if not total:
        return Text("?", style="dim")
    o = round(width * ours / total)
    x = min(width - o, round(width * others / total))
    return Text.assemble(("█" * o, "cyan"), ("▓" * x, "magenta"), ("░" * (width - o - x), "dim"))


def gpu_lines(snapshot: GpuSnapshot | None, our_pids: set[int]) -> list[Text]:
    """The GPU section's lines, as drawn: comparing two of these lists tells whether anything shown changed."""
    if snapshot is None:
        return [Text("reading GPUs…", style="dim")]
    if snapshot.error is not None or not snapshot.gpus:
        return [Text(describe_no_gpu(snapshot), style="yellow")]
    splits = {s.index: s for s in memory_split(snapshot, our_pids)}
    parts: list[Text] = []
    for gpu in snapshot.gpus:
        split = splits[gpu.index]
        head = Text(f"GPU{gpu.index} ", style="bold")
        head.append(gpu.name.removeprefix("NVIDIA "))
        facts = []
        if gpu.util_percent is not None:
            facts.append(f"{gpu.util_percent}%")
        if gpu.temperature_c is not None:
            facts.append(f"{gpu.temperature_c}°C")
        if gpu.power_w is not None:
            limit = f"/{gpu.power_limit_w:.0f}" if gpu.power_limit_w else ""
            facts.append(f"{gpu.power_w:.0f}{limit} W")
        line2 = Text("  " + " · ".join(facts) if facts else "  readings unavailable", style="dim")
        mem = Text("  ")
        mem.append_text(split_bar(split.ours_bytes, split.others_bytes, gpu.mem_total, BAR_WIDTH - 2))
        used = format_bytes(gpu.mem_used) if gpu.mem_used is not None else "?"
        total = format_bytes(gpu.mem_total) if gpu.mem_total is not None else "?"
        mem.append(f" {used}/{total}")
        legend = Text(
            f"  ours {format_bytes(split.ours_bytes)} · others {format_bytes(split.others_bytes)}", style="dim"
        )
        parts += [head, line2, mem, legend]
    return parts


def gpu_renderable(snapshot: GpuSnapshot | None, our_pids: set[int]) -> RenderableType:
    return Group(*gpu_lines(snapshot, our_pids))


def server_rows(view: StatusView) -> Text | list[tuple[str, Text]]:
    """The server section as drawn: a sentence while there are no figures, else its (label, value) rows."""
    if view.metrics is None:
        return Text(view.metrics_error or "waiting for /metrics…", style="yellow" if view.metrics_error else "dim")
    m = view.metrics
    kv = Text()
    kv.append_text(bar(m.kv_cache_usage, BAR_WIDTH - 6))
    kv.append(f" {m.kv_cache_usage * 100:.0f}%" if m.kv_cache_usage is not None else " ?")
    rows = [("KV", kv)]
    if view.kv_capacity is not None:
        used = f"~{round(m.kv_cache_usage * view.kv_capacity):,} of " if m.kv_cache_usage is not None else ""
        rows.append(("KV tokens", Text(f"{used}{view.kv_capacity:,}")))
    running = m.running if m.running is not None else "?"
    waiting = m.waiting if m.waiting is not None else "?"
    rows.append(("requests", Text(f"{running} running · {waiting} waiting")))
    if m.prefix_cache_hit_rate is not None:
        rows.append(("prefix hit", Text(f"{m.prefix_cache_hit_rate * 100:.0f}%")))
    if view.gen_rate is not None:
        rows.append(("generation", Text(f"{view.gen_rate:.0f} tok/s")))
    if m.mean_ttft is not None:
        rows.append(("mean TTFT", Text(f"{m.mean_ttft:.3f} s")))
    if m.failed:
        rows.append(("failed", Text(str(m.failed))))
    return rows


def _server_table(rows: Text | list[tuple[str, Text]]) -> RenderableType:
    if isinstance(rows, Text):
        return rows
    table = Table.grid(padding=(0, 1))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for label, value in rows:
        table.add_row(label, value)
    return table


def server_renderable(view: StatusView) -> RenderableType:
    return _server_table(server_rows(view))


_HEALTH_STYLE = {"up": "green", "down": "bold red", "starting": "yellow", "unknown": "dim"}


def fleet_renderable(view: FleetView) -> RenderableType:
    """A row per node: health, what the proxy counts for it, and its KV cache where its /metrics was read."""
    from tuichat.server.fleet import node_label

    parts: list[RenderableType] = []
    head = Text()
    head.append(f"{view.up} of {len(view.nodes)} nodes up", style="bold" if view.up == len(view.nodes) else "yellow")
    head.append(f" · {view.url.removeprefix('http://')}", style="dim")
    parts.append(head)
    if view.error:
        parts.append(Text(view.error, style="yellow"))
    if not view.nodes:
        parts.append(Text("no node is registered with the proxy", style="yellow"))
    table = Table.grid(padding=(0, 1))
    table.add_column(no_wrap=True)
    table.add_column(no_wrap=True)
    table.add_column()
    for node in view.nodes:
        state = node.health if node.registered else f"{node.health}, unregistered"
        name = Text(node_label(node), style="bold")
        facts = Text()
        if node.unfinished is not None:
            facts.append(f"{node.unfinished} unfin")
        if node.latency is not None:
            facts.append(f" · {node.latency:.2f}s")
        if node.kv_cache_usage is not None:
            facts.append(" KV ")
            facts.append_text(bar(node.kv_cache_usage, 6))
            facts.append(f" {node.kv_cache_usage * 100:.0f}%")
        if node.running is not None:
            facts.append(f" · {node.running}r/{node.waiting if node.waiting is not None else '?'}w")
        if node.health == "down" and node.note:
            facts.append(f" {node.note}", style="dim")
        table.add_row(name, Text(state, style=_HEALTH_STYLE.get(node.health, "")), facts)
    parts.append(table)
    return Group(*parts)


def launch_renderable(launch: dict[str, Any]) -> RenderableType:
    if not launch:
        return Text("attached server: launch settings unknown", style="dim")
    table = Table.grid(padding=(0, 1))
    table.add_column(style="dim", no_wrap=True)
    table.add_column()
    for key, value in launch.items():
        table.add_row(key, str(value))
    return table


def chat_lines(view: StatusView) -> list[Text]:
    """The "This chat" section's lines, as drawn."""
    parts: list[Text] = []
    stats = view.last_reply
    if stats:
        parsed = reply_stats_from_dict(stats)
        line = Text()
        if parsed is not None and parsed.ttft_s is not None:
            line.append(f"TTFT {parsed.ttft_s:.2f}s  ")
        if parsed is not None and parsed.decode_tokens_per_s is not None:
            line.append(f"{parsed.decode_tokens_per_s:.1f} tok/s")
        elif parsed is not None and parsed.decode_chunks_per_s is not None:
            line.append(f"{parsed.decode_chunks_per_s:.1f} chunks/s")
        parts.append(line)
        if parsed is not None and parsed.completion_tokens is None and parsed.chunks is not None:
            completion = f"{parsed.chunks} chunks (no token count)"
        else:
            completion = str(parsed.completion_tokens if parsed is not None else "?")
        prompt = stats.get("prompt_tokens")
        tokens = Text(style="dim")
        tokens.append(
            f"prompt {'?' if prompt is None else prompt} · completion {completion}"
            f" · cached {stats.get('cached_tokens') or 0}"
        )
        parts.append(tokens)
    else:
        parts.append(Text("no reply yet", style="dim"))
    meter = view.context
    if meter is not None:
        fraction = meter.fraction
        ctx = Text("context ")
        if fraction is not None:
            ctx.append_text(bar(fraction, BAR_WIDTH - 8))
        if meter.session_len:
            approx = "" if meter.exact else "~"
            ctx.append(f" {approx}{meter.used:,}/{meter.session_len:,}")
        else:
            ctx.append(f"~{meter.used:,} tokens (session length unknown)", style="dim")
        parts.append(ctx)
        warning = meter.warning()
        if warning:
            parts.append(Text(warning, style="bold yellow"))
    return parts


def chat_renderable(view: StatusView) -> RenderableType:
    return Group(*chat_lines(view))


def _drawn(parts: Iterable[Text | tuple[str, Text]]) -> tuple[object, ...]:
    """What these texts look like on screen, comparable: Rich's own `Text ==` leaves out the base style."""
    out: list[object] = []
    for part in parts:
        label, text = part if isinstance(part, tuple) else ("", part)
        out.append((label, text.plain, str(text.style), tuple(text.spans)))
    return tuple(out)


def redraw_section(view: Static, content: RenderableType) -> None:
    """Show `content` in a section; the whole screen is laid out again only when the section's height changes.

    Static.update lays out the whole screen (~10-15 ms at 200x50 with both panes), and while a reply streams
    the server section changes at every poll (KV %, tok/s) without changing its height."""
    width, height = view.content_size
    if not width or not view.display:
        view.update(content)
        return
    view.update(content, layout=False)
    if view.get_content_height(view.content_size, view.app.size, width) != height:
        view.refresh(layout=True)


class StatusPane(VerticalScroll):
    """GPU, server and conversation status, refreshed by `show(view)`."""

    def compose(self) -> ComposeResult:
        yield Label("GPU", classes="pane-title")
        yield Static(Text("reading GPUs…", style="dim"), id="gpu-view")
        yield Label("Server", classes="pane-title")
        yield Static(Text("waiting for /metrics…", style="dim"), id="server-view")
        yield Label("Fleet", id="fleet-title", classes="pane-title")
        yield Static("", id="fleet-view")
        yield Label("KV % · last 10 min", id="kv-spark-label", classes="hint")
        yield Sparkline([], id="kv-spark", summary_function=max)
        yield Label("tok/s · last 10 min", id="rate-spark-label", classes="hint")
        yield Sparkline([], id="rate-spark", summary_function=max)
        yield Static("", id="launch-view")
        yield Label("This chat", classes="pane-title")
        yield Static(Text("no reply yet", style="dim"), id="chat-view")

    _last: dict[str, object]

    def on_mount(self) -> None:
        self._last = {}
        self.query_one("#fleet-title").display = False
        self.query_one("#fleet-view").display = False

    def _changed(self, part: str, key: object) -> bool:
        """Redraw a part only when what it shows changed: every redraw costs layout on the next frame, and
        the pane is refreshed every poll while a reply streams beside it."""
        try:
            same = self._last.get(part) == key
        except TypeError:  # an unhashable or uncomparable key: redraw
            same = False
        if same:
            return False
        self._last[part] = key
        return True

    def show(self, view: StatusView) -> None:
        # Each part is keyed by what it draws (its texts and their styles), not by the readings behind
        # it: a GPU's power in watts to two decimals or a counter the pane does not show changes every poll, and
        # each needless update costs a layout pass and a repaint (bench/ figure 7, idle CPU).
        gpu = gpu_lines(view.gpu, view.our_pids)
        if self._changed("gpu", _drawn(gpu)):
            redraw_section(self.query_one("#gpu-view", Static), Group(*gpu))
        server = server_rows(view)
        if self._changed("server", _drawn([server]) if isinstance(server, Text) else _drawn(server)):
            redraw_section(self.query_one("#server-view", Static), _server_table(server))
        # the poll's own timestamps change every time: only what the section draws decides a redraw
        fleet_key = replace(view.fleet, polled_from=0.0, polled_to=0.0) if view.fleet is not None else None
        if self._changed("fleet", fleet_key):
            shown = view.fleet is not None
            self.query_one("#fleet-title").display = shown
            fleet_view = self.query_one("#fleet-view", Static)
            fleet_view.display = shown
            if view.fleet is not None:
                title = f"Fleet {view.fleet.name}" if view.fleet.name else "Fleet (lmdeploy proxy)"
                self.query_one("#fleet-title", Label).update(title)
                redraw_section(fleet_view, fleet_renderable(view.fleet))
        for name, data in (("kv", view.kv_history), ("rate", view.rate_history)):
            # A sparkline of fewer than two points says nothing: hide it until there is a trend to draw. A flat
            # series (an idle server: KV and tok/s the same every poll) draws the same bottom line at any length.
            shown_data = data[-SPARK_POINTS:] if len(data) >= 2 else []
            flat = bool(shown_data) and min(shown_data) == max(shown_data)
            if not self._changed(name, ("flat",) if flat else shown_data):
                continue
            shown = bool(shown_data)
            spark = self.query_one(f"#{name}-spark", Sparkline)
            spark.display = shown
            self.query_one(f"#{name}-spark-label").display = shown
            if shown:
                spark.data = shown_data
        if self._changed("launch", tuple(view.launch.items())):
            redraw_section(self.query_one("#launch-view", Static), launch_renderable(view.launch))
        chat = chat_lines(view)
        if self._changed("chat", _drawn(chat)):
            redraw_section(self.query_one("#chat-view", Static), Group(*chat))
