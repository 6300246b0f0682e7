"""Fleets: several api_servers behind lmdeploy's own `lmdeploy serve proxy`, launched, watched and stopped as one.

A fleet is a `[fleets.NAME]` table of config.toml: the launch profiles of its nodes and the proxy's settings.

    [fleets.pair]
    nodes = ["tiny", "tiny"]          # profile names; one may repeat (two servers of one model)
    proxy_port = 8000                 # or "auto"
    routing_strategy = "min_expected_latency"

`start_fleet` starts the proxy first (a node registers once, at start-up, and never retries), then every node on
127.0.0.1 with `--proxy-url`, each in its own process group with its own key; a node also accepts the proxy's key,
because the proxy forwards the client's Authorization header as it is. It waits until every node is ready and
listed by the proxy's `/nodes/status`, reports each step, and stops everything it started on any failure.

lmdeploy 0.18's proxy drops a node only when its `/health` fails a check it runs every 90 s; tuichat's proxy runs it
every `health_check_interval` seconds (`LMDEPLOY_CONTROLLER_HEART_BEAT_EXPIRATION`), and a `FleetPoller` that
supervises a fleet tuichat launched removes a node whose process is gone at once, so chat goes on through the
others within a poll.

`FleetPoller` also attaches to any proxy by URL: per node it shows what the proxy knows (models, unfinished
requests, recent latencies, speed) and what only the node itself can say (its `/health`, and with the node's key,
which tuichat has for nodes it launched, KV-cache use and running/waiting requests from `/metrics`).

Record names: the proxy is recorded as the fleet's name, each node as `FLEET.PROFILE` (`FLEET.PROFILE-2` for a
profile listed twice), so `tuichat logs pair.tiny` shows one node's log.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import difflib
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import httpx

from tuichat.errors import ConfigError, TuichatError
from tuichat.server.attribution import NodeCounters, NodeReading, ReplyLedger, read_counters
from tuichat.server.launcher import LaunchError, ManagedServer, ServerManager, ServerStatus
from tuichat.server.metrics import parse_metrics
from tuichat.server.procgroup import StopResult
from tuichat.server.profiles import MAX_API_KEY_LENGTH, ROUTING_STRATEGIES, Profile, validate_name

DEFAULT_PROXY_PORT = 8000  # lmdeploy's own default for the proxy
DEFAULT_HEALTH_CHECK_INTERVAL = 10
HEARTBEAT_ENV = "LMDEPLOY_CONTROLLER_HEART_BEAT_EXPIRATION"
PROXY_READY_TIMEOUT = 120.0  # the real proxy imports torch before it listens
REGISTER_GRACE = 10.0  # seconds a ready node may stay unlisted before tuichat registers it itself
POLL_TIMEOUT = 1.0
FLEET_KEYS = ("nodes", "proxy_port", "routing_strategy", "api_key", "proxy_command", "health_check_interval")


@dataclass(frozen=True)
class FleetSpec:
    """One `[fleets.NAME]` table, validated."""

    name: str
    nodes: tuple[str, ...]
    proxy_port: int | Literal["auto"] = DEFAULT_PROXY_PORT
    routing_strategy: str = ROUTING_STRATEGIES[0]
    api_key: str | None = None
    # None: [sys.executable, "-m", "lmdeploy"], as for profiles
    proxy_command: tuple[str, ...] | None = None
    health_check_interval: int = DEFAULT_HEALTH_CHECK_INTERVAL

    def node_names(self) -> list[tuple[str, str]]:
        """(record name, profile name) of every node, in order; a repeated profile gets -2, -3, ..."""
        seen: dict[str, int] = {}
        out = []
        for profile in self.nodes:
            seen[profile] = seen.get(profile, 0) + 1
            suffix = f"-{seen[profile]}" if seen[profile] > 1 else ""
            out.append((f"{self.name}.{profile}{suffix}", profile))
        return out


def parse_fleet(name: str, table: Mapping[str, object], file: Path | str, profiles: Mapping[str, Profile]) -> FleetSpec:
    """Validate `[fleets.NAME]` against the known profiles; raises ConfigError naming file and key."""
    where = f"fleets.{name}"

    def fail(key: str, message: str) -> ConfigError:
        return ConfigError(file, f"{where}.{key}" if key else where, message)

    try:
        validate_name(name)
    except ConfigError:
        raise fail(
            "",
            "a fleet name must be 1-64 letters, digits, '_' or '-', starting with a letter or digit",
        ) from None
    if "." in name:
        raise fail("", "a fleet name must not contain '.': its nodes are recorded as FLEET.PROFILE")
    if name in profiles:
        raise fail("", f"'{name}' is also a profile: give the fleet another name, so `tuichat serve {name}` is clear")
    if not isinstance(table, Mapping):
        raise fail("", "must be a table, e.g. [fleets." + name + "]")
    for key in table:
        if key not in FLEET_KEYS:
            close = difflib.get_close_matches(str(key), FLEET_KEYS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(FLEET_KEYS)}"
            raise fail(str(key), f"is not a fleet setting{hint}")
    if "nodes" not in table:
        raise fail("nodes", 'is required: the profiles to launch, e.g. nodes = ["tiny", "tiny"]')
    nodes = table["nodes"]
    if isinstance(nodes, str) or not isinstance(nodes, list | tuple) or not all(isinstance(n, str) for n in nodes):
        raise fail("nodes", 'must be a list of profile names in quotes, e.g. nodes = ["tiny", "tiny"]')
    if not nodes:
        raise fail("nodes", "must name at least one profile")
    for node in nodes:
        if node not in profiles:
            close = difflib.get_close_matches(node, list(profiles), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else " (see `tuichat profiles`)"
            raise fail("nodes", f"no profile is called '{node}'{hint}")
        if nodes.count(node) > 1 and isinstance(profiles[node].port, int):
            raise fail(
                "nodes",
                f"profile '{node}' is listed {nodes.count(node)} times but has the fixed port {profiles[node].port}: "
                'set port = "auto" in it, so each node gets its own',
            )
    values: dict[str, Any] = {"name": name, "nodes": tuple(nodes)}
    if "proxy_port" in table:
        port = table["proxy_port"]
        if port != "auto" and (isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535):
            raise fail("proxy_port", f'must be "auto" or a port number between 1 and 65535 (got {port!r})')
        values["proxy_port"] = port
    if "routing_strategy" in table:
        strategy = table["routing_strategy"]
        if strategy not in ROUTING_STRATEGIES:
            close = difflib.get_close_matches(str(strategy), ROUTING_STRATEGIES, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise fail("routing_strategy", f"must be one of {', '.join(ROUTING_STRATEGIES)}{hint}")
        values["routing_strategy"] = strategy
    if "api_key" in table:
        api_key = table["api_key"]
        if not isinstance(api_key, str) or not api_key or any(c.isspace() for c in api_key) or api_key.startswith("-"):
            raise fail("api_key", "must be a string without spaces that does not start with '-'")
        if len(api_key) > MAX_API_KEY_LENGTH:
            raise fail("api_key", f"must be at most {MAX_API_KEY_LENGTH} characters")
        values["api_key"] = api_key
    if "proxy_command" in table:
        command = table["proxy_command"]
        if isinstance(command, str) or not isinstance(command, list | tuple) or not command:
            raise fail(
                "proxy_command", 'must be a non-empty list of strings, e.g. ["/env/bin/python", "-m", "lmdeploy"]'
            )
        if not all(isinstance(c, str) and c for c in command):
            raise fail("proxy_command", "must be a list of strings; every item needs quotes")
        values["proxy_command"] = tuple(command)
    if "health_check_interval" in table:
        interval = table["health_check_interval"]
        if isinstance(interval, bool) or not isinstance(interval, int) or not 1 <= interval <= 3600:
            raise fail("health_check_interval", f"must be a whole number of seconds from 1 to 3600 (got {interval!r})")
        values["health_check_interval"] = interval
    return FleetSpec(**values)


def fleet_to_table(spec: FleetSpec) -> dict[str, object]:
    """The TOML table for `spec`: `nodes` plus what differs from the defaults."""
    table: dict[str, object] = {"nodes": list(spec.nodes)}
    default = FleetSpec(name=spec.name, nodes=spec.nodes)
    for key in FLEET_KEYS[1:]:
        value = getattr(spec, key)
        if value != getattr(default, key) and value is not None:
            table[key] = list(value) if isinstance(value, tuple) else value
    return table


# ---------------------------------------------------------------- a running fleet


@dataclass
class RunningFleet:
    """The live processes of one fleet tuichat launched (found through the launcher's records)."""

    name: str
    proxy: ManagedServer | None
    nodes: list[ManagedServer] = field(default_factory=list)

    @property
    def url(self) -> str | None:
        """Where to chat: the proxy."""
        return self.proxy.url if self.proxy is not None else None

    @property
    def api_key(self) -> str | None:
        """The key clients send to the proxy (every node accepts it too)."""
        return self.proxy.api_key if self.proxy is not None else None

    @property
    def members(self) -> list[ManagedServer]:
        return [*([self.proxy] if self.proxy is not None else []), *self.nodes]

    def node_keys(self) -> dict[str, str]:
        """Each node's own key by its URL: for reading its /metrics directly."""
        return {n.url: key for n in self.nodes if (key := n.api_key)}

    def poller(self, *, supervise: bool = True) -> FleetPoller:
        """A poller of this fleet's proxy that knows every node's key; with `supervise`, it also keeps the proxy's
        node list in step with the processes (see FleetPoller)."""
        if self.url is None:
            raise TuichatError(f"The proxy of fleet {self.name} is not running: stop the fleet and serve it again.")
        return FleetPoller(
            self.url,
            self.api_key,
            node_keys=self.node_keys(),
            node_names={n.url: n.name for n in self.nodes},
            supervised=self if supervise else None,
        )


def running_fleets(manager: ServerManager) -> dict[str, RunningFleet]:
    """Every fleet with a live proxy or node, by name."""
    fleets: dict[str, RunningFleet] = {}
    for server in manager.fleet_members():
        assert server.fleet is not None
        fleet = fleets.setdefault(server.fleet, RunningFleet(server.fleet, None))
        if server.is_proxy:
            fleet.proxy = server
        else:
            fleet.nodes.append(server)
    for fleet in fleets.values():
        fleet.nodes.sort(key=lambda s: s.record.started_at)
    return fleets


def find_fleet(manager: ServerManager, name: str) -> RunningFleet | None:
    return running_fleets(manager).get(name)


# ---------------------------------------------------------------- starting and stopping


@dataclass(frozen=True)
class FleetEvent:
    """One step of a fleet's start or stop, for a progress report. `node` is None for the proxy."""

    node: str | None
    kind: Literal["starting", "progress", "ready", "registered", "failed", "stopped", "note"]
    message: str


EventSink = Callable[[FleetEvent], None]


def _quiet(_event: FleetEvent) -> None:
    pass


def start_fleet(
    manager: ServerManager,
    spec: FleetSpec,
    profiles: Mapping[str, Profile],
    *,
    on_event: EventSink = _quiet,
    timeout: float | None = None,
    interval: float = 0.2,
) -> RunningFleet:
    """Start the proxy, then every node; return once every node is ready and registered with the proxy.

    On any failure (a node that exits while loading, the proxy dying, `timeout`, Ctrl+C) everything started here is
    stopped before the error goes up: a LaunchError whose message names the node and says why.
    """
    if find_fleet(manager, spec.name) is not None:
        raise LaunchError(
            f"Fleet {spec.name} is already running (see `tuichat ps`); stop it first with `tuichat stop {spec.name}`."
        )
    plan: list[tuple[str, Profile]] = []
    problems: list[str] = []
    for node_name, profile_name in spec.node_names():
        profile = profiles.get(profile_name)
        if profile is None:
            raise LaunchError(f"Fleet {spec.name} names the profile {profile_name}, which does not exist.")
        # loopback only: the URL a node registers is built from its --server-name
        profile = replace(profile, server_name="127.0.0.1")
        problems += [f"{node_name}: {c.message}" for c in manager.preflight(profile) if c.level == "error"]
        plan.append((node_name, profile))
    if problems:
        raise LaunchError(f"Cannot start fleet {spec.name}: " + " ".join(problems))

    deadline = None if timeout is None else time.monotonic() + timeout
    started: list[ManagedServer] = []
    try:
        proxy = manager.start_proxy(
            spec.name,
            fleet=spec.name,
            port=spec.proxy_port,
            routing_strategy=spec.routing_strategy,
            api_key=spec.api_key or "tuichat-" + secrets.token_urlsafe(32),
            command=spec.proxy_command,
            env={HEARTBEAT_ENV: str(spec.health_check_interval)},
        )
        started.append(proxy)
        on_event(
            FleetEvent(None, "starting", f"Starting the proxy of {spec.name} at {proxy.url}; log: {proxy.log_path}")
        )
        wait = PROXY_READY_TIMEOUT if deadline is None else max(deadline - time.monotonic(), 0.1)
        status = proxy.wait_ready(timeout=wait, interval=interval)
        if status.state != "ready":
            raise LaunchError(_why(f"The proxy of {spec.name}", status))
        on_event(FleetEvent(None, "ready", f"Proxy ready at {proxy.url} ({spec.routing_strategy})"))
        proxy_key = proxy.api_key or ""
        nodes: list[ManagedServer] = []
        for node_name, profile in plan:
            node = manager.start(node_name, profile, fleet=spec.name, proxy_url=proxy.url, extra_keys=(proxy_key,))
            started.append(node)
            nodes.append(node)
            on_event(FleetEvent(node_name, "starting", f"Starting {node_name} ({profile.model}) at {node.url}"))
        _wait_registered(spec, proxy, nodes, on_event, deadline, interval)
        return RunningFleet(spec.name, proxy, nodes)
    except BaseException:
        for event in _stop_members(manager, started):
            on_event(event)
        raise


def _why(what: str, status: ServerStatus) -> str:
    message = status.message or f"{what} did not start."
    if status.state == "starting":
        return f"{what} was not ready in time; everything of the fleet was stopped."
    return f"{what} failed: {message}"


def _wait_registered(
    spec: FleetSpec,
    proxy: ManagedServer,
    nodes: list[ManagedServer],
    on_event: EventSink,
    deadline: float | None,
    interval: float,
) -> None:
    progress: dict[str, tuple[str, int] | None] = {n.name: None for n in nodes}
    ready_at: dict[str, float] = {}
    registered: set[str] = set()
    with httpx.Client(trust_env=False, timeout=POLL_TIMEOUT) as http:
        while True:
            for node in nodes:
                if node.name in ready_at:
                    continue
                status = node.poll()
                if status.state in ("failed", "stopped"):
                    raise LaunchError(_why(f"Node {node.name}", status) + " The rest of the fleet was stopped.")
                if status.state == "ready":
                    ready_at[node.name] = time.monotonic()
                    on_event(FleetEvent(node.name, "ready", f"{node.name} ready at {node.url}"))
                elif status.progress is not None:
                    p = status.progress
                    step = (p.label, -1 if p.fraction is None else int(p.fraction * 10))
                    if progress[node.name] != step:
                        progress[node.name] = step
                        amount = "" if p.fraction is None else f" {p.fraction * 100:.0f}%"
                        on_event(FleetEvent(node.name, "progress", f"{node.name}: {p.label}{amount}"))
            if proxy.poll().state != "ready":
                raise LaunchError(_why(f"The proxy of {spec.name}", proxy.poll()) + " The fleet was stopped.")
            listed = _listed_nodes(http, proxy.url)
            for node in nodes:
                if node.name not in ready_at or node.name in registered:
                    continue
                if node.url in listed:
                    registered.add(node.name)
                    on_event(FleetEvent(node.name, "registered", f"{node.name} registered with the proxy"))
                elif time.monotonic() - ready_at[node.name] > REGISTER_GRACE:
                    # its own registration (once, at start-up) failed: the proxy's log says why
                    register_node(http, proxy.url, node.url, [node.model_name])
                    on_event(FleetEvent(node.name, "note", f"{node.name} did not register itself; tuichat added it"))
                    ready_at[node.name] = time.monotonic()
            if len(registered) == len(nodes):
                return
            if deadline is not None and time.monotonic() >= deadline:
                waiting = ", ".join(n.name for n in nodes if n.name not in registered)
                raise LaunchError(f"Fleet {spec.name} was not ready in time (waiting for {waiting}); it was stopped.")
            time.sleep(interval)


def _listed_nodes(http: httpx.Client, proxy_url: str) -> dict[str, dict[str, Any]]:
    try:
        resp = http.get(f"{proxy_url}/nodes/status")
        data = resp.json() if resp.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(url): status for url, status in data.items() if isinstance(status, dict)}


def register_node(http: httpx.Client, proxy_url: str, node_url: str, models: list[str]) -> bool:
    """Add a node to a proxy with its models (so the proxy does not ask the node's /v1/models without a key)."""
    try:
        resp = http.post(f"{proxy_url}/nodes/add", json={"url": node_url, "status": {"models": models}})
    except httpx.HTTPError:
        return False
    return resp.status_code == 200


def remove_node(http: httpx.Client, proxy_url: str, node_url: str) -> bool:
    try:
        resp = http.post(f"{proxy_url}/nodes/remove", json={"url": node_url})
    except httpx.HTTPError:
        return False
    return resp.status_code == 200


def _stop_members(manager: ServerManager, members: Iterable[ManagedServer]) -> list[FleetEvent]:
    return [event for event, _result in _stop_all(manager, members)]


def _stop_all(manager: ServerManager, members: Iterable[ManagedServer]) -> list[tuple[FleetEvent, StopResult]]:
    """Stop the proxy first (no new request reaches a stopping node), then every node at once."""
    members = list(members)
    events: list[tuple[FleetEvent, StopResult]] = []
    proxies = [m for m in members if m.is_proxy]
    nodes = [m for m in members if not m.is_proxy]
    results: dict[str, StopResult] = {}
    for proxy in proxies:
        results[proxy.name] = manager.stop(proxy)
    lock = threading.Lock()

    def stop(node: ManagedServer) -> None:
        result = manager.stop(node)
        with lock:
            results[node.name] = result

    threads = [threading.Thread(target=stop, args=(n,), daemon=True) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for member in members:
        result = results[member.name]
        event = FleetEvent(None if member.is_proxy else member.name, "stopped", result.describe(member.name))
        events.append((event, result))
    return events


def stop_fleet(manager: ServerManager, fleet: RunningFleet) -> tuple[bool, list[FleetEvent]]:
    """Stop every process of `fleet` (the launcher's group stop and NVML check for each); (clean, events)."""
    done = _stop_all(manager, fleet.members)
    clean = find_fleet(manager, fleet.name) is None and all(result.clean for _event, result in done)
    return clean, [event for event, _result in done]


# ---------------------------------------------------------------- watching


@dataclass(frozen=True)
class NodeView:
    """One node as the proxy lists it and as it answers itself."""

    url: str
    name: str | None = None  # tuichat's name for a node it launched
    registered: bool = True  # listed by the proxy's /nodes/status
    health: Literal["up", "down", "starting", "unknown"] = "unknown"
    models: tuple[str, ...] = ()
    unfinished: int | None = None
    latency: float | None = None  # mean of the proxy's recent latencies, s
    latency_samples: int = 0
    speed: float | None = None
    kv_cache_usage: float | None = None
    running: int | None = None
    waiting: int | None = None
    note: str | None = None
    counters: NodeCounters | None = None  # work done so far, for telling which node served a reply
    health_since: float | None = None  # monotonic time the node was first seen in its current health


@dataclass(frozen=True)
class FleetView:
    """A proxy and its nodes at one moment."""

    url: str
    name: str | None = None
    nodes: tuple[NodeView, ...] = ()
    error: str | None = None
    polled_from: float = 0.0  # time.monotonic() when the poll began, and when every node had been read
    polled_to: float = 0.0

    @property
    def up(self) -> int:
        return sum(1 for n in self.nodes if n.health == "up" and n.registered)


def node_label(node: NodeView) -> str:
    """The short name a person reads: the profile of a node tuichat launched (the fleet is shown apart), else its
    host:port."""
    if node.name:
        return node.name.split(".", 1)[-1]
    return node.url.removeprefix("http://").removeprefix("https://")


def observe(ledger: ReplyLedger, view: FleetView) -> None:
    """Hand one poll to a reply ledger (see tuichat.server.attribution)."""
    if view.error is not None and not any(n.registered for n in view.nodes):
        return  # the proxy did not answer: this poll says nothing about the nodes' work
    readings = {n.url: NodeReading(node_label(n), n.health == "up", n.counters) for n in view.nodes}
    ledger.observe(readings, view.polled_from, view.polled_to)


def probe_proxy(url: str, api_key: str | None = None, *, timeout: float = 2.0) -> bool:
    """Whether `url` is an lmdeploy proxy: `/nodes/status` answers a table of nodes and `/health` does not exist
    (an api_server answers /health and not /nodes/status)."""
    del api_key  # /nodes/* is open even on a proxy with keys
    base = url.rstrip("/").removesuffix("/v1")
    try:
        with httpx.Client(trust_env=False, timeout=timeout) as http:
            resp = http.get(f"{base}/nodes/status")
            if resp.status_code != 200 or not isinstance(resp.json(), dict):
                return False
            return http.get(f"{base}/health").status_code != 200
    except (httpx.HTTPError, ValueError):
        return False


class FleetPoller:
    """Reads a proxy's node list and each node's own status; `poll()` blocks for about a second at most, so call
    it from a thread.

    With `supervised` (a fleet tuichat launched), it also keeps the proxy's list in step with the processes: a node
    whose process is gone is removed from the proxy at once (the proxy itself would route to it until its next
    health check), and a live, healthy node the proxy lost is added back.
    """

    def __init__(
        self,
        proxy_url: str,
        api_key: str | None = None,
        *,
        node_keys: Mapping[str, str] | None = None,
        node_names: Mapping[str, str] | None = None,
        supervised: RunningFleet | None = None,
        name: str | None = None,
        timeout: float = POLL_TIMEOUT,
    ) -> None:
        self.url = proxy_url.rstrip("/").removesuffix("/v1")
        self.api_key = api_key
        self.node_keys = dict(node_keys or {})
        self.node_names = dict(node_names or {})
        self.supervised = supervised
        self.name = name or (supervised.name if supervised is not None else None)
        self._http = httpx.Client(trust_env=False, timeout=timeout)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="fleet-poll")
        self._health_since: dict[str, tuple[str, float]] = {}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()

    def __enter__(self) -> FleetPoller:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def poll(self) -> FleetView:
        start = time.monotonic()
        view = self._poll()
        nodes = tuple(self._since(n) for n in view.nodes)
        return replace(view, nodes=nodes, polled_from=start, polled_to=time.monotonic())

    def _since(self, node: NodeView) -> NodeView:
        """Stamp a node with the time its health last changed (as this poller saw it)."""
        seen = self._health_since.get(node.url)
        if seen is None or seen[0] != node.health:
            seen = (node.health, time.monotonic())
            self._health_since[node.url] = seen
        return replace(node, health_since=seen[1])

    def _poll(self) -> FleetView:
        try:
            resp = self._http.get(f"{self.url}/nodes/status")
        except httpx.HTTPError as exc:
            return FleetView(
                self.url, self.name, self._unlisted({}), f"the proxy does not answer ({type(exc).__name__})"
            )
        try:
            data = resp.json() if resp.status_code == 200 else None
        except ValueError:
            data = None
        if not isinstance(data, dict):
            return FleetView(
                self.url, self.name, self._unlisted({}), f"the proxy answered {resp.status_code} to /nodes/status"
            )
        listed = {str(u): s for u, s in data.items() if isinstance(s, dict)}
        if self.supervised is not None:
            listed = self._tend(listed)
        urls = [*listed, *(u for u in self.node_names if u not in listed)]
        views = list(self._pool.map(lambda u: self._node(u, listed.get(u)), urls))
        if self.supervised is not None:
            # A node can die between _tend and _node (seen on the H200: the proxy then routed the next chat to the
            # dead node): what is shown down is taken off the proxy in the same poll.
            for i, view in enumerate(views):
                if view.health == "down" and view.registered and remove_node(self._http, self.url, view.url):
                    views[i] = replace(view, registered=False)
        return FleetView(self.url, self.name, tuple(views))

    def _unlisted(self, listed: Mapping[str, Any]) -> tuple[NodeView, ...]:
        return tuple(
            NodeView(url, name, registered=False, note="proxy unreachable")
            for url, name in self.node_names.items()
            if url not in listed
        )

    def _tend(self, listed: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        fleet = self.supervised
        assert fleet is not None
        for node in fleet.nodes:
            if not node.is_alive():
                if node.url in listed and remove_node(self._http, self.url, node.url):
                    listed = {u: s for u, s in listed.items() if u != node.url}
            elif (
                node.url not in listed
                and node.poll().state == "ready"
                and register_node(self._http, self.url, node.url, [node.model_name])
            ):
                listed = {**listed, node.url: {"models": [node.model_name], "unfinished": 0, "latency": []}}
        return listed

    def _node(self, url: str, status: Mapping[str, Any] | None) -> NodeView:
        name = self.node_names.get(url)
        if self.supervised is not None:
            member = next((n for n in self.supervised.nodes if n.url == url), None)
            if member is not None and not member.is_alive():
                return NodeView(url, name, registered=status is not None, health="down", note="process exited")
        health = self._health(url)
        view = NodeView(url, name, registered=status is not None, health=health)
        if status is not None:
            latency = [float(x) for x in status.get("latency") or [] if isinstance(x, int | float)]
            models = status.get("models") or []
            speed = status.get("speed")
            unfinished = status.get("unfinished")
            view = replace(
                view,
                models=tuple(str(m) for m in models) if isinstance(models, list) else (),
                unfinished=unfinished if isinstance(unfinished, int) else None,
                latency=sum(latency) / len(latency) if latency else None,
                latency_samples=len(latency),
                speed=float(speed) if isinstance(speed, int | float) and speed >= 0 else None,
            )
        else:
            view = replace(view, note="not registered with the proxy")
        key = self.node_keys.get(url)
        if health == "up" and key:
            with contextlib.suppress(httpx.HTTPError, TuichatError, ValueError):
                resp = self._http.get(f"{url}/metrics", headers={"Authorization": f"Bearer {key}"})
                if resp.status_code == 200:
                    m = parse_metrics(resp.text)
                    view = replace(
                        view,
                        kv_cache_usage=m.kv_cache_usage,
                        running=m.running,
                        waiting=m.waiting,
                        counters=read_counters(resp.text),
                    )
        return view

    def _health(self, url: str) -> Literal["up", "down", "starting", "unknown"]:
        try:
            resp = self._http.get(f"{url}/health")
        except httpx.HTTPError:
            return "down"
        if resp.status_code == 200:
            return "up"
        return "starting" if resp.status_code == 503 else "unknown"


def describe_node(node: NodeView) -> str:
    """One line per node for `tuichat ps` and logs."""
    parts = [node.health if node.registered else f"{node.health}, unregistered"]
    if node.unfinished is not None:
        parts.append(f"{node.unfinished} unfinished")
    if node.latency is not None:
        parts.append(f"latency {node.latency:.2f}s")
    if node.kv_cache_usage is not None:
        parts.append(f"KV {node.kv_cache_usage * 100:.0f}%")
    if node.running is not None:
        parts.append(f"{node.running} running · {node.waiting if node.waiting is not None else '?'} waiting")
    return ", ".join(parts)
