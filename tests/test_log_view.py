"""The log view shared by the server panel and the quantize form: plain text, a bounded tail, search, following."""

from __future__ import annotations

from apphelpers import wait_for
from textual.app import App, ComposeResult
from textual.widgets import Static

from tuichat.ui.widgets.log_view import LogView


class Host(App[None]):
    CSS = "#above { height: auto; } LogView { height: 1fr; overflow: auto auto; }"

    def __init__(self, keep: int = 100) -> None:
        super().__init__()
        self.keep = keep

    def compose(self) -> ComposeResult:
        yield Static("", id="above")
        yield LogView(keep=self.keep, id="log")


def visible_text(app: Host) -> str:
    view = app.query_one(LogView)
    top = round(view.scroll_y)
    return "\n".join(view.lines[top : top + view.scrollable_content_region.height])


async def test_markup_in_a_line_is_shown_as_written() -> None:
    app = Host()
    async with app.run_test(size=(60, 12)) as pilot:
        view = app.query_one(LogView)
        view.add(["[red]not red[/] and [bold]not bold", "plain [/] end"])
        await wait_for(pilot, lambda: "[red]not red[/]" in visible_text(app))
        assert "plain [/] end" in visible_text(app)


async def test_only_the_last_lines_are_kept() -> None:
    app = Host(keep=5)
    async with app.run_test(size=(60, 12)) as pilot:
        view = app.query_one(LogView)
        view.add([f"line {n}" for n in range(12)])
        await pilot.pause()
        assert list(view.kept) == [f"line {n}" for n in range(7, 12)]
        assert view.line_count == 5


async def test_search_narrows_the_view_and_counts_the_matches() -> None:
    app = Host()
    async with app.run_test(size=(60, 12)) as pilot:
        view = app.query_one(LogView)
        view.add(["INFO: first", "WARNING: odd", "INFO: second"])
        view.search("info")
        assert view.shown_lines() == ["INFO: first", "INFO: second"]
        assert str(view.border_title) == "log · 2 lines match"
        view.add(["info again", "nothing"])  # new lines obey the search too
        await pilot.pause()
        assert view.lines == ["INFO: first", "INFO: second", "info again"]
        assert str(view.border_title) == "log · 3 lines match"
        view.search("")
        assert view.lines == ["INFO: first", "WARNING: odd", "INFO: second", "info again", "nothing"]
        assert str(view.border_title) == "log"


async def test_it_follows_the_end_until_the_reader_scrolls_up() -> None:
    app = Host()
    async with app.run_test(size=(60, 12)) as pilot:
        view = app.query_one(LogView)
        view.add([f"line {n}" for n in range(40)])
        await wait_for(pilot, lambda: "line 39" in visible_text(app))
        # a message appears above: the view shrinks, and still shows the last line
        app.query_one("#above", Static).update("\n".join(f"message {n}" for n in range(5)))
        await wait_for(pilot, lambda: view.scrollable_content_region.height == 7)
        await wait_for(pilot, lambda: "line 39" in visible_text(app))
        view.scroll_home(animate=False, immediate=True)
        view.add(["line 40"])
        await pilot.pause()
        assert "line 0" in visible_text(app) and "line 40" not in visible_text(app)
        view.scroll_end(animate=False, immediate=True)
        view.add(["line 41"])
        await wait_for(pilot, lambda: "line 41" in visible_text(app))
