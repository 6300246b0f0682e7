"""The Textual app: the factory, screen routing, quitting and SIGHUP; the chat itself is `ui.screens.chat`.

`make_app(AppOptions)` is the factory the CLI and the tests share. The app holds what outlives a screen: the
config and keymap, the history store, the server tuichat launched (`ui.server_link`) and the status readings
(`ui.status_watch`). The chat screen is the default screen; its engine (`tuichat.chat.conversation`) owns every
reply-state rule. Every action has a binding with an id, so `[keys]` in the config can rebind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import time
from collections.abc import Iterable
from dataclasses import replace
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

from textual import events
from textual.app import App, SystemCommand
from textual.binding import BindingType
from textual.driver import Driver
from textual.screen import Screen

from tuichat import __version__
from tuichat.chat.client import ChatClient
from tuichat.chat.client import warm_up as warm_up_client
from tuichat.chat.sampling import Sampling
from tuichat.chat.target import Target, resolve_target
from tuichat.chat.turns import Attachment, ChatSession
from tuichat.config import Config, load_config, save_config
from tuichat.errors import ConfigError
from tuichat.keymap import check_keys, display_key, keys_for
from tuichat.ui.app_options import AppOptions, choose_managed
from tuichat.ui.keyids import install_key_parser, mouse_holds_escape, screen_bindings
from tuichat.ui.screens.chat import ChatScreen
from tuichat.ui.server_link import ServerLink
from tuichat.ui.widgets.reply_message import warm_up_markdown

if TYPE_CHECKING:
    from tuichat.chat.store import Store
    from tuichat.server.launcher import ManagedServer
    from tuichat.ui.render_cache import RenderCache
    from tuichat.ui.status_view import StatusView
    from tuichat.ui.status_watch import StatusWatch

CACHE_FLUSH_S = 1.0  # newly drawn replies are written to the render cache this long after the first of them
GC_PAUSE_LIMIT_S = 5.0  # the collector comes back on by then even if the first screen (a saved chat) is slow
START_TIME = time.perf_counter()  # for the cold-start figure reported at the first frame


class TuichatApp(App[None]):
    """The chat screen (the default screen) plus what every screen shares."""

    CSS_PATH = ["app.tcss", "widgets/messages.tcss", "screens/chat.tcss"]  # chat.tcss says why it is here
    TITLE = "tuichat"
    ENABLE_COMMAND_PALETTE = True
    BINDINGS: ClassVar[list[BindingType]] = screen_bindings("app")  # quit: on every screen

    def __init__(self, options: AppOptions, config: Config, target: Target) -> None:
        super().__init__()
        self.options = options
        self.config = config
        self.target = target
        self.store: Store | None = None
        self.render_cache: RenderCache | None = None  # finished replies' drawn rows, with the history
        self.last_copied: str | None = None
        self.first_frame_s: float | None = None
        self.user_keys: dict[str, str] = {}  # the checked [keys] table
        self._keymap_error: str | None = None
        self._hung_up = False
        self._save_timer: Any = None
        self.first_screen_out = False  # first_screen_shown has run: background work may start
        self._history_opened = False  # open_history has run (the store may still be None: no history, or broken)
        self._freeze_after_warm_up = False  # the CLI paused the collector for start-up (see resume_gc)
        self.server_link = ServerLink(self)
        self.chat_screen = ChatScreen(self, self.new_client(target.url, target.api_key))
        self.theme = config.ui.theme if config.ui.theme in self.available_themes else "textual-dark"

    @cached_property
    def status(self) -> StatusWatch:
        """The status readings. Made on first use, after the first frame: their modules (metrics parsing, the
        fleet ledger, the pane's view: ~8 ms of imports and dataclasses) are not what the first frame waits for."""
        from tuichat.ui.status_watch import StatusWatch

        return StatusWatch(self)

    def get_default_screen(self) -> Screen[Any]:
        return self.chat_screen

    def new_client(self, url: str, api_key: str | None) -> ChatClient:
        ui = self.config.ui
        return ChatClient(
            url,
            api_key,
            stall_timeout=ui.stall_timeout,
            connect_timeout=ui.connect_timeout,
            transport=self.options.transport,
        )

    # -- what the chat screen shows, for the CLI's and tests' convenience --------------------------------------

    @property
    def chat(self) -> ChatSession:
        return self.chat_screen.conversation.chat

    @property
    def streaming(self) -> bool:
        return self.chat_screen.streaming

    @property
    def model(self) -> str | None:
        return self.chat_screen.conversation.model

    @property
    def client(self) -> ChatClient:
        return self.chat_screen.conversation.client

    @property
    def conversation_id(self) -> int | None:
        return self.chat_screen.conversation.conversation_id

    @property
    def pending_attachments(self) -> list[Attachment]:
        return self.chat_screen.attachments.attachments

    @property
    def hidden_turns(self) -> int:
        return self.chat_screen.hidden_turns

    @property
    def status_view(self) -> StatusView:
        return self.status.view

    @property
    def server(self) -> ManagedServer | None:
        return self.server_link.server

    @property
    def profile_name(self) -> str | None:
        return self.server_link.profile_name

    # -- start-up ---------------------------------------------------------------------------------------------

    def run(self, *, mouse: bool | None = None, **kwargs: Any) -> Any:
        """Run; the mouse is off by default under GNU screen, which holds back a lone Esc for as long as mouse
        reporting is on (waiting for a mouse report that never comes), so Esc would act only with the next key."""
        if mouse is None:
            mouse = not mouse_holds_escape(self.options.env if self.options.env is not None else os.environ)
        return super().run(mouse=mouse, **kwargs)

    def get_driver_class(self) -> type[Driver]:
        install_key_parser()  # Esc + key and Alt + key read as pressed (see ui.keyids)
        driver = super().get_driver_class()
        if driver.__name__ == "LinuxDriver" and driver.__module__ == "textual.drivers.linux_driver":
            # the same driver, with an input thread that sleeps until a key instead of waking 10x a second
            from tuichat.ui.input_driver import QuietLinuxDriver

            return QuietLinuxDriver
        return driver

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
        self.chat_screen.prompt.newline_keys = frozenset(keys_for("newline", self.user_keys))

    def key_name(self, binding_id: str) -> str:
        """The first key of an action as people write it (Ctrl+R, F6), under the user's keymap."""
        keys = keys_for(binding_id, self.user_keys)
        return display_key(keys[0]) if keys else binding_id

    def chat_mounted(self) -> None:
        """Start-up, once the chat screen's widgets exist (the App mounts before its default screen does)."""
        self._apply_keymap()
        screen = self.chat_screen
        screen.status_line.set(url=self.target.url, model=self.model or "model: asking server", state="connecting")
        screen.prompt.focus()
        if self.options.conversation_id is not None or self.options.continue_last:
            self.open_history()  # a saved chat to show: it calls first_screen_shown once it is drawn
        self._watch_hangup()
        if self.options.managed and self.profile_name:
            self.server_link.bring_up(self.profile_name)  # at once: a launch takes seconds, in its own thread
        if not screen.restoring:
            self.call_after_refresh(self.first_screen_shown)
        if not gc.isenabled():  # paused by the CLI for start-up: back on with the first screen, or after a while
            self._freeze_after_warm_up = True
            self.set_timer(GC_PAUSE_LIMIT_S, self.resume_gc)

    def open_history(self) -> None:
        """Open the history and the render cache beside it (once). With no saved chat to show, that waits for the
        first frame (the database, its checks and the cache: ~7 ms of App.run -> first frame, bench/RESULTS.md);
        sending, or a key once the chat screen is up, opens them first, so nothing typed is ever sent unsaved."""
        if self._history_opened:
            return
        self._history_opened = True
        self.store = self.chat_screen.open_history()
        if self.store is not None:
            from tuichat.ui.render_cache import RenderCache

            # beside the history it is drawn from (a private folder); written a moment after new rows, and at exit
            cache = self.render_cache = RenderCache.open(self.store.path)
            self.store.deleted = cache.drop_deleted  # what the history forgets, the drawn rows forget too

            def flush_soon() -> None:
                self.set_timer(CACHE_FLUSH_S, cache.flush)

            cache.when_new = flush_soon

    async def on_event(self, event: events.Event) -> None:
        # (see open_history: before the key can send anything). Not before the chat screen is up: a key typed
        # during start-up comes first, and a history that cannot open says so on that screen. The screen sees
        # the key after its own start, and sending opens the history too (ChatBase._hand_over).
        if not self._history_opened and self.chat_screen.is_mounted and isinstance(event, events.Key | events.Paste):
            self.open_history()
        await super().on_event(event)

    @staticmethod
    def resume_gc() -> None:
        """Collect garbage again after start-up (see cli.main.main), with what start-up built (Textual's and
        tuichat's modules, styles, widgets: long-lived) moved out of the collector's sight, so no later collection
        walks it again. Once only: nothing happens where the collector was on (tests, a host program)."""
        if not gc.isenabled():
            gc.freeze()
            gc.enable()

    def first_screen_shown(self) -> None:
        """The first screen the user waits for is out (the first frame, or a saved chat's newest turns): now the
        server check and the first status reading, whose imports (httpx) and requests would have delayed it."""
        if self.first_screen_out:
            return
        self.first_screen_out = True
        self.open_history()
        self.resume_gc()
        if not (self.options.managed and self.profile_name):
            self.server_link.check_server()
        self.status.first_screen_shown()
        if self.options.watch_server:
            self.status.start()
            self.status.poll()
        # The Markdown modules load lazily so the first screen does not wait for them; load them now, while the
        # user reads it, rather than on the first Enter, where the import (~40 ms) would add to the TTFT.
        self.set_timer(0.2, self._warm_up)

    def _warm_up(self) -> None:
        warm_up_markdown()
        warm_up_client()
        self.run_worker(self._warm_up_widgets(), group="warm-up", exit_on_error=False)

    async def _warm_up_widgets(self) -> None:
        await self.chat_screen.warm_up_widgets()
        if self._freeze_after_warm_up:
            # the warm-up's modules (Markdown, Pygments, httpx) live as long as the app: out of the collector's
            # sight too, or its full collections walk them at the first replies
            gc.freeze()

    def on_ready(self) -> None:
        if self._keymap_error:
            self.notify(self._keymap_error, severity="error", timeout=15)
        self.first_frame_s = time.perf_counter() - START_TIME
        self.log.info(f"first frame after {self.first_frame_s:.3f} s")

    # -- the server -------------------------------------------------------------------------------------------

    async def _learn_engine(self) -> None:
        """The launched server's KV-cache geometry (kept under this name for tests/test_status_pane.py)."""
        await self.status.learn_engine()

    def refuse_before_ready(self) -> bool:
        return self.server_link.refuse_before_ready()

    def retarget(self, url: str, api_key: str | None, model: str | None) -> None:
        """Point the chat at another server (a launched one, or one picked in the server panel)."""
        self.server_link.retarget(url, api_key, model)

    # -- other screens ----------------------------------------------------------------------------------------

    def show_help(self) -> None:
        from tuichat.ui.screens.dialogs import HelpScreen, help_rows  # the dialogs load when one is first shown

        self.push_screen(HelpScreen(help_rows(self.chat_screen.BINDINGS, self.user_keys)))

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        """The command palette (ctrl+p) offers every action of the chat screen, with its key."""
        yield from super().get_system_commands(screen)
        if screen is not self.chat_screen:
            return
        from functools import partial

        from tuichat.keymap import BY_ID
        from tuichat.ui.compare_with import compare_with
        from tuichat.ui.screens.dialogs import help_rows

        yield SystemCommand(
            "Compare with…",
            "this chat's server beside another profile, one prompt to both",
            partial(compare_with, self),
        )
        for _, _, binding_id in help_rows(self.chat_screen.BINDINGS, self.user_keys):
            spec = BY_ID.get(binding_id)
            if spec is None or spec.id in ("quit", "help", "newline"):
                continue
            action = partial(screen.run_action, spec.id)
            yield SystemCommand(spec.help or spec.label, f"{self.key_name(spec.id)} · {spec.id}", action)

    def show_history(self) -> None:
        store = self.store
        if store is None:
            self.notify("The history is not available (see the message at the top of the chat).", severity="error")
            return
        from tuichat.ui.screens.history import ConversationsScreen, HistoryChoice

        def chosen(choice: HistoryChoice | None) -> None:
            screen = self.chat_screen
            screen.check_open_conversation_exists()
            if choice is None:
                return
            if screen.streaming:
                self.notify("A reply is still streaming: stop it (Esc) before switching chats.", severity="warning")
                return
            opening = screen.open_conversation(choice.conversation_id, choice.message_id, read_only=choice.read_only)
            self.run_worker(opening, exit_on_error=False)

        self.push_screen(ConversationsScreen(store), chosen)

    def show_server(self) -> None:
        from tuichat.ui.screens.server import ServerAction, ServerScreen

        link = self.server_link
        name = link.profile_name or self.config.default_profile or next(iter(self.config.profiles), None)
        if name is None:
            self.notify("No launch profile: add one to config.toml (see `tuichat profiles`).", severity="error")
            return

        def done(action: ServerAction | None) -> None:
            if action is None:
                return
            self._reload_config()  # the panel may have saved a profile
            link.profile_name = action.profile_name
            server = action.server
            if server is not None and server is not link.server:
                link.adopt(action.profile_name, server)
            if action.kind == "attach" and server is not None:
                link.adopt(action.profile_name, server)
                link.attach(server)
            elif server is None and link.server is not None and not link.server.is_alive():
                link.server = None

        self.push_screen(ServerScreen(link.get_manager(), self.config, name, link.server), done)

    def show_fleet(self) -> None:
        from tuichat.ui.screens.fleet import FleetScreen, ReplyRow

        if not self.status.is_fleet:
            self.notify(
                "This server is not an lmdeploy proxy: the fleet screen shows the nodes behind one "
                "(tuichat FLEET, or --url of a proxy).",
                severity="warning",
            )
            return
        ledger = self.status.ledger

        def replies() -> list[ReplyRow]:
            return [ReplyRow(t.content, ledger.get(id(t))) for t in self.chat.turns if t.role == "assistant"]

        self.push_screen(FleetScreen(lambda: self.status.view.fleet, replies))

    def show_models(self) -> None:
        from tuichat.ui.screens.models import ModelsResult, ModelsScreen

        def done(result: ModelsResult | None) -> None:
            if result is None or not result.profile_name:
                return
            if self._reload_config():  # the picker (or a quantize run) saved a profile
                self.server_link.profile_name = result.profile_name
                self.notify(f"Saved profile {result.profile_name}: F5 starts it.")

        self.push_screen(ModelsScreen(self.config, self.options.gpu_reader), done)

    def _reload_config(self) -> bool:
        try:
            self.config = load_config(self.config.path)
        except Exception as exc:
            self.notify(str(exc), severity="error")
            return False
        return True

    # -- saving the sampling values ---------------------------------------------------------------------------

    def sampling_changed(self, sampling: Sampling) -> None:
        if self._save_timer is not None:
            self._save_timer.stop()
        # Saving on every keystroke would rewrite the file per digit: wait until typing pauses.
        self._save_timer = self.set_timer(0.8, lambda: self._persist_sampling(sampling))

    def _persist_sampling(self, sampling: Sampling) -> None:
        try:
            self.config = replace(self.config, sampling=sampling)
            save_config(self.config)
        except Exception as exc:
            self.notify(f"could not save the sampling values: {exc}", severity="error")

    # -- copying ----------------------------------------------------------------------------------------------

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

    # -- quitting ---------------------------------------------------------------------------------------------

    def _watch_hangup(self) -> None:
        """SSH dropped: leave at once, keeping the server (its record lets the next tuichat re-attach)."""
        import signal

        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._hangup)

    def _hangup(self) -> None:
        self._hung_up = True  # the partial reply is saved as interrupted, not as stopped by the user
        self.chat_screen.conversation.cancel(interrupted=True)
        self.exit(return_code=129)

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

            from tuichat.ui.screens.dialogs import QuitScreen

            self.push_screen(QuitScreen(server.name, server.url), answer)

    async def _stop_and_exit(self, server: ManagedServer) -> None:
        # Close our own streams first: the server waits for open ones before it stops.
        await self.chat_screen.conversation.stop()
        self.chat_screen.status_line.set(state="stopping", last=f"stopping {server.name}…")
        result = await asyncio.to_thread(self.server_link.get_manager().stop, server)
        if result.survivors:
            self.notify(f"{len(result.survivors)} process(es) of {server.name} survived the stop.", severity="error")
        self.exit()

    async def on_unmount(self) -> None:
        # A reply still streaming is saved: stopped by the user's quit, or interrupted by a hang-up.
        await self.chat_screen.conversation.aclose(interrupted=self._hung_up)
        if "status" in self.__dict__:  # made only once something asked for it
            self.status.close()
        if self.server_link.manager is not None:
            self.server_link.manager.close()
        if self.render_cache is not None:
            self.render_cache.close()
        if self.store is not None:
            self.store.close()


def make_app(options: AppOptions | None = None) -> TuichatApp:
    """Build the app from options (CLI flags), the config file and the environment."""
    options = options or AppOptions()
    config = options.config or load_config()
    env = options.env if options.env is not None else os.environ
    if options.managed is None:
        options.managed = choose_managed(options, config, env)
    target = resolve_target(config, env, options.url, options.api_key, options.model)
    return TuichatApp(options, config, target)


__all__ = ["AppOptions", "TuichatApp", "__version__", "make_app"]
