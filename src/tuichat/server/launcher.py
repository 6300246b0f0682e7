"""Launch, watch, re-attach to and stop `lmdeploy serve api_server` processes started from profiles.

`ServerManager` checks a profile before launching (a busy port is otherwise noticed only after the whole model
has loaded), starts the server in its own session (so an SSH drop's SIGHUP and a Ctrl+C in tuichat's terminal
never reach it), and records it under `state_dir/servers/NAME.json` so that a later tuichat finds it again.
`ManagedServer.poll()` is cheap enough for a UI timer: it reads only the new part of the log (tqdm progress
arrives `\\r`-separated), probes `/health` once with a short timeout and, when the server has exited, says why
in a sentence with a hint for the usual causes. Stopping signals the whole process group, because the engine
process that holds the GPU memory outlives a server killed alone.

The API key of a launched server lives only in a 0600 file and in the server's memory: it reaches the server
through a pipe (see `serve_entry.py`), never its command line or environment, wherever the profile's command is
a Python program; otherwise the preflight warns that `ps` will show it. It is masked in every log line handed out.

Fleets (tuichat.server.fleet) use the same machinery: `start_proxy` launches `lmdeploy serve proxy` with its own key,
and `start(..., fleet=, proxy_url=, extra_keys=)` a node that registers with it and also takes the proxy's key. Their
records carry `role` and `fleet`; `running()` lists only servers launched on their own, `fleet_members()` the rest.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import httpx

from tuichat import paths
from tuichat.chat.sanitize import clean
from tuichat.errors import ConfigError, TuichatError
from tuichat.server.logfollow import LogFollower as LogFollower
from tuichat.server.logfollow import collapse_cr as collapse_cr
from tuichat.server.procgroup import (
    StopResult,
    group_pids,
    pid_alive,
    process_start_ticks,
    signal_all,
    spawn_group,
    stop_group,
)
from tuichat.server.profiles import (
    Profile,
    entry_prefix,
    looks_like_hub_id,
    make_model_hint,
    parse_profile,
    profile_to_table,
    proxy_args,
    server_args,
    server_env,
    validate_name,
)

if TYPE_CHECKING:
    from tuichat.server.gpu import GpuReader, GpuSnapshot

State = Literal["starting", "ready", "failed", "stopping", "stopped"]
Role = Literal["server", "node", "proxy"]

PIP_HINT = 'pip install "tuichat[lmdeploy]"'
AUTO_PORT_FIRST = 23333  # lmdeploy's own default: keeps `ssh -L 23333:...` recipes working
AUTO_PORT_TRIES = 50
KEY_MASK = "********"
HEALTH_TIMEOUT = 0.5
TAIL_LINES_IN_STATUS = 12
# exit codes of a server asked to stop: clean, or ended by SIGINT/SIGTERM; None = not our child
# (SIGKILL is left out: the kernel's out-of-memory killer sends it too)
_STOP_CODES = (None, 0, -signal.SIGINT, -signal.SIGTERM, 130, 143)


class LaunchError(TuichatError):
    """A server could not be started; the message says why and what to do."""


@dataclass(frozen=True)
class Check:
    """One preflight finding: an error blocks the launch, a warning is shown and the launch goes on."""

    level: Literal["error", "warning"]
    message: str
    # a command that fixes it, where one does (`tuichat pull ID`): a front end may offer to run it
    fix: str | None = None


class PreflightFailed(LaunchError):
    """The preflight found errors: `checks` holds every finding (warnings too), for a front end to show."""

    def __init__(self, message: str, checks: tuple[Check, ...]) -> None:
        super().__init__(message)
        self.checks = checks


@dataclass(frozen=True)
class Progress:
    """One loading step as the server reports it: `fraction` is 0..1, or None when the total is unknown."""

    label: str
    fraction: float | None
    text: str


@dataclass(frozen=True)
class ServerStatus:
    """What a server is doing now. `message` is a sentence for the user (why it failed, what to do)."""

    state: State
    progress: Progress | None = None
    message: str | None = None
    exit_code: int | None = None
    hint: str | None = None
    last_lines: tuple[str, ...] = ()
    # with tensor parallelism, where lmdeploy logs its ranks: (rank, the last step it reported), by rank
    ranks: tuple[tuple[int, str], ...] = ()

    def ranks_text(self) -> str:
        """`rank 0: build_model · rank 1: warmup`, or "" when no rank reported."""
        return " · ".join(f"rank {r}: {step}" for r, step in self.ranks)


@dataclass(frozen=True)
class ServerRecord:
    """What is written to `servers/NAME.json` for each launched server (never the key itself)."""

    name: str
    profile: dict[str, Any]
    pid: int
    pgid: int
    host: str
    port: int
    key_file: str
    log_path: str
    started_at: float
    lmdeploy_version: str | None
    command: list[str]
    proc_start: int | None = None
    model_name: str | None = None
    # "server" (one api_server), "node" (an api_server of a fleet) or "proxy" (a fleet's `lmdeploy serve proxy`)
    role: str = "server"
    fleet: str | None = None  # the fleet a node or proxy belongs to

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ServerRecord:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


# ---------------------------------------------------------------- log reading

_TQDM_TOTAL = re.compile(
    r"(?P<label>[^|]*?):?\s*(?P<pct>\d{1,3})%\|[^|]*\|\s*(?P<n>[\d.]+[kMG]?)/(?P<total>[\d.]+[kMG]?)"
)
_TQDM_PCT = re.compile(r"(?P<label>[^|]*?):?\s*(?P<pct>\d{1,3})%\|")
_TQDM_NO_TOTAL = re.compile(r"(?P<label>[^|:]+):\s*(?P<n>\d+)(?P<unit>[A-Za-z/]*)\s*\[\d+:\d+")
# lmdeploy's mp executor workers (pytorch/engine/executor/mp_executor.py) log `proc[N] call method: <M>.` for
# each start-up step at DEBUG, and `Proc[N] ...` when they end or fail
_RANK_STEP = re.compile(r"\b[Pp]roc\[(?P<rank>\d{1,3})\] call method: <(?P<method>[A-Za-z_]\w*)>")
_RANK_EVENT = re.compile(r"\bProc\[(?P<rank>\d{1,3})\] (?P<event>failed|main loop cancelled|terminated|cleanup)")
_KEY_ARG = re.compile(r"(--api-keys[= ]+)(\S+)")


def parse_progress(segment: str) -> Progress | None:
    """A tqdm bar (`Loading weights from safetensors:  45%|####  | 9/20 [00:01<...]`) as a Progress."""
    text = clean(segment).strip()
    if not text:
        return None
    m = _TQDM_TOTAL.search(text)
    if m:
        n, total = _amount(m.group("n")), _amount(m.group("total"))
        fraction = min(max(n / total, 0.0), 1.0) if total else int(m.group("pct")) / 100
        return Progress(_label(m.group("label")), fraction, text)
    m = _TQDM_PCT.search(text)
    if m:
        return Progress(_label(m.group("label")), min(int(m.group("pct")), 100) / 100, text)
    m = _TQDM_NO_TOTAL.match(text)
    if m:
        return Progress(_label(m.group("label")), None, text)
    return None


def parse_rank(line: str) -> tuple[int, str] | None:
    """(rank, step) from an mp executor worker's log line, or None for any other line."""
    m = _RANK_STEP.search(line)
    if m:
        return int(m.group("rank")), m.group("method")
    m = _RANK_EVENT.search(line)
    if m:
        return int(m.group("rank")), m.group("event")
    return None


def _amount(text: str) -> float:
    scale = {"k": 1e3, "M": 1e6, "G": 1e9}.get(text[-1:], 1.0)
    return float(text.rstrip("kMG")) * scale


def _label(text: str) -> str:
    return text.strip().rstrip(":").strip() or "Loading"


def mask_secret(text: str, secret: str | None) -> str:
    if secret:
        text = text.replace(secret, KEY_MASK)
    return _KEY_ARG.sub(lambda m: m.group(1) + KEY_MASK, text)


def read_log_tail(path: Path, n: int = 200, secret: str | None = None) -> list[str]:
    """The last `n` lines of a log: progress bars collapsed, control sequences and the key removed."""
    if n <= 0:
        return []
    try:
        with path.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            chunk = min(size, max(65536, n * 512))
            fh.seek(size - chunk)
            data = fh.read(chunk)
    except OSError:
        return []
    text = data.decode("utf-8", errors="replace")
    lines = text.split("\n")
    if chunk < size:
        lines = lines[1:]  # the first one is cut
    if lines and lines[-1] == "":
        lines.pop()
    out = [mask_secret(clean(collapse_cr(line)).rstrip(), secret) for line in lines]
    return out[-n:]


# ---------------------------------------------------------------- diagnosis

RAY_MISSING = (
    "Tensor parallelism with the ray executor needs ray, and ray is not installed: set "
    'distributed_executor_backend = "mp" in the profile (lmdeploy\'s --distributed-executor-backend mp, '
    "tuichat's default for tp > 1), or pip install ray."
)


def diagnose(lines: list[str], *, exit_code: int | None, port: int | None = None) -> str | None:
    """A hint for the usual reasons a server dies while loading, from its last log lines."""
    text = "\n".join(lines)
    low = text.lower()
    if "unrecognized arguments" in low or "invalid choice" in low or re.search(r"error: argument ", low):
        m = re.search(r"(unrecognized arguments:[^\n]*|error: argument[^\n]*)", text)
        what = f" ({m.group(1).strip()})" if m else ""
        return (
            f"lmdeploy rejected a command-line flag{what}: remove it from the profile's extra_args, or check "
            "that the setting exists in this lmdeploy version (`tuichat doctor` shows the version)."
        )
    if "out of memory" in low or "outofmemoryerror" in low or "cuda_error_out_of_memory" in low:
        return (
            "The GPU ran out of memory: lower cache_max_entry_count (e.g. 0.4), session_len or "
            "max_batch_size, "
            'use a quantized model (model_format = "awq"), or stop whatever else uses the GPU.'
        )
    if "requires `ray`" in low or "requires ray" in low:
        # Seen on two H200s: lmdeploy 0.18's PyTorch backend picks the ray executor for tp > 1 by default.
        return RAY_MISSING
    if "errno 98" in low or "address already in use" in low:
        where = f"Port {port}" if port else "The port"
        return f'{where} is already in use: stop what listens there, or set port = "auto" in the profile.'
    model_missing = (
        "repositorynotfound",
        "repository not found",
        "404 client error",
        "is not a local folder and is not a valid model identifier",
        "no such file or directory",
        "does not appear to have a file named",
        "localentrynotfound",
        "can't load the configuration",
        "cannot find the requested files",
    )
    if any(s in low for s in model_missing):
        return (
            "The model was not found: set `model` to an existing local folder or a hub id like "
            "owner/name, and check that this machine can reach the model hub (or has the model cached)."
        )
    if (
        "unsupported" in low
        or "not supported" in low
        or "unrecognized configuration class" in low
        or "does not recognize this architecture" in low
    ):
        return (
            "lmdeploy does not support this model (or this format) with the chosen backend: try "
            'backend = "pytorch", check model_format, or upgrade lmdeploy.'
        )
    if "no module named" in low and "lmdeploy" in low:
        return f"lmdeploy is not installed for this command: run {PIP_HINT}, or fix the profile's command."
    if exit_code is not None and exit_code < 0:
        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            name = f"signal {-exit_code}"
        if -exit_code == signal.SIGKILL:
            return f"The server was killed ({name}), perhaps by the out-of-memory killer: check host memory."
        return f"The server was ended by {name}."
    return None


# ---------------------------------------------------------------- helpers


def _connect_host(host: str) -> str:
    """Where to connect to reach a server bound to `host` (a wildcard address is reached on loopback)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def _url(host: str, port: int) -> str:
    h = _connect_host(host)
    if ":" in h:
        h = f"[{h}]"
    return f"http://{h}:{port}"


def port_free(host: str, port: int) -> bool:
    """True if a server could bind (host, port) now (SO_REUSEADDR like uvicorn: TIME_WAIT does not count)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        infos = [(socket.AF_INET, socket.SOCK_STREAM, 0, "", (host, port))]
    family, _type, _proto, _name, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError:
            return False
    return True


def lmdeploy_version(command: list[str] | None = None, timeout: float = 20.0) -> str | None:
    """The lmdeploy version a command would run: package metadata here, or `COMMAND --version` otherwise."""
    if not command:
        try:
            return importlib.metadata.version("lmdeploy")
        except importlib.metadata.PackageNotFoundError:
            return None
    try:
        done = subprocess.run(
            [*command, "--version"],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"\d+\.\d+(?:\.\d+)?\S*", done.stdout + "\n" + done.stderr)
    return m.group(0) if done.returncode == 0 and m else None


def installed_version_near(program: str) -> str | None:
    """lmdeploy's version in the environment of `program` (…/bin/lmdeploy or …/bin/python), found from its
    dist-info folder, without starting it: `lmdeploy --version` imports enough to take seconds."""
    exe = shutil.which(program) if os.sep not in program else program
    if exe is None:
        return None
    prefix = Path(exe).parent.parent
    for dist in sorted(prefix.glob("lib/python3*/site-packages/lmdeploy-*.dist-info")):
        return dist.name.removeprefix("lmdeploy-").removesuffix(".dist-info")
    return None


def lmdeploy_origin() -> str | None:
    """Where this interpreter would import lmdeploy from, or None if it cannot."""
    spec = importlib.util.find_spec("lmdeploy")
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return str(next(iter(spec.submodule_search_locations)))
    return spec.origin


def _command_exists(program: str) -> bool:
    if os.sep in program:
        p = Path(program).expanduser()
        return p.is_file() and os.access(p, os.X_OK)
    return shutil.which(program) is not None


def make_gpu_reader() -> GpuReader | None:
    """The NVML reader, or None while gpu.py is missing (tests replace this function with a fake)."""
    try:
        from tuichat.server.gpu import NvmlReader
    except ImportError:
        return None
    return NvmlReader()


# ---------------------------------------------------------------- one server


class ManagedServer:
    """A server tuichat launched, in this process or an earlier one (then found through its record)."""

    def __init__(
        self,
        record: ServerRecord,
        profile: Profile,
        manager: ServerManager,
        proc: subprocess.Popen[bytes] | None = None,
    ) -> None:
        self.record = record
        self.profile = profile
        self._manager = manager
        self._proc = proc
        self._lock = threading.RLock()
        # on attach, only the recent part of the log matters for progress
        self._follower = LogFollower(self.log_path, start_at_end=None if proc is not None else 262144)
        self._progress: Progress | None = None
        self._ranks: dict[int, str] = {}
        self._ever_ready = False
        self._stopping = False
        self._final: ServerStatus | None = None
        self._key: str | None = None
        self._http: httpx.Client | None = None

    # -- identity

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def url(self) -> str:
        return _url(self.record.host, self.record.port)

    @property
    def pid(self) -> int:
        return self.record.pid

    @property
    def pgid(self) -> int:
        return self.record.pgid

    @property
    def log_path(self) -> Path:
        return Path(self.record.log_path)

    @property
    def key_file(self) -> Path:
        return Path(self.record.key_file)

    @property
    def model_name(self) -> str:
        """The model id the server lists under /v1/models (--model-name, or the model as typed)."""
        return self.record.model_name or self.profile.served_model_name()

    @property
    def is_proxy(self) -> bool:
        return self.record.role == "proxy"

    @property
    def fleet(self) -> str | None:
        return self.record.fleet

    @property
    def api_key(self) -> str | None:
        """The key requests need, read from its 0600 file (None once the server is gone)."""
        if self._key is None:
            try:
                self._key = self.key_file.read_text(encoding="utf-8").strip() or None
            except OSError:
                return None
        return self._key

    @property
    def uptime(self) -> float:
        return max(time.time() - self.record.started_at, 0.0)

    def __repr__(self) -> str:  # never show the key
        return f"ManagedServer(name={self.name!r}, url={self.url!r}, pid={self.pid})"

    # -- process state

    def _leader_alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        if not pid_alive(self.pid):
            return False
        ticks = process_start_ticks(self.pid)
        return self.record.proc_start is None or ticks is None or ticks == self.record.proc_start

    def is_alive(self) -> bool:
        return self._leader_alive()

    def pids(self) -> set[int]:
        """Live processes of the server's group (server, engine, workers)."""
        return group_pids(self.pgid) if self._group_is_ours() else set()

    def _group_is_ours(self) -> bool:
        # A dead leader's pid cannot be handed out again while its group has members, so the group is ours
        # whenever the leader is alive and the same process, or dead.
        return self._leader_alive() or not pid_alive(self.pid)

    def gpu_pids(self, snapshot: GpuSnapshot | None = None) -> set[int]:
        """Processes of this server that hold a GPU context (with tp>1 and PyTorch: the engine workers)."""
        snap = snapshot if snapshot is not None else self._manager.gpu_snapshot()
        if snap is None:
            return set()
        from tuichat.server.gpu import pids_on_gpu

        return pids_on_gpu(snap, self.pids())

    def gpu_memory(self, snapshot: GpuSnapshot | None = None) -> int | None:
        """Bytes of GPU memory held by this server's processes, or None when there is no reading."""
        snap = snapshot if snapshot is not None else self._manager.gpu_snapshot()
        if snap is None or snap.error is not None:
            return None
        from tuichat.server.gpu import memory_split

        return sum(s.ours_bytes for s in memory_split(snap, self.pids()))

    def gpu_memory_by_gpu(self, snapshot: GpuSnapshot | None = None) -> list[tuple[int, int]]:
        """(GPU index, bytes our processes hold there) for each GPU where they hold some: with tp > 1, one
        entry per rank's GPU."""
        snap = snapshot if snapshot is not None else self._manager.gpu_snapshot()
        if snap is None or snap.error is not None:
            return []
        from tuichat.server.gpu import memory_split

        return [(s.index, s.ours_bytes) for s in memory_split(snap, self.pids()) if s.ours_bytes > 0]

    # -- status

    def _client(self) -> httpx.Client:
        if self._http is None:
            self._http = httpx.Client(trust_env=False, timeout=HEALTH_TIMEOUT)
        return self._http

    def _healthy(self) -> bool:
        try:
            # lmdeploy's proxy has no /health: its node list (open without a key) is the sign of life
            resp = self._client().get(f"{self.url}/nodes/status" if self.is_proxy else f"{self.url}/health")
            if resp.status_code != 200:
                return False
            if self._ever_ready:
                return True
            # The first time, make sure the answer comes from *our* server: another process on the same port
            # (a second tuichat racing for it) would answer /health too, but not with our random key.
            key = self.api_key
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            models = self._client().get(f"{self.url}/v1/models", headers=headers)
        except httpx.HTTPError:
            return False
        return models.status_code == 200

    def _read_log(self) -> None:
        lines, partial = self._follower.read()
        for line in lines:
            rank = parse_rank(line)
            if rank is not None:
                self._ranks[rank[0]] = rank[1]
        for segment in [*(s for line in lines for s in line.split("\r")), *partial.split("\r")]:
            found = parse_progress(segment)
            if found is not None:
                self._progress = Progress(
                    found.label, found.fraction, mask_secret(found.text, self._key or self.api_key)
                )

    def poll(self) -> ServerStatus:
        """The state now: reads the new part of the log and probes /health once (0.5 s at most)."""
        with self._lock:
            if self._final is not None:
                return self._final
            self._read_log()
            if not self._leader_alive():
                return self._finish_exited()
            ranks = tuple(sorted(self._ranks.items()))
            if self._stopping:
                return ServerStatus("stopping", self._progress, f"Stopping {self.name}…", ranks=ranks)
            if self._healthy():
                self._ever_ready = True
                return ServerStatus("ready", self._progress, ranks=ranks)
            if self._ever_ready:
                return ServerStatus(
                    "ready", self._progress, "The server is running but did not answer its health check.", ranks=ranks
                )
            if self.uptime > self.profile.start_timeout:
                return self._give_up_start()
            return ServerStatus("starting", self._progress, ranks=ranks)

    def _give_up_start(self) -> ServerStatus:
        """A start-up past the profile's start_timeout is taken for hung: stop the whole group, say so."""
        limit = self.profile.start_timeout
        result = self._manager.stop(self)
        tp = self.profile.tp or 1
        why = (
            f" lmdeploy's mp executor can hang at start-up with tp = {tp}: start it again, or try "
            'distributed_executor_backend = "ray" if ray is installed.'
            if tp > 1 and self.profile.executor_backend == "mp"
            else ""
        )
        waiting = [f"rank {r}" for r in range(tp) if r not in self._ranks] if tp > 1 and self._ranks else []
        seen = f" No word from {', '.join(waiting)}." if waiting else ""
        left = "" if result.clean else " " + result.describe(self.name)
        message = (
            f"{self.name} was not ready after {limit:g} s (the profile's start_timeout), so tuichat stopped it "
            f"and all its processes.{seen}{why} If the model is just slow to load, raise start_timeout.{left}"
        )
        last = self._final.last_lines if self._final is not None else ()
        ranks = tuple(sorted(self._ranks.items()))
        self._final = ServerStatus("failed", self._progress, message, self._exit_code(), None, last, ranks)
        return self._final

    def _exit_code(self) -> int | None:
        if self._proc is not None:
            return self._proc.poll()
        return None

    def _finish_exited(self) -> ServerStatus:
        code = self._exit_code()
        self._manager._cleanup_exited(self)
        tail = self.log_tail(TAIL_LINES_IN_STATUS * 4)
        last = tuple(line for line in tail if line.strip())[-TAIL_LINES_IN_STATUS:]
        ranks = tuple(sorted(self._ranks.items()))
        if self._stopping or (self._ever_ready and code in _STOP_CODES):
            # a ready server that ends on a stop signal was stopped (perhaps by `tuichat stop` elsewhere)
            message = f"{self.name} stopped." if code is not None else f"{self.name} is no longer running."
            self._final = ServerStatus("stopped", self._progress, message, code, None, last, ranks)
        else:
            hint = diagnose(list(tail), exit_code=code, port=self.record.port)
            when = "after it was ready" if self._ever_ready else "while loading"
            how = f" with code {code}" if code is not None else ""
            message = f"The server for {self.name} exited{how} {when}."
            if hint:
                message += " " + hint
            else:
                message += f" See the log: tuichat logs {self.name}"
            self._final = ServerStatus("failed", self._progress, message, code, hint, last, ranks)
        self._close_http()
        return self._final

    def wait_ready(
        self,
        timeout: float | None = None,
        on_status: Callable[[ServerStatus], None] | None = None,
        interval: float = 0.2,
    ) -> ServerStatus:
        """Poll until ready, failed or stopped (or `timeout` seconds); `on_status` sees every change."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last: ServerStatus | None = None
        while True:
            status = self.poll()
            if status != last and on_status is not None:
                on_status(status)
            last = status
            if status.state in ("ready", "failed", "stopped"):
                return status
            if deadline is not None and time.monotonic() >= deadline:
                return ServerStatus(
                    status.state,
                    status.progress,
                    f"{self.name} was not ready after {timeout:.0f} s; it is still {status.state}.",
                )
            time.sleep(interval)

    def log_tail(self, n: int = 200) -> list[str]:
        """The last `n` log lines, progress bars collapsed, control sequences removed, the key masked."""
        return read_log_tail(self.log_path, n, self._key or self.api_key)

    def _close_http(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    def close(self) -> None:
        """Release the HTTP client; the server keeps running."""
        with self._lock:
            self._close_http()


# ---------------------------------------------------------------- manager


@dataclass
class _Paths:
    root: Path
    servers: Path = field(init=False)
    logs: Path = field(init=False)

    def __post_init__(self) -> None:
        self.servers = self.root / "servers"
        self.logs = self.root / "logs"


class ServerManager:
    """Launches servers from profiles and finds the ones launched earlier (records in the state dir)."""

    def __init__(self, state_dir: Path | None = None, gpu_reader: GpuReader | None = None) -> None:
        self._paths = _Paths(state_dir if state_dir is not None else paths.state_dir())
        self._gpu_reader = gpu_reader
        self._gpu_reader_made = False
        self._known: dict[str, ManagedServer] = {}
        self._lock = threading.RLock()

    @property
    def state_dir(self) -> Path:
        return self._paths.root

    def record_path(self, name: str) -> Path:
        return self._paths.servers / f"{name}.json"

    def key_path(self, name: str) -> Path:
        return self._paths.servers / f"{name}.key"

    def log_path(self, name: str) -> Path:
        return self._paths.logs / f"{name}.log"

    # -- GPU

    def gpu_reader(self) -> GpuReader | None:
        if self._gpu_reader is None and not self._gpu_reader_made:
            self._gpu_reader_made = True
            self._gpu_reader = make_gpu_reader()
        return self._gpu_reader

    def gpu_snapshot(self) -> GpuSnapshot | None:
        reader = self.gpu_reader()
        if reader is None:
            return None
        try:
            return reader.read()
        except Exception:  # a broken reader must not break ps or stop
            return None

    def close(self) -> None:
        for server in list(self._known.values()):
            server.close()
        if self._gpu_reader_made and self._gpu_reader is not None:
            self._gpu_reader.close()

    # -- preflight

    def preflight(self, profile: Profile, port: int | None = None) -> list[Check]:
        """What would stop `profile` from starting, found before loading any model."""
        checks: list[Check] = []
        checks += self._check_port(profile, port)
        checks += _check_model(profile)
        checks += _check_lmdeploy(profile)
        checks += _check_key_privacy(profile)
        checks += self._check_gpu()
        checks += self._check_tp(profile)
        if not profile.binds_loopback_only:
            checks.append(
                Check(
                    "warning",
                    f"The server will listen on {profile.server_name}, not only on this machine: anyone "
                    "who can reach that address and has the API key can use it. Prefer an SSH tunnel to "
                    "127.0.0.1.",
                )
            )
        return checks

    def preflight_proxy(self, profile: Profile, port: int | None = None) -> list[Check]:
        """What would stop a proxy from starting: its port, its command, its key's privacy."""
        return [*self._check_port(profile, port), *_check_lmdeploy(profile), *_check_key_privacy(profile)]

    def _recorded_ports(self) -> set[int]:
        ports: set[int] = set()
        for path in self._record_files():
            with contextlib.suppress(OSError, ValueError, TypeError):
                record = ServerRecord.from_json(path.read_text(encoding="utf-8"))
                if pid_alive(record.pid):
                    ports.add(record.port)
        return ports

    def _check_port(self, profile: Profile, port: int | None) -> list[Check]:
        wanted = port if port is not None else profile.port
        if wanted == "auto":
            return []
        assert isinstance(wanted, int)
        if wanted in self._recorded_ports():
            return [
                Check(
                    "error",
                    f"Port {wanted} belongs to another server tuichat started (see `tuichat ps`): stop it, "
                    "or "
                    'set port = "auto" in the profile.',
                )
            ]
        if not port_free(profile.server_name, wanted):
            return [
                Check(
                    "error",
                    f"Port {wanted} on {profile.server_name} is already in use: stop what listens there, or "
                    'set port = "auto" in the profile.',
                )
            ]
        return []

    def _check_gpu(self) -> list[Check]:
        try:
            from tuichat.server.gpu import gpus_visible
        except ImportError:
            return []
        reader = self.gpu_reader()
        try:
            visible, detail = gpus_visible(reader)
        except Exception as exc:
            visible, detail = False, f"GPU reading failed: {exc}"
        if visible:
            return []
        return [
            Check(
                "warning",
                f"{detail[:1].upper()}{detail[1:]}; lmdeploy needs a CUDA GPU, so the server will probably "
                "fail to load the model.",
            )
        ]

    def _check_tp(self, profile: Profile) -> list[Check]:
        """Tensor parallelism the machine cannot give, or an executor that cannot run, found before loading."""
        tp = profile.tp or 1
        executor = profile.distributed_executor_backend
        checks: list[Check] = []
        if profile.backend == "turbomind" and executor is not None:
            checks.append(
                Check(
                    "warning",
                    f'distributed_executor_backend = "{executor}" applies to the PyTorch backend only; TurboMind '
                    "ignores it, so tuichat does not pass it.",
                )
            )
        if tp > 1 and executor == "uni":
            checks.append(
                Check(
                    "error",
                    f'The "uni" executor runs on one GPU only, and the profile asks for tp = {tp}: set '
                    'distributed_executor_backend = "mp" (or remove it), or set tp = 1.',
                )
            )
        # only tuichat's own Python can be asked; another command's environment is its own business
        ray_missing = profile.uses_default_command and importlib.util.find_spec("ray") is None
        if tp > 1 and profile.executor_backend == "ray" and ray_missing:
            checks.append(Check("error", RAY_MISSING))
        if tp > 1:
            from tuichat.server.gpu import visible_gpu_count

            count, source = visible_gpu_count(self.gpu_reader(), os.environ)
            if count is not None and tp > count:
                gpus = f"{count} GPU is" if count == 1 else f"{count} GPUs are"
                checks.append(
                    Check(
                        "error",
                        f"The profile asks for tp = {tp} (one GPU per rank), but only {gpus} visible ({source}): "
                        f"set tp to {max(count, 1)} or less, or run where {tp} GPUs are free.",
                    )
                )
        return checks

    def pick_port(self, profile: Profile) -> int:
        """The profile's fixed port, or for "auto" the first free one from 23333 up (then any free one)."""
        if isinstance(profile.port, int):
            return profile.port
        taken = self._recorded_ports()
        for candidate in range(AUTO_PORT_FIRST, AUTO_PORT_FIRST + AUTO_PORT_TRIES):
            if candidate not in taken and port_free(profile.server_name, candidate):
                return candidate
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((_connect_host(profile.server_name) if ":" not in profile.server_name else "127.0.0.1", 0))
            return int(sock.getsockname()[1])

    # -- launching

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise launches across tuichat processes, so two never take one name or one port."""
        import fcntl

        paths.ensure_private_dir(self._paths.root)
        paths.ensure_private_dir(self._paths.servers)
        fd = os.open(self._paths.servers / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def start(
        self,
        name: str,
        profile: Profile,
        *,
        fleet: str | None = None,
        proxy_url: str | None = None,
        extra_keys: tuple[str, ...] = (),
        on_checks: Callable[[tuple[Check, ...]], None] | None = None,
    ) -> ManagedServer:
        """Launch `profile` as server `name` and return at once; poll() or wait_ready() follow the start.

        The preflight runs here, once, on the port the launch really takes: `on_checks` sees its findings before
        the spawn (errors raise PreflightFailed instead). For a node of a fleet: `proxy_url` is the proxy it
        registers with (`--proxy-url`), and `extra_keys` the keys it accepts besides its own (the proxy's: the
        proxy forwards the client's Authorization header). `tuichat.server.launch.launch` adds the wait.
        """
        args = _server_args_for(profile, proxy_url)
        role: Role = "node" if fleet else "server"
        return self._launch(name, profile, args, role=role, fleet=fleet, extra_keys=extra_keys, on_checks=on_checks)

    def start_proxy(
        self,
        name: str,
        *,
        fleet: str,
        port: int | Literal["auto"],
        routing_strategy: str,
        api_key: str | None = None,
        command: tuple[str, ...] | None = None,
        stop_timeout: float = 10.0,
        env: dict[str, str] | None = None,
    ) -> ManagedServer:
        """Launch `lmdeploy serve proxy` for `fleet` on 127.0.0.1 with its own key (through the pipe, as for
        api_servers); `env` adds variables (the proxy's node health-check interval, say)."""
        profile = Profile(
            model=PROXY_MODEL,
            command=command,
            port=port,
            stop_timeout=stop_timeout,
            api_key=api_key,
            model_name=PROXY_MODEL,
        )

        def args(p: Profile, chosen: int) -> list[str]:
            return proxy_args(port=chosen, routing_strategy=routing_strategy, server_name=p.server_name)

        return self._launch(name, profile, args, role="proxy", fleet=fleet, env_extra=env)

    def _launch(
        self,
        name: str,
        profile: Profile,
        make_args: Callable[[Profile, int], list[str]],
        *,
        role: Role,
        fleet: str | None,
        extra_keys: tuple[str, ...] = (),
        env_extra: dict[str, str] | None = None,
        on_checks: Callable[[tuple[Check, ...]], None] | None = None,
    ) -> ManagedServer:
        try:
            validate_name(name)
        except ConfigError as exc:
            raise LaunchError(f"Cannot start {name!r}: {exc.message}.") from None
        with self._lock, self._locked():
            existing = self.find(name)
            if existing is not None:
                raise LaunchError(
                    f"{name} is already running at {existing.url} (pid {existing.pid}); stop it first with "
                    f"`tuichat stop {existing.fleet or name}`."
                )
            port = self.pick_port(profile)
            checks = tuple(self.preflight(profile, port) if role != "proxy" else self.preflight_proxy(profile, port))
            problems = [c.message for c in checks if c.level == "error"]
            if problems:
                raise PreflightFailed(f"Cannot start {name}: " + " ".join(problems), checks)
            if on_checks is not None:
                on_checks(checks)

            # the prefix keeps a key from starting with "-", which argparse would take for a flag
            key = profile.api_key or "tuichat-" + secrets.token_urlsafe(32)
            key_file = self.key_path(name)
            paths.write_private(key_file, key + "\n")
            log = self.log_path(name)
            paths.ensure_private_dir(log.parent)
            if log.exists():  # keep the previous run's log for `tuichat logs` comparisons
                os.replace(log, log.with_name(log.name + ".1"))
            args = make_args(profile, port)
            entry = entry_prefix(profile.argv_prefix, key_fd=0)
            keys = [key, *(k for k in extra_keys if k != key)]
            argv = [*entry, *args] if entry is not None else [*profile.argv_prefix, *args, "--api-keys", *keys]
            version = (
                lmdeploy_version(None)
                if profile.uses_default_command
                else installed_version_near(profile.argv_prefix[0])
            )
            launch_env = server_env(profile, os.environ) if role != "proxy" else {}
            env = {**os.environ, **launch_env, **(env_extra or {})}
            try:
                # through the entry, the keys are the server's stdin: a pipe holding them (one a line), then EOF
                stdin = "".join(k + "\n" for k in keys).encode() if entry is not None else None
                proc = spawn_group(argv, log, env=env, stdin_data=stdin)
            except OSError as exc:
                key_file.unlink(missing_ok=True)
                raise LaunchError(
                    f"Cannot start {name}: running {argv[0]} failed ({exc.strerror}). Fix the profile's "
                    f"command, or install lmdeploy with {PIP_HINT}."
                ) from None
            record = ServerRecord(
                name=name,
                # the key is in key_file only (a profile's own api_key too): records are read by more code paths
                profile={k: v for k, v in profile_to_table(profile).items() if k != "api_key"},
                pid=proc.pid,
                pgid=proc.pid,  # start_new_session makes the server its group's leader
                host=profile.server_name,
                port=port,
                key_file=str(key_file),
                log_path=str(log),
                started_at=time.time(),
                lmdeploy_version=version,
                command=[_mask_all(a, keys) for a in argv],
                proc_start=process_start_ticks(proc.pid),
                model_name=profile.served_model_name(),
                role=role,
                fleet=fleet,
            )
            paths.write_private(self.record_path(name), record.to_json())
            server = ManagedServer(record, profile, self, proc)
            server._key = key
            self._known[name] = server
            return server

    # -- records

    def _record_files(self) -> list[Path]:
        try:
            return sorted(self._paths.servers.glob("*.json"))
        except OSError:
            return []

    def _load(self, path: Path) -> ManagedServer | None:
        try:
            record = ServerRecord.from_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError):
            path.unlink(missing_ok=True)  # unreadable: nothing could ever attach to it
            return None
        known = self._known.get(record.name)
        if known is not None and known.pid == record.pid:
            return known
        try:
            profile = parse_profile(record.name, record.profile, path)
        except ConfigError:
            profile = Profile(model=str(record.profile.get("model", "?")))
        server = ManagedServer(record, profile, self)
        self._known[record.name] = server
        return server

    def running(self) -> list[ManagedServer]:
        """Servers tuichat launched on their own (not as part of a fleet) that are alive (loading or ready)."""
        return [s for s in self.running_all() if s.fleet is None]

    def fleet_members(self, fleet: str | None = None) -> list[ManagedServer]:
        """The live proxies and nodes of fleets (of `fleet` only, when given)."""
        return [s for s in self.running_all() if s.fleet is not None and (fleet is None or s.fleet == fleet)]

    def running_all(self) -> list[ManagedServer]:
        """Every live process tuichat launched (servers, fleet nodes, proxies); records of dead ones are dropped."""
        alive: list[ManagedServer] = []
        with self._lock:
            for path in self._record_files():
                server = self._load(path)
                if server is None:
                    continue
                if server._leader_alive():
                    alive.append(server)
                else:
                    self._cleanup_exited(server)
        return alive

    def find(self, name: str) -> ManagedServer | None:
        for server in self.running_all():
            if server.name == name:
                return server
        return None

    def last_log(self, name: str) -> Path | None:
        """The log of the latest run of `name`, running or not."""
        log = self.log_path(name)
        return log if log.exists() else None

    def _drop_record(self, server: ManagedServer) -> None:
        record = self.record_path(server.name)
        with contextlib.suppress(OSError, ValueError, TypeError):
            current = ServerRecord.from_json(record.read_text(encoding="utf-8"))
            if current.pid != server.pid:
                return  # a newer launch of that name owns the record now
        record.unlink(missing_ok=True)
        Path(server.record.key_file).unlink(missing_ok=True)
        if self._known.get(server.name) is server:
            del self._known[server.name]

    def _cleanup_exited(self, server: ManagedServer) -> None:
        """The server process is gone: end what it left in its group (the engine holds GPU memory)."""
        signal_all(server.pgid, signal.SIGKILL)
        self._drop_record(server)

    # -- stopping

    def stop(self, server: ManagedServer, timeout: float | None = None) -> StopResult:
        """Stop the whole group (SIGINT, SIGTERM, then SIGKILL after the profile's stop_timeout)."""
        with server._lock:
            server._stopping = True
        limit = server.profile.stop_timeout if timeout is None else timeout
        if not server._group_is_ours():
            # the pid now belongs to an unrelated program: forget the record, signal nothing
            self._drop_record(server)
            result = StopResult("none", 0.0, frozenset())
        else:
            members = group_pids(server.pgid)
            result = stop_group(server.pgid, timeout=limit, proc=server._proc)
            holders = self._gpu_holders(members | set(result.survivors))
            if holders:
                result = StopResult(result.signal_used, result.seconds, result.survivors, frozenset(holders))
            if not result.survivors:
                self._drop_record(server)
        with server._lock:
            if not result.survivors:
                server._read_log()
                tail = tuple(line for line in server.log_tail(TAIL_LINES_IN_STATUS * 2) if line.strip())
                server._final = ServerStatus(
                    "stopped",
                    server._progress,
                    result.describe(server.name),
                    server._exit_code(),
                    None,
                    tail[-TAIL_LINES_IN_STATUS:],
                )
                server._close_http()
        return result

    def _gpu_holders(self, pids: set[int]) -> set[int]:
        """Which of `pids` NVML still lists on a GPU; NVML may lag a moment behind a process's exit."""
        if not pids:
            return set()
        from tuichat.server.gpu import pids_on_gpu

        deadline = time.monotonic() + 2.0
        while True:
            snap = self.gpu_snapshot()
            if snap is None or snap.error is not None:
                return set()
            # a dead pid cannot hold memory: NVML (or a fake) listing it is a stale reading
            holders = {p for p in pids_on_gpu(snap, pids) if pid_alive(p)}
            if not holders or time.monotonic() >= deadline:
                return holders
            time.sleep(0.1)


PROXY_MODEL = "lmdeploy-proxy"  # what a proxy's record shows where a server's shows its model


def _server_args_for(profile: Profile, proxy_url: str | None) -> Callable[[Profile, int], list[str]]:
    def make(p: Profile, port: int) -> list[str]:
        args = server_args(p, port=port)
        return [*args, "--proxy-url", proxy_url] if proxy_url else args

    return make


def _mask_all(text: str, keys: list[str]) -> str:
    for key in keys:
        text = mask_secret(text, key)
    return text


def _check_model(profile: Profile) -> list[Check]:
    model = profile.model
    path = Path(model).expanduser()
    make = make_model_hint(model)
    if make is not None and not path.is_dir():
        return [
            Check(
                "error",
                f"The model {model} does not exist yet: it is the W4A16 (4-bit AWQ) model you make yourself, "
                f"no hub publishes it. Run `{make}` first (it needs a GPU), or pick another profile.",
            )
        ]
    if path.is_dir():
        if not (path / "config.json").exists():
            return [Check("warning", f"{model} has no config.json; is it a model folder?")]
        return []
    if path.exists():
        return [Check("error", f"The model {model} is a file; `model` must be a folder or a hub id like owner/name.")]
    if looks_like_hub_id(model) and not model.startswith((".", "~", os.sep)):
        return _check_hub_cache(model, os.environ)
    return [
        Check(
            "error",
            f"The model folder {model} does not exist, and {model!r} is not a hub id like owner/name: fix "
            "the profile's `model`.",
        )
    ]


HUB_PROBE_TIMEOUT = 1.5  # seconds: long enough for a slow route, short enough that an offline box never hangs
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
_TRUE = ("1", "true", "yes", "on")


def hub_cached(repo_id: str, environ: Mapping[str, str]) -> bool:
    """Whether the hub cache lmdeploy will read (Hugging Face's, or ModelScope's with LMDEPLOY_USE_MODELSCOPE)
    holds a snapshot of `repo_id` with its config.json: then lmdeploy starts from disk, without the network."""
    from tuichat.models.discovery import hf_cache_dir, modelscope_cache_dir

    owner, name = repo_id.split("/", 1)
    if environ.get("LMDEPLOY_USE_MODELSCOPE", "").strip().lower() in _TRUE:
        root = modelscope_cache_dir(environ)
        # ModelScope writes both layouts over its versions, and escapes dots in names as "___"
        candidates = [root / owner / name, root / owner / name.replace(".", "___"), root / "models" / owner / name]
        return any((c / "config.json").is_file() for c in candidates)
    snapshots = hf_cache_dir(environ) / f"models--{owner}--{name}" / "snapshots"
    try:
        return any((snap / "config.json").is_file() for snap in snapshots.iterdir())
    except OSError:
        return False


def hub_unreachable(environ: Mapping[str, str], timeout: float = HUB_PROBE_TIMEOUT) -> str | None:
    """Why the hub cannot be reached from here (offline mode, or no route to its endpoint), or None when a TCP
    connection to it opens within `timeout`. Only a connection: no request, no token, nothing downloaded."""
    if environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return "HF_HUB_OFFLINE is set, so nothing is downloaded on this machine"
    endpoint = (environ.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT).rstrip("/")
    parts = urlsplit(endpoint)
    host = parts.hostname
    if not host:
        return f"HF_ENDPOINT ({endpoint}) is not a URL"
    try:
        port = parts.port or (80 if parts.scheme == "http" else 443)
    except ValueError:
        return f"HF_ENDPOINT ({endpoint}) has a bad port"
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        return f"{host}:{port} cannot be reached ({why})"


def _check_hub_cache(repo_id: str, environ: Mapping[str, str]) -> list[Check]:
    """A hub id not on disk would be downloaded by lmdeploy inside its start-up, silently (or fail offline):
    say so before the launch, and name the command that fetches it with progress."""
    if hub_cached(repo_id, environ):
        return []
    modelscope = environ.get("LMDEPLOY_USE_MODELSCOPE", "").strip().lower() in _TRUE
    pull = f"tuichat pull {repo_id}" + (" --source modelscope" if modelscope else "")
    where = "ModelScope's cache" if modelscope else "the Hugging Face cache"
    offline = None if modelscope else hub_unreachable(environ)
    if offline is not None:
        return [
            Check(
                "error",
                f"{repo_id} is not in {where} on this machine, and this machine is offline: {offline}. "
                "Download the model where there is internet, copy its folder here and point the profile's "
                "`model` at it (or set HF_ENDPOINT to a mirror you can reach).",
            )
        ]
    return [
        Check(
            "error",
            f"{repo_id} is not in {where} on this machine, so lmdeploy would download it silently during "
            f"start-up: run `{pull}` first (progress, resume, disk and hash checks), then start again.",
            fix=pull,
        )
    ]


def _check_lmdeploy(profile: Profile) -> list[Check]:
    if profile.uses_default_command:
        if importlib.util.find_spec("lmdeploy") is None:
            return [
                Check(
                    "error",
                    f"lmdeploy is not installed in tuichat's Python: run {PIP_HINT}, or set the profile's "
                    "command to an lmdeploy installed elsewhere.",
                )
            ]
        return []
    program = profile.argv_prefix[0]
    if not _command_exists(program):
        return [
            Check(
                "error",
                f"The profile's command {program} was not found: fix `command`, or install lmdeploy with {PIP_HINT}.",
            )
        ]
    return []


def _check_key_privacy(profile: Profile) -> list[Check]:
    if entry_prefix(profile.argv_prefix) is not None:
        return []
    shown = " ".join(profile.argv_prefix)
    return [
        Check(
            "warning",
            f"The profile's command ({shown}) is not a Python program tuichat can start itself, so the server's "
            "API key goes on its command line, where every user of this machine can read it with `ps`. To keep "
            'it private, set command to the Python that has lmdeploy, e.g. ["/path/to/env/bin/python", "-m", '
            '"lmdeploy"], or to its lmdeploy script.',
        )
    ]
