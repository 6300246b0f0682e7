"""Start and stop whole process groups: a server (or a quantize job) and every process it spawned.

LMDeploy's server spawns an engine process that holds the GPU memory; killing only the server leaves that
engine orphaned with the memory (seen on an H200). So every managed program runs in its own session, and
stopping signals the whole group, escalating SIGINT -> SIGTERM -> SIGKILL until no member is left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


def spawn_group(
    argv: Sequence[str],
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stdin_data: bytes | None = None,
) -> subprocess.Popen[bytes]:
    """Start `argv` as the leader of a new session; stdout and stderr go to `log_path` (appended, 0600).

    `stdin_data` (a secret, say) is the program's whole stdin: a pipe that holds it, then end of file. Nothing
    of it shows in the program's command line or environment.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    full_env = dict(os.environ if env is None else env)
    full_env["PYTHONUNBUFFERED"] = "1"  # lmdeploy's HINT lines are buffered stdout otherwise
    stdin: int = subprocess.DEVNULL
    if stdin_data is not None:
        if len(stdin_data) > _STDIN_MAX:
            raise ValueError(f"stdin_data is {len(stdin_data)} bytes; at most {_STDIN_MAX} fit the pipe")
        stdin = _pipe_holding(stdin_data)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        return subprocess.Popen(
            list(argv),
            stdin=stdin,
            stdout=fd,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
        )
    finally:
        os.close(fd)
        if stdin != subprocess.DEVNULL:
            os.close(stdin)


# Written whole before the program starts, so it must fit a pipe's buffer: 4096 bytes is the smallest Linux has.
_STDIN_MAX = 4096


def _pipe_holding(data: bytes) -> int:
    """The read end of a pipe that holds `data` and whose write end is already closed."""
    read_end, write_end = os.pipe()
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(write_end, view) :]
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    return read_end


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists and is not a zombie."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    # The state letter follows the parenthesised command name, which may itself contain ')'.
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in _DEAD or _threads_alive(pid)


_DEAD = ("Z", "X")


def _threads_alive(pid: int) -> bool:
    """True if some thread of `pid` still runs although its main thread is a zombie.

    /proc/PID/stat shows the main thread only; a server whose main thread has exited while other threads
    finish their work (seen with lmdeploy on shutdown) is not gone yet and cannot be reaped.
    """
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tasks:
        try:
            state = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in _DEAD:
            return True
    return False


def process_start_ticks(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot (from /proc); None if unknown or gone.

    Stored with a server record so that a pid reused by an unrelated program after a reboot or a crash is
    never mistaken for our server (and never signalled).
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return None
    # fields[0] is stat field 3 (state); starttime is field 22
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def group_pids(pgid: int) -> set[int]:
    """Pids of live (non-zombie) processes whose process group or session is `pgid`, read from /proc.

    A program started with `spawn_group` leads both its group and its session; counting the session too keeps
    a worker that moved to a group of its own (setpgid) among the program's processes, for GPU attribution
    and for the stop.
    """
    return set(_members(pgid))


def _members(leader: int) -> dict[int, int]:
    """{pid: its process group} for live processes in the group or session `leader`."""
    found: dict[int, int] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(leader, 0)
        except OSError:
            return found
        return {leader: leader}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        # after the name: state, ppid, pgrp, session, ...
        if len(fields) < 4 or leader not in (int(fields[2]), int(fields[3])):
            continue
        if fields[0] not in _DEAD or _threads_alive(int(entry.name)):
            found[int(entry.name)] = int(fields[2])
    return found


def signal_all(leader: int, sig: signal.Signals) -> bool:
    """Send `sig` to every process group with a member in `leader`'s group or session; False if none is left."""
    groups = set(_members(leader).values())
    if not groups:
        return False
    sent = False
    for pgid in groups:
        try:
            os.killpg(pgid, sig)
            sent = True
        except ProcessLookupError:
            continue
        except PermissionError:
            continue
    return sent


@dataclass(frozen=True)
class StopResult:
    """How a group stop went: which signal finally ended it, and whether anything survived."""

    signal_used: str
    seconds: float
    survivors: frozenset[int]
    # pids of the group that NVML still lists with a GPU context after the stop (filled in by the launcher)
    gpu_holders: frozenset[int] = frozenset()

    @property
    def clean(self) -> bool:
        return not self.survivors and not self.gpu_holders

    def describe(self, what: str = "The server") -> str:
        """One sentence for the user about how the stop went."""
        if self.signal_used == "none":
            done = f"{what} had already stopped."
        else:
            done = f"{what} stopped after {self.signal_used} in {self.seconds:.1f} s."
        if self.survivors:
            pids = ", ".join(str(p) for p in sorted(self.survivors))
            return f"{done[:-1]}, but processes {pids} are still alive: end them with `kill -9 {pids}`."
        if self.gpu_holders:
            pids = ", ".join(str(p) for p in sorted(self.gpu_holders))
            return f"{done[:-1]}, but processes {pids} still hold GPU memory: check `nvidia-smi`."
        return done


def _reap(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0)


def stop_group(
    pgid: int,
    timeout: float = 30.0,
    proc: subprocess.Popen[bytes] | None = None,
    poll: float = 0.05,
    kill_grace: float = 5.0,
) -> StopResult:
    """Stop every process in group `pgid`: SIGINT, then SIGTERM at half the timeout, SIGKILL at the timeout.

    `proc` (the leader's Popen, when we started it) is reaped so it does not linger as a zombie.
    """
    start = time.monotonic()
    steps = [(signal.SIGINT, timeout / 2), (signal.SIGTERM, timeout / 2), (signal.SIGKILL, kill_grace)]
    used = "none"
    for sig, wait in steps:
        _reap(proc)
        if not group_pids(pgid):
            break
        if not signal_all(pgid, sig):
            continue
        used = sig.name
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap(proc)
            if not group_pids(pgid):
                break
            time.sleep(poll)
        else:
            continue
        break
    _reap(proc)
    return StopResult(used, time.monotonic() - start, frozenset(group_pids(pgid)))
