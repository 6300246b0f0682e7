"""The server the chat talks to: a profile's (find or launch it, follow it to ready, then point the chat at it),
or the URL it was given (is it up, which model); and pointing the chat at another one.

App-wide, because the server outlives screens (and the quit question is about it). It uses Textual's thread
workers and `call_from_thread`, so it lives under ui/; the launch itself is `tuichat.server.launch.launch`, the
one flow the CLI and the server panel use too (the preflight runs once, inside it). A launch the preflight stops
is a note in the chat with every finding and the command that fixes it (`tuichat pull ID`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tuichat.server.launch import PreflightFailed
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
        """Attach to the profile's server if tuichat started it earlier, else launch it (the one launch flow,
        `tuichat.server.launch`), then follow it to ready on this thread."""
        from tuichat.server.launch import Checked, LaunchEvent, PreflightFailed, launch

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

            def warn(event: LaunchEvent) -> None:
                if isinstance(event, Checked):
                    for check in event.checks:
                        app.call_from_thread(app.notify, check.message, severity="warning", timeout=10)

            try:
                server = launch(manager, name, profile, warn, wait=False).server
            except Exception as exc:  # every failure is a sentence in the chat, and the line says failed
                if isinstance(exc, PreflightFailed):
                    text = preflight_note(name, exc, app.key_name("server"))
                else:
                    text = self._failure(name, exc)

                def failed() -> None:  # one step on the loop: the note and the state are never seen apart
                    screen.add_note("error", text)
                    screen.status_line.set(state="failed")

                app.call_from_thread(failed)
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

    @staticmethod
    def _failure(name: str, exc: Exception) -> str:
        from tuichat.errors import TuichatError

        # TuichatError says what to do; anything else still must not hang the start-up or show a traceback
        return str(exc) if isinstance(exc, TuichatError) else f"could not start {name}: {exc!r}"

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
        self.retarget(server.url, server.api_key, server.model_name)
        self.app.run_worker(self.app.status.learn_engine(), group="engine", exit_on_error=False)

    # -- the server the chat talks to (launched or not) --------------------------------------------------------

    def check_server(self) -> None:
        # The method, not a coroutine: a worker cancelled before it starts (exclusive) then leaves none unawaited.
        # (Textual types an async callable as Coroutine[None, None, ...], hence the ignore.)
        self.app.run_worker(
            self._check_server,  # type: ignore[arg-type]
            group="connect",
            exclusive=True,
            exit_on_error=False,
        )

    async def _check_server(self) -> None:
        from tuichat.chat.client import ChatError
        from tuichat.ui.screens.dialogs import ChoiceScreen

        app = self.app
        screen = app.chat_screen
        status = screen.status_line
        health = await app.client.health()
        if not health.ok:
            status.set(state="unreachable" if health.status is None else f"not ready: {health.status}")
            screen.add_note("error", health.message)
            self._explain_missing_local_server()
            return
        conversation = screen.conversation
        if conversation.model is None:
            try:
                models = await app.client.list_models()
            except ChatError as exc:
                status.set(state=exc.kind)
                screen.add_note("error", exc.message)
                return
            if not models:
                status.set(state="no model")
                screen.add_note("error", "the server lists no model under /v1/models.")
                return
            conversation.model = models[0]
            if len(models) > 1:
                app.push_screen(ChoiceScreen("Which model?", models), self._model_chosen)
        status.set(state="ready", model=conversation.model or "")

    def _model_chosen(self, choice: str | None) -> None:
        if choice:
            self.app.chat_screen.conversation.model = choice
            self.app.chat_screen.status_line.set(model=choice)

    def _explain_missing_local_server(self) -> None:
        """On a machine with no lmdeploy (or no GPU), say plainly what is missing and how to attach elsewhere."""
        if self.app.target.source != "default":
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
        self.app.chat_screen.add_note("notice", ("; ".join(missing) + ". " if missing else "") + hint)

    def retarget(self, url: str, api_key: str | None, model: str | None) -> None:
        """Point the chat at another server (a launched one, or one picked in the server panel)."""
        from tuichat.chat.target import Target

        app = self.app
        screen = app.chat_screen
        if screen.streaming:
            app.notify(f"The reply was stopped: the chat now talks to {url}.", severity="warning")
        old = screen.conversation.use_client(app.new_client(url, api_key), model)
        app.target = Target(url, api_key, model, "profile")
        self.target_known = True
        app.status.retargeted()
        screen.status_line.set(url=url, model=model or "", state="connecting", last="")
        app.run_worker(old.aclose(), exit_on_error=False)
        self.check_server()
        if app.conversation_id is not None:
            app.status.count_context()

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


def preflight_note(name: str, failed: PreflightFailed, panel_key: str) -> str:
    """The chat's note for a launch the preflight stopped: every finding, each fix as a command to run, and how
    to start it again once fixed (the server panel)."""
    lines = [f"{name} was not started:"]
    lines += [("✖ " if check.level == "error" else "⚠ ") + check.message for check in failed.checks]
    fixes = [check.fix for check in failed.checks if check.fix]
    lines += [f"→ Run `{fix}` in a shell first." for fix in fixes]
    lines.append(f"Then start it from the server panel ({panel_key}).")
    return "\n".join(lines)
