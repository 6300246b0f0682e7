"""Start-up A/B: time to tuichat's first frame from two copies of src/, alternating, with the Textual floor.

    python bench/ab_first_frame.py OTHER_SRC [SRC ...] [--runs 20] [--size 120x40]

Each round starts the floor app (bench/floor_app.py), then tuichat from each source folder in turn, each in a
pty of its own with a fresh TUICHAT_HOME, and times process start -> the prompt box's top border ("╭", the
harness's first-frame mark) in the pty's output. Rounds alternate the sources so that this machine's drift (20-30 %
over minutes on the 2-core machine) falls on both alike; `bench/run.py`'s start-up table runs one source at a time.
tuichat is pointed at a closed port: what is timed is start-up, not a server's answer. Prints the median, the lower
quartile and the ratio to the floor per source.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import pty
import select
import shutil
import signal
import statistics
import struct
import sys
import tempfile
import termios
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
TUICHAT_MARK = "╭".encode()
FLOOR_MARK = b"floor ready"


def first_frame(argv: list[str], env: dict[str, str], mark: bytes, size: tuple[int, int], limit: float = 20.0) -> float:
    """Seconds from the fork to `mark` in the program's terminal output (the program is killed then)."""
    home = tempfile.mkdtemp(prefix="ab-ff-")
    env = {**env, "TUICHAT_HOME": home}
    started = time.monotonic()
    pid, fd = pty.fork()
    if pid == 0:  # the child: the program, on the pty
        os.execve(argv[0], argv, env)
    cols, rows = size
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    seen = b""
    try:
        while time.monotonic() - started < limit:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if not ready:
                continue
            try:
                data = os.read(fd, 65536)
            except OSError:
                break
            seen += data
            if mark in seen:
                return time.monotonic() - started
        raise RuntimeError(f"{argv} drew no first frame within {limit:g} s")
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(fd)
        shutil.rmtree(home, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("srcs", nargs="+", type=Path, help="src/ folders to compare (the working tree's is added last)")
    p.add_argument("--runs", type=int, default=20, help="rounds (each: the floor, then every source once)")
    p.add_argument("--size", default="120x40", help="terminal size, COLSxROWS")
    a = p.parse_args()
    cols, rows = (int(x) for x in a.size.split("x"))
    srcs = [s.resolve() for s in a.srcs]
    if (BENCH.parent / "src").resolve() not in srcs:
        srcs.append((BENCH.parent / "src").resolve())
    base_env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "HOME", "TERM")}
    base_env.setdefault("TERM", "xterm-256color")
    # what else the interpreter needs (the GPU machine's packages live on PYTHONPATH), without any tuichat source
    others = [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x and Path(x).resolve() not in srcs]
    if others:
        base_env["PYTHONPATH"] = os.pathsep.join(others)
    floor_argv = [sys.executable, str(BENCH / "floor_app.py")]
    tui_argv = [sys.executable, "-m", "tuichat", "--url", "http://127.0.0.1:9", "--api-key", "k", "--model", "m"]
    floor: list[float] = []
    times: dict[Path, list[float]] = {s: [] for s in srcs}
    for _ in range(a.runs):
        floor.append(first_frame(floor_argv, base_env, FLOOR_MARK, (cols, rows)))
        for src in srcs:
            path = os.pathsep.join([str(src), *others])
            times[src].append(first_frame(tui_argv, {**base_env, "PYTHONPATH": path}, TUICHAT_MARK, (cols, rows)))
    f = statistics.median(floor)
    print(f"| source | first frame, median (s) | lower quartile (s) | vs the floor ({f:.3f} s) |")
    print("| --- | --- | --- | --- |")
    for src in srcs:
        m = statistics.median(times[src])
        q = statistics.quantiles(times[src], n=4)[0] if len(times[src]) > 1 else m
        print(f"| {src} | {m:.3f} | {q:.3f} | {m / f:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
