"""The server panel's log: follow the server's log file (from its start for a new launch, its last part for an
existing one), show each line tidied and with the API key masked, and search it.

The reading happens on a thread worker (`LogFollower.read`), started by the panel's timer; a follow started
later (another launch, another profile) makes the lines of an earlier one arrive to nothing (`_follow_gen`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from textual import on, work
from textual.screen import Screen
from textual.widgets import Input

from tuichat.chat.sanitize import clean
from tuichat.config import Config
from tuichat.server.launcher import ManagedServer, ServerManager, mask_secret
from tuichat.server.logfollow import LogFollower, collapse_cr
from tuichat.server.profiles import Profile
from tuichat.ui.widgets.log_view import LogView

LOG_START_BYTES = 256 * 1024  # how much of an existing log is read when the panel opens
ResultT = TypeVar("ResultT")


def tidy_line(line: str, secrets: tuple[str, ...]) -> str:
    """A raw log line as shown: the last state of a tqdm redraw, no control sequences, no key."""
    text = clean(collapse_cr(line)).rstrip()
    for secret in secrets or (None,):  # mask_secret also hides any `--api-keys VALUE` it sees
        text = mask_secret(text, secret)
    return text


class ServerLog(Screen[ResultT]):
    """The log part of the server panel (`ServerScreen`), which supplies the server, profile and manager."""

    manager: ServerManager
    config: Config
    profile_name: str
    server: ManagedServer | None
    _follower: LogFollower | None = None
    _follow_gen = 0  # which follow the lines read belong to
    _secrets: tuple[str, ...] = ()
    _partial_shown = ""  # the unfinished last line already shown (of a server that exited)
    _log_busy = False  # a read is under way

    @property
    def profile(self) -> Profile | None:
        return self.config.profiles.get(self.profile_name)

    @property
    def log_view(self) -> LogView:
        return self.query_one("#srv-log", LogView)

    @property
    def lines(self) -> list[str]:
        """The log lines kept (the last `LOG_KEEP`), whether the search shows them or not."""
        return list(self.log_view.kept) if self.is_attached else []

    def _post(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run `callback` on the event loop from a worker thread; dropped once the app has gone."""
        with contextlib.suppress(RuntimeError):  # the app stopped while the worker ran
            self.app.call_from_thread(callback, *args)

    def _log_path(self) -> Path:
        if self.server is not None:
            return self.server.log_path
        return self.manager.log_path(self.profile_name)

    def _secret_list(self) -> tuple[str, ...]:
        secrets: list[str] = []
        if self.server is not None and self.server.api_key:
            secrets.append(self.server.api_key)
        profile = self.profile
        if profile is not None and profile.api_key:
            secrets.append(profile.api_key)
        return tuple(secrets)

    def _follow(self, path: Path, *, from_start: bool) -> None:
        """Show `path` from now on: from its beginning (a new launch) or its last part (an existing log)."""
        self._follow_gen += 1
        self._follower = LogFollower(path, start_at_end=None if from_start else LOG_START_BYTES)
        self._secrets = self._secret_list()
        self._partial_shown = ""
        if self.is_attached:
            self.log_view.reset()

    @work(thread=True, group="server-log", exit_on_error=False)
    def _read_log(self, follower: LogFollower, gen: int, secrets: tuple[str, ...], ended: bool) -> None:
        try:
            raw, partial = follower.read()
            lines = [tidy_line(line, secrets) for line in raw if not ("\r" in line and not collapse_cr(line).strip())]
            # an unfinished last line of a server that has exited will never be finished: show it as it is
            tail = ""
            if ended and partial.strip() and partial != self._partial_shown:
                tail = partial
            if lines or tail:
                self._post(self._log_arrived, gen, lines, tail, tidy_line(tail, secrets) if tail else "")
        finally:
            self._log_busy = False

    def _log_arrived(self, gen: int, lines: list[str], tail_raw: str, tail: str) -> None:
        if gen != self._follow_gen or not self.is_attached:
            return
        if tail_raw:
            self._partial_shown = tail_raw
            lines = [*lines, tail]
        self.log_view.add(lines)
        self._log_shown()

    def _log_shown(self) -> None:
        """Called once new log lines are on view (the panel drops what stood in for them)."""

    def shown_lines(self) -> list[str]:
        """The log lines on view now (all of them, or those matching the search)."""
        return self.log_view.shown_lines()

    def action_search_log(self) -> None:
        field = self.query_one("#srv-search", Input)
        self.log_view.keep_end()
        field.display = True
        field.focus()

    @on(Input.Changed, "#srv-search")
    def _search_changed(self, event: Input.Changed) -> None:
        event.stop()
        self.log_view.search(event.value)

    @on(Input.Submitted, "#srv-search")
    def _search_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.log_view.focus()

    def _clear_search(self) -> None:
        field = self.query_one("#srv-search", Input)
        field.value = ""
        field.display = False
        self.log_view.search("")
        self.log_view.focus()
