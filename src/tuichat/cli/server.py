"""`tuichat serve / ps / stop / logs / profiles / doctor`: the server manager without the TUI.

`serve`, `ps` and `stop` know fleets too (`[fleets.NAME]`, see tuichat.server.fleet): `tuichat serve FLEET` starts the
proxy and every node and reports each one's progress, `ps` lists each fleet with its nodes as the proxy sees
them, `tuichat stop FLEET` stops all of it.

Everything here is plain text for a terminal or a script: tables on stdout, one-sentence errors on stderr with
exit code 1 (2 for a usage mistake). No command ever prints a server's API key; `ps` and `serve` say where
its 0600 key file is instead.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from tuichat import paths
from tuichat.chat.sanitize import clean
from tuichat.durations import format_compact
from tuichat.errors import TuichatError
from tuichat.server.launch import Checked, LaunchEvent, Started, launch
from tuichat.server.launcher import (
    LogFollower,
    ManagedServer,
    PreflightFailed,
    ServerManager,
    ServerStatus,
    collapse_cr,
    lmdeploy_origin,
    lmdeploy_version,
    mask_secret,
    parse_progress,
    read_log_tail,
)
from tuichat.server.procgroup import StopResult
from tuichat.server.profiles import BUILTIN_PROFILES, DEFAULT_PROFILE_NAME, Profile, make_model_hint

COMMANDS = ("serve", "ps", "stop", "logs", "profiles", "doctor")


class UsageError(TuichatError):
    """The command line asks for something that cannot be done as written (exit code 2)."""


def add_subcommands(subparsers: Any) -> None:
    """Register serve/ps/stop/logs/profiles/doctor on an argparse subparsers object."""
    p = subparsers.add_parser("serve", help="start a server from a profile (or a fleet), without the TUI")
    p.add_argument("profile", nargs="?", help="profile or fleet name (default: default_profile of the config)")
    p.add_argument("--detach", action="store_true", help="return once the server is ready; it keeps running")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="give up if not ready after S s")
    p.set_defaults(server_command="serve")

    p = subparsers.add_parser("ps", help="list the servers tuichat started")
    p.set_defaults(server_command="ps")

    p = subparsers.add_parser("stop", help="stop a server (or a fleet) tuichat started")
    p.add_argument("profile", nargs="?", help="profile of the server, or fleet, to stop")
    p.add_argument("--all", action="store_true", help="stop every server and fleet tuichat started")
    p.set_defaults(server_command="stop")

    p = subparsers.add_parser("logs", help="show a server's log")
    p.add_argument("profile", help="profile of the server")
    p.add_argument("-f", "--follow", action="store_true", help="keep showing new lines until the server stops")
    p.add_argument("-n", "--lines", type=int, default=50, metavar="N", help="how many lines (default 50)")
    p.set_defaults(server_command="logs")

    p = subparsers.add_parser("profiles", help="list the server profiles")
    p.set_defaults(server_command="profiles")

    p = subparsers.add_parser("doctor", help="check lmdeploy, GPUs and tuichat's files")
    p.set_defaults(server_command="doctor")


def is_server_command(args: argparse.Namespace) -> bool:
    return getattr(args, "server_command", None) in COMMANDS


def run(args: argparse.Namespace) -> int:
    """Run the subcommand in `args`; returns the exit code. User errors become one sentence on stderr."""
    handlers = {
        "serve": _serve,
        "ps": _ps,
        "stop": _stop,
        "logs": _logs,
        "profiles": _profiles,
        "doctor": _doctor,
    }
    command = getattr(args, "server_command", None)
    if command not in handlers:
        _err(f"Unknown command {command!r}; choose one of {', '.join(COMMANDS)}.")
        return 2
    manager = ServerManager()
    try:
        return handlers[command](args, manager)
    except UsageError as exc:
        _err(str(exc))
        return 2
    except TuichatError as exc:
        _err(str(exc))
        return 1
    finally:
        manager.close()


def _out(text: str = "") -> None:
    print(text, flush=True)


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def _load_profiles() -> tuple[Any, dict[str, Profile], str]:
    """(config, profiles, default name); a broken config file raises its ConfigError."""
    from tuichat.config import load_config

    cfg = load_config()
    default = cfg.default_profile or DEFAULT_PROFILE_NAME
    return cfg, dict(cfg.profiles), default


def _pick_profile(name: str | None) -> tuple[str, Profile]:
    _cfg, profiles, default = _load_profiles()
    chosen = name or default
    if chosen not in profiles:
        import difflib

        close = difflib.get_close_matches(chosen, list(profiles), n=1)
        hint = f" Did you mean {close[0]}?" if close else " See `tuichat profiles`."
        raise TuichatError(f"No profile is called {chosen}.{hint}")
    return chosen, profiles[chosen]


# ---------------------------------------------------------------- serve


class _ProgressPrinter:
    """Prints a progress line when the step changes or moves by 10 %, never once per tqdm update."""

    def __init__(self) -> None:
        self._last: tuple[str, int] | None = None
        self._ranks: tuple[tuple[int, str], ...] = ()

    def __call__(self, status: ServerStatus) -> None:
        if status.ranks and status.ranks != self._ranks and status.state == "starting":
            # tensor parallelism: each rank's step, so a rank that lags (or hangs) shows
            self._ranks = status.ranks
            _err(f"  {status.ranks_text()}")
        p = status.progress
        if p is None or status.state != "starting":
            return
        step = -1 if p.fraction is None else int(p.fraction * 10)
        if self._last == (p.label, step):
            return
        self._last = (p.label, step)
        amount = "" if p.fraction is None else f" {p.fraction * 100:.0f}%"
        _err(f"  {p.label}{amount}")


def _report_failure(server: ManagedServer, status: ServerStatus) -> None:
    _err(status.message or f"{server.name} did not start.")
    lines = status.last_lines or tuple(server.log_tail(12))
    if lines:
        _err(f"Last lines of {server.log_path}:")
        for line in lines:
            _err(f"  {line}")


def _stop_now(manager: ServerManager, server: ManagedServer) -> StopResult:
    try:
        return manager.stop(server)
    except KeyboardInterrupt:  # Ctrl+C again while stopping: no more waiting
        return manager.stop(server, timeout=0.0)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _stop_signals() -> Iterator[None]:
    """SIGINT and SIGTERM both mean "stop the server, then exit", like Ctrl+C.

    Set even where SIGINT was ignored at start (a shell's background job), as uvicorn does for lmdeploy:
    `kill -INT` must stop a foreground serve the same way everywhere, and a plain `kill` must not end tuichat
    and leave the server it owns running.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve(args: argparse.Namespace, manager: ServerManager) -> int:
    if args.profile:
        cfg, _profiles, _default = _load_profiles()
        if args.profile in cfg.fleets:
            with _stop_signals():
                return _serve_fleet(args, manager, cfg.fleets[args.profile], dict(cfg.profiles))
    name, profile = _pick_profile(args.profile)
    with _stop_signals():
        return _serve_started(args, manager, name, profile)


def _offer_fixes(failed: PreflightFailed) -> bool:
    """On a terminal, offer to run the commands that fix a blocked launch (`tuichat pull ID`); True when every
    error had one and each ran to its end, so the launch can be tried again."""
    errors = [c for c in failed.checks if c.level == "error"]
    if not errors or any(c.fix is None for c in errors) or not (sys.stdin.isatty() and sys.stderr.isatty()):
        return False
    for check in errors:
        assert check.fix is not None
        _err(check.message)
        try:
            answer = input(f"Run `{check.fix}` now? [Y/n] ").strip().lower()
        except EOFError:
            return False
        if answer not in ("", "y", "yes"):
            return False
        if _run_fix(check.fix) != 0:
            return False
    return True


def _run_fix(command: str) -> int:
    """Run a preflight's fix command (a tuichat subcommand) in this process, with its own progress output."""
    import shlex

    from tuichat.cli.main import main

    words = shlex.split(command)
    return main(words[1:]) if words[:1] == ["tuichat"] else 1


def _serve_started(args: argparse.Namespace, manager: ServerManager, name: str, profile: Profile) -> int:
    printer = _ProgressPrinter()
    spawned: list[ManagedServer] = []

    def on_event(event: LaunchEvent) -> None:
        if isinstance(event, Checked):
            for check in event.checks:
                _err(f"Warning: {check.message}")
        elif isinstance(event, Started):
            spawned.append(event.server)
            _err(f"Starting {name} ({profile.model}) at {event.server.url}; log: {event.server.log_path}")
        else:
            printer(event.status)

    def start() -> ManagedServer:
        launched = launch(manager, name, profile, on_event, timeout=args.timeout)
        server, status = launched.server, launched.status
        assert status is not None  # a waited launch always has one
        if status.state != "ready":
            if status.state == "starting":  # timed out: do not leave a half-started server behind
                _stop_now(manager, server)
            _report_failure(server, status)
            raise _Failed
        return server

    ready = False
    # one handler around everything after the spawn: a Ctrl+C at any moment must not leave the server behind
    try:
        try:
            server = start()
        except PreflightFailed as failed:
            if not _offer_fixes(failed):
                raise
            server = start()
        ready = True
        _out(f"{name} is ready at {server.url} (model {server.model_name}); API key in {server.key_file}")
        if args.detach:
            server.close()
            return 0
        _err("Press Ctrl+C to stop it.")
        while True:
            status = server.poll()
            if status.state == "failed":
                _report_failure(server, status)
                return 1
            if status.state == "stopped":
                _err(status.message or f"{name} stopped.")
                return 0
            time.sleep(1.0)
    except _Failed:
        return 1
    except KeyboardInterrupt:
        if not spawned:
            return 130
        result = _stop_now(manager, spawned[-1])
        _err(result.describe(name))
        if not ready:
            return 130
        return 0 if result.clean else 1


class _Failed(Exception):
    """The server did not become ready; what happened was already reported."""


def _serve_fleet(args: argparse.Namespace, manager: ServerManager, spec: Any, profiles: dict[str, Profile]) -> int:
    from tuichat.server.fleet import FleetEvent, describe_node, find_fleet, start_fleet, stop_fleet

    def report(event: FleetEvent) -> None:
        _err(f"  {event.message}" if event.kind == "progress" else event.message)

    _err(f"Starting fleet {spec.name}: {len(spec.nodes)} node(s) behind lmdeploy's proxy")
    try:
        fleet = start_fleet(manager, spec, profiles, on_event=report, timeout=args.timeout)
    except KeyboardInterrupt:
        return 130
    proxy = fleet.proxy
    assert proxy is not None
    _out(
        f"Fleet {spec.name} is ready at {proxy.url} ({len(fleet.nodes)} nodes); API key in {proxy.key_file}; "
        f"chat with `tuichat {spec.name}`"
    )
    if args.detach:
        return 0
    _err("Press Ctrl+C to stop the fleet.")
    shown: dict[str, str] = {}
    try:
        with fleet.poller(supervise=True) as poller:
            while True:
                view = poller.poll()
                for node in view.nodes:
                    line = f"{node.name or node.url}: {describe_node(node)}"
                    health = f"{node.health}/{node.registered}"
                    if shown.get(node.url) != health:
                        shown[node.url] = health
                        _err(line)
                if find_fleet(manager, spec.name) is None or not proxy.is_alive():
                    _err(f"The proxy of {spec.name} is no longer running; stopping the rest of the fleet.")
                    raise KeyboardInterrupt
                time.sleep(1.0)
    except KeyboardInterrupt:
        current = find_fleet(manager, spec.name) or fleet
        clean, events = stop_fleet(manager, current)
        for event in events:
            _err(event.message)
        return 0 if clean else 1


# ---------------------------------------------------------------- ps / stop


def _state_text(status: ServerStatus) -> str:
    if status.state == "starting" and status.progress is not None and status.progress.fraction is not None:
        return f"starting {status.progress.fraction * 100:.0f}%"
    return status.state


def _ps(args: argparse.Namespace, manager: ServerManager) -> int:
    from tuichat.server.fleet import running_fleets

    servers = manager.running()
    fleets = running_fleets(manager)
    if not servers and not fleets:
        _out("No server started by tuichat is running.")
        return 0
    snapshot = manager.gpu_snapshot()
    if servers:
        _ps_servers(servers, snapshot)
    for fleet in fleets.values():
        _ps_fleet(fleet, snapshot)
    return 0


def _ps_servers(servers: list[ManagedServer], snapshot: Any) -> None:
    from tuichat.server.gpu import format_bytes

    rows = []
    for server in servers:
        status = server.poll()
        memory = server.gpu_memory(snapshot)
        per_gpu = server.gpu_memory_by_gpu(snapshot)
        shown = format_bytes(memory) if memory else "-"
        if len(per_gpu) > 1:  # tensor parallelism: the share on each GPU
            shown += " (" + ", ".join(f"GPU{i} {format_bytes(b)}" for i, b in per_gpu) + ")"
        rows.append(
            [
                server.name,
                server.profile.model,
                str(server.record.port),
                str(server.pid),
                _state_text(status),
                format_compact(server.uptime),
                shown,
            ]
        )
        server.close()
    _out(_table(["PROFILE", "MODEL", "PORT", "PID", "STATE", "UPTIME", "GPU MEM"], rows))


def _ps_fleet(fleet: Any, snapshot: Any) -> None:
    """The proxy, then each node: its process (state, pid, GPU memory) and what the proxy and the node say."""
    from tuichat.server.fleet import NodeView
    from tuichat.server.gpu import format_bytes

    views: dict[str, NodeView] = {}
    error = None
    if fleet.proxy is not None:
        with fleet.poller(supervise=False) as poller:
            view = poller.poll()
        views = {n.url: n for n in view.nodes}
        error = view.error
    proxy = fleet.proxy
    where = f"proxy at {proxy.url}" if proxy is not None else "proxy not running"
    up = sum(1 for n in views.values() if n.health == "up" and n.registered)
    _out("")
    _out(f"Fleet {fleet.name}: {where}; {up} of {len(fleet.nodes)} nodes up and registered")
    if error:
        _out(f"  {error}")
    rows = []
    for server in fleet.members:
        status = server.poll()
        memory = server.gpu_memory(snapshot)
        node = views.get(server.url)
        if server.is_proxy:
            detail = "proxy, " + ("no nodes" if not views else f"{len(views)} node(s) listed")
        elif node is None:
            detail = "-"
        else:
            from tuichat.server.fleet import describe_node

            detail = describe_node(node)
        rows.append(
            [
                server.name,
                server.profile.model,
                str(server.record.port),
                str(server.pid),
                _state_text(status),
                format_compact(server.uptime),
                format_bytes(memory) if memory else "-",
                detail,
            ]
        )
        server.close()
    known = {s.url for s in fleet.members}
    for url, node in views.items():
        if url not in known:  # registered by someone else: the proxy is open to anyone who can reach it
            from tuichat.server.fleet import describe_node

            rows.append([url, ",".join(node.models) or "?", "-", "-", "-", "-", "-", describe_node(node)])
    _out(_table(["NODE", "MODEL", "PORT", "PID", "STATE", "UPTIME", "GPU MEM", "AT THE PROXY"], rows))


def _stop(args: argparse.Namespace, manager: ServerManager) -> int:
    from tuichat.server.fleet import running_fleets, stop_fleet

    if args.profile and args.all:
        raise UsageError("Give either a profile or --all, not both.")
    servers = manager.running()
    fleets = running_fleets(manager)
    chosen = list(fleets.values()) if args.all else [fleets[args.profile]] if args.profile in fleets else []
    if not args.profile and not args.all and fleets:
        if servers or len(fleets) > 1:
            names = ", ".join([*(s.name for s in servers), *fleets])
            raise UsageError(f"Several servers or fleets are running ({names}): name one, or use --all.")
        chosen = list(fleets.values())
    fleets_ok = True
    for fleet in chosen:
        _err(f"Stopping fleet {fleet.name} ({len(fleet.members)} processes)…")
        clean, events = stop_fleet(manager, fleet)
        for event in events:
            _out(event.message)
        fleets_ok = fleets_ok and clean
    if chosen and not args.all:
        return 0 if fleets_ok else 1
    if args.all and not servers:
        if not chosen:
            _out("No server started by tuichat is running.")
        return 0 if fleets_ok else 1
    if args.all:
        targets = servers
    elif args.profile:
        targets = [s for s in servers if s.name == args.profile]
        if not targets:
            raise TuichatError(f"No server for profile {args.profile} is running (see `tuichat ps`).")
    elif len(servers) == 1:
        targets = servers
    elif not servers:
        targets = []
    else:
        names = ", ".join(s.name for s in servers)
        raise UsageError(f"Several servers are running ({names}): name one, or use --all.")
    if not targets:
        _out("No server started by tuichat is running.")
        return 0
    ok = True
    for server in targets:
        _err(f"Stopping {server.name} (pid {server.pid})…")
        result = manager.stop(server)
        _out(result.describe(server.name))
        ok = ok and result.clean
    return 0 if ok and fleets_ok else 1


# ---------------------------------------------------------------- logs


def _logs(args: argparse.Namespace, manager: ServerManager) -> int:
    if args.lines < 0:
        raise UsageError("-n must be 0 or more lines.")
    name = args.profile
    log = manager.log_path(name)
    if not log.exists():
        raise TuichatError(f"There is no log for {name}: it was never started on this machine (see `tuichat ps`).")
    server = manager.find(name)
    secret = server.api_key if server is not None else None
    follower = LogFollower(log, start_at_end=0)  # the tail below covers what is already there
    for line in read_log_tail(log, args.lines, secret):
        _out(line)
    if not args.follow:
        return 0
    if server is None:
        _err(f"{name} is not running.")
        return 0
    last_progress = 0.0
    shown = ""
    checked = time.monotonic()
    try:
        while True:
            lines, partial = follower.read()
            for line in lines:
                _out(mask_secret(clean(collapse_cr(line)).rstrip(), secret))
            bar = parse_progress(collapse_cr(partial)) if partial else None
            now = time.monotonic()
            if bar is not None and bar.text != shown and now - last_progress >= 2.0:
                _out(mask_secret(bar.text, secret))
                shown, last_progress = bar.text, now
            if now - checked >= 1.0:
                checked = now
                if not server.is_alive():
                    for line in follower.read()[0]:
                        _out(mask_secret(clean(collapse_cr(line)).rstrip(), secret))
                    _err(f"{name} is no longer running.")
                    return 0
            time.sleep(0.25)
    except KeyboardInterrupt:
        return 0


# ---------------------------------------------------------------- profiles / doctor


def _profiles(args: argparse.Namespace, manager: ServerManager) -> int:
    cfg, profiles, default = _load_profiles()
    exists = "" if cfg.path.exists() else " (not created yet)"
    _out(f"Profiles from {cfg.path}{exists}; * marks the default:")
    rows = []
    for name, p in sorted(profiles.items()):
        source = "config" if name in cfg.user_profiles else "built-in"
        if name in cfg.user_profiles and name in BUILTIN_PROFILES:
            source = "config (overrides built-in)"
        rows.append(
            [
                ("* " if name == default else "  ") + name,
                p.model,
                p.backend or "-",
                p.model_format or "-",
                str(p.port),
                source,
            ]
        )
    _out(_table(["  NAME", "MODEL", "BACKEND", "FORMAT", "PORT", "SOURCE"], rows))
    return 0


def _doctor(args: argparse.Namespace, manager: ServerManager) -> int:
    import tuichat

    problems = 0
    _out(f"tuichat   {tuichat.__version__} (Python {sys.version.split()[0]} at {sys.executable})")
    version, origin = lmdeploy_version(None), lmdeploy_origin()
    if origin is None:
        _out('lmdeploy  not installed in this Python: run pip install "tuichat[lmdeploy]"')
        problems += 1
    else:
        _out(f"lmdeploy  {version or 'unknown version'} from {origin}")
    try:
        _cfg, profiles, default = _load_profiles()
    except TuichatError as exc:
        _out(f"config    {paths.config_file()}: {exc}")
        problems += 1
        profiles, default = {}, DEFAULT_PROFILE_NAME
    else:
        state = "" if paths.config_file().exists() else " (not created yet; built-in profiles in use)"
        _out(f"config    {paths.config_file()}{state}")
    for name, profile in sorted(profiles.items()):
        make = make_model_hint(profile.model)
        if make is not None and not Path(profile.model).expanduser().is_dir():
            _out(f"profile   {name}: its model {profile.model} is not made yet; run `{make}` first")
        if not profile.uses_default_command:
            found = lmdeploy_version(profile.argv_prefix, timeout=10.0)
            shown = " ".join(profile.argv_prefix)
            _out(f"profile   {name}: command {shown} -> lmdeploy {found or 'not found'}")
    _out(f"state     {manager.state_dir}")
    _out(f"data      {paths.data_dir()}")
    _gpu_lines(manager)
    running = manager.running()
    _out(f"servers   {len(running)} running" + (f": {', '.join(s.name for s in running)}" if running else ""))
    _out(f"default   profile {default}")
    return 0 if problems == 0 else 1


def _gpu_lines(manager: ServerManager) -> None:
    try:
        from tuichat.server.gpu import describe_no_gpu, format_bytes
    except ImportError:
        _out("GPUs      unknown (GPU support missing)")
        return
    snapshot = manager.gpu_snapshot()
    if snapshot is None:
        _out("GPUs      unknown (no GPU reader)")
        return
    if snapshot.error is not None or not snapshot.gpus:
        _out(f"GPUs      {describe_no_gpu(snapshot)}")
        return
    for gpu in snapshot.gpus:
        if gpu.mem_total is not None and gpu.mem_used is not None:
            free = f"{format_bytes(gpu.mem_total - gpu.mem_used)} free of {format_bytes(gpu.mem_total)}"
        else:
            free = "memory unknown"
        _out(f"GPU {gpu.index}     {gpu.name}: {free}")
