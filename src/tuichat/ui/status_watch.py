"""The status pane's readings: GPU (NVML, in a thread), the server's /metrics, a fleet's nodes, the context meter.

App-wide (a server switch or a reopened chat changes what it reads), so the app holds one; it draws into the chat
screen's status pane and status line. The maths (rates, histories, back-off, the meter) is the domain's
(`tuichat.server.metrics`); this module only schedules the readings on Textual workers and redraws.

Idle costs: while no reply streams (and for a few polls after one ends, while the server's gauges settle) it reads
every `IDLE_FACTOR` poll intervals instead of every one, and a reading redraws only what it changed on screen, so
an attached tuichat left open in tmux stays near zero CPU (bench/ figure 7).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

from textual.css.query import NoMatches

from tuichat.chat.turns import Turn
from tuichat.server.attribution import ReplyLedger
from tuichat.server.metrics import (
    ContextMeter,
    History,
    MetricsError,
    MetricsSchedule,
    RateTracker,
    ServerMetrics,
    kv_capacity_tokens,
    parse_metrics,
    summarize_for_status,
)
from tuichat.ui.status_view import StatusView

IDLE_FACTOR = 2.5  # idle: read every 2.5 poll intervals (5 s at the default 2 s); lmdeploy's gauges move every ~10 s
SETTLE_POLLS = 5  # after a reply ends, keep the streaming pace this many intervals: the final figures come late

if TYPE_CHECKING:
    from tuichat.server.fleet import FleetPoller, FleetView
    from tuichat.server.gpu import GpuSampler, GpuSnapshot
    from tuichat.ui.app import TuichatApp


class StatusWatch:
    """Reads the GPU and the server every poll interval and keeps the `StatusView` the pane draws."""

    def __init__(self, app: TuichatApp) -> None:
        self.app = app
        self.view = StatusView(context=ContextMeter(None))
        self.count_when_shown = False  # a saved chat opened at start-up waits for the first screen to be counted
        self._gen_rate = RateTracker()
        self._kv_history = History()
        self._rate_history = History()
        self._gpu_sampler: GpuSampler | None = None
        self._next_metrics_at = 0.0
        self._metrics_busy = False
        self._schedule = MetricsSchedule(app.options.poll_interval)
        # whether the server is an lmdeploy proxy (a fleet): asked once
        self._fleet_state: Literal["unknown", "yes", "no"] = "yes" if app.options.fleet is not None else "unknown"
        self._fleet_poller: FleetPoller | None = None
        # which node served each reply (the fleet screen): fed by every fleet poll
        self.ledger = ReplyLedger()
        self._generation = 0  # bumped with every new client, so a late answer of the old one is dropped
        self._polled_at = float("-inf")  # when poll() last ran
        self._busy_until = float("-inf")  # until then the timer polls at every tick (a reply streams or just ended)

    def start(self) -> None:
        """The poll timer; the first reading is the app's to ask for (`poll`), once its first screen is out."""
        self.app.set_interval(self.app.options.poll_interval, self._tick)

    def _tick(self) -> None:
        """The poll timer: read now while a reply streams (or just ended), else only every `IDLE_FACTOR` ticks."""
        now = time.monotonic()
        interval = self.app.options.poll_interval
        if self.app.streaming:
            self._busy_until = now + interval * SETTLE_POLLS
        # a little slack: timer ticks jitter, and a tick that comes a hair early must not wait a whole extra one
        if now < self._busy_until or now - self._polled_at >= interval * (IDLE_FACTOR - 0.5):
            self.poll()

    def close(self) -> None:
        if self._fleet_poller is not None:
            self._fleet_poller.close()

    def retargeted(self) -> None:
        """The chat talks to another server: forget the old one's figures and ask the new one soon."""
        self._gen_rate.reset()
        self._generation += 1
        self._metrics_busy = False
        self._schedule.attached(time.monotonic())
        self._next_metrics_at = 0.0
        self.view.metrics = None
        self.view.metrics_error = None
        self.app.call_after_refresh(self.poll)  # the pane need not wait a whole interval for real figures

    # -- the context meter ------------------------------------------------------------------------------------

    def chat_opened(self, turns: Iterable[Turn]) -> None:
        meter = self.view.context
        if meter is None:
            return
        meter.reset()
        meter.estimate_from(t.content for t in turns if t.role in ("user", "assistant"))
        self.redraw()
        # else the count is asked for once the launched server is up, or (at start-up, --continue) once the
        # saved chat's first screen is out: its request and httpx's import would delay that screen
        if self.app.server_link.target_known:
            if self.app.first_screen_out:
                self.count_context()
            else:
                self.count_when_shown = True

    def first_screen_shown(self) -> None:
        """The app's first screen is out: the count a saved chat opened at start-up waited for."""
        if self.count_when_shown:
            self.count_when_shown = False
            self.count_context()

    def count_context(self) -> None:
        self.app.run_worker(self._count_context(), group="encode", exclusive=True, exit_on_error=False)

    async def _count_context(self) -> None:
        """Exact token count of a restored chat from the server's own tokenizer (/v1/encode), when it has one."""
        chat = self.app.chat_screen.conversation
        text = "\n".join(t.content for t in chat.chat.turns if t.role in ("user", "assistant"))
        count = await chat.client.count_tokens(text)
        meter = self.view.context
        if count is not None and meter is not None:
            meter.record_usage(count, 0)
            self.redraw()

    async def learn_engine(self) -> None:
        """The launched server's KV-cache geometry, for the pane's capacity figure."""
        info = await self.app.client.engine_info()
        if info:
            for key in ("block_size", "num_gpu_blocks"):
                if key in info:
                    self.view.launch[key.replace("_", " ")] = info[key]
            capacity = kv_capacity_tokens(info)
            if capacity is not None:
                self.view.kv_capacity = capacity
            self.redraw()

    # -- polling ----------------------------------------------------------------------------------------------

    def poll(self) -> None:
        """Read the GPUs, the fleet or /metrics now (each in its own worker)."""
        app = self.app
        self._polled_at = time.monotonic()
        app.run_worker(self._read_gpu, thread=True, group="gpu", exclusive=True, exit_on_error=False)
        if not app.server_link.target_known:
            return  # the launched server's address and key come with its ready state: ask nothing before
        if self._fleet_state != "no":
            app.run_worker(self._read_fleet, thread=True, group="fleet", exclusive=True, exit_on_error=False)
        if self._fleet_state == "yes":
            return  # a proxy has no /metrics: each node's figures come with the fleet view
        if not self._metrics_busy and time.monotonic() >= self._next_metrics_at:
            self._metrics_busy = True
            app.run_worker(self._read_metrics(), group="metrics", exit_on_error=False)

    def _read_gpu(self) -> None:
        # NVML calls block (briefly): a thread keeps them off the event loop that draws the stream.
        if self._gpu_sampler is None:
            from tuichat.server.gpu import GpuSampler, NvmlReader

            self._gpu_sampler = GpuSampler(self.app.options.gpu_reader or NvmlReader())
        snapshot = self._gpu_sampler.sample()
        server = self.app.server_link.server
        if server is not None:
            # The engine and worker processes hold the memory, not the server: count the whole group as ours.
            self.view.our_pids = server.pids()
        if snapshot is not None:
            self.app.call_from_thread(self._gpu_arrived, snapshot)

    def _read_fleet(self) -> None:
        # Is the server an lmdeploy proxy? Asked once (in a thread: it is a blocking request); then its node list
        # and each node's own /metrics, with the node keys when tuichat launched the fleet.
        from tuichat.server.fleet import FleetPoller, observe, probe_proxy

        if self._fleet_poller is None:
            fleet = self.app.options.fleet
            target = self.app.target
            if fleet is not None:
                self._fleet_poller = fleet.poller(supervise=True)
            elif probe_proxy(target.url, target.api_key):
                self._fleet_poller = FleetPoller(target.url, target.api_key)
            else:
                self._fleet_state = "no"
                return
            self._fleet_state = "yes"
        view = self._fleet_poller.poll()
        observe(self.ledger, view)
        self.app.call_from_thread(self._fleet_arrived, view)

    @property
    def is_fleet(self) -> bool:
        return self._fleet_state == "yes"

    def read_fleet_soon(self) -> None:
        """A reply just ended: read the nodes' counters now, so the fleet screen can say which node served it."""
        if self._fleet_state == "yes":
            self.app.run_worker(self._read_fleet, thread=True, group="fleet", exclusive=True, exit_on_error=False)

    def _fleet_arrived(self, view: FleetView) -> None:
        self.view.fleet = view
        self.redraw()

    def _gpu_arrived(self, snapshot: GpuSnapshot) -> None:
        self.view.gpu = snapshot
        self.redraw()

    async def _read_metrics(self) -> None:
        from tuichat.chat.client import ChatError

        client, generation = self.app.client, self._generation
        failure: tuple[str, str] | None = None
        try:
            metrics = parse_metrics(await client.metrics_text())
        except MetricsError as exc:  # the schedule says when to try again, and whether to say so
            failure = ("not_metrics", str(exc))
        except ChatError as exc:
            failure = (exc.kind, exc.message or str(exc))
        except Exception as exc:
            failure = ("protocol", str(exc))
        finally:
            self._metrics_busy = False
        if generation != self._generation:
            return  # asked of the server before the switch: its answer, good or bad, says nothing now
        now = time.monotonic()
        if failure is None:
            self._schedule.succeeded()
            self._next_metrics_at = now
            self._metrics_arrived(metrics)
        else:
            kind, message = failure
            delay, show = self._schedule.failed(kind, now)
            self._next_metrics_at = now + delay
            if show:
                self.view.metrics = None
                self.view.metrics_error = f"server metrics unavailable: {message}"
        self.redraw()

    def _metrics_arrived(self, metrics: ServerMetrics) -> None:
        now = time.monotonic()
        view = self.view
        view.metrics = metrics
        view.metrics_error = None
        if metrics.generation_tokens_total is not None:
            self._gen_rate.add(now, metrics.generation_tokens_total)
            rate = self._gen_rate.rate(window_s=10.0)
            view.gen_rate = rate
            if rate is not None:
                self._rate_history.append(now, rate)
        if metrics.kv_cache_usage is not None:
            self._kv_history.append(now, metrics.kv_cache_usage * 100)
        view.kv_history = self._kv_history.values(last_seconds=600, now=now)
        view.rate_history = self._rate_history.values(last_seconds=600, now=now)

    def redraw(self) -> None:
        view = self.view
        screen = self.app.chat_screen
        pane = screen.status_pane()  # mounted a second after start-up; until then the status line alone shows
        if pane is not None and pane.display:
            pane.show(view)
        parts = []
        if view.metrics is not None:
            parts.append(summarize_for_status(view.metrics, view.gen_rate, width=44))
        if view.gpu is not None and view.gpu.gpus:
            used = sum(g.mem_used or 0 for g in view.gpu.gpus)
            total = sum(g.mem_total or 0 for g in view.gpu.gpus)
            from tuichat.server.gpu import format_bytes

            parts.append(f"GPU {format_bytes(used)}/{format_bytes(total)}")
        warning = view.context.warning() if view.context else None
        if warning:
            parts.insert(0, "⚠ context nearly full")
        try:
            line = screen.status_line
        except NoMatches:
            return  # a reading that lands while the app shuts down: nothing is left to draw on
        extra = " · ".join(parts)
        if line.extra != extra:  # the same figures again: a redraw would only cost a frame
            line.set(extra=extra)
