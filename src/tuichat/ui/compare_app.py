"""`tuichat compare A B`: a small App around the compare screen, so comparing needs nothing of the chat app.

A and B are URLs (keys as for `--url`: `--api-key` for both, `--key-a` / `--key-b` for one side) or launch
profiles: a profile tuichat already runs is attached, one that is not running is started first (one after the
other, so the second sees the GPU memory the first took) and stopped again on quit unless `--keep` is given.
The GPU memory of a side is read from its server's processes: those tuichat launched, or for a URL on this
machine the process listening on its port (and its process group).

Both conversations are saved to the history as a linked pair (`Store.link_pair`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from textual.app import App
from textual.binding import Binding

from tuichat.chat.client import ChatClient
from tuichat.chat.conversation import Conversation, Meta
from tuichat.chat.sampling import Sampling
from tuichat.chat.store import Store
from tuichat.cli.batch import Endpoint, looks_like_url
from tuichat.config import Config, load_config
from tuichat.errors import TuichatError
from tuichat.server.gpu import GpuReader
from tuichat.ui.screens.compare import POLL_EVERY, CompareScreen, Side

if TYPE_CHECKING:
    from tuichat.server.launcher import ManagedServer, ServerManager, ServerStatus

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "0.0.0.0", "[::1]"})
START_TIMEOUT = 1800.0  # seconds a profile may take to become ready (a large model loads for minutes)


# -- which processes are a server ----------------------------------------------------------------------------


def listening_pids(port: int, proc: Path = Path("/proc")) -> set[int]:
    """The processes holding a listening TCP socket on `port` (Linux /proc; empty elsewhere or when unreadable)."""
    inodes: set[str] = set()
    for table in ("net/tcp", "net/tcp6"):
        try:
            lines = (proc / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    if not inodes:
        return set()
    owners: set[int] = set()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    owners.add(int(entry.name))
                    break
    return owners


def local_server_pids(url: str) -> Callable[[], Collection[int]] | None:
    """For a server on this machine: a function giving its processes now (the listener and its process group,
    where the engine's workers are); None for a remote URL, whose GPU memory cannot be read here."""
    parts = urlsplit(url)
    if (parts.hostname or "") not in LOCAL_HOSTS or parts.port is None:
        return None
    port = parts.port
    cached: set[int] = set()

    def pids() -> Collection[int]:
        from tuichat.server.procgroup import group_pids, pid_alive

        nonlocal cached
        if not cached or not all(pid_alive(p) for p in cached):
            cached = listening_pids(port)
        found = set(cached)
        for pid in cached:
            with contextlib.suppress(OSError):
                pgid = os.getpgid(pid)
                if pgid != os.getpgrp():  # a server in our own group (tests) shares it with us: just itself
                    found |= group_pids(pgid)
        return found

    return pids


# -- what each side talks to ---------------------------------------------------------------------------------


@dataclass
class Resolved:
    """One side as given on the command line: what to talk to and, for a profile, its server."""

    endpoint: Endpoint
    server: ManagedServer | None = None
    started_here: bool = False

    def pids(self) -> Callable[[], Collection[int]] | None:
        if self.server is not None:
            server = self.server
            return lambda: server.pids()
        return local_server_pids(self.endpoint.url)


def resolve(
    spec: str,
    api_key: str | None,
    model: str | None,
    manager: ServerManager,
    config: Config,
    say: Callable[[str], None],
    start_timeout: float = START_TIMEOUT,
) -> Resolved:
    """A URL, a running profile (attached), or a profile that is not running (started here, waited for)."""
    if looks_like_url(spec):
        from tuichat.chat.target import normalise_url

        url = normalise_url(spec, "A/B")
        return Resolved(Endpoint(url, api_key or None, model, url))
    if spec in config.fleets:
        from tuichat.server.fleet import find_fleet

        fleet = find_fleet(manager, spec)
        if fleet is None or fleet.url is None:
            raise TuichatError(f"fleet '{spec}' is not running: start it with `tuichat serve {spec} --detach`.")
        return Resolved(Endpoint(fleet.url, fleet.api_key, model, spec, profile=spec))
    server = manager.find(spec)
    started = False
    if server is None:
        profile = config.profiles.get(spec)
        if profile is None:
            names = ", ".join(sorted(config.profiles)) or "none"
            raise TuichatError(f"no profile called '{spec}' (known: {names}); see `tuichat profiles`, or pass a URL.")
        from tuichat.server.launch import Checked, LaunchEvent, StatusChanged, launch

        show_status = _progress(spec, say)

        def on_event(event: LaunchEvent) -> None:
            if isinstance(event, Checked):
                for check in event.checks:
                    say(f"Warning: {check.message}")
            elif isinstance(event, StatusChanged):
                show_status(event.status)

        # the one launch flow (preflight once, inside the start); a start that does not end ready is stopped
        launched = launch(manager, spec, profile, on_event, wait=False)
        server, started = launched.server, True
        say(f"Starting {spec} ({profile.model}) at {server.url}; log: {server.log_path}")
        try:
            status = server.wait_ready(start_timeout, lambda s: on_event(StatusChanged(server, s)))
        except BaseException:
            manager.stop(server)
            raise
        if status.state != "ready":
            manager.stop(server)
            raise TuichatError(status.message or f"{spec} did not start: see `tuichat logs {spec}`.")
        say(f"{spec} is ready.")
    else:
        say(f"Attached to {spec}, which tuichat started earlier (pid {server.pid}).")
    endpoint = Endpoint(
        server.url,
        server.api_key,
        model or server.model_name,
        spec,
        profile=spec,
        lmdeploy_version=server.record.lmdeploy_version,
    )
    return Resolved(endpoint, server, started)


def _progress(name: str, say: Callable[[str], None]) -> Callable[[ServerStatus], None]:
    last = [""]

    def on_status(status: ServerStatus) -> None:
        progress = status.progress
        step = ""
        if progress is not None:
            step = f" · {progress.label}" + (
                f" {progress.fraction * 100:.0f}%" if progress.fraction is not None else ""
            )
        text = f"{name}: {status.state}{step}"
        if text != last[0]:
            last[0] = text
            say(text)

    return on_status


# -- the App -------------------------------------------------------------------------------------------------


def make_side(
    endpoint: Endpoint,
    store: Store | None,
    sampling: Sampling,
    stall_timeout: float = 120.0,
    *,
    pids: Callable[[], Collection[int]] | None = None,
    server: Any = None,
    started_here: bool = False,
) -> Side:
    client = ChatClient(endpoint.url, endpoint.api_key, stall_timeout=stall_timeout)
    meta = Meta(server_url=endpoint.url, profile=endpoint.profile, lmdeploy_version=endpoint.lmdeploy_version)
    conv = Conversation(client, model=endpoint.model, sampling=sampling, store=store, meta=meta)
    return Side(endpoint, conv, pids=pids, server=server, started_here=started_here)


def compare_screen(
    first: Endpoint,
    second: Endpoint,
    *,
    store: Store | None,
    sampling: Sampling,
    stall_timeout: float = 120.0,
    gpu_reader: GpuReader | None = None,
) -> CompareScreen:
    """A compare screen for any running App to push (the chat app's "compare with…"): the screen owns both
    conversations and stops and closes them when it is dismissed; the store and reader stay the caller's."""
    sides = [make_side(e, store, sampling, stall_timeout, pids=Resolved(e).pids()) for e in (first, second)]
    return CompareScreen(sides[0], sides[1], store=store, gpu_reader=gpu_reader)


class CompareApp(App[int]):
    """Runs one CompareScreen; on quit both replies stop (kept, marked interrupted) before the App exits."""

    TITLE = "tuichat compare"
    BINDINGS = [Binding("ctrl+q", "quit", "Quit", priority=True, id="quit")]

    def __init__(
        self,
        first: Side,
        second: Side,
        store: Store | None = None,
        *,
        gpu_reader: GpuReader | None = None,
        poll_every: float = POLL_EVERY,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.sides = (first, second)
        self.store = store
        self.gpu_reader = gpu_reader
        self.keep_servers = False  # --keep: servers this run started stay up after quit
        self.compare = CompareScreen(first, second, store=store, gpu_reader=gpu_reader, poll_every=poll_every)

    def on_mount(self) -> None:
        self.push_screen(self.compare)

    async def action_quit(self) -> None:
        await self.compare.shutdown()
        self.exit(0)

    async def on_unmount(self) -> None:
        await self.compare.shutdown()
        if self.store is not None:
            self.store.close()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tuichat compare",
        description="Send each message to two servers at once and compare speed, GPU memory and KV usage.",
    )
    p.add_argument("a", help="a URL, or a launch profile (attached if running, else started)")
    p.add_argument("b", help="a URL, or a launch profile (attached if running, else started)")
    p.add_argument("--api-key", help="the API key for both URLs")
    p.add_argument("--key-a", help="the API key for A (a URL)")
    p.add_argument("--key-b", help="the API key for B (a URL)")
    p.add_argument("--model-a", help="model id on A (default: the profile's, or the first the server lists)")
    p.add_argument("--model-b", help="model id on B (default: the profile's, or the first the server lists)")
    p.add_argument("--keep", action="store_true", help="leave the servers compare started running on quit")
    return p


def _say(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def make_compare_app(
    argv: Sequence[str],
    manager: ServerManager | None = None,
    say: Callable[[str], None] = _say,
    start_timeout: float = START_TIMEOUT,
) -> CompareApp:
    """Parse `argv`, bring up both sides (starting profiles that are not running) and build the App. A side that
    cannot be reached raises TuichatError; a server started for A is stopped again if B fails."""
    from tuichat.server.launcher import ServerManager

    args = parser().parse_args(list(argv))
    if args.a == args.b and args.model_a == args.model_b:
        raise TuichatError("A and B are the same server and model: give two profiles or URLs to compare.")
    config = load_config()
    manager = manager or ServerManager()
    first = resolve(args.a, args.key_a or args.api_key, args.model_a, manager, config, say, start_timeout)
    try:
        second = resolve(args.b, args.key_b or args.api_key, args.model_b, manager, config, say, start_timeout)
    except BaseException:
        if first.started_here and first.server is not None:
            manager.stop(first.server)
        raise
    store = Store.open()
    sides = [
        make_side(
            r.endpoint,
            store,
            config.sampling,
            config.ui.stall_timeout,
            pids=r.pids(),
            server=r.server,
            started_here=r.started_here,
        )
        for r in (first, second)
    ]
    app = CompareApp(sides[0], sides[1], store, gpu_reader=manager.gpu_reader())
    app.keep_servers = bool(args.keep)
    return app


def stop_started(app: CompareApp, manager: ServerManager) -> list[str]:
    """Stop the servers this compare run started; one sentence per server for the user."""
    said = []
    for side in app.sides:
        if side.started_here and side.server is not None:
            result = manager.stop(side.server)
            said.append(result.describe(side.server.name))
    return said


def main(argv: Sequence[str] | None = None) -> int:
    """`tuichat compare A B ...` (argv without the word `compare`); a TuichatError goes to the CLI, which prints it."""
    from tuichat.server.launcher import ServerManager

    manager = ServerManager()
    try:
        app = make_compare_app(sys.argv[1:] if argv is None else argv, manager)
        try:
            app.run()
        finally:
            if not app.keep_servers:
                for line in stop_started(app, manager):
                    _say(line)
            elif any(side.started_here for side in app.sides):
                _say("Left running (--keep): " + ", ".join(s.endpoint.label for s in app.sides if s.started_here))
        return int(app.return_code or 0)
    finally:
        manager.close()


__all__ = ["CompareApp", "compare_screen", "main", "make_compare_app", "make_side", "resolve", "stop_started"]
