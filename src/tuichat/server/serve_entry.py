"""Runs lmdeploy (or another Python program) in this process with an API key that never reaches a command line.

lmdeploy 0.18 takes its API keys only as `--api-keys KEY`, and a command line is readable by every local user
(`ps`, `/proc/PID/cmdline`). So tuichat starts

    python .../tuichat/server/serve_entry.py --key-fd 0 --module lmdeploy -- serve api_server MODEL ...
    python .../tuichat/server/serve_entry.py --key-fd 0 --script /path/to/program -- serve api_server MODEL ...

and hands the key through the pipe on fd 0 (several keys: one a line). This program reads it, puts /dev/null on
that fd, appends `--api-keys KEY...` to `sys.argv` in memory and runs the module (`runpy`, as `python -m` does)
or the script in this same interpreter, so the program parses the same arguments it would have had on its command line.
lmdeploy's engine process gets its arguments through a multiprocessing pipe, never a command line.

The environment was not used on purpose: deleting a variable from `os.environ` leaves it in the initial
environment block that `/proc/PID/environ` shows for the life of the process.

Stdlib only, and Python 3.8 syntax: it is run by path with whatever interpreter a profile's command names,
which need not have tuichat installed. multiprocessing's spawn start method re-runs the main module in each
child, hence nothing happens on import.
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import sys

USAGE = "usage: serve_entry.py [--key-fd N] (--module MOD | --script PATH) [--] ARGS..."


class _Usage(Exception):
    pass


def _parse(argv: list[str]) -> tuple[int | None, str, str, list[str]]:
    """(key fd, "module" or "script", its name or path, the program's arguments)."""
    key_fd: int | None = None
    kind = ""
    target = ""
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            i += 1
            break
        if token in ("--key-fd", "--module", "--script"):
            if i + 1 >= len(argv):
                raise _Usage(f"{token} needs a value")
            value = argv[i + 1]
            if token == "--key-fd":
                if not value.isdigit():
                    raise _Usage(f"--key-fd needs a file descriptor number (got {value!r})")
                key_fd = int(value)
            else:
                if kind:
                    raise _Usage("give one of --module and --script")
                kind, target = token[2:], value
            i += 2
            continue
        break
    if not kind:
        raise _Usage("--module or --script is required")
    return key_fd, kind, target, argv[i:]


def _read_key(fd: int) -> str:
    """The key written to `fd` (up to EOF); the fd is closed, and fd 0 is left on /dev/null."""
    chunks: list[bytes] = []
    try:
        while True:
            data = os.read(fd, 4096)
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(fd)
        if fd == 0:
            null = os.open(os.devnull, os.O_RDONLY)
            if null != 0:
                os.dup2(null, 0)
                os.close(null)
    return b"".join(chunks).decode("utf-8").strip()


def main(argv: list[str]) -> int:
    try:
        key_fd, kind, target, args = _parse(argv)
    except _Usage as exc:
        sys.stderr.write(f"{USAGE}\nserve_entry.py: error: {exc}\n")
        return 2
    if key_fd is not None:
        try:
            key = _read_key(key_fd)
        except (OSError, UnicodeDecodeError) as exc:
            sys.stderr.write(f"serve_entry.py: error: cannot read the API key from fd {key_fd}: {exc}\n")
            return 2
        # one key a line: a fleet's node takes its own key and the proxy's (the proxy forwards the client's)
        keys = key.split()
        if not keys:
            sys.stderr.write(f"serve_entry.py: error: no API key arrived on fd {key_fd}\n")
            return 2
        args = [*args, "--api-keys", *keys]

    here = os.path.dirname(os.path.realpath(__file__))
    if sys.path and os.path.realpath(sys.path[0] or os.curdir) == here:
        # started by path, Python put tuichat's package folder first, where its modules would shadow top-level
        # ones of the same name
        del sys.path[0]
    if kind == "script":
        # as `python SCRIPT` would have it: the script's folder first on sys.path
        sys.path.insert(0, os.path.dirname(os.path.realpath(target)))
        sys.argv = [target, *args]
        runpy.run_path(target, run_name="__main__")
        return 0
    # as `python -m MOD`: the current folder first on sys.path; run_module sets argv[0] to the module's file
    sys.path.insert(0, os.getcwd())
    try:
        found = importlib.util.find_spec(target) is not None
    except ImportError:
        found = False
    if not found:
        # python's own words for `python -m lmdeploy` without lmdeploy (the launcher's hint looks for them)
        sys.stderr.write(f"{sys.executable}: No module named {target}\n")
        return 1
    sys.argv = [target, *args]
    runpy.run_module(target, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
