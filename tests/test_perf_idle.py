"""An attached, idle tuichat redraws nothing when nothing shown changed, and polls less often (issue 15)."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from dataclasses import replace
from typing import Any

import httpx
import pytest
from apphelpers import ScriptedServer, app_for, lmdeploy_metrics, wait_for
from test_status_pane import two_gpus
from textual.app import App, ComposeResult
from textual.widget import Widget
from textual.widgets import Static

from tuichat.server.gpu import GpuSnapshot
from tuichat.server.metrics import ContextMeter, parse_metrics
from tuichat.ui.status_view import StatusView
from tuichat.ui.widgets.status_pane import StatusPane


def count_refreshes(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    counts: Counter[str] = Counter()
    original = Widget.refresh

    def counting(self: Widget, *args: Any, **kwargs: Any) -> Any:
        counts[type(self).__name__ + (f"#{self.id}" if self.id else "")] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Widget, "refresh", counting)
    return counts


async def test_polls_that_change_nothing_shown_redraw_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    server = ScriptedServer()
    server.metrics = lmdeploy_metrics(kv=0.42)
    app = app_for(server, gpu_reader=two_gpus(), poll_interval=0.05, cursor_blink=False)
    async with app.run_test(size=(200, 50)) as pilot:  # both panes shown
        # warm up: figures in, the rate and the sparklines' first points drawn
        await wait_for(pilot, lambda: len(app.status_view.kv_history) >= 4 and app.status_view.gen_rate is not None)
        await wait_for(pilot, lambda: app.chat_screen.warmed_up)  # the one-off mount of the first reply's widgets
        readings = len(app.status_view.kv_history)
        counts = count_refreshes(monkeypatch)
        await wait_for(pilot, lambda: len(app.status_view.kv_history) >= readings + 5)  # five more polls
        assert dict(counts) == {}  # the same figures: not one widget asked to redraw


class PaneHost(App[None]):
    """The status pane alone."""

    def compose(self) -> ComposeResult:
        yield StatusPane()


def pane_view() -> tuple[GpuSnapshot, StatusView]:
    """Two fake GPUs and a server's figures, as the pane is shown them."""
    gpu = two_gpus().read()
    assert isinstance(gpu, GpuSnapshot)
    view = StatusView(gpu=gpu, our_pids={os.getpid()}, metrics=parse_metrics(lmdeploy_metrics()), gen_rate=41.2)
    return gpu, view


async def test_a_reading_that_moves_only_unshown_digits_does_not_redraw_the_pane(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gpu, view = pane_view()
    view.context = ContextMeter(4096)
    app = PaneHost()
    async with app.run_test(size=(70, 60)) as pilot:
        pane = app.query_one(StatusPane)
        pane.show(view)
        await pilot.pause()
        counts = count_refreshes(monkeypatch)
        # power 350.0 -> 350.3 W is drawn as "350", the rate 41.2 -> 40.9 as "41 tok/s", and the token counters
        # behind the figures are not drawn at all
        warmer = tuple(replace(g, power_w=(g.power_w or 0) + 0.3) for g in gpu.gpus)
        metrics = replace(view.metrics, prompt_tokens_total=9999.0) if view.metrics else None
        pane.show(replace(view, gpu=replace(gpu, gpus=warmer), metrics=metrics, gen_rate=40.9))
        await pilot.pause()
        assert dict(counts) == {}
        pane.show(replace(view, gen_rate=55.0))  # a figure that is drawn: that part, and only it, redraws
        await pilot.pause()
        assert counts["Static#server-view"] >= 1 and counts["Static#gpu-view"] == 0


async def test_a_section_that_keeps_its_height_is_redrawn_without_a_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    # While a reply streams, the server section's figures change at every poll; a layout of the whole screen for
    # each (10-15 ms at 200x50) is needed only when the section grows or shrinks.
    _, view = pane_view()
    app = PaneHost()
    async with app.run_test(size=(70, 60)) as pilot:
        pane = app.query_one(StatusPane)
        section = pane.query_one("#server-view", Static)
        pane.show(view)
        await pilot.pause()
        rows = section.size.height
        layouts: list[str] = []
        original = Widget.refresh

        def counting(self: Widget, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("layout"):
                layouts.append(self.id or type(self).__name__)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(Widget, "refresh", counting)
        pane.show(replace(view, gen_rate=55.0))
        await pilot.pause()
        assert "55 tok/s" in screen_lines(app) and layouts == []
        pane.show(replace(view, gen_rate=None))  # one row fewer: laid out again, and drawn one row shorter
        await pilot.pause()
        assert layouts and set(layouts) == {"server-view"}
        assert section.size.height == rows - 1 and "tok/s" not in screen_lines(app)


def screen_lines(app: App[Any]) -> str:
    return "\n".join(strip.text for strip in app.screen._compositor.render_strips())


async def test_idle_polls_come_less_often_than_while_a_reply_streams() -> None:
    server = ScriptedServer()
    server.metrics = lmdeploy_metrics()
    handle = server.handle
    reads: list[float] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":
            reads.append(asyncio.get_running_loop().time())
        return await handle(request)

    server.handle = handler  # type: ignore[method-assign]
    app = app_for(server, gpu_reader=two_gpus(), poll_interval=0.1, cursor_blink=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: len(reads) >= 1)
        start = len(reads)
        await pilot.pause(2.0)
        # every 0.1 s would be 20 reads; idle it is one every 2.5 intervals (a busy machine only makes it fewer)
        assert 2 <= len(reads) - start <= 12


async def test_the_prompt_reads_its_theme_styles_only_when_its_styles_change(monkeypatch: pytest.MonkeyPatch) -> None:
    """TextArea reads a dozen component styles at each render (each key, each blink); the prompt does it when its
    styles change (here: a theme switch), and its colours still follow."""
    from textual._text_area_theme import TextAreaTheme

    from tuichat.ui.widgets.prompt_area import PromptArea

    reads: list[str] = []
    apply_css = TextAreaTheme.apply_css

    def counting(self: TextAreaTheme, text_area: Any) -> None:
        if isinstance(text_area, PromptArea):
            reads.append(text_area.app.theme)
        apply_css(self, text_area)

    monkeypatch.setattr(TextAreaTheme, "apply_css", counting)
    app = app_for(ScriptedServer(), watch_server=False)
    async with app.run_test(size=(100, 30)) as pilot:
        prompt = app.query_one(PromptArea)
        await wait_for(pilot, lambda: bool(reads) and prompt.is_mounted)
        await pilot.pause()
        before, background = len(reads), prompt._theme.base_style.bgcolor if prompt._theme else None
        for char in "hello there":
            await pilot.press(char if char != " " else "space")
        await wait_for(pilot, lambda: prompt.text == "hello there")
        await pilot.pause()
        assert len(reads) == before  # eleven keys, eleven renders: no style was read again
        app.theme = "textual-light"
        await wait_for(pilot, lambda: "textual-light" in reads)
        assert prompt._theme is not None and prompt._theme.base_style.bgcolor != background


async def test_the_prompt_reads_its_theme_styles_again_when_a_rule_changes_them() -> None:
    from tuichat.ui.widgets.prompt_area import PromptArea

    class OnePrompt(App[None]):
        CSS = "PromptArea.-alarm { background: #ff0000; }"

        def compose(self) -> ComposeResult:
            yield PromptArea()

    app = OnePrompt()
    async with app.run_test(size=(40, 8)) as pilot:
        prompt = app.query_one(PromptArea)
        await wait_for(pilot, lambda: prompt._theme is not None and prompt._theme.base_style.bgcolor is not None)
        prompt.add_class("-alarm")  # the same theme object, new CSS
        await wait_for(
            pilot,
            lambda: prompt._theme is not None and prompt._theme.base_style.bgcolor.name.lower() in ("#ff0000", "red"),
        )
