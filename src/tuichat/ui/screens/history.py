"""The conversation browser: saved chats newest first, with open, rename, delete and full-text search.

Built on `tuichat.chat.store.Store`, which is handed in by the app. Everything is driven by the keyboard and fits an
80x24 terminal; the keys are Bindings with ids (so `[keys]` in the config can rebind them) and the screen's footer
lists the ones that apply to what is focused. Search runs in a thread worker, a short pause after the last
keystroke, so a prefix that matches thousands of messages never freezes typing.

Every title, model name and snippet is cleaned again right where it is drawn (`tuichat.chat.sanitize`): an imported
chat must not drive the terminal. A conversation another live tuichat holds (`Store.claim`) is marked with that
process's pid; picking it offers to read it here without writing, and deleting it is refused.
The two sides of a `tuichat compare` run are listed together, each led by "⇄" and its side.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.coordinate import Coordinate
from textual.screen import ModalScreen
from textual.timer import Timer
from textual.widgets import DataTable, Input, Label, OptionList, Static
from textual.widgets.option_list import Option

from tuichat.chat.sanitize import clean_line
from tuichat.cli.history import pair_mark, paired_order
from tuichat.ui.screens.dialogs import ConfirmScreen
from tuichat.ui.widgets.key_footer import KeyFooter

if TYPE_CHECKING:
    from tuichat.chat.holders import HeldBy
    from tuichat.chat.store import Conversation, SearchHit, Store

SEARCH_DELAY = 0.15  # seconds of typing pause before a search runs
SEARCH_LIMIT = 50
HIT_TITLE_WIDTH = 40  # so title, role and time share one line at 80 columns
# Snippet marks from the private-use area: they cannot clash with Markdown, markup or anything a user types.
_MARKS = ("\ue000", "\ue001")
_TIME_WIDTH = 16  # "2025-01-31 23:59"
_COUNT_WIDTH = 4
_COLUMNS = ("title", "updated", "count", "model")


@dataclass(frozen=True, slots=True)
class HistoryChoice:
    """What the user picked: a conversation, and the message a search hit pointed at (None from the list).
    `held_by` is set when another live tuichat holds it and the user chose to read it here without writing."""

    conversation_id: int
    message_id: int | None = None
    held_by: HeldBy | None = None

    @property
    def read_only(self) -> bool:
        return self.held_by is not None


def format_time(timestamp: float) -> str:
    """Local date and minute: absolute, so the list reads the same tomorrow."""
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M")


def short_model(model: str | None) -> str:
    """The last part of a model path or repo id, which is the part that tells models apart."""
    if not model:
        return ""
    return clean_line(model).rstrip("/").rsplit("/", 1)[-1]


def snippet_text(snippet: str, marks: tuple[str, str] = _MARKS) -> Text:
    """A search snippet as Text, with the matched words highlighted; never interpreted as markup."""
    start, end = marks
    text = Text(no_wrap=False)
    pieces = clean_line(snippet).split(start)
    text.append(pieces[0].replace(end, ""))
    for piece in pieces[1:]:
        matched, _, rest = piece.partition(end)
        text.append(matched, style="bold reverse")
        text.append(rest.replace(end, ""))
    return text


def _fit(value: str, width: int, prefix: str = "") -> Text:
    text = Text(no_wrap=True, overflow="ellipsis")
    if prefix:
        text.append(prefix, style="italic")
    text.append(clean_line(value))
    text.truncate(width, overflow="ellipsis")
    return text


class ConversationTable(DataTable[Text]):
    """The conversation list: one row per conversation; Home and End jump to the newest and the oldest."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("home", "scroll_top", "Newest", show=False),
        Binding("end", "scroll_bottom", "Oldest", show=False),
    ]


class ConversationsScreen(ModalScreen[HistoryChoice | None]):
    """Browse, open, rename, delete and search saved conversations. Dismisses with a HistoryChoice or None."""

    DEFAULT_CSS = """
    ConversationsScreen {
        align: center middle;
    }
    ConversationsScreen #history-box {
        width: 100%;
        max-width: 120;
        height: 100%;
        max-height: 40;
        border: round $accent;
        background: $surface;
        padding: 0 1;
    }
    ConversationsScreen #history-title {
        text-style: bold;
        color: $accent;
        width: 1fr;
    }
    ConversationsScreen #history-search, ConversationsScreen #history-rename {
        height: 3;
    }
    ConversationsScreen #history-search {
        display: none;
    }
    ConversationsScreen #history-table, ConversationsScreen #history-hits {
        height: 1fr;
        scrollbar-size-vertical: 1;
    }
    ConversationsScreen #history-hits {
        display: none;
        border: none;
        padding: 0;
    }
    ConversationsScreen #history-empty {
        color: $text-muted;
        padding: 1 1;
        display: none;
    }
    ConversationsScreen #history-rename-row {
        height: 3;
        display: none;
    }
    ConversationsScreen #history-rename-label {
        padding: 1 1 0 0;
        width: auto;
    }
    ConversationsScreen #history-rename {
        width: 1fr;
    }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        # Priority, so Enter opens from the table, the search field and the hit list alike; check_action lets
        # it through to the title field while renaming.
        Binding("enter", "open", "Open", id="history_open", priority=True),
        Binding("r", "rename", "Rename", id="history_rename"),
        Binding("d", "delete", "Delete", id="history_delete"),
        Binding("slash", "search", "Search", id="history_search"),
        Binding("escape", "back", "Back", id="history_back"),
        # While typing a search, up/down move through the hits without leaving the field.
        Binding("down", "hit_cursor(1)", "Next hit", id="history_next_hit", show=False),
        Binding("up", "hit_cursor(-1)", "Previous hit", id="history_previous_hit", show=False),
    ]

    def __init__(self, store: Store) -> None:
        super().__init__()
        self.store = store
        self.conversations: list[Conversation] = []
        self.hits: list[SearchHit] = []
        self.held: dict[int, HeldBy] = {}  # conversations other live tuichats hold, by id
        self.mode = "list"  # "list", "search" or "rename"
        self.searched = ""  # the query the hit list shows
        self._renaming: int | None = None
        self._search_timer: Timer | None = None
        self._table_width = 0

    # -- layout -----------------------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        with Vertical(id="history-box"):
            yield Label("Saved conversations", id="history-title")
            yield Input(placeholder="search every message: words, last one may be partial", id="history-search")
            yield ConversationTable(id="history-table", cursor_type="row", zebra_stripes=True)
            yield OptionList(id="history-hits")
            yield Static("", id="history-empty", markup=False)
            with Horizontal(id="history-rename-row"):
                yield Label("New title:", id="history-rename-label")
                yield Input(id="history-rename")
        yield KeyFooter()

    def on_mount(self) -> None:
        self.load()
        self.query_one("#history-table", DataTable).focus()

    def on_resize(self) -> None:
        # Column widths follow the table's width; refilling 1,000 rows takes a few milliseconds.
        self.call_after_refresh(self._refill_if_resized)

    def _refill_if_resized(self) -> None:
        table = self.query_one("#history-table", DataTable)
        if table.size.width != self._table_width:
            self._fill_table()

    # -- the list ---------------------------------------------------------------------------------------------

    def load(self) -> None:
        """Read the conversation list from the store and show it."""
        try:
            # the two sides of a compare run stay next to each other (each marked ⇄ A / ⇄ B)
            self.conversations = paired_order(self.store.list_conversations())
            self.held = self.store.held_elsewhere()
        except Exception as exc:  # a broken history file must not take the app down
            self.conversations = []
            self.held = {}
            self.notify(f"Could not read the history: {exc}", severity="error")
        self._fill_table()

    def _widths(self, available: int) -> dict[str, int]:
        models = [len(short_model(c.model)) for c in self.conversations]
        model = min(max([5, *models]), max(12, available // 4), 28)
        padding = 2 * len(_COLUMNS)  # DataTable pads each cell by one column on both sides
        title = max(10, available - padding - _TIME_WIDTH - _COUNT_WIDTH - model)
        return {"title": title, "updated": _TIME_WIDTH, "count": _COUNT_WIDTH, "model": model}

    def _fill_table(self) -> None:
        table: DataTable[Text] = self.query_one("#history-table", DataTable)
        current = self.current_conversation()
        self._table_width = table.size.width
        available = (table.size.width or self.app.size.width - 4) - 1  # leave the scrollbar its column
        widths = self._widths(available)
        table.clear(columns=True)
        labels = {"title": "Title", "updated": "Updated", "count": "Msgs", "model": "Model"}
        for key in _COLUMNS:
            table.add_column(labels[key], width=widths[key], key=key)
        for conv in self.conversations:
            table.add_row(*self._cells(conv, widths), key=str(conv.id))
        if current is not None:
            self._move_to(current.id)
        self._update_title()
        self._show_list_or_empty()

    def _cells(self, conv: Conversation, widths: dict[str, int]) -> list[Text]:
        held = self.held.get(conv.id)
        prefix = (f"open in pid {held.pid} · " if held else "") + pair_mark(conv)
        return [
            _fit(conv.title, widths["title"], prefix),
            Text(format_time(conv.updated)),
            Text(str(conv.message_count).rjust(widths["count"]), no_wrap=True),
            _fit(short_model(conv.model), widths["model"]),
        ]

    def _update_title(self) -> None:
        count = len(self.conversations)
        label = self.query_one("#history-title", Label)
        if self.mode == "search" and self.searched:
            found = len(self.hits)
            more = "+" if found >= SEARCH_LIMIT else ""
            label.update(f"Search · {found}{more} matching message{'s' if found != 1 else ''}")
        else:
            label.update(f"Saved conversations · {count}")

    def _show_list_or_empty(self) -> None:
        table = self.query_one("#history-table", DataTable)
        hits = self.query_one("#history-hits", OptionList)
        empty = self.query_one("#history-empty", Static)
        showing_hits = self.mode == "search" and bool(self.searched)
        hits.display = showing_hits and bool(self.hits)
        table.display = not showing_hits and bool(self.conversations)
        if showing_hits and not self.hits:
            empty.update(f"No message matches “{self.searched}”. Try fewer or shorter words.")
            empty.display = True
        elif not showing_hits and not self.conversations:
            empty.update(
                "No saved conversations yet. Press Esc, type a message and press Enter: "
                "every chat is saved here as it happens, ready to reopen later."
            )
            empty.display = True
        else:
            empty.display = False
        self.refresh_bindings()  # what Enter, r and d can do depends on what is shown

    def current_conversation(self) -> Conversation | None:
        """The conversation under the table's cursor."""
        table = self.query_one("#history-table", DataTable)
        if not self.conversations or table.row_count == 0:
            return None
        row = min(table.cursor_row, table.row_count - 1)
        key = table.coordinate_to_cell_key(Coordinate(row, 0)).row_key.value
        return next((c for c in self.conversations if str(c.id) == key), None)

    def _move_to(self, conv_id: int) -> None:
        table = self.query_one("#history-table", DataTable)
        try:
            row = table.get_row_index(str(conv_id))
        except Exception:
            return
        table.move_cursor(row=row, animate=False, scroll=True)

    # -- actions ----------------------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "open":
            if self.mode == "rename":
                return False  # Enter belongs to the title field
            if self.mode == "search" and self.searched:
                return bool(self.hits)
            return bool(self.conversations)
        if action in ("rename", "delete"):
            return self.mode == "list" and bool(self.conversations)
        if action == "search":
            return self.mode == "list"
        if action == "hit_cursor":
            return self.mode == "search" and bool(self.hits)
        return True

    def action_open(self) -> None:
        if self.mode == "search" and self.searched:
            hits = self.query_one("#history-hits", OptionList)
            index = hits.highlighted if hits.highlighted is not None else 0
            if 0 <= index < len(self.hits):
                hit = self.hits[index]
                self._pick(hit.conversation_id, hit.message_id)
            return
        conv = self.current_conversation()
        if conv is not None:
            self._pick(conv.id, None)

    @on(DataTable.RowSelected, "#history-table")
    def _row_clicked(self, event: DataTable.RowSelected) -> None:
        if event.row_key.value is not None:
            self._pick(int(event.row_key.value), None)

    @on(OptionList.OptionSelected, "#history-hits")
    def _hit_clicked(self, event: OptionList.OptionSelected) -> None:
        if 0 <= event.option_index < len(self.hits):
            hit = self.hits[event.option_index]
            self._pick(hit.conversation_id, hit.message_id)

    def _pick(self, conv_id: int, message_id: int | None) -> None:
        """Open a conversation; one another tuichat holds is offered read-only, since only one may write it."""
        try:
            held = self.store.holder(conv_id)  # asked now: the other tuichat may have quit since the list was read
        except Exception:
            held = None  # the app's own open will say what is wrong with the history
        if held is None:
            self.dismiss(HistoryChoice(conv_id, message_id))
            return

        def answer(yes: bool | None) -> None:
            if yes:
                self.dismiss(HistoryChoice(conv_id, message_id, held))

        self.app.push_screen(
            ConfirmScreen(
                f"{held.sentence()} Only one tuichat can add to a chat. Read it here without writing? "
                "(To continue it here, quit it there, then open it again.)",
                yes="y / Enter = read it here",
                no="n / Esc = back",
            ),
            answer,
        )

    def action_back(self) -> None:
        if self.mode == "rename":
            self._end_rename()
        elif self.mode == "search":
            self._end_search()
        else:
            self.dismiss(None)

    # -- rename -----------------------------------------------------------------------------------------------

    def action_rename(self) -> None:
        conv = self.current_conversation()
        if conv is None:
            return
        self.mode = "rename"
        self._renaming = conv.id
        field = self.query_one("#history-rename", Input)
        field.value = clean_line(conv.title)
        field.cursor_position = len(field.value)
        self.query_one("#history-rename-row").display = True
        field.focus()
        self.refresh_bindings()

    @on(Input.Submitted, "#history-rename")
    def _rename_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        conv_id = self._renaming
        if conv_id is None:
            return
        try:
            self.store.rename(conv_id, event.value)
            updated = self.store.get_conversation(conv_id)
        except Exception as exc:
            self.notify(f"Could not rename the conversation: {exc}", severity="error")
            return  # keep the field open so what was typed is not lost
        if updated is not None:
            self.conversations = [updated if c.id == conv_id else c for c in self.conversations]
            widths = self._widths(self._table_width - 1 if self._table_width else self.app.size.width - 5)
            table = self.query_one("#history-table", DataTable)
            table.update_cell(str(conv_id), "title", _fit(updated.title, widths["title"]))
        self._end_rename()

    def _end_rename(self) -> None:
        self.mode = "list"
        self._renaming = None
        self.query_one("#history-rename-row").display = False
        self.query_one("#history-table", DataTable).focus()
        self.refresh_bindings()

    # -- delete -----------------------------------------------------------------------------------------------

    def action_delete(self) -> None:
        conv = self.current_conversation()
        if conv is None:
            return
        try:
            held = self.store.holder(conv.id)
        except Exception:
            held = None  # _delete reports a broken history
        if held is not None:
            self.notify(f"{held.sentence()} Quit it there before deleting this chat.", severity="error")
            return

        def answer(yes: bool | None) -> None:
            if yes:
                self._delete(conv.id)

        count = conv.message_count
        self.app.push_screen(
            ConfirmScreen(
                f"Delete “{clean_line(conv.title)}” and its {count} message{'s' if count != 1 else ''}? "
                "This cannot be undone."
            ),
            answer,
        )

    def _delete(self, conv_id: int) -> None:
        try:
            self.store.delete(conv_id)
        except Exception as exc:
            self.notify(f"Could not delete the conversation: {exc}", severity="error")
            return
        self.conversations = [c for c in self.conversations if c.id != conv_id]
        table = self.query_one("#history-table", DataTable)
        table.remove_row(str(conv_id))
        self._update_title()
        self._show_list_or_empty()
        self.refresh_bindings()

    # -- search -----------------------------------------------------------------------------------------------

    def action_search(self) -> None:
        self.mode = "search"
        field = self.query_one("#history-search", Input)
        field.display = True
        field.focus()
        self.refresh_bindings()

    def _end_search(self) -> None:
        if self._search_timer is not None:
            self._search_timer.stop()
        self.mode = "list"
        self.searched = ""
        self.hits = []
        field = self.query_one("#history-search", Input)
        field.value = ""
        field.display = False
        self.query_one("#history-hits", OptionList).clear_options()
        self._update_title()
        self._show_list_or_empty()
        self.query_one("#history-table", DataTable).focus()
        self.refresh_bindings()

    @on(Input.Changed, "#history-search")
    def _query_changed(self, event: Input.Changed) -> None:
        event.stop()
        if self._search_timer is not None:
            self._search_timer.stop()
        self._search_timer = self.set_timer(SEARCH_DELAY, self._start_search)

    @on(Input.Submitted, "#history-search")
    def _search_submitted(self, event: Input.Submitted) -> None:
        event.stop()  # Enter is handled by the priority "open" binding; this only fires with no hits

    def _start_search(self) -> None:
        if self.mode != "search":
            return
        query = self.query_one("#history-search", Input).value
        if not query.strip():
            self._show_hits("", [])
            return
        self.run_worker(lambda: self._search_in_thread(query), thread=True, exclusive=True, group="history-search")

    def _search_in_thread(self, query: str) -> None:
        try:
            hits = self.store.search(query, SEARCH_LIMIT, marks=_MARKS)
        except Exception as exc:
            self.app.call_from_thread(self.notify, f"Search failed: {exc}", severity="error")
            return
        self.app.call_from_thread(self._show_hits, query, hits)

    def _show_hits(self, query: str, hits: list[SearchHit]) -> None:
        if not self.is_attached or self.mode != "search":
            return
        if query != self.query_one("#history-search", Input).value:
            return  # typing went on: a newer search is on its way
        self.searched = query.strip()
        self.hits = hits
        options = self.query_one("#history-hits", OptionList)
        options.clear_options()
        options.add_options([self._hit_option(hit) for hit in hits])
        if hits:
            options.highlighted = 0
        self._update_title()
        self._show_list_or_empty()
        self.refresh_bindings()

    def _hit_option(self, hit: SearchHit) -> Option:
        prompt = Text(no_wrap=False)
        prompt.append_text(_fit(hit.title, HIT_TITLE_WIDTH))
        prompt.stylize("bold")
        details = [hit.role] if hit.role else []
        if hit.created:
            details.append(format_time(hit.created))
        if details:
            prompt.append("  " + " · ".join(details), style="dim")
        prompt.append("\n")
        prompt.append_text(snippet_text(hit.snippet))
        return Option(prompt)

    def action_hit_cursor(self, step: int) -> None:
        options = self.query_one("#history-hits", OptionList)
        if step > 0:
            options.action_cursor_down()
        else:
            options.action_cursor_up()


__all__ = ["ConversationsScreen", "HistoryChoice", "format_time", "short_model", "snippet_text"]
