"""The chat app's "Compare with…" (command palette): this chat's server beside another profile, on one screen.

The other side is resolved as `tuichat compare` resolves it (attached if running, else started through the one
launch flow), in a thread so the chat stays live while a server loads; a server started for the comparison keeps
running afterwards (F5 stops it), as one the chat started would.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tuichat.chat.batch import Endpoint
from tuichat.errors import TuichatError

if TYPE_CHECKING:
    from tuichat.ui.app import TuichatApp


def compare_with(app: TuichatApp) -> None:
    """Ask which profile to put beside this chat's server, then open the compare screen on both."""
    from tuichat.ui.screens.dialogs import ChoiceScreen

    here = app.profile_name
    names = [n for n in (*app.config.profiles, *app.config.fleets) if n != here]
    if not names:
        app.notify(
            "No other profile to compare with: add one (F5, then n), or run `tuichat compare A URL` in a shell.",
            severity="warning",
        )
        return
    manager = app.server_link.get_manager()
    running = {server.name for server in manager.running()}
    # running ones first, then the user's own profiles and fleets, then the built-in ones
    user = app.config.user_profiles | set(app.config.fleets)
    names.sort(key=lambda n: (n not in running, n not in user))
    hints = {n: "running" if n in running else "starts it" for n in names}

    def chosen(name: str | None) -> None:
        if name is not None:
            app.run_worker(lambda: _open(app, name), thread=True, group="compare", exit_on_error=False)

    app.push_screen(ChoiceScreen("Compare this chat's server with", names, hints), chosen)


def _open(app: TuichatApp, name: str) -> None:
    # In a worker thread: resolving may start a server and wait for it.
    from tuichat.ui.compare_app import compare_screen, resolve

    def say(text: str) -> None:
        app.call_from_thread(app.notify, text)

    try:
        other = resolve(name, None, None, app.server_link.get_manager(), app.config, say).endpoint
    except TuichatError as exc:
        app.call_from_thread(app.notify, f"Cannot compare with {name}: {exc}", severity="error")
        return
    target = app.target
    here = Endpoint(target.url, target.api_key, app.model, app.profile_name or target.url, profile=app.profile_name)
    sampling = app.chat_screen.conversation.sampling

    def push() -> None:
        from tuichat.server.gpu import NvmlReader

        reader = app.options.gpu_reader or NvmlReader()
        screen = compare_screen(
            here,
            other,
            store=app.store,
            sampling=sampling,
            stall_timeout=app.config.ui.stall_timeout,
            gpu_reader=reader,
        )
        screen.closable = True
        app.push_screen(screen)

    app.call_from_thread(push)
