"""The server panel: one profile's key settings, its server's state, start / stop / restart, and its log.

Everything that can block runs in thread workers: `ManagedServer.poll()` probes /health (up to half a second),
starting runs the preflight checks and spawns, stopping waits for the process group to end. A 0.5 s timer
reads the new bytes of the log (`LogFollower`, shown in a `LogView`) and polls the state, every tick while the
server starts or stops and every 2 s otherwise. Log lines are shown as plain text: tqdm's carriage-return
redraws are collapsed to their last state, control sequences are removed and the API key is masked, as everywhere
in the launcher.

The screen dismisses with a `ServerAction`: "attach" (point the chat at this server) or "back", each with the
profile and the server as they are now, so the app can tell what changed while it was open.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widgets import Input, Label, ProgressBar, Static

from tuichat.config import Config, load_config
from tuichat.durations import format_duration
from tuichat.errors import TuichatError
from tuichat.server.launch import Checked, LaunchEvent, launch
from tuichat.server.launcher import ManagedServer, PreflightFailed, Progress, ServerManager, ServerStatus, State
from tuichat.server.procgroup import StopResult
from tuichat.server.profiles import BUILTIN_PROFILES, Profile
from tuichat.ui.screens.dialogs import ChoiceScreen
from tuichat.ui.screens.profile_editor import ProfileEditorScreen
from tuichat.ui.screens.server_log import ServerLog
from tuichat.ui.screens.server_log import tidy_line as tidy_line
from tuichat.ui.widgets.key_footer import KeyFooter
from tuichat.ui.widgets.log_view import LogView

TICK = 0.5  # seconds between log reads, and between state polls while starting or stopping
SLOW_POLL = 2.0  # seconds between state polls of a ready or stopped server
LOG_KEEP = 2000  # lines kept for the view and its search
ALIVE = ("starting", "ready", "stopping")
Busy = Literal["starting", "stopping"]  # an action worker is starting or stopping the server
Shown = State | Literal["checking"]  # what the panel shows: a server state, or "checking" before the first poll
Level = Literal["error", "warning", "hint", "info"]  # of a sentence under the state
MARKS: dict[Shown, tuple[str, str]] = {
    "checking": ("…", "dim"),
    "stopped": ("■", "dim"),
    "starting": ("◐", "yellow"),
    "ready": ("●", "green"),
    "failed": ("✖", "red"),
    "stopping": ("◌", "yellow"),
}
_COUNTS = re.compile(r"\|\s*(\d+)/(\d+)")


@dataclass(frozen=True)
class ServerAction:
    """What the server panel hands back: attach the chat to `server`, or just back (to what is current now).

    `config` is the reloaded config when a profile was created or edited on the panel, else None.
    """

    kind: Literal["attach", "back"]
    profile_name: str
    server: ManagedServer | None
    config: Config | None = None


def progress_label(progress: Progress) -> str:
    """`Loading weights from safetensors 3/5`: tqdm's label and its step count, when the bar shows one."""
    found = _COUNTS.search(progress.text)
    return f"{progress.label} {found.group(1)}/{found.group(2)}" if found else progress.label


def settings_renderable(name: str, profile: Profile | None) -> RenderableType:
    if profile is None:
        return Text(f"No profile called {name}: press p to pick one or n to create one.", style="yellow")
    table = Table.grid(padding=(0, 1))
    table.add_column(style="dim", no_wrap=True)
    table.add_column(overflow="fold")
    unset = Text("default", style="dim")

    def row(key: str, value: object) -> None:
        table.add_row(key, unset if value is None else Text(str(value)))

    row("model", profile.model)
    row("backend", profile.backend)
    row("model_format", profile.model_format)
    row("tp", profile.tp)
    row("session_len", profile.session_len)
    row("cache_max_entry_count", profile.cache_max_entry_count)
    row("quant_policy", profile.quant_policy)
    row("port", profile.port)
    return table


class ServerScreen(ServerLog[ServerAction | None]):
    """Start, watch and stop the server of one profile; switch or edit profiles; read and search its log."""

    CSS_PATH = str(Path(__file__).with_name("server.tcss"))  # absolute: a subclass elsewhere finds it too

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("s", "start", "Start", id="server_start"),
        Binding("x", "stop", "Stop", id="server_stop"),
        Binding("r", "restart", "Restart", id="server_restart"),
        Binding("p", "switch_profile", "Profile", id="server_switch_profile"),
        Binding("e", "edit_profile", "Edit", id="server_edit_profile"),
        Binding("n", "new_profile", "New", id="server_new_profile"),
        Binding("slash", "search_log", "Search", id="server_search_log"),
        Binding("a", "attach", "Attach", id="server_attach"),
        Binding("escape", "back", "Back", id="server_back"),
    ]

    def __init__(self, manager: ServerManager, config: Config, profile_name: str, server: ManagedServer | None) -> None:
        super().__init__()
        self.manager = manager
        self.config = config
        self.profile_name = profile_name
        self.server = server
        self.status: ServerStatus | None = None  # None until the first poll says
        self.gpu_bytes: int | None = None
        self.busy: Busy | None = None  # while an action worker runs
        self.messages: list[tuple[Level, str]] = []  # (level, sentence) under the state
        self._tail_in_messages: list[tuple[Level, str]] = []  # log lines shown as messages until the log has them
        self.config_changed = False
        self._poll_busy = False
        self._next_poll = 0.0

    # -- layout -----------------------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Label("", id="srv-title")
        with Horizontal(id="srv-top"):
            yield Static("", id="srv-settings")
            with Vertical(id="srv-state-box"):
                yield Static("", id="srv-state")
                yield ProgressBar(total=1.0, show_eta=False, id="srv-progress")
                yield Static("", id="srv-details")
        yield Static("", id="srv-message")
        yield Input(placeholder="search the log · Enter keeps it · Esc clears", id="srv-search", compact=True)
        yield LogView(keep=LOG_KEEP, id="srv-log")
        yield KeyFooter(compact=True, show_command_palette=False)  # every key of the panel fits 80 columns

    def on_mount(self) -> None:
        self._follow(self._log_path(), from_start=False)
        self._draw()
        self.log_view.focus()
        self.set_interval(TICK, self._tick)
        self._tick()

    @property
    def state(self) -> Shown:
        """What the panel shows: a server state, or "checking" before the first poll answered."""
        if self.busy is not None:
            return self.busy
        return self.status.state if self.status is not None else "checking"

    @property
    def alive(self) -> bool:
        return self.server is not None and self.status is not None and self.status.state in ALIVE

    def _source(self) -> str:
        name = self.profile_name
        if name in self.config.user_profiles:
            return "your profile (in place of the built-in)" if name in BUILTIN_PROFILES else "your profile"
        return "built-in profile" if name in BUILTIN_PROFILES else ""

    # -- drawing ----------------------------------------------------------------------------------------------

    def _draw(self) -> None:
        if not self.is_attached:
            return
        self.log_view.keep_end()  # the log shrinks when messages appear
        title = Text(f"Server · {self.profile_name}")
        source = self._source()
        if source:
            title.append(f"  ({source})", style="dim")
        self.query_one("#srv-title", Label).update(title)
        self.query_one("#srv-settings", Static).update(settings_renderable(self.profile_name, self.profile))
        self._draw_state()
        self._draw_messages()

    def _draw_state(self) -> None:
        state = self.state
        mark, style = MARKS.get(state, ("?", ""))
        line = Text.assemble((f"{mark} ", style), (state, f"bold {style}"))
        status = self.status
        server = self.server
        details: list[Text] = []
        bar = self.query_one("#srv-progress", ProgressBar)
        show_bar = False
        if state == "ready" and server is not None:
            line.append(f"  {server.url}")
            details.append(Text(f"pid {server.pid} · up {format_duration(server.uptime)}"))
            details.append(Text(f"serves {server.model_name}", style="dim"))
            if self.gpu_bytes:  # 0 also when NVML cannot see processes (containers): say nothing then
                from tuichat.server.gpu import format_bytes

                details.append(Text(f"GPU memory {format_bytes(self.gpu_bytes)}"))
            if status is not None and status.message:
                details.append(Text(status.message, style="yellow"))
            details.append(Text("a attaches the chat", style="dim"))
        elif state == "starting":
            progress = status.progress if status is not None and status.state == "starting" else None
            show_bar = server is not None
            if progress is not None:
                bar.update(total=1.0 if progress.fraction is not None else None, progress=progress.fraction or 0)
                details.append(Text(progress_label(progress)))
            else:
                bar.update(total=None)
                details.append(Text("checking the profile…" if server is None else "waiting for the first log lines…"))
            if server is not None:
                details.append(Text(f"pid {server.pid} · {server.url}", style="dim"))
        elif state == "stopping":
            line.append("…", style=style)
            if server is not None:
                details.append(Text(f"pid {server.pid}", style="dim"))
        elif state == "failed":
            if status is not None and status.exit_code is not None:
                line.append(f" · exit code {status.exit_code}", style=style)
            details.append(Text("s starts it again", style="dim"))
        elif state == "stopped":
            details.append(Text("s starts it", style="dim"))
        bar.display = show_bar
        self.query_one("#srv-state", Static).update(line)
        self.query_one("#srv-details", Static).update(Group(*details) if details else "")

    def _draw_messages(self) -> None:
        box = self.query_one("#srv-message", Static)
        styles = {"error": "red", "warning": "yellow", "hint": "yellow", "info": ""}
        text = Text()
        for n, (level, sentence) in enumerate(self.messages):
            if n:
                text.append("\n")
            prefix = {"error": "✖ ", "warning": "⚠ ", "hint": "→ "}.get(level, "")
            text.append(prefix + sentence, style=styles.get(level, ""))
        box.update(text)
        box.display = bool(self.messages)

    def say(self, *messages: tuple[Level, str], keep: bool = False) -> None:
        """Show sentences under the state (level: error, warning, hint or info); replaces the earlier ones."""
        self.messages = [*self.messages, *messages] if keep else list(messages)
        self._draw()

    # -- timers and workers -----------------------------------------------------------------------------------

    def _tick(self) -> None:
        if not self._log_busy and self._follower is not None:
            self._log_busy = True
            ended = self.server is None and self.busy is None and self.state in ("failed", "stopped")
            self._read_log(self._follower, self._follow_gen, self._secrets, ended)
        fast = self.busy is not None or self.state in ("starting", "stopping", "checking")
        if not self._poll_busy and time.monotonic() >= self._next_poll:
            if self.server is None and self.busy is not None:
                return  # a start is under way: it hands over its server when spawned
            self._poll_busy = True
            self._next_poll = time.monotonic() + (TICK if fast else SLOW_POLL)
            self._poll(self.server, self.profile_name)

    @work(thread=True, group="server-poll", exit_on_error=False)
    def _poll(self, server: ManagedServer | None, name: str) -> None:
        try:
            if server is None:
                # a server of this profile may have been launched earlier, or by `tuichat serve`
                self._post(self._found, name, self.manager.find(name))
                return
            status = server.poll()
            gpu = server.gpu_memory() if status.state == "ready" else None
            self._post(self._polled, server, status, gpu)
        finally:
            self._poll_busy = False

    def _found(self, name: str, server: ManagedServer | None) -> None:
        if name != self.profile_name or self.busy is not None or self.server is not None:
            return
        if server is None:
            if self.status is None or self.status.state in ALIVE:
                self.status = ServerStatus("stopped")
                self._draw()
            return
        self.server = server
        self.status = None
        self._next_poll = 0.0
        # read the log again: the lines shown so far were masked without this server's (random) key
        self._follow(server.log_path, from_start=False)
        self._draw()

    def _polled(self, server: ManagedServer, status: ServerStatus, gpu: int | None) -> None:
        if server is not self.server:
            return  # switched profile or restarted meanwhile
        before = self.status.state if self.status is not None else None
        self.status = status
        self.gpu_bytes = gpu
        if status.state == "failed" and before != "failed":
            self._show_failure(status)
        if status.state in ("failed", "stopped"):
            self.server = None  # gone: later polls look for a new launch of this profile
            self._next_poll = time.monotonic() + SLOW_POLL
        elif status.state in ("starting", "stopping"):
            self._next_poll = min(self._next_poll, time.monotonic() + TICK)
        self._draw()

    def _show_failure(self, status: ServerStatus) -> None:
        message = status.message or f"The server for {self.profile_name} exited."
        hint = status.hint
        if hint and hint in message:
            message = message.replace(hint, "").strip()
        found: list[tuple[Level, str]] = [("error", message)]
        if hint:
            found.append(("hint", hint))
        if status.last_lines and not self.lines:
            # no log shown yet (not read yet, or it cannot be read): the launcher's own tail says what happened
            self._tail_in_messages = [("info", line) for line in status.last_lines[-4:]]
            found += self._tail_in_messages
        self.say(*found)

    def _log_shown(self) -> None:
        # the log view now shows what the launcher's tail stood in for: say it once, not twice (a fast exit
        # is often polled before the log's first read)
        tail, self._tail_in_messages = self._tail_in_messages, []
        if tail and all(line in self.messages for line in tail):  # (not replaced by other messages since)
            self.say(*[m for m in self.messages if m not in tail])

    # -- start, stop, restart ---------------------------------------------------------------------------------

    def action_start(self) -> None:
        if self.busy is not None:
            self.say(("info", f"Wait: the server is {self.busy}."))
            return
        if self.alive:
            self.say(("info", f"{self.profile_name} is already {self.state}: r restarts it, x stops it."))
            return
        profile = self.profile
        if profile is None:
            self.say(("error", f"There is no profile called {self.profile_name}: press p to pick one."))
            return
        self._begin("starting")
        self._launch(self.profile_name, profile, None)

    def action_restart(self) -> None:
        if self.busy is not None:
            self.say(("info", f"Wait: the server is {self.busy}."))
            return
        profile = self.profile
        if profile is None:
            self.say(("error", f"There is no profile called {self.profile_name}: press p to pick one."))
            return
        if not self.alive:
            self._begin("starting")
            self._launch(self.profile_name, profile, None)
            return
        self._begin("stopping")
        self._launch(self.profile_name, profile, self.server)

    def action_stop(self) -> None:
        if self.busy is not None:
            self.say(("info", f"Wait: the server is {self.busy}."))
            return
        if not self.alive or self.server is None:
            self.say(("info", f"{self.profile_name} is not running: s starts it."))
            return
        self._begin("stopping")
        self._stop(self.server)

    def _begin(self, what: Busy) -> None:
        self.busy = what
        self.messages = []
        self._draw()

    @work(thread=True, group="server-action", exit_on_error=False)
    def _launch(self, name: str, profile: Profile, old: ManagedServer | None) -> None:
        found: list[tuple[Level, str]] = []
        try:
            if old is not None:
                result = self.manager.stop(old)
                self._post(self._stopped, old, result, True)
                if result.survivors:
                    return
            launched = launch(self.manager, name, profile, lambda event: self._note_event(event, found), wait=False)
        except PreflightFailed as failed:
            found = [(c.level, c.message) for c in failed.checks]
            found += [("hint", f"Run `{c.fix}` in a shell first.") for c in failed.checks if c.fix is not None]
            found.append(("info", f"{name} was not started: fix the profile (e edits it), then press s."))
            self._post(self._not_started, found)
            return
        except TuichatError as exc:
            self._post(self._not_started, [("error", str(exc))])
            return
        except OSError as exc:
            self._post(self._not_started, [("error", f"Cannot start {name}: {exc.strerror or exc}.")])
            return
        except Exception as exc:  # a sentence, never a traceback
            self._post(self._not_started, [("error", f"Cannot start {name}: {exc}.")])
            return
        self._post(self._started, name, launched.server, found)

    @staticmethod
    def _note_event(event: LaunchEvent, found: list[tuple[Level, str]]) -> None:
        # the start-up itself is followed by the panel's own timer, beside its log: only the warnings matter here
        if isinstance(event, Checked):
            found += [(c.level, c.message) for c in event.checks]

    def _not_started(self, messages: list[tuple[Level, str]]) -> None:
        self.busy = None
        if self.status is None or self.status.state in ALIVE:
            self.status = ServerStatus("stopped")
        self.say(*messages, keep=True)
        self._draw()

    def _started(self, name: str, server: ManagedServer, warnings: list[tuple[Level, str]]) -> None:
        self.busy = None
        if name != self.profile_name:
            self.app.notify(f"{name} is starting in the background (p switches back to it).")
            return
        self.server = server
        self.status = ServerStatus("starting")
        self.gpu_bytes = None
        self._follow(server.log_path, from_start=True)
        self.say(*warnings, keep=True)
        self._next_poll = 0.0
        self._draw()

    @work(thread=True, group="server-action", exit_on_error=False)
    def _stop(self, server: ManagedServer) -> None:
        try:
            result = self.manager.stop(server)
        except Exception as exc:  # a sentence, never a traceback
            self._post(self._stop_failed, server, f"Stopping {server.name} failed: {exc}. Try x again.")
            return
        self._post(self._stopped, server, result, False)

    def _stop_failed(self, server: ManagedServer, message: str) -> None:
        self.busy = None
        self.say(("error", message))
        self._draw()

    def _stopped(self, server: ManagedServer, result: StopResult, restarting: bool) -> None:
        level: Level = "info" if result.clean else "error"
        sentence = result.describe(server.name)
        if restarting and not result.survivors:
            self.busy = "starting"
            sentence += " Starting it again…"
        else:
            self.busy = None
        if server is self.server:
            self.status = server.poll() if not result.survivors else self.status
            if not result.survivors:
                self.server = None
        self.say((level, sentence), keep=True)
        self._next_poll = 0.0
        self._draw()

    # -- profiles ---------------------------------------------------------------------------------------------

    def action_switch_profile(self) -> None:
        names = sorted(self.config.profiles)
        hints = {name: profile.model for name, profile in self.config.profiles.items()}
        self.app.push_screen(ChoiceScreen("Which profile?", names, hints), self._switched)

    def _switched(self, name: str | None) -> None:
        if name is None or name == self.profile_name:
            return
        self.switch_to(name)

    def switch_to(self, name: str) -> None:
        """Show profile `name`: its running server if there is one (found by the next poll), else its last log."""
        before, running = self.profile_name, self.alive
        self.profile_name = name
        self.server = None
        self.status = None
        self.gpu_bytes = None
        self.messages = []
        if running:
            self.say(("info", f"{before} keeps running: p switches back to it."))
        self._follow(self._log_path(), from_start=False)
        self._next_poll = 0.0
        self._draw()
        self._tick()

    def action_edit_profile(self) -> None:
        self.app.push_screen(ProfileEditorScreen(self.config, self.profile_name), self._edited)

    def action_new_profile(self) -> None:
        self.app.push_screen(ProfileEditorScreen(self.config, None), self._edited)

    def _edited(self, name: str | None) -> None:
        if name is None:
            return
        try:
            self.config = load_config(self.config.path)
        except TuichatError as exc:
            self.say(("error", f"{exc}"))
            return
        self.config_changed = True
        if name != self.profile_name:
            self.switch_to(name)
            return
        if self.alive:
            self.say(
                ("info", "Saved. The running server still uses the old settings: r restarts it with the new ones.")
            )
        self._draw()

    # -- leaving ----------------------------------------------------------------------------------------------

    def action_attach(self) -> None:
        if self.server is None or self.status is None or self.status.state != "ready":
            what = "is still starting: wait until it is ready" if self.state == "starting" else "is not running"
            self.say(("info", f"{self.profile_name} {what} (s starts it), then press a to chat with it."))
            return
        self.dismiss(ServerAction("attach", self.profile_name, self.server, self._config_if_changed()))

    def action_back(self) -> None:
        if self.query_one("#srv-search", Input).display:
            self._clear_search()
            return
        server = self.server if self.alive else None
        self.dismiss(ServerAction("back", self.profile_name, server, self._config_if_changed()))

    def _config_if_changed(self) -> Config | None:
        return self.config if self.config_changed else None
