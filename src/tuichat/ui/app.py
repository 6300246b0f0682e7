"""The Textual app: one keyboard-driven chat screen that adapts the domain objects to the terminal.

`make_app(AppOptions)` is the factory the CLI and the tests share. The app holds no chat logic of its own:
`tuichat.chat.turns` decides what is sent and what Retry/Undo remove, `tuichat.chat.client` talks HTTP,
`tuichat.chat.store` saves every turn as it happens. Every action has a binding with an id, so `[keys]` in the
config can rebind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import httpx
from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.driver import Driver
from textual.widgets import Footer, Static

from tuichat import __version__
from tuichat.chat.client import ChatClient, ChatError, Delta, Finish, Notice, Usage
from tuichat.chat.sampling import Sampling
from tuichat.chat.sanitize import clean
from tuichat.chat.target import Target, resolve_target
from tuichat.chat.turns import Attachment, ChatSession, Turn
from tuichat.config import Config, load_config, save_config
from tuichat.errors import ConfigError
from tuichat.keymap import BINDINGS as BINDINGS_SPECS
from tuichat.keymap import check_keys, display_key, keys_for
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
from tuichat.ui.keyids import binding, install_key_parser, mouse_holds_escape
from tuichat.ui.screens.dialogs import ChoiceScreen, ConfirmScreen, HelpScreen, QuitScreen
from tuichat.ui.widgets.chat import (
    Conversation,
    PromptArea,
    ReplyMessage,
    SamplingPane,
    StatusLine,
    message_widget,
)
from tuichat.ui.widgets.status_pane import StatusPane, StatusView

if TYPE_CHECKING:
    from tuichat.chat.store import Claim, HeldBy, Store
    from tuichat.server.fleet import FleetPoller, RunningFleet
    from tuichat.server.gpu import GpuReader, GpuSampler
    from tuichat.server.launcher import ManagedServer, ServerManager, ServerStatus

START_TIME = time.perf_counter()  # for the cold-start figure reported at the first frame
WIDE = 140  # from this width the sampling pane shows by default (each visible pane costs layout per frame)
WIDER = 170  # and from this one the status pane too
RESTORE_LIMIT = 20  # turns mounted when a conversation opens (about a screenful); ctrl+t loads more
FLUSH_EVERY = 0.033  # seconds between writes into the live Markdown stream (about 30 a second)
SAVE_EVERY = 0.3  # seconds between saves of a streaming reply


@dataclass
class AppOptions:
    url: str | None = None
    api_key: str | None = None
    model: str | None = None
    profile: str | None = None
    continue_last: bool = False
    conversation_id: int | None = None
    config: Config | None = None
    env: Mapping[str, str] | None = None
    transport: httpx.AsyncBaseTransport | None = None  # tests: httpx.MockTransport
    store_path: Path | None = None
    use_store: bool = True
    watch_server: bool = True  # poll the GPU and /metrics in the background
    gpu_reader: GpuReader | None = None  # tests: tests/fakegpu.py; default NVML
    poll_interval: float = 2.0  # seconds between GPU and /metrics readings
    cursor_blink: bool = True  # snapshot tests turn it off so a blink cannot change the picture
    manager: ServerManager | None = None  # the launcher (tests pass one with its own state dir)
    managed: bool | None = None  # None: decide from the profile / running servers (see make_app)
    fleet: RunningFleet | None = None  # `tuichat FLEET`: chat through its proxy, status per node
    extra: dict[str, Any] = field(default_factory=dict)


class TuichatApp(App[None]):
    """The chat screen plus the panes around it."""

    CSS_PATH = "app.tcss"
    TITLE = "tuichat"
    ENABLE_COMMAND_PALETTE = True

    # Keys, labels and help texts come from tuichat.keymap (the defaults reach tmux, screen and a bare xterm).
    BINDINGS: ClassVar[list[BindingType]] = [
        binding("help"),
        binding("stop"),
        binding("retry"),
        binding("undo"),
        binding("clear"),
        binding("new_chat"),
        binding("copy_reply"),
        binding("copy_code", show=False),
        binding("toggle_sampling", show=False),
        binding("toggle_status", show=False),
        binding("load_earlier", show=False),
        binding("history", show=False),
        binding("server", show=False),
        binding("models", show=False),
        binding("attach_image", show=False),
        binding("clear_attachments", show=False),
        binding("select_previous", show=False),
        binding("select_next", show=False),
        binding("quit"),
    ]

    def __init__(self, options: AppOptions, config: Config, target: Target) -> None:
        super().__init__()
        self.options = options
        self.config = config
        self.target = target
        self.model: str | None = target.model
        self.sampling: Sampling = config.sampling
        self.chat = ChatSession()
        self.conversation_id: int | None = None
        self.store: Store | None = None
        self.claim: Claim | None = None  # we hold conversation_id: no other tuichat may add to it
        self.read_only: HeldBy | None = None  # the chat shown is held by another tuichat: readable, not continued
        self._title = ""  # the open chat's title, which sub_title shows with the read-only mark
        self.client = ChatClient(
            target.url,
            target.api_key,
            stall_timeout=config.ui.stall_timeout,
            connect_timeout=config.ui.connect_timeout,
            transport=options.transport,
        )
        self.streaming = False
        self.pending_attachments: list[Attachment] = []
        self.last_copied: str | None = None
        self.first_frame_s: float | None = None
        self.hidden_turns = 0  # turns of a restored conversation not mounted yet
        self._code_cycle = 0
        self._save_timer: Any = None
        self.status_view = StatusView(context=ContextMeter(None))
        self._gen_rate = RateTracker()
        self._kv_history = History()
        self._rate_history = History()
        self._gpu_sampler: GpuSampler | None = None
        self._next_metrics_at = 0.0
        self._metrics_busy = False
        self._metrics_schedule = MetricsSchedule(options.poll_interval)
        # A profile's server brings its own address and key once it is up: until then nothing is asked of it.
        self._target_known = not (options.managed and options.profile)
        # "unknown" until asked whether the server is an lmdeploy proxy (a fleet), then "yes" or "no"
        self._fleet_state = "yes" if options.fleet is not None else "unknown"
        self._fleet_poller: FleetPoller | None = None
        self._client_generation = 0  # bumped with every new client, so a late answer of the old one is dropped
        self._hung_up = False
        self._replacing: list[Turn] = []
        self.manager: ServerManager | None = options.manager
        self.server: ManagedServer | None = None
        self.profile_name: str | None = options.profile
        self.server_state: ServerStatus | None = None
        self.user_keys: dict[str, str] = {}  # the checked [keys] table
        self._keymap_error: str | None = None
        self._refused: tuple[str, float] = ("", 0.0)
        self.theme = config.ui.theme if config.ui.theme in self.available_themes else "textual-dark"

    # -- layout -----------------------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        with Horizontal(id="body"):
            with Vertical(id="chat-column"):
                yield Conversation(id="conversation")
                yield Static("", id="attachments", markup=False)
                yield PromptArea(id="prompt")
            yield SamplingPane(self.sampling, id="sampling")
            yield StatusPane(id="status")
        yield StatusLine(id="statusline")
        yield Footer()

    def run(self, *, mouse: bool | None = None, **kwargs: Any) -> Any:
        """Run; the mouse is off by default under GNU screen, which holds back a lone Esc for as long as mouse
        reporting is on (waiting for a mouse report that never comes), so Esc would act only with the next key."""
        if mouse is None:
            mouse = not mouse_holds_escape(self.options.env if self.options.env is not None else os.environ)
        return super().run(mouse=mouse, **kwargs)

    def get_driver_class(self) -> type[Driver]:
        install_key_parser()  # Esc + key and Alt + key read as pressed (see ui.keyids)
        return super().get_driver_class()

    def _apply_keymap(self) -> None:
        """The [keys] table, checked again here (a Config may come from elsewhere than load_config): a bad one
        is reported with its file and key, and the default keys stay."""
        if not self.config.keys:
            return
        try:
            self.user_keys = check_keys(self.config.keys, self.config.path)
        except ConfigError as exc:
            self.user_keys = {}
            self._keymap_error = f"{exc}. The default keys are in use."
            return
        self.set_keymap(self.user_keys)
        self.query_one(PromptArea).newline_keys = frozenset(keys_for("newline", self.user_keys))

    def key_name(self, binding_id: str) -> str:
        """The first key of an action as people write it (Ctrl+R, F6), under the user's keymap."""
        keys = keys_for(binding_id, self.user_keys)
        return display_key(keys[0]) if keys else binding_id

    def on_mount(self) -> None:
        self._apply_keymap()
        if not self.options.cursor_blink:
            from textual.widgets import Input, TextArea

            for widget in self.query(Input).results():
                widget.cursor_blink = False
            for area in self.query(TextArea).results():
                area.cursor_blink = False
        self.query_one("#attachments").display = False
        wide = self.size.width >= WIDE
        show = self.config.ui.show_sampling
        self.query_one(SamplingPane).display = wide if show is None else show
        show_status = self.config.ui.show_status
        self.query_one(StatusPane).display = self.size.width >= WIDER if show_status is None else show_status
        if self.options.watch_server:
            self.set_interval(self.options.poll_interval, self._poll_status)
            self.call_after_refresh(self._poll_status)
        status = self.query_one(StatusLine)
        status.set(url=self.target.url, model=self.model or "model: asking server", state="connecting")
        self.query_one(PromptArea).focus()
        self._open_store()
        self._watch_hangup()
        if self.options.managed and self.profile_name:
            self.bring_up_profile(self.profile_name)
        else:
            self.check_server()

    def on_ready(self) -> None:
        if self._keymap_error:
            self.notify(self._keymap_error, severity="error", timeout=15)
        self.first_frame_s = time.perf_counter() - START_TIME
        self.log.info(f"first frame after {self.first_frame_s:.3f} s")

    # -- storage ----------------------------------------------------------------------------------------------

    def _open_store(self) -> None:
        if not self.options.use_store:
            return
        try:
            from tuichat.chat.store import Store, default_path

            self.store = Store.open(self.options.store_path or default_path())
            recovered = self.store.recovered_on_open
        except Exception as exc:  # a broken history must not stop the chat: say so and go on unsaved
            self.store = None
            self.add_note("error", f"history is not being saved: {exc}. Check the data folder's permissions.")
            return
        conv_id = self.options.conversation_id
        if conv_id is None and self.options.continue_last:
            last = self.store.last_conversation()
            conv_id = last.id if last else None
            if last is None:
                self.notify("No saved conversation yet: starting a new one.")
        if conv_id is not None:
            self.call_after_refresh(self.open_conversation, conv_id)
        if recovered:
            self.notify(f"{recovered} reply(ies) cut off by an earlier exit were kept and marked interrupted.")

    async def open_conversation(self, conv_id: int, message_id: int | None = None, read_only: bool = False) -> None:
        """Show a saved chat to continue it. One that another tuichat holds is shown read-only when the user
        chose that in F4; otherwise (--continue, --conversation) the chat stays new and a notice says why."""
        from tuichat.chat.store import HeldBy

        assert self.store is not None
        conv = self.store.get_conversation(conv_id)
        if conv is None:
            self.notify(f"No conversation {conv_id} in the history.", severity="error")
            return
        got = self._hold(conv_id)
        if got is None:
            return  # _save has said what is wrong with the history
        if isinstance(got, HeldBy) and not read_only:
            self.notify(
                f"{got.sentence()} This is a new chat; F4 can show that one read-only.", severity="warning", timeout=15
            )
            return
        if self.claim is not None and self.claim is not got:
            self._let_go()
        self.claim = None if isinstance(got, HeldBy) else got
        self._title = conv.title
        self._mark_read_only(got if isinstance(got, HeldBy) else None)
        if self.read_only is not None:
            self.notify(
                f"{self.read_only.sentence()} It is shown read-only here: nothing you do here changes it.",
                severity="warning",
                timeout=10,
            )
        from tuichat.chat.images import reopened_images_note  # lazy: start-up does not need the image code

        turns = []
        for msg in self.store.messages(conv_id):
            if msg.role == "system":
                continue
            # Saved text may come from an imported file: clean it as if it had just streamed in.
            note = reopened_images_note(msg.images) if msg.role == "user" else None
            if note:  # before its message, so that Retry does not remove it
                turns.append(Turn("notice", note))
            turns.append(Turn(msg.role, clean(msg.content), msg.state, msg.id, stats=msg.stats))
        self.chat = ChatSession(turns)
        self.conversation_id = conv_id
        container = self.query_one(Conversation)
        await container.remove_children()
        shown = turns[-RESTORE_LIMIT:]
        self.hidden_turns = len(turns) - len(shown)
        widgets = [message_widget(t) for t in shown]
        if self.hidden_turns:
            widgets.insert(0, self._earlier_marker())
        await container.mount_all(widgets)
        target = None
        if message_id is not None:
            while self.hidden_turns and not any(t.msg_id == message_id for t in self.chat.turns[self.hidden_turns :]):
                await self.action_load_earlier()
            target = next(
                (w for w in container.children if getattr(getattr(w, "turn", None), "msg_id", -1) == message_id), None
            )
        if target is not None:
            container.release_anchor()
            self.call_after_refresh(container.scroll_to_widget, target, animate=False, top=True)
        else:
            container.scroll_end(animate=False)
        meter = self.status_view.context
        if meter is not None:
            meter.reset()
            meter.estimate_from(t.content for t in self.chat.turns if t.role in ("user", "assistant"))
            self._redraw_status()
            if self._target_known:  # else the count is asked for once the launched server is up
                self.run_worker(self._count_context(), group="encode", exclusive=True, exit_on_error=False)

    async def _count_context(self) -> None:
        """Exact token count of a restored chat from the server's own tokenizer (/v1/encode), when it has one."""
        text = "\n".join(t.content for t in self.chat.turns if t.role in ("user", "assistant"))
        count = await self.client.count_tokens(text)
        meter = self.status_view.context
        if count is not None and meter is not None:
            meter.record_usage(count, 0)
            self._redraw_status()

    def _earlier_marker(self) -> Static:
        text = f"⋯ {self.hidden_turns} earlier messages: {self.key_name('load_earlier')} shows them"
        return Static(Text(text, style="dim"), id="earlier")

    async def action_load_earlier(self) -> None:
        if not self.hidden_turns:
            self.notify("Every message of this chat is shown.")
            return
        container = self.query_one(Conversation)
        marker = self.query("#earlier")
        start = max(0, self.hidden_turns - RESTORE_LIMIT)
        batch = self.chat.turns[start : self.hidden_turns]
        self.hidden_turns = start
        await marker.remove()
        widgets = [message_widget(t) for t in batch]
        if self.hidden_turns:
            widgets.insert(0, self._earlier_marker())
        await container.mount_all(widgets, before=0 if container.children else None)
        if batch:
            # Show what was asked for: the view goes to the first of the messages just loaded.
            container.release_anchor()
            first = widgets[1] if self.hidden_turns else widgets[0]
            self.call_after_refresh(container.scroll_to_widget, first, animate=False, top=True)

    def _hold(self, conv_id: int) -> Claim | HeldBy | None:
        """Claim `conv_id` for this tuichat, or who holds it; None when the history could not be asked."""
        if self.claim is not None and self.claim.conversation_id == conv_id:
            return self.claim
        result: Claim | HeldBy | None = self._save("claim", conv_id)
        return result

    def _let_go(self) -> None:
        """Leave the chat we hold, so another tuichat may continue it."""
        claim, self.claim = self.claim, None
        self._mark_read_only(None)
        if claim is not None:
            try:
                claim.release()
            except Exception as exc:
                self.notify(f"could not save to the history: {exc}", severity="error")

    def _ensure_conversation(self) -> int | None:
        if self.store is None:
            return None
        if self.conversation_id is None:
            server = self.server
            self.conversation_id = self.store.create_conversation(
                model=self.model,
                server_url=self.target.url,
                profile=self.profile_name if server is not None else None,
                lmdeploy_version=server.record.lmdeploy_version if server is not None else None,
                system_prompt=self.sampling.system_prompt or None,
            )
            from tuichat.chat.store import Claim

            got = self._hold(self.conversation_id)
            self.claim = got if isinstance(got, Claim) else None
        return self.conversation_id

    def _save(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call a Store method; a failing disk is reported once per call and never ends the chat."""
        if self.store is None:
            return None
        try:
            return getattr(self.store, method)(*args, **kwargs)
        except Exception as exc:
            self.notify(f"could not save to the history: {exc}", severity="error")
            return None

    # -- server state -----------------------------------------------------------------------------------------

    @work(group="connect", exclusive=True, exit_on_error=False)
    async def check_server(self) -> None:
        status = self.query_one(StatusLine)
        health = await self.client.health()
        if not health.ok:
            status.set(state="unreachable" if health.status is None else f"not ready: {health.status}")
            self.add_note("error", health.message)
            self._explain_missing_local_server()
            return
        if self.model is None:
            try:
                models = await self.client.list_models()
            except ChatError as exc:
                status.set(state=exc.kind)
                self.add_note("error", exc.message)
                return
            if not models:
                status.set(state="no model")
                self.add_note("error", "the server lists no model under /v1/models.")
                return
            if len(models) == 1:
                self.model = models[0]
            else:
                self.model = models[0]
                self.push_screen(ChoiceScreen("Which model?", models), self._model_chosen)
        status.set(state="ready", model=self.model or "")

    def _model_chosen(self, choice: str | None) -> None:
        if choice:
            self.model = choice
            self.query_one(StatusLine).set(model=choice)

    def _explain_missing_local_server(self) -> None:
        """On a machine with no lmdeploy (or no GPU), say plainly what is missing and how to attach elsewhere."""
        if self.target.source != "default":
            return
        import importlib.util

        missing = []
        if importlib.util.find_spec("lmdeploy") is None:
            missing.append('lmdeploy is not installed here (pip install "tuichat[lmdeploy]" on a CUDA machine)')
        try:
            from tuichat.server.gpu import gpus_visible

            ok, reason = gpus_visible()
            if not ok:
                missing.append(reason)
        except Exception:
            pass
        hint = (
            "To use a server elsewhere: tuichat --url http://HOST:23333 --api-key KEY, or forward its port "
            "with ssh -L 23333:127.0.0.1:23333 HOST and keep the default URL."
        )
        text = ("; ".join(missing) + ". " if missing else "") + hint
        self.add_note("notice", text)

    # -- managed servers (launched by tuichat) ----------------------------------------------------------------

    def _manager(self) -> ServerManager:
        if self.manager is None:
            from tuichat.server.launcher import ServerManager

            self.manager = ServerManager()
        return self.manager

    @work(thread=True, group="server", exclusive=True, exit_on_error=False)
    def bring_up_profile(self, name: str) -> None:
        """Attach to the profile's server if tuichat started it earlier, else launch it and wait for ready."""
        from tuichat.errors import TuichatError

        manager = self._manager()
        server = manager.find(name)
        if server is None:
            profile = self.config.profiles.get(name)
            if profile is None:
                self.call_from_thread(self.add_note, "error", f"no profile called '{name}': see `tuichat profiles`.")
                return
            self.call_from_thread(self.query_one(StatusLine).set, state="starting", model=f"profile {name}")
            try:
                for check in manager.preflight(profile):
                    if check.level == "warning":
                        self.call_from_thread(self.notify, check.message, severity="warning", timeout=10)
                server = manager.start(name, profile)
            except Exception as exc:  # TuichatError says what to do; anything else still must not hang here
                text = str(exc) if isinstance(exc, TuichatError) else f"could not start {name}: {exc!r}"
                self.call_from_thread(self.add_note, "error", text)
                self.call_from_thread(self.query_one(StatusLine).set, state="failed")
                return
            self.call_from_thread(
                self.add_note, "notice", f"Starting {name} ({profile.model}); F5 shows its progress and log."
            )
        else:
            self.call_from_thread(self.notify, f"Attached to {name}, which tuichat started earlier (pid {server.pid}).")
        self.call_from_thread(self._adopt_server, name, server)
        status = server.wait_ready(None, lambda st: self.call_from_thread(self._server_status, st), 0.25)
        self.call_from_thread(self._server_status, status)
        if status.state == "ready":
            self.call_from_thread(self._attach_to_server, server)

    def _adopt_server(self, name: str, server: ManagedServer) -> None:
        self.profile_name = name
        self.server = server
        profile = server.profile
        launch: dict[str, Any] = {"profile": name, "backend": profile.backend or "turbomind (default)"}
        if profile.tp:
            launch["tp"] = profile.tp
        launch["cache share"] = profile.cache_max_entry_count if profile.cache_max_entry_count else "0.8 (default)"
        launch["KV quant"] = {0: "off", 4: "int4", 8: "int8"}.get(profile.quant_policy or 0, profile.quant_policy)
        if profile.session_len:
            launch["session_len"] = profile.session_len
            if self.status_view.context is not None:
                self.status_view.context.session_len = profile.session_len
        self.status_view.launch = launch

    def _server_status(self, status: ServerStatus) -> None:
        self.server_state = status
        line = self.query_one(StatusLine)
        if status.state == "starting":
            progress = status.progress
            if progress is not None:
                pct = f" {progress.fraction * 100:.0f}%" if progress.fraction is not None else ""
                line.set(state="starting", last=f"{progress.label}{pct}")
            else:
                line.set(state="starting", last="loading the model")
        elif status.state == "failed":
            line.set(state="failed", last="")
            text = status.message or "the server failed to start"
            if status.last_lines:
                text += "\nlast log lines:\n" + "\n".join(status.last_lines[-6:])
            self.add_note("error", text)
        elif status.state == "stopped":
            line.set(state="stopped", last="")

    def _attach_to_server(self, server: ManagedServer) -> None:
        self.retarget(server.url, server.api_key, server.model_name)
        self.run_worker(self._learn_engine(), group="engine", exit_on_error=False)

    async def _learn_engine(self) -> None:
        info = await self.client.engine_info()
        if info:
            for key in ("block_size", "num_gpu_blocks"):
                if key in info:
                    self.status_view.launch[key.replace("_", " ")] = info[key]
            capacity = kv_capacity_tokens(info)
            if capacity is not None:
                self.status_view.kv_capacity = capacity
            self._redraw_status()

    def retarget(self, url: str, api_key: str | None, model: str | None) -> None:
        """Point the chat at another server (a launched one, or one picked in the server panel)."""
        worker = getattr(self, "_reply_worker", None)
        if self.streaming and worker is not None:
            worker.cancel()
            self.notify(f"The reply was stopped: the chat now talks to {url}.", severity="warning")
        old = self.client
        self.client = ChatClient(
            url,
            api_key,
            stall_timeout=self.config.ui.stall_timeout,
            connect_timeout=self.config.ui.connect_timeout,
            transport=self.options.transport,
        )
        self.target = Target(url, api_key, model, "profile")
        self.model = model
        self._gen_rate.reset()
        self._client_generation += 1
        self._target_known = True
        self._metrics_busy = False
        self._metrics_schedule.attached(time.monotonic())
        self._next_metrics_at = 0.0
        self.status_view.metrics = None
        self.status_view.metrics_error = None
        self.query_one(StatusLine).set(url=url, model=model or "", state="connecting")
        self.run_worker(old.aclose(), exit_on_error=False)
        self.check_server()
        self.call_after_refresh(self._poll_status)  # the pane need not wait a whole interval for real figures
        if self.conversation_id is not None:
            self.run_worker(self._count_context(), group="encode", exclusive=True, exit_on_error=False)

    def _watch_hangup(self) -> None:
        """SSH dropped: leave at once, keeping the server (its record lets the next tuichat re-attach)."""
        import signal

        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._hangup)

    def _hangup(self) -> None:
        self._hung_up = True  # the partial reply is saved as interrupted, not as stopped by the user
        worker = getattr(self, "_reply_worker", None)
        if self.streaming and worker is not None:
            worker.cancel()  # the partial reply is saved, marked stopped
        self.exit(return_code=129)

    # -- conversation display ---------------------------------------------------------------------------------

    def add_note(self, role: str, text: str) -> None:
        turn = self.chat.add(Turn(role, text))
        self.query_one(Conversation).mount(message_widget(turn))

    # -- sending ----------------------------------------------------------------------------------------------

    @on(PromptArea.Submitted)
    def _submitted(self, event: PromptArea.Submitted) -> None:
        self.send(event.text)

    def send(self, text: str) -> bool:
        """Send what the user typed; returns False (and says why) when it cannot go now."""
        prompt = self.query_one(PromptArea)
        stripped = text.strip()
        if stripped == "/image" or stripped.startswith("/image "):
            argument = stripped[len("/image") :].strip()
            if argument == "clear":
                self.action_clear_attachments()
                prompt.text = ""
            else:
                self.run_worker(self.attach_image(argument, typed=text), group="attach")
            return False
        if not stripped and not self.pending_attachments:
            return False
        if self._refuse_while_streaming("send") or self._refuse_before_ready():
            return False
        if self.read_only is not None and not self._continue_read_only():
            return False  # another tuichat holds this chat: only it may add to it
        error = self.query_one(SamplingPane).first_error()
        if error:
            self.notify(f"Fix the sampling pane first: {error}", severity="error")
            return False
        meter = self.status_view.context
        if meter is not None and meter.session_len:
            from tuichat.server.metrics import estimate_tokens

            reserve = self.sampling.max_tokens or 0
            if meter.would_overflow(estimate_tokens(text) + 8, reserve=reserve):
                self.notify(
                    f"This message may not fit: the chat uses ~{meter.used:,} of {meter.session_len:,} tokens. "
                    f"Undo earlier exchanges ({self.key_name('undo')}) or start a new chat "
                    f"({self.key_name('new_chat')}) if the server refuses it.",
                    severity="warning",
                )
        turn = Turn("user", text, attachments=list(self.pending_attachments))
        self.chat.add(turn)
        conv = self._ensure_conversation()
        if conv is not None:
            turn.msg_id = self._save(
                "add_message",
                conv,
                "user",
                text,
                sampling=self.sampling.to_table() or None,
                images=[a.name for a in turn.attachments],
            )
        conversation = self.query_one(Conversation)
        conversation.mount(message_widget(turn))
        conversation.anchor()  # a message sent from up in the history: the view follows it and its reply again
        # Keys typed right after Enter may already be in the prompt: keep them, take out only what was sent.
        prompt.text = prompt.text[len(text) :] if prompt.text.startswith(text) else ""
        self.pending_attachments = []
        self._show_attachments()
        self.start_reply()
        return True

    def start_reply(self, replacing: list[Turn] | None = None) -> None:
        """Start streaming a reply to the history as it stands. `replacing` (from Retry) is the old reply, kept
        hidden until the first new token arrives so that a failed retry loses nothing."""
        self.streaming = True
        self._replacing = list(replacing or [])
        self.refresh_bindings()
        self._reply_worker = self.run_worker(self._reply(), group="reply", exclusive=True, exit_on_error=False)

    def _drop_replaced(self) -> None:
        turns, self._replacing = self._replacing, []
        ids = {id(t) for t in turns}
        for widget in list(self.query_one(Conversation).children):
            if id(getattr(widget, "turn", None)) in ids:
                widget.remove()
        for turn in turns:
            if turn.msg_id is not None:
                self._save("delete_message", turn.msg_id)

    def _restore_replaced(self) -> None:
        turns, self._replacing = self._replacing, []
        if not turns:
            return
        self.chat.turns.extend(turns)
        ids = {id(t) for t in turns}
        for widget in self.query_one(Conversation).children:
            if id(getattr(widget, "turn", None)) in ids:
                widget.display = True

    async def _reply(self) -> None:
        status = self.query_one(StatusLine)
        container = self.query_one(Conversation)
        reply: Turn | None = None
        widget: ReplyMessage | None = None
        started = time.monotonic()
        first_at: float | None = None
        usage: Usage | None = None
        finish: str | None = None
        chunks = 0
        pending: list[str] = []
        last_save = started
        error: ChatError | None = None
        cancelled = False
        conv: int | None = None

        async def flush() -> None:
            # On a timer rather than per chunk: ~20 writes a second keep Markdown cheap, and text that arrives
            # just before a stall is still shown and saved.
            nonlocal last_save
            if widget is not None and pending:
                text = "".join(pending)
                pending.clear()
                await widget.write(text)
            now = time.monotonic()
            if reply is not None and reply.msg_id is not None and now - last_save >= SAVE_EVERY:
                self._save("update_reply", reply.msg_id, reply.content)
                last_save = now

        timer = self.set_interval(FLUSH_EVERY, flush)
        status.set(state="streaming", last="waiting for first token")
        try:
            if self.model is None:
                models = await self.client.list_models()
                if not models:
                    raise ChatError("not_found", "the server lists no model under /v1/models.")
                self.model = models[0]
                status.set(model=self.model)
            messages = self.chat.history(self.sampling.system_prompt)
            reply = self.chat.add(Turn("assistant", "", state="streaming"))
            conv = self._ensure_conversation()
            # Mounted before the request goes out, so the first chunk only has to be written (that is the TTFT).
            widget = ReplyMessage(reply, live=True)
            await container.mount(widget)
            async for event in self.client.stream_chat(self.model, messages, self.sampling):
                if isinstance(event, Delta):
                    if first_at is None:
                        first_at = time.monotonic()
                        await widget.write(event.text)  # the first words go out at once
                        status.set(last="receiving")
                        reply.content += event.text
                        chunks += 1
                        self._drop_replaced()  # new text is here: the reply it replaces can go for good
                        if conv is not None:
                            reply.msg_id = self._save("begin_reply", conv, sampling=self.sampling.to_table())
                            self._save("update_reply", reply.msg_id, reply.content)
                        continue
                    chunks += 1
                    reply.content += event.text
                    pending.append(event.text)
                elif isinstance(event, Finish):
                    finish = event.reason
                elif isinstance(event, Usage):
                    usage = event
                elif isinstance(event, Notice):
                    self.notify(event.text, severity="warning")
        except ChatError as exc:
            error = exc
        except asyncio.CancelledError:
            cancelled = True
        except Exception as exc:  # never a traceback, and never an app stuck in "streaming"
            error = ChatError("protocol", f"the request failed unexpectedly ({type(exc).__name__}: {exc}).")
        finally:
            timer.stop()
        if cancelled:
            state = "interrupted" if self._hung_up else "stopped"
        elif error is not None:
            state = "interrupted" if reply is not None and reply.content else "error"
        elif finish == "abort":
            state = "interrupted"  # the server aborted the request
        else:
            state = "done"
        self._end_reply(reply, widget, state, started, first_at, usage, chunks, finish, error)
        if cancelled:
            raise asyncio.CancelledError

    def _end_reply(
        self,
        reply: Turn | None,
        widget: ReplyMessage | None,
        state: str,
        started: float,
        first_at: float | None,
        usage: Usage | None,
        chunks: int,
        finish: str | None,
        error: ChatError | None,
    ) -> None:
        """Record how the reply ended (synchronously, so a cancelled task still saves), then redraw it."""
        self.streaming = False
        self.refresh_bindings()
        status = self.query_one(StatusLine)
        if reply is None or not reply.content:
            # Nothing came back: drop the empty reply, bring back what a retry had hidden, and put the prompt
            # back when this was a fresh message.
            if widget is not None:
                widget.remove()
            if reply is not None and reply in self.chat.turns:
                self.chat.turns.remove(reply)
            if reply is not None and reply.msg_id is not None:
                self._save("delete_message", reply.msg_id)
            replacing = bool(self._replacing)
            self._restore_replaced()
            if error is not None:
                self._request_failed(error, restore_prompt=not replacing)
            else:
                status.set(state="ready", last="stopped before the first token")
            return
        ended = time.monotonic()
        reply.state = state
        reply.stats = _reply_stats(started, first_at, ended, usage, chunks, finish)
        self.status_view.last_reply = reply.stats
        meter = self.status_view.context
        if meter is not None and usage is not None and usage.prompt_tokens is not None:
            meter.record_usage(usage.prompt_tokens, usage.completion_tokens or 0)
        self._redraw_status()
        if reply.msg_id is not None:
            self._save("finish_reply", reply.msg_id, reply.content, state, stats=reply.stats)
        from tuichat.ui.widgets.chat import stats_text

        line = stats_text(reply.stats)
        if error is not None:
            self.add_note("error", error.message)
            mark = "cut off" if state == "interrupted" else "failed"
            state_word = "ready" if error.kind in ("stall", "in_band") else error.kind
            status.set(state=state_word, last=" · ".join(p for p in (mark, line) if p))
        elif state == "stopped":
            status.set(state="ready", last=" · ".join(p for p in ("stopped", line) if p))
        else:
            status.set(state="ready", last=line)
        if finish == "length":
            self.notify("The reply hit max_tokens (or the session length) and was cut.", severity="warning")
        if widget is not None:
            self.call_later(widget.finish)
        if usage is None and reply.stats.get("completion_tokens") is None:
            self.run_worker(self._count_reply(reply, widget), group="count", exit_on_error=False)

    async def _count_reply(self, reply: Turn, widget: ReplyMessage | None) -> None:
        """No usage chunk came: ask the server's tokenizer (/v1/encode) how many tokens the reply has, so the
        figures under it are tokens, not chunks. Where the server cannot count, the chunk figures stay."""
        from tuichat.server.metrics import reply_stats_from_dict, with_token_count

        count = await self.client.count_tokens(reply.content)
        stats = reply_stats_from_dict(reply.stats or {})
        if count is None or stats is None or reply not in self.chat.turns:
            return
        from dataclasses import asdict

        from tuichat.ui.widgets.chat import stats_text

        before = stats_text(reply.stats)
        counted = asdict(with_token_count(stats, count))
        reply.stats = {**(reply.stats or {}), **{k: _rounded(v) for k, v in counted.items()}}
        if reply is self.chat.last_reply():
            self.status_view.last_reply = reply.stats
            self._redraw_status()
            status = self.query_one(StatusLine)
            if not self.streaming and before and status.last.endswith(before):
                status.set(last=status.last[: -len(before)] + stats_text(reply.stats))
        if reply.msg_id is not None:
            self._save("finish_reply", reply.msg_id, reply.content, reply.state, stats=reply.stats)
        if widget is not None:
            await widget.show_stats()

    def _request_failed(self, error: ChatError, restore_prompt: bool = True) -> None:
        """The request failed before any reply text. A fresh message goes back to the prompt (joined with
        anything typed since, with its images) so nothing typed is lost."""
        last_user = self.chat.last_index("user")
        if restore_prompt and last_user is not None and last_user == len(self.chat.turns) - 1:
            turn = self.chat.turns.pop()
            if turn.msg_id is not None:
                self._save("delete_message", turn.msg_id)
            for widget in self.query_one(Conversation).query(".user"):
                if getattr(widget, "turn", None) is turn:
                    widget.remove()
            self._give_back(turn)
            self._forget_empty_conversation()
        meter = self.status_view.context
        if error.kind == "too_long" and meter is not None and error.detail:
            meter.learn_from_error(error.detail)
            self._redraw_status()
        self.add_note("error", error.message)
        state = {"connect": "unreachable"}.get(error.kind, error.kind)
        self.query_one(StatusLine).set(state=state, last="")

    def _give_back(self, turn: Turn) -> None:
        """Put a message back into the prompt, ahead of whatever was typed since, with its images."""
        prompt = self.query_one(PromptArea)
        typed = prompt.text
        prompt.text = turn.content + ("\n\n" + typed if typed.strip() else "")
        kept = [a for a in self.pending_attachments if a not in turn.attachments]
        self.pending_attachments = turn.attachments + kept
        self._show_attachments()

    def _forget_empty_conversation(self) -> None:
        """A conversation whose only message went back to the prompt should not linger in the history."""
        if self.store is None or self.conversation_id is None:
            return
        if any(t.role in ("user", "assistant") for t in self.chat.turns):
            return
        if not self._save("messages", self.conversation_id):
            self._save("delete", self.conversation_id)
            self.conversation_id = None
            self._title = ""
            self._let_go()  # its claim went with it

    # -- actions ----------------------------------------------------------------------------------------------

    # Every app binding but quit belongs to the chat screen: with another screen on top, its own keys apply.
    CHAT_ACTIONS = frozenset(b.id for b in BINDINGS_SPECS if b.scope == "chat" and b.id != "newline")

    def _mark_read_only(self, held: HeldBy | None) -> None:
        """Say where the user looks (title and the empty prompt) that the chat shown belongs to another tuichat."""
        self.read_only = held
        self.sub_title = self._title + (f" · read-only, open in pid {held.pid}" if held is not None else "")
        prompt = self.query_one(PromptArea)
        prompt.placeholder = f"read-only: another tuichat (pid {held.pid}) has this chat open" if held else ""

    def _continue_read_only(self) -> bool:
        """A read-only chat may be continued once its holder has let go; else say why not (False)."""
        from tuichat.chat.store import Claim

        held = self.read_only
        assert held is not None and self.conversation_id is not None
        got = self._hold(self.conversation_id)
        if isinstance(got, Claim):
            self.claim = got
            self._mark_read_only(None)
            self.notify("The other tuichat has let go of this chat: it continues here.")
            return True
        self.notify(
            f"{(got or held).sentence()} It is read-only here: start a new chat ({self.key_name('new_chat')}), "
            "or quit that tuichat first.",
            severity="warning",
            timeout=10,
        )
        return False

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in self.CHAT_ACTIONS and len(self.screen_stack) > 1:
            return False  # another screen is on top: its own keys apply, the chat's are hidden
        if action == "stop":
            return True if self.streaming or self._selected_turn() is not None else None
        return True

    def _refuse_while_streaming(self, what: str) -> bool:
        """True (after saying so) when a reply is streaming: the key is refused out loud, never typed or lost.
        The same sentence is not repeated while it is still on screen."""
        if not self.streaming:
            return False
        text = f"A reply is still streaming: {self.key_name('stop')} stops it, then {what}."
        now = time.monotonic()
        if self._refused[0] != text or now - self._refused[1] > 3.0:
            self.notify(text, severity="warning", timeout=3)
            self._refused = (text, now)
        return True

    def _refuse_before_ready(self) -> bool:
        """True (after saying so) while the launched server is not up: its address and key are not known yet,
        and nothing goes out without them."""
        if self._target_known:
            return False
        name = self.profile_name or "the server"
        panel = self.key_name("server")
        state = self.server_state.state if self.server_state is not None else "starting"
        if state in ("failed", "stopped"):
            text = f"{name} is not running: start it from the server panel ({panel})."
        else:
            text = f"{name} is still starting ({panel} shows its progress): send once the status line says ready."
        self.notify(text, severity="warning")
        return True

    HELP_TEXT: ClassVar[dict[str, str]] = {b.id: b.help for b in BINDINGS_SPECS if b.help}

    def action_help(self) -> None:
        rows: list[tuple[str, str, str]] = []
        for item in self._bindings_for_help():
            binding_id = item.id or ""
            keys = ", ".join(display_key(k) for k in keys_for(binding_id, self.user_keys))
            text = self.HELP_TEXT.get(binding_id, item.description or item.action)
            rows.append((keys, text, binding_id))
        newline = ", ".join(display_key(k) for k in keys_for("newline", self.user_keys))
        rows += [
            ("Enter", "Send the prompt", "(prompt)"),
            (newline, self.HELP_TEXT["newline"], "newline"),
            ("Ctrl+P", "Command palette: every action", "(textual)"),
            ("Tab, Shift+Tab", "Move focus between prompt, chat and panes", "(textual)"),
        ]
        self.push_screen(HelpScreen(rows))

    def get_system_commands(self, screen: Any) -> Any:
        """The command palette (ctrl+p) offers every action of the chat screen, with its key."""
        yield from super().get_system_commands(screen)
        if screen is not self.screen_stack[0]:
            return
        from functools import partial

        from textual.app import SystemCommand

        for item in self._bindings_for_help():
            if item.id in ("quit", "help") or item.id is None:
                continue
            title = self.HELP_TEXT.get(item.id, item.description)
            yield SystemCommand(title, f"{self.key_name(item.id)} · {item.id}", partial(self.run_action, item.action))

    def _bindings_for_help(self) -> list[Binding]:
        return [b for b in self.BINDINGS if isinstance(b, Binding)]

    async def action_stop(self) -> None:
        worker = getattr(self, "_reply_worker", None)
        if self.streaming and worker is not None:
            worker.cancel()
            # Wait for the reply to end (it saves and redraws at once), so that a key pressed right after Esc,
            # e.g. the retry key, finds the chat ready instead of being refused.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(worker.wait(), timeout=2.0)
        elif self._selected_turn() is not None:
            self.action_clear_selection()

    async def action_retry(self) -> None:
        if self._refuse_while_streaming("retry") or self._refuse_before_ready():
            return
        if self.read_only is not None and not self._continue_read_only():
            return  # another tuichat holds this chat: only it may change it
        if self.chat.last_index("user") is None:
            self.notify("Nothing to retry yet.")
            return
        removed = self.chat.drop_after_last_user()
        ids = {id(t) for t in removed}
        for widget in self.query_one(Conversation).children:
            if id(getattr(widget, "turn", None)) in ids:
                widget.display = False  # hidden, not deleted, until the new reply's first token
        self.start_reply(replacing=removed)

    async def action_undo(self) -> None:
        if self._refuse_while_streaming("undo"):
            return
        if self.read_only is not None and not self._continue_read_only():
            return  # another tuichat holds this chat: only it may change it
        removed = self.chat.undo()
        if not removed:
            self.notify("Nothing to undo.")
            return
        await self._remove_widgets(removed)
        user = next((t for t in removed if t.role == "user"), None)
        if user is not None:
            self._give_back(user)  # like Gradio's Undo: the message comes back for editing
        self.notify("Removed the last exchange.")

    async def _remove_widgets(self, turns: list[Turn]) -> None:
        ids = {id(t) for t in turns}
        for widget in list(self.query_one(Conversation).children):
            if id(getattr(widget, "turn", None)) in ids:
                await widget.remove()
        for turn in turns:
            if turn.msg_id is not None:
                self._save("delete_message", turn.msg_id)

    def action_clear(self) -> None:
        if self._refuse_while_streaming("clear the chat"):
            return
        if self.read_only is not None and not self._continue_read_only():
            return  # another tuichat holds this chat: only it may change it
        count = sum(1 for t in self.chat.turns if t.role in ("user", "assistant"))
        if not count:
            self.run_worker(self._clear_now())
            return

        def answer(yes: bool | None) -> None:
            if yes:
                self.run_worker(self._clear_now())

        self.push_screen(
            ConfirmScreen(f"Clear the {count} messages of this chat? They are deleted from the history."),
            answer,
        )

    async def _clear_now(self) -> None:
        removed = self.chat.clear()
        await self.query_one(Conversation).remove_children()
        for turn in removed:
            if turn.msg_id is not None:
                self._save("delete_message", turn.msg_id)
        self.hidden_turns = 0

    async def action_new_chat(self) -> None:
        if self._refuse_while_streaming("start a new chat"):
            return
        self.chat = ChatSession()
        self.conversation_id = None
        self._title = ""
        self._let_go()
        self.hidden_turns = 0
        await self.query_one(Conversation).remove_children()
        self.query_one(PromptArea).focus()
        self.notify("New chat: the previous one stays in the history.")

    def copy_text(self, text: str, what: str) -> None:
        """Copy with OSC 52, wrapped for tmux/screen, so it reaches the local clipboard over SSH."""
        from tuichat.chat.clipboard import copy_hint, osc52_sequence

        env = self.options.env if self.options.env is not None else os.environ
        try:
            sequence = osc52_sequence(text, env=env)
        except Exception as exc:
            self.notify(str(exc), severity="error")
            return
        self.last_copied = text
        self._clipboard = text
        if self._driver is not None:
            self._driver.write(sequence)
        hint = copy_hint(env)
        self.notify(f"Copied {what} ({len(text)} characters)." + (f" {hint}" if hint else ""))

    def action_copy_reply(self) -> None:
        selected = self._selected_turn()
        if selected is not None:
            self.copy_text(selected.content, f"the selected {'reply' if selected.role == 'assistant' else 'message'}")
            return
        reply = self.chat.last_reply()
        if reply is None or not reply.content:
            self.notify("No reply to copy yet.")
            return
        self.copy_text(reply.content, "the last reply")

    # -- selecting a message (to copy it) ---------------------------------------------------------------------

    def _message_widgets(self) -> list[Any]:
        widgets = []
        for widget in self.query_one(Conversation).children:
            turn = getattr(widget, "turn", None)
            if turn is not None and turn.role in ("user", "assistant"):
                widgets.append(widget)
        return widgets

    def _selected_turn(self) -> Turn | None:
        for widget in self._message_widgets():
            if widget.has_class("selected"):
                turn: Turn = widget.turn
                return turn
        return None

    def _select(self, step: int) -> None:
        widgets = self._message_widgets()
        if not widgets:
            self.notify("No message to select yet.")
            return
        current = next((i for i, w in enumerate(widgets) if w.has_class("selected")), None)
        index = (len(widgets) - 1 if step < 0 else 0) if current is None else current + step
        index = max(0, min(index, len(widgets) - 1))
        for widget in widgets:
            widget.remove_class("selected")
        target = widgets[index]
        target.add_class("selected")
        container = self.query_one(Conversation)
        container.release_anchor()
        container.scroll_to_widget(target, animate=False)

    def action_select_previous(self) -> None:
        self._select(-1)

    def action_select_next(self) -> None:
        self._select(+1)

    def action_clear_selection(self) -> None:
        for widget in self._message_widgets():
            widget.remove_class("selected")
        self.query_one(Conversation).anchor()

    def action_copy_code(self) -> None:
        from tuichat.chat.clipboard import extract_code_blocks

        reply = self.chat.last_reply()
        blocks = extract_code_blocks(reply.content) if reply else []
        if not blocks:
            self.notify("The last reply has no code block.")
            return
        index = self._code_cycle % len(blocks)
        self._code_cycle += 1
        self.copy_text(blocks[index].code, f"code block {index + 1} of {len(blocks)}")

    def action_toggle_sampling(self) -> None:
        pane = self.query_one(SamplingPane)
        pane.display = not pane.display
        if pane.display:
            if self.size.width < WIDER:
                self.query_one(StatusPane).display = False
            pane.query("Input").first().focus()
        else:
            self.query_one(PromptArea).focus()

    def action_toggle_status(self) -> None:
        pane = self.query_one(StatusPane)
        pane.display = not pane.display
        if pane.display:
            pane.show(self.status_view)
            if self.size.width < WIDER:
                self.query_one(SamplingPane).display = False  # one side pane at a time on narrower screens

    # -- status: GPU and /metrics -----------------------------------------------------------------------------

    def _poll_status(self) -> None:
        self._read_gpu()
        if not self._target_known:
            return  # the launched server's address and key come with its ready state: ask nothing before
        if self._fleet_state != "no":
            self._read_fleet()
        if self._fleet_state == "yes":
            return  # a proxy has no /metrics: each node's figures come with the fleet view
        now = time.monotonic()
        if not self._metrics_busy and now >= self._next_metrics_at:
            self._metrics_busy = True
            self.run_worker(self._read_metrics(), group="metrics", exit_on_error=False)

    @work(thread=True, group="gpu", exclusive=True, exit_on_error=False)
    def _read_gpu(self) -> None:
        # NVML calls block (briefly): a thread keeps them off the event loop that draws the stream.
        if self._gpu_sampler is None:
            from tuichat.server.gpu import GpuSampler, NvmlReader

            self._gpu_sampler = GpuSampler(self.options.gpu_reader or NvmlReader())
        snapshot = self._gpu_sampler.sample()
        server = self.server
        if server is not None:
            # The engine and worker processes hold the memory, not the server: count the whole group as ours.
            self.status_view.our_pids = server.pids()
        if snapshot is not None:
            self.call_from_thread(self._gpu_arrived, snapshot)

    @work(thread=True, group="fleet", exclusive=True, exit_on_error=False)
    def _read_fleet(self) -> None:
        # Is the server an lmdeploy proxy? Asked once (in a thread: it is a blocking request); then its node list
        # and each node's own /metrics, with the node keys when tuichat launched the fleet.
        from tuichat.server.fleet import FleetPoller, probe_proxy

        if self._fleet_poller is None:
            fleet = self.options.fleet
            if fleet is not None:
                self._fleet_poller = fleet.poller(supervise=True)
            elif probe_proxy(self.target.url, self.target.api_key):
                self._fleet_poller = FleetPoller(self.target.url, self.target.api_key)
            else:
                self._fleet_state = "no"
                return
            self._fleet_state = "yes"
        view = self._fleet_poller.poll()
        self.call_from_thread(self._fleet_arrived, view)

    def _fleet_arrived(self, view: Any) -> None:
        self.status_view.fleet = view
        self._redraw_status()

    def _gpu_arrived(self, snapshot: Any) -> None:
        self.status_view.gpu = snapshot
        self._redraw_status()

    async def _read_metrics(self) -> None:
        client, generation = self.client, self._client_generation
        try:
            text = await client.metrics_text()
            metrics = parse_metrics(text)
        except Exception as exc:  # ChatError or MetricsError: the schedule says when to try again, and if to say so
            failure: tuple[str, str] | None = (
                "not_metrics" if isinstance(exc, MetricsError) else getattr(exc, "kind", "protocol"),
                getattr(exc, "message", None) or str(exc),
            )
        else:
            failure = None
        finally:
            self._metrics_busy = False
        if generation != self._client_generation:
            return  # asked of the server before the switch: its answer, good or bad, says nothing now
        now = time.monotonic()
        if failure is None:
            self._metrics_schedule.succeeded()
            self._next_metrics_at = now
            self._metrics_arrived(metrics)
        else:
            kind, message = failure
            delay, show = self._metrics_schedule.failed(kind, now)
            self._next_metrics_at = now + delay
            if show:
                self.status_view.metrics = None
                self.status_view.metrics_error = f"server metrics unavailable: {message}"
        self._redraw_status()

    def _metrics_arrived(self, metrics: ServerMetrics) -> None:
        now = time.monotonic()
        self.status_view.metrics = metrics
        self.status_view.metrics_error = None
        if metrics.generation_tokens_total is not None:
            self._gen_rate.add(now, metrics.generation_tokens_total)
            rate = self._gen_rate.rate(window_s=10.0)
            self.status_view.gen_rate = rate
            if rate is not None:
                self._rate_history.append(now, rate)
        if metrics.kv_cache_usage is not None:
            self._kv_history.append(now, metrics.kv_cache_usage * 100)
        self.status_view.kv_history = self._kv_history.values(last_seconds=600, now=now)
        self.status_view.rate_history = self._rate_history.values(last_seconds=600, now=now)

    def _redraw_status(self) -> None:
        view = self.status_view
        pane = self.query_one(StatusPane)
        if pane.display:
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
        self.query_one(StatusLine).set(extra=" · ".join(parts))

    def action_history(self) -> None:
        if self.store is None:
            self.notify("The history is not available (see the message at the top of the chat).", severity="error")
            return
        from tuichat.ui.screens.history import ConversationsScreen, HistoryChoice

        def chosen(choice: HistoryChoice | None) -> None:
            self._check_open_conversation_exists()
            if choice is None:
                return
            if self.streaming:
                self.notify("A reply is still streaming: stop it (Esc) before switching chats.", severity="warning")
                return
            self.run_worker(
                self.open_conversation(choice.conversation_id, choice.message_id, read_only=choice.read_only),
                exit_on_error=False,
            )

        self.push_screen(ConversationsScreen(self.store), chosen)

    def _check_open_conversation_exists(self) -> None:
        """If the chat on screen was deleted from the history, start afresh instead of saving into nothing."""
        if self.store is None or self.conversation_id is None:
            return
        if self._save("get_conversation", self.conversation_id) is None:
            self.conversation_id = None
            self._title = ""
            self._let_go()  # its claim went with it
            self.chat = ChatSession()
            self.hidden_turns = 0
            self.query_one(Conversation).remove_children()
            self.notify("The open chat was deleted; this is a new one.")

    def action_server(self) -> None:
        from tuichat.ui.screens.server import ServerAction, ServerScreen

        name = self.profile_name or self.config.default_profile or next(iter(self.config.profiles), None)
        if name is None:
            self.notify("No launch profile: add one to config.toml (see `tuichat profiles`).", severity="error")
            return

        def done(action: ServerAction | None) -> None:
            if action is None:
                return
            try:
                from tuichat.config import load_config

                self.config = load_config(self.config.path)  # the panel may have saved a profile
            except Exception as exc:
                self.notify(str(exc), severity="error")
            self.profile_name = action.profile_name
            server = action.server
            if server is not None and server is not self.server:
                self._adopt_server(action.profile_name, server)
            if action.kind == "attach" and server is not None:
                self._adopt_server(action.profile_name, server)
                self._attach_to_server(server)
            elif server is None and self.server is not None and not self.server.is_alive():
                self.server = None

        self.push_screen(ServerScreen(self._manager(), self.config, name, self.server), done)

    def action_models(self) -> None:
        from tuichat.ui.screens.models import ModelsResult, ModelsScreen

        def done(result: ModelsResult | None) -> None:
            if result is None or not result.profile_name:
                return
            try:
                from tuichat.config import load_config

                self.config = load_config(self.config.path)  # the picker (or a quantize run) saved a profile
            except Exception as exc:
                self.notify(str(exc), severity="error")
                return
            self.profile_name = result.profile_name
            self.notify(f"Saved profile {result.profile_name}: F5 starts it.")

        self.push_screen(ModelsScreen(self.config, self.options.gpu_reader), done)

    def action_attach_image(self) -> None:
        from tuichat.ui.screens.image_picker import ImagePickerScreen

        def chosen(path: Path | None) -> None:
            if path is not None:
                self.run_worker(self.attach_image(str(path)), group="attach")

        self.push_screen(ImagePickerScreen(), chosen)

    # -- sampling ---------------------------------------------------------------------------------------------

    @on(SamplingPane.Changed)
    def _sampling_changed(self, event: SamplingPane.Changed) -> None:
        self.sampling = event.sampling
        if self._save_timer is not None:
            self._save_timer.stop()
        # Saving on every keystroke would rewrite the file per digit: wait until typing pauses.
        self._save_timer = self.set_timer(0.8, self._persist_sampling)

    def _persist_sampling(self) -> None:
        try:
            self.config = replace(self.config, sampling=self.sampling)
            save_config(self.config)
        except Exception as exc:
            self.notify(f"could not save the sampling values: {exc}", severity="error")

    # -- images -----------------------------------------------------------------------------------------------

    async def attach_image(self, path_text: str, typed: str | None = None) -> None:
        """Attach an image; `typed` is the /image command to clear from the prompt once it worked."""
        if not path_text:
            self.notify("Usage: /image PATH (or /image clear)", severity="warning")
            return
        try:
            from tuichat.chat.images import prepare_attachment

            # An image too big for what is left of the session is shrunk until the request fits (the tutorial's
            # llava step got empty replies instead); the note says what was sent.
            meter = self.status_view.context
            prepared = await asyncio.to_thread(
                prepare_attachment,
                Path(path_text).expanduser(),
                self.config.ui.max_image_side,
                model=self.server.profile.model if self.server is not None else self.model,
                session_len=meter.session_len if meter is not None else None,
                used_tokens=meter.used if meter is not None else 0,
                pending=list(self.pending_attachments),
            )
        except Exception as exc:
            self.notify(str(exc), severity="error")
            return
        if prepared.note:
            self.add_note("notice", prepared.note)
        self.pending_attachments.append(prepared.attachment)
        self._show_attachments()
        prompt = self.query_one(PromptArea)
        if typed is not None and prompt.text == typed:
            prompt.text = ""

    def _show_attachments(self) -> None:
        bar = self.query_one("#attachments", Static)
        if not self.pending_attachments:
            bar.display = False
            return
        text = Text("Attached: ", style="bold")
        for att in self.pending_attachments:
            text.append(f"[🖼 {att.label()}] ", style="cyan")
        text.append("· shift+f8 or /image clear removes", style="dim")
        bar.update(text)
        bar.display = True

    def action_clear_attachments(self) -> None:
        if not self.pending_attachments:
            self.notify("No image is attached.")
            return
        count = len(self.pending_attachments)
        self.pending_attachments = []
        self._show_attachments()
        self.notify(f"Removed {count} image(s) from the next message.")

    # -- quitting ---------------------------------------------------------------------------------------------

    async def action_quit(self) -> None:
        """Quit; a server tuichat launched is stopped or kept as ui.on_quit says (ask, stop, keep)."""
        server = self.server
        if server is None or not server.is_alive():
            self.exit()
            return
        choice = self.config.ui.on_quit
        if choice == "keep":
            self.exit()
        elif choice == "stop":
            await self._stop_and_exit(server)
        else:

            def answer(result: tuple[str, bool] | None) -> None:
                if result is None:
                    return
                what, remember = result
                if remember:
                    self.config = replace(self.config, ui=replace(self.config.ui, on_quit=what))
                    try:
                        save_config(self.config)
                    except Exception as exc:
                        self.notify(f"could not save ui.on_quit: {exc}", severity="error")
                if what == "stop":
                    self.run_worker(self._stop_and_exit(server), exit_on_error=False)
                else:
                    self.exit()

            self.push_screen(QuitScreen(server.name, server.url), answer)

    async def _stop_and_exit(self, server: ManagedServer) -> None:
        worker = getattr(self, "_reply_worker", None)
        if self.streaming and worker is not None:
            worker.cancel()  # close our own streams first: the server waits for open ones before it stops
        self.query_one(StatusLine).set(state="stopping", last=f"stopping {server.name}…")
        manager = self._manager()
        result = await asyncio.to_thread(manager.stop, server)
        if result.survivors:
            self.notify(f"{len(result.survivors)} process(es) of {server.name} survived the stop.", severity="error")
        self.exit()

    async def on_unmount(self) -> None:
        await self.client.aclose()
        if self._fleet_poller is not None:
            self._fleet_poller.close()
        if self.manager is not None:
            self.manager.close()
        if self.store is not None:
            self.store.close()


def _reply_stats(
    started: float, first_at: float | None, ended: float, usage: Usage | None, chunks: int, finish: str | None
) -> dict[str, Any]:
    """The stats saved with a reply and shown under it: the conversation engine's, so both save the same."""
    from tuichat.chat.conversation import reply_stats  # lazy: start-up does not need it

    return reply_stats(started, first_at, ended, usage, chunks, finish)


def _rounded(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


def make_app(options: AppOptions | None = None) -> TuichatApp:
    """Build the app from options (CLI flags), the config file and the environment."""
    options = options or AppOptions()
    config = options.config or load_config()
    env = options.env if options.env is not None else os.environ
    if options.managed is None:
        options.managed = _choose_managed(options, config, env)
    target = resolve_target(config, env, options.url, options.api_key, options.model)
    return TuichatApp(options, config, target)


def _choose_managed(options: AppOptions, config: Config, env: Mapping[str, str]) -> bool:
    """Decide whether the app drives a server tuichat launches (True) or attaches to a URL (False).

    A profile on the command line wins; an explicit URL (flag or OPENAI_BASE_URL) means attach; otherwise a
    server tuichat launched earlier and still running is re-attached (the SSH-drop case), then the config's
    default_profile is launched; with none of these, the default URL is tried.
    """
    from tuichat.errors import TuichatError

    if options.profile and options.profile in config.fleets:
        from tuichat.server.fleet import find_fleet
        from tuichat.server.launcher import ServerManager

        options.manager = options.manager or ServerManager()
        fleet = find_fleet(options.manager, options.profile)
        if fleet is None or fleet.url is None:
            raise TuichatError(
                f"fleet '{options.profile}' is not running: start it with `tuichat serve {options.profile} --detach`, "
                "then run `tuichat " + options.profile + "` again"
            )
        options.fleet, options.url, options.api_key = fleet, fleet.url, fleet.api_key
        options.profile = None
        return False
    if options.profile:
        if options.profile not in config.profiles:
            known = ", ".join(sorted(config.profiles))
            raise TuichatError(f"no profile called '{options.profile}' (known: {known}); see `tuichat profiles`")
        return True
    if options.url or env.get("OPENAI_BASE_URL"):
        return False
    from tuichat.server.launcher import ServerManager

    manager = options.manager or ServerManager()
    options.manager = manager
    running = {s.name: s for s in manager.running()}
    if running:
        pick = (
            config.default_profile
            if config.default_profile in running
            else max(running, key=lambda n: running[n].record.started_at)
        )
        options.profile = pick
        return True
    if config.default_profile:
        options.profile = config.default_profile
        return True
    return False


__all__ = ["AppOptions", "TuichatApp", "__version__", "make_app"]
