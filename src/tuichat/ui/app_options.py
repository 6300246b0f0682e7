"""What the CLI (and tests) ask of the chat app, and whether it drives a server tuichat launches or attaches to a URL.

`AppOptions` are the flags `tuichat` parsed; `choose_managed` reads them with the config and the launcher's
records to decide, before the app is built, which server the chat talks to (see its docstring for the order).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

    from tuichat.config import Config
    from tuichat.server.fleet import RunningFleet
    from tuichat.server.gpu import GpuReader
    from tuichat.server.launcher import ServerManager


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


def choose_managed(options: AppOptions, config: Config, env: Mapping[str, str]) -> bool:
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
