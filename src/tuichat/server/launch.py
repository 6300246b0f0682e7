"""The one launch flow: preflight, start, wait for ready, and the events a front end renders on the way.

`tuichat serve`, the server panel and the chat app all start a server through `launch`, so the preflight runs
once per launch (inside `ServerManager.start`, on the port the launch really takes) and every front end sees the
same steps in the same order: `Checked` (the warnings; errors raise `PreflightFailed` with every finding), then
`Started` (the process is spawned), then a `StatusChanged` for each change the server reports while it loads.
A front end that follows the start-up itself (the panel polls on its own timer, beside its log view) passes
`wait=False` and gets the server back after `Started`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tuichat.server.launcher import Check, ManagedServer, PreflightFailed, ServerManager, ServerStatus
from tuichat.server.profiles import Profile

__all__ = ["Checked", "LaunchEvent", "Launched", "PreflightFailed", "Started", "StatusChanged", "launch"]


@dataclass(frozen=True)
class Checked:
    """The preflight passed; `checks` are its warnings (possibly none), to show before the start-up."""

    checks: tuple[Check, ...]


@dataclass(frozen=True)
class Started:
    """The server process is running and its log is being written; it is loading the model."""

    server: ManagedServer


@dataclass(frozen=True)
class StatusChanged:
    """The server reported something new: a loading step, a rank's progress, ready, or failure."""

    server: ManagedServer
    status: ServerStatus


LaunchEvent = Checked | Started | StatusChanged


@dataclass(frozen=True)
class Launched:
    """What a launch ended with: the server, and its last status (None with `wait=False`)."""

    server: ManagedServer
    status: ServerStatus | None


def launch(
    manager: ServerManager,
    name: str,
    profile: Profile,
    on_event: Callable[[LaunchEvent], None] | None = None,
    *,
    wait: bool = True,
    timeout: float | None = None,
) -> Launched:
    """Start `profile` as server `name`: preflight once, spawn, then (with `wait`) follow it until it is ready,
    failed or stopped, or `timeout` seconds passed (then it is still starting; the caller decides its fate).

    Raises PreflightFailed when a check blocks the launch, LaunchError when it cannot be spawned.
    """

    def emit(event: LaunchEvent) -> None:
        if on_event is not None:
            on_event(event)

    server = manager.start(name, profile, on_checks=lambda checks: emit(Checked(checks)))
    emit(Started(server))
    if not wait:
        return Launched(server, None)
    status = server.wait_ready(timeout, lambda s: emit(StatusChanged(server, s)))
    return Launched(server, status)
