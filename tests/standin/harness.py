"""Helpers for tests that run the LMDeploy stand-in (`fake_lmdeploy.py`) as a real subprocess.

    with run_standin("--fake-words", "50") as s:
        httpx.post(f"{s.url}/v1/chat/completions", headers=s.headers, json={...})
        assert s.stats()["completed"] == 1

The stand-in runs in its own session; leaving the context SIGKILLs its whole process group (server and engine
child) and reaps it, whatever state the test left it in.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FAKE_PATH = str(Path(__file__).with_name("fake_lmdeploy.py").resolve())
# Where tuichat expects `python -m lmdeploy`, this prefix starts the stand-in instead.
STANDIN_COMMAND = [sys.executable, FAKE_PATH]


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, and not one this process handed out before:
    the kernel can give the same free port to two binds in a row, and a fleet's proxy and node then collide."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def group_pids(pgid: int) -> set[int]:
    """Live (non-zombie) processes of process group `pgid`, read from /proc."""
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            found.add(int(entry.name))
    return found


def session_pids(leader: int) -> set[int]:
    """Live processes whose process group or session is `leader`'s: all a launch started, even a process that
    moved to a group of its own."""
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if len(fields) > 3 and fields[0] != "Z" and leader in (int(fields[2]), int(fields[3])):
            found.add(int(entry.name))
    return found


def proc_file(pid: int, name: str) -> bytes:
    """`/proc/PID/NAME` (cmdline, environ, ...) as bytes; empty if the process is gone."""
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return b""


def pid_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def wait_for(condition: Any, timeout: float = 10.0, interval: float = 0.02, message: str = "condition") -> Any:
    """Poll `condition()` until it returns something truthy; return that, or raise after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


@dataclass
class Standin:
    """A running stand-in server."""

    url: str
    port: int
    api_key: str | None
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def headers(self) -> dict[str, str]:
        """The Authorization header for the API key, or nothing when the server has no keys."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @property
    def pgid(self) -> int:
        return self.proc.pid  # start_new_session: the server leads its own group

    def log_text(self) -> str:
        """The log as written, carriage returns of the progress bars included (read_text would turn them into
        newlines)."""
        return self.log_path.read_bytes().decode("utf-8", errors="replace")

    def wait_for_log(self, text: str, timeout: float = 10.0) -> str:
        """Wait until the log contains `text`; return the whole log."""

        def found() -> str:
            log = self.log_text()
            return log if text in log else ""

        return str(wait_for(found, timeout, message=repr(text)))

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            payload = None if body is None else json.dumps(body).encode()
            conn.request(method, path, body=payload, headers={"content-type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{method} {path} -> {resp.status}: {data!r}")
            return json.loads(data)
        finally:
            conn.close()

    def configure(self, **settings: Any) -> dict[str, Any]:
        """Change the stand-in's reply/fault settings for later requests (None clears one); returns them all."""
        result: dict[str, Any] = self._call("POST", "/standin/config", settings)
        return result

    def stats(self) -> dict[str, Any]:
        """Request counters: requests, completed, aborted, failed, running, waiting, last_request,
        generated_tokens, engine_pid, settings."""
        result: dict[str, Any] = self._call("GET", "/standin/stats")
        return result

    def engine_pid(self) -> int:
        return int(self.stats()["engine_pid"])

    def group_pids(self) -> set[int]:
        return group_pids(self.pgid)

    def wait_exit(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout=timeout)

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, sig)


def _health_ok(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


@contextlib.contextmanager
def run_standin(
    *args: str,
    api_key: str | None = "test-key",
    model: str = "tiny-chat",
    env: Mapping[str, str] | None = None,
    wait_ready: bool = True,
    timeout: float = 20,
    port: int | None = None,
    log_dir: Path | None = None,
) -> Iterator[Standin]:
    """Start the stand-in on 127.0.0.1 and a free port (or `port`), yield it, then SIGKILL its process group.

    `args` go after the generated flags. `env` adds to (and overrides) os.environ; PYTHONUNBUFFERED=1 is set
    unless `env` says otherwise. With `wait_ready`, waits for /health 200 (a port taken meanwhile by someone
    else is retried on a fresh one) and raises RuntimeError with the log if the server exits first.
    The log goes to a temporary folder removed afterwards, or to `log_dir` (kept) when given.
    """
    keep_log = log_dir is not None
    folder = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="standin-"))
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    attempts = 3 if port is None and wait_ready else 1
    proc: subprocess.Popen[bytes] | None = None
    try:
        for attempt in range(attempts):
            chosen = port if port is not None else free_port()
            argv = [*STANDIN_COMMAND, "serve", "api_server", model, "--server-name", "127.0.0.1"]
            argv += ["--server-port", str(chosen)]
            if api_key is not None:
                argv += ["--api-keys", api_key]
            argv += list(args)
            log_path = folder / f"standin-{chosen}.log"
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=full_env,
                    start_new_session=True,
                )
            standin = Standin(f"http://127.0.0.1:{chosen}", chosen, api_key, proc, log_path)
            if wait_ready:
                deadline = time.monotonic() + timeout
                while not _health_ok(chosen):
                    if proc.poll() is not None:
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"stand-in not ready after {timeout} s:\n{standin.log_text()}")
                    time.sleep(0.01)
                if proc.poll() is not None:
                    text = standin.log_text()
                    _kill(proc)
                    if "[Errno 98]" in text and attempt + 1 < attempts:
                        continue  # another test took the port between free_port() and bind
                    raise RuntimeError(f"stand-in exited with {proc.returncode} before ready:\n{text}")
            yield standin
            return
    finally:
        if proc is not None:
            _kill(proc)
        if not keep_log:
            shutil.rmtree(folder, ignore_errors=True)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
