"""Profile tuichat on its hot paths, black-box, the way the harness drives it (a pty, the stand-in, the tap).

    python bench/profile_run.py cpu  [--rate 300] [--chunks 1500]     # cProfile: start-up, idle, first word, streaming
    python bench/profile_run.py mem  [--warm 5] [--exchanges 20]      # tracemalloc + live objects per finished exchange
    python bench/profile_run.py show bench/out/profile/stream.prof     # print one saved profile again

tuichat runs unmodified: `BENCH_TUICHAT_PRELUDE` (see clients.py) installs the profiler before tuichat's main(),
and the harness moves it from phase to phase with signals, so each phase lands in its own file:

- `cpu`: SIGUSR1 dumps the cProfile of the main thread (where Textual's loop, httpx and the widgets run) and
  starts a fresh one. Phases: start-up (process start → first frame on the pty), ready (→ /health answered and
  output quiet), idle (a few seconds attached, doing nothing), typing (the prompt typed), first word (Enter →
  word 1 written to the terminal) and stream (the rest of the reply at --rate chunks/s). cProfile roughly doubles
  the time of Python-heavy code, so read the proportions, not the absolute times.
- `mem`: SIGUSR2 runs gc, dumps a tracemalloc snapshot (12 frames) and counts live objects by type. The harness
  takes one after --warm exchanges (imports and caches warm) and one after --exchanges more, then diffs them:
  what each finished exchange keeps, grouped by traceback and by type.

Everything goes to bench/out/profile/ (git-ignored): the .prof files, the snapshots and a summary .txt per run.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import shutil
import signal
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from clients import ALL_CLIENTS, PROMPT, use_source  # noqa: E402
from pty_screen import PtyClient, WordTimes  # noqa: E402
from run import Rig, Settings, rig, settle, wait_all_shown  # noqa: E402

OUT = BENCH / "out" / "profile"

CPU_PRELUDE = """
import cProfile, signal
_bench_prof = [cProfile.Profile(), 0]
def _bench_dump(*_):
    prof = _bench_prof[0]
    prof.disable()
    # written under another name first: the driver waits for the final name, which must be whole when it appears
    _bench_path = {out!r} + f"/phase{{_bench_prof[1]}}.prof"
    prof.dump_stats(_bench_path + ".part")
    __import__("os").replace(_bench_path + ".part", _bench_path)
    _bench_prof[1] += 1
    _bench_prof[0] = cProfile.Profile()
    _bench_prof[0].enable()
signal.signal(signal.SIGUSR1, _bench_dump)
_bench_prof[0].enable()
"""

MEM_PRELUDE = """
import sys, tracemalloc, signal
_bench_snap = [0]
def _bench_snapshot(*_):
    import gc, json, collections
    if not tracemalloc.is_tracing():
        # traced from the first snapshot on, which is all the diff needs: tracing start-up too (12 frames per
        # allocation) made it so slow that the first /health timed out and the chat never became ready
        tracemalloc.start(12)
    gc.collect()
    snap = tracemalloc.take_snapshot()
    snap.dump({out!r} + f"/snap{{_bench_snap[0]}}.tm")
    counts = collections.Counter(f"{{type(o).__module__}}.{{type(o).__qualname__}}" for o in gc.get_objects())
    with open({out!r} + f"/types{{_bench_snap[0]}}.json", "w") as f:
        json.dump(counts, f)
    with open({out!r} + f"/modules{{_bench_snap[0]}}.txt", "w") as f:
        f.write("\\n".join(sorted(sys.modules)))
    _bench_snap[0] += 1
    with open({out!r} + "/snap.done", "w") as f:
        f.write(str(_bench_snap[0]))
signal.signal(signal.SIGUSR2, _bench_snapshot)
"""

# Frames every call passes through (the event loop, message dispatch, the import machinery): listed, they would
# fill the top of every table and say nothing about where the time goes.
PLUMBING = ("asyncio/", "importlib", "textual/message_pump.py", "textual/_callback.py", "cli/main.py", "threading.py")

CPU_PHASES = ["startup", "ready", "idle", "typing", "first-word", "stream"]


def start_tuichat(rig_: Rig, home: Path, prelude: str, cols: int = 120, rows: int = 40) -> PtyClient:
    client = ALL_CLIENTS["tuichat"]
    os.environ["BENCH_TUICHAT_PRELUDE"] = prelude
    try:
        client.prepare(home, rig_.server)
        argv = client.argv(home, rig_.server)
    finally:
        del os.environ["BENCH_TUICHAT_PRELUDE"]
    return PtyClient(argv, client.env(home), cwd=str(home), rows=rows, cols=cols)


def wait_file(path: Path, timeout: float, pty: PtyClient) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return True
        pty.pump(0.05)
    return False


def cpu(args: argparse.Namespace, rig_: Rig, work: Path) -> None:
    out = OUT / "cpu"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    home = work / "home-cpu"
    rig_.configure(args.rate, args.chunks)
    pty = start_tuichat(rig_, home, CPU_PRELUDE.format(out=str(out)))
    client = ALL_CLIENTS["tuichat"]
    phase = [0]

    def cut() -> None:
        os.kill(pty.pid, signal.SIGUSR1)
        if not wait_file(out / f"phase{phase[0]}.prof", 20, pty):
            raise RuntimeError(f"tuichat wrote no profile for phase {CPU_PHASES[phase[0]]}")
        phase[0] += 1

    try:
        pty.start()
        if pty.wait_for_text(client.frame_text, 60) is None:
            raise RuntimeError("no first frame")
        cut()  # startup
        if pty.wait_for_text(client.ready_text, 60) is None:
            raise RuntimeError("never ready")
        settle(pty, limit=2.0)
        cut()  # ready
        end = time.monotonic() + args.idle
        while time.monotonic() < end:
            pty.pump(0.1)
        cut()  # idle
        pty.write(PROMPT.encode())
        if pty.wait_for_text(PROMPT, 10) is None:
            raise RuntimeError("the prompt did not show")
        settle(pty, quiet=0.1, limit=1.0)
        cut()  # typing
        pty.pump(0.05)
        rig_.reset_log()
        pty.max_word = args.chunks
        pty.pause_screen()
        pty.write(b"\r")
        while 1 not in pty.words.seen:
            pty.pump(0.001)
        cut()  # first word
        if wait_all_shown(pty, rig_, args.chunks, args.chunks / args.rate + 30) is None:
            raise RuntimeError(f"only {pty.words.highest} of {args.chunks} words shown")
        cut()  # stream
    finally:
        pty.stop()
    lines = [f"# cProfile of tuichat's main thread, per phase ({args.chunks} chunks at {args.rate:.0f}/s)", ""]
    for i, name in enumerate(CPU_PHASES):
        prof = out / f"phase{i}.prof"
        final = out / f"{name}.prof"
        prof.rename(final)
        lines += summarise(final, name, args.top)
    text = "\n".join(lines) + "\n"
    (out / "summary.txt").write_text(text)
    print(text)


def summarise(path: Path, title: str, top: int) -> list[str]:
    """The phase's top functions by cumulative time and by own time, each as % of the phase's total."""
    stats = pstats.Stats(str(path))
    raw = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for (_cc, _nc, tt, _ct, _callers) in raw.values()) or 1e-9
    lines = [f"## {title}: {total * 1000:.0f} ms of profiled main-thread time", ""]

    def name(func: tuple[str, int, str]) -> str:
        file, line, fn = func
        short = file
        for marker in ("site-packages/", "/src/", "python3.11/"):
            if marker in file:
                short = file.split(marker, 1)[1]
                break
        return f"{short}:{line}({fn})"

    def listing(heading: str, rows: list[tuple[tuple[str, int, str], Any]], col: int, limit: int) -> list[str]:
        out = [f"{heading} (% of phase) | calls | function"]
        for func, entry in rows[:limit]:
            out.append(f"{100 * entry[col] / total:6.1f} | {entry[1]:8d} | {name(func)}")
        return [*out, ""]

    by_cum = sorted(raw.items(), key=lambda kv: kv[1][3], reverse=True)
    useful = [kv for kv in by_cum if not any(g in kv[0][0] for g in PLUMBING) and not kv[0][0].startswith("~")]
    lines += listing("cumulative, plumbing left out", useful, 3, top)
    ours = [kv for kv in by_cum if "tuichat/" in kv[0][0] and kv[0][2] != "<module>"]
    lines += listing("tuichat's own functions, cumulative", ours, 3, top // 2)
    modules = [kv for kv in by_cum if kv[0][2] == "<module>" and 100 * kv[1][3] / total >= 1.0]
    if modules:
        lines += listing("module imports, cumulative", modules, 3, top // 2)
    by_own = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)
    lines += listing("own time", by_own, 2, top)
    return lines


def exchange(pty: PtyClient, rig_: Rig, k: int, words: int) -> None:
    base = k * 100
    rig_.configure(300.0, words, offset=base)
    rig_.reset_log()
    pty.words = WordTimes(highest=base)
    pty.max_word = base + words
    ALL_CLIENTS["tuichat"].send(pty, f"{PROMPT[:-1]}, round {k}.", timeout=30)
    if wait_all_shown(pty, rig_, words, 60.0, base) is None:
        raise RuntimeError(f"exchange {k}: only {pty.words.highest - base} of {words} words shown")
    settle(pty, quiet=0.3, limit=3.0)


def mem(args: argparse.Namespace, rig_: Rig, work: Path) -> None:
    out = OUT / "mem"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    pty = start_tuichat(rig_, work / "home-mem", MEM_PRELUDE.format(out=str(out)))
    done = out / "snap.done"

    def snapshot(n: int) -> None:
        os.kill(pty.pid, signal.SIGUSR2)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if done.exists() and done.read_text() == str(n):
                return
            pty.pump(0.1)
        raise RuntimeError("no snapshot")

    rss: list[float] = []
    try:
        pty.start()
        if pty.wait_for_text("● ready", 120) is None:
            raise RuntimeError("never ready; the screen:\n" + pty.text())
        settle(pty, limit=2.0)
        for k in range(1, args.warm + 1):
            exchange(pty, rig_, k, args.words)
        snapshot(1)
        rss.append(pty.rss_mb())
        for k in range(args.warm + 1, args.warm + args.exchanges + 1):
            exchange(pty, rig_, k, args.words)
        snapshot(2)
        rss.append(pty.rss_mb())
    finally:
        pty.stop()
    text = "\n".join(diff_memory(out, args, rss)) + "\n"
    (out / "summary.txt").write_text(text)
    print(text)


def diff_memory(out: Path, args: argparse.Namespace, rss: Sequence[float]) -> list[str]:
    n = args.exchanges
    ignore = [
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
    ]
    a = tracemalloc.Snapshot.load(str(out / "snap0.tm")).filter_traces(ignore)
    b = tracemalloc.Snapshot.load(str(out / "snap1.tm")).filter_traces(ignore)
    total_a = sum(s.size for s in a.statistics("filename"))
    total_b = sum(s.size for s in b.statistics("filename"))
    lines = [
        f"# What {n} finished exchanges of {args.words} words keep (after {args.warm} warm-up exchanges)",
        "",
        f"RSS (tracemalloc on, so inflated): {rss[0]:.1f} → {rss[1]:.1f} MB ({(rss[1] - rss[0]) / n:.3f} MB each).",
        f"Traced Python heap: {total_a / 2**20:.1f} → {total_b / 2**20:.1f} MB "
        f"({(total_b - total_a) / n / 1024:.1f} KiB each).",
        "",
        "## growth by line (KiB per exchange, count per exchange)",
        "",
    ]
    for stat in b.compare_to(a, "lineno")[: args.top]:
        frame = stat.traceback[0]
        lines.append(
            f"{stat.size_diff / n / 1024:8.1f} KiB {stat.count_diff / n:8.1f} | {short(frame.filename)}:{frame.lineno}"
        )
    lines += ["", "## growth by traceback (the 12 largest; innermost frame last, tuichat/textual frames only)", ""]
    for stat in b.compare_to(a, "traceback")[:12]:
        lines.append(f"{stat.size_diff / n / 1024:.1f} KiB, {stat.count_diff / n:.1f} blocks per exchange:")
        frames = [
            f for f in stat.traceback if "tuichat" in f.filename or "textual" in f.filename or "rich" in f.filename
        ]
        for frame in frames[-8:]:
            lines.append(f"    {short(frame.filename)}:{frame.lineno}")
        lines.append("")
    ta = json.loads((out / "types0.json").read_text())
    tb = json.loads((out / "types1.json").read_text())
    grown = sorted(((tb.get(k, 0) - ta.get(k, 0), k) for k in set(ta) | set(tb)), reverse=True)
    lines += ["## live objects (gc-tracked) that grew, per exchange", ""]
    for diff, kind in grown[: args.top]:
        if diff > 0:
            lines.append(f"{diff / n:8.1f} | {kind} (now {tb.get(kind, 0)})")
    widgets = sorted(
        ((tb.get(k, 0), ta.get(k, 0), k) for k in tb if k.startswith(("tuichat.ui", "textual.widgets"))),
        reverse=True,
    )
    lines += ["", "## tuichat and Textual widget objects alive (before → after)", ""]
    for after, before, kind in widgets[:25]:
        lines.append(f"{before:6d} → {after:6d} | {kind}")
    return lines


def short(file: str) -> str:
    for marker in ("site-packages/", "/src/", "python3.11/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Profile tuichat's hot paths against the stand-in.")
    p.add_argument("what", choices=["cpu", "mem", "show"])
    p.add_argument("file", nargs="?", help="show: a .prof file")
    p.add_argument("--rate", type=float, default=300.0)
    p.add_argument("--chunks", type=int, default=1500)
    p.add_argument("--idle", type=float, default=5.0, help="cpu: seconds of the idle phase")
    p.add_argument("--warm", type=int, default=5, help="mem: exchanges before the first snapshot")
    p.add_argument("--exchanges", type=int, default=20, help="mem: exchanges between the two snapshots")
    p.add_argument("--words", type=int, default=30, help="mem: words per reply")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--src", type=Path, help="run tuichat from this copy of src/ (default: the working tree's)")
    args = p.parse_args(argv)
    if args.src:
        use_source(args.src.resolve())
    if args.what == "show":
        print("\n".join(summarise(Path(args.file), Path(args.file).stem, args.top)))
        return 0
    settings = Settings(chunks=args.chunks)
    with tempfile.TemporaryDirectory(prefix="tuichat-profile-") as tmp, rig(settings, Path(tmp)) as rig_:
        (cpu if args.what == "cpu" else mem)(args, rig_, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
