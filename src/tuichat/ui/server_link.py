"""The server tuichat launched (a profile's): find or start it, follow it to ready, then point the chat at it.

App-wide, because the server outlives screens (and the quit question is about it). It uses Textual's thread
workers and `call_from_thread`, so it lives under ui/; launching itself is `tuichat.server.launcher`'s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tuichat.server.launcher import ManagedServer, ServerManager, ServerStatus
    from tuichat.ui.app import TuichatApp


class ServerLink:
    """Which launched server the chat uses, its last status, and the manager that launched it."""

    def __init__(self, app: TuichatApp) -> None:
        self.app = app
        options = app.options
        self.manager: ServerManager | None = options.manager
        self.server: ManagedServer | None = None
        self.profile_name: str | None = options.profile
        self.state: ServerStatus | None = None
        # A profile's server brings its own address and key once it is up: until then nothing is asked of it.
        self.target_known = not (options.managed and options.profile)

    def get_manager(self) -> ServerManager:
        if self.manager is None:
            from tuichat.server.launcher import ServerManager

            self.manager = ServerManager()
        return self.manager

    def bring_up(self, name: str) -> None:
        self.app.run_worker(
            lambda: self._bring_up(name), thread=True, group="server", exclusive=True, exit_on_error=False
        )

    def _bring_up(self, name: str) -> None:
        """Attach to the profile's server if tuichat started it earlier, else launch it and wait for ready."""
        from tuichat.errors import TuichatError

        app = self.app
        screen = app.chat_screen
        manager = self.get_manager()
        server = manager.find(name)
        if server is None:
            profile = app.config.profiles.get(name)
            if profile is None:
                app.call_from_thread(screen.add_note, "error", f"no profile called '{name}': see `tuichat profiles`.")
                return
            app.call_from_thread(lambda: screen.status_line.set(state="starting", model=f"profile {name}"))
            try:
                for check in manager.preflight(profile):
                    if check.level == "warning":
                        app.call_from_thread(app.notify, check.message, severity="warning", timeout=10)
                server = manager.start(name, profile)
            except Exception as exc:  # TuichatError says what to do; anything else still must not hang here
                text = str(exc) if isinstance(exc, TuichatError) else f"could not start {name}: {exc!r}"
                app.call_from_thread(screen.add_note, "error", text)
                app.call_from_thread(lambda: screen.status_line.set(state="failed"))
                return
            app.call_from_thread(
                screen.add_note, "notice", f"Starting {name} ({profile.model}); F5 shows its progress and log."
            )
        else:
            app.call_from_thread(app.notify, f"Attached to {name}, which tuichat started earlier (pid {server.pid}).")
        app.call_from_thread(self.adopt, name, server)
        status = server.wait_ready(None, lambda st: app.call_from_thread(self.show_status, st), 0.25)
        app.call_from_thread(self.show_status, status)
        if status.state == "ready":
            app.call_from_thread(self.attach, server)

    def adopt(self, name: str, server: ManagedServer) -> None:
        """This server is the chat's now: the status pane shows how it was launched."""
        self.profile_name = name
        self.server = server
        profile = server.profile
        view = self.app.status.view
        launch: dict[str, Any] = {"profile": name, "backend": profile.backend or "turbomind (default)"}
        if profile.tp:
            launch["tp"] = profile.tp
        launch["cache share"] = profile.cache_max_entry_count if profile.cache_max_entry_count else "0.8 (default)"
        launch["KV quant"] = {0: "off", 4: "int4", 8: "int8"}.get(profile.quant_policy or 0, profile.quant_policy)
        if profile.session_len:
            launch["session_len"] = profile.session_len
            if view.context is not None:
                view.context.session_len = profile.session_len
        view.launch = launch
        meta = self.app.chat_screen.conversation.meta
        meta.profile = name
        meta.lmdeploy_version = server.record.lmdeploy_version

    def show_status(self, status: ServerStatus) -> None:
        self.state = status
        screen = self.app.chat_screen
        line = screen.status_line
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
            screen.add_note("error", text)
        elif status.state == "stopped":
            line.set(state="stopped", last="")

    def attach(self, server: ManagedServer) -> None:
        self.target_known = True
        self.app.retarget(server.url, server.api_key, server.model_name)
        self.app.run_worker(self.app.status.learn_engine(), group="engine", exit_on_error=False)

    def refuse_before_ready(self) -> bool:
        """True (after saying so) while the launched server is not up: its address and key are not known yet,
        and nothing goes out without them."""
        if self.target_known:
            return False
        app = self.app
        name = self.profile_name or "the server"
        panel = app.key_name("server")
        state = self.state.state if self.state is not None else "starting"
        if state in ("failed", "stopped"):
            text = f"{name} is not running: start it from the server panel ({panel})."
        else:
            text = f"{name} is still starting ({panel} shows its progress): send once the status line says ready."
        app.notify(text, severity="warning")
        return True
